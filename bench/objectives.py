"""
Our fused computations against the straightforward way, both measured in the same run (`python -m bench losses`,
`python -m bench logprobs`).

losses: forward + backward time of the fused objectives in losses.py against straightforward loop
versions in the style of the authors' code (a Python loop over window sizes for SubTB, over positions
for the soft absorbed target), B = 32, T in {16, 64, 256, 1024}.
logprobs: one teacher-forced pass against a step-by-step loop that keeps gradients.
"""
import torch
from torch.utils import benchmark

import losses
from bench.step import median_time, random_gpt2

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


# ----------------------------------------------------------------------------- log-probs

def bench_logprobs():
    """log_pf / log_pterm of a batch: ONE teacher-forced pass (ours) vs a step-by-step loop that keeps
    gradients (a KV-cached forward per generated token, as in the authors' code and gfn-lm-tuning), each
    followed by backward of the summed log-probs. B = 32, prior-shaped GPT-2."""
    import model as modellib
    import rewards
    from tasks.smiles.task import SmilesTask
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\n== one-pass log-probs vs step-by-step loop with gradients (B=32, prior-shaped GPT-2, {device}) ==")
    print(f"{'tokens':>7} {'loop ms':>9} {'ours ms':>9} {'ratio':>7}")
    net, tokenizer = random_gpt2(512, device)
    allowed = rewards.allowed_token_ids(tokenizer, SmilesTask.charset)
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
            name = modellib.cache_argument(net)
            for k in range(length + 1):
                out = net(input_ids=ids, **{name: past}, use_cache=True)
                past = getattr(out, name)
                logp = policy.action_log_probs(out.logits[:, -1], k)
                total = total + logp[:, policy.stop].sum()
                if k < length:
                    total = total + logp.gather(-1, policy.action_of[tokens[:, k:k + 1]]).sum()
                    ids = tokens[:, k:k + 1]
            total.backward()

        repeats = 5 if length < 256 else 3
        t_loop, t_ours = median_time(loop, repeats), median_time(ours, repeats)
        print(f"{length:>7} {t_loop * 1e3:>9.1f} {t_ours * 1e3:>9.1f} {t_loop / t_ours:>6.1f}x")
