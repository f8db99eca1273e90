"""Many scaffolds (METHOD.md §11.5): one line is the single-scaffold task exactly, several are conditions, the shipped
set parses and suits the side-chain setting, bad files are one line."""
import json
import os

import pytest

from tasks.smiles.task import PAPER_SCAFFOLD, SmilesTask
import sample
from tasks.smiles import scaffolds
import tracking
import checkpoint
import train

FAST = ["--steps", "3", "--batch-size", "6", "--grad-accum", "2", "--max-len", "5", "--min-len", "1",
        "--k-min-start", "3", "--k-min-end", "1", "--eval-every", "2", "--eval-n", "8"]


def read_log(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in tracking.TIMINGS} for line in f]


def test_one_scaffold_in_a_file_is_the_single_scaffold_task(tiny_gpt2, tmp_path):
    (tmp_path / "one.tsv").write_text(PAPER_SCAFFOLD + "\n")
    assert train.main(["--model", tiny_gpt2, "--out", str(tmp_path / "a"), *FAST]) == 0
    assert train.main(["--model", tiny_gpt2, "--out", str(tmp_path / "b"), *FAST,
                       "--scaffolds", str(tmp_path / "one.tsv")]) == 0
    assert read_log(tmp_path / "a") == read_log(tmp_path / "b")
    a, b = (open(os.path.join(checkpoint.find_checkpoint(str(tmp_path / d)), "model.safetensors"), "rb").read()
            for d in "ab")
    assert a == b


def test_several_scaffolds_are_conditions(tiny_gpt2, tmp_path):
    (tmp_path / "many.tsv").write_text("# a comment\nc1ccc(*)cc1\nO=C1Nc2cc(*)ccc2N1\nC1CCN(*)CC1\theldout\n")
    task = scaffolds.scaffold_task(str(tmp_path / "many.tsv"))
    assert task.conditions == dict(train=["c1ccc(*)cc1.", "O=C1Nc2cc(*)ccc2N1."], heldout=["C1CCN(*)CC1."])
    assert task.given("c1ccc(*)cc1.").full("C") == "Cc1ccccc1"  # each condition's own scaffold
    assert train.main(["--model", tiny_gpt2, "--out", str(tmp_path / "run"), *FAST, "--samples-per-prompt", "3",
                       "--scaffolds", str(tmp_path / "many.tsv"), "--eval-prompts", "1"]) == 0
    last = read_log(tmp_path / "run")[-1]
    assert "heldout_kl_q_target" in last and "train_tv_target" in last and last["log_z"] != 0
    out = tmp_path / "s.csv"
    assert sample.main([str(tmp_path / "run"), "--n", "4", "--fidelity-n", "4", "--out", str(out)]) == 0
    metrics = json.load(open(tmp_path / "s_metrics.json"))
    assert [c["prompt"] for c in metrics["conditions"]] == task.conditions["train"] + task.conditions["heldout"]
    assert all("fidelity_kl_q_target" in c and "fidelity_ess" in c for c in metrics["conditions"])  # estimated
    assert metrics["heldout_n_conditions"] == 1 and "train_kl_q_target" in metrics and "train_acc" in metrics


@pytest.mark.parametrize("text, message", [("c1ccc(*)cc1\tnope\n", "SMILES<TAB>heldout"),
                                           ("c1ccccc1\n", "exactly one"), ("C(*)\theldout\n", "no training")])
def test_bad_scaffold_files_are_one_line(tiny_gpt2, tmp_path, capsys, text, message):
    (tmp_path / "bad.tsv").write_text(text)
    assert train.main(["--model", tiny_gpt2, "--out", str(tmp_path / "run"), *FAST,
                       "--scaffolds", str(tmp_path / "bad.tsv")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


def test_the_shipped_scaffolds_suit_the_side_chain_setting():
    train_set, heldout = scaffolds.read_scaffolds(scaffolds.SCAFFOLDS)
    assert len(train_set) == 40 and len(heldout) == 10 and not set(train_set) & set(heldout)
    from rdkit import Chem
    for s in train_set + heldout:
        mol = Chem.MolFromSmiles(s)
        dummy = next(a for a in mol.GetAtoms() if a.GetAtomicNum() == 0)
        assert s.count("*") == 1 and dummy.GetNeighbors()[0].GetIsAromatic()
        assert scaffolds.HEAVY_ATOMS[0] <= mol.GetNumHeavyAtoms() <= scaffolds.HEAVY_ATOMS[1]
        assert SmilesTask(s).is_valid("C")  # a methyl attaches to each
