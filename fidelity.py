"""
Is it sampling in proportion to R? The distance from a sampler q to its target p*(x) = R(x) / Z (METHOD.md §8).

The first half is pure functions (arrays of log-probabilities in, numbers out); the second draws what they need
from a Policy: samples from the policy and from the reference P_ref, with exact log q, log P_ref and log R for
each. train.py's periodic evaluation, sample.py and research/reproduce.py all report `measure`'s dict.

    KL(q || p*) = log Z - E_q[log R - log q]   (>= 0; the learned logZ is not Z, so Z is estimated apart)
"""
import math

import numpy as np
import torch

# Inputs are per-object arrays of natural-log quantities: log_r = log R(x), log_q = log q(x) (the policy, exact
# under the mask, teacher-forced for objects it did not draw), log_ref = log P_ref(x). "q" samples come from the
# policy, "ref" samples from the reference.

def _logmeanexp(x):
    x = np.asarray(x, dtype=np.float64)
    top = x.max()
    return float(top + np.log(np.mean(np.exp(x - top)))) if np.isfinite(top) else float(top)


def _mixture_log_weights(log_r, log_q, log_ref):
    """log R(x) / m(x) with the defensive mixture m = q/2 + P_ref/2."""
    return np.asarray(log_r, np.float64) - (np.logaddexp(log_q, log_ref) - math.log(2))


def _log_z_mixture(log_w_q, log_w_ref):
    """Stratified estimate: half the proposal's mass from each sampler, whatever the sample counts, so
    E = (E_q[R/m] + E_ref[R/m]) / 2 = sum_x R(x) = Z exactly in expectation."""
    parts = [_logmeanexp(w) for w in (log_w_q, log_w_ref) if len(w)]
    return float(np.logaddexp.reduce(parts) - math.log(len(parts)))


def ess(log_w):
    """Kish's effective sample size (sum w)^2 / sum w^2 of importance weights given in log space."""
    log_w = np.asarray(log_w, np.float64)
    if len(log_w) == 0 or not np.isfinite(log_w.max()):
        return 0.0
    w = np.exp(log_w - log_w.max())
    return float(w.sum() ** 2 / (w ** 2).sum())


def _arrays(s):
    return tuple(np.asarray(s[k], np.float64) for k in ("log_r", "log_q", "log_ref"))


def log_z_estimate(q, ref, n_boot=200, seed=0):
    """log Z by importance sampling with the mixture proposal m = q/2 + P_ref/2, weight R(x)/m(x).
    q, ref: dicts of arrays log_r, log_q, log_ref for the policy's and the reference's samples.
    Returns log_z, its bootstrap 95% interval (resampling within each sampler) and each proposal's ESS."""
    w_q, w_ref = _mixture_log_weights(*_arrays(q)), _mixture_log_weights(*_arrays(ref))
    ci = bootstrap(lambda iq, iref: [_log_z_mixture(w_q[iq], w_ref[iref])], len(w_q), len(w_ref), n_boot, seed)
    return dict(log_z=_log_z_mixture(w_q, w_ref), log_z_ci=ci[0],
                ess=dict(q=ess(w_q), ref=ess(w_ref), mixture=ess(np.concatenate([w_q, w_ref]))))


def bootstrap(statistic, n_q, n_ref, n_boot=200, seed=0):
    """95% percentile intervals of each entry of statistic(rows of q, rows of ref), resampling within each
    sampler; None for an entry that is never finite."""
    rng = np.random.default_rng(seed)
    values = np.asarray([statistic(rng.integers(0, n_q, n_q), rng.integers(0, n_ref, n_ref))
                         for _ in range(n_boot)], np.float64).reshape(n_boot, -1)
    out = []
    for column in values.T:
        column = column[np.isfinite(column)]
        out.append([float(np.percentile(column, 2.5)), float(np.percentile(column, 97.5))] if len(column) else None)
    return out


def kl_q_target(log_z, log_r_q, log_q_q):
    """KL(q || p*) = log Z - E_q[log R(x) - log q(x)], the expectation over the policy's own samples."""
    return float(log_z - np.mean(np.asarray(log_r_q, np.float64) - np.asarray(log_q_q, np.float64)))


def pooled_objects(q, ref):
    """The distinct objects among both samplers' draws, by key: their log_r and exact log_q (the same for
    every copy of an object, so the first is kept)."""
    seen = {}
    for s in (q, ref):
        for key, log_r, log_q in zip(s["key"], s["log_r"], s["log_q"]):
            seen.setdefault(key, (float(log_r), float(log_q)))
    if not seen:
        return np.zeros(0), np.zeros(0)
    log_r, log_q = zip(*seen.values())
    return np.array(log_r), np.array(log_q)


def mass_comparison(log_z, q, ref, factor=10.0):
    """Over the distinct objects seen (by either sampler), with p*(x) = R(x)/Z and exact q(x):
    missed_mass       target mass of objects the policy samples at under 1/factor of their target rate
    oversampled_mass  the policy's mass on objects it samples at over factor times their target rate
    tv_target         (1/2) sum |q - p*| over those objects
    seen_target_mass  how much of the target these objects hold at all; objects nobody drew are not counted,
                      so the three numbers above are lower bounds over the whole space."""
    log_r, log_q = pooled_objects(q, ref)
    log_p = log_r - log_z
    p, qx = np.exp(log_p), np.exp(log_q)
    missed = log_q < log_p - math.log(factor)
    over = log_q > log_p + math.log(factor)
    return dict(missed_mass=float(p[missed].sum()), oversampled_mass=float(qx[over].sum()),
                tv_target=float(0.5 * np.abs(qx - p).sum()), seen_target_mass=float(p.sum()),
                n_objects=int(len(p)))


def fidelity(q, ref, log_z_learned=None, n_boot=200, seed=0, log_z=None):
    """The estimated distance to the target (METHOD.md §8) from the policy's samples `q` and the reference's
    samples `ref` (dicts of per-sample key, log_r, log_q, log_ref). Finite whenever the log rewards are, also
    for a single sample or when the policy never draws a target mode. A known `log_z` replaces the estimate."""
    (r_q, lq_q, lref_q), (r_ref, lq_ref, lref_ref) = _arrays(q), _arrays(ref)
    w_q, w_ref = _mixture_log_weights(r_q, lq_q, lref_q), _mixture_log_weights(r_ref, lq_ref, lref_ref)
    known = log_z
    log_z = _log_z_mixture(w_q, w_ref) if known is None else float(known)

    kl_of = _rare_zero_aware_kl(q, ref, np.random.default_rng(seed + 1))

    def both(iq, iref):
        z = _log_z_mixture(w_q[iq], w_ref[iref]) if known is None else log_z
        return [z, kl_of(z, iq)]
    z_ci, kl_ci = bootstrap(both, len(w_q), len(w_ref), n_boot, seed)
    z_ci = None if known is not None else z_ci
    out = dict(log_z_estimate=log_z, log_z_ci=z_ci, kl_q_target=kl_q_target(log_z, r_q, lq_q), kl_q_target_ci=kl_ci,
               ess=dict(q=ess(w_q), ref=ess(w_ref)), **mass_comparison(log_z, q, ref), exact=False,
               **kl_parts(log_z, r_q, lq_q, q.get("score")))
    if log_z_learned is not None:
        out.update(log_z_learned=float(log_z_learned), log_z_gap=float(log_z_learned - log_z))
    return out


def _rare_zero_aware_kl(q, ref, rng):
    """KL(q||p*) of one bootstrap replicate, log Z given. A plain resample of the policy's samples keeps the number of
    score-0 samples it holds near the number drawn, which for a rare event (2 invalid outputs in 1000, each about 40
    nats) is itself a Poisson draw: with none drawn, no replicate contains one and the interval misses the truth
    whenever the policy leaks a little. So the share of score-0 samples is drawn from its Jeffreys posterior
    Beta(k + 1/2, n - k + 1/2) instead, and their mean log R - log q from the resampled ones (or, when the policy drew
    none, from the reference's score-0 samples weighted by q / P_ref, an estimate of the same conditional mean).
    Without scores, or with nothing score-0 on either side, it is the plain resampled estimate."""
    (r_q, lq_q, _), (r_ref, lq_ref, lref_ref) = _arrays(q), _arrays(ref)
    g = r_q - lq_q
    if q.get("score") is None:
        return lambda z, iq: kl_q_target(z, r_q[iq], lq_q[iq])
    zero, n = np.asarray(q["score"], np.float64) <= 0, len(g)
    g_zero_ref = None
    zero_ref = np.asarray(ref.get("score", np.ones(len(r_ref))), np.float64) <= 0
    if zero_ref.any():
        w = np.exp(lq_ref[zero_ref] - lref_ref[zero_ref] - np.max(lq_ref[zero_ref] - lref_ref[zero_ref]))
        g_zero_ref = float(np.sum(w * (r_ref - lq_ref)[zero_ref]) / w.sum())
    k = int(zero.sum())
    if k == 0 and g_zero_ref is None:
        return lambda z, iq: kl_q_target(z, r_q[iq], lq_q[iq])

    def kl(z, iq):
        share = rng.beta(k + 0.5, n - k + 0.5)
        picked = zero[iq]
        g_valid = g[iq][~picked].mean() if (~picked).any() else 0.0
        g_zero = g[iq][picked].mean() if picked.any() else g[zero].mean() if k else g_zero_ref
        return float(z - (1 - share) * g_valid - share * g_zero)
    return kl


def kl_parts(log_z, log_r_q, log_q_q, score=None, top=5):
    """Where the estimate KL = mean_i c_i, c_i = log Z - log R(x_i) + log q(x_i), comes from (METHOD.md §8.2):
    kl_invalid_part, the part supplied by the policy's samples with score 0 (invalid or worthless: each costs about
    lambda nats), with q_invalid, their share; and kl_top, the part supplied by the `top` samples with the largest
    c_i. When a handful of samples supply most of the estimate, its bootstrap interval rests on them too."""
    c = log_z - np.asarray(log_r_q, np.float64) + np.asarray(log_q_q, np.float64)
    if len(c) == 0:
        return {}
    out = dict(kl_top=float(np.sort(c)[-top:].sum() / len(c)), kl_top_n=min(top, len(c)))
    if score is not None:
        zero = np.asarray(score, np.float64) <= 0
        out.update(kl_invalid_part=float(c[zero].sum() / len(c)), q_invalid=float(zero.mean()))
    return out


def exact_log_z(lam, log_ref_sol, log_r_sol=None):
    """log Z = log(1 + (e^lam - 1) P_ref(Sol)), with log P_ref(Sol) and 1 - P_ref(Sol) (computed accurately).
    With `log_r_sol`, the log R of each solution under another form of the reward (METHOD.md §10; non-solutions
    still earn P_ref): log Z = log(P_ref(not Sol) + sum_Sol R)."""
    log_pref_sol = float(np.logaddexp.reduce(log_ref_sol)) if len(log_ref_sol) else -math.inf
    pref_non = -math.expm1(log_pref_sol)
    log_r_all = lam + log_pref_sol if log_r_sol is None else \
        float(np.logaddexp.reduce(log_r_sol)) if len(log_r_sol) else -math.inf
    log_z = float(np.logaddexp(math.log(pref_non) if pref_non > 0 else -math.inf, log_r_all))
    return log_z, log_pref_sol, pref_non


def exact_solution_fidelity(lam, log_ref_sol, log_q_sol, q=None, log_r_sol=None):
    """Exact distance to the target for a task whose score is 1 on a known solution set and 0 elsewhere, with
    kappa = 1 (Expr24; METHOD.md §8). The reference's probabilities sum to 1 over every object, so
    Z = 1 + (e^lam - 1) P_ref(Sol) exactly, and p*(x) = e^lam P_ref(x) / Z on a solution, P_ref(x) / Z elsewhere.
    log_ref_sol, log_q_sol: log P_ref(x) and log q(x) of every solution (teacher-forced). The non-solutions
    hold target mass p*(notSol) = (1 - P_ref(Sol)) / Z, about e^-lam: TV and KL(p*||q) are exact to within it.
    KL(q||p*) needs q's spread over the non-solutions: its part there is q(notSol) * (log Z + E[log q - log P_ref
    | notSol]), the expectation over the policy's non-solution samples `q` (dict with score, log_q, log_ref) when
    there are any; else the log-sum lower bound q(notSol) * (log Z + log(q(notSol) / P_ref(notSol))).
    `log_r_sol`: each solution's log R when it is not lam + log P_ref (exact_log_z)."""
    log_ref_sol, log_q_sol = np.asarray(log_ref_sol, np.float64), np.asarray(log_q_sol, np.float64)
    log_z, log_pref_sol, pref_non = exact_log_z(lam, log_ref_sol, log_r_sol)
    log_p = (lam + log_ref_sol if log_r_sol is None else np.asarray(log_r_sol, np.float64)) - log_z
    p, qx = np.exp(log_p), np.exp(log_q_sol)
    q_non = max(0.0, 1.0 - float(qx.sum()))
    kl_sol = float(np.sum(qx * (log_q_sol - log_p)))
    kl_non_lower = q_non * (log_z + math.log(q_non / pref_non)) if q_non > 0 and pref_non > 0 else 0.0
    kl_non = kl_non_lower
    if q is not None and q_non > 0:
        off = np.asarray(q["score"]) < 1
        if off.any():
            kl_non = q_non * (log_z + float(np.mean(np.asarray(q["log_q"])[off] - np.asarray(q["log_ref"])[off])))
    missed = log_q_sol < log_p - math.log(10.0)
    over = log_q_sol > log_p + math.log(10.0)
    return dict(log_z_estimate=log_z, log_z_ci=None, exact=True, kl_invalid_part=kl_non, q_invalid=q_non,
                p_ref_solution_mass=math.exp(log_pref_sol), q_solution_mass=float(qx.sum()),
                target_nonsolution_mass=pref_non * math.exp(-log_z),
                tv_target=0.5 * (float(np.abs(qx - p).sum()) + q_non),
                kl_q_target=kl_sol + kl_non, kl_q_target_lower=kl_sol + kl_non_lower,
                kl_target_q=float(np.sum(p * (log_p - log_q_sol))),
                missed_mass=float(p[missed].sum()),
                oversampled_mass=float(qx[over].sum()) + q_non)  # non-solutions: q > 10 p* unless q < 10 e^-lam P_ref


def target_profile(keys, scores, lengths, lam, max_len):
    """What the target p* ∝ P_ref e^{lam S} looks like, from samples of the reference itself (kappa = 1): each
    sample's importance weight is then e^{lam S(x)}. Returns the target's length distribution, the effective
    sample size of those weights, and how many distinct objects carry 50% and 90% of its mass."""
    log_w = lam * np.asarray(scores, np.float64)
    w = np.exp(log_w - log_w.max())
    w /= w.sum()
    by_length = np.bincount(np.asarray(lengths), weights=w, minlength=max_len + 1)
    per_object = {}
    for key, weight in zip(keys, w):
        per_object[key] = per_object.get(key, 0.0) + weight
    top = np.cumsum(sorted(per_object.values(), reverse=True))
    return dict(lam=lam, ess=ess(log_w), n=len(w), at_max_len=float(by_length[max_len]),
                length_dist=[round(float(x), 4) for x in by_length],
                objects_50=int(np.searchsorted(top, 0.5) + 1), objects_90=int(np.searchsorted(top, 0.9) + 1))


# -----------------------------------------------------------------------------
# drawing what the estimators need from a Policy

def sequence_log_probs(policy, tokens, lengths, reference=False):
    """log q(x) (or log P_ref(x)) of whole sequences, stop included, by one teacher-forced pass."""
    log_pf, log_pterm = policy.log_probs(tokens, lengths, reference=reference)
    return (log_pf.sum(1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)).double().cpu()


@torch.no_grad()
def draw(policy, task, n, kappa, lam, reference=False, batch_size=256):
    """n samples from the policy (or from the reference), each with its key (the token sequence: the GFlowNet's
    terminal object), score, length, and exact log q, log P_ref and log R = kappa log P_ref + lam S (or the task's
    own form of it, object_log_reward)."""
    out = dict(key=[], score=[], log_q=[], log_ref=[], length=[])
    for start in range(0, n, batch_size):
        tokens, lengths, log_steps = policy.sample(min(batch_size, n - start), reference=reference)
        drawn = log_steps.sum(1).double().cpu()  # the sampler's own log-prob, temperature 1
        other = sequence_log_probs(policy, tokens, lengths, reference=not reference)
        out["log_q"] += (other if reference else drawn).tolist()
        out["log_ref"] += (drawn if reference else other).tolist()
        out["score"] += task.score_batch(policy.texts(tokens, lengths))
        out["key"] += [tuple(row[:tau]) for row, tau in zip(tokens.tolist(), lengths.tolist())]
        out["length"] += lengths.tolist()
    out = {k: (np.asarray(v, np.float64) if k != "key" else v) for k, v in out.items()}
    out["log_r"] = object_log_reward(task, out["log_ref"], out["score"], out["length"], kappa, lam, policy.max_len)
    return out


def object_log_reward(task, log_ref, scores, lengths, kappa, lam, max_len):
    """log R(x) = kappa log P_ref(x) + lam S(x) of finished objects, or the task's own form of it."""
    own = getattr(task, "object_log_reward", None)
    return own(log_ref, scores, lengths, kappa, lam, max_len) if own else kappa * log_ref + lam * scores


@torch.no_grad()
def solution_log_probs(policy, solutions, reference=False, batch_size=512):
    """log q(x) (or log P_ref(x)) of every solution string, teacher-forced in batches. A solution is spelled with
    one action per character (Expr24's tokens are single characters), so it is exactly one path of the tree.
    Batches of 512 keep the activations in cache: 40% faster on CPU than 4096 (python -m bench fidelity-expr24)."""
    tokens, lengths = encode_texts(policy, solutions)
    out = [sequence_log_probs(policy, torch.from_numpy(tokens[i:i + batch_size]).to(policy.device),
                              torch.from_numpy(lengths[i:i + batch_size]).to(policy.device), reference)
           for i in range(0, len(solutions), batch_size)]
    return torch.cat(out).numpy() if out else np.zeros(0)


def encode_texts(policy, texts):
    """Token rows [n, L_max] (EOS past each end) and lengths [n], as numpy int64, of strings spelled with one action
    per character (Expr24's and the Game of 24's tokens are single characters), so each is exactly one path."""
    action_id = {text: i for i, text in policy.token_texts.items() if len(text) == 1}
    width = max(map(len, texts), default=0)
    if width > policy.max_len:
        raise ValueError(f"a text has {width} characters; the policy stops after {policy.max_len}")
    tokens = np.full((len(texts), policy.max_len), policy.eos, dtype=np.int64)
    for i, text in enumerate(texts):
        tokens[i, :len(text)] = [action_id[c] for c in text]
    return tokens, np.array([len(text) for text in texts], dtype=np.int64)


def reference_solution_log_probs(policy, solutions):
    """log P_ref(x) of every solution, by one teacher-forced pass made once per prompt, task mask and solution set
    and kept (the reference never changes) in the cache every view of the policy shares: the meter and the oracle's
    sampler read it, and each evaluation of a run after the first skips the pass."""
    key = (tuple(policy.prompt.shape), tuple(policy.prompt.flatten().tolist()), policy.task_mask, solutions)
    if key not in policy.ref_cache:
        policy.ref_cache[key] = solution_log_probs(policy, solutions, reference=True)
    return policy.ref_cache[key]


def measure(policy, task, kappa, lam, n=256, log_z_learned=None, seed=0, exact=True):
    """The fidelity block: exact for a task with a known solution set and kappa = 1 (Expr24), else estimated
    from n policy and n reference samples. With exact=False such a task still gets its exact Z (the reference's
    pass over the solutions is made once and cached) but skips the policy's pass over every solution, which
    costs about as much as a minute of training on a CPU: the estimates then use the samples, with Z known.
    The policy is put in eval mode (LoRA dropout off) for the duration; torch's global RNG is left as it was, so
    a run with periodic evaluation samples exactly as one without."""
    was_training = policy.model.training
    policy.model.eval()
    try:
        with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
            torch.manual_seed(seed)
            q = draw(policy, task, n, kappa, lam)
            if getattr(task, "solutions", None) is not None and kappa == 1:
                solutions = task.solutions(policy.min_len, policy.max_len)
                log_ref_sol = reference_solution_log_probs(policy, solutions)
                log_r_sol = None
                if getattr(task, "object_log_reward", None) is not None:
                    log_r_sol = task.object_log_reward(log_ref_sol, np.ones(len(solutions)),
                                                       [len(s) for s in solutions], kappa, lam, policy.max_len)
                if exact:
                    out = exact_solution_fidelity(lam, log_ref_sol, solution_log_probs(policy, solutions), q, log_r_sol)
                else:
                    log_z = exact_log_z(lam, log_ref_sol, log_r_sol)[0]
                    ref = draw(policy, task, n, kappa, lam, reference=True)
                    out = dict(fidelity(q, ref, seed=seed, log_z=log_z), exact_log_z=True)
            else:
                out = fidelity(q, draw(policy, task, n, kappa, lam, reference=True), seed=seed)
    finally:
        policy.model.train(was_training)
    if log_z_learned is not None:
        out.update(log_z_learned=float(log_z_learned), log_z_gap=float(log_z_learned) - out["log_z_estimate"])
    return out


# ----------------------------------------------------------------------------- per condition (METHOD.md §11.4)
# exact for a task whose every object of a condition can be listed (`given(c).objects()`, the Game of 24: at most
# 1,536 strings per prompt): q and P_ref are teacher-forced on every object, so Z(c), p*(.|c), TV, KL(q || p*),
# KL(p* || q) and q(Sol | c) are exact, for any kappa; estimated otherwise (the scaffolds), per condition. train.py
# measures a fixed subset of each split (--eval-prompts), sample.py every condition it samples.

SPLITS = ("train", "heldout")
AVERAGED = ("kl_q_target", "kl_target_q", "tv_target", "log_z_gap_abs")  # over every measured condition


def enumerated_fidelity(log_q, log_ref, scores, kappa=1.0, lam=50.0):
    """Exact distance between q(.|c) and p*(x|c) = P_ref(x|c)^kappa exp(lam S(x, c)) / Z(c), given log q, log P_ref
    and S of EVERY object of the condition (arrays in one order). q_mass and p_ref_mass are the total
    probabilities of the listed objects: 1 when the list is the whole object space under the mask."""
    log_q, log_ref, scores = (np.asarray(x, np.float64) for x in (log_q, log_ref, scores))
    log_r = kappa * log_ref + lam * scores
    log_z = float(np.logaddexp.reduce(log_r))
    log_p = log_r - log_z
    q, p = np.exp(log_q), np.exp(log_p)
    solved = scores == 1
    return dict(log_z_exact=log_z, tv_target=0.5 * float(np.abs(q - p).sum()),
                kl_q_target=float(np.sum(np.where(q > 0, q * (log_q - log_p), 0.0))),
                kl_target_q=float(np.sum(np.where(p > 0, p * (log_p - log_q), 0.0))),
                q_solution_mass=float(q[solved].sum()), target_solution_mass=float(p[solved].sum()),
                p_ref_solution_mass=float(np.exp(log_ref[solved]).sum()), n_solutions=int(solved.sum()),
                n_objects=len(q), q_mass=float(q.sum()), p_ref_mass=float(np.exp(log_ref).sum()))


def exact_condition(policy, task, condition, kappa, lam):
    """enumerated_fidelity of one condition; the reference's pass is made once per condition and kept."""
    given = task.given(condition)
    objects = given.objects()
    log_q = solution_log_probs(policy.view([condition]), objects)
    return enumerated_fidelity(log_q, condition_reference_log_probs(policy, condition, objects), given.score_batch(objects),
                               kappa, lam)


def condition_reference_log_probs(policy, condition, objects):
    """log P_ref(x | c) of every listed object of a condition, one teacher-forced pass per condition, kept."""
    return reference_solution_log_probs(policy.view([condition]), objects)


def measure_conditions(policy, task, conditions, kappa, lam, n=256, learned=None, seed=0):
    """One dict per condition: exact when the task lists its objects, else measure's estimate from n policy
    and n reference samples. `learned`: the learned logZ(c) of each condition (or None), compared with Z(c).
    The policy is in eval mode meanwhile and torch's global RNG is left as it was."""
    learned = learned or [None] * len(conditions)
    exact = all(hasattr(task.given(c), "objects") for c in conditions)
    was_training = policy.model.training
    policy.model.eval()
    rows = []
    try:
        with torch.random.fork_rng(devices=[policy.device] if policy.device.type == "cuda" else []):
            for i, (c, z) in enumerate(zip(conditions, learned)):
                if exact:
                    row = exact_condition(policy, task, c, kappa, lam)
                    log_z = row["log_z_exact"]
                else:
                    row = measure(policy.view([c]), task.given(c), kappa, lam, n, seed=seed + i)
                    log_z = row["log_z_estimate"]
                if z is not None:
                    row.update(log_z_learned=float(z), log_z_gap=float(z) - log_z, log_z_gap_abs=abs(float(z) - log_z))
                rows.append(dict(prompt=c, **row))
    finally:
        policy.model.train(was_training)
    return rows


def summarise_split(rows, split):
    """The split's averages: every AVERAGED key over all its conditions, q(Sol|c) over the solvable ones (0 by
    definition elsewhere; a row measured from its solution list, as Expr24's one condition, has solutions), and the
    number of conditions; keys are prefixed with the split's name."""
    out = {f"{split}_n_conditions": len(rows)}
    for key in AVERAGED:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[f"{split}_{key}"] = float(np.mean(values))
    solvable = [r["q_solution_mass"] for r in rows if "q_solution_mass" in r and r.get("n_solutions", 1)]
    if solvable:
        out[f"{split}_q_solution_mass"] = float(np.mean(solvable))
        out[f"{split}_n_solvable"] = len(solvable)
    return out


def subset(conditions, n):
    """n conditions spread evenly over the (sorted) list, the same ones at every measurement; all when n is 0."""
    if not n or n >= len(conditions):
        return list(conditions)
    return [conditions[i * len(conditions) // n] for i in range(n)]
