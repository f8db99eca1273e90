"""KL(p*||q) of an Expr24 run trained with --log-z seen, split between the solutions the run drew (the seen set its
checkpoint keeps) and those it never drew, exactly over every solution:

    python results/cover/four/found_split.py RUN [RUN ...]

Per run: how many solutions were drawn, their mass under p* and under q, and each part's share of KL(p*||q), the
sum over the part of p* log(p*/q) (the non-solutions' e^-50 of p* left out)."""
import argparse
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import fidelity  # noqa: E402
import sample  # noqa: E402
import train  # noqa: E402


def drawn_texts(policy, settings):
    found = dict(settings.log_z["_extra_state"]["found"]).get("", [])  # the one condition: the empty prompt
    rows = [list(t) + [policy.eos] * (policy.max_len - len(t)) for t in found]
    return set(policy.texts(torch.tensor(rows, dtype=torch.long), torch.tensor([len(t) for t in found])))


def load_run(run):
    """A finished run's settings, task and policy (with its reference), on the CPU."""
    ckpt, settings = sample.run_settings(argparse.Namespace(ckpt=run, task=None, any_task=False, device="cpu",
                                                            trust_remote_code=False))
    task = train.build_task(settings)
    return settings, task, train.build_policy(settings, task, ckpt, with_reference=True)


def main():
    for run in sys.argv[1:]:
        settings, task, policy = load_run(run)
        solutions = task.solutions(policy.min_len, policy.max_len)
        log_q = np.asarray(fidelity.solution_log_probs(policy, solutions), np.float64)
        log_ref = np.asarray(fidelity.reference_solution_log_probs(policy, solutions), np.float64)
        log_p = log_ref + settings.lam - fidelity.exact_log_z(settings.lam, log_ref, log_ref + settings.lam)[0]
        seen = drawn_texts(policy, settings)
        drawn = np.array([s in seen for s in solutions])
        p, q, part = np.exp(log_p), np.exp(log_q), np.exp(log_p) * (log_p - log_q)
        print(f"{run}: {drawn.sum()} of {len(solutions)} solutions drawn; p* mass drawn {p[drawn].sum():.4f}, "
              f"not drawn {p[~drawn].sum():.4f}; q mass drawn {q[drawn].sum():.4f}, not drawn {q[~drawn].sum():.5f}; "
              f"KL(p*||q) over the solutions {part.sum():.3f} = drawn {part[drawn].sum():.3f} + not drawn "
              f"{part[~drawn].sum():.3f}")


if __name__ == "__main__":
    main()
