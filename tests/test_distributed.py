"""Data parallelism on CPU (gloo): 2 ranks with half a batch each == 1 process with the whole batch."""
import os
import socket
import sys

import pytest
import torch
import torch.multiprocessing as mp

import train
from batches import Batch

BATCH = 8  # rows per rank
# fork: the ranks start with this process's imports (torch, transformers), seconds each under spawn; the parent has
# one intra-op thread (conftest) and no tokenizer threads, so forking it is safe. Elsewhere spawn, torch's default.
START_METHOD = "fork" if sys.platform.startswith("linux") else "spawn"


def start_ranks(fn, nprocs, *args, join=True):
    """mp.spawn(fn, args, nprocs), started with START_METHOD."""
    return mp.start_processes(fn, args=args, nprocs=nprocs, join=join, start_method=START_METHOD)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def train_two_steps(rank, world, model, out, port):
    """Build the trainer's pieces as run() does, feed rank r rows [r*BATCH, (r+1)*BATCH) of one fixed batch."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    args = train.get_args(["--model", model, "--loss", "raptb", "--replay", "none", "--batch-size", str(BATCH * 2 // world),
                           "--grad-accum", "1", "--max-len", "5", "--min-len", "1", "--k-min-start", "1",
                           "--k-min-end", "1", "--lr", "1e-2", "--steps", "2", "--out", out])
    train.setup_distributed(args)
    task = train.build_task(args)
    torch.manual_seed(0)
    policy = train.build_policy(args, task)
    torch.manual_seed(123)
    tokens, lengths, _ = policy.sample(2 * BATCH)  # the same rows on every rank: same weights, same seed
    rows = slice(rank * len(tokens) // world, (rank + 1) * len(tokens) // world)
    train.get_batch = lambda *a: Batch(tokens[rows], lengths[rows], "policy")
    log_z = torch.nn.Parameter(torch.zeros(()))
    # SGD: a weight moves by lr x its averaged gradient, so the comparison below is one of gradients. Adam would
    # divide each by its own running scale and turn float rounding in a near-zero gradient into a whole lr step.
    optimizer = torch.optim.SGD([dict(params=list(policy.model.parameters()), lr=args.lr),
                                 dict(params=[log_z], lr=args.lr_logz)])
    for step in range(2):
        metrics = train.train_step(train.Training(args, task, policy, None, log_z, optimizer, None), step)
    params = torch.nn.utils.parameters_to_vector(list(policy.model.parameters()) + [log_z]).detach()
    torch.save(dict(params=params, loss=metrics["loss"]), os.path.join(out, f"rank{rank}-of-{world}.pt"))
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_ranks_equal_one_process_with_the_combined_batch(tiny_gpt2, tmp_path):
    start_ranks(train_two_steps, 2, 2, tiny_gpt2, str(tmp_path), free_port())
    start_ranks(train_two_steps, 1, 1, tiny_gpt2, str(tmp_path), free_port())
    r0, r1, single = (torch.load(tmp_path / f, weights_only=False)
                      for f in ("rank0-of-2.pt", "rank1-of-2.pt", "rank0-of-1.pt"))
    torch.testing.assert_close(r0["params"], r1["params"], rtol=0, atol=0)  # identical weights on both ranks
    torch.testing.assert_close(r0["params"], single["params"], rtol=1e-4, atol=1e-5)
    assert abs(r0["loss"] - single["loss"]) < 1e-4 * max(1.0, abs(single["loss"]))
    start = torch.nn.utils.parameters_to_vector(
        __import__("transformers").AutoModelForCausalLM.from_pretrained(tiny_gpt2).parameters())
    assert not torch.allclose(single["params"][:-1], start)  # the steps did move the weights
