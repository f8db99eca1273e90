"""
The RL objectives beside losses.py (METHOD.md §9): RLOO, GRPO and DPG, the baselines a GFlowNet is compared with,
on the same batch contract (METHOD.md §2, see losses.py) and registered in losses.LOSSES, so `--loss rloo|grpo|dpg`
runs them through the same trainer, mask, reference and meter. With kappa = 1 they aim at the same target
p*(x) = P_ref(x) exp(lambda S(x)) / Z, the maximiser of E_q[lambda S] - KL(q || P_ref); they differ in the
divergence they descend and in how they estimate its gradient.

The batch is one group of k samples of the current policy q (on-policy, temperature 1). Per sample
    log q(x) = sum_{t<tau} log_pf[t] + log_pterm[tau],   log R(x) = log_r[tau],
and every reward, advantage and weight is a constant (detached). No logZ is learned: `log_z` reaches DPG only, as
its running estimate of log Z, without gradient.

`exact_q` (tests): when the batch is every object of an enumerable space, pass q(x) of each row; the group's sample
statistics (1/k means, leave-one-out baselines, standard deviations) become expectations under q, and each loss's
gradient becomes its exact expected gradient. This module does not import losses.py (losses.py imports it).
"""
import torch

STD_EPS = 1e-4  # GRPO's advantage (S - mean) / (std + eps), as practitioners run it


def _upcast(*xs):
    """A common dtype of at least float32 (bf16 inputs accumulate in float32), as losses.py does."""
    dtype = torch.float32
    for x in xs:
        dtype = torch.promote_types(dtype, x.dtype)
    return [x.to(dtype) for x in xs]


def _actions(log_pf, log_pterm, lengths):
    """The log-probabilities of the tau + 1 actions each row took ([B, T]: tau tokens, then the stop at tau; 0
    past it) and their mask. torch.where first: the garbage past tau reaches neither value nor gradient."""
    k = torch.arange(log_pf.shape[1], device=log_pf.device)[None, :]
    tau = lengths.to(log_pf.device).long()[:, None]
    acts = torch.where(k < tau, log_pf, torch.where(k == tau, log_pterm, 0.0))
    return acts, k <= tau


def _log_q_and_log_r(log_pf, log_pterm, log_r, lengths):
    acts, _ = _actions(log_pf, log_pterm, lengths)
    return acts.sum(1), log_r.gather(1, lengths.to(log_r.device).long()[:, None]).squeeze(1)


def _mean(x, exact_q):
    """The group mean (1/k) sum_i x_i, or the expectation sum_x q(x) x under an enumeration."""
    return x.mean() if exact_q is None else (exact_q.to(x.dtype) * x).sum()


def _by_group(x, groups):
    """Each row's group sum and size (groups: [B] ids, one per condition; None: the whole batch is one group)."""
    if groups is None:
        return x.sum().expand_as(x), torch.full_like(x, len(x))
    ids = torch.unique(groups, return_inverse=True)[1].to(x.device)
    sums = torch.zeros(int(ids.max()) + 1, dtype=x.dtype, device=x.device).index_add(0, ids, x)
    sizes = torch.zeros_like(sums).index_add(0, ids, torch.ones_like(x))
    return sums[ids], sizes[ids]


def _need_group(name, log_pf, exact_q):
    if exact_q is None and log_pf.shape[0] < 2:
        raise ValueError(f"{name} needs a group of at least 2 samples (got {log_pf.shape[0]})")


def _check_exact_q(exact_q):
    if exact_q is not None and exact_q.requires_grad:
        raise ValueError("exact_q must be detached: it is a weight, not a path for the gradient")


def rloo_loss(log_pf, log_pterm, log_r, lengths, exact_q=None, groups=None):
    """REINFORCE with a leave-one-out baseline on the sequence reward r = log R - log q
    (= lambda S + kappa log P_ref - log q):
        loss = -(1/k) sum_i (r_i - b_i) log q(x_i),   b_i = mean_{j != i} r_j.
    Its expected gradient is grad KL(q || p*) (the baseline is independent of x_i), the mode-seeking direction.
    Under an enumeration the baseline is E_q[r], whose term vanishes in expectation. With conditions (`groups`, a
    condition id per row) the leave-one-out mean runs within each condition's k >= 2 samples."""
    _need_group("rloo", log_pf, exact_q)
    _check_exact_q(exact_q)
    log_pf, log_pterm, log_r = _upcast(log_pf, log_pterm, log_r)
    log_q, log_rx = _log_q_and_log_r(log_pf, log_pterm, log_r, lengths)
    r = (log_rx - log_q).detach()
    total, k = _by_group(r, groups)
    baseline = (total - r) / (k - 1) if exact_q is None else _mean(r, exact_q)
    loss = -_mean((r - baseline) * log_q, exact_q)
    # E_q[log R - log q] = log Z - KL(q || p*): the ELBO the method climbs
    return loss, {"rloo_elbo": _mean(r, exact_q), "rloo_adv_std": (r - baseline).std(unbiased=False)}


def dpg_loss(log_pf, log_pterm, log_r, lengths, log_z, exact_q=None):
    """Distributional policy gradient with a baseline (Khalifa et al. 2021; Korbak et al. 2022): importance weights
    w_i = p*(x_i) / q(x_i) = exp(log R - log q - log Z_hat), with log Z_hat = `log_z` (no gradient), and
        loss = -(1/k) sum_i (w_i - 1) log q(x_i).
    With Z_hat = Z its expected gradient is grad KL(p* || q), the mass-covering direction (the baseline 1 = E_q[w]
    leaves the expectation unchanged). The weights are formed in float64 (R / q spans tens of nats at the start)."""
    _check_exact_q(exact_q)
    log_pf, log_pterm, log_r = _upcast(log_pf, log_pterm, log_r)
    log_q, log_rx = _log_q_and_log_r(log_pf, log_pterm, log_r, lengths)
    w = ((log_rx - log_q).detach().double() - torch.as_tensor(log_z).detach().double()).exp()
    loss = -_mean((w - 1).to(log_q.dtype) * log_q, exact_q)
    # dpg_weight_mean estimates Z / Z_hat; the trainer folds it into the running Z_hat (update_running_log_z)
    return loss, {"dpg_weight_mean": _mean(w, exact_q), "dpg_ess": w.sum() ** 2 / (len(w) * (w ** 2).sum())}


def grpo_loss(log_pf, log_pterm, lengths, score, ref_log_pf, ref_log_pterm, old_log_pf=None, old_log_pterm=None,
              grpo_clip=0.2, grpo_beta=0.02, grpo_std_norm=True, exact_q=None, groups=None):
    """GRPO as practitioners run it (Shao et al. 2024), with reward S (`score`, the task score of each row):
        A_i = (S_i - mean S) / (std S + 1e-4)            (grpo_std_norm; off: A_i = S_i - mean S)
        per action t of x_i (tau tokens + the stop), rho = q(a_t | s_t) / q_old(a_t | s_t):
        l_it = -min(rho A_i, clip(rho, 1 - eps, 1 + eps) A_i) + beta (P_ref/q - log(P_ref/q) - 1)   (k3, per action)
        loss = mean_i (1/(tau_i + 1)) sum_t l_it          (grpo_std_norm; off, "Dr. GRPO": mean_i (1/T) sum_t l_it)
    q_old: `old_log_pf` / `old_log_pterm`, the policy that sampled the batch (None: the current one, detached, i.e.
    the first inner epoch, where rho = 1 and the clip is inert). `ref_log_pf` / `ref_log_pterm`: P_ref's per-action
    log-probs (policy.log_probs(..., reference=True)). Dr. GRPO (Liu et al. 2025) drops the std and the per-sequence
    length normalisation; its constant is T = L_max + 1, the most actions a row can take. std S is the sample std
    (Bessel), as TRL computes it.
    What the k3 term descends: its gradient at a ~ q is (1 - P_ref/q) grad log q, whose expectation is
    grad KL(P_ref(.|s) || q(.|s)) at each visited state s (a forward KL per state), not grad KL(q || P_ref) of
    the sequence; so even unclipped and unnormalised its fixed point is not p* (METHOD.md §9). With conditions
    (`groups`) the mean and std are each condition's."""
    _need_group("grpo", log_pf, exact_q)
    _check_exact_q(exact_q)
    log_pf, log_pterm, ref_log_pf, ref_log_pterm = _upcast(log_pf, log_pterm, ref_log_pf, ref_log_pterm)
    acts, live = _actions(log_pf, log_pterm, lengths)
    ref = _actions(ref_log_pf.detach(), ref_log_pterm.detach(), lengths)[0]
    old = acts.detach() if old_log_pf is None else _actions(*_upcast(old_log_pf, old_log_pterm), lengths)[0].detach()
    s = score.detach().to(acts.dtype)
    total, k = _by_group(s, groups)
    centred = s - (total / k if exact_q is None else _mean(s, exact_q))
    if grpo_std_norm:
        std = (_by_group(centred ** 2, groups)[0] / (k - 1)).sqrt() if exact_q is None else _mean(centred ** 2, exact_q).sqrt()
        adv = centred / (std + STD_EPS)
    else:
        adv = centred
    ratio = torch.where(live, (acts - old).exp(), 1.0)
    surrogate = torch.min(ratio * adv[:, None], ratio.clamp(1 - grpo_clip, 1 + grpo_clip) * adv[:, None])
    log_ratio_ref = torch.where(live, ref - acts, 0.0)
    k3 = log_ratio_ref.exp() - log_ratio_ref - 1  # >= 0; E_{a~q}[k3] = KL(q(.|s) || P_ref(.|s))
    per_action = torch.where(live, -surrogate + grpo_beta * k3, 0.0)
    n_actions = live.sum(1).to(acts.dtype) if grpo_std_norm else torch.full_like(s, acts.shape[1])
    loss = _mean(per_action.sum(1) / n_actions, exact_q)
    n = live.sum().clamp(min=1)
    clipped = live & ((ratio - 1).abs() > grpo_clip)
    return loss, {"grpo_k3": (torch.where(live, k3, 0.0).sum() / n).detach(), "grpo_clip_frac": clipped.sum() / n,
                  "grpo_adv_abs": adv.abs().mean()}


LOSSES = {"rloo": rloo_loss, "grpo": grpo_loss, "dpg": dpg_loss}
NO_LOG_Z = ("rloo", "grpo", "oracle")  # none learns or estimates a logZ: none is logged, drawn or compared


# ----------------------------------------------------------------------------- what the trainer adds for them

def batch_knobs(name, policy, tokens, lengths, score, conditions=None):
    """The tensors beyond the batch contract an RL loss takes: GRPO's reward S and P_ref's per-action log-probs
    (one more teacher-forced pass of the reference, without gradient), and with conditions each row's group: a
    condition's k samples share a baseline (RLOO) or an advantage's mean and std (GRPO)."""
    out = {}
    if conditions is not None:
        group_of = {c: i for i, c in enumerate(dict.fromkeys(conditions))}
        out["groups"] = torch.tensor([group_of[c] for c in conditions], device=tokens.device)
    if name == "grpo":
        rows = {} if conditions is None else dict(conditions=conditions)  # a conditional policy reads each row's prompt
        with torch.no_grad():
            ref_log_pf, ref_log_pterm = policy.log_probs(tokens, lengths, reference=True, **rows)
        out.update(score=score, ref_log_pf=ref_log_pf, ref_log_pterm=ref_log_pterm)
    return out


@torch.no_grad()
def update_running_log_z(log_z, weight_mean, n_before):
    """DPG's Z_hat: the running mean of every step's mean R/q, which is unbiased for Z whatever q was, started
    from the trainer's initial estimate (one batch, counted as the first). With n_before steps folded in so far
    and this step's mean weight w = mean R/(q Z_hat): Z_hat <- Z_hat + (w Z_hat - Z_hat) / (n_before + 2), i.e.
    log Z_hat += log1p((w - 1) / (n_before + 2)). It lives in the trainer's log_z, which every checkpoint saves,
    so kill/resume continues the same estimate."""
    log_z.add_(torch.log1p(torch.as_tensor((weight_mean - 1) / (n_before + 2), dtype=torch.float64)).to(log_z.dtype))


def problem(args):
    """Why train.py's settings cannot run an RL baseline or the oracle (None if they can). Their gradients are
    on-policy estimators at temperature 1, and the oracle's batches are exact samples of p*: a replayed, tempered or
    explored batch would bias them, so asking for one is an error."""
    rl, exact = args.loss in LOSSES, args.loss == "oracle"
    if not rl and not exact:
        return None
    why = (f"--loss {args.loss}, an on-policy estimator (METHOD.md §9), which samples at temperature 1" if rl else
           "--loss oracle, which trains on exact samples of the target")
    if args.replay != "none":
        return f"--replay {args.replay} cannot be used with {why}; leave --replay unset (none)"
    if args.temp_prob != 0:
        return f"--temp-prob {args.temp_prob} cannot be used with {why}; leave it unset"
    if args.epsilon != 0 or args.local_search:
        flag = f"--epsilon {args.epsilon}" if args.epsilon else f"--local-search {args.local_search}"
        return f"{flag} cannot be used with {why}"
    if exact:
        return None
    if args.loss != "dpg" and args.batch_size < 2:
        return f"--loss {args.loss} needs --batch-size >= 2: the group's other samples are its baseline"
    if args.loss == "grpo" and args.grpo_beta is None:
        return "--grpo-beta defaults to kappa / lambda, which needs --lam > 0; give --grpo-beta"
    if args.grpo_beta is not None and args.grpo_beta < 0 or args.grpo_clip < 0 or args.grpo_epochs < 1:
        return "--grpo-beta and --grpo-clip must be >= 0 and --grpo-epochs >= 1"
    return None
