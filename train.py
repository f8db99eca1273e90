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
import ctypes
import ctypes.util
import dataclasses
import math
import os
import random
import sys
import time

if __name__ == "__main__":  # Ctrl-C while torch and transformers import: one line, not a traceback
    import signal
    signal.signal(signal.SIGINT, lambda *_: (print("\ninterrupted (Ctrl-C) while starting; nothing was written",
                                                   file=sys.stderr), os._exit(130)))

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import conditions
import conventions
import losses
import model as modellib
import oracle
import rewards
import rl_losses
from batches import (buffer_items, by_row, estimate_log_z, explore_draws, final_scores, get_batch, linear,
                     loss_log_probs, row_tasks, score_rows, scored, to_items)
from checkpoint import (drop_lines_after, failure, non_finite_loss, restore, resume_due, resume_or_start, run_lock,
                        save_checkpoint, stop_on_ctrl_c, stop_requested)
from distributed import average_across_ranks, enable_grad_ckpt, fsdp_average_and_clip, setup_distributed, shard, shared_coin
from flags import fill_defaults, first_problem, make_parser
from replay import buffer_options, keeps_buffer, make_buffer
from tracking import (eval_due, evaluate, progress, format_fidelity, log_step, report_fidelity, save_curves, trackers,
                      tracking_problem)

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
    fill_defaults(args, task, explicit)
    problem = first_problem(args, task, rl_losses.problem(args), conditions.flag_problem(args, task),
                            conventions.problem(args), tracking_problem(args), oracle.problem(args, task))
    if problem:
        p.error(problem)


def build_task(args):
    if args.scaffolds:
        if args.task != "smiles":
            raise rewards.TaskError(f"--scaffolds is for --task smiles, not {args.task!r}")
        from tasks.smiles import scaffolds
        task = scaffolds.scaffold_task(args.scaffolds, args.attach)
        return conditions.with_prompt_files(task, args.prompts, args.heldout_prompts)
    task = rewards.load_task(args.task, scaffold=args.scaffold, attach=args.attach, charset=args.charset,
                             smiles_mask=not args.no_smiles_mask, score_timeout=args.score_timeout)
    task = conventions.task_for(args, task)  # --expr24-target authors: their digits and reward
    return conditions.with_prompt_files(task, args.prompts, args.heldout_prompts)


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
    if not keeps_buffer(args):
        return None
    return make_buffer(args.replay, capacity=args.buffer_size, similarity=task.similarity,
                       **buffer_options(args))


def loss_knobs(args, frac):
    done = min(1.0, frac / args.eta_anneal) if args.eta_anneal > 0 else 1.0  # how far eta and absorption have moved
    return dict(eta=linear(args.eta, args.eta_end, done), absorb=0.0 if args.no_absorb else linear(1.0, args.absorb_end, done),
                gamma=args.gamma, alpha=args.alpha, beta=args.beta, rho=args.rho,
                k_min=round(linear(args.k_min_start, args.k_min_end, frac)), lam=args.subtb_lam,
                eps_absorb=args.eps_absorb, horizon=args.horizon, detach_pterm=not args.no_detach, min_len=args.min_len,
                root=args.prefix_root, grpo_clip=args.grpo_clip, grpo_beta=args.grpo_beta,
                grpo_std_norm=args.grpo_std_norm, huber=args.huber)


def lr_factor(args, frac):
    """The learning rates' multiplier after `frac` of the run; a function of the step alone, so resuming needs no state."""
    return 0.5 * (1 + math.cos(math.pi * frac)) if args.lr_schedule == "cosine" else 1.0


def make_log_z(args, device):
    """The scalar logZ (a task without conditions), stored in --log-z-dtype."""
    dtype = torch.bfloat16 if args.log_z_dtype == "bfloat16" else torch.float32
    return torch.nn.Parameter(torch.zeros((), device=device, dtype=dtype))


def make_optimizer(args, params, z_params):
    """AdamW with logZ (the scalar, or a logZ head's parameters) in a group of its own. A group with the network's lr
    and weight decay is the same AdamW update as sharing the network's group (AdamW acts per parameter), which is
    where the authors keep it."""
    return torch.optim.AdamW([
        dict(params=params, lr=args.lr, weight_decay=args.weight_decay),
        dict(params=list(z_params), lr=args.lr_logz, weight_decay=args.log_z_weight_decay)])


def schedule_frac(args, step):
    """How far the linear schedules are at `step`: 0 -> 1 over the run, over anneal_span runs when > 1."""
    return step / max(1, args.steps - 1) / args.anneal_span


@dataclasses.dataclass
class Training:
    """What a training step reads and updates: the settings, the task, the policy (with its frozen reference), the
    replay buffer (None without replay), logZ (a scalar; with conditions, a head) and its optimiser, and the
    run's random generator for batches."""
    args: argparse.Namespace
    task: object
    policy: object
    buffer: object
    log_z: torch.nn.Module
    optimizer: torch.optim.Optimizer
    rng: np.random.Generator


def train_step(training, step):
    """One optimiser step over grad_accum micro-batches; returns the step's metrics."""
    args = training.args
    frac = schedule_frac(args, step)
    for group, base in zip(training.optimizer.param_groups, (args.lr, args.lr_logz)):
        group["lr"] = base * lr_factor(args, step / args.steps)  # the last step keeps a small, non-zero rate
    training.optimizer.zero_grad(set_to_none=True)
    knobs, kept, cpu_start = loss_knobs(args, frac), [], time.process_time()
    rows = [micro_batch(training, frac, shared_coin(args, step, i), knobs, kept) for i in range(args.grad_accum)]
    grad_norm = optimizer_step(args, training.optimizer, training.log_z)
    inner_epochs(training, kept, knobs)
    # the step's metrics: the mean over its micro-batches and over the ranks
    metrics = {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]}
    metrics = dict(zip(metrics, average_across_ranks([torch.tensor(list(metrics.values()), dtype=torch.float64)])[0].tolist()))
    if args.loss == "dpg":  # its running Z estimate rides in log_z, which every checkpoint saves
        rl_losses.update_running_log_z(training.log_z, metrics["dpg_weight_mean"], step)
    scale = len(rows) * (dist.get_world_size() if dist.is_initialized() else 1)  # per step over all ranks, not means
    metrics.update({k: metrics[k] * scale for k in ("objects_scored", "prefixes_scored")})
    batch_log_z = metrics.pop("log_z", None)  # with conditions: the batch's mean
    log_z = {} if args.loss in rl_losses.NO_LOG_Z else \
        dict(log_z=training.log_z.item() if batch_log_z is None else batch_log_z)  # none to report for RLOO, GRPO, oracle
    return dict(step=step + 1, **metrics, **log_z, grad_norm=grad_norm.item(),
                k_min=knobs["k_min"], eta=knobs["eta"], lr=training.optimizer.param_groups[0]["lr"],
                cpu_seconds=time.process_time() - cpu_start)


def micro_batch(training, frac, coin, knobs, kept):
    """One batch, with or without conditions: draw it, score it, loss and backward, refresh the buffer; returns its
    metrics. GRPO's batches are kept in `kept` for its inner epochs, with q_old = this pass."""
    args, task, policy = training.args, training.task, training.policy
    # the batch: on-policy samples or replayed items, each row with its condition when the task has them
    batch = get_batch(args, task, policy, training.buffer, training.rng, frac, coin)
    tokens, lengths, conds = batch.tokens, batch.lengths, batch.conditions
    # its reward at every prefix, and the policy's log-probs of every action and stop
    oracle_rows = batch.source == "oracle"  # maximum likelihood reads no reward and no logZ
    if oracle_rows:  # the final scores for the log, without the reference pass
        (texts, final), log_r, u = final_scores(task, policy, tokens, lengths, conds), None, None
    else:
        log_r, u, texts, final, log_ref, scores = score_rows(args, task, policy, tokens, lengths, batch.known, conds)
    log_pf, log_pterm = loss_log_probs(args, policy, tokens, lengths, conds)
    log_z = training.log_z if conds is None or oracle_rows else conditions.row_log_z(
        args, training.log_z, policy, conds, tokens, log_pf, log_pterm, log_r, log_ref, lengths)
    # the loss, through the one entry point of every objective
    rl = {}  # what an RL baseline takes beyond the batch (GRPO's reference pass, each row's group)
    if args.anchor != 1 and not oracle_rows:  # --anchor: the rows of prompts with no solution drawn yet weigh more
        knobs = dict(knobs, row_weight=training.log_z.row_weights(conds, args.anchor).to(log_pf.device))
    if args.loss in rl_losses.LOSSES:
        rl = rl_losses.batch_knobs(args.loss, policy, tokens, lengths, final, conds)
    loss, stats = losses.compute_loss(args.loss, log_pf, log_pterm, log_r, u, lengths, log_z, **knobs, **rl)
    (loss / args.grad_accum).backward()
    if args.loss == "grpo" and args.grpo_epochs > 1:
        kept.append((tokens, lengths, log_r, u, dict(rl, old_log_pf=log_pf.detach(), old_log_pterm=log_pterm.detach())))
    # what the on-policy samples add to the replay buffer
    if batch.source == "policy" and training.buffer is not None:
        items = to_items(task, tokens, lengths, texts, final, log_ref, scores, conds)
        training.buffer.add(buffer_items(args, items, scores, log_r, lengths), **by_row(conds))
    cost = scored(batch.source, lengths)
    if args.explore_ref:  # reference draws that only fill the buffer (and the seen logZ), scored like a batch
        found, rows, scored_rows, drawn, log_u = explore_draws(args, task, policy, conds)
        training.buffer.add(found, **by_row(rows))
        if args.log_z_mode == "seen":
            training.log_z.add(rows, *scored_rows)
        elif args.log_z_mode == "ref":
            training.log_z.add_reference(drawn, rows, *scored_rows, log_proposal=log_u)
        cost = dict(objects_scored=cost["objects_scored"] + args.explore_ref,
                    prefixes_scored=cost["prefixes_scored"] + scored("policy", scored_rows[1])["prefixes_scored"])
    valid = torch.tensor([t.is_valid(x) for t, x in zip(row_tasks(task, conds, len(texts)), texts)], dtype=torch.float)
    return dict(loss=loss.item(), reward=final.mean().item(), validity=valid.mean().item(),
                length=lengths.float().mean().item(), replay=float(batch.source in ("replay", "exact")),
                **cost, log_pstop_final=log_pterm.detach().gather(1, lengths[:, None]).mean().item(),
                **{k: float(v) for k, v in stats.items()},
                **({} if conds is None or oracle_rows else dict(log_z=log_z.detach().mean().item())))


def inner_epochs(training, batches, knobs):
    """GRPO's epochs after the first: the loss again on the same stored batches (q_old fixed), one more step each."""
    args = training.args
    for _ in range(1, args.grpo_epochs if args.loss == "grpo" else 1):
        training.optimizer.zero_grad(set_to_none=True)
        for tokens, lengths, log_r, u, rl in batches:
            log_pf, log_pterm = loss_log_probs(args, training.policy, tokens, lengths)
            loss, _ = losses.compute_loss(args.loss, log_pf, log_pterm, log_r, u, lengths, training.log_z, **knobs, **rl)
            (loss / args.grad_accum).backward()
        optimizer_step(args, training.optimizer, training.log_z)


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

def heap_trimmer():
    """A function that hands the heap's free pages back to the OS (glibc's malloc_trim), or one that does nothing
    where there is none. Each step frees big transient tensors among small objects that live on (the buffer's
    items), and glibc keeps those freed pages: 6,000 steps of Expr24's default peaked at 3.5 GB, trimmed 0.85 GB,
    for 4% more CPU (RESULTS.md, "a step 1.6 times cheaper"); a whole run untrimmed held 6.2 GB."""
    libc = ctypes.util.find_library("c")
    trim = getattr(ctypes.CDLL(libc), "malloc_trim", None) if libc else None
    return (lambda: trim(0)) if trim else (lambda: None)


def run(args, explicit=None):
    """Train; `explicit`: the flags the command line gave, which --resume takes over the saved ones."""
    rank, world = setup_distributed(args)  # first: a rank reads the checkpoint once all have finished the last run
    args, ckpt, state = resume_or_start(args, get_args, explicit)
    if args.resume and not resume_due(ckpt, state, args, rank, world):  # a finished run: nothing to do
        return 0
    task = build_task(args)
    if args.model is None:  # a task without a pretrained model (Expr24): a tiny one, built and saved once
        args.model = os.path.abspath(os.path.join(args.out, "init"))
        if rank == 0:
            modellib.scratch_model_once(args.model, task, args.seed, args.min_len, args.max_len)
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
        log_z = make_log_z(args, policy.device)
        z_params = [log_z]
    optimizer = make_optimizer(args, [p for p in policy.model.parameters() if p.requires_grad], z_params)
    step = state["step"] if state is not None else 0
    if state is not None:
        restore(args, state, rank, policy, log_z, optimizer, buffer, rng)
    elif conditional:
        conditions.init_log_z(args, log_z, task, policy)
    else:
        with torch.no_grad():
            log_z.fill_(args.log_z_init if args.log_z_init is not None else estimate_log_z(args, task, policy))
    training = Training(args, task, policy, buffer, log_z, optimizer, rng)
    started = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)  # run_lock has made it (and removes it if the run fails first) where it can lock
    log_path = os.path.join(args.out, "metrics.jsonl")
    if rank == 0 and step:
        drop_lines_after(log_path, step)
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
                print("start (step 0): " + format_fidelity(first))
        kl = {}
        trim_heap = heap_trimmer()
        with tqdm(initial=step, total=args.steps, dynamic_ncols=True, disable=rank != 0) as bar:
            for step in range(step, args.steps):
                metrics = train_step(training, step)
                if step % 10 == 0:
                    trim_heap()
                bar.update(1)  # after the step: a bar stopped here reads the step the checkpoint holds
                if eval_due(args, metrics["step"]):
                    metrics.update(evaluate(args, task, policy, log_z, metrics["step"]))
                    kl = dict(KL=f"{metrics['kl_q_target']:.2f}")
                if not math.isfinite(metrics["loss"]):  # one line naming the step and the kept checkpoint
                    raise modellib.ModelError(non_finite_loss(args.out, metrics["step"]))
                if rank == 0:
                    log_step(log_file, metrics)
                    track(metrics)
                bar.set_postfix(progress(metrics, kl))
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
        report_fidelity(log_path, time.perf_counter() - started, state["step"] if state else 0)
        print(f"done: {path}, curves in {save_curves(args.out) or 'none'}\nsample with: python sample.py {args.out}")
    return 0


def main(argv=None):
    try:
        args = get_args(argv)
    except SystemExit as e:  # argparse has printed the one-line error (or --help)
        return e.code
    except KeyboardInterrupt:  # while a task or a model's config loads
        print("\ninterrupted (Ctrl-C) before the run started; nothing was written", file=sys.stderr)
        return 130
    try:
        with run_lock(args.out):
            return run(args, conventions.explicit_flags(make_parser, argv, vars(args)))
    except (modellib.ModelError, rewards.TaskError, KeyboardInterrupt, MemoryError, RuntimeError) as e:
        code, line = failure(e, args)  # one line; an unforeseen error is a bug, shown whole
        if code is None:
            raise
        print(line, file=sys.stderr)
        return code
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)  # imported: Ctrl-C is KeyboardInterrupt again
    sys.exit(main())
