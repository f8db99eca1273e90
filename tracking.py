"""
What a run reports while it trains: one JSON line per step in metrics.jsonl (the run's record), and the distance to
the target measured at the start, every --eval-every steps and at the end (METHOD.md §8), with what measuring cost.
"""
import json
import os
import time

import fidelity

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
    start = time.perf_counter()
    n = args.eval_n if step != args.steps else max(args.eval_n, getattr(args, "eval_n_final", args.eval_n))
    f = fidelity.measure(policy, task, args.kappa, args.lam, n, log_z.item(), seed=args.seed + step,
                         exact=step == args.steps)  # Expr24: exact at the end; before, Z exact and the rest estimated
    return dict(f, eval_seconds=time.perf_counter() - start)


def eval_due(args, step):
    every = args.eval_every if args.eval_every is not None else max(1, args.steps // 4)
    return every > 0 and (step % every == 0 or step == args.steps)


def report_fidelity(log_path, seconds):
    """The first and the last measurement of the run, and the share of the run they took."""
    with open(log_path) as f:
        rows = [r for r in map(json.loads, f) if "kl_q_target" in r]
    if not rows:
        return
    for name, row in (("start", rows[0]), ("end", rows[-1])) if len(rows) > 1 else (("end", rows[0]),):
        print(f"{name} (step {row['step']}): " + fidelity.format_fidelity(row, explain=name == "end"))
    print(f"measuring took {sum(r['eval_seconds'] for r in rows):.0f} s of this run's {seconds:.0f} s")
