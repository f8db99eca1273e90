"""
What a run reports while it trains: one JSON line per step in metrics.jsonl (the run's record), and the distance to
the target measured at the start, every --eval-every steps and at the end (METHOD.md §8), with what measuring cost.
"""
import json
import time

import condition_fidelity
import conditions
import fidelity


def log_step(log_file, metrics):
    log_file.write(json.dumps(metrics) + "\n")
    log_file.flush()


def evaluate(args, task, policy, log_z, step):
    """The distance to the target after `step` steps (fidelity.measure), with what it cost. Its samples come from
    a forked RNG, so a run with evaluations trains exactly as one without."""
    if isinstance(policy, conditions.ConditionalPolicy):  # per condition, averaged over each split (METHOD.md §10.4)
        return condition_fidelity.evaluate(args, task, policy, log_z, step,
                                           lambda c: conditions.learned_log_z(args, log_z, policy, c))
    start = time.perf_counter()
    f = fidelity.measure(policy, task, args.kappa, args.lam, args.eval_n, log_z.item(), seed=args.seed + step,
                         exact=step == args.steps)  # Expr24: exact at the end; before, Z exact and the rest estimated
    return dict(f, eval_seconds=time.perf_counter() - start)


def eval_due(args, step):
    every = args.eval_every if args.eval_every is not None else max(1, args.steps // 4)
    return every > 0 and (step % every == 0 or step == args.steps)


def format_fidelity(f, explain=False):
    return (condition_fidelity if f.get("conditional") else fidelity).format_fidelity(f, explain)


def report_fidelity(log_path, seconds):
    """The first and the last measurement of the run, and the share of the run they took."""
    with open(log_path) as f:
        rows = [r for r in map(json.loads, f) if "kl_q_target" in r]
    if not rows:
        return
    for name, row in (("start", rows[0]), ("end", rows[-1])) if len(rows) > 1 else (("end", rows[0]),):
        print(f"{name} (step {row['step']}): " + format_fidelity(row, explain=name == "end"))
    print(f"measuring took {sum(r['eval_seconds'] for r in rows):.0f} s of this run's {seconds:.0f} s")
