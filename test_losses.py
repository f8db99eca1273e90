"""Tests for losses.py: loop references written straight from METHOD.md §3, identities, exact distribution
matching on an enumerable prefix tree, and robustness. Run: pytest -q test_losses.py (-s shows the TVs)."""
import inspect
import math

import pytest
import torch

from losses import LOSSES, avgprefixtb_loss, compute_loss, raptb_loss, rootsubtb_loss, subtb_loss, tb_loss

GARBAGE = [float("inf"), float("-inf"), 1e30, -1e30, float("nan")]


# ----------------------------------------------------------------------------- random batches

def make_batch(B=7, T=7, seed=0, min_len=0, dtype=torch.float64, garbage=True):
    """Random ragged batch: tau includes min_len (0 by default) and T-1; u is half zeros (absorbable),
    some values inside eps_absorb, some negative. Past tau (and, for log_pf, from tau on) garbage."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, T, (B,), generator=g)
    lengths[0], lengths[1] = min_len, T - 1
    log_pf = -3 * torch.rand(B, T, generator=g, dtype=dtype)
    log_pterm = -3 * torch.rand(B, T, generator=g, dtype=dtype)
    log_r = 2 * torch.randn(B, T, generator=g, dtype=dtype)
    u = 4 * torch.rand(B, T, generator=g, dtype=dtype) - 1.5
    u = torch.where(torch.rand(B, T, generator=g) < 0.5, torch.zeros_like(u), u)
    u[2, :] = torch.where(torch.arange(T) % 2 == 0, 1e-8, u[2, :])  # |u| <= eps_absorb counts as "no reward"
    if min_len > 0:  # stop masked before L_min: those prefixes are not terminal objects
        log_pterm[:, :min_len] = float("-inf")
        log_r[:, :min_len] = float("-inf")
    if garbage:
        k = torch.arange(T)
        fill = torch.tensor(GARBAGE, dtype=dtype)[torch.randint(len(GARBAGE), (B, T), generator=g)]
        log_pf = torch.where(k >= lengths[:, None], fill, log_pf)
        log_pterm = torch.where(k > lengths[:, None], fill.roll(1, 1), log_pterm)
        log_r = torch.where(k > lengths[:, None], fill.roll(2, 1), log_r)
        u = torch.where(k > lengths[:, None], fill.roll(3, 1), u)
    log_z = torch.tensor(0.7, dtype=dtype)
    return [x.requires_grad_() for x in (log_pf, log_pterm, log_r)] + [u, lengths, log_z.requires_grad_()]


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True, materialize_grads=True, retain_graph=True)


# ----------------------------------------------------------------------------- loop references (METHOD.md §3)

def pen(d, huber=0.0):
    """A residual's loss: its square, or with huber > 0 Huber's: the square within huber, linear beyond it."""
    return d ** 2 if huber <= 0 or abs(d) <= huber else 2 * huber * abs(d) - huber ** 2


def wt(row_weight, b):
    """Row b's weight (--anchor): every term of the row is multiplied by it, the normaliser is not."""
    return 1.0 if row_weight is None else row_weight[b]


def ref_tb(log_pf, log_pterm, log_r, lengths, log_z, huber=0.0, row_weight=None):
    total = 0.0
    for b, tau in enumerate(lengths.tolist()):
        d = log_z + sum(log_pf[b, t] for t in range(tau)) + log_pterm[b, tau] - log_r[b, tau]
        total = total + wt(row_weight, b) * pen(d, huber)
    return total / len(lengths)


def ref_delta(log_pf, log_pterm, log_r, b, t):
    return log_r[b, t] + log_pf[b, t] + log_pterm[b, t + 1] - log_r[b, t + 1] - log_pterm[b, t]


def ref_subtb(log_pf, log_pterm, log_r, lengths, lam=1.0, min_len=0, huber=0.0, row_weight=None):
    num, den = 0.0, 0.0
    for b, tau in enumerate(lengths.tolist()):
        for i in range(min_len, tau + 1):
            for j in range(i + 1, tau + 1):
                res = sum(ref_delta(log_pf, log_pterm, log_r, b, t) for t in range(i, j))
                num = num + wt(row_weight, b) * lam ** (j - i - 1) * pen(res, huber)
                den = den + lam ** (j - i - 1)
    return num / den if den > 0 else torch.zeros(())


def ref_raptb(log_pf, log_pterm, log_r, u, lengths, log_z, eta=0.25, gamma=0.99, alpha=0.5, beta=5.0, rho=0.1,
              k_min=2, lam=1.0, eps_absorb=1e-6, horizon=None, detach_pterm=True, absorb=1.0, min_len=0, huber=0.0,
              row_weight=None):
    pterm_aux = log_pterm.detach() if detach_pterm else log_pterm
    u = u.detach().tolist()
    total = 0.0
    for b, tau in enumerate(lengths.tolist()):
        d_tb = log_z + sum(log_pf[b, t] for t in range(tau)) + log_pterm[b, tau] - log_r[b, tau]
        total = total + wt(row_weight, b) * pen(d_tb, huber)
        h = tau if horizon is None else min(tau, horizon)
        k_lo = max(k_min, min_len + 1)
        num, den = 0.0, 0.0
        for k in range(k_lo, h + 1):
            c_bar = sum(ref_delta(log_pf, pterm_aux, log_r, b, t) for t in range(min_len, k))
            js = range(k, h + 1)
            u_max = max(u[b][j] for j in js)
            u_soft = math.log(sum(math.exp(beta * u[b][j] - beta * rho * (j - k)) for j in js)) / beta
            u_tgt = alpha * u_max + (1 - alpha) * u_soft
            gate = absorb and abs(u[b][k]) <= eps_absorb
            if horizon is not None:
                gate = gate and tau >= horizon and k < horizon
            c_ab = c_bar + (absorb * gamma ** (h - k) * (u[b][k] - u_tgt) if gate else 0.0)
            num = num + lam ** (k - k_lo) * pen(c_ab, huber)
            den = den + lam ** (k - k_lo)
        if den > 0:  # inactive trajectories (no eligible prefix) get no aux term
            total = total + wt(row_weight, b) * eta * num / den
    return total / len(lengths)


def ref_prefix_res(log_pf, log_pterm, log_r, log_z, b, k):
    return log_z + sum(log_pf[b, t] for t in range(k)) + log_pterm[b, k] - log_r[b, k]


def ref_avgprefixtb(log_pf, log_pterm, log_r, lengths, log_z, min_len=0, huber=0.0, row_weight=None):
    total = 0.0
    for b, tau in enumerate(lengths.tolist()):
        ks = range(min_len, tau + 1)
        terms = sum(pen(ref_prefix_res(log_pf, log_pterm, log_r, log_z, b, k), huber) for k in ks) / len(ks)
        total = total + wt(row_weight, b) * terms
    return total / len(lengths)


def ref_rootsubtb(log_pf, log_pterm, log_r, lengths, log_z, lam=1.0, min_len=0, huber=0.0, row_weight=None):
    num, den = 0.0, 0.0
    for b, tau in enumerate(lengths.tolist()):
        for k in range(min_len, tau + 1):
            num = num + wt(row_weight, b) * lam ** (k - min_len) * pen(ref_prefix_res(log_pf, log_pterm, log_r, log_z, b, k), huber)
            den = den + lam ** (k - min_len)
    return num / den


# ----------------------------------------------------------------------------- 1. reference equivalence

def assert_same(fused, ref, inputs):
    assert torch.isfinite(fused)
    torch.testing.assert_close(fused, torch.as_tensor(ref, dtype=fused.dtype), rtol=1e-6, atol=1e-10)
    g_fused, g_ref = grads(fused, *inputs), grads(ref, *inputs)
    for gf, gr in zip(g_fused, g_ref):
        assert torch.isfinite(gf).all()
        torch.testing.assert_close(gf, gr, rtol=1e-6, atol=1e-10)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("min_len", [0, 2])
def test_tb_matches_reference(seed, min_len):
    log_pf, log_pterm, log_r, u, lengths, log_z = make_batch(seed=seed, min_len=min_len)
    loss, stats = tb_loss(log_pf, log_pterm, log_r, lengths, log_z)
    assert_same(loss, ref_tb(log_pf, log_pterm, log_r, lengths, log_z), (log_pf, log_pterm, log_r, log_z))
    assert all(not v.requires_grad for v in stats.values())


@pytest.mark.parametrize("lam", [1.0, 0.9, 0.5, 0.0])
@pytest.mark.parametrize("min_len", [0, 1])
def test_subtb_matches_reference(lam, min_len):
    log_pf, log_pterm, log_r, u, lengths, log_z = make_batch(seed=3, min_len=min_len)
    loss, _ = subtb_loss(log_pf, log_pterm, log_r, lengths, lam=lam, min_len=min_len)
    assert_same(loss, ref_subtb(log_pf, log_pterm, log_r, lengths, lam, min_len), (log_pf, log_pterm, log_r))


RAPTB_SETTINGS = [
    dict(),
    dict(alpha=1.0),  # max-only target
    dict(alpha=0.0),  # soft-only target
    dict(k_min=1), dict(k_min=4), dict(k_min=0), dict(k_min=9),  # k_min = 9 > T: no active trajectory
    dict(horizon=3), dict(horizon=1), dict(horizon=20),
    dict(detach_pterm=False),
    dict(lam=0.7), dict(lam=0.0),
    dict(absorb=False), dict(absorb=0.3),
    dict(eta=1.0, gamma=0.8, beta=1.0, rho=0.0, eps_absorb=0.3),
    dict(min_len=1), dict(min_len=2, horizon=4, lam=0.8, detach_pterm=False),
]


@pytest.mark.parametrize("knobs", RAPTB_SETTINGS, ids=lambda d: ",".join(f"{k}={v}" for k, v in d.items()) or "defaults")
def test_raptb_matches_reference(knobs):
    log_pf, log_pterm, log_r, u, lengths, log_z = make_batch(seed=5, min_len=knobs.get("min_len", 0))
    loss, stats = raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z, **knobs)
    ref = ref_raptb(log_pf, log_pterm, log_r, u, lengths, log_z, **knobs)
    assert_same(loss, ref, (log_pf, log_pterm, log_r, log_z))
    assert all(torch.isfinite(torch.as_tensor(v)) for v in stats.values())


@pytest.mark.parametrize("min_len", [0, 2])
def test_avgprefixtb_matches_reference(min_len):
    log_pf, log_pterm, log_r, u, lengths, log_z = make_batch(seed=7, min_len=min_len)
    loss, _ = avgprefixtb_loss(log_pf, log_pterm, log_r, lengths, log_z, min_len=min_len)
    ref = ref_avgprefixtb(log_pf, log_pterm, log_r, lengths, log_z, min_len)
    assert_same(loss, ref, (log_pf, log_pterm, log_r, log_z))


@pytest.mark.parametrize("lam,min_len", [(1.0, 0), (0.8, 0), (0.8, 2)])
def test_rootsubtb_matches_reference(lam, min_len):
    log_pf, log_pterm, log_r, u, lengths, log_z = make_batch(seed=8, min_len=min_len)
    loss, _ = rootsubtb_loss(log_pf, log_pterm, log_r, lengths, log_z, lam=lam, min_len=min_len)
    ref = ref_rootsubtb(log_pf, log_pterm, log_r, lengths, log_z, lam, min_len)
    assert_same(loss, ref, (log_pf, log_pterm, log_r, log_z))


HUBER = [(tb_loss, ref_tb, {}), (subtb_loss, ref_subtb, {}), (subtb_loss, ref_subtb, dict(lam=0.9, min_len=1)),
         (raptb_loss, ref_raptb, {}), (raptb_loss, ref_raptb, dict(lam=0.7, horizon=4, min_len=1)),
         (avgprefixtb_loss, ref_avgprefixtb, {}), (rootsubtb_loss, ref_rootsubtb, dict(lam=0.8))]


@pytest.mark.parametrize("fn,ref,knobs", HUBER, ids=lambda x: getattr(x, "__name__", None))
def test_huber_matches_reference(fn, ref, knobs):
    """--huber: every residual's square becomes its Huber loss; the batch has residuals on both sides of 1 nat."""
    batch = make_batch(seed=9, min_len=knobs.get("min_len", 0))
    log_pf, log_pterm, log_r, u, lengths, log_z = batch
    given = dict(log_pf=log_pf, log_pterm=log_pterm, log_r=log_r, u=u, lengths=lengths, log_z=log_z, **knobs)
    take = lambda f, **more: {k: v for k, v in {**given, **more}.items() if k in inspect.signature(f).parameters}
    loss, _ = fn(**take(fn, huber=1.0))
    assert_same(loss, ref(**take(ref, huber=1.0)), (log_pf, log_pterm, log_r))
    assert loss < fn(**take(fn))[0]  # residuals beyond 1 nat exist, so the Huber loss is the smaller
    torch.testing.assert_close(fn(**take(fn, huber=1e6))[0], fn(**take(fn))[0], rtol=1e-12, atol=0)


@pytest.mark.parametrize("huber", [0.0, 1.0])
@pytest.mark.parametrize("fn,ref,knobs", HUBER, ids=lambda x: getattr(x, "__name__", None))
def test_row_weights_match_reference(fn, ref, knobs, huber):
    """--anchor: each row's terms weigh its weight, the normaliser unchanged; weights of 1 change no bit."""
    batch = make_batch(seed=10, min_len=knobs.get("min_len", 0))
    log_pf, log_pterm, log_r, u, lengths, log_z = batch
    weights = torch.linspace(0.5, 16.0, len(lengths), dtype=log_pf.dtype)
    given = dict(log_pf=log_pf, log_pterm=log_pterm, log_r=log_r, u=u, lengths=lengths, log_z=log_z, huber=huber, **knobs)
    take = lambda f, **more: {k: v for k, v in {**given, **more}.items() if k in inspect.signature(f).parameters}
    loss, _ = fn(**take(fn, row_weight=weights))
    assert_same(loss, ref(**take(ref, row_weight=weights)), (log_pf, log_pterm, log_r))
    assert torch.equal(fn(**take(fn, row_weight=torch.ones_like(weights)))[0], fn(**take(fn))[0])


@pytest.mark.parametrize("lam", [1.0, 0.9])
def test_subtb_float32_matches_float64_at_long_length(lam):
    """Both fused forms stay accurate in float32 at T = 512 (C_k reaches ~1e3 there, on top of a 1e3 offset),
    where expanding (C_j - C_i)^2 = C_j^2 - 2 C_i C_j + C_i^2 would cancel catastrophically."""
    log_pf, log_pterm, log_r, u, lengths, log_z = make_batch(B=4, T=512, seed=2, garbage=False)
    log_r = (log_r + 1e3).detach()  # large common offset: cancels in every window
    l64, _ = subtb_loss(log_pf, log_pterm, log_r, lengths, lam=lam)
    l32, _ = subtb_loss(log_pf.float(), log_pterm.float(), log_r.float(), lengths, lam=lam)
    torch.testing.assert_close(l32.double(), l64.detach(), rtol=1e-4, atol=0)


# ----------------------------------------------------------------------------- 2. identities

def call(name, batch, **knobs):
    log_pf, log_pterm, log_r, u, lengths, log_z = batch
    return compute_loss(name, log_pf, log_pterm, log_r, u, lengths, log_z, **knobs)[0]


def test_raptb_eta0_is_tb():
    batch = make_batch(seed=11)
    log_pf, log_pterm, log_r, u, lengths, log_z = batch
    rap = raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z, eta=0.0)[0]
    tb = tb_loss(log_pf, log_pterm, log_r, lengths, log_z)[0]
    assert rap.item() == tb.item()
    for a, b in zip(grads(rap, log_pf, log_pterm, log_z), grads(tb, log_pf, log_pterm, log_z)):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=0)


def test_raptb_detach_sends_no_aux_gradient_to_pterm():
    log_pf, log_pterm, log_r, u, lengths, log_z = make_batch(seed=12)
    tb = tb_loss(log_pf, log_pterm, log_r, lengths, log_z)[0]
    g_tb = grads(tb, log_pterm)[0]
    rap = raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z, eta=1.0, detach_pterm=True)[0]
    torch.testing.assert_close(grads(rap, log_pterm)[0], g_tb, rtol=1e-12, atol=1e-14)
    # the test can fail: without detach the aux term does move log_pterm, while log_pf still gets aux gradient
    rap_nd = raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z, eta=1.0, detach_pterm=False)[0]
    assert (grads(rap_nd, log_pterm)[0] - g_tb).abs().max() > 1e-3
    assert (grads(rap, log_pf)[0] - grads(tb, log_pf)[0]).abs().max() > 1e-3


@pytest.mark.parametrize("name,knobs", [("tb", {}), ("subtb", {}), ("subtb", {"lam": 0.9}), ("raptb", {}),
                                        ("raptb", {"horizon": 3, "lam": 0.9}), ("avgprefixtb", {}), ("rootsubtb", {})])
def test_batch_permutation_and_extra_padding_invariance(name, knobs):
    batch = make_batch(seed=13)
    base = call(name, batch, **knobs)
    g_base = grads(base, batch[0], batch[1])
    perm = torch.randperm(len(batch[4]), generator=torch.Generator().manual_seed(0))
    permuted = [x.detach()[perm].requires_grad_() if x.dim() == 2 else x for x in batch[:4]] + [batch[4][perm], batch[5]]
    loss_p = call(name, permuted, **knobs)
    torch.testing.assert_close(loss_p, base, rtol=1e-12, atol=0)
    torch.testing.assert_close(grads(loss_p, permuted[0])[0], g_base[0][perm], rtol=1e-12, atol=1e-14)
    # three more columns of garbage: same loss, same gradient on the old columns, zero on the new ones
    pad = lambda x: torch.cat([x.detach(), torch.full((x.shape[0], 3), float("-inf"), dtype=x.dtype)], 1).requires_grad_()
    padded = [pad(x) for x in batch[:4]] + batch[4:]
    loss_pad = call(name, padded, **knobs)
    torch.testing.assert_close(loss_pad, base, rtol=1e-12, atol=0)
    for gp, gb in zip(grads(loss_pad, padded[0], padded[1]), g_base):
        torch.testing.assert_close(gp[:, :-3], gb, rtol=1e-12, atol=1e-14)
        assert (gp[:, -3:] == 0).all()


def test_compute_loss_forwards_only_the_knobs_each_loss_takes():
    batch = make_batch(seed=14)
    log_pf, log_pterm, log_r, u, lengths, log_z = batch
    knobs = dict(eta=0.5, lam=0.9, k_min=1, horizon=4)  # the trainer passes its whole config to every loss
    torch.testing.assert_close(call("tb", batch, **knobs), tb_loss(log_pf, log_pterm, log_r, lengths, log_z)[0])
    torch.testing.assert_close(call("subtb", batch, **knobs), subtb_loss(log_pf, log_pterm, log_r, lengths, lam=0.9)[0])
    torch.testing.assert_close(call("raptb", batch, **knobs),
                               raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z, **knobs)[0])
    assert set(LOSSES) == {"tb", "subtb", "raptb", "avgprefixtb", "rootsubtb", "rloo", "grpo", "dpg", "oracle"}
    with pytest.raises(TypeError):
        call("raptb", batch, etta=0.5)


# ----------------------------------------------------------------------------- 3. exact distribution matching

class PrefixTree:
    """All token strings of length <= L_max over V tokens; every state with length >= L_min is a terminal
    object with a random reward. A tabular policy has one logit vector (V tokens + stop) per state."""

    def __init__(self, V=3, L_max=3, L_min=0, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.states = [()]
        for length in range(L_max):
            self.states += [s + (v,) for s in self.states if len(s) == length for v in range(V)]
        index = {s: i for i, s in enumerate(self.states)}
        self.V, self.L_min, n = V, L_min, len(self.states)
        score = torch.where(torch.rand(n, generator=g) < 0.5, 0.0, torch.rand(n, generator=g, dtype=torch.float64))
        self.u_state = 3.0 * score  # task part lambda * S, zero at half the states (absorbable prefixes)
        self.log_r_state = 0.5 * torch.randn(n, generator=g, dtype=torch.float64) + self.u_state
        lengths = torch.tensor([len(s) for s in self.states])
        self.mask = torch.ones(n, V + 1, dtype=torch.bool)  # allowed actions
        self.mask[lengths == L_max, :V] = False  # stop forced at L_max
        self.mask[lengths < L_min, V] = False  # stop masked before L_min
        objects = [s for s in self.states if len(s) >= L_min]  # one row per terminal object
        T = L_max + 1
        self.lengths = torch.tensor([len(x) for x in objects])
        self.state_idx = torch.tensor([[index[x[:min(k, len(x))]] for k in range(T)] for x in objects])
        self.token = torch.tensor([[x[k] if k < len(x) else 0 for k in range(T)] for x in objects])
        log_r = self.log_r_state[self.state_idx].clone()
        log_r[:, :L_min] = float("-inf")  # no reward for non-terminal prefixes
        self.log_r, self.u = log_r, self.u_state[self.state_idx]
        target = self.log_r_state[[index[x] for x in objects]]
        self.log_Z = torch.logsumexp(target, 0)
        self.target = (target - self.log_Z).exp()

    def batch(self, logits):
        logp = torch.log_softmax(logits.masked_fill(~self.mask, float("-inf")), -1)
        log_pf = logp[self.state_idx, self.token]
        log_pterm = logp[self.state_idx, self.V]
        return log_pf, log_pterm

    def tv(self, logits):
        """Exact terminal distribution by enumeration: P(x) = prod_k q(y_k+1|s_k) q(stop|x)."""
        with torch.no_grad():
            log_pf, log_pterm = self.batch(logits)
            k = torch.arange(log_pf.shape[1])
            log_p = torch.where(k < self.lengths[:, None], log_pf, 0.0).sum(1) + log_pterm.gather(1, self.lengths[:, None])[:, 0]
            return 0.5 * (log_p.exp() - self.target).abs().sum().item()


@pytest.fixture
def one_thread():
    """Tiny tensors: thread start-up dominates, and CI shares 2 cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train_on_tree(tree, name, steps=300, lr=0.1, **knobs):
    logits = torch.zeros(len(tree.states), tree.V + 1, dtype=torch.float64, requires_grad=True)
    log_z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.Adam([logits, log_z], lr=lr)
    for _ in range(steps):  # full batch: every terminal object once (off-policy, uniform)
        log_pf, log_pterm = tree.batch(logits)
        loss, _ = compute_loss(name, log_pf, log_pterm, tree.log_r, tree.u, tree.lengths, log_z, **knobs)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad[tree.mask]).all()
    return tree.tv(logits), log_z.item(), loss.item()


EXACT = [("tb", {}), ("subtb", {}), ("rootsubtb", {}), ("avgprefixtb", {}), ("raptb", {"absorb": False}),
         ("raptb", {"absorb": False, "detach_pterm": False, "k_min": 1}),
         ("tb", {"huber": 1.0}), ("subtb", {"huber": 1.0}), ("raptb", {"absorb": False, "huber": 1.0})]


@pytest.mark.parametrize("name,knobs", EXACT, ids=lambda x: str(x))
def test_exact_distribution_matching(name, knobs, one_thread):
    tree = PrefixTree(V=3, L_max=3, L_min=0, seed=1)
    tv, log_z, loss = train_on_tree(tree, name, **knobs)
    print(f"\n{name} {knobs}: TV = {tv:.4f}  logZ = {log_z:.4f} (true {tree.log_Z:.4f})  loss = {loss:.2e}")
    assert tv < 0.02
    if name == "tb":
        assert abs(log_z - tree.log_Z.item()) < 0.05


@pytest.mark.parametrize("name,knobs", [("tb", {}), ("rootsubtb", {}), ("avgprefixtb", {}),
                                        ("raptb", {"absorb": False})], ids=lambda x: str(x))
def test_exact_distribution_matching_with_min_len(name, knobs, one_thread):
    """L_min = 1: stop masked at the root (log_pterm = -inf there); the prefix losses skip k < min_len.
    (SubTB is left out: with L_min > 0 no window constrains the root's first action, it is unidentified.)"""
    tree = PrefixTree(V=3, L_max=3, L_min=1, seed=2)
    tv, log_z, loss = train_on_tree(tree, name, min_len=1, **knobs)
    print(f"\n{name} {knobs} L_min=1: TV = {tv:.4f}  logZ = {log_z:.4f} (true {tree.log_Z:.4f})")
    assert tv < 0.02


def test_absorption_acts_only_where_the_target_differs(one_thread):
    """Absorption replaces the stop reward of zero-task-reward prefixes by a backed-up target, which moves RapTB's
    fixed point away from R/Z (test_fixed_points.py measures how far, on a sparse lambda = 50 tree). With u = 0
    everywhere the max-only target is 0 = u[k], so absorption changes nothing, step for step."""
    tree = PrefixTree(V=3, L_max=3, L_min=0, seed=1)
    tree.u = torch.zeros_like(tree.u)
    assert train_on_tree(tree, "raptb", steps=30, alpha=1.0) == train_on_tree(tree, "raptb", steps=30, absorb=False)
    # (the soft target is not: 1/beta log sum_j exp(-beta rho (j - k)) > 0 = max, so alpha < 1 does shift it)
    assert train_on_tree(tree, "raptb", steps=30) != train_on_tree(tree, "raptb", steps=30, absorb=False)
    # half strength sits in between: the absorbed offset is scaled, not switched
    half = train_on_tree(tree, "raptb", steps=30, absorb=0.5)
    assert half != train_on_tree(tree, "raptb", steps=30) and half != train_on_tree(tree, "raptb", steps=30, absorb=False)


# ----------------------------------------------------------------------------- 4. robustness

ALL = [("tb", {}), ("subtb", {}), ("subtb", {"lam": 0.9}), ("raptb", {}), ("raptb", {"horizon": 3}),
       ("avgprefixtb", {}), ("rootsubtb", {}), ("rootsubtb", {"lam": 0.9})]


@pytest.mark.parametrize("name,knobs", ALL, ids=lambda x: str(x))
@pytest.mark.parametrize("case", ["huge_reward", "tiny_reward", "bf16", "all_empty", "one_column"])
def test_robustness(name, knobs, case):
    B, T, dtype = 6, 9, torch.float32
    if case == "bf16":
        dtype = torch.bfloat16
    if case == "one_column":
        T = 1
    log_pf, log_pterm, log_r, u, lengths, log_z = [x.detach() for x in make_batch(B=B, T=T, seed=21, dtype=torch.float32)]
    if case == "huge_reward":
        log_r, u = log_r + 1e3, u + 1e3
    if case == "tiny_reward":
        log_r = torch.full_like(log_r, -1e4)
    if case == "all_empty":
        lengths = torch.zeros_like(lengths)
    ins = [x.to(dtype).requires_grad_() for x in (log_pf, log_pterm)] + [log_r.to(dtype), u.to(dtype), lengths,
                                                                           log_z.to(dtype).requires_grad_()]
    loss, stats = compute_loss(name, *ins, **knobs)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(torch.isfinite(torch.as_tensor(v)) for v in stats.values())
    for g in grads(loss, ins[0], ins[1], ins[5]):
        assert torch.isfinite(g).all()
    if case == "all_empty" and name == "subtb":
        assert loss.item() == 0.0  # no window at all


def test_float64_in_float64_out():
    batch = make_batch(seed=22)
    for name in LOSSES:
        if name != "grpo":  # grpo needs its own tensors (test_rl_losses.py checks its dtype)
            assert call(name, batch).dtype == torch.float64


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA")
@pytest.mark.parametrize("name,knobs", ALL, ids=lambda x: str(x))
def test_cuda_matches_cpu(name, knobs):
    batch = make_batch(B=16, T=33, seed=23)
    cuda = [x.detach().cuda().requires_grad_(x.requires_grad) for x in batch]
    l_cpu, l_gpu = call(name, batch, **knobs), call(name, cuda, **knobs)
    torch.testing.assert_close(l_gpu.cpu(), l_cpu, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grads(l_gpu, cuda[0])[0].cpu(), grads(l_cpu, batch[0])[0], rtol=1e-9, atol=1e-12)
