"""Every method of a grid against the oracle (issue "Cover the modes", item 4), from research/reproduce.py's run
folders (the finished ones) whose training measured exactly (`--train-args "--eval-exact --eval-every N"`, an Oracle among the methods):

    python -m research.oracle_efficiency OUT [--split train]

Per method, mean and 95% interval over its seeds (reproduce.mean_ci), at the end of training: q(Sol), KL(p*||q),
KL(q||p*), TV; the oracle efficiency (KL_ref - KL_method) / (KL_ref - KL_oracle) in KL(p*||q), KL_oracle the mean
over the oracle's seeds at the same step, KL_ref the starting model's (1: as close as the oracle; 0: no closer than
the reference; negative: farther); the seeds that collapsed (ended farther from p* than the reference); distinct
solutions by length in sample.py's samples; the first measured step (and the training's CPU s to it) at which
KL(p*||q) has come down by half and by 90% of the oracle's reduction over the whole run, with how many seeds got
there. Two columns read the runs in the measure on-policy training minimises (tests/test_fixed_points.py): the same
efficiency in KL(q||p*), and the learned logZ minus the ELBO log Z - KL(q||p*), where logZ's gradient on the run's
own samples vanishes. --split train reads a conditional task's train prompts (the Game of 24).
"""
import argparse
import csv
import glob
import json
import os
from collections import Counter, defaultdict

import numpy as np

from research.reproduce import mean_ci, read_json


MEASURED = ("kl_target_q", "kl_q_target", "tv_target", "q_solution_mass", "log_z_estimate")


def read_run(run_dir, split):
    """The exact measurements of one run ({step: row}) and the training CPU s spent by each step."""
    return read_records(os.path.join(run_dir, "metrics.jsonl"), split)


def read_records(path, split):
    """read_run of a metrics.jsonl by its path (a run's own, or one kept in results/): every row's measurements under
    `split` ("train_" or ""), also when the run measured its one condition as a whole."""
    with open(path) as f:
        rows = [json.loads(line) for line in f]
    kl = split + "kl_target_q"
    if split and not any(kl in r for r in rows):  # one condition measured as a whole (the oracle of Expr24)
        rows = [{**r, **{split + k: r[k] for k in MEASURED if k in r}} for r in rows]
    evals = {r["step"]: r for r in rows if kl in r}
    cpu, spent = 0.0, {}
    for r in rows:
        if "loss" in r:
            cpu += r.get("cpu_seconds", 0.0)
            spent[r["step"]] = cpu
    return evals, spent


def distinct_by_length(run_dir):
    path = os.path.join(run_dir, "samples.csv")
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        correct = {(r["generated"], int(r["length"])) for r in csv.DictReader(f) if float(r["score"] or 0) == 1.0}
    return Counter(length for _, length in correct)


def first_reaching(evals, spent, level, kl):
    """(step, CPU s) of the first measurement with KL(p*||q) <= level, or None."""
    for step in sorted(evals):
        if evals[step][kl] <= level:
            return step, spent.get(step, 0.0)
    return None


def cell(values, digits):
    s = mean_ci(values)
    if s["mean"] is None:
        return "—"
    return f"{s['mean']:.{digits}f}" + (f" ± {s['ci']:.{digits}f}" if s["ci"] is not None else "")


def reach_cell(hits, n):
    got = [h for h in hits if h is not None]
    if not got:
        return f"0/{n}"
    return f"{len(got)}/{n}: {np.mean([h[0] for h in got]):.0f} ({np.mean([h[1] for h in got]):.0f} s)"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="a research/reproduce.py --out folder")
    p.add_argument("--split", default="", help="'train' or 'heldout' for a conditional task (default: none)")
    args = p.parse_args(argv)
    split = args.split + "_" if args.split else ""
    kl, q_sol = split + "kl_target_q", split + "q_solution_mass"
    runs = defaultdict(list)
    for run_dir in sorted(glob.glob(os.path.join(args.out, "runs", "*-s*"))):
        if (read_json(os.path.join(run_dir, "run.json")) or {}).get("done"):  # finished: trained and sampled
            runs[os.path.basename(run_dir).rsplit("-s", 1)[0]].append(run_dir)
    if "Oracle" not in runs:
        p.error(f"no Oracle runs in {args.out}/runs: the efficiency is relative to them")
    data = {m: [read_run(d, split) for d in dirs] for m, dirs in runs.items()}
    oracle, ref = oracle_means(data, kl), start_mean(data, kl)
    reverse = split + "kl_q_target"
    oracle_rev, ref_rev = oracle_means(data, reverse), start_mean(data, reverse)
    end = max(oracle)
    print(f"KL(p*||q): the reference {ref:.2f}, the oracle {oracle[end]:.2f} at step {end} (mean of "
          f"{len(data['Oracle'])} seeds); a run counts only at the steps it measured exactly\n")
    head = ["method", "seeds", "q(Sol)", "KL(p*‖q)", "KL(q‖p*)", "TV", "oracle efficiency", "collapsed",
            "distinct solutions by length (mean)", "half the oracle's reduction: seeds, step (CPU s)", "90%",
            "efficiency in KL(q‖p*)", "logZ - ELBO"]
    print("| " + " | ".join(head) + " |\n" + "|---" * len(head) + "|")
    for method, results in data.items():
        last = [evals[max(evals)] for evals, _ in results]
        eff = [(ref - r[kl]) / (ref - oracle[r["step"]]) if r["step"] in oracle else None for r in last]
        eff_rev = [(ref_rev - r[reverse]) / (ref_rev - oracle_rev[r["step"]]) if r["step"] in oracle else None for r in last]
        gap = [r["log_z_learned"] - (r[split + "log_z_estimate"] - r[reverse]) for (evals, _), r in zip(results, last)
               if r.get("log_z_learned") != evals.get(0, r).get("log_z_learned")]  # a logZ the method trains
        lengths = [distinct_by_length(d) for d in runs[method]]
        by_len = {k: np.mean([c.get(k, 0) for c in lengths]) for k in sorted({k for c in lengths for k in c})}
        reach = {f: [first_reaching(e, s, ref - f * (ref - oracle[end]), kl) for e, s in results] for f in (0.5, 0.9)}
        n = len(results)
        print(f"| {method} | {n} | {cell([r[q_sol] for r in last if q_sol in r], 3)} | {cell([r[kl] for r in last], 2)} | "
              f"{cell([r[split + 'kl_q_target'] for r in last], 1)} | {cell([r[split + 'tv_target'] for r in last], 2)} | "
              f"{cell(eff, 2)} | {sum(r[kl] > ref for r in last)}/{n} | "
              f"{', '.join(f'{k}: {v:.0f}' for k, v in by_len.items()) or '—'} | "
              f"{reach_cell(reach[0.5], n)} | {reach_cell(reach[0.9], n)} | {cell(eff_rev, 1)} | {cell(gap, 1)} |")


def oracle_means(data, key):
    """{step: the mean of `key` over the oracle's seeds}."""
    at = defaultdict(list)
    for evals, _ in data["Oracle"]:
        for step, row in evals.items():
            at[step].append(row[key])
    return {step: float(np.mean(v)) for step, v in at.items()}


def start_mean(data, key):
    """The starting model's `key`, the mean over every run that measured step 0."""
    return float(np.mean([evals[0][key] for m in data for evals, _ in data[m] if 0 in evals]))


if __name__ == "__main__":
    main()
