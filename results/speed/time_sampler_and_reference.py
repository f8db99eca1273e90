"""CPU ms per call of the sampler and of the teacher-forced passes (with and without gradient) over 150 steps of
`python train.py --task game24`, with the fast GPT-2 path (`fast`) or the network's own forward (`slow`):

    python results/speed/time_sampler_and_reference.py fast
    python results/speed/time_sampler_and_reference.py slow
"""
import argparse
import collections
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import model  # noqa: E402
import train  # noqa: E402

spent = collections.Counter()


def timed(name):
    original = getattr(model.Policy, name)

    def wrapper(self, *args, **kwargs):
        start = time.process_time()
        out = original(self, *args, **kwargs)
        key = name if name == "_sample" else f"{name} ({'with' if torch.is_grad_enabled() else 'no'} gradient)"
        spent[key] += time.process_time() - start
        spent[key, "calls"] += 1
        return out
    setattr(model.Policy, name, wrapper)


def main(argv=None):
    p = argparse.ArgumentParser(description="CPU ms per call of the sampler and the teacher-forced passes")
    p.add_argument("path", choices=["fast", "slow"], help="the fast GPT-2 path, or the network's own forward")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    timed("_sample")
    timed("log_probs")
    model.Policy.fast_gpt2 = args.path == "fast"
    with tempfile.TemporaryDirectory() as out:
        train.main(["--task", "game24", "--steps", "150", "--eval-every", "0", "--out", os.path.join(out, "run")])
    print(args.path, {k: round(1000 * v / spent[k, "calls"], 1) for k, v in spent.items() if isinstance(k, str)})


if __name__ == "__main__":
    main()
