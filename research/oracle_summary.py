"""One line per run of the oracle experiments: its final exact q(Sol) and KL(p*||q), the training's CPU seconds (the
sum of metrics.jsonl's per-step cpu_seconds; evaluations excluded; the committed copies are gzipped) and the
KL-against-step curve.

    python -m research.oracle_summary results/oracle/e*.jsonl                      # the table's numbers
    python -m research.oracle_summary results/oracle/e*.jsonl --plot results/oracle/curves.png

(results/oracle/*.jsonl keep every evaluation and every 100th step of each run's metrics.jsonl, each kept row's
cpu_seconds summed over the steps since the one before.)
"""
import gzip
import json
import os
import sys

paths = [a for a in sys.argv[1:] if a != "--plot"]
plot_to = sys.argv[sys.argv.index("--plot") + 1] if "--plot" in sys.argv else None
paths = [p for p in paths if p != plot_to]
curves = {}
for path in paths:
    rows = [json.loads(line) for line in (gzip.open(path, "rt") if path.endswith(".gz") else open(path))]
    cpu = sum(r.get("cpu_seconds", 0.0) for r in rows)
    split = "train_" if any("train_kl_target_q" in r for r in rows) else ""  # the Game of 24: its train prompts
    q_sol, kl = split + "q_solution_mass", split + "kl_target_q"
    evals = [r for r in rows if kl in r]
    steps = max((r["step"] for r in rows), default=0)
    curve = "  ".join(f"{r['step']}:{r[q_sol]:.3f}/{r[kl]:.2f}" for r in evals)
    last = evals[-1] if evals else {}
    curves[os.path.basename(path).split(".")[0]] = [(r["step"], r[kl], r[q_sol]) for r in evals]
    print(f"{path}: steps {steps}, train CPU {cpu:.0f} s, {split}q(Sol) {last.get(q_sol, float('nan')):.3f}, "
          f"{split}KL(p*||q) {last.get(kl, float('nan')):.3f}\n    curve (step:q(Sol)/KL(p*||q)) {curve}")
if plot_to:  # KL(p*||q) and q(Sol) against the step, one line per run
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, points in curves.items():
        steps, kl, q = zip(*points)
        left.plot(steps, kl, marker=".", label=name)
        right.plot(steps, q, marker=".", label=name)
    left.set(xlabel="step", ylabel="KL(p*||q), exact",
             title="the oracle on " + ("the Game of 24's train prompts" if split else "Expr24"))
    right.set(xlabel="step", ylabel="q(Sol), exact", ylim=(0, 1))
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(plot_to, dpi=100)
    print(f"wrote {plot_to}")
