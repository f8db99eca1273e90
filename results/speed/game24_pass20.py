"""pass@20 and distinct solutions per solvable prompt, train and held out, from the samples.csv that
`python sample.py OUT --split all --n 20` writes for a Game of 24 run (or more samples per prompt, of which the
first 20 are read: they are 20 independent draws, as research/reproduce.py's 64 per prompt are):

    python results/speed/game24_pass20.py OUT/samples.csv [--k 20]
"""
import argparse
import collections
import csv
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
from tasks.game24.task import Game24Task  # noqa: E402

def main(argv=None):
    p = argparse.ArgumentParser(description="pass@20 and distinct solutions per solvable Game of 24 prompt")
    p.add_argument("samples", help="the samples.csv of `python sample.py OUT --split all --n 20` (or more)")
    p.add_argument("--k", type=int, default=20, help="samples read per prompt, the first k (default: 20)")
    args = p.parse_args(argv)
    task = Game24Task()
    by_prompt = collections.defaultdict(list)
    with open(args.samples) as f:
        for row in csv.DictReader(f):
            by_prompt[row["prompt"]].append(row)
    for split in ("train", "heldout"):
        prompts = [p for p in task.conditions[split] if task.given(p).solutions()]
        solved = [{r["generated"] for r in by_prompt[p][:args.k] if float(r["score"]) == 1.0} for p in prompts]
        print(f"{split}: {len(prompts)} solvable prompts, pass@{args.k} {sum(map(bool, solved)) / len(prompts):.3f}, "
              f"distinct solutions per prompt {sum(map(len, solved)) / len(prompts):.2f}")


if __name__ == "__main__":
    main()
