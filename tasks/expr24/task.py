"""
The arithmetic tasks (METHOD.md §6.2): Expr24, an expression over single digits and + - * / worth exactly 24, with
its whole solution set enumerated, so the target and the coverage are known exactly. They follow rewards.Task's
protocol like every other task.
"""
import functools
import itertools
import re
from fractions import Fraction

import numpy as np
import torch

from rewards import Task, TaskError

EXPR24_DIGITS, EXPR24_OPS = "0123456789", "+-*/"


@functools.lru_cache(maxsize=1 << 20)
def evaluate_expression(text, max_numbers=5):
    """Exact value (a Fraction) of `d op d op ... d`: single digits alternating with + - * /, no parentheses,
    at most `max_numbers` numbers, * and / before + and -, left to right. None when `text` is not in that
    grammar (empty, ends in an operator, two digits in a row, ...) or divides by zero. No eval()."""
    if len(text) % 2 == 0 or len(text) > 2 * max_numbers - 1:  # also rejects ''
        return None
    digits, ops = text[0::2], text[1::2]
    if any(c not in EXPR24_DIGITS for c in digits) or any(c not in EXPR24_OPS for c in ops):
        return None
    total, term, sign = Fraction(0), Fraction(int(digits[0])), 1  # sum of finished terms, the open product term
    for op, c in zip(ops, digits[1:]):
        d = int(c)
        if op == "*":
            term *= d
        elif op == "/":
            if d == 0:
                return None
            term /= d
        else:
            total, term, sign = total + sign * term, Fraction(d), (1 if op == "+" else -1)
    return total + sign * term


@functools.cache
def solution_set(max_numbers=5, target=24):
    """expr24_solutions as a frozenset, made once: what Expr24Task.score looks texts up in."""
    return frozenset(expr24_solutions(max_numbers, target))


@functools.cache
def expr24_solutions(max_numbers=5, target=24):
    """Every expression of the grammar above with value exactly `target`, as a tuple of strings (113,662 for
    the paper's 5 numbers and 24; about a second). Vectorised over the digits, one op pattern at a time:
    with the pattern fixed, precedence is plain Python control flow and every value is an exact integer
    fraction num/den (den = product of the divisor digits, so |num| < 5 * 9^5 * 9^4 fits int64 easily);
    value == target is num == target * den, and den == 0 exactly when some divisor digit is 0."""
    out = []
    for n in range(1, max_numbers + 1):
        digits = np.indices((10,) * n, dtype=np.int64).reshape(n, -1)  # digits[i] = the i-th number of all 10^n digit tuples
        for ops in itertools.product(EXPR24_OPS, repeat=n - 1):
            num, den = 0, 1  # the finished terms' sum, num / den
            t_num, t_den, sign = digits[0], 1, 1  # the open product term
            for op, d in zip(ops, digits[1:]):
                if op == "*":
                    t_num = t_num * d
                elif op == "/":
                    t_den = t_den * d
                else:
                    num, den = num * t_den + sign * t_num * den, den * t_den
                    t_num, t_den, sign = d, 1, (1 if op == "+" else -1)
            num, den = num * t_den + sign * t_num * den, den * t_den
            hit = digits[:, (den != 0) & (num == target * den)]
            chars = np.empty((hit.shape[1], 2 * n - 1), dtype=np.uint8)  # the strings, as ASCII rows
            chars[:, 0::2] = hit.T + ord("0")
            chars[:, 1::2] = np.frombuffer("".join(ops).encode(), dtype=np.uint8)
            out += chars.view(f"S{2 * n - 1}").ravel().astype(str).tolist()
    return tuple(out)


class Expr24Task(Task):
    """The paper's second benchmark: an arithmetic expression over single digits and + - * / (at most 5 numbers)
    with S = 1[value == 24] exactly; a prefix that is already a complete expression worth 24 scores 1 too.
    The whole solution set is known (`solutions`), so sample.py measures mode coverage exactly."""
    name = "expr24"
    # model None: train.py builds a tiny character-level GPT-2 (153k parameters) and warm-starts it on random_objects.
    # Optimisation, the same for every objective: what the oracle (--loss oracle, maximum likelihood on exact samples
    # of p*) needs to reach the target within about 20 minutes of one CPU core: 27,000 steps of 128 at lr 3e-3
    # (cosine) took it from q(Sol) 0.005 and KL(p*||q) 5.34 to 0.815 and 0.400 (results/oracle/NOTES.md) in 18 CPU
    # minutes; a default RapTB run (the recipe below) takes about 42 (2,535 training CPU s, four runs sharing 2 cores).
    defaults = dict(model=None, min_len=3, max_len=9, lr=3e-3, batch_size=128, grad_accum=1, steps=27000)
    # The GFlowNet losses' buffer, exploration and logZ (RESULTS.md, "five numbers, explored by the masked uniform
    # policy" and "four seeds of the default"): a buffer that keeps every solution drawn, 4,096 draws a step from the
    # masked uniform policy to fill it, logZ from those draws (--log-z ref), the rows with no solution counted
    # weighing 16, residuals bounded at 4.
    # 0.85, 0.87, 0.73 and 0.85 of the oracle's reduction in KL(p*||q) at 27,000 steps (four seeds; TB 0.79, 0.72);
    # without the buffer or the draws the runs collapse (KL(p*||q) 10.6 at the end against the reference's 5.3).
    gflownet_defaults = dict(replay="rp", buffer_size=131072, explore_ref=4096, explore_from="uniform", log_z_mode="ref",
                             anchor=16.0, huber=4.0, replay_valid_only=True, buffer_validity="score")
    scratch_model = dict(n_layer=3, n_embd=64, n_head=4)  # train.py's scratch reference (model.build_scratch_model)
    digits = EXPR24_DIGITS
    charset = frozenset(EXPR24_DIGITS + EXPR24_OPS)
    max_token_chars = 1  # single digits: a BPE token like "24" or "*3" would leave the paper's grammar
    target, max_numbers = 24, 5

    def full(self, text):
        return text

    def score(self, text):
        """1[value == 24], read from the enumerated solution set: a set lookup costs about 1/200 of the exact
        Fraction evaluation (python -m bench expr24), which --explore-ref pays on every draw."""
        return 1.0 if text in solution_set(self.max_numbers, self.target) else 0.0

    def is_valid(self, text):
        """In the grammar and defined: with single digits and no parentheses a division by zero is a '/0', so no
        evaluation is needed (tested equal to evaluate_expression's; 1/13 of its cost on 4,096 new texts)."""
        return re.fullmatch(r"\d(?:[-+*/]\d){0,%d}" % (self.max_numbers - 1), text, re.ASCII) is not None \
            and "/0" not in text

    def canonical(self, text):
        return text  # 3*8 and 8*3 are different solutions: no normalisation

    def state_mask(self, action_texts):
        """The grammar as a state mask (METHOD.md §1): a digit at even positions k = 0, 2, .., an operator or the
        stop at odd ones (so the stop only right after a digit), no 0 right after '/', only the stop after
        max_numbers digits. It reads k and the last action alone, so every sample is a valid expression."""
        texts = list(action_texts)
        digit = torch.tensor([len(t) == 1 and t in EXPR24_DIGITS for t in texts])
        after_digit = torch.tensor([len(t) == 1 and t in EXPR24_OPS for t in texts])
        after_digit[-1] = True  # the stop
        only_stop = torch.zeros(len(texts), dtype=torch.bool)
        only_stop[-1] = True
        not_zero = torch.tensor([t != "0" for t in texts])
        slash = texts.index("/") if "/" in texts[:-1] else None
        last_k = 2 * self.max_numbers - 1

        def allowed(prev, k):
            n = len(prev)
            if k % 2:
                rows = only_stop if k >= last_k else after_digit
                return rows.to(prev.device).expand(n, -1)
            rows = digit.to(prev.device).expand(n, -1)
            if k == 0 or slash is None:
                return rows
            return rows & (not_zero.to(prev.device) | (prev[:, -1] != slash)[:, None])
        return allowed

    def solutions(self, min_len=0, max_len=None):
        """The solution set restricted to generated lengths min_len..max_len (characters = tokens)."""
        return tuple(s for s in expr24_solutions(self.max_numbers, self.target)
                     if min_len <= len(s) <= (max_len if max_len is not None else len(s)))

    def random_objects(self, n, rng, min_len=3, max_len=9):
        """`n` expressions drawn uniformly from all the valid ones with min_len..max_len characters. Valid means no
        division by zero, and that is a condition on each (operator, digit) step alone: there are 10 * 39^m valid
        expressions with m steps, so the length is drawn in proportion to that (97.4% of them have all 5 of the
        paper's 5 numbers), then a uniform first digit and uniform steps among the 39 defined ones, which is
        exactly uniform, no rejection needed. train.py warm-starts its scratch model on these: a random model
        writes about one correct expression in 10^4 and gives training no reward to learn from, while this
        P_ref makes the target P_ref(x) exp(lam S(x)) near uniform over all the solutions (a prior uniform per
        length instead would put 38% of the target on the four 3-character solutions)."""
        lengths = [k for k in range(max(min_len, 1), min(max_len, 2 * self.max_numbers - 1) + 1) if k % 2]
        if not lengths:
            raise TaskError(f"no expression has {min_len}..{max_len} characters")
        steps = [op + d for op in EXPR24_OPS for d in self.digits if op + d != "/0"]  # digits 1-9: 9 * 36^m
        counts = np.array([float(len(steps)) ** (k // 2) for k in lengths])
        sizes = rng.choice(lengths, size=n, p=counts / counts.sum()) // 2
        first = rng.integers(len(self.digits), size=n)
        rest = rng.integers(len(steps), size=(n, max(sizes, default=0)))
        return [self.digits[f] + "".join(steps[s] for s in row[:m]) for f, row, m in zip(first, rest, sizes)]


class Expr24AuthorsTask(Expr24Task):
    """Expr24 as the authors' code defines it (METHOD.md §10): digits 1-9 only (their token list has no 0; 57,904
    solutions of 3..9 characters), and their reward, which subtracts the reference's log-prob of the trajectory's
    state L_max from every prefix in proportion to its score: a solution of length L_max earns log R = lambda
    exactly, a shorter one kappa log P_ref(x) + lambda, anything else kappa log P_ref(x) (ComDec/ChemGFN,
    chemgfn/models/reward.py, PrefixShapedReward)."""
    digits = "123456789"
    charset = frozenset(digits + EXPR24_OPS)

    def score(self, text):
        return 0.0 if "0" in text else super().score(text)

    def is_valid(self, text):
        return "0" not in text and super().is_valid(text)

    def solutions(self, min_len=0, max_len=None):
        return tuple(s for s in super().solutions(min_len, max_len) if "0" not in s)

    @staticmethod
    def prefix_log_reward(log_ref, scores, lengths, kappa, lam, max_len):
        """(log R(s_k T), u_k) at every prefix of every row ([B, L_max + 1]): log R = kappa (log P_ref(s_k T) -
        S(s_k) log P_ref(s_{L_max} T)) + lam S(s_k) in a row that reaches L_max (so exactly lam at its end when it
        is a solution), kappa log P_ref(s_k T) + lam S(s_k) in a shorter one; u_k = log R - kappa log P_ref(s_k T)."""
        full = (lengths == max_len).to(log_ref.device)[:, None]
        at_end = torch.where(full, log_ref[:, max_len:max_len + 1], 0.0)
        scores = scores.to(log_ref.dtype)
        return kappa * (log_ref - scores * at_end) + lam * scores, scores * (lam - kappa * at_end)

    @staticmethod
    def object_log_reward(log_ref, scores, lengths, kappa, lam, max_len):
        """log R(x) of finished objects (arrays): the value prefix_log_reward gives at k = tau."""
        full = np.asarray(lengths) == max_len
        return kappa * np.asarray(log_ref) * (1 - np.asarray(scores) * full) + lam * np.asarray(scores)

