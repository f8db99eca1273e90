"""SubM's selections of a default Game of 24 run, timed both ways on the run's own buffers: every selection of steps
400-700 is recorded, then made again by lazy greedy (the default before, on any size) and by plain greedy (the
default now on ground sets of at most 128 items), in turn, CPU time per selection:

    python results/speed/time_game24_selection.py [--steps 700] [--out OUT]
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import replay  # noqa: E402
import train  # noqa: E402


def record(steps, out, first=400):
    """The arguments of every subm_select call of the run after step `first`."""
    calls, step = [], [0]
    real_select, real_step = replay.subm_select, train.train_step

    def recording(scores, sim, bins, k, *rest, **kw):
        if step[0] >= first:
            calls.append((np.array(scores), np.array(sim), np.array(bins), k, rest, kw))
        return real_select(scores, sim, bins, k, *rest, **kw)

    def counted(*a, **k):
        step[0] += 1
        return real_step(*a, **k)
    replay.subm_select, train.train_step = recording, counted
    try:
        train.main(["--task", "game24", "--steps", str(steps), "--eval-every", "0", "--ckpt-every", str(10 ** 9),
                    "--out", out])
    finally:
        replay.subm_select, train.train_step = real_select, real_step
    return calls


def main(argv=None):
    p = argparse.ArgumentParser(description="lazy against plain greedy on a Game of 24 run's own SubM selections")
    p.add_argument("--steps", type=int, default=700, help="run length; selections after step 400 (default: 700)")
    p.add_argument("--out", default=None, help="the run's folder (default: a new temporary one)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    calls = record(args.steps, args.out or os.path.join(tempfile.mkdtemp(), "run"))
    sizes = [len(c[0]) for c in calls]
    print(f"{len(calls)} selections, ground sets of {min(sizes)}-{max(sizes)} items, keeping {calls[0][3]}")
    for _ in range(2):
        times, picks = {}, {}
        for lazy in (True, False):
            start = time.thread_time()
            picks[lazy] = [replay.subm_select(*c[:4], *c[4], lazy=lazy, **c[5]) for c in calls]
            times[lazy] = (time.thread_time() - start) / len(calls) * 1e3
        same = all(np.array_equal(a, b) for a, b in zip(picks[True], picks[False]))
        print(f"CPU ms per selection: lazy greedy {times[True]:.2f}, plain greedy {times[False]:.2f}; same picks: {same}")


if __name__ == "__main__":
    main()
