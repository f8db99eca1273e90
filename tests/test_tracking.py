"""--wandb and --tensorboard (tracking.py): the same scalars as metrics.jsonl, offline; a missing package is one line
before any work; a resumed run continues the same wandb run."""
import glob
import json
import os
import sys

import pytest

import tracking
import checkpoint
import train


def args_for(model, out, *extra):
    return ["--model", model, "--out", str(out), "--steps", "3", "--batch-size", "4", "--grad-accum", "1",
            "--max-len", "4", "--min-len", "1", "--k-min-start", "2", "--k-min-end", "1", "--eval-every", "2",
            "--eval-n", "8", *extra]


def read_log(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_scalars_flatten_a_row():
    row = dict(step=4, loss=0.5, exact=False, kl_q_target=1.5, kl_q_target_ci=[1.0, 2.0], log_z_ci=None,
               ess=dict(q=3.0, ref=4.0), k_min=2)
    assert tracking.scalars(row) == {"loss": 0.5, "kl_q_target": 1.5, "kl_q_target_ci_lo": 1.0,
                                     "kl_q_target_ci_hi": 2.0, "ess/q": 3.0, "ess/ref": 4.0, "k_min": 2.0}


@pytest.mark.parametrize("flag, module, pip", [(["--wandb", "proj"], "wandb", "wandb"),
                                               (["--tensorboard"], "torch.utils.tensorboard", "tensorboard")])
def test_a_missing_package_is_one_line_before_any_work(tmp_path, capsys, monkeypatch, flag, module, pip):
    monkeypatch.setitem(sys.modules, module, None)  # what `import` meets where the package is not installed
    out = tmp_path / "run"
    assert train.main(["--out", str(out), *flag]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and f"pip install {pip}" in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # checked with the flags: nothing was loaded, nothing written


def test_a_resumed_run_that_meets_a_missing_package_is_one_line(tiny_gpt2, tmp_path, capsys, monkeypatch):
    pytest.importorskip("torch.utils.tensorboard")
    out = tmp_path / "run"
    assert train.main(args_for(tiny_gpt2, out, "--tensorboard")) == 0
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    capsys.readouterr()
    assert train.main(["--resume", "--out", str(out), "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "pip install tensorboard" in err and len(err.splitlines()) == 1, err


def test_tensorboard_events_hold_the_logged_scalars(tiny_gpt2, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    out = tmp_path / "run"
    assert train.main(args_for(tiny_gpt2, out, "--tensorboard")) == 0
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    log = read_log(out)
    for key in ("loss", "log_z", "reward", "kl_q_target"):
        logged = [(r["step"], r[key]) for r in log if key in r]
        got = [(e.step, e.value) for e in events.Scalars(key)]
        assert [s for s, _ in got] == [s for s, _ in logged]
        assert [v for _, v in got] == pytest.approx([v for _, v in logged], rel=1e-6)  # stored as float32
    assert [e.step for e in events.Scalars("kl_q_target_ci_lo")] == [0, 2, 3]


def test_wandb_offline_logs_the_scalars_and_a_resume_continues_its_run(tiny_gpt2, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # the run's files go under --out (dir=); wandb's own state here
    logged, real_init = [], wandb.init

    def spying_init(**kw):  # the real offline run, with what it is given recorded
        run = real_init(**kw)
        real_log = run.log
        run.log = lambda values, step=None: (logged.append((step, values)), real_log(values, step=step))[-1]
        return run
    monkeypatch.setattr(wandb, "init", spying_init)
    real_log_step = train.log_step

    def ctrl_c_after_step_2(log_file, metrics):  # what the SIGINT handler does, at a known moment
        real_log_step(log_file, metrics)
        if metrics["step"] == 2:
            checkpoint.STOP["requested"] = True

    out = tmp_path / "run"
    monkeypatch.setattr(train, "log_step", ctrl_c_after_step_2)
    assert train.main(args_for(tiny_gpt2, out, "--wandb", "gfn-test")) == 130
    monkeypatch.setattr(train, "log_step", real_log_step)
    assert train.main(["--resume", "--out", str(out), "--steps", "3"]) == 0

    log = read_log(out)
    assert [s for s, _ in logged] == [r["step"] for r in log] == [0, 1, 2, 3]
    assert all(values == tracking.scalars(row) for (_, values), row in zip(logged, log))
    runs = glob.glob(str(out / "wandb" / "offline-run-*"))
    ids = {os.path.basename(r).rsplit("-", 1)[1] for r in runs}
    state = checkpoint.load_state(checkpoint.find_checkpoint(str(out)))
    assert len(runs) == 2 and ids == {state["args"]["wandb_id"]}  # the resumed process continued the same run
