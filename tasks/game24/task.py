"""
The Game of 24 (METHOD.md §11.3), a conditional task: the prompt is four digits 1-9 and the text uses each once with
+ - * / between them, worth exactly 24. Every prompt's strings can be enumerated, so its target is known exactly.
The reference is the tiny character-level GPT-2 in prior/ beside this file (its recipe: train_prior.py).
"""
import functools
import itertools

import numpy as np
import torch

from rewards import Task, TaskError
from tasks.expr24.task import EXPR24_OPS, evaluate_expression, expr24_solutions


GAME24_DIGITS, GAME24_LENGTH = "123456789", 7  # four digits 1-9 and three operators, no brackets


@functools.lru_cache(maxsize=None)
def game24_objects(digits):
    """Every string a condition allows: each of its four digits once, in any distinct order, with one of + - * /
    between each two (at most 4! x 4^3 = 1,536), sorted."""
    orders = sorted(set(itertools.permutations(digits)))
    return tuple(sorted(a + p + b + q + c + r + d for a, b, c, d in orders
                        for p, q, r in itertools.product(EXPR24_OPS, repeat=3)))


@functools.cache
def game24_solutions():
    """{condition: its solutions} for all 495 conditions (the four digits as a sorted string, e.g. '1139'), from
    Expr24's exact enumeration of four-number expressions worth 24, restricted to the digits 1-9."""
    out = {"".join(c): [] for c in itertools.combinations_with_replacement(GAME24_DIGITS, 4)}
    for text in expr24_solutions(4, 24):
        if len(text) == GAME24_LENGTH and "0" not in text:
            out["".join(sorted(text[0::2]))].append(text)
    return {c: tuple(sorted(s)) for c, s in out.items()}


def game24_split(heldout_frac=0.2, seed=24):
    """The train / held-out conditions: within the solvable and within the unsolvable conditions (sorted), a
    permutation from numpy's default_rng(seed) puts the first round(heldout_frac * n) in the held-out split, so
    both splits hold both kinds in the same proportion (the defaults: 156 + 240 train, 39 + 60 held out)."""
    rng, split = np.random.default_rng(seed), dict(train=[], heldout=[])
    solutions = game24_solutions()
    for stratum in ([c for c in solutions if solutions[c]], [c for c in solutions if not solutions[c]]):
        order = rng.permutation(len(stratum))
        cut = round(heldout_frac * len(stratum))
        split["heldout"] += [stratum[i] for i in sorted(order[:cut])]
        split["train"] += [stratum[i] for i in sorted(order[cut:])]
    return {name: sorted(conds) for name, conds in split.items()}


class Game24Task(Task):
    """The Game of 24 as a conditional task: the condition is four digits 1-9 (a multiset, 495 of them), written
    in the prompt as '1139:'; the generated text uses each of them exactly once with + - * / between them, no
    brackets, the usual precedence, exact fractions (7 characters, enforced by the state mask of each condition);
    S = 1[value == 24]. Every condition's strings (at most 1,536) can be enumerated, so the target of each prompt
    and the distance to it are known exactly (conditions.exact_fidelity). The reference is the tiny
    character-level GPT-2 in tasks/game24/prior/, fitted to uniformly random valid strings of every condition."""
    name = "game24"
    # one fixed length (the stop only after the fourth digit): no proper prefix is an object, so RapTB's rooted
    # prefixes and SubTB's windows are empty here (RapTB is TB; METHOD.md §11.3)
    # Optimisation, the same for every objective: 18,000 steps of 128 (16 prompts x 8) at lr 3e-3 (cosine). The
    # oracle (--loss oracle) takes the train prompts from q(Sol|c) 0.017 to 0.97 in about 10 CPU minutes;
    # half as many steps get it to 0.83 but leave the GFlowNet runs at 0.72 of its reduction (RESULTS.md)
    # A replay buffer of 64 per prompt holds every solution of the prompt that has the most (54), and its SubM
    # refresh, one greedy selection per prompt of a batch, costs about (64 / 200)^3 of the paper's 200, which
    # would take the default run past 30 minutes as the buffers fill (RESULTS.md)
    # The objective's settings, for every GFlowNet objective, chosen by measurement (RESULTS.md, "Cover the modes:
    # hold the prompts without a solution in place"): logZ(c) from the solutions drawn so far (--log-z seen, exactly
    # 0 for a prompt without one), the rows of prompts with no solution drawn weighing 16 (--anchor 16), residuals
    # bounded at 4 nats (--huber 4) and a buffer of solutions only. Without the anchor the solvable prompts' rows
    # drag the others away; without the seen logZ or the buffer a run learns close to nothing
    defaults = dict(model="prior_game24", min_len=GAME24_LENGTH, max_len=GAME24_LENGTH, lr=3e-3, batch_size=128,
                    grad_accum=1, steps=18000, samples_per_prompt=8, buffer_size=64,
                    log_z_mode="seen", anchor=16.0, huber=4.0, replay_valid_only=True, buffer_validity="score")
    charset = frozenset(GAME24_DIGITS + EXPR24_OPS)
    max_token_chars = 1

    def __init__(self):
        split = game24_split()
        self.conditions = {name: [self.prompt_of(c) for c in conds] for name, conds in split.items()}

    @staticmethod
    def prompt_of(digits):
        return "".join(sorted(digits)) + ":"

    @functools.lru_cache(maxsize=None)
    def given(self, prompt):
        digits = prompt.rstrip(":")
        if len(prompt) != 5 or not prompt.endswith(":") or len(digits) != 4 or set(digits) - set(GAME24_DIGITS):
            raise TaskError(f"a Game of 24 prompt is four digits 1-9 and ':', e.g. '1139:' (got {prompt!r})")
        return Game24Condition(digits)

    def rows_mask(self, action_texts, prompts):
        """The state mask of rows with these prompts (one each) in one function: what the conditions' own masks
        give, row by row, without a call per condition (conditions.ConditionalPolicy uses it when present)."""
        return game24_mask(action_texts, [self.given(p).digits for p in prompts])


class Game24Condition(Task):
    """One prompt of the Game of 24: its score, validity, state mask and every string it allows."""
    name = "game24"
    charset, max_token_chars = Game24Task.charset, 1

    def __init__(self, digits):
        self.digits = "".join(sorted(digits))

    def is_valid(self, text):
        return (len(text) == GAME24_LENGTH and "".join(sorted(text[0::2])) == self.digits
                and all(op in EXPR24_OPS for op in text[1::2]))

    def score(self, text):
        return 1.0 if self.is_valid(text) and evaluate_expression(text, 4) == 24 else 0.0

    def objects(self):
        return game24_objects(self.digits)  # the sorted digits: one cache entry per condition

    def solutions(self, min_len=0, max_len=None):
        return game24_solutions()[self.digits]

    def state_mask(self, action_texts):
        return game24_mask(action_texts, [self.digits])


def game24_mask(action_texts, conditions):
    """The Game of 24's state mask for rows whose conditions (sorted digit strings) are `conditions` (one per row,
    or one for every row): digits at k = 0, 2, 4, 6, each only while the row's condition has a copy of it left;
    operators at k = 1, 3, 5; the stop only at k = 7 (and only the stop from there on)."""
    texts = list(action_texts)
    values = torch.tensor([GAME24_DIGITS.index(t) if len(t) == 1 and t in GAME24_DIGITS else -1 for t in texts])
    is_op = torch.tensor([len(t) == 1 and t in EXPR24_OPS for t in texts])
    only_stop = torch.zeros(len(texts), dtype=torch.bool)
    only_stop[-1] = True
    have = torch.tensor([[c.count(d) for d in GAME24_DIGITS] for c in conditions])  # [rows or 1, 9] copies

    def allowed(prev, k):
        n, device = len(prev), prev.device
        if k >= GAME24_LENGTH:
            return only_stop.to(device).expand(n, -1)
        if k % 2:
            return is_op.to(device).expand(n, -1)
        v = values.to(device)
        used = (v[prev][..., None] == torch.arange(len(GAME24_DIGITS), device=device)).sum(1)  # [n, 9]
        left = (have.to(device) - used) > 0
        return (v >= 0) & left[:, v.clamp(min=0)]
    return allowed


