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
"""
import os
import sys
import time

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # numpy's BLAS threads spin on a shared machine: one thread, like torch

import numpy as np
import torch
from torch.utils import benchmark

import losses
from replay import (GreedyState, Item, SubMBuffer, bigram_fp, jaccard_matrix, morgan_fp, subm_select,
                    tanimoto_matrix)

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

def _median_time(fn, repeats):
    import time
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def _random_gpt2(n_positions, device):
    """The embedded prior's shape (4 layers, width 256) with a longer context, random weights:
    speed does not depend on the weights, and the prior's context (128) is shorter than 256 + prompt."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    import model as modellib
    tokenizer = AutoTokenizer.from_pretrained(modellib.DEFAULT_MODEL)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=256, n_layer=4, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).to(device), tokenizer


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


# ----------------------------------------------------------------------------- the step as it was (issue 15's baseline)
# bench_step compares today's step with the one before the replay cache, the GPT-2 decoder and the faster SubM
# refresh, in the same run. These are those pieces as they were, kept here only for that comparison.

def legacy_sample(policy, net, n, temperature=1.0):
    """Policy._sample before the GPT-2 decoder: the network's own Hugging Face forward and cache at every step."""
    was_training = policy.model.training
    policy.model.eval()
    T = policy.max_len + 1
    tokens = torch.full((n, policy.max_len), policy.eos, device=policy.device)
    lengths = torch.full((n,), policy.max_len, device=policy.device)
    log_q = torch.zeros(n, T, device=policy.device)
    done = torch.zeros(n, dtype=torch.bool, device=policy.device)
    ids, past = policy.prompt.expand(n, -1), None
    with torch.no_grad():
        for k in range(T):
            with policy._autocast():
                out = net(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            allowed = None
            if policy.task_mask is not None:
                allowed = policy.task_mask(policy.action_of[tokens[:, :k]], k) | done[:, None]
            logp = policy.action_log_probs(out.logits[:, -1], k, allowed)
            if allowed is not None and bool(logp.isneginf().all(-1).any()):
                raise ValueError(f"the task's state mask and L_min leave no action at a state with {k} tokens")
            a = torch.multinomial(torch.softmax(logp / temperature, -1), 1).squeeze(-1)
            log_q[:, k] = torch.where(done, 0.0, logp.gather(-1, a[:, None]).squeeze(-1))
            stopping = (a == policy.stop) & ~done
            lengths[stopping] = k
            done |= stopping
            if policy._all_done(done):
                break
            tokens[~done, k] = policy.actions[a[~done]]
            ids = tokens[:, k:k + 1]
    policy.model.train(was_training)
    return tokens, lengths, log_q


def legacy_lazy_greedy(state, k):
    """replay._lazy_greedy before the groups of items that cover nothing."""
    import heapq
    n = len(state.scores)
    heap = [(-g, i) for i, g in enumerate(state.gains(np.arange(n)).tolist())]
    heapq.heapify(heap)
    fresh_at = [0] * n
    picks, gains = [], []
    for step in range(k):
        while True:
            neg_g, i = heap[0]
            if fresh_at[i] == step:
                heapq.heappop(heap)
                break
            g = state.gain(i)
            fresh_at[i] = step
            heapq.heapreplace(heap, (-g, i))
        picks.append(i)
        gains.append(-neg_g)
        state.add(i)
    return picks, gains


class LegacySubMBuffer(SubMBuffer):
    """SubMBuffer's refresh before: every entering item fingerprinted (parsed again), the whole similarity matrix
    recomputed by one BLAS product, lazy greedy without the groups. Keeps the same items as SubMBuffer."""

    def add(self, items):
        from dataclasses import replace
        entered = []
        for it in items:
            fp = morgan_fp(it.text, it.valid) if self.similarity == "tanimoto" else bigram_fp(it.text)
            entered.append(replace(it, tokens=tuple(it.tokens), fp=fp))
        ground = self._dedupe(self.items + entered)
        if self.valid_only:
            ground = [it for it in ground if it.valid]
        self.items = ground if len(ground) <= self.capacity else self._legacy_select(ground)

    def _legacy_select(self, ground):
        scores = np.array([self.w_rew * it.score + self.w_val * it.valid for it in ground])
        bins = np.array([it.length // self.len_bin_size for it in ground])
        a = None
        if self.bin_weights == "authors":
            n_bins = int(bins.max()) + 1
            a = ((np.arange(n_bins) + 1.0) / n_bins) ** self.len_power
        fps = [it.fp for it in ground]
        sim = tanimoto_matrix(np.stack(fps)) if self.similarity == "tanimoto" else jaccard_matrix(fps)
        state = GreedyState(scores, sim, bins, self.capacity, self.w_div, self.w_len, a, self.diversity)
        picks = legacy_lazy_greedy(state, min(self.capacity, len(ground)))[0]
        return [ground[i] for i in np.sort(picks)]


def set_gelu(policy, fused):
    """GPT-2's MLP activation gelu_new as Hugging Face computes it (five Python-level tensor ops, each kept for
    backward) or fused into one kernel as load_model leaves it (model.fuse_gelu)."""
    from transformers.activations import NewGELUActivation
    for net in (policy.model, policy.reference):
        for m in (net.modules() if net is not None else ()):
            if type(m).__name__ == "GPT2MLP":
                m.act = torch.nn.GELU(approximate="tanh") if fused else NewGELUActivation()


# ----------------------------------------------------------------------------- the training step, phase by phase

STEP_PHASES = ("sample", "fetch", "reward", "reference", "forward", "loss", "backward", "refresh")


def bench_step(model="prior", extra=(), steps=12, warmup=3, modes=("old", "new"), seed=0):
    """Where one training micro-batch's time goes (SMILES task, batch 32, one thread, the embedded prior by
    default), for today's code ("new") and the step as it was before issue 15 ("old": Hugging Face's forward at
    every sampling step, the reference pass and the task again on replayed batches, the old SubM refresh, GPT-2's
    gelu_new as HF computes it), interleaved in one run. Each micro-batch is timed twice: on-policy (sample, score,
    loss, refresh the buffer) and replayed (fetch 32 items, score, loss). Times are CPU time of this thread
    (robust to other processes sharing the cores) and wall time; the ratios are old / new."""
    import batches
    import train
    torch.set_num_threads(1)
    args = train.get_args(["--model", model, "--replay", "subm", "--out", "/tmp/bench-step", *extra])
    task = train.build_task(args)
    torch.manual_seed(seed)
    policy = train.build_policy(args, task)
    log_z = torch.nn.Parameter(torch.zeros((), device=policy.device))
    rng = np.random.default_rng(seed)
    buffers = dict(old=LegacySubMBuffer(capacity=args.buffer_size, similarity=task.similarity),
                   new=train.build_buffer(args, task))
    cpu = {m: {s: {p: 0.0 for p in STEP_PHASES} for s in ("policy", "replay")} for m in modes}
    wall = {m: {s: 0.0 for s in ("policy", "replay")} for m in modes}
    sync = torch.cuda.synchronize if policy.device.type == "cuda" else (lambda: None)

    def micro_batch(mode, source, record):
        old = mode == "old"
        set_gelu(policy, fused=not old)
        times = dict.fromkeys(STEP_PHASES, 0.0)

        def timed(name, fn):
            sync()
            t = time.thread_time()
            out = fn()
            sync()
            times[name] += time.thread_time() - t
            return out
        start = time.perf_counter()
        items = None
        if source == "policy":
            temperature = 1.0 if rng.random() >= args.temp_prob else float(rng.uniform(0.8, 1.5))
            sampler = (lambda: legacy_sample(policy, policy.model, args.batch_size, temperature)) if old else \
                (lambda: policy.sample(args.batch_size, temperature))
            tokens, lengths, _ = timed("sample", sampler)
        else:
            items = timed("fetch", lambda: buffers[mode].sample(args.batch_size, rng))
            tokens, lengths = timed("fetch", lambda: batches.from_items(policy, items))
        cached = None if old else timed("fetch", lambda: batches.cached_rows(args, policy, items))
        if cached is None:
            scores = timed("reward", lambda: train.rewards.prefix_scores(task, policy.token_texts, tokens, lengths,
                                                                         args.max_len).to(policy.device))
            log_ref = timed("reference", lambda: policy.log_ref_stop(tokens, lengths))
        else:
            log_ref, scores = cached
        log_r, u = train.rewards.log_reward(log_ref.double(), scores, args.kappa, args.lam)
        log_pf, log_pterm = timed("forward", lambda: policy.log_probs(tokens, lengths))
        loss, _ = timed("loss", lambda: losses.compute_loss("raptb", log_pf, log_pterm, log_r.float(), u.float(),
                                                            lengths, log_z, **train.loss_knobs(args, 0.0)))
        timed("backward", lambda: loss.backward())
        if source == "policy":
            texts = policy.texts(tokens, lengths)
            final = scores.gather(1, lengths[:, None]).squeeze(1)
            made = (lambda: batches.to_items(task, tokens, lengths, texts, final)) if old else \
                (lambda: batches.to_items(task, tokens, lengths, texts, final, log_ref, scores))
            timed("refresh", lambda: buffers[mode].add(made()))
        elapsed = time.perf_counter() - start
        policy.model.zero_grad(set_to_none=True)
        log_z.grad = None
        if record:
            for name, t in times.items():
                cpu[mode][source][name] += t
            wall[mode][source] += elapsed

    for i in range(warmup + steps):
        order = modes if i % 2 == 0 else modes[::-1]  # alternate who goes first
        for mode in order:
            micro_batch(mode, "policy", i >= warmup)
        for mode in order:
            if len(buffers[mode]) >= args.batch_size:
                micro_batch(mode, "replay", i >= warmup)
    set_gelu(policy, fused=True)  # as load_model leaves it

    p = (args.p_replay_start + args.p_replay_end) / 2  # the mean replay probability over a run (linear schedule)
    print(f"\n== one training micro-batch, phase by phase ({model}, {args.task}, B={args.batch_size}, SubM buffer "
          f"{args.buffer_size}, {policy.device}, {torch.get_num_threads()} thread, {steps} micro-batches each; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores) ==")
    print("CPU ms of this thread per micro-batch; old = before issue 15 (HF forward per sampling step, reference "
          "and task rerun on replay, old SubM refresh, HF gelu_new), new = this code")
    header = f"{'phase':>10}" + "".join(f" {m + ' ' + s[:6]:>14}" for s in ("policy", "replay") for m in modes)
    if len(modes) == 2:
        header += f" {'ratio policy':>13} {'ratio replay':>13}"
    print(header)
    total = {(m, s): sum(cpu[m][s].values()) / steps for m in modes for s in ("policy", "replay")}
    for name in STEP_PHASES + ("total",):
        vals = {(m, s): (sum(cpu[m][s].values()) if name == "total" else cpu[m][s][name]) / steps * 1e3
                for m in modes for s in ("policy", "replay")}
        line = f"{name:>10}" + "".join(f" {vals[m, s]:14.1f}" for s in ("policy", "replay") for m in modes)
        if len(modes) == 2:
            line += "".join(f" {vals['old', s] / vals['new', s]:12.2f}x" if vals["new", s] > 0.05 else f" {'':>13}"
                            for s in ("policy", "replay"))
        print(line)
    wall_ms = {(m, s): wall[m][s] / steps * 1e3 for m in modes for s in ("policy", "replay")}
    print(f"{'wall':>10}" + "".join(f" {wall_ms[m, s]:14.1f}" for s in ("policy", "replay") for m in modes))
    mixed = {m: (1 - p) * total[m, "policy"] + p * total[m, "replay"] for m in modes}
    for m in modes:
        print(f"{m}: {mixed[m] * 1e3:.1f} CPU ms per micro-batch at the run's mean replay share {p:.3f}, "
              f"{mixed[m] * args.grad_accum * 1e3:.0f} ms per optimiser step of {args.grad_accum} (before AdamW)")
    if len(modes) == 2:
        print(f"speed-up old/new: on-policy micro-batch {total['old', 'policy'] / total['new', 'policy']:.2f}x, "
              f"replayed {total['old', 'replay'] / total['new', 'replay']:.2f}x, "
              f"mixed {mixed['old'] / mixed['new']:.2f}x (CPU time); wall, on-policy "
              f"{wall_ms['old', 'policy'] / wall_ms['new', 'policy']:.2f}x")
    return dict(cpu=cpu, wall=wall, steps=steps, mixed=mixed)


def bench_sampler(model="prior", n=32, max_len=10, repeats=15):
    """The per-token cost of Policy.sample against the FLOPs of the token: one sampling step (n new tokens through
    the whole network with a KV cache) next to (a) the step's matrix products alone (the GEMMs of one forward of
    n tokens, weights [E, 3E], [E, E], [E, 4E], [4E, E] per layer + the action rows of the LM head) and (b) a
    teacher-forced forward per token column (n x (max_len + 1) tokens at once, divided by max_len + 1). Today's
    sampler and the Hugging Face forward per step (the old one) are interleaved. Minimum CPU time over repeats."""
    import model as modellib
    import rewards
    torch.set_num_threads(1)
    net, tokenizer = modellib.load_model(model)
    allowed = rewards.allowed_token_ids(tokenizer, rewards.SmilesTask.charset)
    policy = modellib.Policy(net, tokenizer, allowed, max_len, max_len)  # every row max_len tokens: 11 steps
    steps = max_len + 1
    blocks = net.transformer.h
    x = {d: torch.randn(n, d) for d in (net.config.n_embd, 4 * net.config.n_embd)}
    head = net.lm_head.weight[policy.actions].detach()

    def gemms():
        with torch.no_grad():
            for b in blocks:
                for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj):
                    torch.addmm(lin.bias, x[lin.weight.shape[0]], lin.weight)
            torch.mm(x[net.config.n_embd], head.t())
    tokens = policy.actions[torch.randint(len(policy.actions) - 1, (n, max_len))]
    lengths = torch.full((n,), max_len)

    def forward():
        with torch.no_grad():
            policy.log_probs(tokens, lengths)
    set_gelu(policy, fused=True)  # the comparator at its fastest: GPT-2's GELU as one kernel

    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.thread_time()
            fn()
            times.append(time.thread_time() - t)
        return min(times)
    res = dict(new=[], old=[], gemm=[], forward=[])
    for _ in range(2):
        res["new"].append(best(lambda: policy.sample(n)) / steps)
        res["old"].append(best(lambda: legacy_sample(policy, net, n)) / steps)
        res["gemm"].append(best(gemms))
        res["forward"].append(best(forward) / steps)
    r = {k: min(v) * 1e3 for k, v in res.items()}
    flops = 2 * n * (sum(p.numel() for b in blocks for p in b.parameters() if p.dim() == 2) + head.numel())
    print(f"\n== sampler, per token step ({model}, n={n}, {steps} steps, {torch.get_num_threads()} thread, "
          f"{flops / 1e6:.0f} MFLOP per step) ==")
    print(f"{'GEMMs of the step alone':>36} {r['gemm']:7.2f} ms  ({flops / r['gemm'] / 1e6:.0f} GFLOP/s)")
    print(f"{'teacher-forced forward per column':>36} {r['forward']:7.2f} ms")
    print(f"{'Policy.sample (GPT-2 decoder)':>36} {r['new']:7.2f} ms  = {r['new'] / r['gemm']:.2f}x the GEMMs, "
          f"{r['new'] / r['forward']:.2f}x a forward column")
    print(f"{'before (HF forward per step)':>36} {r['old']:7.2f} ms  = {r['old'] / r['gemm']:.2f}x the GEMMs, "
          f"{r['old'] / r['forward']:.2f}x a forward column; new is {r['old'] / r['new']:.2f}x faster")
    return r


def bench_fidelity(model="prior", n=256, steps=3, task_name="smiles"):
    """The fidelity meter's share of a default run: one fidelity.measure(policy, task, 1, 50, n=256) against one
    optimiser step at the defaults (B = 32 x grad_accum 4, SubM, the run's mean replay share), both timed here,
    and the share for the default 5000-step run with its evaluations (train.eval_due: every steps // 4 and the
    start and the end). Expr24 (task_name="expr24"): its scratch model, untrained (speed does not depend on
    the weights), and the exact measurement over all 113,662 solutions."""
    import fidelity
    import model as modellib
    import train
    torch.set_num_threads(1)
    if task_name == "expr24":
        model = "/tmp/bench-fidelity-expr24-model"
        if not os.path.isdir(model):
            torch.manual_seed(0)
            modellib.build_scratch_model(model, sorted(train.rewards.Expr24Task.charset))
    args = train.get_args(["--task", task_name, "--model", model, "--out", "/tmp/bench-fidelity"])
    task = train.build_task(args)
    torch.manual_seed(0)
    policy = train.build_policy(args, task)
    buffer = train.build_buffer(args, task)
    log_z = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.AdamW([dict(params=[p for p in policy.model.parameters() if p.requires_grad],
                                        lr=args.lr), dict(params=[log_z], lr=args.lr_logz)])
    rng = np.random.default_rng(0)
    step_times = []
    for step in range(steps + 2):  # fill the buffer first: replay needs a full batch
        t = time.perf_counter()
        train.train_step(args, task, policy, buffer, log_z, optimizer, rng, step)
        step_times.append(time.perf_counter() - t)
    step_s = float(np.median(step_times[2:]))
    t = time.perf_counter()
    fidelity.measure(policy, task, args.kappa, args.lam, n=n, log_z_learned=log_z.item(), seed=0)
    measure_s = time.perf_counter() - t
    t = time.perf_counter()
    fidelity.measure(policy, task, args.kappa, args.lam, n=n, log_z_learned=log_z.item(), seed=1)
    measure2_s = time.perf_counter() - t
    evals = sum(train.eval_due(args, s) for s in range(args.steps + 1))
    run_s = args.steps * step_s
    meter_s = measure_s + (evals - 1) * measure2_s  # what the first one caches (Expr24: P_ref of every solution) stays
    print(f"\n== fidelity meter's cost ({task_name}, {model}, n={n}; wall time, load average {os.getloadavg()[0]:.1f}) ==")
    print(f"one optimiser step (B={args.batch_size} x {args.grad_accum}): {step_s:.2f} s (median of {steps}); "
          f"one measurement: {measure_s:.2f} s (first), {measure2_s:.2f} s (second, RDKit caches warm)")
    print(f"default run: {args.steps} steps = {run_s / 60:.0f} min of steps, {evals} measurements = "
          f"{meter_s:.0f} s: {meter_s / (run_s + meter_s):.1%} of the run")
    return dict(step_s=step_s, measure_s=measure_s, measure2_s=measure2_s, evals=evals, share=meter_s / (run_s + meter_s))


def bench_gpu(peak_tflops=989.0):
    """On a GPU: a Qwen2-0.5B-shaped transformer (24 layers, width 896, 14 query / 2 KV heads, MLP 4864) with
    the embedded prior's 450-token vocabulary, random weights. Forward+backward tokens/s and MFU (model FLOPs
    6 * params * tokens + attention, over the GPU's dense bf16 peak: H100 SXM 989 TFLOP/s), then the trainer
    end to end with LoRA + bf16 (samples/s) and its step breakdown."""
    import json
    import subprocess
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    import model as modellib
    if not torch.cuda.is_available():
        print("\n== gpu: skipped (no CUDA) ==")
        return
    tokenizer = AutoTokenizer.from_pretrained(modellib.DEFAULT_MODEL)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    net = Qwen2ForCausalLM(config).cuda()
    path = "/tmp/bench-qwen2-shaped"
    net.save_pretrained(path)
    tokenizer.save_pretrained(path)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"\n== gpu: {torch.cuda.get_device_name()}, Qwen2-0.5B-shaped, {n_params / 1e6:.0f}M parameters ==")
    print(f"{'batch x len':>12} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}   (full fine-tune, fp32 weights, bf16 autocast)")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    for batch, length in ((32, 11), (32, 128), (64, 512)):
        ids = torch.randint(len(tokenizer), (batch, length), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t = _median_time(lambda: (step(), torch.cuda.synchronize()), 10)
        flops = 6 * n_params * batch * length + 12 * config.num_hidden_layers * config.hidden_size * batch * length ** 2
        print(f"{batch:>5} x {length:<5} {batch * length / t:>10.0f} {flops / t / 1e12:>8.1f} {flops / t / 1e12 / peak_tflops:>6.1%}")
    net = optimizer = None  # free the GPU for the trainer run below
    torch.cuda.empty_cache()
    out = "/tmp/bench-qwen2-run"
    subprocess.run([sys.executable, "train.py", "--model", path, "--lora", "--steps", "30", "--grad-accum", "1",
                    "--replay", "subm", "--out", out, "--ckpt-every", "1000"], check=True, capture_output=True)
    log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    print(f"trainer, LoRA + bf16, batch 32, SubM: see the step breakdown below ({len(log)} steps ran)")
    bench_step(path, ["--lora"])


def bench_expr24(batch=64, repeats=15):
    """What Expr24's grammar mask (a state mask, METHOD.md §1) costs: sampling and the one-pass log-probs
    (forward + backward) of train.py's scratch model shape (3 layers, width 64, random weights) with and
    without the mask, and the mask function alone over all states of a batch."""
    import tempfile

    import model as modellib
    import rewards
    task = rewards.Expr24Task()
    with tempfile.TemporaryDirectory() as path:
        modellib.build_scratch_model(path, sorted(task.charset), seed=0)
        net, tokenizer = modellib.load_model(path)
    allowed = rewards.allowed_token_ids(tokenizer, task.charset, max_chars=1)
    policies = {name: modellib.Policy(net, tokenizer, allowed, 3, 9, state_mask=mask)
                for name, mask in (("no mask", None), ("grammar mask", task.state_mask))}
    torch.manual_seed(0)
    tokens, lengths, _ = policies["grammar mask"].sample(batch)
    print(f"\n== Expr24: cost of the grammar mask (B={batch}, scratch-model shape, CPU, median of {repeats}) ==")
    print(f"{'':>14} {'sample ms':>10} {'log_probs+bwd ms':>17}")
    for name, policy in policies.items():
        def one_pass():
            log_pf, log_pterm = policy.log_probs(tokens, lengths)
            (log_pf.sum() + torch.where(log_pterm.isfinite(), log_pterm, 0.0).sum()).backward()
        t_sample = _median_time(lambda: policy.sample(batch), repeats)
        t_pass = _median_time(one_pass, repeats)
        print(f"{name:>14} {t_sample * 1e3:>10.1f} {t_pass * 1e3:>17.1f}")
    policy = policies["grammar mask"]
    t_mask = _median_time(lambda: policy.allowed_actions(tokens, int(lengths.max()), lengths), repeats)
    print(f"mask function alone, all {int(lengths.max()) + 1} states of the batch: {t_mask * 1e3:.2f} ms")


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
