"""Shared test fixtures: tiny random GPT-2 and Llama-style models with a BPE tokenizer trained here, offline."""
import os
import sys

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_configure(config):
    import torch
    torch.set_num_threads(1)  # the test models are tiny: one thread is as fast, and never oversubscribes 2 cores
    config.addinivalue_line("markers", "curves: the test checks the curves.png train.py draws (test_plot.py)")


@pytest.fixture(autouse=True)
def _curves_only_where_checked(request, monkeypatch):
    """train.py draws curves.png after every run, about 0.5 s of matplotlib: a fifth of the suite's time over its
    many tiny runs. Tests marked `curves` check the drawing; the others skip it (runs in child processes draw)."""
    train = sys.modules.get("train")  # imported by the test's module if the test trains
    if train is not None and "curves" not in request.keywords:
        monkeypatch.setattr(train, "save_curves", lambda out: None)

SMILES = ["CCO", "c1ccccc1", "CC(=O)O", "CCN(CC)CC", "O=C(O)c1ccccc1", "CC(C)Cc1ccc(C)cc1", "C1CCCCC1",
          "CCOC(=O)C", "Nc1ccccc1", "CC#N", "OCC(O)CO", "ClCCl", "BrC=CBr", "FC(F)(F)c1ccccc1", "CS(=O)(=O)C",
          "c1ccncc1", "C[C@@H](N)C(=O)O", "c1ccc2ccccc2c1", "CC(C)(C)O", "O=[N+]([O-])c1ccccc1"] * 5


def make_tiny(path, arch):
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(SMILES + ["hello world, this is text"] * 5, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    ids = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2, **ids))
    else:
        model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=64, **ids))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-gpt2"), "gpt2")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny-llama"), "llama")


@pytest.fixture
def ctrl_c_after_step(monkeypatch):
    """ctrl_c_after_step(n) makes train.py stop after step n, as its SIGINT handler would (at a known moment);
    it returns the function that undoes it."""
    import checkpoint
    import train
    real_log_step = train.log_step

    def arm(n):
        def log_then_stop(log_file, metrics):
            real_log_step(log_file, metrics)
            if metrics["step"] == n:
                checkpoint.STOP["requested"] = True
        monkeypatch.setattr(train, "log_step", log_then_stop)
        return lambda: monkeypatch.setattr(train, "log_step", real_log_step)
    return arm
