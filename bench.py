"""
Benchmarks (not tests): `python bench.py` runs every section, `python bench.py losses` one of them.
Add a section by writing a function and registering it in SECTIONS at the bottom.

losses: forward + backward time of the fused objectives in losses.py against straightforward loop
versions in the style of the authors' code (a Python loop over window sizes for SubTB, over positions
for the soft absorbed target), both measured in the same run, B = 32, T in {16, 64, 256, 1024}.
"""
import os
import sys
import time

import numpy as np
import torch
from torch.utils import benchmark

import losses
from replay import GreedyState, Item, SubMBuffer, morgan_fp, subm_select, tanimoto_matrix

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

    # one whole refresh of a full SubM buffer, as train.py does it each on-policy step:
    # fingerprint 32 new molecules + similarity 232 x 232 + lazy greedy
    buf = SubMBuffer(capacity=200)
    items = [Item((i,), s, s, float(rng.uniform()), True, int(rng.integers(1, 11)))
             for i, s in enumerate(smiles[:232 + 20 * 32])]
    buf.add(items[:200])
    refresh = []
    for i in range(20):
        batch = items[232 + i * 32 - 32:232 + i * 32]
        t = time.perf_counter()
        buf.add(batch)
        refresh.append(time.perf_counter() - t)

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
    print(f"\nfull SubM refresh B=200 (+32 new: fingerprints, 232x232 similarity, lazy greedy): "
          f"median {np.median(refresh) * 1e3:.1f} ms over {len(refresh)} refreshes")
    return dict(rows=rows, refresh_ms=float(np.median(refresh) * 1e3), fp_us=fp_us, load=load)


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


def bench_step(model="prior", extra=()):
    """Where one training step's time goes (SMILES task, batch 32, one micro-batch; embedded prior by default)."""
    import train
    args = train.get_args(["--model", model, "--replay", "subm", "--out", "/tmp/bench-step", *extra])
    task = train.build_task(args)
    torch.manual_seed(0)
    policy = train.build_policy(args, task)
    buffer = train.build_buffer(args, task)
    log_z = torch.nn.Parameter(torch.zeros((), device=policy.device))
    phases = dict(sample=0.0, reward=0.0, reference=0.0, forward=0.0, loss=0.0, backward=0.0, replay=0.0)
    steps = 10

    def timed(name, fn):
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        out = fn()
        if policy.device.type == "cuda":
            torch.cuda.synchronize()
        phases[name] += time.perf_counter() - t
        return out

    for step in range(steps + 2):
        if step == 2:  # first two steps warm up (allocations, RDKit caches start empty again below)
            phases = dict.fromkeys(phases, 0.0)
        tokens, lengths, _ = timed("sample", lambda: policy.sample(args.batch_size))
        scores = timed("reward", lambda: train.rewards.prefix_scores(task, policy.token_texts, tokens, lengths,
                                                                     args.max_len).to(policy.device))
        log_ref = timed("reference", lambda: policy.log_ref_stop(tokens, lengths))
        log_r, u = train.rewards.log_reward(log_ref.double(), scores, args.kappa, args.lam)
        log_pf, log_pterm = timed("forward", lambda: policy.log_probs(tokens, lengths))
        loss, _ = timed("loss", lambda: losses.compute_loss("raptb", log_pf, log_pterm, log_r.float(), u.float(),
                                                            lengths, log_z, **train.loss_knobs(args, 0.0)))
        timed("backward", lambda: loss.backward())
        texts = policy.texts(tokens, lengths)
        final = scores.gather(1, lengths[:, None]).squeeze(1)
        timed("replay", lambda: buffer.add(train.to_items(task, tokens, lengths, texts, final)))
    total = sum(phases.values())
    print(f"\n== one training step, phase by phase ({model}, SMILES, B={args.batch_size}, {policy.device}) ==")
    for name, t in phases.items():
        print(f"{name:>10} {t / steps * 1e3:8.1f} ms {t / total:6.1%}")
    print(f"{'total':>10} {total / steps * 1e3:8.1f} ms per micro-batch")


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


SECTIONS = {"losses": bench_losses, "replay": bench_replay, "logprobs": bench_logprobs, "step": bench_step, "gpu": bench_gpu}

if __name__ == "__main__":
    names = sys.argv[1:] or list(SECTIONS)
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        sys.exit(f"unknown section(s) {unknown}; available: {list(SECTIONS)}")
    for name in names:
        SECTIONS[name]()
