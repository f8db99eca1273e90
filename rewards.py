"""
Task scores S(x) and the per-prefix log reward of SPEC §1:

    log R(s_k T) = kappa * log P_ref(s_k T) + u_k,    u_k = lambda_r * S(s_k)

A task is a small object with four methods; `TASKS` maps --task names to classes.
To add a scorer (logP, SA score, a docking proxy), copy SmilesTask and change `_score`.
"""
import functools
import itertools
from fractions import Fraction

import numpy as np
import torch
from rdkit import Chem, RDLogger
from rdkit.Chem import QED

RDLogger.DisableLog("rdApp.*")  # invalid SMILES are the common case while training: keep stderr readable

PAPER_SCAFFOLD = "O=C1Nc2cc(*)ccc2N1"


class TaskError(ValueError):
    """Bad task configuration (e.g. a scaffold that does not parse); train.py prints it as one line."""


class SmilesTask:
    """Complete the `*` of a scaffold with the generated fragment (string substitution, as in the paper)
    and score the molecule with QED; with scaffold '' the fragment is the whole molecule."""
    name = "smiles"
    max_token_chars = None  # multi-character tokens are fine ("Cl", "[nH]", "CC(=O)" in a BPE vocabulary)
    defaults = dict(model="prior", min_len=2, max_len=10)  # the paper's L_max = 10 (the authors' configs: L_min = 2)
    # characters of organic-subset SMILES (Cl and Br need l and r; H and @ for bracket atoms like [C@@H]);
    # a vocabulary token is allowed iff its text uses only these. More letters would admit English BPE tokens.
    charset = frozenset("BCNOPSFIHbcnopslr0123456789[]()=#-+/\\.%@")

    def __init__(self, scaffold=PAPER_SCAFFOLD):
        if scaffold:
            if scaffold.count("*") != 1:
                raise TaskError(f"scaffold {scaffold!r} must contain exactly one '*' to fill")
            if Chem.MolFromSmiles(scaffold) is None:
                raise TaskError(f"scaffold {scaffold!r} does not parse as SMILES")
        self.scaffold = scaffold

    def full(self, text):
        """The finished object: the scaffold with `*` replaced by the generated text."""
        return self.scaffold.replace("*", text) if self.scaffold else text

    @functools.lru_cache(maxsize=1 << 20)
    def _mol_and_score(self, text):
        mol = _parse(self.full(text)) if text else None
        return (mol is not None), (self._score(mol) if mol is not None else 0.0)

    def _score(self, mol):
        try:
            return float(QED.qed(mol))
        except Exception:  # RDKit raises on a few exotic valences: an unscorable molecule earns nothing
            return 0.0

    def score(self, text):
        return self._mol_and_score(text)[1]

    def is_valid(self, text):
        return self._mol_and_score(text)[0]

    def canonical(self, text):
        """Dedupe key: canonical SMILES of the full molecule (the raw string when it does not parse)."""
        mol = _parse(self.full(text)) if text else None
        return Chem.MolToSmiles(mol) if mol is not None else self.full(text)


def _parse(smiles):
    try:
        return Chem.MolFromSmiles(smiles)
    except Exception:
        return None


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


class Expr24Task:
    """The paper's second benchmark: an arithmetic expression over single digits and + - * / (at most 5 numbers)
    with S = 1[value == 24] exactly; a prefix that is already a complete expression worth 24 scores 1 too.
    The whole solution set is known (`solutions`), so sample.py measures mode coverage exactly."""
    name = "expr24"
    defaults = dict(model=None, min_len=3, max_len=9)  # model None: train.py builds a tiny character-level GPT-2
    charset = frozenset(EXPR24_DIGITS + EXPR24_OPS)
    max_token_chars = 1  # single digits: a BPE token like "24" or "*3" would leave the paper's grammar
    target, max_numbers = 24, 5

    def full(self, text):
        return text

    def score(self, text):
        return 1.0 if evaluate_expression(text, self.max_numbers) == self.target else 0.0

    def is_valid(self, text):
        """In the grammar and defined (no division by zero)."""
        return evaluate_expression(text, self.max_numbers) is not None

    def canonical(self, text):
        return text  # 3*8 and 8*3 are different solutions: no normalisation

    def solutions(self, min_len=0, max_len=None):
        """The solution set restricted to generated lengths min_len..max_len (characters = tokens)."""
        return tuple(s for s in expr24_solutions(self.max_numbers, self.target)
                     if min_len <= len(s) <= (max_len if max_len is not None else len(s)))

    def random_objects(self, n, rng, min_len=3, max_len=9):
        """`n` expressions drawn uniformly from the valid ones of each length, the length uniform over the odd
        lengths in min_len..max_len. Valid means no division by zero, and that is a condition on each (operator,
        digit) step alone, so a uniform first digit and uniform steps among the 39 defined ones are exactly
        uniform, no rejection needed. train.py warm-starts its scratch model on these: a random model writes
        about one correct expression in 10^4 and gives training no reward to learn from, while this P_ref makes
        the target P_ref(x) exp(lam S(x)) near uniform over the solutions of each length."""
        lengths = [k for k in range(max(min_len, 1), min(max_len, 2 * self.max_numbers - 1) + 1) if k % 2]
        if not lengths:
            raise TaskError(f"no expression has {min_len}..{max_len} characters")
        steps = [op + d for op in EXPR24_OPS for d in EXPR24_DIGITS if op + d != "/0"]
        sizes = rng.choice(lengths, size=n) // 2
        first = rng.integers(len(EXPR24_DIGITS), size=n)
        rest = rng.integers(len(steps), size=(n, max(sizes, default=0)))
        return [EXPR24_DIGITS[f] + "".join(steps[s] for s in row[:m]) for f, row, m in zip(first, rest, sizes)]


TASKS = {"smiles": SmilesTask, "expr24": Expr24Task}


def allowed_token_ids(tokenizer, charset, max_chars=None):
    """Ids of vocabulary tokens whose decoded text is non-empty and made only of `charset` characters
    (and at most `max_chars` characters long, when given: Expr24 allows single characters only).
    Works from the vocabulary itself, so it fits atom tokenizers and the BPE vocabularies of general LLMs."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return [i for i, t in zip(ids, texts) if t and set(t) <= charset and (max_chars is None or len(t) <= max_chars)]


def prefix_scores(task, token_texts, tokens, lengths, max_len):
    """S(s_k) for every prefix k = 0..max_len of every row, as a [B, max_len + 1] float tensor (0 past tau).
    `token_texts[id]` is the decoded text of one token; a prefix's text is the concatenation."""
    scores = torch.zeros(len(tokens), max_len + 1, dtype=torch.float64)
    for b, (row, tau) in enumerate(zip(tokens.tolist(), lengths.tolist())):
        text = ""
        for k in range(tau + 1):
            scores[b, k] = task.score(text)
            if k < tau:
                text += token_texts[row[k]]
    return scores


def log_reward(log_ref_stop, scores, kappa=1.0, lam=50.0):
    """log R(s_k T) = kappa * log P_ref(s_k T) + lam * S(s_k); returns (log_r, u), both [B, T]."""
    u = lam * scores.to(log_ref_stop.dtype)
    return kappa * log_ref_stop + u, u
