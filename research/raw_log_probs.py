"""
How far the authors' raw log-probs (METHOD.md §10, item 2) are from the masked ones the sampler draws from, on
samples of a reference: log P_ref(x) read both ways, per sequence, split by where the difference can come from
(the forced stop at L_max, and every other state). RESULTS.md, "The paper's regime", shows the numbers.

    python -m research.raw_log_probs [--task smiles] [--n 2000] [train.py flags ...]
"""
import argparse
import sys
import tempfile

import numpy as np
import torch

import train


def sequence_log_probs(policy, tokens, lengths, raw):
    log_pf, log_pterm = policy.log_probs(tokens, lengths, raw=raw)  # an untrained policy is the reference
    stop = log_pterm.gather(1, lengths[:, None]).squeeze(1)
    return log_pf.sum(1), stop


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0].strip(), formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="reference samples (default 2000)")
    p.add_argument("--batch", type=int, default=250, help="samples per pass (default 250)")
    ours, rest = p.parse_known_args(argv)
    args = train.get_args(rest + ["--out", tempfile.mkdtemp()])  # nothing is written there
    torch.manual_seed(args.seed)
    task = train.build_task(args)
    policy = train.build_policy(args, task, with_reference=False)
    rows = []
    with torch.no_grad():
        for _ in range(0, ours.n, ours.batch):
            tokens, lengths, _ = policy.sample(ours.batch)
            masked_pf, masked_stop = sequence_log_probs(policy, tokens, lengths, raw=False)
            raw_pf, raw_stop = sequence_log_probs(policy, tokens, lengths, raw=True)
            rows.append(np.stack([lengths.numpy(), (masked_pf - raw_pf).numpy(), (masked_stop - raw_stop).numpy(),
                                  (masked_pf + masked_stop).numpy()], 1))
    lengths, d_tokens, d_stop, log_ref = np.concatenate(rows).T
    at_max = lengths == args.max_len
    print(f"{task.name}, {len(lengths)} reference samples, L_max {args.max_len}: masked minus raw log P_ref(x), nats")
    print(f"  the reference's charge: mean length {lengths.mean():.2f}, mean log P_ref(x) {log_ref.mean():.2f}, "
          f"{log_ref.sum() / (lengths + 1).sum():.2f} per action (tokens and the stop)")
    print(f"  tokens: mean {d_tokens.mean():.2e}, max {d_tokens.max():.2e}")
    print(f"  stop below L_max ({(~at_max).mean():.1%} of samples): mean {d_stop[~at_max].mean() if (~at_max).any() else 0:.2e}")
    print(f"  forced stop at L_max ({at_max.mean():.1%} of samples): mean {d_stop[at_max].mean() if at_max.any() else 0:.2f}, "
          f"max {d_stop[at_max].max() if at_max.any() else 0:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
