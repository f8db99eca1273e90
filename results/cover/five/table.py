"""The table of RESULTS.md's "five numbers, where the draws decide": each run's KL(p*||q) and q(Sol) at every
evaluation, its oracle efficiency at its last one, against the oracle of results/oracle/e6 (one seed: the same model,
batch and schedule, exact samples of p*) at the same step, and its training CPU s; then, for a run with more than one
seed (its name before sNN), the mean ± 95% interval over its seeds of the efficiency, KL(p*||q) and q(Sol) at the
end and the CPU s, the seeds that collapsed (ended farther from p* than their reference), and the first measured step
(and CPU s to it) at which KL(p*||q) had come down by half and by 90% of the oracle's reduction over the whole run.

    python results/cover/five/table.py
"""
import glob
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "..", ".."))
from research.oracle_efficiency import first_reaching, read_records, reach_cell  # noqa: E402
from research.reproduce import mean_ci  # noqa: E402

oracle, _ = read_records(os.path.join(HERE, "..", "..", "oracle", "e6_w64_b128_lr3e-3_27k.jsonl"), "train_")
print("oracle: " + " / ".join(f"{s}: {r['train_kl_target_q']:.2f}" for s, r in oracle.items()))
arms = {}  # a run's name before its seed -> each seed's ending; the stopped runs left out
for path in sorted(glob.glob(os.path.join(HERE, "*.jsonl"))):
    evals, spent = read_records(path, "train_")
    last, kl = max(evals), {s: r["train_kl_target_q"] for s, r in evals.items()}
    efficiency = (kl[0] - kl[last]) / (kl[0] - oracle[last]["train_kl_target_q"])
    q_sol = evals[last].get("train_q_solution_mass")
    whole = kl[0] - oracle[max(oracle)]["train_kl_target_q"]  # the oracle's reduction over the whole run
    reach = [first_reaching(evals, spent, kl[0] - f * whole, "train_kl_target_q") for f in (0.5, 0.9)]
    name = os.path.basename(path)[:-6]
    print(f"{name}: " + " / ".join(f"{s}: {v:.2f}" for s, v in kl.items() if s) +
          f"; q(Sol) {q_sol if q_sol is None else round(q_sol, 3)}; efficiency {efficiency:.2f} at step {last}; "
          f"{max(spent.values()):.0f} CPU s")
    if not name.endswith("_stopped"):
        arms.setdefault(re.sub(r"s\d+$", "", name), []).append(
            dict(efficiency=efficiency, kl=kl[last], q_sol=q_sol, cpu_s=max(spent.values()), collapsed=kl[last] > kl[0],
                 reach=reach))

for arm, runs in arms.items():
    if len(runs) > 1:
        cells = {k: mean_ci([r[k] for r in runs]) for k in ("efficiency", "kl", "q_sol", "cpu_s")}
        print(f"{arm} ({len(runs)} seeds), mean ± 95% interval at the end: " +
              "; ".join(f"{k} {m['mean']:.2f} ± {m['ci']:.2f}" for k, m in cells.items()) +
              f"; the lowest efficiency {min(r['efficiency'] for r in runs):.2f}; collapsed "
              f"{sum(r['collapsed'] for r in runs)}/{len(runs)}; half the oracle's reduction: seeds, step (CPU s) "
              f"{reach_cell([r['reach'][0] for r in runs], len(runs))}; 90%: "
              f"{reach_cell([r['reach'][1] for r in runs], len(runs))}")
