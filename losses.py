"""
GFlowNet objectives on the prefix tree of an LLM (METHOD.md §3): TB, modified SubTB, RapTB and the
paper's two ablations AvgPrefixTB and RootSubTBLogZ.

Batch contract (METHOD.md §2), all [B, T] with T = L_max + 1, column k = state s_k after k tokens:
    log_pf[b, k]    log q(y_{k+1} | s_k)   valid for k <  tau_b
    log_pterm[b, k] log q(stop | s_k)      valid for k <= tau_b
    log_r[b, k]     log R(s_k T)           valid for k <= tau_b
    u[b, k]         task-only part of log_r (RapTB's absorbed targets)
    lengths[b]      tau_b (long), log_z a scalar tensor or one value per row [B] (logZ(c_b) of each row's
                    condition, METHOD.md §11).
Columns past tau hold garbage (inf, nan, huge values): every input is passed through torch.where
before any arithmetic, so garbage reaches neither the value nor the gradient (never x * 0).

Everything below is written with one quantity, the prefix residual without logZ
    G_k = sum_{t<k} log_pf[t] + log_pterm[k] - log_r[k]
so that d_TB = logZ + G_tau, METHOD.md's C_k = sum_{t<k} delta_t = G_k - G_0 and every SubTB window
i -> j has residual C_j - C_i = G_j - G_i. G is one cumsum; no loop over positions or windows.

min_len (extension, METHOD.md §1; default 0 = none): with L_min > 0 the stop action is masked at k < L_min, so
log_pterm is -inf there and those prefixes are not terminal objects. The prefix losses then only use
states k >= min_len (SubTB windows start there, RapTB's rooted residuals are rooted at s_min_len).

Every loss returns (loss, stats); loss is float32 (float64 for float64 inputs), stats a dict of
detached 0-d tensors. `compute_loss(name, ...)` is the single entry point the trainer calls; it also reaches the
RL baselines of rl_losses.py (RLOO, GRPO, DPG; METHOD.md §9) and the oracle, maximum likelihood on exact samples of
p* (oracle_loss; its batches come from oracle.py).
"""
import inspect

import torch
import torch.nn.functional as F

import rl_losses


# ----------------------------------------------------------------------------- helpers

def _prepare(*xs):
    """Upcast to a common dtype of at least float32 (bf16 inputs accumulate in float32)."""
    xs = [torch.as_tensor(x, device=xs[0].device) for x in xs]
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def _positions(log_pf, lengths):
    """k = 0..T-1 as [1, T], tau as [B, 1], masks of existing steps (k < tau) and states (k <= tau)."""
    k = torch.arange(log_pf.shape[1], device=log_pf.device)[None, :]
    tau = lengths.to(log_pf.device).long()[:, None]
    return k, tau, k < tau, k <= tau


def _usable(k, state, log_pterm, min_len, root="lmin"):
    """The states that can stop, i.e. are the parent of an object (METHOD.md §1): k >= min_len and the stop not
    masked there by a task's state mask (log_pterm = -inf, e.g. Expr24 after an operator). Only these are
    window ends and rooted prefixes; the others are passed through. root="s0", the authors' convention
    (METHOD.md §10): every state k <= tau, from s_0, which needs log_pterm finite there (raw log-probs)."""
    if root not in ("lmin", "s0"):
        raise ValueError(f"root must be 'lmin' or 's0', not {root!r}")
    return state if root == "s0" else state & (k >= min_len) & (log_pterm > float("-inf"))


def _prefix_residual(log_pf, log_pterm, log_r, step, live):
    """G_k = sum_{t<k} log_pf[t] + log_pterm[k] - log_r[k]; meaningful where `live`, finite everywhere."""
    pf = torch.where(step, log_pf, 0.0)
    prefix_logp = F.pad(pf.cumsum(1)[:, :-1], (1, 0))  # exclusive cumsum: sum_{t<k}
    return prefix_logp + torch.where(live, log_pterm, 0.0) - torch.where(live, log_r, 0.0)


def _per_row(log_z, like, column=True):
    """logZ for each row: a scalar stays a scalar; one value per row [B] (each row's condition, METHOD.md §11) becomes
    a column [B, 1] to add to [B, T] prefix residuals (or stays [B] with column=False)."""
    if log_z.dim() == 0:
        return log_z
    if log_z.shape != like.shape[:1]:
        raise ValueError(f"log_z must be a scalar or one value per row ({like.shape[0]}), got shape {tuple(log_z.shape)}")
    return log_z[:, None] if column else log_z


def _at(x, idx):
    """x[b, idx[b]] for idx [B, 1]."""
    return x.gather(1, idx).squeeze(1)


def _toeplitz_powers(lam, n, like):
    """[n, n] matrix M[t, s] = lam^(s-t) for s > t, else 0. Its rows are shifted windows of the vector
    v = (0, .., 0, lam^1, .., lam^(n-1)) (n zeros): M[t, s] = v[n-1-t+s], one unfold + flip, no pow per entry."""
    d = torch.arange(1, n, dtype=like.dtype, device=like.device)
    v = torch.cat([torch.zeros(n, dtype=like.dtype, device=like.device), lam ** d])
    return v.unfold(0, n, 1).flip(0)


def _tb_residual(log_pf, log_pterm, log_r, log_z, step, state, tau):
    """d_TB = logZ + sum_{k<tau} log_pf[k] + log_pterm[tau] - log_r[tau]."""
    return _per_row(log_z, log_pf, column=False) + _at(_prefix_residual(log_pf, log_pterm, log_r, step, state), tau)


def _penalty(d, huber):
    """The loss of a residual d: d^2 (huber = 0), or Huber's d^2 within |d| <= huber and 2 huber |d| - huber^2 beyond,
    whose gradient is bounded by 2 huber: a row far from balance pulls no harder than one huber off, as every row of
    the oracle pulls with the same unit weight. Both are zero exactly at d = 0, so the fixed point is the same
    (METHOD.md §3.5)."""
    return d ** 2 if huber <= 0 else 2 * F.huber_loss(d, torch.zeros_like(d), reduction="none", delta=huber)


def _weighted(per_row, row_weight):
    """Each row's loss times its weight (--anchor), or as it is without weights."""
    return per_row if row_weight is None else per_row * row_weight.to(per_row.dtype)


def _tb_stats(d_tb, log_pterm, state, tau):
    d = d_tb.detach()
    return {"tb_loss": (d ** 2).mean(), "tb_res_mean": d.mean(), "tb_res_std": d.std(unbiased=False),
            # termination drift diagnostic: log q(stop | s_tau) of the sampled endings
            "log_pterm_tau": _at(torch.where(state, log_pterm.detach(), 0.0), tau).mean()}


def _suffix_targets(u, h, k, alpha, beta, rho, usable=None):
    """Absorbed suffix targets over j in [k, h] (the fused prefix backup, METHOD.md §3):
        u_max[k]  = max_j u[j]                                   (reverse cummax)
        u_soft[k] = 1/beta log sum_j exp(beta u[j] - beta rho (j - k))
                  = (revlogcumsumexp(beta u[j] - beta rho j)[k] + beta rho k) / beta
        u_tgt     = alpha u_max + (1 - alpha) u_soft
    u past h (and at states that cannot stop, when `usable` is given) is replaced by -inf BEFORE the scans, so
    it cannot leak into any target. Returns u_tgt, set to 0 for k > h (where it is never used)."""
    in_h = k <= h if usable is None else (k <= h) & usable
    u, k = torch.where(in_h, u, 0.0), k.to(u.dtype)
    u_max = torch.where(in_h, u, float("-inf")).flip(1).cummax(1).values.flip(1)
    a = torch.where(in_h, beta * u - beta * rho * k, float("-inf"))
    u_soft = (a.flip(1).logcumsumexp(1).flip(1) + beta * rho * k) / beta
    u_tgt = alpha * torch.where(in_h, u_max, 0.0) + (1 - alpha) * torch.where(in_h, u_soft, 0.0)
    return u_tgt


# ----------------------------------------------------------------------------- objectives

def tb_loss(log_pf, log_pterm, log_r, lengths, log_z, huber=0.0, row_weight=None):
    """Trajectory balance: mean_b d_TB^2, d_TB = logZ + sum_{k<tau} log_pf[k] + log_pterm[tau] - log_r[tau]
    (huber > 0: each residual's square replaced by its Huber loss, _penalty, here and in every objective below;
    row_weight [B]: row b's terms weigh row_weight[b], here and below, the normaliser unchanged)."""
    log_pf, log_pterm, log_r, log_z = _prepare(log_pf, log_pterm, log_r, log_z)
    k, tau, step, state = _positions(log_pf, lengths)
    d_tb = _tb_residual(log_pf, log_pterm, log_r, log_z, step, state, tau)
    return _weighted(_penalty(d_tb, huber), row_weight).mean(), _tb_stats(d_tb, log_pterm, state, tau)


def subtb_loss(log_pf, log_pterm, log_r, lengths, lam=1.0, min_len=0, root="lmin", huber=0.0, row_weight=None):
    """Modified SubTB (Hu et al. 2024), no logZ:
        delta_t = log_r[t] + log_pf[t] + log_pterm[t+1] - log_r[t+1] - log_pterm[t],  C_k = sum_{t<k} delta_t
        loss = sum_b sum_{i<j<=tau} lam^(j-i-1) (C_j - C_i)^2 / sum_b sum_{i<j<=tau} lam^(j-i-1)
    (windows run between usable states, _usable: i >= min_len, and both ends able to stop). Neither form below
    loops over windows or builds [B, T, T]:
    - lam = 1: over the n usable states of a row sum_{i<j} (C_j - C_i)^2 = n sum_k (C_k - mean C)^2
      (centred first, exact in float32), with n(n-1)/2 windows. O(T).
    - lam != 1: expand (C_j - C_i)^2 = (sum_{t=i}^{j-1} delta_t)^2. Transitions t <= s lie together in the
      windows i <= t, s < j of usable i, j, of total weight P_t lam^(s-t) Q_s with P_t = sum_{usable i<=t}
      lam^(t-i), Q_s = sum_{usable j>s} lam^(j-s-1) (with every state usable from a on: P_t = sum_{m<=t-a}
      lam^m, Q_s = sum_{m<tau-s} lam^m), so the numerator is
          sum_t P_t Q_t delta_t^2 + 2 sum_{t<s} (P delta)_t lam^(s-t) (Q delta)_s
      and the cross sum is one [B, T] x [T, T] matmul with the Toeplitz matrix lam^(s-t). Only products
      of one-step residuals appear, so it stays accurate in float32 (no cancellation of large C_k).
    root="s0": every window 0 <= i < j <= tau (_usable). huber > 0: every window's residual is built, [B, T, T], and
    its square replaced by its Huber loss (_penalty), which no sum of squares can express."""
    log_pf, log_pterm, log_r = _prepare(log_pf, log_pterm, log_r)
    k, tau, step, state = _positions(log_pf, lengths)
    live = _usable(k, state, log_pterm, min_len, root)
    n = live.sum(1).to(log_pf.dtype)
    if huber > 0:
        g = _prefix_residual(log_pf, log_pterm, log_r, step, live)
        i, j = k[0][:, None], k[0][None, :]
        window = live[:, :, None] & live[:, None, :] & (i < j)
        w = torch.where(window, lam ** (j - i - 1).clamp(min=0).to(g.dtype), 0.0)
        total = (w * _penalty(g[:, None, :] - g[:, :, None], huber)).sum((1, 2))
        weight = w.sum()
    elif lam == 1.0:
        g = _prefix_residual(log_pf, log_pterm, log_r, step, live)  # C_j - C_i = G_j - G_i
        mean = torch.where(live, g, 0.0).sum(1) / n.clamp(min=1)
        centred = torch.where(live, g - mean[:, None], 0.0)
        total = n * (centred ** 2).sum(1)
        weight = (n * (n - 1) / 2).sum()
    else:
        # x = -log F at usable states, 0 elsewhere: any finite value telescopes away between usable states
        x = torch.where(live, log_pterm, 0.0) - torch.where(live, log_r, 0.0)
        delta = torch.where(step, x.roll(-1, 1) - x + torch.where(step, log_pf, 0.0), 0.0)  # t -> t+1, t < tau
        toeplitz = _toeplitz_powers(lam, k.shape[1], delta)
        upper = toeplitz + torch.eye(k.shape[1], dtype=delta.dtype, device=delta.device)  # lam^(s-t), s >= t
        start, end = live.to(delta.dtype), F.pad(live[:, 1:], (0, 1)).to(delta.dtype)
        p_delta = (start @ upper) * delta  # P_t = sum over usable i <= t of lam^(t-i)
        q_delta = (end @ upper.T) * delta  # Q_s = sum over usable j > s of lam^(j-s-1)
        cross = (p_delta @ toeplitz) * q_delta
        total = (p_delta * q_delta).sum(1) + 2 * cross.sum(1)
        weight = (start * (end @ upper.T)).sum()  # sum over usable i < j of lam^(j-i-1)
    loss = _weighted(total, row_weight).sum() / weight.clamp(min=1)  # any window set has an adjacent window (weight 1)
    stats = {"n_windows": (n * (n - 1) / 2).sum().detach(),
             "log_pterm_tau": _at(torch.where(state, log_pterm.detach(), 0.0), tau).mean()}
    return loss, stats


def raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z, *, eta=0.25, gamma=0.99, alpha=0.5, beta=5.0,
               rho=0.1, k_min=2, lam=1.0, eps_absorb=1e-6, horizon=None, detach_pterm=True, absorb=1.0,
               min_len=0, root="lmin", huber=0.0, row_weight=None):
    """Rooted Absorbed Prefix TB (METHOD.md §3):
        loss  = mean_b( d_TB^2 + eta * 1[active_b] * aux_b )
        aux_b = sum_k w_k Cab_k^2 / sum_k w_k over k_min <= k <= h,  w_k = lam^(k - k_min)
        Cab_k = Cbar_k + absorb * A_k gamma^(h-k) (u[k] - u_tgt[k])
        Cbar_k = C_k with log_pterm detached (aux term only; logZ cancels), h = tau or min(tau, K)
        A_k = 1[k_min <= k <= h] 1[|u[k]| <= eps_absorb] (and 1[tau >= K] 1[k < K] when K is set)
    u_tgt from _suffix_targets (u is a constant). A trajectory with no eligible prefix has no aux.
    k_min is clamped to >= min_len + 1: the root s_min_len has Cbar = 0 by construction. Only states that can stop
    (_usable) are prefixes or targets; when a task mask forbids the stop at s_min_len, the root is the row's first
    state that can stop. absorb is the absorption's strength: 1 (or True) the paper's, 0 (or False) the gate off (rooted
    prefixes with raw stop rewards, the no-absorb ablation); in between it scales the absorbed offset, which is how a
    schedule takes RapTB to an objective whose fixed point is R/Z (METHOD.md §3.3).
    root="s0" (the authors' convention, METHOD.md §10): rooted at s_0 over every state, k_min >= 1."""
    log_pf, log_pterm, log_r, u, log_z = _prepare(log_pf, log_pterm, log_r, u, log_z)
    k, tau, step, state = _positions(log_pf, lengths)
    d_tb = _tb_residual(log_pf, log_pterm, log_r, log_z, step, state, tau)

    # 1. rooted residuals Cbar_k = Gbar_k - Gbar_root (log_pterm detached inside the aux term only)
    live = _usable(k, state, log_pterm, min_len, root)
    pterm_aux = log_pterm.detach() if detach_pterm else log_pterm
    g_bar = _prefix_residual(log_pf, pterm_aux, log_r, step, live)
    first = live.long().argmax(1, keepdim=True)  # the first usable state: s_min_len unless a task mask forbids its stop
    c_bar = g_bar - g_bar.gather(1, first)
    # 2. horizon and eligible prefixes (usable ones only)
    h = tau if horizon is None else tau.clamp(max=horizon)
    k_min = max(k_min, (0 if root == "s0" else min_len) + 1)
    eligible = live & (k >= k_min) & (k > first) & (k <= h)
    # 3-5. absorbed targets, gate, Cab
    u = torch.where(state, u.detach(), 0.0)
    gate = eligible & (u.abs() <= eps_absorb) if absorb else torch.zeros_like(eligible)  # absorb = 0: no gate
    if horizon is not None:
        gate = gate & (tau >= horizon) & (k < horizon)
    u_tgt = _suffix_targets(u, h, k, alpha, beta, rho, live)
    decay = gamma ** (h - k).clamp(min=0).to(u.dtype)
    c_ab = c_bar + torch.where(gate, float(absorb) * decay * (u - u_tgt), 0.0)
    # 6. per-trajectory weighted mean; w_k >= 1 at k = k_min, so an active row has sum_k w_k >= 1
    w = torch.where(eligible, lam ** (k - k_min).clamp(min=0).to(u.dtype), 0.0)
    active = eligible.any(1)
    aux = torch.where(eligible, w * _penalty(c_ab, huber), 0.0).sum(1) / w.sum(1).clamp(min=1)
    # 7.
    loss = _weighted(_penalty(d_tb, huber) + eta * torch.where(active, aux, 0.0), row_weight).mean()

    stats = _tb_stats(d_tb, log_pterm, state, tau)
    n_active = active.sum().clamp(min=1)
    stats.update({"aux_loss": (torch.where(active, aux, 0.0).sum() / n_active).detach(),
                  "active_frac": active.float().mean(),
                  "absorbed_frac": gate.sum() / eligible.sum().clamp(min=1),
                  "u_tgt_mean": (torch.where(gate, u_tgt, 0.0).sum() / gate.sum().clamp(min=1)).detach()})
    return loss, stats


def avgprefixtb_loss(log_pf, log_pterm, log_r, lengths, log_z, min_len=0, huber=0.0, row_weight=None):
    """AvgPrefixTB (paper ablation): TB residual at every prefix with its raw stop reward, logZ kept,
        loss = mean_b mean_{min_len <= k <= tau} (logZ + sum_{t<k} log_pf[t] + log_pterm[k] - log_r[k])^2
    i.e. every prefix k = 0..tau (from min_len with a minimum length) counts as a terminal object,
    averaged per trajectory first, then over the batch."""
    log_pf, log_pterm, log_r, log_z = _prepare(log_pf, log_pterm, log_r, log_z)
    k, tau, step, state = _positions(log_pf, lengths)
    live = _usable(k, state, log_pterm, min_len)
    res = _per_row(log_z, log_pf) + _prefix_residual(log_pf, log_pterm, log_r, step, live)
    per_traj = torch.where(live, _penalty(res, huber), 0.0).sum(1) / live.sum(1).clamp(min=1)
    d_tb = _tb_residual(log_pf, log_pterm, log_r, log_z, step, state, tau)
    return _weighted(per_traj, row_weight).mean(), _tb_stats(d_tb, log_pterm, state, tau)


def rootsubtb_loss(log_pf, log_pterm, log_r, lengths, log_z, lam=1.0, min_len=0, huber=0.0, row_weight=None):
    """RootSubTBLogZ (paper ablation): SubTB restricted to windows rooted at s_0 with the root flow
    replaced by the learned logZ, no absorption, no detach. Residual at prefix k:
        r_k = logZ + sum_{t<k} log_pf[t] + log_pterm[k] - log_r[k]
    (= RapTB's rooted residual with logZ kept and raw stop rewards; r_tau = d_TB), and like SubTB
        loss = sum_b sum_k lam^(k - min_len) r_k^2 / sum_b sum_k lam^(k - min_len),  min_len <= k <= tau.
    Unlike the authors' code (k >= 1) the root's own stop (k = 0) is included when allowed: without it
    logZ is not identified when the empty output is a valid object."""
    log_pf, log_pterm, log_r, log_z = _prepare(log_pf, log_pterm, log_r, log_z)
    k, tau, step, state = _positions(log_pf, lengths)
    live = _usable(k, state, log_pterm, min_len)
    res = _per_row(log_z, log_pf) + _prefix_residual(log_pf, log_pterm, log_r, step, live)
    w = torch.where(live, lam ** (k - min_len).clamp(min=0).to(res.dtype), 0.0)
    loss = _weighted(torch.where(live, w * _penalty(res, huber), 0.0).sum(1), row_weight).sum() / w.sum().clamp(min=1)
    d_tb = _tb_residual(log_pf, log_pterm, log_r, log_z, step, state, tau)
    return loss, _tb_stats(d_tb, log_pterm, state, tau)


def oracle_loss(log_pf, log_pterm, lengths, exact_p=None):
    """The oracle (oracle.py): maximum likelihood on exact samples of p*, loss = -mean_b log q(x_b) with
    log q(x) = sum_{k<tau} log_pf[k] + log_pterm[tau]. The batch is drawn from p*, which does not depend on q, so its
    expected gradient is grad KL(p* || q), whose only zero is q = p*. No logZ, no reward: log_r and u are not read.
    `exact_p` (tests): when the batch is every object, p*(x) of each row; the loss is then exactly the cross-entropy
    -sum_x p*(x) log q(x)."""
    log_pf, log_pterm = _prepare(log_pf, log_pterm)
    k, tau, step, state = _positions(log_pf, lengths)
    log_q = torch.where(step, log_pf, 0.0).sum(1) + _at(torch.where(state, log_pterm, 0.0), tau)
    loss = -log_q.mean() if exact_p is None else -(exact_p.to(log_q.dtype) * log_q).sum()
    return loss, {"oracle_log_q": log_q.detach().mean()}


LOSSES = {"tb": tb_loss, "subtb": subtb_loss, "raptb": raptb_loss,
          "avgprefixtb": avgprefixtb_loss, "rootsubtb": rootsubtb_loss, "oracle": oracle_loss,
          **rl_losses.LOSSES}  # RLOO, GRPO, DPG: the RL baselines on the same target (METHOD.md §9)
_TENSOR_ARGS = ("log_pf", "log_pterm", "log_r", "u", "lengths", "log_z")
KNOBS = {name: [p for p in inspect.signature(fn).parameters if p not in _TENSOR_ARGS] for name, fn in LOSSES.items()}


def compute_loss(name, log_pf, log_pterm, log_r, u, lengths, log_z, **knobs):
    """One call for every objective: forwards the tensors and the knobs each loss takes, ignores the rest
    (so the trainer can pass its whole config); a knob no loss knows is a typo and raises."""
    unknown = set(knobs) - {p for ps in KNOBS.values() for p in ps}
    if unknown:
        raise TypeError(f"unknown loss knob(s) {sorted(unknown)}; known: {KNOBS}")
    fn = LOSSES[name]
    given = dict(log_pf=log_pf, log_pterm=log_pterm, log_r=log_r, u=u, lengths=lengths, log_z=log_z, **knobs)
    params = inspect.signature(fn).parameters
    return fn(**{key: val for key, val in given.items() if key in params})
