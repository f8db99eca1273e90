"""
Checkpoints: ckpt-<step>/ holds the model (or LoRA adapter) and tokenizer as Hugging Face writes them, plus the
run's state (logZ, optimiser, step, settings, every rank's RNG streams and replay buffer). A checkpoint is written
under a temporary name and renamed into place, then `latest` is pointed at it, so a crash never leaves a
half-written one. A checkpoint from elsewhere is untrusted input: state.pt holds only tensors and plain values and
is read with torch.load(weights_only=True), which refuses anything that would run code; weights are safetensors.
"""
import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import sys

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
import torch
import torch.distributed as dist
from safetensors import SafetensorError

import model as modellib
from distributed import fsdp_full_states, load_optimizer

# ----------------------------------------------------------------------------- checkpoints

def rank_state(buffer, rng):
    """What differs between ranks: random streams and the replay buffer."""
    return dict(buffer=buffer.state_dict() if buffer is not None else None, numpy=rng.bit_generator.state,
                torch=torch.get_rng_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def restore(args, state, rank, policy, log_z, optimizer, buffer, rng):
    """A resumed run's logZ, optimiser, this rank's random streams and replay buffer, as the checkpoint holds them."""
    with torch.no_grad():
        log_z.load_state_dict(state["log_z"]) if isinstance(log_z, torch.nn.Module) else log_z.copy_(state["log_z"])
    load_optimizer(args, policy, log_z, optimizer, state["optimizer"])
    load_rank_state(state["ranks"][rank], buffer, rng)


def load_rank_state(s, buffer, rng):
    if buffer is not None:
        buffer.load_state_dict(s["buffer"])
    rng.bit_generator.state = s["numpy"]
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


NOT_SAVED = ("changed",)  # what this command line replaced, not a setting of the run


def save_checkpoint(args, policy, buffer, log_z, optimizer, rng, step):
    """Rank 0 writes ckpt-<step>/ under a temporary name, renames it into place, then points `latest` at it
    (os.replace is atomic), so a crash at any moment leaves the previous checkpoint intact. Weights and
    optimiser are identical on all ranks; each rank's random streams and buffer are gathered into it."""
    mine = rank_state(buffer, rng)
    ranks = [mine]
    if args.fsdp:
        weights, optimizer_state = fsdp_full_states(args, policy, log_z, optimizer)
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, ranks)
        if dist.get_rank() != 0:
            return None
    name = f"ckpt-{step:06d}"
    final, tmp = os.path.join(args.out, name), os.path.join(args.out, f".{name}.tmp")
    if not args.fsdp:
        optimizer_state = optimizer.state_dict()
    if isinstance(log_z, torch.nn.Module):  # a logZ head or the seen objects (METHOD.md §11.2): its state
        log_z = {k: v.detach().cpu() if torch.is_tensor(v) else v for k, v in log_z.state_dict().items()}
    else:
        log_z = log_z.detach().cpu()
    settings = {k: v for k, v in vars(args).items() if k not in NOT_SAVED}
    state = dict(step=step, log_z=log_z, optimizer=optimizer_state, args=settings, ranks=ranks)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        # with LoRA the adapter only; under FSDP a normal HF folder from the gathered weights
        policy.model.save_pretrained(tmp, **(dict(state_dict=weights) if args.fsdp else {}))
        policy.tokenizer.save_pretrained(tmp)
        torch.save(state, os.path.join(tmp, "state.pt"))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        with open(os.path.join(args.out, "latest.tmp"), "w") as f:
            f.write(name + "\n")
        os.replace(os.path.join(args.out, "latest.tmp"), os.path.join(args.out, "latest"))
    except (OSError, RuntimeError, SafetensorError) as e:  # e.g. a full disk (torch.save raises RuntimeError):
        # the previous checkpoint and `latest` are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else modellib.first_line(e)
        free = shutil.disk_usage(args.out).free // 2 ** 20  # torch's zip writer does not say "disk full"
        raise modellib.ModelError(f"cannot write checkpoint {final}: {why} ({free} MiB free there); the previous "
                                  f"one is kept") from None
    for old in os.listdir(args.out):  # keep only the newest checkpoint; drop what a killed save left behind
        if (old.startswith("ckpt-") and old != name) or (old.startswith(".ckpt-") and old.endswith(".tmp")):
            shutil.rmtree(os.path.join(args.out, old), ignore_errors=True)
    return final


def find_checkpoint(path):
    """A checkpoint folder from a run folder (via `latest`) or a checkpoint folder itself."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise modellib.ModelError(f"no checkpoint at {path!r} (expected a run folder with `latest` or a ckpt-* folder)")
    return path


STATE_KEYS = {"step", "log_z", "optimizer", "args", "ranks"}


def load_state(ckpt, task=None):
    """state.pt as plain values. weights_only=True: a tampered file (a pickle that would run a command) is refused
    before anything in it runs, like a corrupt one. A run on the user's own task (module:attr, file.py:attr) loads
    only when that `task` is given again: loading it imports code, which a checkpoint alone must not make happen."""
    try:
        state = torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=True)
    except Exception as e:
        raise modellib.ModelError(f"corrupt or unsafe checkpoint {ckpt!r}: state.pt is not plain tensors and values "
                                  f"({type(e).__name__}); nothing in it was run") from None
    if not isinstance(state, dict) or not STATE_KEYS <= state.keys():
        raise modellib.ModelError(f"corrupt checkpoint {ckpt!r}: state.pt was not written by train.py")
    saved = state["args"].get("task", "smiles")
    if ":" in str(saved) and saved != task:
        raise modellib.ModelError(f"checkpoint {ckpt!r} is of the task {saved!r}, whose code runs when it loads: "
                                  f"if you trust it, pass --task {saved} as well")
    return state


def non_finite_loss(out, step):
    """The one-line message for a run whose loss became NaN/inf: where, what is kept, what to do. --resume alone
    would repeat the same steps exactly, so the advice is other settings."""
    try:
        kept = f"the last good checkpoint is {find_checkpoint(out)} (kept)"
    except modellib.ModelError:
        kept = "no checkpoint was written yet"
    return (f"non-finite loss at step {step}; {kept}; resuming would repeat the same steps, so start a new run "
            f"(another --out) with a lower --lr or --lam")


def drop_lines_after(log_path, step):
    """metrics.jsonl as of the checkpoint at `step`: a killed run may have logged later steps, and a half-written
    last line (it has no newline yet)."""
    if not os.path.exists(log_path):
        return
    with open(log_path) as f:
        kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]
    with open(log_path, "w") as f:
        f.writelines(kept)


def failure(error, args):
    """(exit code, the one line to print) for an error that ends a run, or (None, None) for one that is a bug."""
    if isinstance(error, KeyboardInterrupt):  # Ctrl-C while it starts, or a second one in the loop
        try:
            kept = f"the last checkpoint is {find_checkpoint(args.out)} (kept); continue with: python train.py " \
                   f"--resume --out {args.out}"
        except modellib.ModelError:
            kept = "no checkpoint was written"
        return 130, f"\ninterrupted (Ctrl-C) without saving; {kept}"
    if isinstance(error, (MemoryError, RuntimeError)) and not isinstance(error, modellib.ModelError):
        text = str(error)
        if not (isinstance(error, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in text
                or "out of memory" in text.lower()):
            return None, None
        return 2, (f"error: out of memory ({modellib.one_line(error, 200)}); lower --batch-size "
                   f"({args.batch_size}) or --max-len ({args.max_len}), or raise --grad-accum to keep the batch")
    return 2, f"error: {error}"


# ----------------------------------------------------------------------------- resume and Ctrl-C

RUN_ONLY = ("out", "steps", "device", "ckpt_every", "resume", "grad_ckpt", "score_timeout",  # what --resume may
            "trust_remote_code", "overwrite")  # change: the saved value unless the command line gives one
FROM_NOW = ("out", "resume", "trust_remote_code", "overwrite")  # always this command's, never the checkpoint's:
# running a model's code is the user's choice each time, and --overwrite is for a fresh run
MEASURE_ONLY = ("eval_every", "eval_n", "eval_n_final", "wandb", "tensorboard")  # never change training


def resume_or_start(args, get_args, explicit=None):
    """(settings, checkpoint, state): --resume's from the checkpoint in --out, or a fresh run's (None, None) once
    --out is known to hold no run, or --overwrite has cleared it."""
    if args.resume:
        return resume_args(args, get_args, explicit)
    return start_afresh(args), None, None


def before_flags(saved):
    """A checkpoint written before these flags existed was trained without them: resume it that way."""
    return dict(eta_end=saved.get("eta", 0.25), absorb_end=1.0, eta_anneal=1.0, lr_schedule="constant",
                no_smiles_mask=True, huber=0.0, anchor=1.0, replay_valid_only=False, buffer_validity="task")


def saved_settings(saved, defaults):
    """A checkpoint's settings as this version reads them, the one place old checkpoints are made whole: a flag newer
    than the checkpoint gets the value that reproduces how it was trained (before_flags), else today's default."""
    return argparse.Namespace(**{**defaults, **before_flags(saved), **saved})


def resume_args(args, get_args, explicit=None):
    """Settings come from the checkpoint, every one of them (--steps, --ckpt-every, ... included): only the flags in
    RUN_ONLY and MEASURE_ONLY that the command line gives (`explicit`; None: those that differ from the defaults)
    replace them, and each replacement is printed. A setting given that contradicts the checkpoint (another
    --model, another --loss, ...) is an error, as is a --steps below the checkpoint's step. `get_args`: train.py's
    parser; a checkpoint older than some flags resumes with the values that reproduce its training (before_flags)."""
    ckpt = find_checkpoint(args.out)
    state = load_state(ckpt, args.task)
    saved, defaults = state["args"], vars(get_args(["--task", args.task, "--out", args.out]))
    if explicit is None:
        explicit = {k for k, v in vars(args).items() if v != defaults.get(k)}
    given = {k: getattr(args, k) for k in explicit if k in vars(args) and k not in NOT_SAVED}
    for key, value in given.items():
        if key not in RUN_ONLY + MEASURE_ONLY and value != saved.get(key, defaults.get(key)):
            raise modellib.ModelError(f"checkpoint {ckpt!r} was trained with --{key.replace('_', '-')} "
                                      f"{saved.get(key)!r}, not {value!r}")
    if "steps" in given and given["steps"] < state["step"]:
        raise modellib.ModelError(f"--steps {given['steps']} is below the step of {ckpt!r} ({state['step']}); "
                                  f"nothing was changed: give --steps {state['step']} or more")
    before = {k: saved.get(k, defaults.get(k)) for k in given}
    changed = {k: v for k, v in given.items() if k in RUN_ONLY + MEASURE_ONLY and k not in FROM_NOW and v != before[k]}
    now = {k: getattr(args, k) for k in FROM_NOW} | changed
    resumed = saved_settings({**saved, **now}, defaults)
    resumed.changed = {k: (before[k], v) for k, v in changed.items()}
    from flags import device_problem  # the saved --device on this machine
    if device_problem(resumed.device):
        raise modellib.ModelError(f"{device_problem(resumed.device)}; the run was saved with it: give --device")
    return resumed, ckpt, state


def resume_due(ckpt, state, args, rank, world):
    """Whether the resumed run has steps left, after one printed line (rank 0): where it continues and which saved
    settings the command replaced, or that a finished run has nothing to do."""
    if len(state["ranks"]) != world:
        raise modellib.ModelError(f"checkpoint {ckpt!r} was written by {len(state['ranks'])} processes; "
                                  f"resume it with the same number (got {world})")
    if state["step"] == args.steps:
        if rank == 0:
            print(f"nothing to do: {ckpt} is the end of this {args.steps}-step run (nothing was changed); to train "
                  f"longer, add --steps N")
        return False
    changes = ", ".join(f"--{k.replace('_', '-')} {new} (was {old})" for k, (old, new) in sorted(args.changed.items()))
    if rank == 0:
        print(f"resuming {ckpt} at step {state['step']} of {args.steps} with the run's saved settings"
              + (f", except {changes}" if changes else ""))
    return True


def existing_run(out):
    """What in `out` belongs to an earlier run (metrics.jsonl, `latest`, ckpt-* folders), in order; [] if nothing."""
    if not os.path.isdir(out):
        return []
    return sorted(n for n in os.listdir(out) if n in ("metrics.jsonl", "latest") or n.startswith("ckpt-"))


def start_afresh(args):
    """A fresh run's --out: refused in one line if an earlier run is there, unless --overwrite clears it (rank 0;
    under torchrun the others find it cleared or being cleared, and write nothing until rank 0 has saved)."""
    found = existing_run(args.out)
    if found and not getattr(args, "overwrite", False):
        raise modellib.ModelError(f"--out {args.out!r} already holds a run ({', '.join(found)}): continue it with "
                                  f"--resume, or add --overwrite to delete it and start afresh")
    if found and os.environ.get("RANK", "0") == "0":
        clear_run(args.out)
    return args


@contextlib.contextmanager
def run_lock(out):
    """Hold OUT/.lock while a run trains into --out: a second train.py on the same folder, whose --overwrite would
    delete this run's files or whose checkpoints would interleave with its, stops in one line instead. The lock file
    goes when the run ends, and a folder made here for a run that fails before writing anything goes with it (rank 0,
    as start_afresh: torchrun's other ranks share its lock)."""
    if os.environ.get("RANK", "0") != "0" or fcntl is None:  # no fcntl on Windows
        yield
        return
    made = not os.path.isdir(out)
    try:
        os.makedirs(out, exist_ok=True)
        lock = open(os.path.join(out, ".lock"), "a")
    except OSError as e:  # a read-only disk, a missing mount, a file where the folder should be
        raise modellib.ModelError(f"--out {out!r} cannot be written: {e.strerror or e}") from None
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise modellib.ModelError(f"--out {out!r} is in use by another training run: wait for it to end, or give "
                                  f"another --out") from None
    try:
        yield
    finally:
        os.remove(lock.name)  # removed while still held: a run that starts after this one makes a new one
        lock.close()
        if made and not os.listdir(out):
            os.rmdir(out)


RUN_FILES = ("metrics.jsonl", "latest", "curves.png", "init")  # with ckpt-* and .ckpt-*.tmp: what train.py writes


def clear_run(out):
    """--overwrite: remove what an earlier run wrote to `out` (RUN_FILES and its checkpoints), nothing else."""
    for name in os.listdir(out) if os.path.isdir(out) else ():
        if name in RUN_FILES or name.startswith("ckpt-") or (name.startswith(".ckpt-") and name.endswith(".tmp")):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def stop_requested():
    """Ctrl-C on any rank stops all of them after the same step."""
    flag = torch.tensor([float(STOP["requested"])])
    if dist.is_initialized():
        flag = flag.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


STOP = {"requested": False}


@contextlib.contextmanager
def stop_on_ctrl_c():
    """First Ctrl-C: finish the current step, checkpoint, exit (so --resume continues exactly).
    Second Ctrl-C: stop at once."""
    def handler(signum, frame):
        if STOP["requested"]:
            raise KeyboardInterrupt
        STOP["requested"] = True
        print("\nCtrl-C: saving a checkpoint after this step (press again to abort without saving)", file=sys.stderr)
    STOP["requested"] = False
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
