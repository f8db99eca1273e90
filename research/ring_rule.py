"""
What the SMILES mask's ring-bond rule (tasks/smiles/grammar.py: no ring bond between atoms already bonded) changes about the
reference, hence the target: reference samples drawn under the mask without the rule (tasks/smiles/grammar.py at a commit before
it), the share the rule forbids, and log P_ref of the rest read with and without it. RESULTS.md, "Reach the target".

    python -m research.ring_rule [--before 23cbc68] [--n 4000] [train.py flags ...]
"""
import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile

import numpy as np
import torch

import train
from tasks.smiles import grammar

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def grammar_at(commit):
    """tasks/smiles/grammar.py as it was at `commit` (from git), as a module of its own."""
    text = subprocess.run(["git", "-C", ROOT, "show", f"{commit}:grammar.py"], capture_output=True, text=True, check=True)
    path = os.path.join(tempfile.mkdtemp(), "grammar_before.py")
    with open(path, "w") as f:
        f.write(text.stdout)
    spec = importlib.util.spec_from_file_location("grammar_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def complete_now(text):
    """Does the mask, ring-bond rule included, let a string end here?"""
    state = grammar.advance(grammar.Syntax(), text)
    return state is not None and grammar.complete(state)


def log_p(policy, mask, tokens, lengths):
    policy.task_mask = mask
    log_pf, log_pterm = policy.log_probs(tokens, lengths)
    return log_pf.sum(1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip())
    p.add_argument("--before", default="23cbc68", help="a commit whose tasks/smiles/grammar.py has no ring-bond rule")
    p.add_argument("--n", type=int, default=4000, help="reference samples")
    ours, rest = p.parse_known_args(argv)
    args = train.get_args(rest + ["--out", tempfile.mkdtemp()])  # nothing is written there
    torch.manual_seed(args.seed)
    policy = train.build_policy(args, train.build_task(args), with_reference=False)  # untrained: the reference
    old = grammar_at(ours.before).SmilesMask(policy.action_texts, args.max_len)
    new = grammar.SmilesMask(policy.action_texts, args.max_len)
    forbidden, shift = 0, []
    with torch.no_grad():
        for _ in range(0, ours.n, 250):
            policy.task_mask = old
            tokens, lengths, _ = policy.sample(250)
            allowed = torch.tensor([complete_now(t) for t in policy.texts(tokens, lengths)])
            forbidden += int((~allowed).sum())
            shift.append((log_p(policy, new, tokens, lengths) - log_p(policy, old, tokens, lengths))[allowed].numpy())
    shift = np.concatenate(shift)
    print(f"{ours.n} reference samples under the mask of {ours.before}: the ring-bond rule forbids {forbidden / ours.n:.2%};"
          f" on the rest it moves log P_ref(x) by {shift.mean():+.1e} nats on average (largest {shift.max():.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
