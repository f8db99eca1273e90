"""
Checkpoints: ckpt-<step>/ holds the model (or LoRA adapter) and tokenizer as Hugging Face writes them, plus the
run's state (logZ, optimiser, step, settings, every rank's RNG streams and replay buffer). A checkpoint is written
under a temporary name and renamed into place, then `latest` is pointed at it, so a crash never leaves a
half-written one. A checkpoint from elsewhere is untrusted input: state.pt holds only tensors and plain values and
is read with torch.load(weights_only=True), which refuses anything that would run code; weights are safetensors.
"""
import argparse
import contextlib
import os
import random
import shutil
import signal
import sys

import torch
import torch.distributed as dist
from safetensors import SafetensorError

import model as modellib
from distributed import fsdp_full_states

# ----------------------------------------------------------------------------- checkpoints

def rank_state(buffer, rng):
    """What differs between ranks: random streams and the replay buffer."""
    return dict(buffer=buffer.state_dict() if buffer is not None else None, numpy=rng.bit_generator.state,
                torch=torch.get_rng_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def load_rank_state(s, buffer, rng):
    if buffer is not None:
        buffer.load_state_dict(s["buffer"])
    rng.bit_generator.state = s["numpy"]
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


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
    log_z = {k: v.detach().cpu() for k, v in log_z.state_dict().items()} if isinstance(log_z, torch.nn.Module) \
        else log_z.detach().cpu()  # a logZ head (METHOD.md §11.2): its tensors
    state = dict(step=step, log_z=log_z, optimizer=optimizer_state, args=vars(args), ranks=ranks)
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
    except (OSError, SafetensorError) as e:  # e.g. a full disk: the previous checkpoint and `latest` are untouched
        shutil.rmtree(tmp, ignore_errors=True)
        why = e.strerror if isinstance(e, OSError) and e.strerror else modellib.first_line(e)
        raise modellib.ModelError(f"cannot write checkpoint {final}: {why}") from None
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


# ----------------------------------------------------------------------------- resume and Ctrl-C

RUN_ONLY = ("out", "steps", "device", "ckpt_every", "resume", "grad_ckpt",  # what --resume may change; and
            "trust_remote_code")  # never from the checkpoint: running a model's code is the user's choice each time
MEASURE_ONLY = ("eval_every", "eval_n", "eval_n_final", "wandb", "tensorboard")  # --resume keeps the run's unless
# given again: they never change training


def before_flags(saved):
    """A checkpoint written before these flags existed was trained without them: resume it that way."""
    return dict(eta_end=saved.get("eta", 0.25), absorb_end=1.0, eta_anneal=1.0, lr_schedule="constant", no_smiles_mask=True)


def resume_args(args, get_args):
    """Settings come from the checkpoint; only where and how long to run may change (`get_args`: train.py's parser). A
    setting given explicitly that contradicts the checkpoint (another --model, another --loss, ...) is an error."""
    ckpt = find_checkpoint(args.out)
    state = load_state(ckpt, args.task)
    saved, defaults = state["args"], vars(get_args(["--task", args.task, "--out", args.out]))
    given = {k: v for k, v in vars(args).items() if v != defaults.get(k)}
    for key, value in given.items():
        if key not in RUN_ONLY + MEASURE_ONLY and value != saved.get(key):
            raise modellib.ModelError(f"checkpoint {ckpt!r} was trained with --{key.replace('_', '-')} "
                                      f"{saved.get(key)!r}, not {value!r}")
    now = {k: getattr(args, k) for k in RUN_ONLY} | {k: v for k, v in given.items() if k in MEASURE_ONLY}
    older = before_flags(saved)
    saved = argparse.Namespace(**{**defaults, **older, **saved, **now})  # defaults: other flags newer than the checkpoint
    return saved, ckpt, state


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
