"""The table of RESULTS.md's "Five numbers: what the run draws decides": each run's KL(p*||q) and q(Sol) at every
evaluation, and its oracle efficiency at its last one, against the oracle of results/oracle/e6 (one seed, the same
model, batch and schedule, exact samples of p*) at the same step.

    python results/cover/five/table.py
"""
import glob
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def curve(path):
    """step -> (KL(p*||q), q(Sol)) at each evaluation; the keys with or without train_ (a run measured per condition)."""
    out = {}
    for row in map(json.loads, open(path)):
        p = "train_" if "train_kl_target_q" in row else ""
        if p + "kl_target_q" in row:
            out[row["step"]] = (row[p + "kl_target_q"], row.get(p + "q_solution_mass"))
    return out


oracle = curve(os.path.join(HERE, "..", "..", "oracle", "e6_w64_b128_lr3e-3_27k.jsonl"))
print("oracle: " + " / ".join(f"{s}: {kl:.2f}" for s, (kl, _) in oracle.items()))
for path in sorted(glob.glob(os.path.join(HERE, "*.jsonl"))):
    c = curve(path)
    last = max(c)
    efficiency = (c[0][0] - c[last][0]) / (c[0][0] - oracle[last][0])
    cells = " / ".join(f"{s}: {kl:.2f}" + (f" ({q:.3f})" if q is not None else "") for s, (kl, q) in c.items() if s)
    print(f"{os.path.basename(path)[:-6]}: {cells}; efficiency {efficiency:.2f} at step {last}")
