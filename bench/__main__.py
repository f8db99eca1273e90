"""
Benchmarks (not tests), from the repository root: `python -m bench` runs every section, `python -m bench losses`
one of them. Speed is measured here, in one run against the straightforward way, never asserted in tests.
Add a section by writing a function and registering it in SECTIONS.

losses, logprobs (objectives.py): the fused objectives and the one-pass log-probs against loops.
replay (subm.py): SubM's lazy greedy against plain greedy, the similarity matrix, one buffer refresh.
step, sampler, fidelity, fidelity-expr24, gpu, expr24 (step.py): one training step phase by phase, the sampler's
cost per token, the fidelity meter's share of a run, MFU and the step on a GPU, Expr24's grammar mask.
"""
import sys

from bench.objectives import bench_logprobs, bench_losses
from bench.step import bench_expr24, bench_fidelity, bench_gpu, bench_sampler, bench_step
from bench.subm import bench_replay

SECTIONS = {"losses": bench_losses, "replay": bench_replay, "logprobs": bench_logprobs, "step": bench_step,
            "sampler": bench_sampler, "fidelity": bench_fidelity, "gpu": bench_gpu, "expr24": bench_expr24,
            "fidelity-expr24": lambda: bench_fidelity(task_name="expr24")}


def main(argv=None):
    names = (sys.argv[1:] if argv is None else argv) or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"error: unknown section(s) {unknown}; available: {list(SECTIONS)}", file=sys.stderr)
        return 2
    for name in names:
        SECTIONS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
