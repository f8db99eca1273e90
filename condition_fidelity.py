"""
The distance to the target per condition (METHOD.md §11.4), averaged over the conditions of each split:

- exact, for a task whose every object of a condition can be listed (`given(c).objects()`, the Game of 24: at most
  1,536 strings per prompt): q and P_ref are teacher-forced on every object, so Z(c), p*(.|c), TV, KL(q || p*),
  KL(p* || q) and q(Sol | c) are exact, for any kappa;
- estimated otherwise (the scaffolds): fidelity.measure's importance-sampling meter, per condition.

train.py measures a fixed subset of each split (--eval-prompts), sample.py every condition it samples.
"""
import math
import time

import numpy as np
import torch

import fidelity

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
    log_q = fidelity.solution_log_probs(policy.view([condition]), objects)
    return enumerated_fidelity(log_q, reference_log_probs(policy, condition, objects), given.score_batch(objects),
                               kappa, lam)


def reference_log_probs(policy, condition, objects):
    """log P_ref(x | c) of every listed object of a condition, one teacher-forced pass per condition, kept (the meter
    and the oracle's sampler share it)."""
    if condition not in policy.ref_cache:
        policy.ref_cache[condition] = fidelity.solution_log_probs(policy.view([condition]), objects, reference=True)
    return policy.ref_cache[condition]


def measure(policy, task, conditions, kappa, lam, n=256, learned=None, seed=0):
    """One dict per condition: exact when the task lists its objects, else fidelity.measure's estimate from n policy
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
                    row = fidelity.measure(policy.view([c]), task.given(c), kappa, lam, n, seed=seed + i)
                    log_z = row["log_z_estimate"]
                if z is not None:
                    row.update(log_z_learned=float(z), log_z_gap=float(z) - log_z, log_z_gap_abs=abs(float(z) - log_z))
                rows.append(dict(prompt=c, **row))
    finally:
        policy.model.train(was_training)
    return rows


def summarise(rows, split):
    """The split's averages: every AVERAGED key over all its conditions, q(Sol|c) over the solvable ones (0 by
    definition elsewhere), and the number of conditions; keys are prefixed with the split's name."""
    out = {f"{split}_n_conditions": len(rows)}
    for key in AVERAGED:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[f"{split}_{key}"] = float(np.mean(values))
    solvable = [r["q_solution_mass"] for r in rows if r.get("n_solutions")]
    if solvable:
        out[f"{split}_q_solution_mass"] = float(np.mean(solvable))
        out[f"{split}_n_solvable"] = len(solvable)
    return out


def subset(conditions, n):
    """n conditions spread evenly over the (sorted) list, the same ones at every measurement; all when n is 0."""
    if not n or n >= len(conditions):
        return list(conditions)
    return [conditions[i * len(conditions) // n] for i in range(n)]


def evaluate(args, task, policy, log_z, step, learned_log_z):
    """train.py's periodic measurement: --eval-prompts conditions of each split. `learned_log_z(conditions)` gives
    the learned logZ of each (None without a head)."""
    start, out = time.perf_counter(), dict(conditional=True)
    for split in SPLITS:
        conds = subset(task.conditions.get(split, []), args.eval_prompts)
        if conds:
            rows = measure(policy, task, conds, args.kappa, args.lam, args.eval_n, learned_log_z(conds),
                           seed=args.seed + step)
            out.update(summarise(rows, split))
    out["kl_q_target"] = out.get("train_kl_q_target", math.nan)  # the progress bar's KL: the training conditions
    return dict(out, eval_seconds=time.perf_counter() - start)


def format_fidelity(f, explain=False):
    """The printed lines: one per split."""
    lines = []
    for split in [k[:-len("_n_conditions")] for k in f if k.endswith("_n_conditions")]:
        g = lambda key, d=3: f"{f[f'{split}_{key}']:.{d}f}" if f.get(f"{split}_{key}") is not None else "-"
        lines.append(f"{split:>8} ({f[f'{split}_n_conditions']} prompts): KL(q||p*) {g('kl_q_target')}  "
                     f"KL(p*||q) {g('kl_target_q')}  TV {g('tv_target')}  q(Sol|c) {g('q_solution_mass')} "
                     f"(solvable)  |logZ - log Z| {g('log_z_gap_abs', 2)}")
    if explain:
        lines.append("  read: the mean over a split's prompts of each prompt's distance to its own target p*(.|c); "
                     "held-out prompts were never trained on")
    return "distance to the target per prompt:\n" + "\n".join(lines)
