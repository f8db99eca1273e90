"""Faults and bad input: every flag is checked before any work, a tampered state.pt is refused without running, and
a kill (even mid-save), a full disk or a non-finite loss leaves the last checkpoint intact and resumable exactly.
No run is lost or relabelled: --resume keeps every saved setting, a fresh run never lands on an old one, sample.py
never replaces samples; and a table of bad inputs to train.py, sample.py, plot.py and task files, each one line."""
import errno
import json
import os
import pickle
import random
import shutil
import signal
import threading
import time

import pytest
import torch
from safetensors import SafetensorError
from tqdm import tqdm

import checkpoint
import sample
import tracking
import train

FAST = ["--batch-size", "4", "--grad-accum", "1", "--max-len", "5", "--min-len", "1", "--k-min-start", "3",
        "--k-min-end", "1", "--eval-every", "0", "--replay", "subm", "--ckpt-every", "1"]
STEPS = 6


def run(model, out, *extra):
    return train.main(["--model", model, "--out", str(out), *FAST, *extra])


def one_line_error(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def last_line_error(stderr):
    """The error that ends a training run (above it: tqdm's bar)."""
    assert "Traceback" not in stderr, stderr
    return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def straight(tiny_gpt2, tmp_path_factory):
    """An uninterrupted run of STEPS steps: what every interrupted one must end up identical to."""
    out = tmp_path_factory.mktemp("straight")
    assert run(tiny_gpt2, out, "--steps", str(STEPS)) == 0
    return out


def assert_same_run(a, b):
    """Bit-identical: metrics.jsonl, weights, logZ, optimiser, RNG streams and replay buffer."""
    assert tracking.read_metrics(a, timings=False) == tracking.read_metrics(b, timings=False)
    ca, cb = checkpoint.find_checkpoint(str(a)), checkpoint.find_checkpoint(str(b))
    assert os.path.basename(ca) == os.path.basename(cb)
    weights = [open(os.path.join(c, "model.safetensors"), "rb").read() for c in (ca, cb)]
    assert weights[0] == weights[1]
    sa, sb = checkpoint.load_state(ca), checkpoint.load_state(cb)
    for key in checkpoint.RUN_ONLY:  # what --resume may change (--out, --ckpt-every, ...)
        sa["args"].pop(key), sb["args"].pop(key)
    assert_equal(sa, sb)


def assert_equal(x, y):
    assert type(x) is type(y)
    if isinstance(x, torch.Tensor):
        assert torch.equal(x, y)
    elif isinstance(x, dict):
        assert x.keys() == y.keys()
        for k in x:
            assert_equal(x[k], y[k])
    elif isinstance(x, (list, tuple)):
        assert len(x) == len(y)
        for u, v in zip(x, y):
            assert_equal(u, v)
    else:
        assert x == y


# ----------------------------------------------------------------------------- bad flags: one line, exit 2

@pytest.mark.parametrize("flags, message", [
    (["--lam", "nan"], "--lam must be a finite number"),
    (["--lr", "inf"], "--lr must be a finite number"),
    (["--log-z-init=-inf"], "--log-z-init must be a finite number"),
    (["--kappa", "-1"], ">= 0"),
    (["--eps-absorb=-1e-6"], ">= 0"),
    (["--k-min-start", "-1"], ">= 0"),
    (["--seed", "-1"], ">= 0"),
    (["--horizon", "0"], "--horizon must be at least 1"),
    (["--lr-logz", "0"], "must be positive"),
    (["--max-len", "0", "--min-len", "0"], "--max-len >= 1"),
    (["--lam", "abc"], "invalid float value"),
    (["--no-such-flag"], "unrecognized arguments"),
    (["--device", "cuda:99"], "cuda device(s)"),
    (["--device", "garbage"], "is not a device"),
    (["--model", "prior", "--max-len", "200"], "does not fit the model"),
    (["--model", "prior", "--prompt", "CCCC", "--max-len", "124"], "4 prompt tokens"),
    (["--task", "expr24", "--max-len", "40"], "its 32 positions"),  # the scratch model train.py builds
    (["--huber=-1"], "--huber must be >= 0"),
    (["--task", "game24", "--anchor", "0"], "--anchor must be positive"),
    (["--task", "game24", "--loss", "subtb"], "--loss subtb has no window"),
    (["--task", "game24", "--log-z", "head", "--anchor", "4"], "only --log-z seen or ref counts"),
    (["--task", "game24", "--kappa", "0.5"], "--log-z seen needs --kappa 1"),
    (["--task", "game24", "--log-z", "seen", "--log-probs", "raw"], "--log-z seen needs --kappa 1"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        train.get_args(["--out", str(tmp_path / "out"), *flags])
    assert message in one_line_error(capsys, e.value.code)


def test_device_cuda_without_cuda(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        train.get_args(["--out", str(tmp_path), "--device", "cuda"])
    assert "0 cuda device" in one_line_error(capsys, e.value.code)


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_out_must_be_a_usable_folder(tmp_path, capsys, where):
    (tmp_path / "f").write_text("x")
    out = tmp_path / "f" if where == "file" else tmp_path / "f" / "run"
    with pytest.raises(SystemExit) as e:
        train.get_args(["--out", str(out)])
    assert "--out" in one_line_error(capsys, e.value.code)


def test_context_is_skipped_when_the_config_cannot_be_read(tmp_path):
    assert train.get_args(["--model", "nobody/nothing-xyz", "--max-len", "5000", "--out", str(tmp_path)])


def test_max_len_that_fits_is_accepted(tiny_gpt2, tmp_path):  # 1 + 63 = the tiny model's 64 positions
    assert train.get_args(["--model", tiny_gpt2, "--max-len", "63", "--out", str(tmp_path)]).max_len == 63


@pytest.mark.parametrize("flags, message", [
    (["--temperature", "nan"], "--temperature"), (["--temperature", "inf"], "--temperature"),
    (["--temperature", "0"], "--temperature"), (["--n", "0"], "--n"), (["--seed", "-2"], "--seed"),
    (["--min-len", "4", "--max-len", "3"], "--max-len"), (["--device", "cuda:99"], "cuda"),
    (["--device", "what"], "is not a device"), (["--train-smiles", "/no/such.smi"], "no such file"),
])
def test_sample_bad_flags_are_one_line(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        sample.get_args(["prior", *flags])
    assert message in one_line_error(capsys, e.value.code)


def test_sample_out_must_be_a_writable_file(tmp_path, capsys):
    for out in (tmp_path, tmp_path / "missing" / "s.csv"):
        with pytest.raises(SystemExit) as e:
            sample.get_args(["prior", "--out", str(out)])
        assert "--out" in one_line_error(capsys, e.value.code)


def test_main_returns_2_with_one_line(tmp_path, capsys):  # what `python train.py --lam nan` prints and exits with
    assert "--lam" in one_line_error(capsys, train.main(["--lam", "nan", "--out", str(tmp_path)]))


# ----------------------------------------------------------------------------- untrusted checkpoints

class RunsACommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a tampered state.pt does on pickle.load: run a command
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("writer", ["torch.save", "pickle.dump"])
def test_tampered_state_is_refused_and_nothing_runs(straight, tmp_path, capsys, writer):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    marker = tmp_path / "pwned"
    state_path = os.path.join(checkpoint.find_checkpoint(str(run_dir)), "state.pt")
    payload = dict(step=1, log_z=torch.zeros(()), optimizer={}, args={}, ranks=[RunsACommand(marker)])
    with open(state_path, "wb") as f:
        torch.save(payload, f) if writer == "torch.save" else pickle.dump(payload, f)
    capsys.readouterr()
    assert "unsafe checkpoint" in one_line_error(capsys, train.main(["--resume", "--out", str(run_dir)]))
    assert "unsafe checkpoint" in one_line_error(capsys, sample.main([str(run_dir), "--n", "4"]))
    assert not marker.exists()
    pickle.loads(pickle.dumps(RunsACommand(marker)))  # the payload is live: a plain pickle.load does run it
    assert marker.exists()


def test_foreign_state_is_refused(straight, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    torch.save({"weight": torch.zeros(3)}, os.path.join(checkpoint.find_checkpoint(str(run_dir)), "state.pt"))
    capsys.readouterr()
    assert "not written by train.py" in one_line_error(capsys, train.main(["--resume", "--out", str(run_dir)]))


def tampered_copy(straight, tmp_path, **settings):
    """A copy of the straight run whose state.pt (plain values, so it loads) claims other settings."""
    run_dir = tmp_path / "run"
    shutil.copytree(straight, run_dir)
    state_path = os.path.join(checkpoint.find_checkpoint(str(run_dir)), "state.pt")
    state = torch.load(state_path, weights_only=True)
    state["args"].update(settings)
    torch.save(state, state_path)
    return run_dir


def test_code_running_settings_are_never_taken_from_a_checkpoint(straight, tmp_path, capsys):
    """A checkpoint cannot switch on --trust-remote-code, nor make a task's code (file.py:attr) load unasked."""
    marker = tmp_path / "pwned"
    (tmp_path / "evil_task.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef score(texts): return 0.0\n")
    run_dir = tampered_copy(straight, tmp_path, trust_remote_code=True)
    assert checkpoint.resume_args(train.get_args(["--resume", "--out", str(run_dir)]), train.get_args)[0].trust_remote_code is False
    assert sample.run_settings(sample.get_args([str(run_dir)]))[1].trust_remote_code is False
    spec = f"{tmp_path / 'evil_task.py'}:score"
    run_dir = tampered_copy(straight, tmp_path / "b", task=spec)
    capsys.readouterr()
    assert "pass --task" in one_line_error(capsys, train.main(["--resume", "--out", str(run_dir)]))
    assert "pass --task" in one_line_error(capsys, sample.main([str(run_dir), "--n", "4"]))
    assert not marker.exists()
    assert checkpoint.load_state(checkpoint.find_checkpoint(str(run_dir)), task=spec)  # named again: trusted


# ----------------------------------------------------------------------------- kills, full disks, NaN

def start_training(argv):
    """train.main(argv) in a forked child, a process of its own that can be SIGKILLed (no new interpreter to
    start: torch and the rest are already imported)."""
    pid = os.fork()
    if pid == 0:
        # tqdm's write lock is a multiprocessing lock that a fork shares: a child SIGKILLed while holding it would
        # leave every later bar, this test's own included, waiting forever. Each child gets a lock of its own.
        tqdm.set_lock(threading.RLock())
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1), os.dup2(devnull, 2)
        code = 1
        try:
            code = train.main(argv)
        finally:
            os._exit(code)
    return pid


def lines(path):
    return len(open(path).readlines()) if os.path.exists(path) else 0


def test_sigkill_at_random_moments_then_resume_is_bit_identical(tiny_gpt2, straight, tmp_path):
    """SIGKILL at seeded random moments, often inside a checkpoint save (--ckpt-every 1: one right after each
    logged step), each time resuming from whatever the kill left; the run still ends identical to the straight one."""
    out, rng, kills = tmp_path / "killed", random.Random(0), 0
    fresh = ["--model", tiny_gpt2, "--out", str(out), *FAST, "--steps", str(STEPS)]
    resume = ["--resume", "--out", str(out), "--steps", str(STEPS), "--ckpt-every", "1"]
    for attempt in range(5):
        seen = lines(out / "metrics.jsonl")
        pid = start_training(resume if os.path.isfile(out / "latest") else fresh)
        deadline = time.time() + 120
        while not os.waitpid(pid, os.WNOHANG)[0] and time.time() < deadline:  # until it logs a step of its own
            if lines(out / "metrics.jsonl") > seen:
                time.sleep(rng.uniform(0, 0.05))  # a save takes about this long; a longer wait lets a fast machine
                # finish the run before enough kills have landed
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                kills += 1
                break
            time.sleep(0.002)
    assert kills >= 2  # each kill costs the run one or more steps: how many land depends on the machine's speed
    assert train.main(resume) == 0
    assert_same_run(straight, out)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]


def stop_after(monkeypatch, step):
    """What Ctrl-C does (finish the step, checkpoint, exit 130), at a known step."""
    real_log_step = train.log_step

    def log_and_stop(log_file, metrics):
        real_log_step(log_file, metrics)
        if metrics["step"] == step:
            checkpoint.STOP["requested"] = True

    monkeypatch.setattr(train, "log_step", log_and_stop)


def test_crash_mid_save_leftovers_are_ignored_and_cleaned(tiny_gpt2, straight, tmp_path, monkeypatch):
    """What a kill inside save_checkpoint leaves: a half-written .ckpt-*.tmp folder, a stale latest.tmp and a
    renamed ckpt that `latest` never pointed at. Resume goes from `latest`, and the next save cleans them up."""
    out = tmp_path / "crashed"
    stop_after(monkeypatch, 3)
    assert run(tiny_gpt2, out, "--steps", str(STEPS)) == 130
    monkeypatch.undo()
    (out / ".ckpt-000004.tmp").mkdir()
    (out / ".ckpt-000004.tmp" / "model.safetensors").write_bytes(b"half")
    (out / "latest.tmp").write_text("ckpt-000004\n")
    shutil.copytree(out / "ckpt-000003", out / "ckpt-000005")  # complete-looking, but never `latest`
    with open(out / "metrics.jsonl", "a") as f:  # and the lines logged after the checkpoint
        f.write(json.dumps(dict(step=4, loss=1.0)) + "\n")
    assert train.main(["--resume", "--out", str(out), "--steps", str(STEPS)]) == 0
    assert_same_run(straight, out)
    assert sorted(n for n in os.listdir(out) if "ckpt" in n or "tmp" in n) == [f"ckpt-{STEPS:06d}"]


def test_non_finite_loss_is_one_line_and_keeps_the_checkpoint(tiny_gpt2, tmp_path, monkeypatch, capsys):
    real_train_step = train.train_step

    def nan_at_step_3(*a):
        metrics = real_train_step(*a)
        return dict(metrics, loss=float("nan")) if metrics["step"] == 3 else metrics

    monkeypatch.setattr(train, "train_step", nan_at_step_3)
    code = run(tiny_gpt2, tmp_path, "--steps", str(STEPS), "--ckpt-every", "2")
    assert code == 2
    err = last_line_error(capsys.readouterr().err)
    assert err == (f"error: non-finite loss at step 3; the last good checkpoint is {tmp_path}/ckpt-000002 (kept); "
                   "resuming would repeat the same steps, so start a new run (another --out) "
                   "with a lower --lr or --lam")
    assert checkpoint.load_state(checkpoint.find_checkpoint(str(tmp_path)))["step"] == 2


def test_overflowing_lam_stops_before_any_checkpoint(tiny_gpt2, tmp_path, capsys):
    assert run(tiny_gpt2, tmp_path, "--steps", "3", "--lam", "1e308", "--replay", "none", "--ckpt-every", "9") == 2
    assert "; no checkpoint was written yet;" in last_line_error(capsys.readouterr().err)


@pytest.mark.parametrize("where", ["state.pt", "weights"])
def test_full_disk_keeps_the_previous_checkpoint(tiny_gpt2, tmp_path, monkeypatch, capsys, where):
    real_save = torch.save

    def full_disk_at_step_2(obj, path, *a, **k):
        if "000002" in str(path):
            open(path, "wb").write(b"partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, path, *a, **k)

    from transformers import PreTrainedModel
    real_save_pretrained = PreTrainedModel.save_pretrained

    def full_disk_weights(self, path, *a, **k):
        if "000002" in str(path):
            os.makedirs(path, exist_ok=True)
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save_pretrained(self, path, *a, **k)

    if where == "state.pt":
        monkeypatch.setattr(torch, "save", full_disk_at_step_2)
    else:
        monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk_weights)
    assert run(tiny_gpt2, tmp_path, "--steps", "3") == 2
    err = last_line_error(capsys.readouterr().err)
    assert err.startswith(f"error: cannot write checkpoint {tmp_path}/ckpt-000002: ") and "No space left" in err
    assert (tmp_path / "latest").read_text() == "ckpt-000001\n"
    assert checkpoint.load_state(checkpoint.find_checkpoint(str(tmp_path)))["step"] == 1
    assert sorted(n for n in os.listdir(tmp_path) if "ckpt" in n) == ["ckpt-000001"]  # the temporary folder is gone
    monkeypatch.undo()
    assert train.main(["--resume", "--out", str(tmp_path), "--steps", "3"]) == 0  # and it resumes from there


# ----------------------------------------------------------------------------- no run lost or relabelled

def snapshot(folder):
    """Every file under `folder`, path -> bytes: what "nothing lost" compares."""
    return {os.path.relpath(os.path.join(d, f), folder): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(folder) for f in files}


@pytest.fixture(scope="module")
def finished(tiny_gpt2, tmp_path_factory):
    """A finished 3-step run saved with --ckpt-every 2 and --grad-ckpt (none of them the defaults)."""
    out = tmp_path_factory.mktemp("finished")
    assert run(tiny_gpt2, out, "--steps", "3", "--ckpt-every", "2", "--grad-ckpt") == 0
    return out


def copy_of(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")
    return tmp_path / "run"


def test_resume_continues_with_every_saved_setting(tiny_gpt2, tmp_path, ctrl_c_after_step, capsys):
    """Stopped at step 2 of 5, `--resume --out` alone trains to 5 with --ckpt-every 3 and --grad-ckpt as saved."""
    undo = ctrl_c_after_step(2)
    assert run(tiny_gpt2, tmp_path, "--steps", "5", "--ckpt-every", "3", "--grad-ckpt") == 130
    undo()
    err = capsys.readouterr().err
    assert " 2/5 " in err.replace("\r", "\n").strip().splitlines()[-2]  # the bar reads the step the checkpoint holds
    assert train.main(["--resume", "--out", str(tmp_path)]) == 0
    assert f"resuming {tmp_path}/ckpt-000002 at step 2 of 5 with the run's saved settings\n" in capsys.readouterr().out
    assert [r["step"] for r in tracking.read_metrics(tmp_path)] == [1, 2, 3, 4, 5]
    saved = checkpoint.load_state(checkpoint.find_checkpoint(str(tmp_path)))
    assert saved["step"] == 5 and saved["args"]["ckpt_every"] == 3 and saved["args"]["grad_ckpt"] is True
    assert "changed" not in saved["args"]  # what a command line replaced is not a setting


def test_resume_says_which_saved_setting_a_flag_replaces(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    assert train.main(["--resume", "--out", str(out), "--steps", "4", "--ckpt-every", "9"]) == 0
    assert ("at step 3 of 4 with the run's saved settings, except --ckpt-every 9 (was 2), --steps 4 (was 3)\n"
            in capsys.readouterr().out)
    assert [r["step"] for r in tracking.read_metrics(out)][-1] == 4


def test_resume_of_a_finished_run_changes_nothing(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    assert train.main(["--resume", "--out", str(out)]) == 0
    assert "nothing to do:" in capsys.readouterr().out and snapshot(out) == before


def test_steps_below_the_checkpoint_is_one_line_and_changes_nothing(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    err = one_line_error(capsys, train.main(["--resume", "--out", str(out), "--steps", "2"]))
    assert err == f"error: --steps 2 is below the step of '{out}/ckpt-000003' (3); nothing was changed: give --steps 3 or more"
    assert snapshot(out) == before


@pytest.mark.parametrize("what", ["metrics.jsonl", "latest", "ckpt-000003"])
def test_a_fresh_run_into_a_run_is_refused(finished, tiny_gpt2, tmp_path, capsys, what):
    out = copy_of(finished, tmp_path)
    for name in {"metrics.jsonl", "latest", "ckpt-000003"} - {what}:  # one trace of a run is enough
        shutil.rmtree(out / name) if (out / name).is_dir() else os.remove(out / name)
    before = snapshot(out)
    err = one_line_error(capsys, run(tiny_gpt2, out, "--steps", "2"))
    assert f"already holds a run ({what})" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before


def test_overwrite_replaces_the_run_and_keeps_other_files(finished, tiny_gpt2, tmp_path):
    out = copy_of(finished, tmp_path)
    (out / "notes.txt").write_text("mine")
    assert run(tiny_gpt2, out, "--steps", "1", "--overwrite") == 0
    assert [r["step"] for r in tracking.read_metrics(out)] == [1]
    assert sorted(n for n in os.listdir(out) if "ckpt" in n) == ["ckpt-000001"]
    assert (out / "notes.txt").read_text() == "mine"


def test_a_second_run_into_a_folder_in_use_is_one_line_and_deletes_nothing(finished, tiny_gpt2, tmp_path, capsys):
    from checkpoint import run_lock
    out = copy_of(finished, tmp_path)
    before = snapshot(out)
    with run_lock(str(out)):  # a run training into it now
        err = one_line_error(capsys, run(tiny_gpt2, out, "--steps", "2", "--overwrite"))
    assert "is in use by another training run" in err and snapshot(out) == before
    with run_lock(str(tmp_path / "new")):
        pass
    assert not (tmp_path / "new").exists()  # a folder the lock made, left empty: removed again


def test_an_out_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    from checkpoint import run_lock
    import model as modellib

    def refuse(*a, **k):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr(os, "makedirs", refuse)  # a read-only disk, as root sees none in a test
    with pytest.raises(modellib.ModelError, match="cannot be written: Permission denied"):
        with run_lock(str(tmp_path / "run")):
            pass


def test_resume_and_overwrite_together_is_one_line(tmp_path, capsys):
    assert "give one of them" in one_line_error(capsys, train.main(["--resume", "--overwrite", "--out", str(tmp_path)]))


def test_a_full_disk_in_torch_save_removes_the_temporary_folder(tiny_gpt2, tmp_path, monkeypatch, capsys):
    """torch.save fails on a full disk with a RuntimeError from its zip writer (not an OSError)."""
    real_save = torch.save

    def full_disk_at_step_2(obj, path, *a, **k):
        if "000002" in str(path):
            open(path, "wb").write(b"x" * 1000)
            raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 64 vs 0")
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk_at_step_2)
    assert run(tiny_gpt2, tmp_path, "--steps", "3") == 2
    err = last_line_error(capsys.readouterr().err)
    assert err.startswith(f"error: cannot write checkpoint {tmp_path}/ckpt-000002: [enforce fail") and "kept" in err
    assert sorted(n for n in os.listdir(tmp_path) if "ckpt" in n) == ["ckpt-000001"]  # no .ckpt-000002.tmp


def test_sample_never_replaces_earlier_samples(finished, tmp_path, capsys):
    out = copy_of(finished, tmp_path)
    assert sample.main([str(out), "--n", "8", "--fidelity-n", "0"]) == 0
    capsys.readouterr()
    before = snapshot(out)
    err = one_line_error(capsys, sample.main([str(out), "--n", "8", "--fidelity-n", "0"]))
    assert err == f"error: {out}/samples.csv already exists (earlier samples): add --overwrite to replace it, or --out NEW.csv to keep it"
    assert "no conditions" in one_line_error(capsys, sample.main([str(out), "--split", "heldout", "--overwrite"]))
    assert snapshot(out) == before
    assert sample.main([str(out), "--n", "9", "--fidelity-n", "0", "--overwrite"]) == 0
    assert len((out / "samples.csv").read_text().splitlines()) == 10


def test_ctrl_c_while_starting_is_one_line(tiny_gpt2, tmp_path, monkeypatch, capsys):
    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "build_policy", interrupted)
    assert run(tiny_gpt2, tmp_path, "--steps", "2") == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C) without saving; no checkpoint was written"


def test_out_of_memory_is_one_line_naming_the_batch_size(tiny_gpt2, tmp_path, monkeypatch, capsys):
    def allocate(*a, **k):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 4000000000000 bytes.")
    monkeypatch.setattr(train, "build_policy", allocate)
    err = one_line_error(capsys, run(tiny_gpt2, tmp_path, "--steps", "2"))
    assert err.startswith("error: out of memory (") and "lower --batch-size (4)" in err


def test_measuring_time_counts_this_process_only(tmp_path, capsys, monkeypatch):
    rows = [dict(step=0, eval_seconds=10.0), dict(step=2, eval_seconds=5.0), dict(step=4, eval_seconds=3.0)]
    with open(tmp_path / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(dict(r, kl_q_target=1.0, tv=0.1)) + "\n" for r in rows)
    monkeypatch.setattr(tracking, "format_fidelity", lambda row, explain=False: "...")  # tested elsewhere
    tracking.report_fidelity(str(tmp_path / "metrics.jsonl"), 14.0, resumed_at=2)
    assert capsys.readouterr().out.splitlines()[-1] == "measuring took 3 s of the 14 s since resuming at step 2"


# ----------------------------------------------------------------------------- the table: one line, exit 2, nothing written

def bad_files(tmp_path, tiny_gpt2, finished):
    """What the table's bad inputs point at: {tmp}/... files and folders, a finished run and a damaged model."""
    (tmp_path / "binary.bin").write_bytes(bytes(range(128, 256)) * 4)
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "emptydir").mkdir()
    for name, text in [("binrun", None), ("listrun", "[1, 2]\n"), ("emptyrun", ""), ("nosteprun", '{"loss": 1}\n')]:
        (tmp_path / name).mkdir()
        path = tmp_path / name / "metrics.jsonl"
        path.write_bytes(bytes(range(128, 256))) if text is None else path.write_text(text)
    shutil.copytree(finished, tmp_path / "run")
    shutil.copytree(tiny_gpt2, tmp_path / "damaged")
    weights = tmp_path / "damaged" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a download cut short
    (tmp_path / "task_syntax.py").write_text("def score(texts)\n    return []\n")
    (tmp_path / "task_classes.py").write_text(
        "class Raises:\n    def __init__(self):\n        raise ValueError('no config')\n"
        "class NoScore:\n    pass\n")


TRAIN = "train"
SAMPLE = "sample"
PLOT = "plot"
BAD_INPUTS = [
    # train.py: numbers, each flag by name
    (TRAIN, ["--eval-every", "-1"], "--eval-every must be >= 0 (got -1)"),
    (TRAIN, ["--seed", "-1"], "--seed must be >= 0 (got -1)"),
    (TRAIN, ["--eta", "-0.1"], "--eta must be >= 0"),
    (TRAIN, ["--eta-end", "-1"], "--eta-end must be >= 0"),
    (TRAIN, ["--rho", "-1"], "--rho must be >= 0"),
    (TRAIN, ["--weight-decay", "-1"], "--weight-decay must be >= 0"),
    (TRAIN, ["--k-min-end", "-1"], "--k-min-end must be >= 0"),
    (TRAIN, ["--grad-clip", "0"], "--grad-clip must be positive (got 0.0)"),
    (TRAIN, ["--score-timeout", "0"], "--score-timeout must be positive"),
    (TRAIN, ["--score-timeout", "nan"], "--score-timeout must be a finite number"),
    (TRAIN, ["--steps", "0"], "--steps must be at least 1"),
    (TRAIN, ["--batch-size", "0"], "--batch-size must be at least 1"),
    (TRAIN, ["--grad-accum", "0"], "--grad-accum must be at least 1"),
    (TRAIN, ["--buffer-size", "0"], "--buffer-size must be at least 1"),
    (TRAIN, ["--ckpt-every", "0"], "--ckpt-every must be at least 1"),
    (TRAIN, ["--eval-n", "0"], "--eval-n must be at least 1"),
    (TRAIN, ["--eval-n-final", "0"], "--eval-n-final must be at least 1"),
    (TRAIN, ["--p-replay-start", "1.5"], "--p-replay-start must be in [0, 1]"),
    (TRAIN, ["--temp-prob", "-0.1"], "--temp-prob must be in [0, 1]"),
    (TRAIN, ["--alpha", "2"], "--alpha must be in [0, 1]"),
    (TRAIN, ["--gamma", "1.1"], "--gamma must be in [0, 1]"),
    (TRAIN, ["--eta-anneal", "2"], "--eta-anneal must be in [0, 1]"),
    (TRAIN, ["--t-lo-start", "0"], "--t-lo-start must be positive"),
    (TRAIN, ["--lr", "0"], "--lr must be positive"),
    (TRAIN, ["--beta", "-1"], "--beta must be positive"),
    (TRAIN, ["--min-len", "5", "--max-len", "3"], "need 0 <= --min-len <= --max-len"),
    (TRAIN, ["--steps", "2.5"], "argument --steps: invalid int value: '2.5'"),
    (TRAIN, ["--loss", "nope"], "argument --loss: invalid choice: 'nope'"),
    (TRAIN, ["--replay", "nope"], "argument --replay: invalid choice: 'nope'"),
    (TRAIN, ["--charset", ""], "--charset '' allows no character"),
    (TRAIN, ["--resume", "--overwrite"], "give one of them"),
    # train.py: files
    (TRAIN, ["--prompts", "{tmp}/missing.txt"], "cannot read prompts file"),
    (TRAIN, ["--prompts", "{tmp}/binary.bin"], "is not UTF-8 text (byte 0x80 at offset 0)"),
    (TRAIN, ["--prompts", "{tmp}/empty.txt"], "holds no prompt"),
    (TRAIN, ["--heldout-prompts", "{tmp}/empty.txt"], "--heldout-prompts needs --prompts"),
    (TRAIN, ["--scaffolds", "{tmp}/binary.bin"], "is not UTF-8 text"),
    (TRAIN, ["--task", "expr24", "--scaffolds", "{tmp}/empty.txt"], "--scaffolds is for --task smiles"),
    (TRAIN, ["--task", "{tmp}/task_syntax.py:score"], "cannot import"),
    (TRAIN, ["--task", "{tmp}/task_classes.py:Raises"], "Raises() raised ValueError: no config"),
    (TRAIN, ["--task", "{tmp}/task_classes.py:NoScore"], "has no score(text) method"),
    (TRAIN, ["--model", "{tmp}/emptydir"], "is a folder without config.json: not a model folder"),
    (TRAIN, ["--model", "{tmp}/damaged", "--max-len", "5"], "its files are incomplete or damaged"),
    # train.py --resume: the run in --out is left as it was
    (TRAIN, ["--resume", "--out", "{tmp}/emptydir"], "no checkpoint at"),
    (TRAIN, ["--resume", "--out", "{tmp}/run", "--loss", "tb"], "was trained with --loss 'raptb', not 'tb'"),
    (TRAIN, ["--resume", "--out", "{tmp}/run", "--steps", "1"], "--steps 1 is below the step of"),
    (TRAIN, ["--out", "{tmp}/run"], "already holds a run"),
    # sample.py
    (SAMPLE, ["{tmp}/run", "--target-lams", "abc"], "--target-lams 'abc': need comma-separated numbers"),
    (SAMPLE, ["{tmp}/run", "--target-lams", "10,nan"], "--target-lams '10,nan': need finite numbers"),
    (SAMPLE, ["{tmp}/run", "--batch-size", "0"], "--batch-size must be at least 1 (got 0)"),
    (SAMPLE, ["{tmp}/run", "--fidelity-n", "-1"], "--fidelity-n must be >= 0 (got -1)"),
    (SAMPLE, ["{tmp}/run", "--split", "nope"], "argument --split: invalid choice"),
    (SAMPLE, ["{tmp}/run", "--n", "abc"], "argument --n: invalid int value"),
    (SAMPLE, ["{tmp}/run", "--split", "heldout"], "--split heldout: this run has no conditions"),
    (SAMPLE, ["{tmp}/run", "--prompts", "{tmp}/binary.bin"], "is not UTF-8 text"),
    (SAMPLE, ["{tmp}/run", "--task", "expr24"], "to sample it under 'expr24' anyway, add --any-task"),
    (SAMPLE, ["{tmp}/emptydir"], "is a folder, but not a run (no `latest`), a checkpoint (no state.pt) nor a model"),
    (SAMPLE, ["{tmp}/damaged", "--out", "{tmp}/s.csv"], "its files are incomplete or damaged"),
    # plot.py
    (PLOT, ["{tmp}/missing"], "is not a folder"),
    (PLOT, ["{tmp}/emptydir"], "has no metrics.jsonl"),
    (PLOT, ["{tmp}/binrun"], "is not one JSON object per line"),
    (PLOT, ["{tmp}/listrun"], "each with its step"),
    (PLOT, ["{tmp}/nosteprun"], "each with its step"),
    (PLOT, ["{tmp}/emptyrun"], "holds no step yet"),
    (PLOT, ["{tmp}/run", "--out", "{tmp}/missing/c.png"], "need a file name in a folder that exists"),
    (PLOT, [], "the following arguments are required: RUN"),
]


@pytest.mark.parametrize("script, argv, message", BAD_INPUTS, ids=[f"{s}:{' '.join(a)}" for s, a, _ in BAD_INPUTS])
def test_bad_input_is_one_line_and_writes_nothing(tiny_gpt2, finished, tmp_path, capsys, script, argv, message):
    import plot
    bad_files(tmp_path, tiny_gpt2, finished)
    argv = [a.format(tmp=tmp_path) for a in argv]
    if script == TRAIN and "--out" not in argv:
        argv += ["--out", str(tmp_path / "out")]
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = dict(train=train.main, sample=sample.main, plot=plot.main)[script](argv)
    except SystemExit as e:  # plot.py exits from its parser
        code = e.code
    assert message in one_line_error(capsys, code)
    assert snapshot(tmp_path) == before  # nothing written, nothing removed


def test_the_fault_suite_counts_sixty_bad_inputs():
    """This table and the other one-line tables (above, test_user_task.py): at least 60 distinct bad inputs."""
    import test_user_task
    others = [test_bad_flags_are_one_line, test_sample_bad_flags_are_one_line,
              test_user_task.test_a_misbehaving_score_function_is_one_line, test_user_task.test_a_bad_task_name_is_one_line]
    count = len(BAD_INPUTS) + sum(len(t.pytestmark[0].args[1]) for t in others)
    assert count >= 60, count


INTERRUPT_AT_IMPORT = """
import importlib.abc, os, runpy, signal, sys
class CtrlC(importlib.abc.MetaPathFinder):  # Ctrl-C the moment the script imports {module}, deterministically
    def find_spec(self, name, path, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), signal.SIGINT)
sys.meta_path.insert(0, CtrlC())
sys.argv = [{script!r}, *{argv!r}]
runpy.run_path({script!r}, run_name="__main__")
"""


@pytest.mark.parametrize("script, module, argv", [("train.py", "numpy", ["--out", "{out}"]),
                                                   ("sample.py", "tqdm", ["prior", "--out", "{out}/s.csv"])])
def test_ctrl_c_while_importing_is_one_line(tmp_path, script, module, argv):
    import subprocess
    import sys
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), script)
    code = INTERRUPT_AT_IMPORT.format(module=module, script=path, argv=[a.format(out=tmp_path) for a in argv])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 130 and done.stderr.strip() == "interrupted (Ctrl-C) while starting; nothing was written"
    assert os.listdir(tmp_path) == []


def test_ctrl_c_while_checking_flags_is_one_line(tmp_path, monkeypatch, capsys):
    def interrupted(argv):
        raise KeyboardInterrupt
    monkeypatch.setattr(train, "get_args", interrupted)
    assert train.main(["--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "interrupted (Ctrl-C) before the run started; nothing was written"
