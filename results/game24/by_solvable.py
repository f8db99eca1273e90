"""The exact distance of a Game of 24 run, split by whether a prompt has a solution, from the per-prompt rows that
`python sample.py OUT --split all` writes (OUT/samples_metrics.json, every prompt of both splits):

    python results/game24/by_solvable.py OUT/samples_metrics.json [...]

For a prompt without a solution p*(.|c) is P_ref(.|c) itself, so its KL(p*||q) is how far training moved the model
there; for one with solutions it is the distance to P_ref restricted to them. The per-split means of sample.py
average both kinds (156 + 240 train prompts, 39 + 60 held out).
"""
import argparse
import json

import numpy as np


def summary(path):
    with open(path) as f:
        rows = json.load(f)["conditions"]
    out = {}
    for split in ("train", "heldout"):
        for kind, solvable in (("solvable", True), ("unsolvable", False)):
            sel = [r for r in rows if r["split"] == split and (r["fidelity_n_solutions"] > 0) == solvable]
            out[f"{split} {kind}"] = dict(
                n=len(sel), kl_target_q=float(np.mean([r["fidelity_kl_target_q"] for r in sel])),
                q_solution_mass=float(np.mean([r["fidelity_q_solution_mass"] for r in sel])) if solvable else None)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description="a Game of 24 run's exact KL(p*||q), solvable and unsolvable prompts apart")
    p.add_argument("metrics", nargs="+", help="samples_metrics.json of `python sample.py OUT --split all`")
    args = p.parse_args(argv)
    for path in args.metrics:
        print(path)
        for name, s in summary(path).items():
            q = "" if s["q_solution_mass"] is None else f"  q(Sol|c) {s['q_solution_mass']:.3f}"
            print(f"  {name:20} ({s['n']:3d} prompts)  KL(p*||q) {s['kl_target_q']:.3f}{q}")


if __name__ == "__main__":
    main()
