"""Tests for replay.py. Reference values come from independent code written here: f(S) straight
from the METHOD.md §4 formula, brute-force greedy and exhaustive search over it, RDKit's own Tanimoto."""

import dataclasses
import io
import itertools
import math
import pickle

import numpy as np
import pytest
import torch
from rdkit import Chem, DataStructs
from rdkit.Chem import rdFingerprintGenerator

import batches
from greedy import GreedyState, subm_select
from replay import Item, make_buffer
from similarity import bigram_fp, jaccard_matrix, morgan_fp, tanimoto_matrix

SIDE_CHAINS = ["C", "CC", "CCO", "CN", "C(=O)O", "c3ccccc3", "F", "Cl", "OC", "CC(C)C", "N", "C#N",
               "CCCC", "OCC", "C(F)(F)F", "S", "CCN(C)C", "C=O"]
MOLS = [f"O=C1Nc2cc({s})ccc2N1" for s in SIDE_CHAINS]


# -----------------------------------------------------------------------------
# f(S) from the METHOD.md §4 formula, and greedy/optimum over it by brute force

def f_direct(S, scores, sim, bins, w_div, w_len, a):
    S = list(S)
    rew = sum(scores[x] for x in S)
    cover = sum(max((sim[v][x] for x in S), default=0.0) for v in range(len(scores)))
    counts = {}
    for x in S:
        counts[bins[x]] = counts.get(bins[x], 0) + 1
    length = sum(a[b] * math.log(1 + c) for b, c in counts.items())
    return rew + w_div * cover + w_len * length


def brute_greedy(k, *inst):
    S = []
    for _ in range(k):
        base = f_direct(S, *inst)
        gains = [(f_direct(S + [x], *inst) - base, -x) for x in range(len(inst[0])) if x not in S]
        S.append(-max(gains)[1])
    return S


def random_instance(rng, n, n_bins=4, sim_kind="uniform"):
    scores = rng.uniform(0, 2, n)
    if sim_kind == "uniform":
        sim = rng.uniform(0, 1, (n, n))
        sim = (sim + sim.T) / 2
        np.fill_diagonal(sim, 1.0)
    else:  # Tanimoto of random sparse bit vectors: many exact zeros and repeated values
        bits = rng.random((n, 64)) < 0.08
        sim = tanimoto_matrix(np.packbits(np.pad(bits, ((0, 0), (0, 2048 - 64))), axis=1))
    bins = rng.integers(0, n_bins, n)
    a = rng.uniform(0.2, 2.0, n_bins)
    return scores, sim, bins, a


def test_matches_brute_force_greedy_and_gains():
    rng = np.random.default_rng(0)
    for trial in range(12):
        n = int(rng.integers(5, 13))
        k = int(rng.integers(1, n + 1))
        w_div, w_len = rng.uniform(0, 2, 2)
        scores, sim, bins, a = random_instance(rng, n, sim_kind=["uniform", "bits"][trial % 2])
        inst = (scores, sim, bins, w_div, w_len, a)
        for lazy in (True, False):
            picks, gains = subm_select(scores, sim, bins, k, w_div, w_len, a, lazy=lazy, return_gains=True)
            assert picks.tolist() == brute_greedy(k, *inst)
            assert len(set(picks.tolist())) == k
            # the gain used at each step is f(S + x) - f(S)
            f_vals = [f_direct(picks[:t].tolist(), *inst) for t in range(k + 1)]
            np.testing.assert_allclose(gains, np.diff(f_vals), rtol=1e-10, atol=1e-10)


def test_edge_sizes():
    rng = np.random.default_rng(12)
    scores, sim, bins, a = random_instance(rng, 6)
    assert sorted(subm_select(scores, sim, bins, 10).tolist()) == list(range(6))  # k > n: all
    assert subm_select(scores, sim, bins, 0).tolist() == []
    assert subm_select(np.zeros(0), np.zeros((0, 0)), np.zeros(0, int), 3).tolist() == []
    for kind in ("subm", "rp", "prt"):
        buf = make_buffer(kind)
        assert len(buf) == 0 and buf.sample(0, rng) == []
        with pytest.raises(ValueError):
            buf.sample(1, rng)


def test_greedy_reaches_1_minus_1_over_e_of_optimum():
    rng = np.random.default_rng(1)
    for trial in range(8):
        n = int(rng.integers(6, 11))
        k = int(rng.integers(2, n))
        w_div, w_len = rng.uniform(0, 2, 2)
        scores, sim, bins, a = random_instance(rng, n, sim_kind=["uniform", "bits"][trial % 2])
        inst = (scores, sim, bins, w_div, w_len, a)
        opt = max(f_direct(S, *inst) for S in itertools.combinations(range(n), k))
        got = f_direct(subm_select(scores, sim, bins, k, w_div, w_len, a).tolist(), *inst)
        assert (1 - 1 / math.e) * opt - 1e-9 <= got <= opt + 1e-9


def test_state_gains_equal_f_differences_at_random_sets():
    rng = np.random.default_rng(2)
    n = 15
    scores, sim, bins, a = random_instance(rng, n, sim_kind="bits")
    w_div, w_len = 0.7, 1.3
    for size in (0, 1, 4, 9):
        S = rng.permutation(n)[:size].tolist()
        st = GreedyState(scores, sim, bins, n, w_div, w_len, a)
        for x in S:
            st.add(x)
        rest = [x for x in range(n) if x not in S]
        base = f_direct(S, scores, sim, bins, w_div, w_len, a)
        want = [f_direct(S + [x], scores, sim, bins, w_div, w_len, a) - base for x in rest]
        np.testing.assert_allclose(st.gains(rest), want, rtol=1e-12, atol=1e-12)
        # the authors' variant: s(x) + w_div (1 - max_{y in S} sim(x, y)) + the same length term
        st.diversity = "authors"
        counts = np.bincount(bins[S], minlength=len(a)) if S else np.zeros(len(a), int)
        want = [scores[x] + w_div * (1 - max((sim[x, y] for y in S), default=0.0))
                + w_len * a[bins[x]] * math.log((2 + counts[bins[x]]) / (1 + counts[bins[x]]))
                for x in rest]
        np.testing.assert_allclose(st.gains(rest), want, rtol=1e-12, atol=1e-12)


def test_authors_variant_matches_brute_force():
    rng = np.random.default_rng(3)
    n, k = 12, 7
    scores, sim, bins, a = random_instance(rng, n)
    S = []
    for _ in range(k):  # plain greedy on the authors' (non-submodular) gain, written out
        counts = np.bincount(bins[S], minlength=len(a)) if S else np.zeros(len(a), int)
        g = {x: scores[x] + (1 - max((sim[x, y] for y in S), default=0.0))
             + a[bins[x]] * math.log((2 + counts[bins[x]]) / (1 + counts[bins[x]]))
             for x in range(n) if x not in S}
        S.append(max(g, key=lambda x: (g[x], -x)))
    assert subm_select(scores, sim, bins, k, 1.0, 1.0, a, diversity="authors").tolist() == S
    with pytest.raises(AssertionError):
        subm_select(scores, sim, bins, k, diversity="authors", lazy=True)


def test_lazy_equals_plain_on_bigger_instances_with_ties():
    rng = np.random.default_rng(4)
    for n in (100, 200, 300):
        scores, sim, bins, a = random_instance(rng, n, n_bins=6, sim_kind="bits")
        scores = rng.integers(0, 3, n) / 2.0  # many exactly tied scores
        dup = rng.choice(n, 10, replace=False)  # exact duplicates: identical gains, tie by index
        src = rng.choice(n, 10, replace=False)
        sim[dup], scores[dup], bins[dup] = sim[src], scores[src], bins[src]
        sim[:, dup] = sim[:, src]
        for k in (n // 10, n // 2, n - 7, n):
            for w_div, w_len in ((1.0, 1.0), (0.0, 1.0), (2.0, 0.0)):
                lazy = subm_select(scores, sim, bins, k, w_div, w_len, lazy=True)
                plain = subm_select(scores, sim, bins, k, w_div, w_len, lazy=False)
                assert lazy.tolist() == plain.tolist()


def test_lazy_greedy_hands_over_to_plain_greedy_when_everything_ties(monkeypatch):
    # a Game of 24 prompt's buffer: many near-identical non-solutions, so each pick refreshes most bounds and lazy
    # greedy finishes with plain greedy's vectorised passes; the picks and gains stay greedy's
    import greedy
    handed_over = []
    plain = greedy._plain_greedy
    monkeypatch.setattr(greedy, "_plain_greedy", lambda *a: handed_over.append(1) or plain(*a))
    rng = np.random.default_rng(3)
    n = 208
    sim = np.full((n, n), 0.5) + rng.integers(0, 3, (n, n)) * 1e-3
    sim = np.minimum((sim + sim.T) / 2, 1.0)
    np.fill_diagonal(sim, 1.0)
    scores, bins = np.where(rng.random(n) < 0.05, 1.0, 0.0), np.zeros(n, dtype=int)
    lazy = subm_select(scores, sim, bins, 200, lazy=True, return_gains=True)
    assert handed_over
    want = subm_select(scores, sim, bins, 200, lazy=False, return_gains=True)
    assert lazy[0].tolist() == want[0].tolist() and np.array_equal(lazy[1], want[1])


def test_gains_bitwise_same_alone_or_in_a_block():
    # lazy and plain greedy agree because one candidate's gain is computed to the same bits
    rng = np.random.default_rng(5)
    scores, sim, bins, a = random_instance(rng, 700)
    st = GreedyState(scores, sim, bins, 700, 1.0, 1.0, a)
    for x in rng.permutation(700)[:50]:
        st.add(x)
    for diversity in ("coverage", "authors"):
        st.diversity = diversity
        block = st.gains(np.arange(700))
        assert np.array_equal(block, [st.gains(np.array([i]))[0] for i in range(700)])
        assert np.array_equal(block, [st.gain(i) for i in range(700)])  # lazy greedy's fast path


# -----------------------------------------------------------------------------
# similarities

def test_tanimoto_equals_rdkit():
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    ref_fps = [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in MOLS]
    want = np.array([[DataStructs.TanimotoSimilarity(x, y) for y in ref_fps] for x in ref_fps])
    got = tanimoto_matrix(np.stack([morgan_fp(s) for s in MOLS]))
    assert np.array_equal(got, want)  # the same double, not merely close
    assert want[0, 1] not in (0.0, 1.0)
    # invalid molecules: all-zero fingerprint, similarity 0 to everything including itself
    fps = np.stack([morgan_fp(MOLS[0]), morgan_fp("C1CC(", True), morgan_fp(MOLS[1], valid=False)])
    assert not fps[1].any() and not fps[2].any()
    sim = tanimoto_matrix(fps)
    assert sim[0, 0] == 1.0 and not sim[1:].any() and not sim[:, 1:].any()


def test_bigram_jaccard_hand_cases():
    def jac(x, y):
        return jaccard_matrix([bigram_fp(x), bigram_fp(y)])[0, 1]
    assert jac("abc", "abd") == pytest.approx(1 / 3)         # {ab,bc} vs {ab,bd}
    assert jac("1+2*3", "2*3+1") == pytest.approx(2 / 6)     # {1+,+2,2*,*3} vs {2*,*3,3+,+1}
    assert jac("aaaa", "aa") == 1.0                          # sets, not multisets
    assert jac("ab", "ba") == 0.0
    assert jac("abcd", "abcd") == 1.0
    assert jac("a", "a") == 1.0 and jac("a", "ab") == 0.0    # one character: its own shingle
    assert jac("", "") == 0.0                                # empty vs empty defined as 0
    assert jaccard_matrix([bigram_fp(""), bigram_fp("")]).sum() == 0.0


# -----------------------------------------------------------------------------
# buffers

def mol_item(i, score, valid=True, smiles=None, length=None):
    s = MOLS[i % len(MOLS)] if smiles is None else smiles
    return Item(tokens=(i, i + 1), text=s, key=s, score=score, valid=valid,
                length=(i % 7) + 1 if length is None else length)


def test_dedupe_keeps_the_better_duplicate():
    for kind in ("subm", "rp", "prt"):
        buf = make_buffer(kind, capacity=10)
        buf.add([mol_item(0, 0.5), mol_item(1, 0.6)])
        # a better copy of MOLS[0] (told apart by its tokens) and, in the same batch, a worse one
        better = Item((9, 9), MOLS[0], MOLS[0], 0.9, True, 2)
        worse = Item((8, 8), MOLS[1], MOLS[1], 0.1, True, 2)
        buf.add([better, worse, Item((7, 7), MOLS[0], MOLS[0], 0.7, True, 2)])
        by_key = {it.key: it for it in buf.items}
        assert len(buf) == 2
        assert by_key[MOLS[0]].tokens == (9, 9) and by_key[MOLS[0]].score == 0.9
        assert by_key[MOLS[1]].tokens == (1, 2) and by_key[MOLS[1]].score == 0.6
        # equal score: the incumbent stays
        buf.add([Item((5, 5), MOLS[1], MOLS[1], 0.6, True, 2)])
        assert {it.key: it for it in buf.items}[MOLS[1]].tokens == (1, 2)


def slow_add(buf, items):
    """The buffer's add written the obvious way: dedupe the whole ground set (incumbents first), gate, choose."""
    best = {}
    ground = buf.items + list(items)
    for i, it in enumerate(ground):
        if it.key not in best or it.score > ground[best[it.key]].score:
            best[it.key] = i
    ground = [ground[i] for i in sorted(best.values()) if ground[i].valid or not buf.valid_only]
    ground = [it if it.fp is not None else buf._enter(it) for it in ground]
    buf.items = ground if len(ground) <= buf.capacity else buf._select(ground)


@pytest.mark.parametrize("kind", ["subm", "rp", "prt"])
def test_add_equals_the_slow_add(kind):
    """add looks up only the newcomers' keys; over random batches with duplicates within and across batches, equal
    and better scores, invalid items and overflow, it keeps what deduping the whole ground set keeps, in order."""
    rng = np.random.default_rng(5)
    for valid_only in (False, True):
        fast, slow = (make_buffer(kind, capacity=9, valid_only=valid_only) for _ in range(2))
        for _ in range(40):
            batch = [mol_item(int(i), float(rng.integers(0, 4)) / 4, valid=bool(rng.uniform() < 0.8),
                              length=int(rng.integers(1, 8))) for i in rng.integers(0, 14, 6)]
            batch = [dataclasses.replace(it, tokens=(int(rng.integers(100)),)) for it in batch]  # told apart
            fast.add(batch)
            slow_add(slow, batch)
            assert [(it.key, it.tokens) for it in fast.items] == [(it.key, it.tokens) for it in slow.items]
        fast.items = fast.items[:3]  # replaced from outside: the key index is rebuilt
        slow.items = slow.items[:3]
        fast.add(batch)
        slow_add(slow, batch)
        assert [(it.key, it.tokens) for it in fast.items] == [(it.key, it.tokens) for it in slow.items]


def test_validity_gate():
    items = [mol_item(i, 0.5, valid=i % 2 == 0) for i in range(8)]
    for kind in ("subm", "rp", "prt"):
        gated, open_ = make_buffer(kind, capacity=5, valid_only=True), make_buffer(kind, capacity=50)
        gated.add(items)
        open_.add(items)
        assert len(gated) == 4 and all(it.valid for it in gated.items)
        assert len(open_) == 8


def test_subm_buffer_keeps_the_greedy_set_computed_with_rdkit():
    rng = np.random.default_rng(6)
    items = [mol_item(i, float(rng.uniform()), valid=i != 3, length=int(rng.integers(1, 5)))
             for i in range(len(MOLS))]
    items[5] = mol_item(5, 0.3, smiles="C1CC(")  # unparsable: zero fingerprint
    w = dict(w_rew=1.0, w_val=0.5, w_div=0.8, w_len=1.2)
    buf = make_buffer("subm", capacity=6, **w)
    buf.add(items[:9])
    buf.add(items[9:])
    # independently: RDKit fingerprints + Tanimoto, f from the formula, brute-force greedy
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(Chem.MolFromSmiles(it.text)) if it.valid and Chem.MolFromSmiles(it.text)
           else None for it in items]
    sim = np.array([[DataStructs.TanimotoSimilarity(x, y) if x is not None and y is not None else 0.0
                     for y in fps] for x in fps])
    s = np.array([w["w_rew"] * it.score + w["w_val"] * it.valid for it in items])
    bins = np.array([it.length for it in items])
    # the first refresh (9 items) did not overflow, so the second ground set is all 18
    want = brute_greedy(6, s, sim, bins, w["w_div"], w["w_len"], np.ones(10))
    assert sorted(it.key for it in buf.items) == sorted(items[i].key for i in want)


def test_subm_buffer_options_run():
    rng = np.random.default_rng(7)
    items = [mol_item(i, float(rng.uniform())) for i in range(len(MOLS))]
    for opts in (dict(diversity="authors"), dict(bin_weights="authors", len_power=2.0),
                 dict(len_bin_size=3, w_div=0.0)):
        buf = make_buffer("subm", capacity=8, **opts)
        buf.add(items)
        assert len(buf) == 8 and len({it.key for it in buf.items}) == 8
    # text similarity for Expr24-like items
    exprs = ["1+2*3", "2*3+1", "4*6", "6*4", "8*3", "3*8", "9+9+6", "12+12", "2*12"]
    buf = make_buffer("subm", capacity=4, similarity="bigram")
    buf.add([Item(tuple(map(ord, e)), e, e, 1.0 if eval(e) == 24 else 0.0, True, len(e)) for e in exprs])
    assert len(buf) == 4


def test_subm_buffer_authors_bin_weights_with_bigrams():
    # the authors' length weights a_b = ((b + 1) / n_bins)^p, bins of 2 tokens, text similarity:
    # all recomputed here with Python sets
    rng = np.random.default_rng(13)
    texts = ["".join(rng.choice(list("12345+*-"), size=int(rng.integers(2, 10)))) for _ in range(14)]
    items = [Item(tuple(map(ord, t)), t, t, float(rng.uniform()), True, len(t))
             for t in dict.fromkeys(texts)]
    buf = make_buffer("subm", capacity=6, similarity="bigram", w_len=3.0, len_bin_size=2,
                      bin_weights="authors", len_power=2.0)
    buf.add(items)

    def shingles(t):
        return {t[i:i + 2] for i in range(len(t) - 1)}
    texts = [it.text for it in items]
    sim = np.array([[len(shingles(x) & shingles(y)) / len(shingles(x) | shingles(y))
                     for y in texts] for x in texts])
    bins = np.array([len(t) // 2 for t in texts])
    n_bins = bins.max() + 1
    a = [((b + 1) / n_bins) ** 2.0 for b in range(n_bins)]
    s = np.array([it.score + 1.0 for it in items])
    want = brute_greedy(6, s, sim, bins, 1.0, 3.0, a)
    assert sorted(it.text for it in buf.items) == sorted(texts[i] for i in want)
    # and these weights matter here: uniform ones choose differently
    assert want != brute_greedy(6, s, sim, bins, 1.0, 3.0, np.ones(n_bins))


def test_rp_keeps_the_top_by_reward():
    rng = np.random.default_rng(8)
    buf = make_buffer("rp", capacity=5)
    seen = {}
    for step in range(4):
        batch = [mol_item(int(i), float(rng.uniform())) for i in rng.integers(0, len(MOLS), 6)]
        buf.add(batch)
        for it in batch:
            seen[it.key] = max(seen.get(it.key, -1.0), it.score)
        top = sorted(seen.values(), reverse=True)[:5]
        assert sorted((it.score for it in buf.items), reverse=True) == top


def test_rp_near_duplicate_filter():
    rng = np.random.default_rng(9)
    items = [mol_item(i, float(rng.uniform())) for i in range(len(MOLS))]
    buf = make_buffer("rp", capacity=6, sim_threshold=0.5)
    buf.add(items)
    sim = tanimoto_matrix(np.stack([it.fp for it in buf.items]))
    np.fill_diagonal(sim, 0.0)
    assert sim.max() < 0.5 and 0 < len(buf) <= 6
    assert max(it.score for it in items) == max(it.score for it in buf.items)


def test_prt_sampling_fractions():
    items = [mol_item(i, score=i / 50, smiles=f"C{'C' * i}O") for i in range(50)]
    buf = make_buffer("prt", capacity=50)
    buf.add(items)
    n = 40000
    got = np.array([round(it.score * 50) for it in buf.sample(n, np.random.default_rng(10))])
    top = got >= 40  # the top 20% by score: items 40..49
    sd = math.sqrt(0.7 * 0.3 / n)
    assert abs(top.mean() - 0.7) < 5 * sd
    # uniform within each part
    counts = np.bincount(got, minlength=50)
    for part, p in ((range(40, 50), 0.7 / 10), (range(0, 40), 0.3 / 40)):
        sd = math.sqrt(p * (1 - p) / n)
        assert np.all(np.abs(counts[list(part)] / n - p) < 5 * sd)


@pytest.mark.parametrize("kind", ["subm", "rp", "prt"])
@pytest.mark.parametrize("similarity", ["tanimoto", "bigram"])
def test_checkpoint_round_trip(kind, similarity):
    rng = np.random.default_rng(11)
    buf = make_buffer(kind, capacity=7, similarity=similarity)
    for _ in range(3):
        buf.add([mol_item(int(i), float(rng.uniform()), valid=bool(rng.uniform() < 0.8))
                 for i in rng.integers(0, len(MOLS), 5)])
    d = buf.state_dict()
    loaded = []
    for weights_only in (False, True):  # plain containers only, so the safe loader accepts it too
        f = io.BytesIO()
        torch.save(d, f)
        f.seek(0)
        loaded.append(torch.load(f, weights_only=weights_only))
    loaded.append(pickle.loads(pickle.dumps(d)))
    for state in loaded:
        other = make_buffer(kind, capacity=123)
        other.load_state_dict(state)
        assert other.capacity == 7 and other.items == buf.items
        assert all(np.array_equal(a.fp, b.fp) for a, b in zip(other.items, buf.items))
        assert other.sample(50, np.random.default_rng(3)) == buf.sample(50, np.random.default_rng(3))
        # and they keep evolving identically
        more = [mol_item(i, 0.95, valid=True) for i in (2, 4, 6)]
        b2 = make_buffer(kind, capacity=123)
        b2.load_state_dict(buf.state_dict())
        other.add(more)
        b2.add(more)
        assert other.items == b2.items


# -----------------------------------------------------------------------------
# the faster refresh: groups in lazy greedy, incremental similarities, fingerprints once

def test_lazy_equals_plain_with_many_items_that_cover_nothing():
    # invalid molecules: all-zero similarity rows, tied gains within a length bin (lazy greedy groups them)
    rng = np.random.default_rng(14)
    for n, zero_frac in ((60, 0.5), (232, 0.8), (120, 1.0)):
        scores, sim, bins, a = random_instance(rng, n, n_bins=5, sim_kind="bits")
        zero = rng.random(n) < zero_frac
        sim[zero], sim[:, zero] = 0.0, 0.0
        scores[zero] = rng.choice([0.0, 0.5], zero.sum())  # a few distinct s(x) among them
        for k in (n // 3, n - 5, n):
            for w_div, w_len in ((1.0, 1.0), (1.0, 0.0), (0.0, 2.0)):
                lazy, g1 = subm_select(scores, sim, bins, k, w_div, w_len, a, lazy=True, return_gains=True)
                plain, g2 = subm_select(scores, sim, bins, k, w_div, w_len, a, lazy=False, return_gains=True)
                assert lazy.tolist() == plain.tolist()
                assert np.array_equal(g1, g2)


@pytest.mark.parametrize("similarity", ["tanimoto", "bigram"])
def test_incremental_similarity_equals_the_full_matrix(similarity):
    rng = np.random.default_rng(15)
    buf = make_buffer("subm", capacity=9, similarity=similarity)
    texts = MOLS + ["C1CC(", "", "CC"]
    for step in range(6):
        batch = [mol_item(int(i), float(rng.uniform()), valid=bool(rng.uniform() < 0.8),
                          smiles=texts[int(rng.integers(len(texts)))]) for i in rng.integers(0, 50, 6)]
        buf.add(batch)
        ground = buf.items + [buf._enter(it) for it in batch[:3]]  # incumbents (cached) and new rows together
        fps = [it.fp for it in ground]
        want = tanimoto_matrix(np.stack(fps)) if similarity == "tanimoto" else jaccard_matrix(fps)
        assert np.array_equal(buf._sim(ground), want)  # the same doubles, not merely close


def test_each_text_is_fingerprinted_once_and_losers_never(monkeypatch):
    import replay
    calls = []
    real = replay.morgan_fp
    monkeypatch.setattr(replay, "morgan_fp", lambda text, valid=True: calls.append(text) or real(text, valid))
    buf = make_buffer("subm", capacity=4)
    buf.add([mol_item(0, 0.9), mol_item(1, 0.5)])
    assert sorted(calls) == sorted([MOLS[0], MOLS[1]])
    calls.clear()
    buf.add([mol_item(0, 0.1), mol_item(1, 0.7)])  # MOLS[0] loses to the incumbent: not fingerprinted
    assert calls == []  # MOLS[1] wins, but its text was fingerprinted before
    assert {it.key: it.score for it in buf.items} == {MOLS[0]: 0.9, MOLS[1]: 0.7}


# -----------------------------------------------------------------------------
# train.py's replay cache: a replayed batch reuses log P_ref(s_k T) and S(s_k) from when it entered

def make_trainer(model, out, *extra):
    import train
    args = train.get_args(["--model", model, "--out", str(out), "--max-len", "5", "--min-len", "1",
                           "--batch-size", "8", "--buffer-size", "6", "--kappa", "0.7", *extra])
    task = train.build_task(args)
    torch.manual_seed(0)
    return train, args, task, train.build_policy(args, task)


@pytest.mark.parametrize("kind", ["subm", "prt"])
def test_replayed_batch_gives_the_same_log_r_and_u_to_the_bit(tiny_gpt2, tmp_path, monkeypatch, kind):
    train, args, task, policy = make_trainer(tiny_gpt2, tmp_path, "--replay", kind)
    buffer = train.build_buffer(args, task)
    for temperature in (1.0, 2.0, 3.0):
        tokens, lengths, _ = policy.sample(args.batch_size, temperature)
        log_r, u, texts, final, log_ref, scores = batches.score_rows(args, task, policy, tokens, lengths)
        buffer.add(batches.to_items(task, tokens, lengths, texts, final, log_ref, scores))
    f = io.BytesIO()
    torch.save(buffer.state_dict(), f)
    f.seek(0)
    resumed = train.build_buffer(args, task)
    resumed.load_state_dict(torch.load(f, weights_only=True))  # the cache survives a safe checkpoint load
    assert all(it.log_ref is not None and it.prefix_scores is not None for it in resumed.items)
    real_ref = policy.log_ref_stop
    for buf in (buffer, resumed):
        items = buf.sample(16, np.random.default_rng(1))
        tokens, lengths = batches.from_items(policy, items)
        monkeypatch.setattr(policy, "log_ref_stop", lambda *a: pytest.fail("the reference ran on a replayed batch"))
        cached = batches.score_batch(args, task, policy, tokens, lengths, batches.cached_rows(args, policy, items))
        monkeypatch.setattr(policy, "log_ref_stop", real_ref)
        fresh = batches.score_batch(args, task, policy, tokens, lengths)  # the reference pass and the task, again
        for a, b in zip(cached[:2], fresh[:2]):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.int32), b.view(torch.int32))  # every bit, -inf included
        assert cached[2] == fresh[2] and torch.equal(cached[3], fresh[3])
    # a buffer saved before the cache existed: its items have none, and the batch is scored the slow way
    state = buffer.state_dict()
    del state["log_ref"], state["prefix_scores"]
    old = train.build_buffer(args, task)
    old.load_state_dict(state)
    items = old.sample(16, np.random.default_rng(1))
    tokens, lengths = batches.from_items(policy, items)
    assert all(it.log_ref is None for it in items) and batches.cached_rows(args, policy, items) is None
    fresh = batches.score_batch(args, task, policy, tokens, lengths)
    assert torch.equal(batches.score_batch(args, task, policy, tokens, lengths, batches.cached_rows(args, policy, items))[0], fresh[0])


def test_gpt2_sampler_and_reference_pass_compute_what_the_hugging_face_forward_does(tiny_gpt2, tiny_llama, tmp_path):
    from fast_gpt2 import GPT2Decoder
    for prompt in ("", "CC"):
        _, args, task, policy = make_trainer(tiny_gpt2, tmp_path, "--prompt", prompt)
        assert GPT2Decoder.for_model(policy.model, 4, 8, policy.actions) is not None
        out, ref = {}, {}
        for fast in (True, False):
            policy.fast_gpt2 = fast
            torch.manual_seed(5)
            out[fast] = policy.sample(64, temperature=1.5)
            ref[fast] = policy.log_ref_stop(*out[True][:2])
        assert torch.equal(out[True][0], out[False][0]) and torch.equal(out[True][1], out[False][1])
        torch.testing.assert_close(out[True][2], out[False][2], rtol=0, atol=1e-5)
        assert torch.equal(ref[True].isinf(), ref[False].isinf())
        torch.testing.assert_close(ref[True], ref[False], rtol=0, atol=1e-5)
    _, _, _, llama = make_trainer(tiny_llama, tmp_path, "--lora")
    assert GPT2Decoder.for_model(llama.model, 4, 8, llama.actions) is None  # others: HF's forward


def test_gpt2_decoder_survives_hidden_states_but_not_a_hook(tiny_gpt2, tmp_path):
    # transformers puts recording hooks on every layer the first time hidden states are asked for (the logZ head
    # does): they must not switch the fast path off for the rest of the run; a hook of anyone else's must
    from fast_gpt2 import GPT2Decoder
    _, _, _, policy = make_trainer(tiny_gpt2, tmp_path)
    net = policy.model
    net(input_ids=policy.prompt[None], output_hidden_states=True)
    assert any(m._forward_hooks for m in net.modules())  # transformers' own
    assert GPT2Decoder.for_model(net, 4, 8, policy.actions) is not None
    handle = net.transformer.h[0].register_forward_hook(lambda module, inputs, output: None)
    assert GPT2Decoder.for_model(net, 4, 8, policy.actions) is None
    handle.remove()


def test_local_search_hands_the_step_the_scores_of_the_rows_it_kept(tiny_gpt2, tmp_path):
    # local search scores the sampled and the regrown rows to choose between them; the step reuses the kept ones'
    train, args, task, policy = make_trainer(tiny_gpt2, tmp_path, "--local-search", "2")
    tokens, lengths, _ = policy.sample(args.batch_size)
    batch = batches.local_search(args, task, policy, batches.Batch(tokens, lengths, "policy"), 1.0)
    log_ref, scores = batch.known
    fresh = batches.score_rows(args, task, policy, batch.tokens, batch.lengths)
    assert torch.equal(scores, fresh[5]) and torch.allclose(log_ref, fresh[4], atol=1e-5)


def test_small_ground_sets_take_plain_greedy_and_large_ones_lazy(monkeypatch):
    """lazy=None chooses by the ground set's size alone (PLAIN_GREEDY_MAX_N); both make the same picks."""
    import greedy
    used = []
    for name in ("_lazy_greedy", "_plain_greedy"):
        real = getattr(greedy, name)
        monkeypatch.setattr(greedy, name, lambda state, k, *rest, _real=real, _name=name:
                            used.append(_name) or _real(state, k, *rest))
    rng = np.random.default_rng(0)
    for n in (greedy.PLAIN_GREEDY_MAX_N, greedy.PLAIN_GREEDY_MAX_N + 1):
        x = rng.random((n, 8))
        norm = np.linalg.norm(x, axis=1)
        sim, scores, bins = x @ x.T / np.outer(norm, norm), rng.random(n), rng.integers(0, 3, n)
        used.clear()
        picks = subm_select(scores, sim, bins, n - 8)
        assert used[0] == ("_plain_greedy" if n <= greedy.PLAIN_GREEDY_MAX_N else "_lazy_greedy")
        for lazy in (True, False):
            assert np.array_equal(picks, subm_select(scores, sim, bins, n - 8, lazy=lazy))
