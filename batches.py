"""
Where a training batch comes from and what it is worth (METHOD.md §5): on-policy samples or replayed buffer items,
their log-rewards at every prefix, the buffer entries an on-policy batch becomes, and logZ's starting estimate.
A replayed item carries its reference log-probabilities and prefix scores from when it entered the buffer, so
replaying it skips the reference pass and the task (score_rows).
"""
import math

import numpy as np
import torch

import oracle
import rewards
from distributed import average_across_ranks, replay_ready
from replay import Item


def linear(start, end, frac):
    return start + (end - start) * frac


def score_batch(args, task, policy, tokens, lengths, items=None):
    """log R and its task part u at every prefix ([B, T]), plus each sequence's text and final score.
    `items`: the buffer entries a replayed batch was made from (see score_rows)."""
    return score_rows(args, task, policy, tokens, lengths, items)[:4]


def score_rows(args, task, policy, tokens, lengths, items=None):
    """score_batch's four values, then the two rows it derives them from: log P_ref(s_k T) (float32 [B, T]) and
    the prefix scores S(s_k) (float64 [B, T]). Both are fixed for a sequence (the reference is frozen, the task is
    deterministic), so a replayed batch whose `items` all carry them from when they entered the buffer skips the
    reference pass and the task: the same numbers, to the bit, without the work."""
    cached = cached_rows(args, policy, items)
    if cached is not None:
        log_ref, scores = cached
    else:
        scores = rewards.prefix_scores(task, policy.token_texts, tokens, lengths, args.max_len).to(policy.device)
        log_ref = policy.log_ref_stop(tokens, lengths, raw=getattr(args, "log_probs", "masked") == "raw")
    task_reward = getattr(task, "prefix_log_reward", None)  # a task with its own form of log R (METHOD.md §10)
    log_r, u = (task_reward(log_ref.double(), scores, lengths, args.kappa, args.lam, args.max_len) if task_reward
                else rewards.log_reward(log_ref.double(), scores, args.kappa, args.lam))
    texts = policy.texts(tokens, lengths)
    final = scores.gather(1, lengths[:, None]).squeeze(1)
    return log_r.float(), u.float(), texts, final, log_ref, scores


def cached_rows(args, policy, items):
    """The stored (log_ref, prefix scores) of a replayed batch as [B, T] tensors, or None when some item lacks
    them (made before the cache existed). Under FSDP the reference pass is a collective, so every rank must take
    the same branch: the cache is used only when it covers every rank's batch."""
    if items is None:
        return None
    T = args.max_len + 1
    ok = bool(items) and all(it.log_ref is not None and it.prefix_scores is not None and len(it.log_ref) == T
                             and len(it.prefix_scores) == T for it in items)
    if getattr(args, "fsdp", False):
        ok = average_across_ranks([torch.tensor([float(ok)])])[0].item() == 1.0
    if not ok:
        return None
    log_ref = torch.from_numpy(np.stack([np.asarray(it.log_ref, dtype=np.float32) for it in items]))
    scores = torch.from_numpy(np.stack([np.asarray(it.prefix_scores, dtype=np.float64) for it in items]))
    return log_ref.to(policy.device), scores.to(policy.device)


def scored(source, lengths):
    """The task's cost of a batch: sequences and prefix texts scored (a replayed batch reuses its scores)."""
    fresh = float(source == "policy")
    return dict(objects_scored=fresh * len(lengths), prefixes_scored=fresh * float((lengths + 1).sum()))


def to_items(task, tokens, lengths, texts, final, log_ref=None, scores=None):
    """Buffer entries for an on-policy batch; with the batch's log_ref and prefix-score rows (score_rows), which
    replaying them then reuses."""
    refs = log_ref.detach().float().cpu().numpy() if log_ref is not None else [None] * len(texts)
    rows = scores.detach().double().cpu().numpy() if scores is not None else [None] * len(texts)
    fingerprint = getattr(task, "fingerprint", None)  # optional: the buffer's fingerprint of full(t), from the
    return [Item(tokens=tuple(row[:tau]), text=task.full(t), key=task.canonical(t), score=float(s),  # task's own Mol
                 valid=task.is_valid(t), length=tau, log_ref=ref, prefix_scores=sc,
                 fp=fingerprint(t) if fingerprint is not None else None)
            for row, tau, t, s, ref, sc in zip(tokens.tolist(), lengths.tolist(), texts, final.tolist(), refs, rows)]


def from_items(policy, items):
    rows = [list(it.tokens) + [policy.eos] * (policy.max_len - it.length) for it in items]
    tokens = torch.tensor(rows, dtype=torch.long).reshape(len(items), policy.max_len).to(policy.device)
    return tokens, torch.tensor([it.length for it in items], device=policy.device)


def get_batch(args, task, policy, buffer, rng, frac, coin=None):
    """METHOD.md §5's mixture: replay with probability p_replay, else on-policy (tempered with prob temp_prob); for
    --loss oracle, exact samples of p*. `coin` makes these two choices (default: `rng`); under FSDP it is the same
    on every rank (shared_coin)."""
    coin = rng if coin is None else coin
    if args.loss == "oracle":  # exact samples of the target itself, from the task's enumeration (oracle.py)
        return (*oracle.sample(args, task, policy, args.batch_size, rng), "oracle", None)
    if replay_ready(args, buffer) and coin.random() < linear(args.p_replay_start, args.p_replay_end, frac):
        items = buffer.sample(args.batch_size, rng)
        tokens, lengths = from_items(policy, items)
        return tokens, lengths, "replay", items  # the items: their cached reference and scores (score_rows)
    temperature = 1.0
    if coin.random() < args.temp_prob:
        temperature = coin.uniform(linear(args.t_lo_start, args.t_lo_end, frac), linear(args.t_hi_start, args.t_hi_end, frac))
    tokens, lengths, _ = policy.sample(args.batch_size, temperature)
    return tokens, lengths, "policy", None


def estimate_log_z(args, task, policy):
    """Z = E_q[R(x) / q(x)] for any sampler q, so log-mean-exp(log R - log q) over one on-policy batch estimates
    logZ. Starting there saves the hundreds of steps logZ would otherwise spend climbing at --lr-logz per step
    (about 36 nats on the SMILES task), which at small budgets dominates the whole run, for every TB method.
    One batch, not more: on Expr24 the batch usually holds no solution and logZ starts near 0; starting at the
    exact 44.6 (from 1024 samples) left two seeds with q(solutions) 0.008 and 0.043 against 0.28 from 0 (seed 0), since
    the on-policy batches, nearly all non-solutions, pull logZ back to 0 before the policy has learned anything."""
    tokens, lengths, log_q = policy.sample(args.batch_size)
    log_r = score_batch(args, task, policy, tokens, lengths)[0]
    log_w = log_r.gather(1, lengths[:, None]).squeeze(1).double() - log_q.sum(1).double()
    estimate = torch.logsumexp(log_w, 0) - math.log(len(log_w))
    return average_across_ranks([estimate.cpu()])[0].item()
