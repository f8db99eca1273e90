"""
Fine-tune a causal language model as a GFlowNet (SPEC §4): it learns to sample sequences in proportion to
R(x) = P_ref(x)^kappa * exp(lambda * S(x)). Defaults are the paper's SMILES settings.

    python train.py --task smiles                                   # embedded prior, CPU is fine
    python train.py --model Qwen/Qwen2.5-0.5B --lora --prompt "..."   # a hub model with LoRA on a GPU
    python train.py --resume --out out                              # continue exactly where it stopped

Writes to --out: metrics.jsonl (one line per step), ckpt-<step>/ (model or adapter + tokenizer + state.pt),
and `latest`, the name of the newest complete checkpoint.
"""
import argparse
import contextlib
import json
import math
import os
import random
import shutil
import signal
import sys

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import losses
import model as modellib
import rewards
from replay import Item, make_buffer


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # task and model
    a("--task", default="smiles", choices=sorted(rewards.TASKS))
    a("--model", default=None, help="hub name or local folder (default: the task's; 'prior' is the embedded SMILES GPT-2)")
    a("--lora", action="store_true", help="train LoRA adapters (r=16, alpha=16, dropout 0.1) instead of all weights")
    a("--trust-remote-code", action="store_true")
    a("--prompt", default="", help="text before the generated part (the embedded prior uses BOS only)")
    a("--scaffold", default=rewards.PAPER_SCAFFOLD, help="SMILES with one '*' to fill; '' for whole molecules")
    a("--min-len", type=int, default=None, help="L_min: stop is masked before this many generated tokens (task default)")
    a("--max-len", type=int, default=None, help="L_max: stop is forced after this many generated tokens (task default)")
    a("--kappa", type=float, default=1.0, help="weight of log P_ref in log R")
    a("--lam", type=float, default=50.0, help="lambda_r: weight of the task score S in log R")
    # objective
    a("--loss", default="raptb", choices=sorted(losses.LOSSES))
    a("--eta", type=float, default=0.25)
    a("--gamma", type=float, default=0.99)
    a("--alpha", type=float, default=0.5, help="1 = max-only absorbed target, 0 = soft-only")
    a("--beta", type=float, default=5.0)
    a("--rho", type=float, default=0.1)
    a("--k-min-start", type=int, default=5, help="k_min is linear from this ...")
    a("--k-min-end", type=int, default=2, help="... to this over training")
    a("--subtb-lam", type=float, default=1.0, help="window / prefix weight lambda of SubTB and RapTB")
    a("--eps-absorb", type=float, default=1e-6)
    a("--horizon", type=int, default=None)
    a("--no-detach", action="store_true", help="ablation: let the aux term send gradient to log P(stop)")
    a("--no-absorb", action="store_true", help="ablation: RapTB without absorbed targets")
    # exploration and replay
    a("--replay", default="subm", choices=["none", "rp", "prt", "subm"])
    a("--buffer-size", type=int, default=200)
    a("--p-replay-start", type=float, default=0.5)
    a("--p-replay-end", type=float, default=0.25)
    a("--temp-prob", type=float, default=0.666, help="probability of a tempered on-policy batch")
    a("--t-lo-start", type=float, default=0.8)
    a("--t-lo-end", type=float, default=1.0)
    a("--t-hi-start", type=float, default=1.5)
    a("--t-hi-end", type=float, default=1.0)
    # optimisation
    a("--steps", type=int, default=5000)
    a("--batch-size", type=int, default=32)
    a("--grad-accum", type=int, default=4)
    a("--lr", type=float, default=1e-4)
    a("--lr-logz", type=float, default=0.1, help="logZ's own learning rate (not stated in the paper)")
    a("--log-z-init", type=float, default=None,
      help="initial logZ (default: the importance-sampling estimate log mean exp(log R - log q) of one batch)")
    a("--weight-decay", type=float, default=0.01)
    a("--grad-clip", type=float, default=0.5)
    a("--seed", type=int, default=0)
    # run
    a("--out", default="out")
    a("--ckpt-every", type=int, default=250)
    a("--resume", action="store_true", help="continue from --out/latest with its saved settings")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    # models that do not fit one GPU
    a("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over the ranks (FSDP2)")
    a("--grad-ckpt", action="store_true", help="activation checkpointing: keep block inputs only, recompute in backward")
    return p


def get_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)
    check_args(p, args)
    return args


def check_args(p, args):
    defaults = rewards.TASKS[args.task].defaults  # e.g. SMILES: the prior, 2..10 tokens; Expr24: 3..9
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.max_len < args.min_len or args.min_len < 0:
        p.error(f"need 0 <= --min-len <= --max-len (got {args.min_len} and {args.max_len})")
    for name in ("steps", "batch_size", "grad_accum", "buffer_size", "ckpt_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    for name in ("p_replay_start", "p_replay_end", "temp_prob", "alpha", "gamma", "subtb_lam"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1]")
    for name in ("t_lo_start", "t_lo_end", "t_hi_start", "t_hi_end", "lr", "lr_logz", "beta"):
        if not getattr(args, name) > 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if args.eta < 0 or args.rho < 0 or args.weight_decay < 0 or args.grad_clip <= 0:
        p.error("--eta, --rho and --weight-decay must be >= 0 and --grad-clip > 0")


def linear(start, end, frac):
    return start + (end - start) * frac


def build_task(args):
    return rewards.TASKS[args.task](**({"scaffold": args.scaffold} if args.task == "smiles" else {}))


def build_policy(args, task, ckpt=None, with_reference=True):
    """The policy network (from `ckpt` when given) and, for training, the frozen reference of log P_ref:
    with LoRA the same network with adapters disabled, otherwise the starting model `args.model`."""
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" and args.lora else torch.float32
    kw = dict(dtype=dtype, trust_remote_code=args.trust_remote_code)
    reference = None
    if args.lora:
        net, tokenizer = modellib.load_model(args.model, lora=ckpt is None, adapter=ckpt, **kw)
    else:
        net, tokenizer = modellib.load_model(ckpt or args.model, **kw)
        if with_reference:
            reference = modellib.frozen_copy(net if ckpt is None else modellib.load_model(args.model, **kw)[0])
    if args.grad_ckpt:
        enable_grad_ckpt(net)
    for m in (net, reference):
        if m is not None and args.fsdp:
            shard(m, device)
        elif m is not None:
            m.to(device)
    net.train()
    allowed = rewards.allowed_token_ids(tokenizer, task.charset, max_chars=task.max_token_chars)
    if not allowed:
        raise modellib.ModelError(f"no token of {args.model!r}'s vocabulary fits the {args.task} task")
    policy = modellib.Policy(net, tokenizer, allowed, args.min_len, args.max_len, args.prompt, reference)
    policy.sync_ranks = args.fsdp  # FSDP: sampling stops when every rank is done (each forward is a collective)
    return policy


def build_buffer(args):
    if args.replay == "none":
        return None
    return make_buffer(args.replay, capacity=args.buffer_size, similarity="tanimoto" if args.task == "smiles" else "bigram")


def score_batch(args, task, policy, tokens, lengths):
    """log R and its task part u at every prefix ([B, T]), plus each sequence's text and final score."""
    scores = rewards.prefix_scores(task, policy.token_texts, tokens, lengths, args.max_len).to(policy.device)
    log_r, u = rewards.log_reward(policy.log_ref_stop(tokens, lengths).double(), scores, args.kappa, args.lam)
    texts = policy.texts(tokens, lengths)
    final = scores.gather(1, lengths[:, None]).squeeze(1)
    return log_r.float(), u.float(), texts, final


def to_items(task, tokens, lengths, texts, final):
    return [Item(tokens=tuple(row[:tau]), text=task.full(t), key=task.canonical(t), score=float(s),
                 valid=task.is_valid(t), length=tau)
            for row, tau, t, s in zip(tokens.tolist(), lengths.tolist(), texts, final.tolist())]


def from_items(policy, items):
    tokens = torch.full((len(items), policy.max_len), policy.eos, device=policy.device)
    for b, it in enumerate(items):
        tokens[b, :it.length] = torch.tensor(it.tokens, dtype=torch.long)
    return tokens, torch.tensor([it.length for it in items], device=policy.device)


def get_batch(args, task, policy, buffer, rng, frac, coin=None):
    """SPEC §4's mixture: replay with probability p_replay, else on-policy (tempered with prob temp_prob).
    `coin` makes these two choices (default: `rng`); under FSDP it is the same on every rank (shared_coin)."""
    coin = rng if coin is None else coin
    if replay_ready(args, buffer) and coin.random() < linear(args.p_replay_start, args.p_replay_end, frac):
        tokens, lengths = from_items(policy, buffer.sample(args.batch_size, rng))
        return tokens, lengths, "replay"
    temperature = 1.0
    if coin.random() < args.temp_prob:
        temperature = coin.uniform(linear(args.t_lo_start, args.t_lo_end, frac), linear(args.t_hi_start, args.t_hi_end, frac))
    tokens, lengths, _ = policy.sample(args.batch_size, temperature)
    return tokens, lengths, "policy"


def estimate_log_z(args, task, policy):
    """Z = E_q[R(x) / q(x)] for any sampler q, so log-mean-exp(log R - log q) over one on-policy batch estimates
    logZ. Starting there saves the hundreds of steps logZ would otherwise spend climbing at --lr-logz per step
    (about 36 nats on the SMILES task), which at small budgets dominates the whole run, for every TB method."""
    tokens, lengths, log_q = policy.sample(args.batch_size)
    log_r = score_batch(args, task, policy, tokens, lengths)[0]
    log_w = log_r.gather(1, lengths[:, None]).squeeze(1).double() - log_q.sum(1).double()
    estimate = torch.logsumexp(log_w, 0) - math.log(len(log_w))
    return average_across_ranks([estimate.cpu()])[0].item()


def loss_knobs(args, frac):
    return dict(eta=args.eta, gamma=args.gamma, alpha=args.alpha, beta=args.beta, rho=args.rho,
                k_min=round(linear(args.k_min_start, args.k_min_end, frac)), lam=args.subtb_lam,
                eps_absorb=args.eps_absorb, horizon=args.horizon, detach_pterm=not args.no_detach,
                absorb=not args.no_absorb, min_len=args.min_len)


def train_step(args, task, policy, buffer, log_z, optimizer, rng, step):
    """One optimiser step over grad_accum batches; returns the step's metrics."""
    frac = step / max(1, args.steps - 1)
    optimizer.zero_grad(set_to_none=True)
    rows = []
    for i in range(args.grad_accum):
        tokens, lengths, source = get_batch(args, task, policy, buffer, rng, frac, shared_coin(args, step, i))
        log_r, u, texts, final = score_batch(args, task, policy, tokens, lengths)
        log_pf, log_pterm = policy.log_probs(tokens, lengths)
        loss, stats = losses.compute_loss(args.loss, log_pf, log_pterm, log_r, u, lengths, log_z, **loss_knobs(args, frac))
        (loss / args.grad_accum).backward()
        if source == "policy" and buffer is not None:
            buffer.add(to_items(task, tokens, lengths, texts, final))
        valid = torch.tensor([task.is_valid(t) for t in texts], dtype=torch.float)
        rows.append(dict(loss=loss.item(), reward=final.mean().item(), validity=valid.mean().item(),
                         length=lengths.float().mean().item(), replay=float(source == "replay"),
                         log_pstop_final=log_pterm.detach().gather(1, lengths[:, None]).mean().item(),
                         **{k: float(v) for k, v in stats.items()}))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if args.fsdp:
        grad_norm = fsdp_average_and_clip(params, log_z, args.grad_clip)
    else:
        average_across_ranks([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], write_back=params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    metrics = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    metrics = dict(zip(metrics, average_across_ranks([torch.tensor(list(metrics.values()), dtype=torch.float64)])[0].tolist()))
    return dict(step=step + 1, **metrics, log_z=log_z.item(), grad_norm=grad_norm.item(), k_min=loss_knobs(args, frac)["k_min"])


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
    """The buffer has items to replay; under FSDP, on every rank (buffers differ between ranks)."""
    ready = buffer is not None and len(buffer) > 0
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


# ----------------------------------------------------------------------------- checkpoints

def rank_state(buffer, rng):
    """What differs between ranks: random streams and the replay buffer."""
    return dict(buffer=buffer.state_dict() if buffer is not None else None, numpy=rng.bit_generator.state,
                torch=torch.get_rng_state(), python=random.getstate(),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def load_rank_state(s, buffer, rng):
    if buffer is not None:
        buffer.load_state_dict(s["buffer"])
    rng.bit_generator.state = s["numpy"]
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    if s["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def save_checkpoint(args, policy, buffer, log_z, optimizer, rng, step):
    """Rank 0 writes ckpt-<step>/ under a temporary name, renames it into place, then points `latest` at it
    (os.replace is atomic), so a crash at any moment leaves the previous checkpoint intact. Weights and
    optimiser are identical on all ranks; each rank's random streams and buffer are gathered into it."""
    mine = rank_state(buffer, rng)
    ranks = [mine]
    if args.fsdp:
        weights, optimizer_state = fsdp_full_states(args, policy, log_z, optimizer)
    if dist.is_initialized():
        ranks = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, ranks)
        if dist.get_rank() != 0:
            return None
    name = f"ckpt-{step:06d}"
    final, tmp = os.path.join(args.out, name), os.path.join(args.out, f".{name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if args.fsdp:  # a normal HF folder from the gathered weights
        policy.model.save_pretrained(tmp, state_dict=weights)
    else:
        policy.model.save_pretrained(tmp)  # with LoRA: the adapter only
        optimizer_state = optimizer.state_dict()
    policy.tokenizer.save_pretrained(tmp)
    state = dict(step=step, log_z=log_z.detach().cpu(), optimizer=optimizer_state, args=vars(args), ranks=ranks)
    torch.save(state, os.path.join(tmp, "state.pt"))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    with open(os.path.join(args.out, "latest.tmp"), "w") as f:
        f.write(name + "\n")
    os.replace(os.path.join(args.out, "latest.tmp"), os.path.join(args.out, "latest"))
    for old in os.listdir(args.out):  # keep only the newest checkpoint
        if old.startswith("ckpt-") and old != name:
            shutil.rmtree(os.path.join(args.out, old), ignore_errors=True)
    return final


def find_checkpoint(path):
    """A checkpoint folder from a run folder (via `latest`) or a checkpoint folder itself."""
    if os.path.isfile(os.path.join(path, "latest")):
        with open(os.path.join(path, "latest")) as f:
            path = os.path.join(path, f.read().strip())
    if not os.path.isfile(os.path.join(path, "state.pt")):
        raise modellib.ModelError(f"no checkpoint at {path!r} (expected a run folder with `latest` or a ckpt-* folder)")
    return path


def load_state(ckpt):
    try:
        return torch.load(os.path.join(ckpt, "state.pt"), map_location="cpu", weights_only=False)
    except Exception as e:
        raise modellib.ModelError(f"corrupt checkpoint {ckpt!r}: cannot read state.pt ({type(e).__name__})") from None


RUN_ONLY = ("out", "steps", "device", "ckpt_every", "resume", "grad_ckpt")  # what --resume may change


def resume_args(args):
    """Settings come from the checkpoint; only where and how long to run may change. A setting given
    explicitly that contradicts the checkpoint (another --model, another --loss, ...) is an error."""
    ckpt = find_checkpoint(args.out)
    state = load_state(ckpt)
    saved, defaults = state["args"], vars(get_args(["--task", args.task]))
    for key, value in vars(args).items():
        if key not in RUN_ONLY and value != defaults.get(key) and value != saved.get(key):
            raise modellib.ModelError(f"checkpoint {ckpt!r} was trained with --{key.replace('_', '-')} "
                                      f"{saved.get(key)!r}, not {value!r}")
    saved = argparse.Namespace(**{**defaults, **saved, **{k: getattr(args, k) for k in RUN_ONLY}})  # defaults: flags newer than the checkpoint
    return saved, ckpt, state


# ----------------------------------------------------------------------------- main

def log_step(log_file, metrics):
    log_file.write(json.dumps(metrics) + "\n")
    log_file.flush()


def run(args):
    rank, world = setup_distributed(args)
    ckpt, state = None, None
    if args.resume:
        args, ckpt, state = resume_args(args)
        if len(state["ranks"]) != world:
            raise modellib.ModelError(f"checkpoint {ckpt!r} was written by {len(state['ranks'])} processes; "
                                      f"resume it with the same number (got {world})")
    os.makedirs(args.out, exist_ok=True)
    task = build_task(args)
    if args.model is None:  # a task without a pretrained model (Expr24): a tiny one, built and saved once
        args.model = os.path.abspath(os.path.join(args.out, "init"))
        if rank == 0 and not os.path.isdir(args.model):
            torch.manual_seed(args.seed)  # warm-started on random valid objects: a random model is no prior
            texts = task.random_objects(20000, np.random.default_rng(args.seed), args.min_len, args.max_len)
            modellib.build_scratch_model(args.model, sorted(task.charset), warmup_texts=texts)
        if world > 1:
            dist.barrier()
    torch.manual_seed(args.seed)  # the same starting weights (and LoRA init) on every rank ...
    policy = build_policy(args, task, ckpt)
    random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)  # ... but each rank its own samples
    rng = np.random.default_rng(args.seed + rank)
    buffer = build_buffer(args)
    log_z = torch.nn.Parameter(torch.zeros((), device=policy.device))
    optimizer = torch.optim.AdamW([
        dict(params=[p for p in policy.model.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.weight_decay),
        dict(params=[log_z], lr=args.lr_logz, weight_decay=0.0)])
    step = 0
    if state is not None:
        step = state["step"]
        with torch.no_grad():
            log_z.copy_(state["log_z"])
        load_optimizer(args, policy, log_z, optimizer, state["optimizer"])
        load_rank_state(state["ranks"][rank], buffer, rng)
    else:
        with torch.no_grad():
            log_z.fill_(args.log_z_init if args.log_z_init is not None else estimate_log_z(args, task, policy))
    log_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0 and step and os.path.exists(log_path):  # drop lines a killed run wrote after its checkpoint
        with open(log_path) as f:
            kept = [line for line in f if json.loads(line)["step"] <= step]
        with open(log_path, "w") as f:
            f.writelines(kept)
    if rank == 0:
        print(f"training {args.model} on {args.task} with {args.loss} + {args.replay} replay on {world} x "
              f"{policy.device}, {sum(p.numel() for p in policy.model.parameters() if p.requires_grad):,} "
              f"trainable parameters")
    with open(log_path, "a" if step else "w") if rank == 0 else contextlib.nullcontext() as log_file, stop_on_ctrl_c():
        bar = tqdm(range(step, args.steps), initial=step, total=args.steps, dynamic_ncols=True, disable=rank != 0)
        for step in bar:
            metrics = train_step(args, task, policy, buffer, log_z, optimizer, rng, step)
            if not math.isfinite(metrics["loss"]):
                raise FloatingPointError(f"non-finite loss at step {step + 1}: {metrics}")
            if rank == 0:
                log_step(log_file, metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3g}", logZ=f"{metrics['log_z']:.2f}",
                            R=f"{metrics['reward']:.3f}", valid=f"{metrics['validity']:.2f}",
                            len=f"{metrics['length']:.1f}")
            if stop_requested() and metrics["step"] < args.steps:
                bar.close()
                path = save_checkpoint(args, policy, buffer, log_z, optimizer, rng, metrics["step"])
                if rank == 0:
                    print(f"\ninterrupted: saved {path}; continue with: python train.py --resume --out {args.out}")
                return 130
            if metrics["step"] % args.ckpt_every == 0 and metrics["step"] < args.steps:
                save_checkpoint(args, policy, buffer, log_z, optimizer, rng, metrics["step"])
    path = save_checkpoint(args, policy, buffer, log_z, optimizer, rng, args.steps)
    if rank == 0:
        print(f"done: {path}\nsample with: python sample.py {args.out}")
    return 0


def stop_requested():
    """Ctrl-C on any rank stops all of them after the same step."""
    flag = torch.tensor([float(STOP["requested"])])
    if dist.is_initialized():
        flag = flag.to("cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


STOP = {"requested": False}


@contextlib.contextmanager
def stop_on_ctrl_c():
    """First Ctrl-C: finish the current step, checkpoint, exit (so --resume continues exactly).
    Second Ctrl-C: stop at once."""
    def handler(signum, frame):
        if STOP["requested"]:
            raise KeyboardInterrupt
        STOP["requested"] = True
        print("\nCtrl-C: saving a checkpoint after this step (press again to abort without saving)", file=sys.stderr)
    STOP["requested"] = False
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def main(argv=None):
    args = get_args(argv)
    try:
        return run(args)
    except (modellib.ModelError, rewards.TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
