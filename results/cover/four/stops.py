"""Where an Expr24 run put the balance its windows ask for: over every solution of length 7, the policy's and the
reference's log P(stop) at the non-solution prefixes above it (k = 3 and 5), and log q(x) - log P_ref(x) of the
solution itself (p* asks -log P_ref(Sol), 5.16 nats with four numbers):

    python results/cover/four/stops.py RUN [RUN ...]
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.join(HERE, "..", "..", "..")]
from found_split import load_run  # noqa: E402


def main():
    for run in sys.argv[1:]:
        _, task, policy = load_run(run)
        solutions = [s for s in task.solutions(policy.min_len, policy.max_len) if len(s) == 7]
        rows = [policy.tokenizer.convert_tokens_to_ids(list(s)) for s in solutions]
        tokens = torch.tensor([r + [policy.eos] * (policy.max_len - len(r)) for r in rows])
        lengths = torch.full((len(rows),), 7)
        with torch.no_grad():
            log_pf, log_pterm = policy.log_probs(tokens, lengths)
            ref_pf, ref_pterm = policy.log_probs(tokens, lengths, reference=True)
        stops = ", ".join(f"k={k}: {log_pterm[:, k].mean():.2f} (reference {ref_pterm[:, k].mean():.2f})" for k in (3, 5))
        gain = (log_pf.sum(1) + log_pterm[:, 7] - ref_pf.sum(1) - ref_pterm[:, 7]).mean()
        print(f"{run}: {len(solutions)} solutions of length 7; log P(stop) {stops}; log q - log P_ref {gain:.2f}")


if __name__ == "__main__":
    main()
