"""
Curves of runs from their metrics.jsonl (the run's record): the distance to the target KL(q‖p*) with its 95%
interval, reward, validity, length, logZ and log P(stop) against the training step.

    python plot.py out                               # one run -> out/curves.png (train.py draws it after every run)
    python plot.py out/tb out/raptb --out tb-raptb.png   # several runs overlaid

Drawn on matplotlib's Agg canvas: files only, no display. research/reproduce.py draws its grid's curves with these panels.
"""
import argparse
import json
import math
import os
import sys

import numpy as np

PANELS = (("kl_q_target", "KL(q‖p*) to the target (nats)"), ("reward", "reward (final score)"),
          ("validity", "validity"), ("length", "mean length (tokens)"), ("log_z", "logZ"),
          ("log_pstop_final", "log P(stop) at the final state"))


class PlotError(Exception):
    """A run that cannot be drawn, said in one line."""


def read_run(folder):
    """The rows of folder/metrics.jsonl. A last line without its newline (a run killed while writing it) is
    skipped, as train.py --resume does."""
    path = os.path.join(folder, "metrics.jsonl")
    if not os.path.isdir(folder):
        raise PlotError(f"{folder!r} is not a folder (expected a train.py --out folder)")
    if not os.path.isfile(path):
        raise PlotError(f"{folder!r} has no metrics.jsonl (expected a train.py --out folder)")
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f if line.endswith("\n")]
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PlotError(f"{path} is not one JSON object per line ({e})") from None
    if not all(isinstance(r, dict) and isinstance(r.get("step"), int) for r in rows):
        raise PlotError(f"{path} is not one JSON object per line, each with its step (not written by train.py)")
    if not rows:
        raise PlotError(f"{path} holds no step yet")
    return rows


def moving_average(x, w):
    """Trailing mean over up to w points (shorter windows at the start), same length as x."""
    c = np.cumsum(np.insert(np.asarray(x, dtype=float), 0, 0.0))
    i = np.arange(1, len(x) + 1)
    return (c[i] - c[np.maximum(0, i - w)]) / (i - np.maximum(0, i - w))


def _finite(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _step_curve(runs, key):
    """Steps and the mean over runs of a per-step key (training rows: they have a loss), over the steps all have."""
    rows = [[r for r in run if "loss" in r and _finite(r.get(key))] for run in runs]
    n = min(len(r) for r in rows)
    if n == 0:
        return None, None
    return [r["step"] for r in rows[0][:n]], np.mean([[r[key] for r in run[:n]] for run in rows], axis=0)


def _kl_points(runs):
    """Steps, mean KL over runs at the steps all measured, and (one run only) the bootstrap interval."""
    evals = [{r["step"]: r for r in run if _finite(r.get("kl_q_target"))} for run in runs]
    steps = sorted(set.intersection(*(set(e) for e in evals)))
    kl = [float(np.mean([e[s]["kl_q_target"] for e in evals])) for s in steps]
    ci = [evals[0][s].get("kl_q_target_ci") for s in steps] if len(runs) == 1 else []
    return steps, kl, [(s, c) for s, c in zip(steps, ci) if c]


def draw(groups, path, styles=None, title=None, legend_title=None):
    """groups: {label: [rows of each of its runs]} -> a PNG at `path`. A label with several runs (research/reproduce.py's
    seeds) is drawn as their mean; each curve is smoothed over a twentieth of the run, with the raw values faint
    behind it when there is one label. One run's KL shows its bootstrap 95% interval as a band."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import ScalarFormatter
    styles = styles or {label: dict(color=f"C{i}", label=label) for i, label in enumerate(groups)}
    fig = Figure(figsize=(13, 6.5))
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(2, 3).flat)
    for (key, name), ax in zip(PANELS, axes):
        drawn = False
        for label, runs in groups.items():
            style = styles[label]
            if key == "kl_q_target":
                steps, kl, band = _kl_points(runs)
                if band:
                    ax.fill_between([s for s, _ in band], [c[0] for _, c in band], [c[1] for _, c in band],
                                    color=style.get("color"), alpha=0.2, linewidth=0)
                if steps:
                    ax.plot(steps, kl, marker="o", ms=3, **style)
                    drawn = True
                continue
            steps, values = _step_curve(runs, key)
            if steps is None:
                continue
            if len(groups) == 1:
                ax.plot(steps, values, color=style.get("color"), alpha=0.25, linewidth=0.8)
            ax.plot(steps, moving_average(values, max(1, len(values) // 20)), **style)
            drawn = True
        ax.set(title=name, xlabel="training step")
        kl = [y for line in ax.lines for y in line.get_ydata()] if key == "kl_q_target" else []
        if kl and max(kl) > 10 * max(min(kl), 1.0):  # from tens of nats down to fractions: a log scale above 1
            ax.set_yscale("symlog", linthresh=1.0, subs=[1, 2, 5])
            ax.yaxis.set_major_formatter(ScalarFormatter())
        if not drawn:
            why = "no measurement (--eval-every 0?)" if key == "kl_q_target" else "not in metrics.jsonl"
            ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="0.5")
        elif key == "kl_q_target" or (key == "reward" and not axes[0].lines):
            ax.legend(fontsize=7, title=legend_title, title_fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def draw_run(folder, path=None):
    """One run's curves.png (train.py calls this when a run ends or stops on Ctrl-C)."""
    label = os.path.normpath(folder)
    return draw({label: [read_run(folder)]}, path or os.path.join(folder, "curves.png"), title=label)


def main(argv=None):
    p = argparse.ArgumentParser(description="Overlay the curves of train.py runs (their metrics.jsonl) in one PNG.")
    p.add_argument("runs", nargs="+", metavar="RUN", help="train.py --out folders")
    p.add_argument("--out", default=None, help="the PNG (default: RUN/curves.png for one run, curves.png for several)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line, not argparse's screenful of usage
    args = p.parse_args(argv)
    try:
        groups = {os.path.normpath(run): [read_run(run)] for run in args.runs}
    except PlotError as e:
        p.error(str(e))
    out = args.out or (os.path.join(args.runs[0], "curves.png") if len(args.runs) == 1 else "curves.png")
    folder = os.path.dirname(os.path.abspath(out))
    if os.path.isdir(out) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        p.error(f"--out {out!r}: need a file name in a folder that exists and can be written")
    print(f"wrote {draw(groups, out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
