"""
SubM's greedy selection (METHOD.md §4): which B items of a ground set a SubMBuffer keeps.

The SubM objective over a ground set G (buffer + new batch, deduplicated):
    f(S) = sum_{x in S} s(x) + w_div * sum_{v in G} max_{x in S} sim(v, x)
           + w_len * sum_b a_b * log(1 + c_b(S))
with s(x) = w_rew * r(x) + w_val * 1[valid]. f is monotone submodular, so lazy greedy is exact: subm_select returns
greedy's picks, by lazy greedy that hands over to plain greedy where its bounds stop pruning.
"""
import heapq

import numpy as np


class GreedyState:
    """The state of greedy after choosing some set S: cov[v] = max_{x in S} sim(v, x) and the
    per-bin counts c_b(S). gains(idx) gives the marginal gain of every candidate in idx at once
    (plain greedy), gain(x) that of one (lazy greedy); both compute the same floating-point
    operations in the same order, so they see bitwise-identical numbers and break ties alike."""

    def __init__(self, scores, sim, bins, k, w_div=1.0, w_len=1.0, bin_weights=None,
                 diversity="coverage"):
        assert diversity in ("coverage", "authors"), diversity
        self.scores = np.asarray(scores, dtype=np.float64)
        self.sim = np.asarray(sim, dtype=np.float64)
        self.bins = np.asarray(bins, dtype=np.int64)
        n = len(self.scores)
        assert self.sim.shape == (n, n) and self.bins.shape == (n,)
        assert n == 0 or self.bins.min() >= 0, "length bins must be non-negative ints"
        n_bins = int(self.bins.max()) + 1 if n else 1
        a = np.ones(n_bins) if bin_weights is None else np.asarray(bin_weights, dtype=np.float64)
        assert len(a) >= n_bins, "bin_weights needs one weight per bin id"
        self.len_w = w_len * a[self.bins]  # w_len * a_b(x), per item
        # log((2 + c) / (1 + c)) for c = 0..k, one table for everyone. The running minimum only
        # guards against a last-bit non-monotonicity of log: lazy greedy needs the computed
        # gains to never increase, not just the exact ones.
        c = np.arange(k + 1, dtype=np.float64)
        self.len_table = np.minimum.accumulate(np.log((2.0 + c) / (1.0 + c)))
        self.w_div, self.diversity = float(w_div), diversity
        self.cov = np.zeros(n)
        self.counts = np.zeros(n_bins, dtype=np.int64)
        # for gain(): a scratch row and Python-list copies of the per-item scalars
        self._row = np.empty(n)
        self._scores, self._bins, self._len_w = self.scores.tolist(), self.bins.tolist(), self.len_w.tolist()
        self._len_table, self._counts = self.len_table.tolist(), self.counts.tolist()

    def gains(self, idx, chunk=1024):
        idx = np.asarray(idx, dtype=np.int64)
        if self.diversity == "coverage":
            # sum_v max(0, sim(v, x) - cov(v)): one row of sim per candidate (sim is symmetric)
            div = np.concatenate([np.maximum(self.sim[idx[i:i + chunk]] - self.cov, 0.0).sum(axis=1)
                                  for i in range(0, len(idx), chunk)] or [np.zeros(0)])
        else:  # the authors' code: 1 - max_{y in S} sim(x, y); not submodular
            div = 1.0 - self.cov[idx]
        length = self.len_w[idx] * self.len_table[self.counts[self.bins[idx]]]
        return self.scores[idx] + self.w_div * div + length

    def gain(self, x):
        """gains([x])[0] without the block path's per-call overhead (lazy greedy calls this ~7
        times per pick): the same operations in the same order, so the same bits (tested),
        with the scalars read from Python lists, which is faster than numpy indexing."""
        if self.diversity == "coverage":
            d = np.subtract(self.sim[x], self.cov, out=self._row)
            div = float(np.add.reduce(np.maximum(d, 0.0, out=d)))
        else:
            div = 1.0 - float(self.cov[x])
        b = self._bins[x]
        return self._scores[x] + self.w_div * div + self._len_w[x] * self._len_table[self._counts[b]]

    def add(self, x):
        np.maximum(self.cov, self.sim[x], out=self.cov)
        self.counts[self.bins[x]] += 1
        self._counts[self._bins[x]] += 1


# Up to this many items plain greedy is the faster of the two (same picks): its pass per pick is a few numpy calls
# on a small matrix, cheaper than lazy greedy's heap, bounds and set-up (`python -m bench replay`, both kinds of item).
PLAIN_GREEDY_MAX_N = 128


def subm_select(scores, sim, bins, k, w_div=1.0, w_len=1.0, bin_weights=None,
                diversity="coverage", lazy=None, return_gains=False):
    """Greedily maximise the SubM objective f; returns k distinct indices in selection order
    (and the marginal gain of each pick if return_gains). scores = s(x) >= 0 [n], sim [n, n]
    symmetric in [0, 1], bins int [n], bin_weights [n_bins] (default: all ones).
    Ties go to the lowest index. lazy=None means lazy greedy for the submodular "coverage"
    objective on more than PLAIN_GREEDY_MAX_N items, plain greedy otherwise (and for the authors' variant)."""
    scores = np.asarray(scores, dtype=np.float64)
    k = min(int(k), len(scores))
    state = GreedyState(scores, sim, bins, k, w_div, w_len, bin_weights, diversity)
    if lazy is None:
        lazy = diversity == "coverage" and len(scores) > PLAIN_GREEDY_MAX_N
    assert not (lazy and diversity != "coverage"), "lazy greedy is exact only for the submodular f"
    picks, gains = (_lazy_greedy if lazy else _plain_greedy)(state, k)
    picks = np.array(picks, dtype=np.int64)
    return (picks, np.array(gains)) if return_gains else picks


def _plain_greedy(state, k, remaining=None):
    """Recompute every remaining candidate's gain at every step (reference, authors' variant, lazy's finish)."""
    remaining = np.arange(len(state.scores)) if remaining is None else remaining
    picks, gains = [], []
    for _ in range(k):
        g = state.gains(remaining)
        j = int(np.argmax(g))  # remaining is sorted: first max = lowest index
        x = int(remaining[j])
        picks.append(x)
        gains.append(float(g[j]))
        state.add(x)
        remaining = np.delete(remaining, j)
    return picks, gains


def _lazy_greedy(state, k):
    """Lazy greedy (Minoux 1978): a heap of (-upper bound, index). Gains of a submodular f only
    shrink, so a gain computed at an earlier step bounds the current one; an item whose bound
    is fresh and on top of the heap is greedy's choice. Ordering by (-gain, index) makes the
    tie-break the lowest index, as in plain greedy.
    Items that cover nothing (an all-zero row of sim: invalid molecules, with a zero fingerprint)
    and share s(x) and the length bin compute the same gain to the bit at every step, so greedy
    takes them in index order: only the first waiting one of each such group is in the heap, and
    the next enters when it is picked. Without this, each pick in a bin re-evaluates every invalid
    item of that bin (~90 gains per pick when most samples are invalid, as at the start). When most candidates
    tie otherwise (a Game of 24 prompt's near-identical non-solutions), plain greedy finishes: the same picks."""
    n = len(state.scores)
    g0 = state.gains(np.arange(n)).tolist()
    follower = {}  # group member -> the next one in index order
    last = {}
    heap = []
    zero = (~state.sim.any(axis=1)).tolist() if n else []
    for i in range(n):
        if zero[i]:
            group = (state._scores[i], state._bins[i], state._len_w[i])
            if group in last:
                follower[last[group]] = i
                last[group] = i
                continue
            last[group] = i
        heap.append((-g0[i], i))
    heapq.heapify(heap)
    fresh_at = [0] * n  # the step at which item i's bound in the heap was computed
    picks, gains = [], []
    evaluated = 0  # gain() calls since the last check
    for step in range(k):
        while True:
            neg_g, i = heap[0]
            if fresh_at[i] == step:
                heapq.heappop(heap)
                break
            g = state.gain(i)
            fresh_at[i] = step
            heapq.heapreplace(heap, (-g, i))
            evaluated += 1
        picks.append(i)
        gains.append(-neg_g)
        state.add(i)
        j = follower.get(i)
        if j is not None:  # its gain is bounded by i's (the same gain before this pick): refreshed when on top
            fresh_at[j] = -1
            heapq.heappush(heap, (neg_g, j))
        if (step + 1) % 16 == 0:  # every 16 picks: do the bounds still prune?
            if _plain_is_cheaper(evaluated / 16, n - step, n):
                more, more_gains = _plain_greedy(state, k - step - 1, np.setdiff1d(np.arange(n), picks))
                return picks + more, gains + more_gains
            evaluated = 0
    return picks, gains


def _plain_is_cheaper(calls_per_pick, remaining, n):
    """Whether a vectorised pass per pick beats lazy greedy's recent gain() calls per pick by 2x: a call costs about
    5 us + 2 ns per item, a row of plain greedy 3 ns per item (one core); Game of 24: ~50 calls a pick, SMILES ~5."""
    return calls_per_pick * (5e-6 + 2e-9 * n) > 2 * remaining * 3e-9 * n
