"""
Benchmarks (not tests), from the repository root: `python -m bench` runs every section, `python -m bench losses`
one of them. Speed is measured here, in one run against the straightforward way, never asserted in tests.
Add a section by writing a function and registering it in SECTIONS.

losses, logprobs (objectives.py): the fused objectives and the one-pass log-probs against loops.
replay (subm.py): SubM's lazy greedy against plain greedy, the similarity matrix, one buffer refresh.
step, sampler, fidelity, fidelity-expr24, gpu, expr24 (step.py): a task's training step phase by phase, the sampler's
cost per token, the fidelity meter's share of a run, MFU and the step on a GPU, Expr24's grammar mask.
"""
import argparse
import sys

from bench.objectives import bench_logprobs, bench_losses
from bench.step import bench_expr24, bench_fidelity, bench_gpu, bench_sampler, bench_step
from bench.subm import bench_replay

SECTIONS = {"losses": bench_losses, "replay": bench_replay, "logprobs": bench_logprobs, "step": bench_step,
            "sampler": bench_sampler, "fidelity": bench_fidelity, "gpu": bench_gpu, "expr24": bench_expr24,
            "fidelity-expr24": lambda: bench_fidelity(task_name="expr24")}


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    p.add_argument("sections", nargs="*", help=f"which to run (default: all): {', '.join(SECTIONS)}")
    p.add_argument("--task", default=None, help="step only: a built-in task's step phase by phase beside the "
                   "oracle's (default: smiles, beside its step without the syntax mask)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")
    args = p.parse_args(argv)
    unknown = [n for n in args.sections if n not in SECTIONS]
    if unknown:
        p.error(f"unknown section(s) {unknown}; available: {list(SECTIONS)}")
    if args.task and args.sections != ["step"]:
        p.error("--task is for the step section alone: python -m bench step --task NAME")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.task:
        bench_step(args.task)
        return 0
    for name in args.sections or list(SECTIONS):
        SECTIONS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
