"""
Which of the repository's files one training step runs code from (the house's readability measure, RESULTS.md):
the second optimiser step of a short run is traced, and every repository file a Python function of it lives in
is listed.

    python -m research.step_files --task smiles
    python -m research.step_files --task game24
"""
import argparse
import os
import sys
import tempfile

import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def files_of_one_step(argv):
    """The repository files whose functions run during the second train_step of `train.py argv`."""
    seen, calls, real = set(), [0], train.train_step

    def record(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(ROOT):
            seen.add(os.path.relpath(frame.f_code.co_filename, ROOT))

    def traced(*a, **k):
        calls[0] += 1
        if calls[0] != 2:
            return real(*a, **k)
        sys.setprofile(record)
        try:
            return real(*a, **k)
        finally:
            sys.setprofile(None)

    train.train_step = traced
    try:
        assert train.main(argv) == 0
    finally:
        train.train_step = real
    return sorted(seen)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="smiles", help="the built-in task whose default step is traced")
    args = p.parse_args(argv)
    out = os.path.join(tempfile.mkdtemp(), "run")
    files = files_of_one_step(["--task", args.task, "--steps", "3", "--eval-every", "0", "--out", out,
                               "--grad-accum", "1"])
    print(f"{args.task}: {len(files)} files: {', '.join(files)}")


if __name__ == "__main__":
    sys.exit(main())
