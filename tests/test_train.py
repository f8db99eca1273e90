"""The trainer end to end on tiny random models: every loss runs, kill/resume is exact, bad input is one line."""
import csv
import json
import math
import os
import subprocess
import sys

import pytest
import torch

import losses
import rl_losses
import sample
import tracking
import checkpoint
import train

FAST = ["--steps", "3", "--batch-size", "6", "--grad-accum", "2", "--max-len", "5", "--min-len", "1",
        "--k-min-start", "3", "--k-min-end", "1", "--ckpt-every", "100", "--eval-every", "0"]


def run(model, out, *extra):
    return train.main(["--model", model, "--out", str(out), *FAST, *extra])


def read_log(out):
    return tracking.read_metrics(out, timings=False)


@pytest.mark.parametrize("loss", sorted(set(losses.LOSSES) - {"oracle"}))  # the oracle needs a task that lists its
@pytest.mark.parametrize("arch", ["tiny_gpt2", "tiny_llama"])  # target, not SMILES: test_oracle.py
def test_every_loss_trains(loss, arch, request, tmp_path):
    model = request.getfixturevalue(arch)
    replay = [] if loss in rl_losses.LOSSES else ["--replay", "rp"]  # the RL baselines run without (METHOD.md §9)
    assert run(model, tmp_path, "--loss", loss, *replay) == 0
    log = read_log(tmp_path)
    assert [m["step"] for m in log] == [1, 2, 3]
    assert all(torch.isfinite(torch.tensor([m["loss"], m.get("log_z", 0.0), m["grad_norm"]])).all() for m in log)
    assert all(("log_z" in m) == (loss not in rl_losses.NO_LOG_Z) for m in log)  # RLOO, GRPO: none to log
    assert os.path.isfile(os.path.join(tmp_path, "ckpt-000003", "state.pt"))


def test_periodic_fidelity_is_logged_and_printed(tiny_gpt2, tmp_path, capsys):
    assert run(tiny_gpt2, tmp_path, "--eval-every", "2", "--eval-n", "16") == 0
    rows = [m for m in read_log(tmp_path) if "kl_q_target" in m]
    assert [m["step"] for m in rows] == [0, 2, 3]  # the start, every 2 steps, the end
    assert all(math.isfinite(m["kl_q_target"]) and math.isfinite(m["log_z_estimate"]) for m in rows)
    out = capsys.readouterr().out
    assert "start (step 0): distance to the target" in out and "end (step 3)" in out and "missed mass" in out
    assert out.count("start (step 0): distance to the target") == 1  # printed when measured, not again at the end
    assert f"KL(q||p*) from {rows[0]['kl_q_target']:.3f} at step 0 to {rows[-1]['kl_q_target']:.3f} at step 3" in out


def test_training_moves_the_weights_and_logz(tiny_gpt2, tmp_path):
    assert run(tiny_gpt2, tmp_path, "--lr", "1e-2") == 0
    trained = checkpoint.find_checkpoint(str(tmp_path))
    before = torch.nn.utils.parameters_to_vector(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_gpt2).parameters())
    after = torch.nn.utils.parameters_to_vector(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(trained).parameters())
    assert not torch.allclose(before, after)
    assert read_log(tmp_path)[-1]["log_z"] != 0


@pytest.mark.parametrize("extra", [["--replay", "subm"], ["--lora", "--replay", "prt"]])
def test_kill_and_resume_is_bit_identical(tiny_llama, tmp_path, ctrl_c_after_step, extra):
    args = ["--steps", "4", *extra]
    assert run(tiny_llama, tmp_path / "straight", *args) == 0

    disarm = ctrl_c_after_step(2)
    assert run(tiny_llama, tmp_path / "killed", *args) == 130
    assert len(read_log(tmp_path / "killed")) == 2
    disarm()
    assert train.main(["--resume", "--out", str(tmp_path / "killed"), "--steps", "4"]) == 0

    assert read_log(tmp_path / "killed") == read_log(tmp_path / "straight")
    a = torch.load(os.path.join(checkpoint.find_checkpoint(str(tmp_path / "straight")), "state.pt"), weights_only=True)
    b = torch.load(os.path.join(checkpoint.find_checkpoint(str(tmp_path / "killed")), "state.pt"), weights_only=True)
    assert torch.equal(a["log_z"], b["log_z"])
    for name in ("adapter_model.safetensors", "model.safetensors"):
        pa = os.path.join(checkpoint.find_checkpoint(str(tmp_path / "straight")), name)
        if os.path.exists(pa):
            with open(pa, "rb") as fa, open(pa.replace("straight", "killed"), "rb") as fb:
                assert fa.read() == fb.read()


def test_sample_py_on_a_checkpoint(tiny_gpt2, tmp_path, capsys):
    assert run(tiny_gpt2, tmp_path, "--replay", "none") == 0
    csv_path = tmp_path / "s.csv"
    assert sample.main([str(tmp_path), "--n", "40", "--batch-size", "16", "--out", str(csv_path)]) == 0
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 40 and set(rows[0]) >= {"generated", "molecule", "valid", "score", "length", "log_prob"}
    assert all(1 <= int(r["length"]) <= 5 for r in rows)
    metrics = json.load(open(tmp_path / "s_metrics.json"))
    assert metrics["n"] == 40 and 0 <= metrics["acc"] <= 1
    assert "Acc" in capsys.readouterr().out


def test_sample_py_on_a_bare_model(tiny_gpt2, tmp_path):
    assert sample.main([tiny_gpt2, "--n", "10", "--scaffold", "", "--out", str(tmp_path / "b.csv")]) == 0


# ----------------------------------------------------------------------------- bad input

def error_of(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) == 1
    return err


def test_unknown_model(tmp_path, capsys):
    assert "cannot load model" in error_of(capsys, train.main(["--model", "nobody/nothing-xyz", "--out", str(tmp_path)]))


def test_missing_checkpoint(tmp_path, capsys):
    assert "no checkpoint" in error_of(capsys, train.main(["--resume", "--out", str(tmp_path / "nothing")]))
    assert "cannot load model" in error_of(capsys, sample.main([str(tmp_path / "nothing")]))


def test_corrupt_checkpoint(tiny_gpt2, tmp_path, capsys):
    assert run(tiny_gpt2, tmp_path, "--replay", "none") == 0
    capsys.readouterr()
    ckpt = checkpoint.find_checkpoint(str(tmp_path))
    state_path = os.path.join(ckpt, "state.pt")
    good = open(state_path, "rb").read()
    with open(state_path, "wb") as f:
        f.write(b"not a checkpoint")
    assert "corrupt or unsafe checkpoint" in error_of(capsys, train.main(["--resume", "--out", str(tmp_path)]))
    assert "corrupt or unsafe checkpoint" in error_of(capsys, sample.main([str(tmp_path)]))
    with open(state_path, "wb") as f:
        f.write(good)
    with open(os.path.join(ckpt, "model.safetensors"), "wb") as f:
        f.write(b"garbage")
    assert "cannot load" in error_of(capsys, sample.main([ckpt]))


def test_checkpoint_of_another_model(tiny_gpt2, tiny_llama, tmp_path, capsys):
    assert run(tiny_gpt2, tmp_path, "--replay", "none") == 0
    capsys.readouterr()
    err = error_of(capsys, train.main(["--resume", "--out", str(tmp_path), "--model", tiny_llama]))
    assert "was trained with --model" in err


def test_lora_adapter_on_another_model(tiny_gpt2, tiny_llama, tmp_path, capsys):
    assert run(tiny_llama, tmp_path, "--lora", "--replay", "none") == 0
    capsys.readouterr()
    state_path = os.path.join(checkpoint.find_checkpoint(str(tmp_path)), "state.pt")
    state = torch.load(state_path, weights_only=True)
    state["args"]["model"] = tiny_gpt2  # as if the base model had been swapped under the adapter
    torch.save(state, state_path)
    assert "cannot load LoRA adapter" in error_of(capsys, sample.main([str(tmp_path)]))


@pytest.mark.parametrize("scaffold, message", [("c1ccccc1", "exactly one"), ("C(*)C(", "does not parse")])
def test_bad_scaffold(tiny_gpt2, tmp_path, capsys, scaffold, message):
    assert message in error_of(capsys, run(tiny_gpt2, tmp_path, "--scaffold", scaffold))


@pytest.mark.parametrize("flags", [["--min-len", "6", "--max-len", "5"], ["--steps", "0"], ["--temp-prob", "1.5"],
                                   ["--lr", "-1"], ["--loss", "nope"], ["--batch-size", "0"]])
def test_bad_flags_exit_with_usage(tmp_path, flags, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(["--out", str(tmp_path), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1


def test_cli_prints_one_line_not_a_traceback(tmp_path):
    r = subprocess.run([sys.executable, "train.py", "--model", "nobody/nothing-xyz", "--out", str(tmp_path)],
                       capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                       env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.startswith("error:")


NEWER_FLAGS = ("eta_end", "absorb_end", "eta_anneal", "lr_schedule", "log_probs", "prefix_root",
               "log_z_mode", "log_z_dtype", "epsilon", "score_timeout", "replay_min_items", "anneal_span", "huber",
               "anchor", "replay_valid_only", "buffer_validity")


def test_a_checkpoint_older_than_the_flags_resumes_and_samples(tiny_gpt2, tmp_path, capsys):
    """checkpoint.saved_settings makes an old checkpoint whole (before_flags, then today's defaults): train.py
    resumes it and sample.py samples it, though its settings name none of the newer flags."""
    assert run(tiny_gpt2, tmp_path, "--steps", "2", "--ckpt-every", "1") == 0
    ckpt = checkpoint.find_checkpoint(str(tmp_path))
    state = torch.load(os.path.join(ckpt, "state.pt"), weights_only=True)
    state["args"] = {k: v for k, v in state["args"].items() if k not in NEWER_FLAGS}
    torch.save(state, os.path.join(ckpt, "state.pt"))
    resumed = checkpoint.saved_settings(state["args"], vars(train.make_parser().parse_args([])))
    assert (resumed.lr_schedule, resumed.eta_end, resumed.log_probs, resumed.epsilon) == ("constant", 0.25, "masked", 0.0)
    assert (resumed.huber, resumed.anchor, resumed.replay_valid_only, resumed.buffer_validity) == (0.0, 1.0, False, "task")
    assert sample.main([str(tmp_path), "--n", "4", "--fidelity-n", "0"]) == 0
    assert train.main(["--resume", "--out", str(tmp_path), "--steps", "3"]) == 0


def test_the_heap_trimmer_runs_here_and_is_a_no_op_without_glibc(monkeypatch):
    assert train.heap_trimmer()() in (0, 1, None)  # malloc_trim's 1: memory was handed back
    monkeypatch.setattr(train.ctypes.util, "find_library", lambda name: None)
    assert train.heap_trimmer()() is None
