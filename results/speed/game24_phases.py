"""Where a training step's CPU time goes, phase by phase, over a stretch of a default run (the Game of 24 unless
--task says otherwise); each phase is the thread's CPU time inside one function of train.py's step, per step:

    python results/speed/game24_phases.py [--task game24] [--start 400] [--stop 600]
"""
import argparse
import collections
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import batches  # noqa: E402
import conditions  # noqa: E402
import losses  # noqa: E402
import train  # noqa: E402

PHASES = [(train, "get_batch", "sample (on-policy) or fetch (replayed)"), (train, "score_rows", "reward and reference"),
          (batches, "prefix_scores", "  of which the prefix scores"), (train, "loss_log_probs", "forward"),
          (conditions, "row_log_z", "logZ head"), (losses, "compute_loss", "loss"), (torch.Tensor, "backward", "backward"),
          (conditions.ConditionalBuffer, "add", "buffer refresh"), (train, "optimizer_step", "optimiser"),
          (train, "train_step", "the whole step")]


def main(argv=None):
    p = argparse.ArgumentParser(description="a default run's step, phase by phase")
    p.add_argument("--task", default="game24", help="a built-in task (default: game24)")
    p.add_argument("--start", type=int, default=400, help="first step measured (default: 400)")
    p.add_argument("--stop", type=int, default=600, help="the run's length, measured up to it (default: 600)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spent, step = collections.defaultdict(float), [0]
    for owner, name, label in PHASES:
        def timed(*a, _real=getattr(owner, name), _label=label, **k):
            start = time.thread_time()
            out = _real(*a, **k)
            if args.start <= step[0] < args.stop:
                spent[_label] += time.thread_time() - start
            if _label == "the whole step":
                step[0] += 1
            return out
        setattr(owner, name, timed)
    train.main(["--task", args.task, "--steps", str(args.stop), "--eval-every", "0", "--ckpt-every", str(10 ** 9),
                "--out", os.path.join(tempfile.mkdtemp(), "run")])
    n = args.stop - args.start
    print(f"\n{args.task}, CPU ms per step over steps {args.start}-{args.stop} (one thread):")
    for _, _, label in PHASES:
        print(f"{label:>40} {spent[label] / n * 1e3:7.1f}")


if __name__ == "__main__":
    main()
