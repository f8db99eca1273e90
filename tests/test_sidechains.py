"""Side-chain corpus and prior (tasks/smiles/sidechains.py): derivation by hand and by determinism, the shipped
prior_sidechain."""

import torch
from rdkit import Chem

import rewards
from tasks.smiles.task import SmilesTask

from tasks.smiles import sidechains
from tasks.smiles.train_prior import read_smiles


GRAPH = SmilesTask(attach="graph")  # the paper's scaffold, side chains joined on the molecular graph


def canonical(smiles):
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles))


def test_hand_checked_side_chains():
    # acetanilide with a phenyl and a methoxy: six acyclic single bonds between heavy atoms
    got = sorted(sidechains.side_chains("CC(=O)Nc1ccc(-c2ccccc2)cc1OC"))
    assert got == sorted(["C", "C(C)=O", "NC(C)=O", "c1ccccc1", "OC", "C"])
    # a tie (2 heavy atoms each side of C-C): the shorter, then alphabetically first string
    assert sorted(sidechains.side_chains("OCCN")) == ["CN", "N", "O"]
    # ring bonds, double bonds and bonds to H are never cut
    assert sidechains.side_chains("c1ccccc1") == [] and sidechains.side_chains("C=O") == []


def test_side_chains_are_rooted_and_reattach():
    smiles = "COc1ccc(C(=O)N2CCC(c3ccncc3)CC2)cc1F"
    for text in sidechains.side_chains(smiles):
        chain = Chem.MolFromSmiles("[*:1]" + text)
        dummy = next(a for a in chain.GetAtoms() if a.GetAtomMapNum() == 1)
        assert dummy.GetDegree() == 1, text  # written from the atom bonded to the attachment point
        assert GRAPH.is_valid(text), text  # and bonds to the task's scaffold
    # re-attaching the pyridyl to the rest gives back the molecule
    rest = Chem.MolFromSmiles("COc1ccc(C(=O)N2CCC([*:1])CC2)cc1F")
    assert Chem.MolToSmiles(Chem.molzip(rest, Chem.MolFromSmiles("[*:1]c1ccncc1"))) == canonical(smiles)
    assert "c1ccncc1" in sidechains.side_chains(smiles)


def test_derivation_is_deterministic(tmp_path):
    molecules = read_smiles(sidechains.MOLECULES)
    first = sidechains.derive_corpus(molecules, n_train=80, n_heldout=20, seed=3)
    second = sidechains.derive_corpus(molecules, n_train=80, n_heldout=20, seed=3)
    assert first == second and sum(first[0].values()) > 250
    paths = [tmp_path / "a.tsv.gz", tmp_path / "b.tsv.gz"]
    for path in paths:
        sidechains.write_counts(path, first[0])
    assert paths[0].read_bytes() == paths[1].read_bytes()  # no mtime, no file name in the gzip header
    assert sidechains.read_counts(paths[0]) == first[0]
    assert sidechains.derive_corpus(molecules, 80, 20, seed=4) != first


def test_shipped_corpus_is_covered_by_the_tokenizer():
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(sidechains.PRIOR)
    counts = sidechains.read_counts(sidechains.HELDOUT_FILE)
    stats = sidechains.corpus_stats(counts, tokenizer)
    assert stats["unknown_tokens"] == 0 and stats["occurrences"] > 10_000


def test_shipped_prior_loads_offline_and_attaches():
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import model as modellib
    path = sidechains.OUT
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    net = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch.float32)
    assert tokenizer.bos_token_id == 1 and tokenizer.eos_token_id == 2 and len(tokenizer) == 450
    policy = modellib.Policy(net.eval(), tokenizer, rewards.allowed_token_ids(tokenizer, SmilesTask.charset), 2, 10)
    torch.manual_seed(0)
    texts = policy.texts(*policy.sample(64)[:2])
    valid = sum(map(GRAPH.is_valid, texts))
    assert valid >= 0.7 * len(texts), texts


def test_missing_input_is_one_line_exit_2(tmp_path, capsys):
    assert sidechains.main(["derive", "--molecules", str(tmp_path / "nope.smi")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope.smi" in err
