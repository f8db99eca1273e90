"""How much of each train prompt's target the reference alone would find with a default run's draws, exactly:

    python results/game24/reference_coverage.py [--draws 1818 2912]

A prompt c drawn N times from P_ref(.|c) finds solution x with probability 1 - (1 - P_ref(x|c))^N, so the expected
share of p*(.|c) it finds is sum_x p*(x|c) (1 - (1 - P_ref(x|c))^N), over the enumerated solutions. A default run
visits each of the 396 train prompts about 9,000 x 16 / 396 = 364 times, 8 samples a visit, about 62.5% of them
on-policy (the replay share falls from 0.5 to 0.25): 1,818 on-policy draws a prompt, 2,912 if every batch sampled.
"""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import conditions  # noqa: E402
import fidelity  # noqa: E402
import train  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser(description="the share of p* the reference alone finds per Game of 24 train prompt")
    p.add_argument("--draws", type=int, nargs="+", default=[1818, 2912], help="draws per prompt (default: 1818 2912)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    settings = train.get_args(["--task", "game24", "--out", "unused"])
    task = train.build_task(settings)
    task, policy, _, _ = conditions.build(settings, task, train.build_policy(settings, task))
    found = {n: [] for n in args.draws}
    solutions = []
    for c in task.conditions["train"]:
        given = task.given(c)
        objects = given.objects()
        scores = np.asarray(given.score_batch(objects))
        if not scores.any():
            continue
        log_ref = np.asarray(fidelity.condition_reference_log_probs(policy, c, objects), np.float64)[scores == 1]
        p_star = np.exp(log_ref - np.logaddexp.reduce(log_ref))  # p*(.|c): P_ref restricted to the solutions
        solutions.append(len(log_ref))
        for n in args.draws:
            found[n].append(float(np.sum(p_star * -np.expm1(n * np.log1p(-np.exp(log_ref))))))
    print(f"{len(solutions)} solvable train prompts, {np.mean(solutions):.1f} solutions each on average")
    for n, shares in found.items():
        shares = np.asarray(shares)
        print(f"{n} reference draws a prompt: expected share of p* found {shares.mean():.3f} (median "
              f"{np.median(shares):.3f}, lowest {shares.min():.3f}); prompts with >= 90% found: {np.mean(shares >= 0.9):.2f}")


if __name__ == "__main__":
    main()
