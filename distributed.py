"""
Scale-out plumbing for train.py: data parallelism under torchrun (one all-reduce of the gradients per step) and
FSDP2 sharding with activation checkpointing for models that do not fit one GPU. A single process never enters
any of this beyond `average_across_ranks`, which is then a no-op.
"""
import os

import numpy as np
import torch
import torch.distributed as dist

import model as modellib

# ----------------------------------------------------------------------------- data parallelism (torchrun)

def setup_distributed(args):
    """Under torchrun (WORLD_SIZE > 1) join the process group: NCCL on GPUs, gloo on CPUs. Each rank samples
    its own batches; gradients of the policy and of logZ are averaged, so all ranks keep identical weights."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1
    gpu = torch.cuda.is_available() and args.device in ("auto", "cuda")
    if gpu:
        args.device = f"cuda:{int(os.environ['LOCAL_RANK'])}"
        torch.cuda.set_device(args.device)
    if not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo")  # gloo too: metrics are averaged on CPU
    return dist.get_rank(), dist.get_world_size()


def average_across_ranks(tensors, write_back=None):
    """Mean over ranks of a list of tensors, in one all-reduce; a no-op in a single process.
    With `write_back` (parameters), the averages become their .grad."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        if write_back is not None:
            for p, t in zip(write_back, tensors):
                p.grad = t
        return tensors
    flat = torch.cat([t.reshape(-1).to(tensors[0].dtype) for t in tensors]) / dist.get_world_size()
    dist.all_reduce(flat)
    out = [chunk.view_as(t).to(t.dtype) for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors)]
    for p, t in zip(write_back or [], out):
        p.grad = t
    return out


# ----------------------------------------------------------------------------- models that do not fit one GPU

def enable_grad_ckpt(net):
    """Activation checkpointing: each transformer block keeps only its input and is recomputed in backward.
    Non-reentrant, so gradients reach LoRA weights without enable_input_require_grads()."""
    hf = net.get_base_model() if hasattr(net, "peft_config") else net  # with LoRA: the HF model inside peft's
    enable = getattr(hf, "activation_checkpointing_enable", None)  # transformers >= 5.2x; older: the old name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard(net, device, bf16=None):
    """FSDP2: shard each transformer block (the classes HF lists in `_no_split_modules`), then the root, over all
    ranks. A block's full weights exist only while it runs; gradients are reduce-scattered (averaged) by FSDP.
    With bf16 (default: on GPUs) blocks compute in bf16 and gradients are reduced in fp32; parameters keep
    their dtype."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    ensure_process_group(device)
    root = net.get_base_model() if hasattr(net, "peft_config") else net  # peft's wrapper stays a plain module
    blocks = set(getattr(root, "_no_split_modules", None) or ())
    if not blocks:
        raise modellib.ModelError(f"--fsdp: {type(root).__name__} does not name its transformer blocks (_no_split_modules)")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    bf16 = device.type == "cuda" if bf16 is None else bf16
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if bf16 else MixedPrecisionPolicy()
    for m in root.modules():
        if type(m).__name__ in blocks:
            fully_shard(m, mesh=mesh, mp_policy=mp)
    fully_shard(root, mesh=mesh, mp_policy=mp)  # embeddings, final norm, LM head; moves the shards to `device`
    # FSDP fixes each group's gradient dtypes at the first forward, from the parameters that require grad then.
    # peft's disable_adapter() (the reference pass) turns LoRA's requires_grad off, and a replayed first batch
    # starts with that pass; so make the first forward now (one token, every rank), with the adapters on.
    with torch.no_grad():
        root(input_ids=torch.zeros((1, 1), dtype=torch.long, device=device))
    root.reshard()  # the root keeps its gathered weights after a forward: register the shards again (the optimiser's)


def ensure_process_group(device):
    """FSDP needs a process group even in a plain `python train.py --fsdp` (one process, one GPU)."""
    if not dist.is_initialized():
        backend = "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)


def shared_coin(args, step, i):
    """Under FSDP every forward is a collective, so every rank must make the same sequence of calls: whether
    micro-batch i of this step is replayed and its temperature come from a generator seeded by (seed, step, i),
    the same on all ranks and stateless (resume needs nothing saved). The samples still differ per rank.
    None (use the rank's own stream) without FSDP."""
    return np.random.default_rng([args.seed % 2**32, step, i]) if args.fsdp else None


def replay_ready(args, buffer):
    """The buffer holds enough items to replay (--replay-min-items, at least one); under FSDP, on every rank
    (buffers differ between ranks)."""
    ready = buffer is not None and len(buffer) >= max(1, args.replay_min_items)
    if args.fsdp and buffer is not None:
        ready = on_every_rank(ready)
    return ready


def on_every_rank(flag):
    t = torch.tensor([float(flag)], device="cuda" if "nccl" in dist.get_backend() else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def fsdp_average_and_clip(params, log_z, max_norm):
    """FSDP has already averaged the policy's (sharded, DTensor) gradients; logZ is a plain tensor on every rank,
    so only its gradient is averaged here. Clipping uses the norm over both kinds: the sharded part's norm is
    a DTensor whose full_tensor() sums the squares over the shards."""
    from torch.distributed.tensor import DTensor
    average_across_ranks([log_z.grad if log_z.grad is not None else torch.zeros_like(log_z)], write_back=[log_z])
    grads = [p.grad for p in params if p.grad is not None]
    norms = []
    for kind in ([g for g in grads if isinstance(g, DTensor)], [g for g in grads if not isinstance(g, DTensor)]):
        if kind:
            norm = torch.nn.utils.get_total_norm(kind)
            norms.append((norm.full_tensor() if isinstance(norm, DTensor) else norm).float().to(log_z.device))
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # as clip_grad_norm_ does
    for g in grads:
        g.mul_(coef)
    return total


def policy_and_log_z(policy, log_z):
    """One module holding every parameter the optimiser steps, so its state dict can name them all."""
    both = torch.nn.Module()
    both.policy, both.log_z = policy.model, log_z
    return both


def fsdp_full_states(args, policy, log_z, optimizer):
    """Gather the full weights (only the trainable ones with LoRA) and optimiser state onto rank 0's CPU.
    A collective: every rank calls it; the other ranks get empty dicts."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(policy.model, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=args.lora))
    return weights, get_optimizer_state_dict(policy_and_log_z(policy, log_z), optimizer, options=full)


def load_optimizer(args, policy, log_z, optimizer, saved):
    """Restore the optimiser; under FSDP from the full state in the checkpoint, each rank keeping its shard."""
    if not args.fsdp:
        return optimizer.load_state_dict(saved)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
    set_optimizer_state_dict(policy_and_log_z(policy, log_z), optimizer, saved,
                             options=StateDictOptions(full_state_dict=True))


# ----------------------------------------------------------------------------- sample.py: conditions over the ranks

def my_share(items):
    """This rank's part of a list (every world-th item from its rank on): the conditions sample.py measures here."""
    if not (dist.is_available() and dist.is_initialized()):
        return list(items)
    return list(items)[dist.get_rank()::dist.get_world_size()]


def gather_to_first(obj):
    """Every rank's `obj` as a list on rank 0 (in rank order), None elsewhere; [obj] in a single process."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out)
    return out
