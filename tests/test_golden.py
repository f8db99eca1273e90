"""The golden runs: 20 steps of each built-in task's defaults (seed 0, no measuring) must write the metrics.jsonl
recorded in tests/golden/ exactly, timings aside, so that moving code around changes no number. Recorded with
`python train.py --task NAME --steps 20 --seed 0 --eval-every 0` on one thread; re-record only for a change that
is meant to move the numbers, and say which and why in the commit.
Exactly is per kind of CPU: another vendor's or vector width's kernels sum in another order, which moves the last
bits (SMILES, the Game of 24) or, through the 600 warm-up steps of Expr24's scratch model, its samples. So a kind
with its own record (tests/golden/<vendor>-<capability>/, e.g. AuthenticAMD-AVX2) is held to it, and any other kind
to tests/golden/*.jsonl, recorded on the CPUs that CI ran on."""
import json
import os

import pytest
import torch

import train

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
TIMINGS = {"cpu_seconds", "eval_seconds"}


def cpu_kind():
    """'<vendor>-<the vector width torch's kernels use>', e.g. 'GenuineIntel-AVX512' (vendor 'unknown' off Linux)."""
    vendor = "unknown"
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            vendor = next((line.split(":", 1)[1].strip() for line in f if line.startswith("vendor_id")), vendor)
    return f"{vendor}-{torch.backends.cpu.get_cpu_capability()}"


def golden_record(task):
    own = os.path.join(GOLDEN, cpu_kind(), f"{task}.jsonl")
    return own if os.path.exists(own) else os.path.join(GOLDEN, f"{task}.jsonl")


def read_rows(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMINGS} for line in f]


@pytest.mark.parametrize("task", ["smiles", "expr24", "game24"])
def test_golden_run(task, tmp_path):
    assert torch.get_num_threads() == 1  # the record was made on one thread: sums in another order differ in the last bit
    out = tmp_path / task
    assert train.main(["--task", task, "--steps", "20", "--seed", "0", "--eval-every", "0", "--out", str(out)]) == 0
    assert read_rows(out / "metrics.jsonl") == read_rows(golden_record(task))
