"""
Time to target: for runs of train.py measured every few steps (--eval-every), how many steps, reward calls and CPU
seconds each method needs to reach KL(q‖p*) <= 0.1, over seeds; plus a KL-against-step plot. RESULTS.md, "Reach the
target", shows how the runs were made.

    python -m research.time_to_target RUNS_DIR [--threshold 0.1] [--out results/time_to_target]

RUNS_DIR holds one train.py --out folder per run, named METHOD-sSEED; sample.py's samples_metrics.json in a folder
(when present) gives the end-of-run KL from 1000 + 1000 samples.
"""
import argparse
import json
import os
import re

import numpy as np

import plot
from research.reproduce import mean_ci


def reach(rows, threshold):
    """The first measurement at or below the threshold (point estimate), and the first whose interval's upper end is
    at or below twice it, each with the training cost up to that step; None where never."""
    cost = dict(objects=0.0, prefixes=0.0, cpu=0.0)
    first, confident = None, None
    for r in rows:
        if "loss" in r:
            cost = dict(objects=cost["objects"] + r.get("objects_scored", 0.0),
                        prefixes=cost["prefixes"] + r.get("prefixes_scored", 0.0),
                        cpu=cost["cpu"] + r.get("cpu_seconds", 0.0))
        if "kl_q_target" not in r:
            continue
        here = dict(step=r["step"], **cost)
        if first is None and r["kl_q_target"] <= threshold:
            first = here
        ci = r.get("kl_q_target_ci")
        if confident is None and ci and ci[1] <= 2 * threshold:
            confident = here
    return first, confident


def cell(values, digits=0, missing="never"):
    s = mean_ci(values)
    if s["mean"] is None:
        return missing
    text = f"{s['mean']:.{digits}f}" + (f" ± {s['ci']:.{digits}f}" if s["ci"] is not None else "")
    return text + (f" ({s['n']}/{len(values)})" if s["n"] < len(values) else "")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1])
    p.add_argument("runs", help="folder of METHOD-sSEED run folders")
    p.add_argument("--threshold", type=float, default=0.1)
    p.add_argument("--out", default=None, help="prefix for the .md table and the .png plot (default RUNS/time_to_target)")
    args = p.parse_args(argv)
    groups = {}
    for name in sorted(os.listdir(args.runs)):
        m = re.fullmatch(r"(.+)-s(\d+)", name)
        if m and os.path.isfile(os.path.join(args.runs, name, "metrics.jsonl")):
            groups.setdefault(m.group(1), []).append(os.path.join(args.runs, name))
    out = args.out or os.path.join(args.runs, "time_to_target")
    lines = [f"| method | seeds | steps to KL <= {args.threshold:g} | sequences scored | prefixes scored | CPU s "
             f"| steps to upper CI <= {2 * args.threshold:g} | KL at the end (sample.py, 1000 + 1000) |",
             "|---|---|---|---|---|---|---|---|"]
    curves = {}
    for method, folders in groups.items():
        runs = [plot.read_run(f) for f in folders]
        curves[method] = runs
        reached = [reach(rows, args.threshold) for rows in runs]
        col = lambda i, key: [r[i][key] if r[i] else None for r in reached]
        ends = []
        for f in folders:
            path = os.path.join(f, "samples_metrics.json")
            ends.append(json.load(open(path))["kl_q_target"] if os.path.isfile(path) else None)
        lines.append(f"| {method} | {len(folders)} | {cell(col(0, 'step'))} | {cell(col(0, 'objects'))} | "
                     f"{cell(col(0, 'prefixes'))} | {cell(col(0, 'cpu'))} | {cell(col(1, 'step'))} | {cell(ends, 3, '—')} |")
    table = "\n".join(lines) + ("\n\nmean ± 95% CI (t) over seeds; (k/n): only k of n seeds got there. Costs are "
                                "training only (measurements excluded), counted up to the first measurement at the "
                                "threshold.")
    with open(out + ".md", "w") as f:
        f.write(table + "\n")
    kl_plot(curves, args.threshold, out + ".png")
    plot.draw(curves, out + "_curves.png", title=f"mean over seeds ({args.runs})")
    print(table)
    print(f"wrote {out}.md, {out}.png (KL) and {out}_curves.png (every panel)")


def kl_plot(curves, threshold, path):
    """KL(q‖p*) against step on a log scale, the mean over seeds of each method with its seeds faint behind it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for i, (method, runs) in enumerate(curves.items()):
        points = [{r["step"]: r["kl_q_target"] for r in rows if "kl_q_target" in r} for rows in runs]
        steps = sorted(set.intersection(*(set(p) for p in points)))
        for p in points:
            ax.plot(steps, [max(p[s], 1e-3) for s in steps], color=f"C{i}", alpha=0.2, linewidth=0.8)
        ax.plot(steps, [max(np.mean([p[s] for p in points]), 1e-3) for s in steps], color=f"C{i}", marker="o", ms=3,
                label=method, linestyle="--" if "SubM" in method else "-")
    ax.axhline(threshold, color="0.4", linewidth=0.8, linestyle=":")
    ax.set(yscale="log", xlabel="training step", ylabel="KL(q‖p*) (nats; estimates below 1e-3 drawn at 1e-3)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
