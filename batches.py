"""
Where a training batch comes from and what it is worth (METHOD.md §5): on-policy samples or replayed buffer items,
their log-rewards at every prefix, the buffer entries an on-policy batch becomes, and logZ's starting estimate.
A replayed item carries its reference log-probabilities and prefix scores from when it entered the buffer, so
replaying it skips the reference pass and the task (score_rows).

A condition (METHOD.md §11) is a property of a row: a task with conditions gives each row a prompt text, and each
row is scored by its condition's task (`task.given(c)`), read by the policy with its prompt and kept in its
condition's buffer. A task without them has `conditions` None, and every function here takes both alike.
"""
import dataclasses
import math
from typing import NamedTuple, Optional

import numpy as np
import torch

import oracle
import rewards
from distributed import average_across_ranks, replay_ready
from replay import Item


class Batch(NamedTuple):
    tokens: torch.Tensor  # [B, L_max] action ids, EOS past each row's end
    lengths: torch.Tensor  # [B] generated tokens tau
    source: str  # "policy" or "replay"
    known: Optional[tuple] = None  # (log P_ref(s_k T), prefix scores) of its rows when already computed: a
    # replayed batch's from its items' cache, a local-search batch's from its filter
    conditions: Optional[list] = None  # each row's condition (prompt text); None for a task without conditions


def by_row(conditions):
    """The keyword a policy's or a buffer's method takes for rows with conditions (none without them)."""
    return {} if conditions is None else dict(conditions=conditions)


def row_groups(conditions):
    """(condition, row indices) for each distinct condition, in order of first appearance."""
    return [(c, torch.tensor([i for i, x in enumerate(conditions) if x == c])) for c in dict.fromkeys(conditions)]


def row_tasks(task, conditions, n):
    """The task that scores each of n rows: the task itself, or each row's condition's."""
    return [task] * n if conditions is None else [task.given(c) for c in conditions]


def linear(start, end, frac):
    return start + (end - start) * frac


def score_batch(args, task, policy, tokens, lengths, known=None, conditions=None):
    """log R and its task part u at every prefix ([B, T]), plus each sequence's text and final score.
    `known`: the rows' reference log-probs and prefix scores when already computed (see score_rows)."""
    return score_rows(args, task, policy, tokens, lengths, known, conditions)[:4]


def score_rows(args, task, policy, tokens, lengths, known=None, conditions=None):
    """score_batch's four values, then the two rows it derives them from: log P_ref(s_k T) (float32 [B, T]) and
    the prefix scores S(s_k) (float64 [B, T]). Both are fixed for a sequence (the reference is frozen, the task is
    deterministic), so rows whose pair is `known` (a replayed batch's items carry it from when they entered the
    buffer, cached_rows) skip the reference pass and the task: the same numbers, without the work."""
    if known is not None:
        log_ref, scores = known
    else:
        scores = prefix_scores(task, policy, tokens, lengths, conditions).to(policy.device)
        log_ref = policy.log_ref_stop(tokens, lengths, raw=args.log_probs == "raw",
                                      **by_row(conditions))
    task_reward = getattr(task, "prefix_log_reward", None)  # a task with its own form of log R (METHOD.md §10)
    log_r, u = (task_reward(log_ref.double(), scores, lengths, args.kappa, args.lam, args.max_len) if task_reward
                else rewards.log_reward(log_ref.double(), scores, args.kappa, args.lam))
    texts = policy.texts(tokens, lengths)
    final = scores.gather(1, lengths[:, None]).squeeze(1)
    return log_r.float(), u.float(), texts, final, log_ref, scores


def final_scores(task, policy, tokens, lengths, conditions=None):
    """Each row's text and the score S(x) of its finished object alone: no prefixes and no reference pass. It is
    all an oracle batch's log needs, since maximum likelihood reads no reward."""
    texts = policy.texts(tokens, lengths)
    groups = [(task, list(range(len(texts))))] if conditions is None else \
        [(task.given(c), rows.tolist()) for c, rows in row_groups(conditions)]
    final = torch.zeros(len(texts), dtype=torch.float64)
    for t, rows in groups:  # one call per task: --explore-ref's thousands of draws share one or a few
        final[rows] = torch.tensor(t.score_batch([texts[i] for i in rows]), dtype=torch.float64)
    return texts, final.to(policy.device)


def prefix_scores(task, policy, tokens, lengths, conditions=None):
    """rewards.prefix_scores with each row's task, [B, L_max + 1] float64."""
    if conditions is None:
        return rewards.prefix_scores(task, policy.token_texts, tokens, lengths, policy.max_len)
    scores = torch.zeros(len(tokens), policy.max_len + 1, dtype=torch.float64)
    for c, rows in row_groups(conditions):
        scores[rows] = rewards.prefix_scores(task.given(c), policy.token_texts, tokens[rows.to(tokens.device)],
                                             lengths[rows.to(lengths.device)], policy.max_len)
    return scores


def cached_rows(args, policy, items):
    """The stored (log_ref, prefix scores) of a replayed batch as [B, T] tensors, or None when some item lacks
    them (made before the cache existed). Under FSDP the reference pass is a collective, so every rank must take
    the same branch: the cache is used only when it covers every rank's batch."""
    if items is None:
        return None
    T = args.max_len + 1
    ok = bool(items) and all(it.log_ref is not None and it.prefix_scores is not None and len(it.log_ref) == T
                             and len(it.prefix_scores) == T for it in items)
    if args.fsdp:
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


def to_items(task, tokens, lengths, texts, final, log_ref=None, scores=None, conditions=None):
    """Buffer entries for an on-policy batch, each made by its row's task; with the batch's log_ref and prefix-score
    rows (score_rows), which replaying them then reuses. Copied out of torch: an item holding a view of a torch
    tensor keeps its storage, and those small storages, scattered among each step's big transient tensors, kept
    the heap from shrinking (RSS grew 0.55 MB a step with 4,096 uniform draws into the buffer, 0.18 MB copied)."""
    refs = log_ref.detach().float().cpu().numpy().copy() if log_ref is not None else [None] * len(texts)
    rows = scores.detach().double().cpu().numpy().copy() if scores is not None else [None] * len(texts)
    return [make_item(t_, row, tau, t, s, ref, sc) for t_, row, tau, t, s, ref, sc in
            zip(row_tasks(task, conditions, len(texts)), tokens.tolist(), lengths.tolist(), texts, final.tolist(),
                refs, rows)]


def make_item(task, row, tau, text, score, log_ref, prefix_scores):
    fingerprint = getattr(task, "fingerprint", None)  # optional: the buffer's fingerprint of full(t), from the
    return Item(tokens=tuple(row[:tau]), text=task.full(text), key=task.canonical(text), score=float(score),  # Mol
                valid=task.is_valid(text), length=tau, log_ref=log_ref, prefix_scores=prefix_scores,
                fp=fingerprint(text) if fingerprint is not None else None)


def loss_log_probs(args, policy, tokens, lengths, conditions=None):
    """The loss's log_pf and log_pterm (with each row's prompt when the rows have conditions). Raw: read off the
    full-vocabulary log-softmax; with our root the states whose stop the mask forbids keep log q(stop) = -inf, so
    the prefix objectives pass over them as they do under the mask, while the s_0 root uses every state."""
    rows = by_row(conditions)
    if args.log_probs != "raw":
        return policy.log_probs(tokens, lengths, **rows)
    log_pf, log_pterm = policy.log_probs(tokens, lengths, raw=True, **rows)
    if args.prefix_root == "s0":
        return log_pf, log_pterm
    return log_pf, torch.where(policy.stop_allowed(tokens, lengths, **rows), log_pterm, float("-inf"))


def buffer_items(args, items, scores, log_r, lengths):
    """The items an on-policy batch adds to the buffer, with the r(x) and validity of --buffer-reward and
    --buffer-validity: the task's score and validity (ours), the best prefix score, or the sum of the finite
    log R(s_k T) over the proper prefixes k < tau; valid = score > 0."""
    reward, validity = args.buffer_reward, args.buffer_validity
    if reward == "final" and validity == "task":
        return items
    out = []
    for it, row_s, row_r, tau in zip(items, scores.tolist(), log_r.tolist(), lengths.tolist()):
        r = it.score
        if reward == "max-prefix":
            r = max(row_s[:tau + 1])
        elif reward == "prefix-sum":
            r = sum(x for x in row_r[:tau] if math.isfinite(x))
        out.append(dataclasses.replace(it, score=float(r), valid=it.score > 0 if validity == "score" else it.valid))
    return out


def from_items(policy, items):
    rows = [list(it.tokens) + [policy.eos] * (policy.max_len - it.length) for it in items]
    tokens = torch.tensor(rows, dtype=torch.long).reshape(len(items), policy.max_len).to(policy.device)
    return tokens, torch.tensor([it.length for it in items], device=policy.device)


def get_batch(args, task, policy, buffer, rng, frac, coin=None):
    """METHOD.md §5's mixture, a Batch: replay with probability p_replay, else on-policy (tempered with prob
    temp_prob). `coin` makes these two choices (default: `rng`); under FSDP it is the same on every rank
    (shared_coin). With conditions a batch is m = batch_size / k conditions x k rows: m drawn training conditions,
    or m conditions of the buffer x k of their own items."""
    coin, k = rng if coin is None else coin, args.samples_per_prompt
    conditional = getattr(task, "conditions", None) is not None
    if args.loss == "oracle":  # exact samples of the target itself (oracle.py), each row's condition's with conditions
        return exact_batch(args, task, policy, rng, "oracle")
    p_replay = linear(args.p_replay_start, args.p_replay_end, frac)
    if args.replay == "oracle" and coin.random() < p_replay:  # the diagnostic: p*'s own samples in the replay's place
        return exact_batch(args, task, policy, rng, "exact")
    if replay_ready(args, buffer) and coin.random() < p_replay:
        items, conditions = buffer.sample(args.batch_size // k, k, rng) if conditional else \
            (buffer.sample(args.batch_size, rng), None)
        return Batch(*from_items(policy, items), "replay", cached_rows(args, policy, items), conditions)
    temperature = 1.0
    if coin.random() < args.temp_prob:
        temperature = coin.uniform(linear(args.t_lo_start, args.t_lo_end, frac), linear(args.t_hi_start, args.t_hi_end, frac))
    conditions = draw_conditions(args, task, rng) if conditional else None
    tokens, lengths, _ = policy.sample(args.batch_size if conditions is None else conditions, temperature,
                                       epsilon=args.epsilon)
    batch = Batch(tokens, lengths, "policy", None, conditions)
    return local_search(args, task, policy, batch, temperature) if args.local_search else batch


def exact_batch(args, task, policy, rng, source):
    """A batch of exact samples of p* (oracle.py), each row's condition's with conditions."""
    conditions = draw_conditions(args, task, rng) if getattr(task, "conditions", None) is not None else None
    tokens, lengths = oracle.sample(args, task, policy, args.batch_size, rng) if conditions is None else \
        oracle.sample_conditions(args, task, policy, conditions, rng)
    return Batch(tokens, lengths, source, None, conditions)


def local_search(args, task, policy, batch, temperature):
    """One round of local search in the prefix tree (Kim et al., ICLR 2024): each row backs up --local-search
    tokens, the policy (at the batch's temperature and --epsilon) regrows the rest, and the regrown object replaces
    the row where its log R is at least as high (their deterministic filter)."""
    tokens, lengths, conds = batch.tokens, batch.lengths, batch.conditions
    cut = (lengths - args.local_search).clamp(min=0)
    new_tokens, new_lengths = tokens.clone(), lengths.clone()
    for c in cut.unique().tolist():
        rows = (cut == c).nonzero().squeeze(1)
        who = len(rows) if conds is None else [conds[i] for i in rows.tolist()]
        t, l, _ = policy.sample(who, temperature, epsilon=args.epsilon, prefix=tokens[rows, :c])
        new_tokens[rows], new_lengths[rows] = t, l
    log_r, _, _, _, log_ref, scores = score_rows(args, task, policy, tokens, lengths, None, conds)
    new_log_r, _, _, _, new_log_ref, new_scores = score_rows(args, task, policy, new_tokens, new_lengths, None, conds)
    better = new_log_r.gather(1, new_lengths[:, None]) >= log_r.gather(1, lengths[:, None])  # log R(x) of each, [B, 1]
    known = (torch.where(better, new_log_ref, log_ref), torch.where(better, new_scores, scores))  # not scored again
    return batch._replace(tokens=torch.where(better, new_tokens, tokens),
                          lengths=torch.where(better[:, 0], new_lengths, lengths), known=known)


def explore_draws(args, task, policy, conditions=None):
    """--explore-ref N: N objects drawn from the reference P_ref (with conditions, the batch's conditions in turn),
    scored, as buffer items. They enter no loss, so no objective's fixed point moves; they only reach the buffer,
    where replay trains on them off-policy, and the seen logZ. The reference keeps drawing what a narrowed policy no
    longer does. Only the draws that can enter the buffer or the seen sum (a positive score, or past the buffer's
    validity gate) are scored at every prefix and passed through the reference; on a sparse target the others, nearly
    all, cost their sampling and one final score. With --explore-from uniform the draws come from the masked uniform
    policy U instead, which needs no network pass. Returns the items, their rows for the seen logZ (conditions,
    (tokens, lengths, log R, log P_ref)), every draw's condition (--log-z ref's count) and the rows' log U(x) (None
    for reference draws, whose proposal is P_ref itself)."""
    who = args.explore_ref if conditions is None else [conditions[i % len(conditions)] for i in range(args.explore_ref)]
    every = None if conditions is None else who  # each draw's condition
    uniform = args.explore_from == "uniform"
    with torch.no_grad():
        tokens, lengths, log_u = policy.sample(who, reference=not uniform, uniform=uniform)
        texts, final = final_scores(task, policy, tokens, lengths, every)
        keep = [True] * len(texts) if not args.replay_valid_only else (final > 0).tolist()
        if args.replay_valid_only and args.buffer_validity != "score":
            keep = [k or t.is_valid(x) for k, t, x in zip(keep, row_tasks(task, every, len(texts)), texts)]
        idx = torch.tensor([i for i, k in enumerate(keep) if k], dtype=torch.long, device=tokens.device)
        rows = None if every is None else [every[i] for i in idx.tolist()]
        tokens, lengths = tokens[idx], lengths[idx]
        log_u = log_u[idx].sum(1).double() if uniform else None
        if not len(idx):  # nothing to score: empty rows of the right widths
            T = tokens.shape[1] + 1
            return [], rows, (tokens, lengths, torch.zeros(0, T), torch.zeros(0, T)), every, log_u
        log_r, _, texts, final, log_ref, scores = score_rows(args, task, policy, tokens, lengths, None, rows)
    items = to_items(task, tokens, lengths, texts, final, log_ref, scores, rows)
    return buffer_items(args, items, scores, log_r, lengths), rows, (tokens, lengths, log_r, log_ref), every, log_u


def draw_conditions(args, task, rng):
    """m = batch_size / k training conditions (without replacement when the split has enough), k rows each."""
    train = task.conditions["train"]
    m = args.batch_size // args.samples_per_prompt
    picks = rng.choice(len(train), size=m, replace=m > len(train))
    return [train[i] for i in picks for _ in range(args.samples_per_prompt)]


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
