"""One line per run of the oracle experiments: its final exact q(Sol) and KL(p*||q), the training's CPU seconds (the
sum of metrics.jsonl's per-step cpu_seconds; evaluations excluded; the committed copies are gzipped) and the
KL-against-step curve.

    python -m research.oracle_summary results/oracle/runs/*/metrics.jsonl.gz
"""
import gzip
import json
import sys

for path in sys.argv[1:]:
    rows = [json.loads(line) for line in (gzip.open(path, "rt") if path.endswith(".gz") else open(path))]
    cpu = sum(r.get("cpu_seconds", 0.0) for r in rows)
    split = "train_" if any("train_kl_target_q" in r for r in rows) else ""  # the Game of 24: its train prompts
    q_sol, kl = split + "q_solution_mass", split + "kl_target_q"
    evals = [r for r in rows if kl in r]
    steps = max((r["step"] for r in rows), default=0)
    curve = "  ".join(f"{r['step']}:{r[q_sol]:.3f}/{r[kl]:.2f}" for r in evals)
    last = evals[-1] if evals else {}
    print(f"{path}: steps {steps}, train CPU {cpu:.0f} s, {split}q(Sol) {last.get(q_sol, float('nan')):.3f}, "
          f"{split}KL(p*||q) {last.get(kl, float('nan')):.3f}\n    curve (step:q(Sol)/KL(p*||q)) {curve}")
