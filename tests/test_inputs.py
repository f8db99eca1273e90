"""Two bad inputs that used to pass without a word, each now one line (exit 2): a prompt the tokenizer cannot
represent, and a checkpoint sampled under another built-in task than the one it learned."""
import json
import os

import pytest

import checks
import sample
import train
from model import load_model

FAST = ["--steps", "2", "--batch-size", "4", "--grad-accum", "1", "--max-len", "5", "--min-len", "1",
        "--k-min-start", "2", "--k-min-end", "1", "--eval-every", "0"]


def one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_the_pieces_a_tokenizer_cannot_represent(tiny_gpt2):
    atoms = load_model("prior")[1]  # the embedded SMILES prior's atom tokenizer: "xxxx" is one <unk>
    assert atoms("xxxx", add_special_tokens=False).input_ids == [atoms.unk_token_id]
    assert checks.unknown_text(atoms, "xxxx") == ["xxxx"]
    assert checks.unknown_text(atoms, "C[Xe]Cq[Xe]") == ["[Xe]", "q"] and checks.unknown_text(atoms, "CC(=O)Cl") == []
    assert checks.unknown_text(load_model(tiny_gpt2)[1], "any text ☃") == []  # byte-level BPE has no <unk>


@pytest.mark.parametrize("flags, piece", [(["--prompt", "xxxx"], "'xxxx'"),  # the SMILES prior, the default
                                          (["--task", "expr24", "--prompt", "1+a"], "'a'")])  # its scratch model
def test_a_prompt_with_unknown_text_is_one_line(tmp_path, capsys, flags, piece):
    out = tmp_path / "run"
    err = one_line_error(capsys, train.main([*flags, "--out", str(out)]))
    assert "--prompt" in err and f"cannot represent {piece}" in err
    assert not out.exists()  # a flag check: before anything is loaded or written


def test_a_bare_model_is_checked_the_same_way(capsys):
    err = one_line_error(capsys, sample.main(["prior", "--prompt", "xx", "--n", "5", "--fidelity-n", "0"]))
    assert "cannot represent 'xx'" in err


def test_another_built_in_task_than_the_checkpoints_needs_any_task(tiny_gpt2, tmp_path, capsys):
    run = tmp_path / "run"
    assert train.main(["--task", "smiles", "--model", tiny_gpt2, "--out", str(run), *FAST]) == 0
    capsys.readouterr()
    err = one_line_error(capsys, sample.main([str(run), "--task", "expr24", "--n", "8", "--fidelity-n", "0"]))
    assert "'smiles'" in err and "'expr24'" in err and "--any-task" in err
    assert not (run / "samples.csv").exists()

    assert sample.main([str(run), "--task", "smiles", "--n", "8", "--fidelity-n", "0"]) == 0  # its own task: fine
    assert "norm_cov" not in json.load(open(run / "samples_metrics.json"))
    assert sample.main([str(run), "--task", "expr24", "--any-task", "--n", "8", "--fidelity-n", "0", "--overwrite"]) == 0
    metrics = json.load(open(run / "samples_metrics.json"))  # the user meant it: Expr24's grammar and metrics
    assert "norm_cov" in metrics and os.path.isfile(run / "samples.csv")
