"""
What a run reports while it trains: one JSON line per step in metrics.jsonl (the run's record), and the distance to
the target measured at the start, every --eval-every steps and at the end (METHOD.md §8), with what measuring cost;
the same scalars to Weights & Biases (--wandb) and TensorBoard (--tensorboard) when asked; when it ends, curves.png
drawn from metrics.jsonl (plot.py).
"""
import contextlib
import importlib
import json
import math
import os
import secrets
import sys
import time

import conditions
import fidelity
import rl_losses
from model import ModelError

TRACKERS = (("wandb", "wandb", "wandb"), ("tensorboard", "torch.utils.tensorboard", "tensorboard"))  # flag, module, pip

TIMINGS = ("cpu_seconds", "eval_seconds")  # how long things took: the only part of a run that resuming cannot repeat


def read_metrics(out, timings=True):
    """The rows of OUT/metrics.jsonl; without `timings`, what a bit-identical resume reproduces exactly."""
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows if timings else [{k: v for k, v in r.items() if k not in TIMINGS} for r in rows]


def log_step(log_file, metrics):
    log_file.write(json.dumps(metrics) + "\n")
    log_file.flush()


def evaluate(args, task, policy, log_z, step):
    """The distance to the target after `step` steps (fidelity.measure), with what it cost. Its samples come from
    a forked RNG, so a run with evaluations trains exactly as one without."""
    if isinstance(policy, conditions.ConditionalPolicy):  # per condition, averaged over each split (METHOD.md §11.4)
        return evaluate_conditions(args, task, policy, step, lambda c: None if args.loss in rl_losses.NO_LOG_Z
                                   else conditions.learned_log_z(args, log_z, policy, c))
    start = time.perf_counter()
    n = args.eval_n if step != args.steps else max(args.eval_n, args.eval_n_final)
    learned = None if args.loss in rl_losses.NO_LOG_Z else log_z.item()  # RLOO, GRPO and the oracle have none
    exact = step == args.steps or args.eval_exact  # Expr24: exact at the end (or every time, with --eval-exact);
    # before, Z exact and the rest estimated
    f = fidelity.measure(policy, task, args.kappa, args.lam, n, learned, seed=args.seed + step, exact=exact)
    return dict(f, eval_seconds=time.perf_counter() - start)


def progress(metrics, kl):
    """The progress bar's numbers: the step's loss, logZ (where the method has one), reward, validity, length, KL."""
    return dict(loss=f"{metrics['loss']:.3g}", **({"logZ": f"{metrics['log_z']:.2f}"} if "log_z" in metrics else {}),
                R=f"{metrics['reward']:.3f}", valid=f"{metrics['validity']:.2f}", len=f"{metrics['length']:.1f}", **kl)


def evaluate_conditions(args, task, policy, step, learned_log_z):
    """train.py's periodic measurement: --eval-prompts conditions of each split. `learned_log_z(conditions)` gives
    the learned logZ of each (None without a head)."""
    start, out = time.perf_counter(), dict(conditional=True)
    for split in fidelity.SPLITS:
        conds = fidelity.subset(task.conditions.get(split, []), args.eval_prompts)
        if conds:
            rows = fidelity.measure_conditions(policy, task, conds, args.kappa, args.lam, args.eval_n, learned_log_z(conds),
                           seed=args.seed + step)
            out.update(fidelity.summarise_split(rows, split))
    out["kl_q_target"] = out.get("train_kl_q_target", math.nan)  # the progress bar's KL: the training conditions
    return dict(out, eval_seconds=time.perf_counter() - start)


def eval_due(args, step):
    every = args.eval_every if args.eval_every is not None else max(1, args.steps // 4)
    return every > 0 and (step % every == 0 or step == args.steps)


def save_curves(out):
    """out/curves.png from out/metrics.jsonl. The run is saved before this is called, so a failure to draw costs
    nothing: it is one line, and `python plot.py OUT` draws it again."""
    import plot
    try:
        return plot.draw_run(out)
    except Exception as e:  # matplotlib's own errors (a full disk, a broken font cache, ...): the run is safe
        print(f"note: could not draw {os.path.join(out, 'curves.png')} ({type(e).__name__}: {e}); "
              f"python plot.py {out} draws it", file=sys.stderr)


def format_fidelity(f, explain=False):
    """The printed distance to the target: per split of prompts with conditions, else one block."""
    return (format_conditions if f.get("conditional") else format_distance)(f, explain)


def format_distance(f, explain=False):
    """The printed block; with `explain`, one line on how to read it."""
    ci = lambda c: f" [{c[0]:.2f}, {c[1]:.2f}]" if c else ""
    kind = "exact" if f["exact"] else "estimated, Z exact" if f.get("exact_log_z") else "estimated"
    bound = "" if f["exact"] else ">= "  # estimated: over the objects drawn only, so lower bounds
    lines = [f"distance to the target ({kind}): "
             f"KL(q||p*) {f['kl_q_target']:.3f}{ci(f.get('kl_q_target_ci'))} nats  TV {bound}{f['tv_target']:.3f}  "
             f"missed mass {bound}{f['missed_mass']:.3f}  oversampled mass {bound}{f['oversampled_mass']:.3f}"
             + ("" if f["exact"] or "seen_target_mass" not in f else f"  (lower bounds: the {f['n_objects']} objects "
                f"drawn hold {f['seen_target_mass']:.3f} of the target)"),
             f"  log Z {f['log_z_estimate']:.2f}{ci(f.get('log_z_ci'))}"
             + (f"  learned logZ {f['log_z_learned']:.2f} (gap {f['log_z_gap']:+.2f})" if "log_z_learned" in f else "")
             + (f"  ESS policy {f['ess']['q']:.1f} reference {f['ess']['ref']:.1f}" if "ess" in f else "")
             + (f"  q(solutions) {f['q_solution_mass']:.3f}  KL(p*||q) {f['kl_target_q']:.3f}" if f["exact"] else "")]
    if "kl_invalid_part" in f:
        lines.append(f"  from score-0 samples (q = {f['q_invalid']:.4f}): {f['kl_invalid_part']:.3f} of the KL")
    if dominated(f):
        lines.append(f"  note: {f['kl_top_n']} samples supply {f['kl_top']:.3f} of the {f['kl_q_target']:.3f} nats: the estimate "
                     "and its interval rest on them; measure with more samples (sample.py --fidelity-n)")
    if explain:
        lines.append("  read: KL 0 and missed mass 0 mean x is drawn in proportion to R(x); missed mass is the target's "
                     "share drawn at under a tenth of its rate" + ("" if f["exact"] else
                                                                 " (over the objects either sampler drew: a lower bound)"))
    return "\n".join(lines)


def dominated(f):
    """The printout's warning: a few samples supply most of a positive KL estimate (e.g. two invalid outputs at 40
    nats each in 1000 samples), so the estimate and its interval move with how many such samples happened to fall."""
    kl, top = f.get("kl_q_target"), f.get("kl_top")
    return top is not None and kl is not None and kl > 0.02 and top > 0.5 * kl


def format_conditions(f, explain=False):
    """The printed lines: one per split."""
    lines = []
    for split in [k[:-len("_n_conditions")] for k in f if k.endswith("_n_conditions")]:
        g = lambda key, d=3: f"{f[f'{split}_{key}']:.{d}f}" if f.get(f"{split}_{key}") is not None else "-"
        lines.append(f"{split:>8} ({f[f'{split}_n_conditions']} prompts): KL(q||p*) {g('kl_q_target')}  "
                     f"KL(p*||q) {g('kl_target_q')}  TV {g('tv_target')}  q(Sol|c) {g('q_solution_mass')} "
                     f"(solvable)  |logZ - log Z| {g('log_z_gap_abs', 2)}")
    if explain:
        lines.append("  read: the mean over a split's prompts of each prompt's distance to its own target p*(.|c); "
                     "held-out prompts were never trained on")
    return "distance to the target per prompt:\n" + "\n".join(lines)


def report_fidelity(log_path, seconds, resumed_at=0):
    """The first and the last measurement of the run, and the share of this process's `seconds` (from step
    `resumed_at`) that its own measurements took."""
    with open(log_path) as f:
        rows = [r for r in map(json.loads, f) if "kl_q_target" in r]
    if not rows:
        return
    first, last = rows[0], rows[-1]
    if len(rows) > 1 and resumed_at:  # a fresh run printed its start block when it measured it
        print(f"start (step {first['step']}): " + format_fidelity(first))
    print(f"end (step {last['step']}): " + format_fidelity(last, explain=True))
    if len(rows) > 1:
        print(f"KL(q||p*) from {first['kl_q_target']:.3f} at step {first['step']} to {last['kl_q_target']:.3f} at "
              f"step {last['step']}")
    mine = sum(r["eval_seconds"] for r in rows if r["step"] > resumed_at or not resumed_at)
    print(f"measuring took {mine:.0f} s of the {seconds:.0f} s since " + (f"resuming at step {resumed_at}"
                                                                          if resumed_at else "the start"))


# ----------------------------------------------------------------------------- Weights & Biases, TensorBoard

def tracking_problem(args):
    """Why a tracker asked for cannot run here (None if it can): a missing package, named with its pip command."""
    for flag, module, pip in TRACKERS:
        if getattr(args, flag, None):
            try:
                importlib.import_module(module)
            except ImportError:
                return f"--{flag} needs the {pip} package, which is not installed: pip install {pip}"


def scalars(metrics):
    """A metrics.jsonl row as flat name -> number: an interval [lo, hi] as name_lo / name_hi, a dict (ESS) as
    name/key; flags (exact) and the step itself are left out."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, bool) or key == "step":
            continue
        if isinstance(value, (int, float)):
            out[key] = float(value)
        elif isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, (int, float)) for v in value):
            out[f"{key}_lo"], out[f"{key}_hi"] = map(float, value)
        elif isinstance(value, dict):
            out.update({f"{key}/{k}": float(v) for k, v in value.items() if isinstance(v, (int, float))})
    return out


class Trackers:
    """The trackers a run asked for, logging every metrics.jsonl row (which stays the record). A resumed run
    continues the same wandb run (its id is kept in the run's settings, so in every checkpoint) and TensorBoard
    drops what a killed run logged after its checkpoint (purge_step); wandb cannot drop steps it already has, so
    after a kill it keeps those and ignores their repeats."""

    def __init__(self, args, step):
        problem = tracking_problem(args)  # a resumed run's saved flags meet this machine here
        if problem:
            raise ModelError(problem)
        self.wandb = self.tensorboard = None
        if args.wandb:
            import wandb
            args.wandb_id = getattr(args, "wandb_id", None) or secrets.token_hex(6)
            try:
                self.wandb = wandb.init(project=args.wandb, id=args.wandb_id, resume="allow", dir=args.out,
                                        name=os.path.basename(os.path.abspath(args.out)), config=vars(args))
            except Exception as e:  # not logged in, no network: one line, and the offline mode that needs neither
                raise ModelError(f"--wandb could not start ({type(e).__name__}: {str(e).splitlines()[0]}); run "
                                 f"`wandb login`, or set WANDB_MODE=offline and `wandb sync` later") from None
        if args.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(os.path.join(args.out, "tensorboard"), purge_step=step or None)

    def log(self, metrics):
        values = scalars(metrics)
        if self.wandb is not None:
            self.wandb.log(values, step=metrics["step"])
        if self.tensorboard is not None:
            for key, value in values.items():
                if math.isfinite(value):
                    self.tensorboard.add_scalar(key, value, metrics["step"])
            self.tensorboard.flush()

    def close(self):
        if self.wandb is not None:
            self.wandb.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()


@contextlib.contextmanager
def trackers(args, step, enabled=True):
    """Trackers(args, step) on the rank that logs (closed however the run ends); a no-op elsewhere."""
    t = Trackers(args, step) if enabled else None
    try:
        yield t.log if t is not None else (lambda metrics: None)
    finally:
        if t is not None:
            t.close()
