"""
The oracle (`--loss oracle`): maximum likelihood on exact samples of the target p*(x) = R(x) / Z, through the same
trainer, model, masks, schedule and meter as every GFlowNet method, so it is the ceiling they are measured against.
Only where a batch comes from differs, and drawing exactly from p* needs a task that can enumerate its target:

- a task with `solutions()` (Expr24, a user's task), score 1 on them and 0 elsewhere, kappa = 1 (what the exact meter
  assumes too, fidelity.measure): p* gives the solutions together the mass sum_Sol R / Z, each in proportion to its
  R (e^lam P_ref, or the task's own object_log_reward), and the non-solutions the rest in proportion to P_ref, i.e.
  P_ref conditioned on not solving: a reference sample, drawn again while it is a solution;
- a task with conditions whose every training condition lists its objects (`given(c).objects()`, the Game of 24):
  p*(.|c) is an exact categorical over them, for any kappa.

The reference's log-probs of the listed strings come from one teacher-forced pass, kept where the meter keeps them.
"""
import numpy as np
import torch

import fidelity

MAX_REJECTION_ROUNDS = 1000  # reference batches drawn for the non-solutions before giving up (P_ref(Sol) near 1)


def problem(args, task):
    """Why --loss oracle or --replay oracle cannot run on this task (None if it can, or neither is asked): one line."""
    if args.loss != "oracle" and args.replay != "oracle":
        return None
    what = "--loss oracle" if args.loss == "oracle" else "--replay oracle"
    if args.fsdp:  # each rank would draw its own number of reference batches, and each is a collective under FSDP
        return "exact samples of p* run without --fsdp (their rejection sampling differs between ranks)"
    if getattr(task, "conditions", None) is not None:
        if all(hasattr(task.given(c), "objects") for c in task.conditions["train"]):
            return None
        return (f"{what} draws exact samples of each prompt's target: task {task.name!r} does not list every "
                f"object of its prompts (given(prompt).objects())")
    if getattr(task, "solutions", None) is None:
        return (f"{what} draws exact samples of the target: task {task.name!r} cannot enumerate it (it has no "
                f"solutions(min_len, max_len) method)")
    if args.kappa != 1:
        return f"{what} on a task's solutions needs --kappa 1 (got {args.kappa}), as the exact meter does"
    return None


def categorical(log_w):
    """The cumulative distribution of weights given as logs (float64), for inverse-CDF draws."""
    w = np.exp(np.asarray(log_w, np.float64) - np.max(log_w))
    cdf = np.cumsum(w)
    return cdf / cdf[-1]


def draw_index(cdf, n, rng):
    return np.minimum(np.searchsorted(cdf, rng.random(n), side="right"), len(cdf) - 1)


class SolutionTarget:
    """p* of a task with an enumerable solution set (kappa = 1), ready to draw from."""

    def __init__(self, policy, task, lam, kappa=1.0):
        self.solutions = task.solutions(policy.min_len, policy.max_len)
        if not self.solutions:
            raise ValueError(f"task {task.name!r} has no solution of {policy.min_len}..{policy.max_len} tokens")
        log_ref = fidelity.reference_solution_log_probs(policy, self.solutions)
        log_r = fidelity.object_log_reward(task, log_ref, np.ones(len(log_ref)), [len(s) for s in self.solutions],
                                           kappa, lam, policy.max_len)
        log_z = fidelity.exact_log_z(lam, log_ref, log_r)[0]
        self.p_solution = float(np.exp(np.logaddexp.reduce(log_r) - log_z))  # p*(Sol)
        self.cdf = categorical(log_r)
        self.tokens, self.lengths = fidelity.encode_texts(policy, self.solutions)
        self.is_solution = frozenset(self.solutions)

    def sample(self, policy, n, rng):
        """n independent draws of p*: tokens [n, L_max] and lengths [n] on the policy's device."""
        n_sol = int(rng.binomial(n, min(1.0, self.p_solution)))
        picks = draw_index(self.cdf, n_sol, rng)
        tokens = torch.from_numpy(self.tokens[picks]).to(policy.device)
        lengths = torch.from_numpy(self.lengths[picks]).to(policy.device)
        if n_sol < n:
            rest_tokens, rest_lengths = self.non_solutions(policy, n - n_sol)
            tokens, lengths = torch.cat([tokens, rest_tokens]), torch.cat([lengths, rest_lengths])
        return tokens, lengths

    @torch.no_grad()
    def non_solutions(self, policy, n):
        """n draws of P_ref conditioned on not solving: reference samples, the solutions among them rejected."""
        kept_tokens, kept_lengths, have = [], [], 0
        for _ in range(MAX_REJECTION_ROUNDS):
            tokens, lengths, _ = policy.sample(n - have, reference=True)
            keep = torch.tensor([t not in self.is_solution for t in policy.texts(tokens, lengths)],
                                device=tokens.device)
            kept_tokens.append(tokens[keep])
            kept_lengths.append(lengths[keep])
            have += int(keep.sum())
            if have == n:
                return torch.cat(kept_tokens), torch.cat(kept_lengths)
        raise ValueError(f"the reference drew only solutions in {MAX_REJECTION_ROUNDS} batches: P_ref(Sol) is near 1")


class ConditionTarget:
    """p*(.|c) = P_ref(x|c)^kappa exp(lam S(x, c)) / Z(c) over every object a condition lists, ready to draw from."""

    def __init__(self, policy, task, condition, lam, kappa):
        given = task.given(condition)
        objects = given.objects()
        log_ref = fidelity.condition_reference_log_probs(policy, condition, objects)
        self.cdf = categorical(kappa * np.asarray(log_ref, np.float64) + lam * np.asarray(given.score_batch(objects)))
        self.tokens, self.lengths = fidelity.encode_texts(policy, objects)


def _targets(policy):
    return policy.__dict__.setdefault("_oracle_targets", {})  # built once per policy and (lam, kappa): the reference
    # never changes


def sample(args, task, policy, n, rng):
    """n exact samples of p* (a task with solutions): tokens [n, L_max], lengths [n]."""
    key = ("solutions", args.lam, args.kappa)
    targets = _targets(policy)
    if key not in targets:
        targets[key] = SolutionTarget(policy, task, args.lam, args.kappa)
    return targets[key].sample(policy, n, rng)


def sample_conditions(args, task, policy, conditions, rng):
    """One exact sample of p*(.|c) for each entry of `conditions` (a task whose conditions list their objects)."""
    targets = _targets(policy)
    tokens = np.zeros((len(conditions), policy.max_len), dtype=np.int64)
    lengths = np.zeros(len(conditions), dtype=np.int64)
    for c in dict.fromkeys(conditions):
        key = (c, args.lam, args.kappa)
        if key not in targets:
            targets[key] = ConditionTarget(policy, task, c, args.lam, args.kappa)
        rows = [i for i, x in enumerate(conditions) if x == c]
        picks = draw_index(targets[key].cdf, len(rows), rng)
        tokens[rows], lengths[rows] = targets[key].tokens[picks], targets[key].lengths[picks]
    return torch.from_numpy(tokens).to(policy.device), torch.from_numpy(lengths).to(policy.device)
