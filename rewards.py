"""
Tasks and the per-prefix log reward of METHOD.md §1:

    log R(s_k T) = kappa * log P_ref(s_k T) + u_k,    u_k = lambda_r * S(s_k)

A task is a small object following `Task`'s protocol (score, validity, canonical form, which tokens and
which action at each state are allowed). The built-in tasks (tasks/<name>/task.py) follow it, and so does a user's
own task, loaded by `load_task` from `--task my_module:score` (a plain function over texts) or
`--task my_file.py:MyTask` (a class): see METHOD.md §6 and README "Your own task in 20 lines".
"""
import importlib
import inspect
import importlib.util
import os
import sys
import threading

import torch


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


# the built-in tasks, loaded by the same path as a user's `--task module:Class`
BUILTIN = {"smiles": "tasks.smiles.task:SmilesTask", "expr24": "tasks.expr24.task:Expr24Task",
           "game24": "tasks.game24.task:Game24Task"}


class ScoreFunctionTask(Task):
    """A user's task as a plain function `score(texts: list[str]) -> list[float]` with values in [0, 1] (TRL's
    convention for reward functions). Every text counts as valid and is its own canonical form; the alphabet
    comes from --charset (or the whole vocabulary), the lengths and the reference model from the flags."""

    def __init__(self, fn, name, charset=None, timeout=300.0):
        self.fn, self.name, self.timeout = fn, name, timeout
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
        return limited(self.fn, f"score function {self.name}", self.timeout)(texts)


def limited(score_batch, who, timeout):
    """`score_batch` (a user's code) under the time limit, its scores checked: misbehaviour is one named line."""
    def checked(texts):
        texts = list(texts)
        return checked_scores(call_with_time_limit(score_batch, texts, timeout, who), texts, who)
    return checked


def call_with_time_limit(fn, texts, timeout, who):
    """fn(texts) in a thread of its own, so that a hang is reported after `timeout` seconds (--score-timeout)
    rather than never, and an exit or an exception inside it is named. The thread of a hung call is left behind
    (Python cannot stop it): the run is over anyway."""
    result = {}

    def target():
        try:
            result["values"] = fn(texts)
        except BaseException as e:  # SystemExit too: sys.exit() inside a score function ends nothing but the call
            result["error"] = e

    thread = threading.Thread(target=target, daemon=True, name="score-function")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TaskError(f"{who} did not return within {timeout:g} s on {len(texts)} texts (--score-timeout); "
                        f"is it waiting for something?")
    e = result.get("error")
    if isinstance(e, SystemExit):
        raise TaskError(f"{who} called sys.exit({e.code!r}) on texts such as {texts[0]!r}; a score function must "
                        f"return its scores")
    if e is not None:
        raise TaskError(f"{who} raised {type(e).__name__} on texts such as {texts[0]!r}: {e}")
    return result["values"]


def checked_scores(values, texts, who):
    """`values` as a list of floats, one per text in [0, 1]; anything else is a TaskError naming what came back."""
    if values is None or isinstance(values, (str, bytes, dict)) or not hasattr(values, "__iter__"):
        raise TaskError(f"{who} returned {short_repr(values)} ({type(values).__name__}) for {len(texts)} texts; "
                        f"it must return a list of {len(texts)} numbers in [0, 1], one per text")
    values = list(values)
    if len(values) != len(texts):
        raise TaskError(f"{who} returned {len(values)} values for {len(texts)} texts; it must return one per text")
    for text, value in zip(texts, values):
        number = None if isinstance(value, (str, bytes)) else _as_float(value)
        if number is None:
            raise TaskError(f"{who} returned {short_repr(value)} ({type(value).__name__}) for {text!r}: not a number")
        if not 0.0 <= number <= 1.0:  # also catches NaN
            raise TaskError(f"{who} returned {value!r} for {text!r}: scores must be numbers in [0, 1]")
    return [float(v) for v in values]


def _as_float(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def short_repr(value, limit=60):
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


def builtin_task(name):
    """The class of a built-in task (its `defaults`, for --help), imported as `--task` would."""
    where, attr = BUILTIN[name].rsplit(":", 1)
    return getattr(importlib.import_module(where), attr)


def load_task(spec, **options):
    """A built-in task by name (BUILTIN), or a user's: 'module:attr' or 'path/to/file.py:attr', where attr is a Task
    class or a plain score function over a list of texts. A class is instantiated with those of `options` (scaffold,
    attach, smiles_mask, charset: the flags) that its __init__ names; a score function gets `charset`. Loading a
    user's task runs that user's code, as `--task` asks; nothing else is ever imported from a name."""
    spec = BUILTIN.get(spec, spec)
    if ":" not in spec:
        raise TaskError(f"unknown task {spec!r}: use one of {sorted(BUILTIN)}, 'my_module:score' or "
                        f"'my_file.py:score'")
    where, attr = spec.rsplit(":", 1)
    module = _import(where, spec)
    obj = getattr(module, attr, None)
    if obj is None:
        raise TaskError(f"task {spec!r}: {where} has no attribute {attr!r}")
    if isinstance(obj, type):
        return _instantiate(obj, spec, attr, options)
    if not callable(obj):
        raise TaskError(f"task {spec!r}: {attr} is neither a score function nor a task class")
    return ScoreFunctionTask(obj, spec, options.get("charset"), options.get("score_timeout", 300.0))


def _instantiate(cls, spec, attr, options):
    try:
        accepted = inspect.signature(cls).parameters
        task = cls(**{k: v for k, v in options.items() if k in accepted})
    except TaskError:
        raise
    except Exception as e:
        raise TaskError(f"task {spec!r}: {attr}() raised {type(e).__name__}: {e}") from None
    if not callable(getattr(task, "score", None)):
        raise TaskError(f"task {spec!r}: class {attr} has no score(text) method")
    for name, value in vars(Task).items():  # a class written without subclassing Task gets the defaults
        if not name.startswith("_") and not hasattr(task, name):
            setattr(task, name, value.__get__(task) if callable(value) else value)
    if task.name == Task.name:
        task.name = spec
    if spec not in BUILTIN.values():  # a user's class: time-limited and checked like a score function
        task.score_batch = limited(task.score_batch, f"task {spec}", options.get("score_timeout", 300.0))
    return task


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
    scores = torch.zeros(len(tokens), max_len + 1, dtype=torch.float64)
    # a boolean mask assigns in row-major order: row by row, each row's prefixes k = 0..tau, as `texts` lists them
    scores[torch.arange(max_len + 1) <= lengths.cpu()[:, None]] = torch.tensor(task.score_batch(texts),
                                                                              dtype=torch.float64)
    return scores


def log_reward(log_ref_stop, scores, kappa=1.0, lam=50.0):
    """log R(s_k T) = kappa * log P_ref(s_k T) + lam * S(s_k); returns (log_r, u), both [B, T]."""
    u = lam * scores.to(log_ref_stop.dtype)
    return kappa * log_ref_stop + u, u
