"""Models that do not fit one GPU: --fsdp (FSDP2 sharding) and --grad-ckpt (activation checkpointing).
FSDP2 runs on CPU with gloo, so the 2-rank tests run anywhere; the last test needs a GPU (bf16 mixed precision)."""
import json
import os
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import batches
from batches import Batch
import losses
import model as modellib
import tracking
import checkpoint
import train
from test_distributed import free_port, start_ranks

BATCH = 6  # rows per rank
COMMON = ["--device", "cpu", "--loss", "raptb", "--grad-accum", "1", "--max-len", "5", "--min-len", "1", "--k-min-start", "1",
          "--k-min-end", "1", "--lr", "1e-2", "--eval-every", "0"]
needs_distributed = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")


def spawn(fn, nprocs, *args, timeout=300):
    """mp.spawn (start_ranks) with a deadline: a collective that one rank never joins would otherwise hang the suite."""
    ctx = start_ranks(fn, nprocs, nprocs, *args, join=False)  # fork on Linux: no second import of torch
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"{fn.__name__} did not finish in {timeout} s (a rank waiting in a collective?)")


def join_as_rank(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)


def full(p):
    return (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()


def trainable(policy):
    return {n: full(p) for n, p in policy.model.named_parameters() if p.requires_grad}


def fixed_batch_run(rank, world, model, out, port, flags, tokens, lengths):
    """Two optimiser steps on rows [r*B, (r+1)*B) of one fixed batch (as test_distributed does), then a checkpoint,
    for each set of flags; each rank writes what it ended with to out/<i>/rank<r>.pt."""
    if world > 1:
        join_as_rank(rank, world, port)
    real_get_batch = train.get_batch
    try:
        for i, extra in enumerate(flags):
            fixed_batch_steps(rank, world, model, os.path.join(out, str(i)), extra, tokens, lengths)
    finally:
        train.get_batch = real_get_batch
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def fixed_batch_steps(rank, world, model, out, flags, tokens, lengths):
    args = train.get_args(["--model", model, *COMMON, "--replay", "none", "--batch-size", str(len(tokens) // world),
                           "--steps", "2", "--out", out, *flags])
    train.setup_distributed(args)
    os.makedirs(out, exist_ok=True)
    task = train.build_task(args)
    torch.manual_seed(0)
    policy = train.build_policy(args, task)
    for m in policy.model.modules():  # LoRA's dropout would draw different masks for different row splits
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    rows = slice(rank * len(tokens) // world, (rank + 1) * len(tokens) // world)
    train.get_batch = lambda *a: Batch(tokens[rows], lengths[rows], "policy")
    log_z = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.AdamW([
        dict(params=[p for p in policy.model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay),
        dict(params=[log_z], lr=args.lr_logz, weight_decay=0.0)])
    for step in range(2):
        metrics = train.train_step(train.Training(args, task, policy, None, log_z, optimizer, None), step)
    train.save_checkpoint(args, policy, None, log_z, optimizer, np.random.default_rng(0), 2)
    names = [n for n, p in policy.model.named_parameters() if p.requires_grad]
    torch.save(dict(params=trainable(policy), log_z=log_z.detach().clone(), names=names, metrics=metrics),
               os.path.join(out, f"rank{rank}.pt"))


def one_batch(model, n):
    args = train.get_args(["--model", model, *COMMON])
    policy = train.build_policy(args, train.build_task(args), with_reference=False)
    torch.manual_seed(123)
    tokens, lengths, _ = policy.sample(n)
    return tokens, lengths


@needs_distributed
def test_fsdp_two_ranks_equal_one_process_with_the_combined_batch(tiny_llama, tmp_path):
    """Sharded over 2 ranks == unsharded in 1 process, with LoRA and without (then the frozen reference is
    sharded too): weights, logZ, loss, grad norm (so the clipping norm that combines FSDP's DTensor grads with
    logZ's plain one is right), the checkpointed weights and the checkpointed Adam state."""
    variants = [["--lora"], []]
    tokens, lengths = one_batch(tiny_llama, 2 * BATCH)
    spawn(fixed_batch_run, 2, tiny_llama, str(tmp_path / "fsdp"), free_port(), [v + ["--fsdp"] for v in variants],
          tokens, lengths)
    fixed_batch_run(0, 1, tiny_llama, str(tmp_path / "one"), None, variants, tokens, lengths)  # in this process
    for i, flags in enumerate(variants):
        check_same_training(tmp_path / "fsdp" / str(i), tmp_path / "one" / str(i), lora="--lora" in flags)


def check_same_training(fsdp, one_dir, lora):
    r0, r1, one = (torch.load(d / f, weights_only=False)
                   for d, f in ((fsdp, "rank0.pt"), (fsdp, "rank1.pt"), (one_dir, "rank0.pt")))
    assert r0["names"] == one["names"]
    for name in one["names"]:
        torch.testing.assert_close(r0["params"][name], r1["params"][name], rtol=0, atol=0)  # same full weights
        # Adam turns float noise in a near-zero gradient into a visible difference (LoRA's A at step 2, whose
        # step-1 gradient is exactly 0), hence 1e-4 here; the grad norm below is compared at 1e-4 relative
        torch.testing.assert_close(r0["params"][name], one["params"][name], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(r0["log_z"], one["log_z"], rtol=1e-5, atol=1e-6)
    for key in ("loss", "grad_norm"):
        assert r0["metrics"][key] == pytest.approx(one["metrics"][key], rel=1e-4, abs=1e-6)
    assert one["metrics"]["grad_norm"] > 0.5  # the clip (0.5) was active, so the combined norm mattered
    assert one["log_z"] != 0

    # the FSDP checkpoint is a normal HF folder with the same weights as the unsharded run's
    ckpt, ckpt_one = checkpoint.find_checkpoint(str(fsdp)), checkpoint.find_checkpoint(str(one_dir))
    weights = "adapter_model.safetensors" if lora else "model.safetensors"
    a, b = load_file(os.path.join(ckpt, weights)), load_file(os.path.join(ckpt_one, weights))
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-4)
    if not lora:
        assert json.load(open(os.path.join(ckpt, "config.json")))["architectures"] == ["LlamaForCausalLM"]
        modellib.load_model(ckpt)  # loads like any model
    # ... and its optimiser state is the full one, named by parameter: policy.<name> and log_z
    sharded = torch.load(os.path.join(ckpt, "state.pt"), weights_only=False)["optimizer"]["state"]
    plain = torch.load(os.path.join(ckpt_one, "state.pt"), weights_only=False)["optimizer"]["state"]
    fqns = [f"policy.{n}" for n in one["names"]] + ["log_z"]
    assert set(sharded) == set(fqns) and len(plain) == len(fqns)
    for i, fqn in enumerate(fqns):
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(sharded[fqn][key], plain[i][key], rtol=1e-3, atol=1e-7)
        assert float(sharded[fqn]["step"]) == float(plain[i]["step"]) == 2


def main_runs(rank, world, jobs):
    """train.main as torchrun would start it, once per job (out, argv, stop_after, port), in the same processes
    (imports are the slow part). Ctrl-C (as its handler sets it) after step `stop_after`; each rank's full
    trainable weights are recorded at every checkpoint."""
    real_log_step, real_save = train.log_step, train.save_checkpoint
    for out, argv, stop_after, port in jobs:
        join_as_rank(rank, world, port)

        def log_step(log_file, metrics):
            real_log_step(log_file, metrics)
            if metrics["step"] == stop_after:
                checkpoint.STOP["requested"] = True

        def save_checkpoint(args, policy, buffer, log_z, optimizer, rng, step, out=out):
            torch.save(dict(params=trainable(policy), log_z=log_z.detach().clone()), os.path.join(out, f"params{rank}.pt"))
            return real_save(args, policy, buffer, log_z, optimizer, rng, step)

        train.log_step, train.save_checkpoint = log_step, save_checkpoint
        assert train.main(argv) == (130 if stop_after else 0)


def read_log(out):
    return tracking.read_metrics(out, timings=False)


@needs_distributed
def test_fsdp_lora_trains_checkpoints_and_resumes_exactly(tiny_llama, tmp_path):
    """2 ranks, --fsdp --lora with SubM replay (so the replay/temperature choices must agree across ranks):
    identical weights on both ranks, a normal adapter checkpoint, and kill + --resume == a straight run."""
    argv = ["--model", tiny_llama, *COMMON, "--fsdp", "--lora", "--replay", "subm", "--batch-size", "4",
            "--grad-accum", "2", "--steps", "4", "--ckpt-every", "100"]
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    spawn(main_runs, 2, [(straight, argv + ["--out", straight], None, free_port()),
                         (killed, argv + ["--out", killed], 2, free_port()),
                         (killed, ["--resume", "--out", killed, "--steps", "4"], None, free_port())])
    log = read_log(straight)
    assert [m["step"] for m in log] == [1, 2, 3, 4]
    assert all(np.isfinite([m["loss"], m["log_z"], m["grad_norm"]]).all() for m in log)
    assert 0 < sum(m["replay"] for m in log) < 4  # both kinds of batch happened (and agreed across ranks)
    assert read_log(killed) == log  # resumed exactly: same samples, same Adam state
    r0, r1 = (torch.load(os.path.join(straight, f"params{r}.pt"), weights_only=False) for r in (0, 1))
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], r1["params"][name])
    assert torch.equal(r0["log_z"], r1["log_z"])
    resumed = torch.load(os.path.join(killed, "params0.pt"), weights_only=False)
    for name in r0["params"]:
        assert torch.equal(r0["params"][name], resumed["params"][name])
    adapter = load_file(os.path.join(checkpoint.find_checkpoint(straight), "adapter_model.safetensors"))
    assert len(adapter) == len(r0["params"])
    for name, value in r0["params"].items():
        assert torch.equal(adapter[name.replace(".default", "")], value)


def test_bf16_lora_gradients_after_a_reference_pass_first(tiny_llama):
    """FSDP fixes gradient dtypes at the first forward; if that is the reference pass (adapters off, so no
    parameter requires grad), bf16 gradients were later assigned to the fp32 LoRA weights and backward failed
    (seen on a GPU when a resumed run began with a replayed batch). shard() makes the first forward itself."""
    net, _ = modellib.load_model(tiny_llama, lora=True, dtype=torch.bfloat16)  # as on a GPU with --lora
    try:
        train.shard(net, torch.device("cpu"), bf16=True)
        ids = torch.tensor([[1, 5, 6, 7]])
        with torch.no_grad(), net.disable_adapter():
            net(input_ids=ids)
        net(input_ids=ids).logits.float().sum().backward()
        grads = [p.grad for p in net.parameters() if p.requires_grad]
        assert grads and all(g is not None and g.dtype == torch.float32 for g in grads)
    finally:
        torch.distributed.destroy_process_group()


# ----------------------------------------------------------------------------- activation checkpointing

def loss_and_grads(model, extra, tokens, lengths):
    args = train.get_args(["--model", model, *COMMON, *extra])
    task = train.build_task(args)
    torch.manual_seed(0)
    policy = train.build_policy(args, task)
    calls = []
    layer = next(m for m in policy.model.modules() if type(m).__name__ == "LlamaDecoderLayer")
    layer.self_attn.register_forward_pre_hook(lambda *a: calls.append(1))  # inside the checkpointed part
    log_r, u, _, _ = batches.score_batch(args, task, policy, tokens, lengths)
    log_z = torch.nn.Parameter(torch.tensor(0.3))
    torch.manual_seed(1)  # LoRA's dropout: the same masks in both runs (checkpointing replays the RNG)
    log_pf, log_pterm = policy.log_probs(tokens, lengths)
    loss, _ = losses.compute_loss("raptb", log_pf, log_pterm, log_r, u, lengths, log_z, **train.loss_knobs(args, 0.0))
    calls.clear()
    loss.backward()
    grads = {n: p.grad for n, p in policy.model.named_parameters() if p.requires_grad}
    return loss.item(), grads, log_z.grad, len(calls)


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_grad_ckpt_gives_the_same_loss_and_gradients(tiny_llama, lora):
    tokens, lengths = one_batch(tiny_llama, 8)
    extra = ["--lora"] if lora else []
    loss, grads, gz, recomputed = loss_and_grads(tiny_llama, extra, tokens, lengths)
    loss_c, grads_c, gz_c, recomputed_c = loss_and_grads(tiny_llama, extra + ["--grad-ckpt"], tokens, lengths)
    assert (recomputed, recomputed_c) == (0, 1)  # the block really ran again in backward
    assert loss_c == pytest.approx(loss, rel=1e-6)
    torch.testing.assert_close(gz_c, gz)
    assert grads.keys() == grads_c.keys()
    for name in grads:
        torch.testing.assert_close(grads_c[name], grads[name], rtol=1e-5, atol=1e-7)
    assert any(g.abs().sum() > 0 for g in grads.values())


def test_grad_ckpt_may_change_on_resume():
    assert "grad_ckpt" in checkpoint.RUN_ONLY and "fsdp" not in checkpoint.RUN_ONLY


# ----------------------------------------------------------------------------- on a GPU

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU (bf16 mixed precision, NCCL)")
@pytest.mark.parametrize("extra", [["--lora", "--grad-ckpt"], ["--grad-ckpt"]], ids=["lora", "full"])
def test_fsdp_on_one_gpu_trains_and_resumes(tiny_llama, tmp_path, ctrl_c_after_step, extra):
    """A plain `python train.py --fsdp` (a process group of one), bf16 compute: runs, stops, resumes, and its
    checkpoint loads as a normal model. (Bit-identity is not asserted: GPU kernels need not be deterministic.)"""
    argv = ["--model", tiny_llama, *COMMON, "--device", "cuda", "--fsdp", *extra, "--replay", "prt", "--batch-size", "8",
            "--grad-accum", "2", "--steps", "4", "--ckpt-every", "100", "--out", str(tmp_path)]
    disarm = ctrl_c_after_step(2)
    assert train.main(argv) == 130
    disarm()
    assert train.main(["--resume", "--out", str(tmp_path), "--steps", "4"]) == 0
    log = read_log(tmp_path)
    assert [m["step"] for m in log] == [1, 2, 3, 4]
    assert all(np.isfinite([m["loss"], m["log_z"], m["grad_norm"]]).all() for m in log)
    ckpt = checkpoint.find_checkpoint(str(tmp_path))
    if "--lora" in extra:
        modellib.load_model(tiny_llama, adapter=ckpt)
    else:
        modellib.load_model(ckpt)
