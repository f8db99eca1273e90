"""
Fine-tune a causal language model as a GFlowNet (METHOD.md §5): it learns to sample sequences in proportion to
R(x) = P_ref(x)^kappa * exp(lambda * S(x)). Defaults are the paper's SMILES settings but for the schedules in OURS.

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
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import checks
import conditions
import conventions
import losses
import model as modellib
import oracle
import rewards
import rl_losses
from batches import estimate_log_z, get_batch, linear, score_rows, scored, to_items
from checkpoint import (load_rank_state, non_finite_loss, resume_args, save_checkpoint, stop_on_ctrl_c,
                        stop_requested)
from checkpoint import MEASURE_ONLY, RUN_ONLY, STOP, find_checkpoint, load_state  # noqa: F401 (sample.py, tests)
from distributed import (average_across_ranks, enable_grad_ckpt, fsdp_average_and_clip, load_optimizer,
                         setup_distributed, shard, shared_coin)
from replay import make_buffer
from tracking import (eval_due, evaluate, format_fidelity, log_step, report_fidelity, save_curves, trackers,
                      tracking_problem)

# the paper's optimisation settings (SMILES), used for every flag left unset that the task's defaults do not set
PAPER_DEFAULTS = dict(steps=5000, batch_size=32, grad_accum=4, lr=1e-4)
# how the defaults reach the target (RESULTS.md, "Reach the target"), the same for every method: RapTB's eta goes to 0
# over the first half of the run (so the second half trains TB, whose fixed point is R/Z, while the first keeps the
# dense early credit), and the learning rate follows a cosine to 0. --paper restores the paper's constant eta and lr.
OURS = dict(eta_end=0.0, eta_anneal=0.5, lr_schedule="cosine")
PAPER = dict(eta_end=None, eta_anneal=1.0, lr_schedule="constant")  # eta_end None: --eta throughout


def before_flags(saved):
    """A checkpoint written before these flags existed was trained without them: resume it that way."""
    return dict(eta_end=saved.get("eta", 0.25), absorb_end=1.0, eta_anneal=1.0, lr_schedule="constant", no_smiles_mask=True)


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    # task and model
    a("--task", default="smiles", help="smiles, expr24, or your own: my_module:score, path/to/file.py:MyTask")
    a("--charset", default=None, help="your own task: the characters a token may use (default: the task's, or any)")
    a("--model", default=None, help="hub name or local folder (default: the task's; 'prior' is the embedded SMILES GPT-2)")
    a("--lora", action="store_true", help="train LoRA adapters (r=16, alpha=16, dropout 0.1) instead of all weights")
    a("--trust-remote-code", action="store_true")
    a("--prompt", default="", help="text before the generated part (the embedded prior uses BOS only); with "
      "conditions, before each condition's text")
    a("--prompts", default=None, help="a file of prompts, one per line, to train on: each is a condition (METHOD.md "
      "§11); your own score function gets them if it takes a `prompts` argument (TRL's convention)")
    a("--heldout-prompts", default=None, help="with --prompts: prompts never trained on, measured beside them")
    a("--scaffold", default=rewards.PAPER_SCAFFOLD, help="SMILES with one '*' to fill; '' for whole molecules")
    a("--scaffolds", default=None, help="a file of scaffolds (one SMILES with one '*' per line, a tab and 'heldout' "
      "marking held-out ones): each is a condition (METHOD.md §11.5; data/scaffolds.tsv ships a MOSES set)")
    a("--attach", default="graph", choices=["graph", "string"],
      help="join the side chain to the scaffold on the molecular graph, or paste the string as the paper does")
    a("--no-smiles-mask", action="store_true", help="sample and train without the SMILES syntax "
      "mask (grammar.py), which removes most invalid outputs (each costs about lambda nats of KL); RDKit judges validity")
    a("--min-len", type=int, default=None, help="L_min: stop is masked before this many generated tokens (task default)")
    a("--max-len", type=int, default=None, help="L_max: stop is forced after this many generated tokens (task default)")
    a("--kappa", type=float, default=1.0, help="weight of log P_ref in log R")
    a("--lam", type=float, default=50.0, help="lambda_r: weight of the task score S in log R")
    # objective
    a("--loss", default="raptb", choices=sorted(losses.LOSSES), help="the objective; oracle: maximum likelihood on "
      "exact samples of p* (a task that enumerates its target), the ceiling every method is measured against")
    a("--eta", type=float, default=0.25, help="weight of RapTB's rooted prefix term (the paper's 0.25) at the start")
    a("--eta-end", type=float, default=None, help="eta at the end of --eta-anneal (default 0: absorbed targets bias "
      "RapTB's fixed point away from R/Z, METHOD.md §3.3; --paper: eta throughout)")
    a("--absorb-end", type=float, default=1.0, help="absorption strength at the end of --eta-anneal (1: the paper's "
      "absorbed targets throughout; 0: RapTB without absorption, whose fixed point is R/Z)")
    a("--eta-anneal", type=float, default=None, help="fraction of the run over which eta and the absorption move to their "
      "end values, then held (default 0.5, so the rest trains an unbiased objective; --paper 1)")
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
    # the RL baselines (rloo, grpo, dpg; METHOD.md §9): on-policy at temperature 1, no replay
    a("--grpo-std-norm", action=argparse.BooleanOptionalAction, default=True, help="grpo: advantages (S - mean) / "
      "(std + 1e-4) and a per-sequence mean over actions, as practitioners run it; --no-grpo-std-norm is Dr. GRPO "
      "(S - mean and a constant normaliser: no length or difficulty weighting, Liu et al. 2025)")
    a("--grpo-clip", type=float, default=0.2, help="grpo: the ratio is clipped to [1 - eps, 1 + eps] (PPO's 0.2)")
    a("--grpo-beta", type=float, default=None, help="grpo: weight of the per-action k3 KL penalty to the reference "
      "(default kappa / lambda, the weight of KL(q || P_ref) in the target's objective; TRL's usual 0.04)")
    a("--grpo-epochs", type=int, default=1, help="grpo: optimiser steps on each sampled batch (q_old fixed); "
      "more reuse each reward call, 1 is on-policy and leaves the clip inert")
    # exploration and replay
    a("--replay", default=None, choices=["none", "rp", "prt", "subm"],
      help="default: subm for the GFlowNet losses; none for rloo, grpo and dpg, whose gradients need on-policy samples")
    a("--buffer-size", type=int, default=200)
    a("--p-replay-start", type=float, default=0.5)
    a("--p-replay-end", type=float, default=0.25)
    a("--temp-prob", type=float, default=None, help="probability of a tempered on-policy batch "
      "(default 0.666; 0 for rloo, grpo and dpg, which must sample at temperature 1)")
    a("--t-lo-start", type=float, default=0.8)
    a("--t-lo-end", type=float, default=1.0)
    a("--t-hi-start", type=float, default=1.5)
    a("--t-hi-end", type=float, default=1.0)
    # optimisation
    # these four default to the task's choice (Expr24: see Expr24Task.defaults), else the paper's (PAPER_DEFAULTS)
    a("--steps", type=int, default=None, help="optimiser steps (paper: 5000)")
    a("--batch-size", type=int, default=None, help="sequences per batch (paper: 32)")
    a("--grad-accum", type=int, default=None, help="batches per optimiser step (paper: 4)")
    a("--lr", type=float, default=None, help="learning rate of the network (paper: 1e-4)")
    a("--lr-logz", type=float, default=0.1, help="logZ's own learning rate (not stated in the paper)")
    a("--lr-schedule", default=None, choices=["constant", "cosine"], help="both learning rates over the run: cosine to "
      "0 (the default: the late steps average out sampling noise, which sets the last tenths of a nat) or the "
      "paper's constant")
    a("--paper", action="store_true", help="the paper's settings for every flag left unset: constant eta and learning "
      "rate (the defaults differ only there; see OURS and PAPER at the top of train.py; --conventions authors "
      "implies them)")
    a("--log-z", dest="log_z_mode", default=None, choices=["scalar", "head", "batch"],
      help="logZ: one learned scalar (default for a single prompt); head: logZ(c) learned from the prompt's last "
      "hidden state (default with conditions); batch: no learned logZ, the mean of log R - log q over each "
      "condition's k samples (VarGrad), which is log Z(c) - KL(q||p*) in expectation, so biased low while q is "
      "far from p* (METHOD.md §11.2)")
    a("--samples-per-prompt", type=int, default=None, help="k: each batch holds batch-size / k conditions x k "
      "samples (default: the task's, else the whole batch); --log-z batch needs k >= 2 to compare samples")
    a("--log-z-init", type=conventions.log_z_init, default=None,
      help="initial logZ, or 'estimate' (default): the importance-sampling estimate log mean exp(log R - log q) of one batch")
    a("--weight-decay", type=float, default=0.01)
    a("--grad-clip", type=float, default=0.5, help="clip the global gradient norm to this (the paper's 0.5)")
    a("--seed", type=int, default=0)
    # run
    a("--out", default="out")
    a("--ckpt-every", type=int, default=250)
    a("--resume", action="store_true", help="continue from --out/latest with its saved settings")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    a("--eval-every", type=int, default=None, help="measure the distance to the target every N steps, at the start "
      "and at the end (METHOD.md §8; default: 4 times per run; 0: never)")
    a("--eval-exact", action="store_true", help="measure exactly at every evaluation, not only the last (Expr24: "
      "one pass of the policy over all 113,662 solutions, about 8 s on one CPU core; for a KL-against-step curve)")
    a("--eval-n", type=int, default=256, help="policy samples (and as many reference samples) per measurement")
    a("--eval-n-final", type=int, default=1000, help="samples for the measurement at the end: at 256 + 256 a few "
      "invalid samples decide the estimate and its interval covers the truth about half the time (RESULTS.md)")
    a("--eval-prompts", type=int, default=32, help="with conditions: the prompts of each split measured (spread "
      "over the split, the same each time; 0: all), to keep a measurement to seconds")
    a("--wandb", default=None, metavar="PROJECT", help="also log metrics.jsonl's scalars to this Weights & Biases "
      "project (pip install wandb; WANDB_MODE=offline needs no account); metrics.jsonl stays the record")
    a("--tensorboard", action="store_true", help="also write them as TensorBoard events to OUT/tensorboard "
      "(pip install tensorboard)")
    # models that do not fit one GPU
    a("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over the ranks (FSDP2)")
    a("--grad-ckpt", action="store_true", help="activation checkpointing: keep block inputs only, recompute in backward")
    conventions.add_arguments(p)
    return p


def get_args(argv=None):
    p = make_parser()
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line, not argparse's screenful of usage
    args = p.parse_args(argv)
    check_args(p, args, conventions.explicit_flags(make_parser, argv, vars(args)))
    return args


def check_args(p, args, explicit=()):
    try:
        task = build_task(args)  # a user's task is imported here, so a broken one fails before any work
    except rewards.TaskError as e:
        p.exit(2, f"error: {e}\n")
    for key, value in (PAPER if args.paper or args.conventions == "authors" else OURS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, value in {**PAPER_DEFAULTS, **task.defaults}.items():  # e.g. SMILES: the prior, 2..10; Expr24: 3..9
        if getattr(args, key) is None:
            setattr(args, key, value)
    problem = rl_losses.check_args(args)  # the RL baselines' own defaults and limits
    if problem:
        p.error(problem)
    conventions.apply(args, explicit)  # --conventions authors: the authors' settings for the flags not given
    if args.eta_end is None:  # --paper: eta throughout
        args.eta_end = args.eta
    problem = checks.first_problem(args, task, conditions.flag_problem(args, task), conventions.problem(args),
                                   tracking_problem(args), oracle.problem(args, task))
    if problem:
        p.error(problem)


def build_task(args):
    if getattr(args, "scaffolds", None):
        if args.task != "smiles":
            raise rewards.TaskError(f"--scaffolds is for --task smiles, not {args.task!r}")
        import scaffolds
        task = scaffolds.scaffold_task(args.scaffolds, getattr(args, "attach", "graph"))
        return conditions.with_prompt_files(task, getattr(args, "prompts", None), getattr(args, "heldout_prompts", None))
    task = rewards.load_task(args.task, scaffold=args.scaffold, attach=getattr(args, "attach", "graph"),
                             charset=getattr(args, "charset", None),  # getattr: checkpoints older than the flags,
                             smiles_mask=not getattr(args, "no_smiles_mask", True))  # which had no SMILES mask
    task = conventions.task_for(args, task)  # --expr24-target authors: their digits and reward
    return conditions.with_prompt_files(task, getattr(args, "prompts", None), getattr(args, "heldout_prompts", None))


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
    policy = modellib.Policy(net, tokenizer, allowed, args.min_len, args.max_len, args.prompt, reference,
                             state_mask=task.state_mask)  # the task's grammar (SMILES syntax, Expr24), or None
    policy.sync_ranks = args.fsdp  # FSDP: sampling stops when every rank is done (each forward is a collective)
    return policy


def build_buffer(args, task):
    if args.replay == "none":
        return None
    return make_buffer(args.replay, capacity=args.buffer_size, similarity=task.similarity,
                       **conventions.buffer_options(args))


def loss_knobs(args, frac):
    done = min(1.0, frac / args.eta_anneal) if args.eta_anneal > 0 else 1.0  # how far eta and absorption have moved
    return dict(eta=linear(args.eta, args.eta_end, done), absorb=0.0 if args.no_absorb else linear(1.0, args.absorb_end, done),
                gamma=args.gamma, alpha=args.alpha, beta=args.beta, rho=args.rho,
                k_min=round(linear(args.k_min_start, args.k_min_end, frac)), lam=args.subtb_lam,
                eps_absorb=args.eps_absorb, horizon=args.horizon, detach_pterm=not args.no_detach, min_len=args.min_len,
                root=getattr(args, "prefix_root", "lmin"), grpo_clip=args.grpo_clip, grpo_beta=args.grpo_beta,
                grpo_std_norm=args.grpo_std_norm)


def lr_factor(args, frac):
    """The learning rates' multiplier after `frac` of the run; a function of the step alone, so resuming needs no state."""
    return 0.5 * (1 + math.cos(math.pi * frac)) if args.lr_schedule == "cosine" else 1.0


def train_step(args, task, policy, buffer, log_z, optimizer, rng, step):
    """One optimiser step over grad_accum batches; returns the step's metrics."""
    frac = conventions.schedule_frac(args, step)
    for group, base in zip(optimizer.param_groups, (args.lr, args.lr_logz)):
        group["lr"] = base * lr_factor(args, step / args.steps)  # the last step keeps a small, non-zero rate
    optimizer.zero_grad(set_to_none=True)
    rows, kept, cpu_start = [], [], time.process_time()
    conditional = isinstance(policy, conditions.ConditionalPolicy)
    for i in range(args.grad_accum):
        coin, knobs = shared_coin(args, step, i), loss_knobs(args, frac)
        rows.append(conditions.micro_batch(args, task, policy, buffer, log_z, rng, frac, coin, knobs) if conditional
                    else micro_batch(args, task, policy, buffer, log_z, rng, frac, coin, knobs, kept))
    grad_norm = optimizer_step(args, optimizer, log_z)
    inner_epochs(args, policy, log_z, optimizer, kept, frac)
    metrics = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    metrics = dict(zip(metrics, average_across_ranks([torch.tensor(list(metrics.values()), dtype=torch.float64)])[0].tolist()))
    if args.loss == "dpg":  # its running Z estimate rides in log_z, which every checkpoint saves
        rl_losses.update_running_log_z(log_z, metrics["dpg_weight_mean"], step)
    scale = len(rows) * (dist.get_world_size() if dist.is_initialized() else 1)  # per step over all ranks, not means
    metrics.update({k: metrics[k] * scale for k in ("objects_scored", "prefixes_scored")})
    log_z_value = metrics.pop("log_z") if "log_z" in metrics else log_z.item()  # with conditions: the batch's mean
    knobs = loss_knobs(args, frac)
    return dict(step=step + 1, **metrics, log_z=log_z_value, grad_norm=grad_norm.item(), k_min=knobs["k_min"],
                eta=knobs["eta"], lr=optimizer.param_groups[0]["lr"], cpu_seconds=time.process_time() - cpu_start)


def micro_batch(args, task, policy, buffer, log_z, rng, frac, coin, knobs, kept):
    """One batch: draw it, score it, loss and backward, refresh the buffer; returns its metrics. GRPO's batches are
    kept in `kept` for its inner epochs, with q_old = this pass."""
    tokens, lengths, source, *items = get_batch(args, task, policy, buffer, rng, frac, coin)
    log_r, u, texts, final, log_ref, scores = score_rows(args, task, policy, tokens, lengths, *items)
    log_pf, log_pterm = conventions.log_probs(args, policy, tokens, lengths)
    rl = rl_losses.batch_knobs(args.loss, policy, tokens, lengths, final)  # {} for the GFlowNet losses
    loss, stats = losses.compute_loss(args.loss, log_pf, log_pterm, log_r, u, lengths, log_z, **knobs, **rl)
    (loss / args.grad_accum).backward()
    if args.loss == "grpo" and args.grpo_epochs > 1:
        kept.append((tokens, lengths, log_r, u, dict(rl, old_log_pf=log_pf.detach(), old_log_pterm=log_pterm.detach())))
    if source == "policy" and buffer is not None:
        items = to_items(task, tokens, lengths, texts, final, log_ref, scores)
        buffer.add(conventions.buffer_items(args, items, scores, log_r, lengths))
    valid = torch.tensor([task.is_valid(t) for t in texts], dtype=torch.float)
    return dict(loss=loss.item(), reward=final.mean().item(), validity=valid.mean().item(),
                length=lengths.float().mean().item(), replay=float(source == "replay"),
                **scored(source, lengths), log_pstop_final=log_pterm.detach().gather(1, lengths[:, None]).mean().item(),
                **{k: float(v) for k, v in stats.items()})


def inner_epochs(args, policy, log_z, optimizer, batches, frac):
    """GRPO's epochs after the first: the loss again on the same stored batches (q_old fixed), one more step each."""
    for _ in range(1, args.grpo_epochs if args.loss == "grpo" else 1):
        optimizer.zero_grad(set_to_none=True)
        for tokens, lengths, log_r, u, rl in batches:
            log_pf, log_pterm = conventions.log_probs(args, policy, tokens, lengths)
            loss, _ = losses.compute_loss(args.loss, log_pf, log_pterm, log_r, u, lengths, log_z, **loss_knobs(args, frac), **rl)
            (loss / args.grad_accum).backward()
        optimizer_step(args, optimizer, log_z)


def optimizer_step(args, optimizer, log_z):
    """Average the gradients over ranks, clip them (logZ included), step; returns the norm before clipping."""
    params = [p for g in optimizer.param_groups for p in g["params"]]
    if args.fsdp:
        grad_norm = fsdp_average_and_clip(params, log_z, args.grad_clip)
    else:
        average_across_ranks([p.grad if p.grad is not None else torch.zeros_like(p) for p in params], write_back=params)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
    optimizer.step()
    return grad_norm


# ----------------------------------------------------------------------------- main

def run(args):
    rank, world = setup_distributed(args)
    ckpt, state = None, None
    if args.resume:
        args, ckpt, state = resume_args(args, get_args, before_flags)
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
            modellib.build_scratch_model(args.model, sorted(task.charset), warmup_texts=texts,
                                         **getattr(task, "scratch_model", {}))  # e.g. Expr24's width and depth
        if world > 1:
            dist.barrier()
    torch.manual_seed(args.seed)  # the same starting weights (and LoRA init) on every rank ...
    policy = build_policy(args, task, ckpt)
    conditional = conditions.runs_conditional(args, task)  # a task with conditions, or --log-z head|batch
    if conditional:
        task, policy, buffer, (log_z, z_params) = conditions.build(args, task, policy)
    random.seed(args.seed + rank), torch.manual_seed(args.seed + rank)  # ... but each rank its own samples
    rng = np.random.default_rng(args.seed + rank)
    if not conditional:
        buffer = build_buffer(args, task)
        log_z = conventions.make_log_z(args, policy.device)
        z_params = [log_z]
    optimizer = conventions.make_optimizer(args, [p for p in policy.model.parameters() if p.requires_grad], z_params)
    step = 0
    if state is not None:
        step = state["step"]
        with torch.no_grad():
            log_z.load_state_dict(state["log_z"]) if isinstance(log_z, torch.nn.Module) else log_z.copy_(state["log_z"])
        load_optimizer(args, policy, log_z, optimizer, state["optimizer"])
        load_rank_state(state["ranks"][rank], buffer, rng)
    elif conditional:
        conditions.init_log_z(args, log_z, task, policy)
    else:
        with torch.no_grad():
            log_z.fill_(args.log_z_init if args.log_z_init is not None else estimate_log_z(args, task, policy))
    started = time.perf_counter()
    log_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0 and step and os.path.exists(log_path):  # drop lines a killed run wrote after its checkpoint
        with open(log_path) as f:
            kept = [line for line in f if line.endswith("\n") and json.loads(line)["step"] <= step]  # a killed
            # run may have left a half-written last line: it has no newline yet
        with open(log_path, "w") as f:
            f.writelines(kept)
    if rank == 0:
        print(f"training {args.model} on {args.task} with {args.loss} + {args.replay} replay on {world} x "
              f"{policy.device}, {sum(p.numel() for p in policy.model.parameters() if p.requires_grad):,} "
              f"trainable parameters; {conventions.describe(args)}")
    with open(log_path, "a" if step else "w") if rank == 0 else contextlib.nullcontext() as log_file, \
            trackers(args, step, enabled=rank == 0) as track, stop_on_ctrl_c():
        if step == 0 and eval_due(args, 0):
            first = evaluate(args, task, policy, log_z, 0)
            if rank == 0:
                log_step(log_file, dict(step=0, **first))
                track(dict(step=0, **first))
                print(format_fidelity(first))
        kl = {}
        bar = tqdm(range(step, args.steps), initial=step, total=args.steps, dynamic_ncols=True, disable=rank != 0)
        for step in bar:
            metrics = train_step(args, task, policy, buffer, log_z, optimizer, rng, step)
            if eval_due(args, metrics["step"]):
                metrics.update(evaluate(args, task, policy, log_z, metrics["step"]))
                kl = dict(KL=f"{metrics['kl_q_target']:.2f}")
            if not math.isfinite(metrics["loss"]):  # one line naming the step and the kept checkpoint
                bar.close()
                raise modellib.ModelError(non_finite_loss(args.out, metrics["step"]))
            if rank == 0:
                log_step(log_file, metrics)
                track(metrics)
            bar.set_postfix(loss=f"{metrics['loss']:.3g}", logZ=f"{metrics['log_z']:.2f}",
                            R=f"{metrics['reward']:.3f}", valid=f"{metrics['validity']:.2f}",
                            len=f"{metrics['length']:.1f}", **kl)
            if stop_requested() and metrics["step"] < args.steps:
                bar.close()
                path = save_checkpoint(args, policy, buffer, log_z, optimizer, rng, metrics["step"])
                if rank == 0:
                    save_curves(args.out)
                    print(f"\ninterrupted: saved {path}; continue with: python train.py --resume --out {args.out}")
                return 130
            if metrics["step"] % args.ckpt_every == 0 and metrics["step"] < args.steps:
                save_checkpoint(args, policy, buffer, log_z, optimizer, rng, metrics["step"])
    path = save_checkpoint(args, policy, buffer, log_z, optimizer, rng, args.steps)
    if rank == 0:
        report_fidelity(log_path, time.perf_counter() - started)
        print(f"done: {path}, curves in {save_curves(args.out) or 'none'}\nsample with: python sample.py {args.out}")
    return 0


def main(argv=None):
    try:
        args = get_args(argv)
    except SystemExit as e:  # argparse has printed the one-line error (or --help)
        return e.code
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
