"""
Replay buffers for GFlowNet fine-tuning (METHOD.md §4).

- SubMBuffer:  the paper's submodular replay buffer (its greedy selection: greedy.py)
- RPBuffer:    reward-prioritised baseline (top-B by reward, duplicates dropped)
- PRTBuffer:   RP's contents, sampled 70% from the top 20% by reward (Shen et al. 2023 style)

All buffers share one interface (the contract with train.py):
    buf = make_buffer("subm", capacity=200, similarity="tanimoto")
    buf.add(items)                  # refresh with one on-policy batch of Item
    batch = buf.sample(32, rng)     # list[Item], rng a numpy Generator
    d = buf.state_dict(); buf.load_state_dict(d)

Each SubM refresh fingerprints only the new items that survive the dedupe (cached by text), keeps the
similarities among the incumbents from the last refresh and computes only the new items' rows (one
product, 32 x 232 for the paper's B = 200), then runs greedy.subm_select.
"""

import math
from dataclasses import dataclass, field, replace

import numpy as np

from greedy import subm_select
from similarity import bigram_fp, bigram_incidence, morgan_fp, morgan_tanimoto_rows, tanimoto_rows


@dataclass
class Item:
    tokens: tuple    # generated token ids (no prompt, no EOS)
    text: str        # the finished object, used for similarity (e.g. the full molecule SMILES)
    key: str         # canonical form for dedupe (canonical SMILES; the text itself for Expr24)
    score: float     # task score S(x) in [0, 1], the r(x) of METHOD.md §4
    valid: bool
    length: int      # tau, generated tokens
    fp: object = field(default=None, compare=False, repr=False)  # set once by the buffer
    # what never changes for a sequence, kept so that replaying it needs neither the reference pass nor the task:
    # log P_ref(s_k T) (float32 [T], the frozen reference) and the prefix scores S(s_k) (float64 [T]); train.py
    # sets both when the item enters (METHOD.md §2), None for items made without them
    log_ref: object = field(default=None, compare=False, repr=False)
    prefix_scores: object = field(default=None, compare=False, repr=False)


# -----------------------------------------------------------------------------
# buffers

class ReplayBuffer:
    """Shared machinery: fingerprint on entry, dedupe by canonical key (higher score wins, the
    incumbent on ties), optional validity gate, uniform sampling with replacement, state_dict.
    Subclasses only choose which items to keep when the ground set exceeds the capacity."""

    kind = None

    def __init__(self, capacity=200, similarity="tanimoto", valid_only=False):
        assert similarity in ("tanimoto", "bigram"), similarity
        self.capacity, self.similarity, self.valid_only = int(capacity), similarity, bool(valid_only)
        self.items = []
        self._fps = {}  # fingerprint by text: a molecule sampled again is not parsed again
        self._last_sim = None  # (items, their similarity matrix) of the last refresh; holds the items, so ids stay unique
        self._by_key = None  # (the items list, key -> item) of the last add, so the next looks up only its own keys

    def __len__(self):
        return len(self.items)

    def add(self, items):
        """Dedupe against the buffer by key (a higher score wins, the incumbent on ties), gate the newcomers by
        validity, and choose when over capacity. Only the newcomers' keys are looked up, so adding a batch to a
        buffer of 100,000 items costs the batch, not the buffer."""
        by_key = self._key_index()
        winners = {}  # key -> (position in `items`, item): each key's best newcomer, if it beats the incumbent
        for pos, it in enumerate(items):
            best = winners[it.key][1] if it.key in winners else by_key.get(it.key)
            if best is None or it.score > best.score:
                winners[it.key] = (pos, it)
        replaced = [key for key in winners if key in by_key]
        kept = [it for it in self.items if it.key not in winners] if replaced else self.items
        new = [it for _, it in sorted(winners.values(), key=lambda w: w[0])]
        new = [self._enter(it) for it in new if it.valid or not self.valid_only]  # losers are never fingerprinted
        ground = kept + new  # incumbents first, then the newcomers in batch order
        if len(ground) > self.capacity:
            self.items, self._by_key = self._select(ground), None
            return
        for key in replaced:
            del by_key[key]
        by_key.update((it.key, it) for it in new)
        self.items, self._by_key = ground, (ground, by_key)

    def _key_index(self):
        """key -> item over the buffer: kept from the last add while self.items is still that add's list."""
        last = self._by_key
        if last is not None and last[0] is self.items and len(last[1]) == len(self.items):
            return last[1]
        return {it.key: it for it in self.items}

    def sample(self, n, rng):
        """n items drawn uniformly with replacement."""
        self._check_can_sample(n)
        return [self.items[i] for i in rng.integers(0, len(self.items), size=n)] if n else []

    def _check_can_sample(self, n):
        if n and not self.items:
            raise ValueError("sampling from an empty replay buffer")

    # --- internals

    def _enter(self, item):
        """Fingerprint an item once, when it enters (a copy: the caller's Item is untouched)."""
        fp = item.fp
        if fp is None:
            key = (item.text, bool(item.valid))
            fp = self._fps.get(key)
            if fp is None:
                if len(self._fps) >= 1 << 17:
                    self._fps.clear()
                fp = morgan_fp(item.text, item.valid) if self.similarity == "tanimoto" else bigram_fp(item.text)
                self._fps[key] = fp
        return replace(item, tokens=tuple(item.tokens), fp=fp)

    def _sim(self, items):
        """The similarity matrix of `items`, equal to tanimoto_matrix / jaccard_matrix of their fingerprints: the
        pairs among items of the last refresh are taken from its matrix, only the other items' rows are computed."""
        n = len(items)
        old_items, old = self._last_sim or ((), None)
        where = {id(it): r for r, it in enumerate(old_items)}
        known = [b for b, it in enumerate(items) if id(it) in where]
        new = [b for b, it in enumerate(items) if id(it) not in where]
        sim = np.zeros((n, n))
        if known:
            rows = [where[id(items[b])] for b in known]
            sim[np.ix_(known, known)] = old[np.ix_(rows, rows)]
        if new:
            if self.similarity == "tanimoto":
                part = morgan_tanimoto_rows(np.stack([it.fp for it in items]), new)
            else:
                X = bigram_incidence([it.fp for it in items])
                part = tanimoto_rows(X, new) if X.shape[1] else np.zeros((len(new), n))
            sim[new] = part
            sim[:, new] = part.T
        self._last_sim = (list(items), sim)
        return sim

    @staticmethod
    def _by_score(items):
        """Indices by decreasing score; ties keep ground-set order (incumbents first)."""
        return np.argsort(-np.array([it.score for it in items]), kind="stable")

    def _select(self, ground):
        raise NotImplementedError

    # --- checkpointing: plain lists, bytes and floats only, so torch.load(weights_only=True)
    # accepts it as well as pickle / torch.load(weights_only=False)

    def _config(self):
        return dict(capacity=self.capacity, similarity=self.similarity, valid_only=self.valid_only)

    def state_dict(self):
        its = self.items
        return dict(
            kind=self.kind, config=self._config(),
            tokens=[list(it.tokens) for it in its], text=[it.text for it in its],
            key=[it.key for it in its], score=[float(it.score) for it in its],
            valid=[bool(it.valid) for it in its], length=[int(it.length) for it in its],
            fp=[np.asarray(it.fp).tobytes() for it in its],
            # the replay cache (Item.log_ref, Item.prefix_scores) as raw float32 / float64 bytes, None when absent
            log_ref=[None if it.log_ref is None else np.asarray(it.log_ref, dtype=np.float32).tobytes() for it in its],
            prefix_scores=[None if it.prefix_scores is None else np.asarray(it.prefix_scores, dtype=np.float64).tobytes()
                           for it in its],
        )

    def load_state_dict(self, d):
        assert d["kind"] == self.kind, f"state of a {d['kind']!r} buffer loaded into {self.kind!r}"
        for name, value in d["config"].items():
            setattr(self, name, value)
        fp_dtype = np.uint8 if self.similarity == "tanimoto" else np.int64
        self.items = [
            Item(tuple(t), text, key, score, valid, length, np.frombuffer(fp, dtype=fp_dtype).copy())
            for t, text, key, score, valid, length, fp in zip(
                d["tokens"], d["text"], d["key"], d["score"], d["valid"], d["length"], d["fp"])
        ]
        none = [None] * len(self.items)  # a state saved before the replay cache existed: items without it
        for it, ref, sc in zip(self.items, d.get("log_ref", none), d.get("prefix_scores", none)):
            it.log_ref = None if ref is None else np.frombuffer(ref, dtype=np.float32).copy()
            it.prefix_scores = None if sc is None else np.frombuffer(sc, dtype=np.float64).copy()


class SubMBuffer(ReplayBuffer):
    """The paper's buffer: keep the B items of the ground set chosen greedily for f (METHOD.md §4).
    bin_weights: "uniform" (a_b = 1, the paper) or "authors" (a_b = ((b + 1) / n_bins)^len_power,
    n_bins = 1 + the largest bin in the ground set, as in the authors' code).
    diversity: "coverage" (METHOD.md §4, submodular, lazy greedy) or "authors" (1 - max sim(x, S),
    plain greedy: the reference code's variant, kept for reproduction)."""

    kind = "subm"

    def __init__(self, capacity=200, similarity="tanimoto", valid_only=False, w_rew=1.0, w_val=1.0,
                 w_div=1.0, w_len=1.0, len_bin_size=1, bin_weights="uniform", len_power=1.0,
                 diversity="coverage"):
        super().__init__(capacity, similarity, valid_only)
        assert w_rew >= 0 and w_val >= 0, "s(x) must be non-negative"
        assert bin_weights in ("uniform", "authors") and diversity in ("coverage", "authors")
        assert len_bin_size >= 1
        self.w_rew, self.w_val = float(w_rew), float(w_val)
        self.w_div, self.w_len = float(w_div), float(w_len)
        self.len_bin_size, self.bin_weights, self.len_power = int(len_bin_size), bin_weights, float(len_power)
        self.diversity = diversity

    def _config(self):
        return dict(super()._config(), w_rew=self.w_rew, w_val=self.w_val, w_div=self.w_div,
                    w_len=self.w_len, len_bin_size=self.len_bin_size, bin_weights=self.bin_weights,
                    len_power=self.len_power, diversity=self.diversity)

    def _select(self, ground):
        scores = np.array([self.w_rew * it.score + self.w_val * it.valid for it in ground])
        bins = np.array([it.length // self.len_bin_size for it in ground])
        a = None
        if self.bin_weights == "authors":
            n_bins = int(bins.max()) + 1
            a = ((np.arange(n_bins) + 1.0) / n_bins) ** self.len_power
        picks = subm_select(scores, self._sim(ground), bins, self.capacity, self.w_div, self.w_len,
                            a, diversity=self.diversity)
        return [ground[i] for i in np.sort(picks)]  # ground-set order: incumbents first


class RPBuffer(ReplayBuffer):
    """Reward-prioritised: the top-B of the ground set by score. Exact duplicates (same key) are
    always merged; with sim_threshold set, an item is also dropped when its similarity to a
    better-scoring kept item is >= sim_threshold (a near-duplicate), walking down the ranking.
    The near-duplicate filter only runs when the ground set overflows, and can leave the buffer
    below capacity for that refresh."""

    kind = "rp"

    def __init__(self, capacity=200, similarity="tanimoto", valid_only=False, sim_threshold=None):
        super().__init__(capacity, similarity, valid_only)
        self.sim_threshold = sim_threshold

    def _config(self):
        return dict(super()._config(), sim_threshold=self.sim_threshold)

    def _select(self, ground):
        order = self._by_score(ground)
        if self.sim_threshold is None:
            return [ground[i] for i in np.sort(order[:self.capacity])]
        sim, kept = self._sim(ground), []
        closest = np.zeros(len(ground))  # max similarity to the kept items
        for i in order:
            if closest[i] < self.sim_threshold:
                kept.append(i)
                np.maximum(closest, sim[i], out=closest)
                if len(kept) == self.capacity:
                    break
        return [ground[i] for i in sorted(kept)]


class PRTBuffer(RPBuffer):
    """Prioritised replay: RP's contents (so the comparison isolates the sampling rule); each
    sampled item comes from the top top_frac of the buffer by score with probability top_prob,
    else from the rest, uniformly with replacement within each part."""

    kind = "prt"

    def __init__(self, capacity=200, similarity="tanimoto", valid_only=False, sim_threshold=None,
                 top_frac=0.2, top_prob=0.7):
        super().__init__(capacity, similarity, valid_only, sim_threshold)
        self.top_frac, self.top_prob = float(top_frac), float(top_prob)

    def _config(self):
        return dict(super()._config(), top_frac=self.top_frac, top_prob=self.top_prob)

    def sample(self, n, rng):
        self._check_can_sample(n)
        if not n:
            return []
        order = self._by_score(self.items)
        n_top = max(1, math.ceil(round(self.top_frac * len(order), 9)))  # 0.2 * 35 = 7.000000000000001
        top, rest = order[:n_top], order[n_top:]
        if len(rest) == 0:
            rest = top
        from_top = rng.random(n) < self.top_prob
        idx = np.where(from_top, top[rng.integers(0, len(top), size=n)],
                       rest[rng.integers(0, len(rest), size=n)])
        return [self.items[i] for i in idx]


BUFFERS = {"subm": SubMBuffer, "rp": RPBuffer, "prt": PRTBuffer}


def make_buffer(kind, capacity=200, similarity="tanimoto", **options):
    """kind in "rp", "prt", "subm"; similarity "tanimoto" (SMILES) or "bigram" (text)."""
    return BUFFERS[kind](capacity=capacity, similarity=similarity, **options)


# -----------------------------------------------------------------------------
# one buffer per condition (conditions.py, METHOD.md §11)

class ConditionalBuffer:
    """One replay buffer (replay.make_buffer) per condition: an item is deduplicated, selected (SubM's f, RP's
    ranking) and replayed only among the items of its own condition, each condition with the full capacity."""

    kind = "conditional"

    def __init__(self, kind, capacity, similarity, **options):
        self.options = dict(kind=kind, capacity=capacity, similarity=similarity, **options)
        self.buffers = {}

    def _buffer(self, condition):
        if condition not in self.buffers:
            self.buffers[condition] = make_buffer(**self.options)
        return self.buffers[condition]

    def __len__(self):
        return sum(len(b) for b in self.buffers.values())

    def add(self, items, conditions):
        for c in dict.fromkeys(conditions):
            self._buffer(c).add([it for it, x in zip(items, conditions) if x == c])

    def sample(self, m, k, rng):
        """m conditions that hold items (without replacement when there are enough), k items of each."""
        ready = [c for c, b in self.buffers.items() if len(b)]
        if not ready:
            raise ValueError("sampling from an empty replay buffer")
        picks = rng.choice(len(ready), size=m, replace=m > len(ready))
        items, conditions = [], []
        for i in picks:
            items += self.buffers[ready[i]].sample(k, rng)
            conditions += [ready[i]] * k
        return items, conditions

    def state_dict(self):
        return dict(kind=self.kind, options=dict(self.options), conditions=list(self.buffers),
                    buffers=[b.state_dict() for b in self.buffers.values()])

    def load_state_dict(self, d):
        assert d["kind"] == self.kind, f"state of a {d['kind']!r} buffer loaded into {self.kind!r}"
        self.options, self.buffers = dict(d["options"]), {}
        for c, state in zip(d["conditions"], d["buffers"]):
            self._buffer(c).load_state_dict(state)



def keeps_buffer(args):
    """Whether a run keeps a replay buffer: not with --replay none, nor oracle (exact samples of p* take its place)."""
    return args.replay not in ("none", "oracle")


def buffer_options(args):
    """make_buffer's options from train.py's flags (the authors' conventions among them, METHOD.md §10)."""
    if args.replay == "subm":
        power = args.subm_len_power
        return dict(valid_only=args.replay_valid_only, w_val=args.subm_w_val, len_bin_size=args.subm_len_bin,
                    bin_weights="authors" if power else "uniform", len_power=power or 1.0,
                    diversity=args.subm_diversity)
    return dict(valid_only=args.replay_valid_only)
