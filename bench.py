"""
Benchmarks (not tests): `python bench.py` runs every section, `python bench.py losses` one of them.
Add a section by writing a function and registering it in SECTIONS at the bottom.

losses: forward + backward time of the fused objectives in losses.py against straightforward loop
versions in the style of the authors' code (a Python loop over window sizes for SubTB, over positions
for the soft absorbed target), both measured in the same run, B = 32, T in {16, 64, 256, 1024}.

step: one training micro-batch phase by phase (on-policy and replayed), today's code against the step before
issue 15 (legacy_sample, LegacySubMBuffer, no replay cache, HF's gelu_new), interleaved, CPU time and ratios.
sampler: Policy.sample's cost per token step against the GEMMs of that step and a teacher-forced forward.
fidelity, fidelity-expr24: the fidelity meter's share of a default run.
The step, sampler, fidelity, gpu and expr24 sections live in bench_step.py.
"""
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads spin on a shared machine: one thread, like torch

import numpy as np
import torch
from torch.utils import benchmark

import losses
from replay import GreedyState, Item, SubMBuffer, subm_select
from bench_legacy import LegacySubMBuffer
from bench_step import (_median_time, _random_gpt2, bench_expr24, bench_fidelity, bench_gpu, bench_sampler,
                        bench_step)
from similarity import morgan_fp, tanimoto_matrix

# ----------------------------------------------------------------------------- loop baselines

def loop_tb(log_pf, log_pterm, log_r, lengths, log_z):
    """TB summing log_pf with a loop over positions."""
    total = torch.zeros_like(log_pf[:, 0])
    for t in range(log_pf.shape[1]):
        total = total + torch.where(t < lengths, log_pf[:, t], 0.0)
    idx = lengths[:, None]
    d = log_z + total + log_pterm.gather(1, idx)[:, 0] - log_r.gather(1, idx)[:, 0]
    return (d ** 2).mean()


def _delta_cumsum(log_pf, log_pterm, log_r):
    """C_k = sum_{t<k} delta_t (authors' formulation; inputs must be finite)."""
    delta = log_r[:, :-1] + log_pf[:, :-1] + log_pterm[:, 1:] - log_r[:, 1:] - log_pterm[:, :-1]
    return torch.cat([torch.zeros_like(delta[:, :1]), delta], 1).cumsum(1)


def loop_subtb(log_pf, log_pterm, log_r, lengths, lam=1.0):
    """Modified SubTB with a loop over window sizes (as in the authors' code)."""
    c = _delta_cumsum(log_pf, log_pterm, log_r)
    T = c.shape[1]
    total, weight = 0.0, 0.0
    for size in range(1, T):
        end = torch.arange(size, T, device=c.device)[None, :]
        valid = end <= lengths[:, None]  # window (end - size) -> end inside the trajectory
        sq = torch.where(valid, (c[:, size:] - c[:, :-size]) ** 2, 0.0)
        total = total + lam ** (size - 1) * sq.sum()
        weight = weight + lam ** (size - 1) * valid.sum()
    return total / weight


def loop_raptb(log_pf, log_pterm, log_r, u, lengths, log_z, eta=0.25, gamma=0.99, alpha=0.5, beta=5.0, rho=0.1,
               k_min=2, lam=1.0, eps_absorb=1e-6):
    """RapTB (no horizon) with the soft target computed by a loop over positions (authors' style)."""
    B, T = log_pf.shape
    idx = lengths[:, None]
    k = torch.arange(T, device=log_pf.device)[None, :]
    d_tb = log_z + _delta_cumsum(log_pf, log_pterm, log_r).gather(1, idx)[:, 0] + (log_pterm - log_r)[:, 0]
    c_bar = _delta_cumsum(log_pf, log_pterm.detach(), log_r)
    in_h = k <= idx
    u = u.detach()
    u_m = torch.where(in_h, u, float("-inf"))
    u_max = u_m.flip(1).cummax(1).values.flip(1)
    u_soft = torch.empty_like(u)
    z = beta * u_m[:, -1]
    u_soft[:, -1] = z / beta
    for t in range(T - 2, -1, -1):
        z = torch.logaddexp(beta * u_m[:, t], z - beta * rho)
        u_soft[:, t] = z / beta
    u_tgt = torch.where(in_h, alpha * u_max + (1 - alpha) * u_soft, 0.0)
    eligible = (k >= k_min) & in_h
    gate = eligible & (u.abs() <= eps_absorb)
    c_ab = c_bar + torch.where(gate, gamma ** (idx - k).clamp(min=0) * (u - u_tgt), 0.0)
    w = torch.where(eligible, lam ** (k - k_min).clamp(min=0).to(u.dtype), 0.0)
    aux = (w * c_ab ** 2).sum(1) / w.sum(1).clamp(min=1)
    return (d_tb ** 2 + eta * aux).mean()


# ----------------------------------------------------------------------------- sections

def _loss_batch(B, T, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, T, (B,), generator=g)
    lengths[:4] = T - 1
    log_pf = -3 * torch.rand(B, T, generator=g)
    log_pterm = -3 * torch.rand(B, T, generator=g)
    log_r = torch.randn(B, T, generator=g)
    u = torch.where(torch.rand(B, T, generator=g) < 0.6, 0.0, 50 * torch.rand(B, T, generator=g))
    log_z = torch.tensor(0.5)
    out = [x.to(device) for x in (log_pf, log_pterm, log_r, u, lengths, log_z)]
    for i in (0, 1, 5):
        out[i].requires_grad_()
    return out


def bench_losses():
    B, Ts = 32, [16, 64, 256, 1024]
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    print(f"losses: forward+backward, B={B}, float32, median time per call, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'device':6} {'loss':12} {'T':>5} {'fused ms':>10} {'loop ms':>10} {'loop/fused':>10}")
    for device in devices:
        for T in Ts:
            log_pf, log_pterm, log_r, u, lengths, log_z = _loss_batch(B, T, device)
            cases = {
                "tb": (lambda: losses.tb_loss(log_pf, log_pterm, log_r, lengths, log_z)[0],
                       lambda: loop_tb(log_pf, log_pterm, log_r, lengths, log_z)),
                "subtb": (lambda: losses.subtb_loss(log_pf, log_pterm, log_r, lengths)[0],
                          lambda: loop_subtb(log_pf, log_pterm, log_r, lengths)),
                "subtb l=0.9": (lambda: losses.subtb_loss(log_pf, log_pterm, log_r, lengths, lam=0.9)[0],
                                lambda: loop_subtb(log_pf, log_pterm, log_r, lengths, lam=0.9)),
                "raptb": (lambda: losses.raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z)[0],
                          lambda: loop_raptb(log_pf, log_pterm, log_r, u, lengths, log_z)),
            }
            for name, (fused, loop) in cases.items():
                a, b = fused(), loop()  # same objective: check before timing
                assert torch.allclose(a, b, rtol=1e-4, atol=1e-4), (name, T, a.item(), b.item())
                times = []
                for fn in (fused, loop):
                    timer = benchmark.Timer(
                        stmt="torch.autograd.grad(fn(), [log_pf, log_pterm, log_z], allow_unused=True)",
                        globals={"torch": torch, "fn": fn, "log_pf": log_pf, "log_pterm": log_pterm, "log_z": log_z},
                        num_threads=torch.get_num_threads())
                    times.append(timer.blocked_autorange(min_run_time=0.3).median * 1e3)
                print(f"{device:6} {name:12} {T:5d} {times[0]:10.3f} {times[1]:10.3f} {times[1] / times[0]:10.1f}",
                      flush=True)


# ----------------------------------------------------------------------------- replay
# Benchmark for replay.py (to be merged into bench.py): SubM selection of B items from B + 32
# (the paper's B = 200 from 232, ~10 ms there), and B = 2000, 10000. Similarity matrix time is
# measured apart from selection time. Lazy greedy is compared with a straightforward greedy that
# recomputes every remaining candidate's full marginal gain (over the whole ground set) at every
# step, vectorised with numpy per step (the strongest form of the naive method); at 232 also the
# authors' style of a Python loop over candidates. Naive runs longer than a cap are timed for
# their first steps and extrapolated (labelled "extrap."): step t costs in proportion to the
# n - t candidates it scores, so total = (time per candidate-gain so far) * sum_t (n - t).
#

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

    # one whole refresh of a full SubM buffer, as train.py does it each on-policy step (32 new valid molecules into
    # 200): today's (fingerprints of new texts only, new rows of the similarity matrix, lazy greedy with groups)
    # and the one before (LegacySubMBuffer: every fingerprint, the whole matrix), interleaved, CPU time
    pool = smiles if len(smiles) >= 232 + 20 * 32 else random_molecules(232 + 20 * 32, rng)
    items = [Item((i,), s, s, float(rng.uniform()), True, int(rng.integers(1, 11)))
             for i, s in enumerate(pool[:232 + 20 * 32])]
    bufs = dict(new=SubMBuffer(capacity=200), old=LegacySubMBuffer(capacity=200))
    refresh = dict(new=[], old=[])
    for buf in bufs.values():
        buf.add(items[:200])
    for i in range(20):
        batch = items[200 + i * 32:232 + i * 32]
        for name in (("new", "old") if i % 2 else ("old", "new")):
            t = time.thread_time()
            bufs[name].add(batch)
            refresh[name].append(time.thread_time() - t)
    assert [it.tokens for it in bufs["new"].items] == [it.tokens for it in bufs["old"].items], "same picks"
    refresh = {k: float(np.median(v)) for k, v in refresh.items()}

    def ms(x):
        return "      -" if x != x else f"{x * 1e3:9.1f}"
    print("\nsimilarity matrix (exact Tanimoto, all three give identical doubles), ms:")
    print(f"{'B':>6} {'n':>6} {'bits':>5} {'numpy matmul':>13} {'numpy popcnt':>13} {'RDKit bulk':>11}")
    for r in rows:
        print(f"{r['B']:6d} {r['n']:6d} {r['active_bits']:5d} {ms(r['sim_numpy_s']):>13} "
              f"{ms(r['sim_popcount_s']):>13} {ms(r['sim_rdkit_s']):>11}")
    print("\nselection (given the similarity matrix), ms:")
    print(f"{'B':>6} {'n':>6} {'lazy greedy':>12} {'naive greedy':>22} {'speedup':>9} {'same picks':>10}")
    for r in rows:
        naive = ms(r["naive_s"]) + (" (extrap.)" if r["naive_extrapolated"] else "          ")
        print(f"{r['B']:6d} {r['n']:6d} {ms(r['lazy_s']):>12} {naive:>22} {r['speedup']:8.0f}x "
              f"{r['same_picks']:>10}")
    for r in rows:
        if "naive_loop_s" in r:
            print(f"B={r['B']} n={r['n']}: naive Python loop over candidates "
                  f"{ms(r['naive_loop_s']).strip()} ms ({r['loop_speedup']:.0f}x lazy), "
                  f"same picks: {r['loop_same']}")
    print(f"\nfull SubM refresh B=200 (+32 new valid molecules: fingerprints, similarities, lazy greedy), median CPU "
          f"time over 20 refreshes: {refresh['new'] * 1e3:.1f} ms; before (every fingerprint, the whole 232x232 "
          f"matrix): {refresh['old'] * 1e3:.1f} ms ({refresh['old'] / refresh['new']:.1f}x); same buffer contents")
    return dict(rows=rows, refresh_ms=refresh["new"] * 1e3, refresh_old_ms=refresh["old"] * 1e3, fp_us=fp_us,
                load=load)


# ----------------------------------------------------------------------------- policy and training step

def bench_logprobs():
    """log_pf / log_pterm of a batch: ONE teacher-forced pass (ours) vs a step-by-step loop that keeps
    gradients (a KV-cached forward per generated token, as in the authors' code and gfn-lm-tuning), each
    followed by backward of the summed log-probs. B = 32, prior-shaped GPT-2."""
    import torch
    import model as modellib
    import rewards
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n== one-pass log-probs vs step-by-step loop with gradients (B=32, prior-shaped GPT-2, {device}) ==")
    print(f"{'tokens':>7} {'loop ms':>9} {'ours ms':>9} {'ratio':>7}")
    net, tokenizer = _random_gpt2(512, device)
    allowed = rewards.allowed_token_ids(tokenizer, rewards.SmilesTask.charset)
    for length in (16, 64, 256):
        policy = modellib.Policy(net, tokenizer, allowed, 0, length, reference=net)
        torch.manual_seed(0)
        tokens, lengths, _ = policy.sample(32)
        lengths = torch.full_like(lengths, length)  # every row at full length: the worst case for the loop
        tokens = policy.actions[torch.randint(len(policy.actions) - 1, tokens.shape, device=device)]

        def ours():
            log_pf, log_pterm = policy.log_probs(tokens, lengths)
            (log_pf.sum() + log_pterm.sum()).backward()

        def loop():
            ids, past, total = policy.prompt.expand(len(tokens), -1), None, 0.0
            for k in range(length + 1):
                out = net(input_ids=ids, past_key_values=past, use_cache=True)
                past = out.past_key_values
                logp = policy.action_log_probs(out.logits[:, -1], k)
                total = total + logp[:, policy.stop].sum()
                if k < length:
                    total = total + logp.gather(-1, policy.action_of[tokens[:, k:k + 1]]).sum()
                    ids = tokens[:, k:k + 1]
            total.backward()

        repeats = 5 if length < 256 else 3
        t_loop, t_ours = _median_time(loop, repeats), _median_time(ours, repeats)
        print(f"{length:>7} {t_loop * 1e3:>9.1f} {t_ours * 1e3:>9.1f} {t_loop / t_ours:>6.1f}x")


SECTIONS = {"losses": bench_losses, "replay": bench_replay, "logprobs": bench_logprobs, "step": bench_step,
            "sampler": bench_sampler, "fidelity": bench_fidelity, "gpu": bench_gpu, "expr24": bench_expr24,
            "fidelity-expr24": lambda: bench_fidelity(task_name="expr24")}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; available: {list(SECTIONS)}")
    for name in names:
        SECTIONS[name]()
