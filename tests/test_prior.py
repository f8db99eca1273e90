"""Tests for the shipped SMILES prior (tasks/smiles/prior/), its recipe tasks/smiles/train_prior.py and its tokenizer."""

import json
import os

import pytest
import torch

from tasks.smiles.train_prior import (
    BOS,
    EOS,
    PAD,
    SPECIAL_TOKENS,
    UNK,
    build_tokenizer,
    distinct_regex_tokens,
    load_prior,
    read_smiles,
    regex_tokens,
    sample_smiles,
    save_prior,
    smiles_vocabulary,
)

ROOT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "smiles")
PRIOR = os.path.join(ROOT, "prior")
TRAIN_FILE = os.path.join(ROOT, "data", "moses_train_subset.smi.gz")
HELDOUT_FILE = os.path.join(ROOT, "data", "moses_test_holdout.smi")


@pytest.fixture(scope="module")
def prior():
    os.environ["HF_HUB_OFFLINE"] = "1"  # belt and braces: load_prior also passes local_files_only
    return load_prior(PRIOR)


@pytest.fixture(scope="module")
def tokenizer(prior):
    return prior[1]


def test_special_token_ids_are_first_and_stable(tokenizer):
    assert [tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token, tokenizer.unk_token] == [PAD, BOS, EOS, UNK]
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [0, 1, 2, 3]
    vocab = tokenizer.get_vocab()
    assert sorted(vocab, key=vocab.get) == smiles_vocabulary()  # the shipped ids are the ones the code defines
    assert sorted(vocab, key=vocab.get)[: len(SPECIAL_TOKENS)] == SPECIAL_TOKENS


def test_encode_prepends_bos_only(tokenizer):
    bare = tokenizer("CCO", add_special_tokens=False).input_ids
    assert tokenizer.convert_ids_to_tokens(bare) == ["C", "C", "O"]
    assert tokenizer("CCO").input_ids == [tokenizer.bos_token_id] + bare
    assert tokenizer.convert_ids_to_tokens(tokenizer("Clc1cc[nH]c1[C@@H](Br)%12").input_ids[1:]) == [
        "Cl", "c", "1", "c", "c", "[nH]", "c", "1", "[C@@H]", "(", "Br", ")", "%12"]


def test_decode_skips_special_tokens_and_adds_no_spaces(tokenizer):
    ids = tokenizer("c1ccccc1O").input_ids + [tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.pad_token_id]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "c1ccccc1O"


def test_unknown_characters_become_unk_not_dropped(tokenizer):
    ids = tokenizer("C[Xe]C", add_special_tokens=False).input_ids
    assert ids == [tokenizer.convert_tokens_to_ids("C"), tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("C")]


def test_heldout_smiles_round_trip_exactly(tokenizer):
    smiles = read_smiles(HELDOUT_FILE)
    assert len(smiles) == 2000
    encoded = tokenizer(smiles, add_special_tokens=False).input_ids
    vocab = tokenizer.get_vocab()
    for s, ids in zip(smiles, encoded):
        assert tokenizer.unk_token_id not in ids, s
        assert tokenizer.decode(ids, skip_special_tokens=True) == s
        assert ids == [vocab[t] for t in regex_tokens(s)]  # the fast path train_prior.py trains on


def test_vocabulary_covers_every_token_of_the_training_file(tokenizer):
    smiles = read_smiles(TRAIN_FILE)
    assert len(smiles) == 500_000
    missing = distinct_regex_tokens(smiles) - set(tokenizer.get_vocab())  # also checks no character is dropped
    assert not missing


def test_rebuilt_tokenizer_matches_the_shipped_one(tokenizer):
    rebuilt = build_tokenizer(read_smiles(HELDOUT_FILE))
    assert rebuilt.get_vocab() == tokenizer.get_vocab()
    s = "CC(=O)Nc1ccc(O)cc1"
    assert rebuilt(s).input_ids == tokenizer(s).input_ids


def test_prior_loads_offline_in_float32(prior):
    model, tokenizer = prior
    assert all(p.dtype == torch.float32 for p in model.parameters())
    n_params = sum(p.numel() for p in model.parameters())
    assert 2e6 <= n_params <= 5e6
    config = model.config
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    assert config.vocab_size == len(tokenizer)
    with open(os.path.join(PRIOR, "metrics.json")) as f:
        assert "eval" in json.load(f)


def test_prior_samples_are_mostly_valid(prior):
    Chem = pytest.importorskip("rdkit.Chem")
    from rdkit import RDLogger
    RDLogger.DisableLog("rdApp.*")
    model, tokenizer = prior
    samples = sample_smiles(model, tokenizer, 64, seed=0)
    valid = [s for s in samples if s and Chem.MolFromSmiles(s) is not None]
    assert len(valid) / len(samples) >= 0.6, samples
    assert len(set(valid)) > len(valid) // 2  # not one molecule over and over


@pytest.mark.parametrize("folder", ["prior", "prior_sidechain", "../game24/prior"])
def test_an_embedded_model_folder_runs_no_code_when_loaded(folder):
    """Each embedded model's recipe sits beside its folder, not in it; Hugging Face only runs a folder's code
    through an auto_map in its configs (and trust_remote_code), which none has."""
    path = os.path.join(ROOT, folder)
    assert not [f for f in os.listdir(path) if f.endswith(".py")], f"{folder}/ holds code"
    for name in ("config.json", "tokenizer_config.json"):
        with open(os.path.join(path, name)) as f:
            assert "auto_map" not in json.load(f), f"{folder}/{name}"


def test_saving_a_prior_replaces_its_folder(prior, tmp_path):
    model, tokenizer = prior
    out = tmp_path / "prior"
    out.mkdir()
    (out / "stale.json").write_text("{}")
    save_prior(model, tokenizer, {"train": {}}, str(out))
    assert not (out / "stale.json").exists()
    assert load_prior(str(out))[0].config.vocab_size == len(tokenizer)
