"""The table of RESULTS.md's "Expr24 with four numbers": each run's KL(p*||q) at steps 9,000 / 18,000 / 27,000 (the
last step it measured, for the stopped ones) and its oracle efficiency there, against the mean of the oracle's seeds
(results/oracle/x*_expr24_4numbers_*.jsonl) at the same step; then, per arm with several seeds (D7: RapTB, B7: TB,
G7: the recipe without --explore-ref), KL(p*||q) at each evaluation, mean ± 95% interval.

    python results/cover/four/table.py
"""
import glob
import os
import re
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
from research.oracle_efficiency import read_records  # noqa: E402
from research.reproduce import mean_ci  # noqa: E402


def curve(path):
    return {step: row["train_kl_target_q"] for step, row in read_records(path, "train_")[0].items()}


oracle_runs = [curve(p) for p in sorted(glob.glob(os.path.join(HERE, "..", "..", "oracle", "x*_expr24_4numbers_*.jsonl")))]
oracle = {s: float(np.mean([c[s] for c in oracle_runs])) for s in oracle_runs[0]}
print(f"the reference {oracle[0]:.3f}; the oracle ({len(oracle_runs)} seeds) " +
      " / ".join(f"{oracle[s]:.3f}" for s in (9000, 18000, 27000)) + " at 9,000 / 18,000 / 27,000")
arms = {}  # a run's name before its seed (D7, B7, ...) -> its seeds' curves; the stopped runs left out
for path in sorted(glob.glob(os.path.join(HERE, "*.jsonl"))):
    name, c = os.path.basename(path)[:-6], curve(path)
    last = max(c)
    at = " / ".join(f"{c[s]:.2f}" if s in c else "—" for s in (9000, 18000, 27000))
    eff = (c[0] - c[last]) / (c[0] - oracle[last])
    print(f"{name}: KL(p*||q) {at}; efficiency {eff:.2f} at step {last}")
    if not name.endswith("_stopped"):
        arms.setdefault(re.sub(r"s\d+$", "", name), []).append(c)

# per arm, KL(p*||q) at every evaluation, mean ± 95% interval over seeds
for arm, curves in arms.items():
    if len(curves) > 1:
        cells = []
        for s in (3000, 6000, 9000, 12000, 18000, 27000):
            m = mean_ci([c[s] for c in curves if s in c])
            cells.append(f"{m['mean']:.2f} ± {m['ci']:.2f}")
        print(f"{arm} ({len(curves)} seeds) KL(p*||q) at 3,000 / 6,000 / 9,000 / 12,000 / 18,000 / 27,000: " + " / ".join(cells))
