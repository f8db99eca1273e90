"""
SubM selection (`python -m bench replay`): B items from B + 32 (the paper's B = 200 from 232, ~10 ms there), and
B = 2000, 10000. Similarity matrix time is measured apart from selection time. Lazy greedy is compared with a
straightforward greedy that recomputes every remaining candidate's full marginal gain (over the whole ground set)
at every step, vectorised with numpy per step (the strongest form of the naive method); at 232 also the authors'
style of a Python loop over candidates. Naive runs longer than a cap are timed for their first steps and
extrapolated (labelled "extrap."): step t costs in proportion to the n - t candidates it scores, so
total = (time per candidate-gain so far) * sum_t (n - t). Then one whole refresh of a full buffer.
"""
import os
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads spin on a shared machine: one thread, like torch

import numpy as np

from greedy import PLAIN_GREEDY_MAX_N, GreedyState, subm_select
from replay import Item, SubMBuffer
from similarity import bigram_fp, jaccard_matrix, morgan_fp, tanimoto_matrix

FRAGMENTS = ["C", "C", "C", "N", "O", "S", "C(=O)", "C(C)", "C(O)", "C(N)", "C(F)", "C#C", "C=C",
             "c3ccccc3", "C3CC3", "C3CCCC3", "c3ccncc3", "C(Cl)", "OC", "NC"]
SCAFFOLD = "O=C1Nc2cc({})ccc2N1"  # the paper's SMILES task


def random_molecules(n, rng):
    """n distinct valid molecules: the paper's scaffold with random side chains."""
    from rdkit import Chem, rdBase
    seen, out = set(), []
    with rdBase.BlockLogs():
        while len(out) < n:
            side = "".join(rng.choice(FRAGMENTS, size=int(rng.integers(1, 7))))
            mol = Chem.MolFromSmiles(SCAFFOLD.format(side))
            if mol is None:
                continue
            key = Chem.MolToSmiles(mol)
            if key not in seen:
                seen.add(key)
                out.append(key)
    return out


def game24_like(rng, n):
    """n distinct expressions (a o b) o (c o d) over the numbers 3, 4, 6, 8: one Game of 24 prompt's samples."""
    out = {}
    while len(out) < n:
        a, o = rng.permutation(["3", "4", "6", "8"]), rng.choice(list("+-*/"), 3)
        out.setdefault(f"({a[0]}{o[0]}{a[1]}){o[1]}({a[2]}{o[2]}{a[3]})")
    return list(out)


def timed(fn, repeat=1):
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), out


def rdkit_bulk_sim(smiles):
    from rdkit import Chem, DataStructs
    from rdkit.Chem import rdFingerprintGenerator
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)
    fps = [gen.GetFingerprint(Chem.MolFromSmiles(s)) for s in smiles]
    t = time.perf_counter()
    sim = np.array([DataStructs.BulkTanimotoSimilarity(f, fps) for f in fps])
    return time.perf_counter() - t, sim


def popcount_sim(packed, chunk=256):
    """Tanimoto by bit-packed popcount over the whole set (the other exact numpy route)."""
    words = np.ascontiguousarray(packed).view(np.uint64)  # [n, 32]
    ones = np.bitwise_count(words).sum(axis=1).astype(np.float64)
    sim = np.empty((len(words), len(words)))
    for i in range(0, len(words), chunk):
        common = np.bitwise_count(words[i:i + chunk, None, :] & words[None, :, :]).sum(axis=2)
        union = ones[i:i + chunk, None] + ones[None, :] - common
        sim[i:i + chunk] = np.divide(common, union, out=np.zeros_like(union), where=union > 0)
    return sim


def naive_greedy(scores, sim, bins, k, cap_s):
    """Plain greedy, every gain recomputed each step; stops at cap_s and extrapolates."""
    state = GreedyState(scores, sim, bins, k)
    remaining, picks, done = np.arange(len(scores)), [], 0
    total = sum(len(scores) - t for t in range(k))  # candidate-gains the full run computes
    t0 = time.perf_counter()
    for step in range(k):
        g = state.gains(remaining)
        j = int(np.argmax(g))
        picks.append(int(remaining[j]))
        state.add(picks[-1])
        done += len(remaining)
        remaining = np.delete(remaining, j)
        elapsed = time.perf_counter() - t0
        if elapsed > cap_s and step < k - 1:
            return elapsed / done * total, True, None
    return time.perf_counter() - t0, False, np.array(picks)


def naive_python_loop(scores, sim, bins, k):
    """The authors' style: a Python loop over candidates, one gain evaluation each, every step."""
    state = GreedyState(scores, sim, bins, k)
    remaining, picks = list(range(len(scores))), []
    for _ in range(k):
        best = max(remaining, key=lambda x: (float(state.gains(np.array([x]))[0]), -x))
        picks.append(best)
        remaining.remove(best)
        state.add(best)
    return np.array(picks)


def bench_replay(sizes=((200, 232), (2000, 2032), (10000, 10032)), naive_cap_s=60.0, seed=0):
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.1f} on {os.cpu_count()} cores (wall-clock timings)")
    rng = np.random.default_rng(seed)
    n_max = max(n for _, n in sizes)
    t = time.perf_counter()
    smiles = random_molecules(n_max, rng)
    print(f"built {n_max} distinct scaffold molecules in {time.perf_counter() - t:.1f} s")
    t = time.perf_counter()
    packed = np.stack([morgan_fp(s) for s in smiles])
    fp_us = (time.perf_counter() - t) / n_max * 1e6
    print(f"fingerprint (parse + Morgan r2 2048, once per item on entry): {fp_us:.0f} us/molecule")

    rows = []
    for B, n in sizes:
        fps = packed[:n]
        active = int(np.unpackbits(fps, axis=1).any(axis=0).sum())
        t_sim, sim = timed(lambda: tanimoto_matrix(fps), repeat=5 if n < 5000 else 1)
        t_rdkit, sim_rdkit = rdkit_bulk_sim(smiles[:n])
        assert np.array_equal(sim, sim_rdkit), "numpy Tanimoto must equal RDKit's exactly"
        del sim_rdkit
        t_pop = timed(lambda: popcount_sim(fps))[0] if n <= 2100 else float("nan")
        scores = rng.uniform(0, 1, n) + (rng.random(n) < 0.9)  # s(x) = r(x) + 1[valid]
        bins = rng.integers(1, 11, n)  # tau in 1..10, one bin per token
        t_lazy, picks = timed(lambda: subm_select(scores, sim, bins, B), repeat=20 if n < 5000 else 1)
        t_naive, extrap, naive_picks = naive_greedy(scores, sim, bins, B, naive_cap_s)
        same = "n/a" if naive_picks is None else str(np.array_equal(picks, naive_picks))
        row = dict(B=B, n=n, active_bits=active, sim_numpy_s=t_sim, sim_rdkit_s=t_rdkit,
                   sim_popcount_s=t_pop, lazy_s=t_lazy, naive_s=t_naive, naive_extrapolated=extrap,
                   speedup=t_naive / t_lazy, same_picks=same)
        if n < 1000:
            t_loop, loop_picks = timed(lambda: naive_python_loop(scores, sim, bins, B))
            row.update(naive_loop_s=t_loop, loop_speedup=t_loop / t_lazy,
                       loop_same=bool(np.array_equal(loop_picks, picks)))
        rows.append(row)

    # a Game of 24 prompt's buffer: 208 expressions over the same four numbers, nearly all non-solutions that tie,
    # where lazy greedy's bounds stop pruning and it hands over to plain greedy
    texts = game24_like(rng, 208)
    sim, scores = jaccard_matrix([bigram_fp(t) for t in texts]), np.ones(len(texts))
    t_lazy, picks = timed(lambda: subm_select(scores, sim, np.zeros(len(texts), dtype=int), 200), repeat=20)
    t_naive, _, naive_picks = naive_greedy(scores, sim, np.zeros(len(texts), dtype=int), 200, naive_cap_s)
    rows.append(dict(B=200, n=len(texts), lazy_s=t_lazy, naive_s=t_naive, naive_extrapolated=False,
                     speedup=t_naive / t_lazy, same_picks=str(np.array_equal(picks, naive_picks)), ties=True))

    # one whole refresh of a full SubM buffer, as train.py does it each on-policy step (32 new valid molecules into
    # 200: fingerprints of the new texts only, their rows of the similarity matrix, lazy greedy), CPU time
    pool = smiles if len(smiles) >= 232 + 20 * 32 else random_molecules(232 + 20 * 32, rng)
    items = [Item((i,), s, s, float(rng.uniform()), True, int(rng.integers(1, 11)))
             for i, s in enumerate(pool[:232 + 20 * 32])]
    buffer, refresh = SubMBuffer(capacity=200), []
    buffer.add(items[:200])
    for i in range(20):
        t = time.thread_time()
        buffer.add(items[200 + i * 32:232 + i * 32])
        refresh.append(time.thread_time() - t)
    refresh = float(np.median(refresh))

    def ms(x):
        return "      -" if x != x else f"{x * 1e3:9.1f}"
    print("\nsimilarity matrix (exact Tanimoto, all three give identical doubles), ms:")
    print(f"{'B':>6} {'n':>6} {'bits':>5} {'numpy matmul':>13} {'numpy popcnt':>13} {'RDKit bulk':>11}")
    for r in rows[:len(sizes)]:
        print(f"{r['B']:6d} {r['n']:6d} {r['active_bits']:5d} {ms(r['sim_numpy_s']):>13} "
              f"{ms(r['sim_popcount_s']):>13} {ms(r['sim_rdkit_s']):>11}")
    print("\nselection (given the similarity matrix), ms:")
    print(f"{'B':>6} {'n':>6} {'lazy greedy':>12} {'naive greedy':>22} {'speedup':>9} {'same picks':>10}")
    for r in rows:
        naive = ms(r["naive_s"]) + (" (extrap.)" if r["naive_extrapolated"] else "          ")
        print(f"{r['B']:6d} {r['n']:6d} {ms(r['lazy_s']):>12} {naive:>22} {r['speedup']:8.0f}x "
              f"{r['same_picks']:>10}" + ("  (Game of 24-like: ties, bigram Jaccard)" if r.get("ties") else ""))
    for r in rows:
        if "naive_loop_s" in r:
            print(f"B={r['B']} n={r['n']}: naive Python loop over candidates "
                  f"{ms(r['naive_loop_s']).strip()} ms ({r['loop_speedup']:.0f}x lazy), "
                  f"same picks: {r['loop_same']}")
    print(f"\nfull SubM refresh B=200 (+32 new valid molecules: fingerprints, similarities, lazy greedy), median CPU "
          f"time over 20 refreshes: {refresh * 1e3:.1f} ms")
    sizes = greedy_by_size(smiles, rng)
    return dict(rows=rows, refresh_ms=refresh * 1e3, fp_us=fp_us, load=load, greedy_by_size=sizes)


def greedy_by_size(smiles, rng, shapes=((40, 32), (72, 64), (100, 64), (136, 128), (164, 128), (232, 200))):
    """Lazy against plain greedy (the same picks) on small ground sets of both kinds of item, CPU ms (median of 20):
    where subm_select's default switches (PLAIN_GREEDY_MAX_N) and why."""
    print(f"\nselection of k from n, lazy against plain greedy, CPU ms (subm_select takes plain up to n = "
          f"{PLAIN_GREEDY_MAX_N}):\n{'items':>16} {'n':>5} {'k':>5} {'lazy':>7} {'plain':>7}")
    out = []
    for kind in ("molecules", "Game of 24-like"):
        for n, k in shapes:
            if kind == "molecules":
                sim = tanimoto_matrix(np.stack([morgan_fp(x) for x in smiles[:n]]))
            else:
                sim = jaccard_matrix([bigram_fp(t) for t in game24_like(rng, n)])
            scores, bins = rng.uniform(0, 1, n) + (rng.random(n) < 0.9), rng.integers(1, 11, n)
            lazy, plain = (float(np.median([cpu_time(lambda: subm_select(scores, sim, bins, k, lazy=flag))
                                            for _ in range(20)])) for flag in (True, False))
            print(f"{kind:>16} {n:5d} {k:5d} {lazy * 1e3:7.2f} {plain * 1e3:7.2f}")
            out.append(dict(kind=kind, n=n, k=k, lazy_ms=lazy * 1e3, plain_ms=plain * 1e3))
    return out


def cpu_time(fn):
    t = time.thread_time()
    fn()
    return time.thread_time() - t
