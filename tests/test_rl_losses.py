"""Tests for rl_losses.py (METHOD.md §9): loop references, the fixed points reached with exact expected gradients on
an enumerable prefix tree (RLOO and DPG reach p*; GRPO does not, and where it goes instead is computed
independently), Monte Carlo checks that each sampled estimator's mean gradient is the gradient it claims, and the
trainer end to end. Run: pytest -q -s test_rl_losses.py to see the measured TVs and errors."""
import math
import os

import pytest
import torch
from torch.func import grad, vmap

import rl_losses
import checkpoint
import train
from losses import compute_loss
from rl_losses import dpg_loss, grpo_loss, rloo_loss
from test_losses import GARBAGE, PrefixTree, grads, make_batch
from test_train import read_log, run


# ----------------------------------------------------------------------------- random batches and loop references

def with_garbage(x, lengths, seed, from_tau):
    """x with GARBAGE from column tau (from_tau) or tau + 1 on."""
    g = torch.Generator().manual_seed(seed)
    fill = torch.tensor(GARBAGE, dtype=x.dtype)[torch.randint(len(GARBAGE), x.shape, generator=g)]
    k = torch.arange(x.shape[1])
    return torch.where(k >= lengths[:, None] + (0 if from_tau else 1), fill, x)


def rl_batch(seed=0, B=7, T=7):
    """make_batch's ragged batch (lengths 0 .. T-1, garbage past each row's end) plus GRPO's tensors: a score in
    [0, 1] per row, and reference and old-policy log-probs per action, near the policy's (so some ratios clip)."""
    log_pf, log_pterm, log_r, u, lengths, log_z = make_batch(B=B, T=T, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    near = lambda x: x.detach().nan_to_num(0.0, 0.0, 0.0) + 0.3 * torch.randn(x.shape, generator=g, dtype=x.dtype)
    extra = dict(score=torch.rand(B, generator=g, dtype=log_pf.dtype),
                 ref_log_pf=with_garbage(near(log_pf), lengths, seed, True).clamp(max=0),
                 ref_log_pterm=with_garbage(near(log_pterm), lengths, seed + 2, False).clamp(max=0),
                 old_log_pf=with_garbage(near(log_pf), lengths, seed + 3, True),
                 old_log_pterm=with_garbage(near(log_pterm), lengths, seed + 4, False))
    return (log_pf, log_pterm, log_r, lengths, log_z), extra


def ref_acts(log_pf, log_pterm, b, tau):
    return [log_pf[b, t] for t in range(tau)] + [log_pterm[b, tau]]


def ref_mean(xs, q):
    return sum(xs) / len(xs) if q is None else sum(qi * x for qi, x in zip(q.tolist(), xs))


def ref_r(log_pf, log_pterm, log_r, lengths):
    log_q = [sum(ref_acts(log_pf, log_pterm, b, tau)) for b, tau in enumerate(lengths.tolist())]
    return log_q, [(log_r[b, tau] - log_q[b]).item() for b, tau in enumerate(lengths.tolist())]


def ref_rloo(log_pf, log_pterm, log_r, lengths, exact_q=None):
    log_q, r = ref_r(log_pf, log_pterm, log_r, lengths)
    k = len(r)
    if exact_q is None:
        baseline = [sum(r[j] for j in range(k) if j != i) / (k - 1) for i in range(k)]
    else:
        baseline = [ref_mean(r, exact_q)] * k
    return -ref_mean([(r[i] - baseline[i]) * log_q[i] for i in range(k)], exact_q)


def ref_dpg(log_pf, log_pterm, log_r, lengths, log_z, exact_q=None):
    log_q, r = ref_r(log_pf, log_pterm, log_r, lengths)
    return -ref_mean([(math.exp(ri - log_z.item()) - 1) * lq for ri, lq in zip(r, log_q)], exact_q)


def ref_grpo(log_pf, log_pterm, lengths, score, ref_log_pf, ref_log_pterm, old_log_pf=None, old_log_pterm=None,
             grpo_clip=0.2, grpo_beta=0.02, grpo_std_norm=True, exact_q=None):
    s, k, T = score.tolist(), len(score), log_pf.shape[1]
    mean = ref_mean(s, exact_q)
    if exact_q is None:
        std = math.sqrt(sum((x - mean) ** 2 for x in s) / (k - 1))
    else:
        std = math.sqrt(ref_mean([(x - mean) ** 2 for x in s], exact_q))
    adv = [(x - mean) / (std + 1e-4) if grpo_std_norm else x - mean for x in s]
    per_seq = []
    for b, tau in enumerate(lengths.tolist()):
        acts = ref_acts(log_pf, log_pterm, b, tau)
        ref = ref_acts(ref_log_pf, ref_log_pterm, b, tau)
        old = [a.detach() for a in acts] if old_log_pf is None else ref_acts(old_log_pf, old_log_pterm, b, tau)
        terms = []
        for a, r, o in zip(acts, ref, old):
            rho = torch.exp(a - o)
            surrogate = torch.minimum(rho * adv[b], torch.clamp(rho, 1 - grpo_clip, 1 + grpo_clip) * adv[b])
            terms.append(-surrogate + grpo_beta * (torch.exp(r - a) - (r - a) - 1))
        per_seq.append(sum(terms) / (tau + 1 if grpo_std_norm else T))
    return ref_mean(per_seq, exact_q)


def assert_same(fused, ref, inputs):
    assert torch.isfinite(fused)
    torch.testing.assert_close(fused, torch.as_tensor(ref, dtype=fused.dtype), rtol=1e-9, atol=1e-12)
    for gf, gr in zip(grads(fused, *inputs), grads(ref, *inputs)):
        assert torch.isfinite(gf).all()
        torch.testing.assert_close(gf, gr, rtol=1e-9, atol=1e-12)


def some_q(B, seed):
    return torch.softmax(torch.randn(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64), 0)


@pytest.mark.parametrize("exact", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_rloo_and_dpg_match_references(seed, exact):
    (log_pf, log_pterm, log_r, lengths, log_z), _ = rl_batch(seed)
    q = some_q(len(lengths), seed) if exact else None
    assert_same(rloo_loss(log_pf, log_pterm, log_r, lengths, exact_q=q)[0],
                ref_rloo(log_pf, log_pterm, log_r, lengths, q), (log_pf, log_pterm, log_r, log_z))
    log_z = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)  # R/q ~ e^0 .. e^3 on this batch
    assert_same(dpg_loss(log_pf, log_pterm, log_r, lengths, log_z, exact_q=q)[0],
                ref_dpg(log_pf, log_pterm, log_r, lengths, log_z, q), (log_pf, log_pterm, log_r, log_z))


GRPO_SETTINGS = [dict(), dict(grpo_std_norm=False), dict(old=True), dict(old=True, grpo_clip=0.05),
                 dict(old=True, grpo_std_norm=False, grpo_beta=0.0), dict(grpo_beta=0.5), dict(exact=True),
                 dict(exact=True, grpo_std_norm=False, old=True)]


@pytest.mark.parametrize("knobs", GRPO_SETTINGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "defaults")
def test_grpo_matches_reference(knobs):
    knobs = dict(knobs)
    (log_pf, log_pterm, log_r, lengths, log_z), extra = rl_batch(4)
    if not knobs.pop("old", False):
        extra = {k: v for k, v in extra.items() if not k.startswith("old")}
    if knobs.pop("exact", False):
        knobs["exact_q"] = some_q(len(lengths), 4)
    loss, stats = grpo_loss(log_pf, log_pterm, lengths, **extra, **knobs)
    assert_same(loss, ref_grpo(log_pf, log_pterm, lengths, **extra, **knobs), (log_pf, log_pterm))
    if "old_log_pf" in extra:  # the test can fail: the old policy differs, so some ratios leave [1 - eps, 1 + eps]
        assert 0 < stats["grpo_clip_frac"] < 1
    assert all(not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("name", ["rloo", "grpo"])
def test_one_group_per_condition_is_each_condition_alone(name):
    """With conditions every condition's k samples form their own group: the loss over a batch of three conditions is
    the size-weighted mean of the loss of each condition's rows on their own (each matched to its loop reference
    above), in value and gradient."""
    (log_pf, log_pterm, log_r, lengths, log_z), extra = rl_batch(6, B=9)
    extra = {k: v for k, v in extra.items() if not k.startswith("old")} if name == "grpo" else {}
    groups = torch.tensor([2, 0, 1, 0, 2, 1, 1, 0, 2])
    call = lambda rows, **kw: compute_loss(name, log_pf[rows], log_pterm[rows], log_r[rows], None, lengths[rows], log_z,
                                           **{k: v[rows] for k, v in extra.items()}, **kw)[0]
    everything = torch.arange(9)
    together = call(everything, groups=groups)
    apart = sum(call(torch.nonzero(groups == g).squeeze(1)) * 3 / 9 for g in range(3))
    assert_same(together, apart, (log_pf, log_pterm))
    one = call(everything)  # the test can fail: one group for the whole batch is another loss (in its gradient:
    assert (grads(together, log_pf)[0] - grads(one, log_pf)[0]).abs().max() > 1e-6  # GRPO's value at rho = 1 is not)


def test_rewards_weights_and_log_z_get_no_gradient():
    (log_pf, log_pterm, log_r, lengths, log_z), extra = rl_batch(5)
    extra = {k: v.detach().requires_grad_() for k, v in extra.items()}
    for loss in (rloo_loss(log_pf, log_pterm, log_r, lengths)[0], dpg_loss(log_pf, log_pterm, log_r, lengths, log_z)[0],
                 grpo_loss(log_pf, log_pterm, lengths, **extra)[0]):
        for g in grads(loss, log_r, log_z, *extra.values()):
            assert (g == 0).all()
        assert grads(loss, log_pf)[0].abs().sum() > 0


def test_registered_in_compute_loss_with_their_knobs():
    (log_pf, log_pterm, log_r, lengths, log_z), extra = rl_batch(6)
    u = torch.zeros_like(log_r)
    everything = dict(eta=0.5, lam=0.9, k_min=1, grpo_clip=0.1, grpo_beta=0.3, grpo_std_norm=False, **extra)
    for name, direct in [("rloo", rloo_loss(log_pf, log_pterm, log_r, lengths)),
                         ("dpg", dpg_loss(log_pf, log_pterm, log_r, lengths, log_z)),
                         ("grpo", grpo_loss(log_pf, log_pterm, lengths, **extra, grpo_clip=0.1, grpo_beta=0.3,
                                            grpo_std_norm=False))]:
        torch.testing.assert_close(compute_loss(name, log_pf, log_pterm, log_r, u, lengths, log_z, **everything)[0],
                                   direct[0], rtol=0, atol=0)
    assert compute_loss("tb", log_pf, log_pterm, log_r, u, lengths, log_z, **everything)[0].isfinite()


def test_permutation_invariance():
    (log_pf, log_pterm, log_r, lengths, log_z), extra = rl_batch(7)
    perm = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(0))
    p = lambda x: x.detach()[perm]
    for fn, args in [(rloo_loss, (log_pf, log_pterm, log_r, lengths)), (dpg_loss, (log_pf, log_pterm, log_r, lengths, log_z))]:
        permuted = [p(x) if x.dim() else x for x in args]
        torch.testing.assert_close(fn(*permuted)[0], fn(*args)[0].detach(), rtol=1e-12, atol=1e-14)
    permuted = grpo_loss(p(log_pf), p(log_pterm), p(lengths), **{k: p(v) for k, v in extra.items()})[0]
    torch.testing.assert_close(permuted, grpo_loss(log_pf, log_pterm, lengths, **extra)[0].detach(), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("case", ["bf16", "all_empty", "one_column", "huge_reward"])
def test_robustness(case):
    B, T = 6, (1 if case == "one_column" else 9)
    (log_pf, log_pterm, log_r, lengths, log_z), extra = rl_batch(8, B=B, T=T)
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    if case == "all_empty":
        lengths = torch.zeros_like(lengths)
    log_z = log_z.detach().float()
    if case == "huge_reward":  # R/q = e^1000: only DPG's Z_hat makes it a weight, and it is given here
        log_r, log_z = log_r + 1e3, log_z + 1e3
    ins = [x.detach().to(dtype).requires_grad_() for x in (log_pf, log_pterm)]
    rest = dict(log_r=log_r.detach().to(dtype), u=torch.zeros(B, T, dtype=dtype), lengths=lengths, log_z=log_z)
    for name in rl_losses.LOSSES:
        loss, stats = compute_loss(name, *ins, **rest, **{k: v.to(dtype) for k, v in extra.items()})
        assert loss.dtype == torch.float32 and torch.isfinite(loss), name
        assert all(torch.isfinite(torch.as_tensor(v)) for v in stats.values()), name
        assert all(torch.isfinite(g).all() for g in grads(loss, *ins)), name
    (log_pf, log_pterm, log_r, lengths, log_z), extra = rl_batch(8)  # float64 in, float64 out
    assert grpo_loss(log_pf, log_pterm, lengths, **extra)[0].dtype == torch.float64


def test_bad_groups_raise():
    (log_pf, log_pterm, log_r, lengths, log_z), extra = rl_batch(9)
    with pytest.raises(ValueError, match="at least 2"):
        rloo_loss(log_pf[:1], log_pterm[:1], log_r[:1], lengths[:1])
    with pytest.raises(ValueError, match="at least 2"):
        grpo_loss(log_pf[:1], log_pterm[:1], lengths[:1], **{k: v[:1] for k, v in extra.items()})
    with pytest.raises(ValueError, match="detached"):
        rloo_loss(log_pf, log_pterm, log_r, lengths, exact_q=torch.ones(len(lengths), requires_grad=True))


# ----------------------------------------------------------------------------- the enumerable tree with a reference

def rl_tree(V=3, L_max=3, seed=1, lam=3.0):
    """test_losses' prefix tree (every state an object, L_min = 0), with a random tabular reference P_ref and its
    task score S in [0, 1] (zero at half the states), so log R = log P_ref + lam S (kappa = 1) and p* is the
    optimum of E_q[lam S] - KL(q || P_ref)."""
    tree = PrefixTree(V=V, L_max=L_max, L_min=0, seed=seed)
    tree.lam, tree.s_state = lam, tree.u_state / 3.0
    g = torch.Generator().manual_seed(seed + 100)
    tree.ref_logits = torch.randn(len(tree.states), V + 1, generator=g, dtype=torch.float64)
    tree.ref_pf, tree.ref_pterm = tree.batch(tree.ref_logits)
    tree.s = tree.s_state[tree.state_idx.gather(1, tree.lengths[:, None])[:, 0]]
    k = torch.arange(L_max + 1)
    pf = torch.where(k < tree.lengths[:, None], tree.ref_pf, 0.0)
    tree.log_r = pf.cumsum(1) - pf + tree.ref_pterm + lam * tree.s_state[tree.state_idx]  # log R(s_k T), every k
    log_target = sequence_log_q(tree, tree.ref_logits) + lam * tree.s
    tree.log_Z = torch.logsumexp(log_target, 0)
    tree.target = (log_target - tree.log_Z).exp()
    return tree


def sequence_log_q(tree, logits):
    log_pf, log_pterm = tree.batch(logits)
    k = torch.arange(log_pf.shape[1])
    return torch.where(k < tree.lengths[:, None], log_pf, 0.0).sum(1) + log_pterm.gather(1, tree.lengths[:, None])[:, 0]


def tree_loss(tree, name, logits, idx=None, exact_q=None, **knobs):
    """The loss on the rows `idx` of the tree's enumeration (a sampled group), or on all of them with exact_q."""
    log_pf, log_pterm = tree.batch(logits)
    rows = (lambda x: x[idx]) if idx is not None else (lambda x: x)
    pf, pterm, lengths = rows(log_pf), rows(log_pterm), rows(tree.lengths)
    if name == "rloo":
        return rloo_loss(pf, pterm, rows(tree.log_r), lengths, exact_q=exact_q)[0]
    if name == "dpg":
        return dpg_loss(pf, pterm, rows(tree.log_r), lengths, tree.log_Z, exact_q=exact_q)[0]
    return grpo_loss(pf, pterm, lengths, rows(tree.s), rows(tree.ref_pf), rows(tree.ref_pterm), exact_q=exact_q,
                     **knobs)[0]


def train_exactly(tree, name, steps=300, lr=0.1, **knobs):
    """Adam from P_ref on the exact expected loss: every object a row, weighted by q(x) (detached)."""
    logits = tree.ref_logits.clone().requires_grad_()
    opt = torch.optim.Adam([logits], lr=lr)
    for _ in range(steps):
        q = sequence_log_q(tree, logits).detach().exp()
        loss = tree_loss(tree, name, logits, exact_q=q, **knobs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return logits.detach()


def tv(tree, logits_a, logits_b):
    return 0.5 * (sequence_log_q(tree, logits_a).exp() - sequence_log_q(tree, logits_b).exp()).abs().sum().item()


@pytest.mark.parametrize("name", ["rloo", "dpg"])
@pytest.mark.parametrize("seed", [1, 2])
def test_rloo_and_dpg_converge_to_the_target(name, seed):
    tree = rl_tree(seed=seed)
    start = tree.tv(tree.ref_logits)
    end = tree.tv(train_exactly(tree, name))
    print(f"\n{name} seed {seed}: TV(q, p*) {start:.4f} (P_ref) -> {end:.1e}")
    assert start > 0.3 and end < 0.02


def dr_grpo_fixed_point(tree):
    """Where Dr. GRPO (no std, constant normaliser, no clip, beta = 1/lam) stops, derived independently of the
    loss: per state s, the advantage term's expected gradient on the logits of s is -d(s) q(a|s) (Q(s,a) - V(s)) and
    k3's is beta d(s) (q(a|s) - P_ref(a|s)) (Q, V: the expected S under q after (s, a) and at s). They cancel when
        q(a|s) = P_ref(a|s) / (1 - lam (Q(s,a) - V(s))),
    a first-order expansion of p*'s exp(lam (soft Q - soft V)). Solved leaves-up: Q of a child is its V; at each
    state sum_a P_ref(a|s) / (1 - lam (Q_a - V)) = 1 has one root V in (max Q - 1/lam, max Q], found by bisection.
    Returns the logits log q(a|s)."""
    index = {s: i for i, s in enumerate(tree.states)}
    ref = torch.softmax(tree.ref_logits.masked_fill(~tree.mask, float("-inf")), -1)
    q, value = torch.zeros_like(ref), torch.zeros(len(tree.states), dtype=torch.float64)
    for s in sorted(tree.states, key=len, reverse=True):
        i, allowed = index[s], tree.mask[index[s]]
        Q = torch.tensor([value[index[s + (v,)]] if allowed[v] else 0.0 for v in range(tree.V)] + [tree.s_state[i]],
                         dtype=torch.float64)[allowed]
        lo, hi = Q.max() - 1 / tree.lam, Q.max()
        for _ in range(80):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if (ref[i, allowed] / (1 - tree.lam * (Q - mid))).sum() > 1 else (lo, mid)
        q[i, allowed] = ref[i, allowed] / (1 - tree.lam * (Q - (lo + hi) / 2))
        q[i] /= q[i].sum()  # 1 to ~1e-16 already
        value[i] = (q[i, allowed] * Q).sum()
    return q.log()


@pytest.mark.parametrize("seed", [1, 2])
def test_dr_grpo_stops_at_its_own_fixed_point_not_the_target(seed):
    """Dr. GRPO with beta = kappa / lambda, unclipped: the k3 term descends KL(P_ref(.|s) || q(.|s)) per visited
    state, not KL(q || P_ref), so it stops where the fixed point above says, at TV ~0.1 from p* here (lam = 3).
    (Its per-state error is second order in lam (Q - V): at lam = 1 the same trees give TV 0.014 and 0.031.)"""
    tree = rl_tree(seed=seed)
    trained = train_exactly(tree, "grpo", grpo_std_norm=False, grpo_beta=1 / tree.lam)
    predicted = dr_grpo_fixed_point(tree)
    print(f"\nDr. GRPO seed {seed}: TV(q, p*) {tree.tv(trained):.4f}, TV(q, predicted fixed point) "
          f"{tv(tree, trained, predicted):.1e}, TV(predicted, p*) {tree.tv(predicted):.4f}")
    assert tv(tree, trained, predicted) < 1e-4
    assert tree.tv(trained) > 0.05 and tree.tv(predicted) > 0.05


@pytest.mark.parametrize("seed", [1, 2])
def test_grpo_defaults_stay_far_from_the_target(seed):
    """GRPO's defaults (std-normalised, per-sequence action means), beta = kappa / lambda: dividing by std S (<= 1/2
    for S in [0, 1]) at least doubles the reward's weight against the KL, so the policy is greedier than p*; the
    per-sequence means weight each action by 1 / (tau + 1) on top. Measured on these trees: TV 0.38 and 0.68."""
    tree = rl_tree(seed=seed)
    dr = tree.tv(train_exactly(tree, "grpo", grpo_std_norm=False, grpo_beta=1 / tree.lam))
    default = tree.tv(train_exactly(tree, "grpo", grpo_beta=1 / tree.lam))
    print(f"\nGRPO defaults seed {seed}: TV(q, p*) {default:.4f} (Dr. GRPO {dr:.4f})")
    assert default > 0.3 and default > 2 * dr


# ----------------------------------------------------------------------------- Monte Carlo: the sampled estimators

def mc_gradient(tree, name, logits, k=8, n_groups=4000, seed=0, **knobs):
    """Mean and standard error of the gradient (w.r.t. the tabular logits) of `name` over n_groups groups of k
    objects drawn from q, each group's gradient one vmapped autograd call."""
    q = sequence_log_q(tree, logits).exp()
    idx = torch.multinomial(q.expand(n_groups, -1), k, replacement=True, generator=torch.Generator().manual_seed(seed))
    g = vmap(grad(lambda lg, i: tree_loss(tree, name, lg, i, **knobs)), in_dims=(None, 0))(logits, idx)
    return g.mean(0), g.std(0) / math.sqrt(n_groups)


def exact_gradient(tree, logits, divergence, k=8, beta=0.5):
    """Autograd of a divergence computed by enumeration."""
    logits = logits.clone().requires_grad_()
    log_q = sequence_log_q(tree, logits)
    q, log_p = log_q.exp(), tree.target.log()
    if divergence == "KL(q||p*)":
        d = (q * (log_q - log_p)).sum()
    elif divergence == "KL(p*||q)":
        d = (tree.target * (log_p - log_q)).sum()
    else:  # Dr. GRPO's claims, / T (its constant normaliser): -(k-1)/k E_q[S] (the group mean includes x_i itself)
        T = tree.lengths.max().item() + 1
        d_reward = -(k - 1) / k * (q * tree.s).sum() / T
        if divergence == "Dr. GRPO":  # + beta sum_s d(s) KL(P_ref(.|s) || q(.|s)), visit probabilities d(s) fixed
            log_ref = torch.log_softmax(tree.ref_logits.masked_fill(~tree.mask, float("-inf")), -1)
            log_pol = torch.log_softmax(logits.masked_fill(~tree.mask, float("-inf")), -1)
            kl = torch.where(tree.mask, log_ref.exp() * (log_ref - log_pol), 0.0).sum(1)
            visit = (log_q - tree.batch(logits)[1].gather(1, tree.lengths[:, None])[:, 0]).exp().detach()
            d = d_reward + beta * (visit * kl).sum() / T  # row x of the enumeration is state x, reached w.p. visit[x]
        else:  # "... KL(q||P_ref)": what the k3 term would have to descend for p* to be the fixed point
            d = d_reward + beta * (q * (log_q - sequence_log_q(tree, tree.ref_logits))).sum() / T
    return torch.autograd.grad(d, logits)[0]


MC = [("rloo", "KL(q||p*)", "KL(p*||q)", {}), ("dpg", "KL(p*||q)", "KL(q||p*)", {}),
      ("grpo", "Dr. GRPO", "Dr. GRPO with KL(q||P_ref)", dict(grpo_std_norm=False, grpo_beta=0.5))]


@pytest.mark.parametrize("name,claim,other,knobs", MC, ids=[m[0] for m in MC])
def test_sampled_gradient_is_the_claimed_one(name, claim, other, knobs):
    """The mean over 4000 groups of k = 8 agrees with the exact gradient of the claimed divergence to within
    4.5 standard errors on every logit (with 21 free logits a correct estimator fails this with probability
    < 1e-3; the seed is fixed), and rejects the other candidate by far more: the check has the power to tell."""
    tree = rl_tree(V=2, L_max=3, seed=3, lam=2.0)
    logits = tree.ref_logits + 0.5 * torch.randn(tree.ref_logits.shape, generator=torch.Generator().manual_seed(0),
                                                 dtype=torch.float64)  # q != P_ref, q != p*
    mean, se = mc_gradient(tree, name, logits, **knobs)
    free = tree.mask & (se > 0)  # a state with one action (the forced stop) has no gradient at all
    z = lambda exact: ((mean - exact) / se)[free].abs().max().item()
    exact, wrong = exact_gradient(tree, logits, claim), exact_gradient(tree, logits, other)
    print(f"\n{name}: max |z| {z(exact):.2f} against {claim}, relative error "
          f"{((mean - exact).norm() / exact.norm()).item():.3f}; {z(wrong):.1f} against {other}")
    assert z(exact) < 4.5 and z(wrong) > 10


# ----------------------------------------------------------------------------- the trainer

@pytest.fixture
def text_task(tmp_path):
    """A task whose score varies on a tiny random model (SMILES validity is ~0 there, so every advantage would be
    0): S in {0, 1/6, .., 1}, an arbitrary but fixed function of the text."""
    path = tmp_path / "text_task.py"
    path.write_text("def score(texts):\n    return [sum(map(ord, t)) % 7 / 6 for t in texts]\n")
    return ["--task", f"{path}:score"]


def test_rl_defaults_and_the_replay_error(tmp_path, capsys):
    gfn, rl = train.get_args(["--out", str(tmp_path)]), train.get_args(["--out", str(tmp_path), "--loss", "grpo"])
    assert (gfn.replay, gfn.temp_prob) == ("subm", 0.666) and (rl.replay, rl.temp_prob) == ("none", 0.0)
    assert rl.grpo_beta == pytest.approx(1 / 50) and rl.grpo_std_norm and rl.grpo_epochs == 1
    for flags in (["--replay", "subm"], ["--replay", "rp"], ["--temp-prob", "0.5"], ["--batch-size", "1"]):
        with pytest.raises(SystemExit) as e:
            train.get_args(["--out", str(tmp_path), "--loss", "rloo", *flags])
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    assert train.get_args(["--out", str(tmp_path), "--loss", "dpg", "--replay", "none"]).replay == "none"


def test_dpg_carries_its_running_z_in_log_z(tiny_gpt2, tmp_path, text_task):
    assert run(tiny_gpt2, tmp_path / "run", "--loss", "dpg", "--steps", "4", *text_task) == 0
    log = read_log(tmp_path / "run")
    assert any(abs(row["dpg_weight_mean"] - 1) > 1e-3 for row in log)  # the estimate has something to learn
    for before, now in zip(log, log[1:]):  # step n folds its mean weight in with weight 1 / (n + 1)
        expected = before["log_z"] + math.log1p((now["dpg_weight_mean"] - 1) / (now["step"] + 1))
        assert now["log_z"] == pytest.approx(expected, abs=1e-5)
    assert len({row["log_z"] for row in log}) == len(log)  # it moves every step


def test_rloo_and_grpo_report_no_log_z(tiny_gpt2, tmp_path, text_task, capsys):
    """They learn none: no logZ in metrics.jsonl (so none drawn), none in the bar, no "learned logZ" line."""
    for loss in ("rloo", "grpo"):
        assert run(tiny_gpt2, tmp_path / loss, "--loss", loss, "--lr", "1e-2", *text_task, "--eval-every", "2",
                   "--eval-n", "8", "--eval-n-final", "8") == 0
        rows = read_log(tmp_path / loss)
        assert not [r for r in rows if "log_z" in r or "log_z_learned" in r] and "kl_q_target" in rows[-1]
        out, err = capsys.readouterr()
        assert "learned logZ" not in out and "logZ=" not in err


def test_grpo_inner_epochs_take_more_steps(tiny_gpt2, tmp_path, text_task):
    weights = {}
    for epochs in (1, 3):
        out = tmp_path / f"e{epochs}"
        assert run(tiny_gpt2, out, "--loss", "grpo", "--grpo-epochs", str(epochs), "--lr", "1e-2", "--steps", "1",
                   "--weight-decay", "0", *text_task) == 0  # no decay: only gradient steps can move the weights
        with open(os.path.join(checkpoint.find_checkpoint(str(out)), "model.safetensors"), "rb") as f:
            weights[epochs] = f.read()
        first_epoch = read_log(out)[0]
        assert first_epoch["grpo_clip_frac"] == 0 and first_epoch["grpo_adv_abs"] > 0  # the normal step: rho = 1
    assert weights[1] != weights[3]


@pytest.mark.parametrize("extra", [["--loss", "dpg"], ["--loss", "grpo", "--grpo-epochs", "2"]], ids=["dpg", "grpo"])
def test_kill_and_resume_is_bit_identical(tiny_gpt2, tmp_path, ctrl_c_after_step, extra, text_task):
    args = ["--steps", "4", *extra, *text_task]
    assert run(tiny_gpt2, tmp_path / "straight", *args) == 0
    disarm = ctrl_c_after_step(2)
    assert run(tiny_gpt2, tmp_path / "killed", *args) == 130
    disarm()
    assert train.main(["--resume", "--out", str(tmp_path / "killed"), "--steps", "4", *text_task]) == 0
    assert read_log(tmp_path / "killed") == read_log(tmp_path / "straight")
    paths = [os.path.join(checkpoint.find_checkpoint(str(tmp_path / d)), "model.safetensors") for d in ("straight", "killed")]
    with open(paths[0], "rb") as a, open(paths[1], "rb") as b:
        assert a.read() == b.read()
