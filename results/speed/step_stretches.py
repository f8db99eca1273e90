"""Total training CPU minutes of a run and the median CPU ms per step over each stretch of 500 steps, read from
its metrics.jsonl (the `cpu_seconds` of every step):

    python results/speed/step_stretches.py OUT/metrics.jsonl
"""
import argparse
import json

import numpy as np


def main(argv=None):
    p = argparse.ArgumentParser(description="a run's CPU time per step, stretch by stretch")
    p.add_argument("metrics", help="a run's metrics.jsonl")
    args = p.parse_args(argv)
    with open(args.metrics) as f:
        rows = [r for r in map(json.loads, f) if "cpu_seconds" in r]
    steps = np.array([r["step"] for r in rows])
    ms = 1000 * np.array([r["cpu_seconds"] for r in rows])
    print(f"training CPU minutes: {ms.sum() / 60000:.1f}")
    for start in range(0, int(steps.max()) + 1, 500):
        stretch = (steps >= start) & (steps < start + 500)
        if stretch.any():
            print(f"steps {start}-{start + 499}: median {np.median(ms[stretch]):.0f} CPU ms per step")


if __name__ == "__main__":
    main()
