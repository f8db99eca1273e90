"""
Tasks and the per-prefix log reward of METHOD.md §1:

    log R(s_k T) = kappa * log P_ref(s_k T) + u_k,    u_k = lambda_r * S(s_k)

A task is a small object following `Task`'s protocol (score, validity, canonical form, which tokens and
which action at each state are allowed). The built-in SMILES and Expr24 tasks follow it, and so does a user's
own task, loaded by `load_task` from `--task my_module:score` (a plain function over texts) or
`--task my_file.py:MyTask` (a class): see METHOD.md §6 and README "Your own task in 20 lines".
"""
import functools
import importlib
import importlib.util
import os
import sys

import torch
from rdkit import Chem, RDLogger, rdBase
from rdkit.Chem import QED

RDLogger.DisableLog("rdApp.*")  # invalid SMILES are the common case while training: keep stderr readable

PAPER_SCAFFOLD = "O=C1Nc2cc(*)ccc2N1"


class TaskError(ValueError):
    """Bad task configuration or a misbehaving score function; train.py and sample.py print it as one line."""


class Task:
    """The protocol every task follows. Subclass it (or write a class with the same attributes) and override
    `score`; everything else has a sensible default.

    score(text) -> float in [0, 1]     the task score S of a finished object (0 when invalid)
    score_batch(texts) -> list         the same for many texts at once (override when batching pays)
    is_valid(text) -> bool             for Acc and for the replay buffer's validity term
    canonical(text) -> str             dedupe key (two texts for the same object share it)
    full(text) -> str                  the finished object (e.g. the molecule with its scaffold)
    state_mask(action_texts[, max_len]) None, or a function (prev [B, k] action columns, k) -> [B, A] bool of
                                       the actions allowed next (A = len(action_texts); the last is stop);
                                       max_len (L_max) is passed when the method takes it
    charset                            characters a vocabulary token may use (None: any non-special token)
    max_token_chars                    longest token text allowed (None: no limit)
    defaults                           model / min_len / max_len used when the flags are not given
    chemical                           sample.py adds chemistry metrics (FPDiv, IntDiv, ...) when True
    similarity                         SubM's similarity: "tanimoto" (Morgan bits of full()) or "bigram"
    """
    name = "task"
    charset = None
    max_token_chars = None
    defaults = dict(model="prior", min_len=1, max_len=10)
    chemical = False
    similarity = "bigram"

    def score(self, text):
        raise NotImplementedError

    def score_batch(self, texts):
        return [self.score(t) for t in texts]

    def is_valid(self, text):
        return True

    def canonical(self, text):
        return self.full(text)

    def full(self, text):
        return text

    def state_mask(self, action_texts):
        return None


class SmilesTask(Task):
    """Complete the `*` of a scaffold with the generated side chain and score the molecule with QED; with
    scaffold '' the text is the whole molecule. attach='graph' (default) joins the fragment '[*:1]' + text to the
    scaffold's '*' on the molecular graph (RDKit molzip), so ring labels inside the side chain stay its own;
    attach='string' pastes the text into the scaffold string as the paper does, where a side chain writing
    ring label 1 or 2 silently rewires this scaffold (METHOD.md §6)."""
    name = "smiles"
    max_token_chars = None  # multi-character tokens are fine ("Cl", "[nH]", "CC(=O)" in a BPE vocabulary)
    defaults = dict(model="prior", min_len=2, max_len=10)  # the paper's L_max = 10 (the authors' runs: L_min = 1)
    chemical, similarity = True, "tanimoto"
    # characters of organic-subset SMILES (Cl and Br need l and r; H and @ for bracket atoms like [C@@H]);
    # a vocabulary token is allowed iff its text uses only these. More letters would admit English BPE tokens.
    charset = frozenset("BCNOPSFIHbcnopslr0123456789[]()=#-+/\\.%@")

    def __init__(self, scaffold=PAPER_SCAFFOLD, attach="graph", grammar=True):
        if attach not in ("graph", "string"):
            raise TaskError(f"--attach must be 'graph' or 'string', not {attach!r}")
        if scaffold:
            if scaffold.count("*") != 1:
                raise TaskError(f"scaffold {scaffold!r} must contain exactly one '*' to fill")
            if _parse(scaffold) is None:
                raise TaskError(f"scaffold {scaffold!r} does not parse as SMILES")
        self.scaffold, self.attach, self.grammar = scaffold, attach, grammar
        # a side chain's reference is the prior fine-tuned on side chains: the whole-molecule prior almost never
        # stops within 10 tokens, which makes the target degenerate (all mass at L_max; METHOD.md §6.1)
        self.defaults = dict(self.defaults, model="prior_sidechain" if scaffold else "prior")
        self._scaffold_mol = _parse(scaffold.replace("*", "[*:1]")) if scaffold and attach == "graph" else None

    def state_mask(self, action_texts, max_len=None):
        """SMILES syntax (grammar.py): balanced branches, paired ring bonds, no stop inside either or after a bond,
        and what is open always fits before L_max. None with grammar=False (--no-smiles-mask)."""
        if not self.grammar:
            return None
        from grammar import SmilesMask
        return SmilesMask(action_texts, max_len if max_len is not None else 1 << 30, side_chain=bool(self.scaffold))

    def full(self, text):
        """The finished object: canonical SMILES of the molecule, or for an invalid text a readable stand-in."""
        return self._analyse(text)[2] or self._pasted(text)

    def _pasted(self, text):
        return self.scaffold.replace("*", text) if self.scaffold else text

    def _molecule(self, text):
        if not text:
            return None
        if self._scaffold_mol is None:
            return _parse(self._pasted(text))
        fragment = _parse("[*:1]" + text)
        if fragment is None or not _one_bond_to_attach(fragment):
            return None  # e.g. "(C)C": the attachment point would get two bonds
        try:
            with rdBase.BlockLogs():
                mol = Chem.molzip(self._scaffold_mol, fragment)
                Chem.SanitizeMol(mol)
            return mol
        except Exception:  # a valence or kekulisation failure: not a molecule
            return None

    @functools.lru_cache(maxsize=1 << 20)
    def _analyse(self, text):
        """(valid, score, canonical SMILES or None): the molecule is built and parsed once per distinct text."""
        mol = self._molecule(text)
        if mol is None:
            return False, 0.0, None
        return True, self._score(mol), Chem.MolToSmiles(mol)

    def _score(self, mol):
        try:
            return float(QED.qed(mol))
        except Exception:  # RDKit raises on a few exotic valences: an unscorable molecule earns nothing
            return 0.0

    def score(self, text):
        return self._analyse(text)[1]

    def is_valid(self, text):
        return self._analyse(text)[0]

    def canonical(self, text):
        """Dedupe key: canonical SMILES of the full molecule (the pasted string when it is not one)."""
        return self.full(text)


def _one_bond_to_attach(fragment):
    dummies = [a for a in fragment.GetAtoms() if a.GetAtomicNum() == 0]
    return len(dummies) == 1 and dummies[0].GetDegree() == 1


def _parse(smiles):
    try:
        with rdBase.BlockLogs():
            return Chem.MolFromSmiles(smiles)
    except Exception:
        return None


def builtin_tasks():
    """The built-in tasks by name; the arithmetic ones live in arithmetic.py (imported here, on first use)."""
    import arithmetic
    return {"smiles": SmilesTask, **arithmetic.TASKS}


class ScoreFunctionTask(Task):
    """A user's task as a plain function `score(texts: list[str]) -> list[float]` with values in [0, 1] (TRL's
    convention for reward functions). Every text counts as valid and is its own canonical form; the alphabet
    comes from --charset (or the whole vocabulary), the lengths and the reference model from the flags."""

    def __init__(self, fn, name, charset=None):
        self.fn, self.name = fn, name
        self.charset = frozenset(charset) if charset else None
        self._cache = {}

    def score(self, text):
        return self.score_batch([text])[0]

    def score_batch(self, texts):
        """Calls the function once for the texts not seen before, and checks what it returns."""
        new = list(dict.fromkeys(t for t in texts if t not in self._cache))
        if new:
            for text, value in zip(new, self._call(new)):
                self._cache[text] = value
        return [self._cache[t] for t in texts]

    def _call(self, texts):
        try:
            values = list(self.fn(list(texts)))
        except Exception as e:
            raise TaskError(f"score function {self.name} raised {type(e).__name__} on texts such as "
                            f"{texts[0]!r}: {e}") from None
        if len(values) != len(texts):
            raise TaskError(f"score function {self.name} returned {len(values)} values for {len(texts)} texts")
        for text, value in zip(texts, values):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise TaskError(f"score function {self.name} returned {value!r} for {text!r}: not a number") from None
            if not 0.0 <= value <= 1.0:  # also catches NaN
                raise TaskError(f"score function {self.name} returned {value!r} for {text!r}: "
                                f"scores must be numbers in [0, 1]")
        return [float(v) for v in values]


def load_task(spec, scaffold=PAPER_SCAFFOLD, attach="graph", charset=None, smiles_mask=True):
    """A built-in task by name ('smiles', 'expr24'), or a user's: 'module:attr' or 'path/to/file.py:attr', where
    attr is a Task class (instantiated without arguments) or a plain score function over a list of texts.
    Loading a user's task runs that user's code, as `--task` asks; nothing else is ever imported from a name."""
    if spec == "smiles":
        return SmilesTask(scaffold, attach, smiles_mask)
    tasks = builtin_tasks()
    if spec in tasks:
        return tasks[spec]()
    if ":" not in spec:
        raise TaskError(f"unknown task {spec!r}: use one of {sorted(tasks)}, 'my_module:score' or 'my_file.py:score'")
    where, attr = spec.rsplit(":", 1)
    module = _import(where, spec)
    obj = getattr(module, attr, None)
    if obj is None:
        raise TaskError(f"task {spec!r}: {where} has no attribute {attr!r}")
    if isinstance(obj, type):
        try:
            task = obj()
        except Exception as e:
            raise TaskError(f"task {spec!r}: {attr}() raised {type(e).__name__}: {e}") from None
        if not callable(getattr(task, "score", None)):
            raise TaskError(f"task {spec!r}: class {attr} has no score(text) method")
        for name, value in vars(Task).items():  # a class written without subclassing Task gets the defaults
            if not name.startswith("_") and not hasattr(task, name):
                setattr(task, name, value.__get__(task) if callable(value) else value)
        if task.name == Task.name:
            task.name = spec
        return task
    if not callable(obj):
        raise TaskError(f"task {spec!r}: {attr} is neither a score function nor a task class")
    return ScoreFunctionTask(obj, spec, charset)


def _import(where, spec):
    try:
        if where.endswith(".py"):
            if not os.path.isfile(where):
                raise TaskError(f"task {spec!r}: no file {where!r}")
            name = "user_task_" + os.path.splitext(os.path.basename(where))[0]
            loader = importlib.util.spec_from_file_location(name, where)
            module = importlib.util.module_from_spec(loader)
            loader.loader.exec_module(module)
            return module
        if os.getcwd() not in sys.path:  # `--task my_module:score` run from the folder holding my_module.py
            sys.path.insert(0, os.getcwd())
        return importlib.import_module(where)
    except TaskError:
        raise
    except Exception as e:  # ImportError, SyntaxError, an error raised while the module runs
        raise TaskError(f"task {spec!r}: cannot import {where}: {type(e).__name__}: {e}") from None


def allowed_token_ids(tokenizer, charset, max_chars=None):
    """Ids of vocabulary tokens whose decoded text is non-empty and made only of `charset` characters (any, None)
    (and at most `max_chars` characters long, when given: Expr24 allows single characters only).
    Works from the vocabulary itself, so it fits atom tokenizers and the BPE vocabularies of general LLMs."""
    special = set(tokenizer.all_special_ids)
    ids = [i for i in range(len(tokenizer)) if i not in special]
    texts = tokenizer.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return [i for i, t in zip(ids, texts)
            if t and (charset is None or set(t) <= charset) and (max_chars is None or len(t) <= max_chars)]


def prefix_scores(task, token_texts, tokens, lengths, max_len):
    """S(s_k) for every prefix k = 0..max_len of every row, as a [B, max_len + 1] float tensor (0 past tau).
    `token_texts[id]` is the decoded text of one token; a prefix's text is the concatenation."""
    texts = []  # every prefix's text, row by row; then one score_batch call for the batch
    for row, tau in zip(tokens.tolist(), lengths.tolist()):
        pieces = [token_texts[t] for t in row[:tau]]
        texts += ["".join(pieces[:k]) for k in range(tau + 1)]
    values = iter(task.score_batch(texts))
    scores = torch.zeros(len(tokens), max_len + 1, dtype=torch.float64)
    for b, tau in enumerate(lengths.tolist()):
        scores[b, :tau + 1] = torch.tensor([next(values) for _ in range(tau + 1)], dtype=torch.float64)
    return scores


def log_reward(log_ref_stop, scores, kappa=1.0, lam=50.0):
    """log R(s_k T) = kappa * log P_ref(s_k T) + lam * S(s_k); returns (log_r, u), both [B, T]."""
    u = lam * scores.to(log_ref_stop.dtype)
    return kappa * log_ref_stop + u, u
