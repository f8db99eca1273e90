"""Exploration (--epsilon, METHOD.md §5): the sampler mixes in the masked uniform policy exactly as stated, the
trainer refuses it for the on-policy RL losses, and on an enumerable tree TB's exact expected gradient under the
explored sampler still ends at p* (off-policy TB is unbiased while every object can be drawn)."""
import torch

import train
from test_fixed_points import SparseTree
from test_model import make_policy


def test_epsilon_mixes_the_masked_uniform_policy_into_every_step(tiny_gpt2):
    torch.manual_seed(0)
    policy = make_policy(tiny_gpt2, min_len=1, max_len=1)  # one token, then the forced stop
    with torch.no_grad():  # log q of every action at s_0
        logp = policy.action_log_probs(policy.model(input_ids=policy.prompt.reshape(1, -1)).logits[:, -1], 0)[0]
    eps, n = 0.4, 20000
    allowed = logp.isfinite()
    expected = (1 - eps) * logp.exp() + eps * allowed / allowed.sum()
    tokens, lengths, _ = policy.sample(n, epsilon=eps)
    index = {int(a): i for i, a in enumerate(policy.actions)}
    counts = torch.bincount(torch.tensor([index[t] for t in tokens[:, 0].tolist()]), minlength=len(expected))
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts / n - expected).abs() <= 5 * sigma + 1e-9).all()
    assert counts[~allowed].sum() == 0


def explored_tb_flow(tree, epsilon, steps=1500, lr=3.0):
    """TB from P_ref with exact gradients of E_pi[d_TB(x)^2], pi the epsilon-explored sampler of the current policy
    (detached: where the batch comes from carries no gradient); returns the TV of q to p* at the end."""
    logits = tree.ref_logits.clone().requires_grad_()
    log_z = torch.zeros((), dtype=torch.float64, requires_grad=True)  # far from log Z, as a run starts
    opt = torch.optim.Adam([logits, log_z], lr=lr, eps=1e-3)
    k = torch.arange(tree.L_max + 1)[None]
    n_allowed = tree.mask.sum(-1).to(torch.float64)[tree.state_idx]  # [objects, T]: actions allowed at each state
    tau = tree.lengths[:, None]
    for t in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + torch.cos(torch.tensor(torch.pi * t / steps)).item())
        log_pf, log_pterm = tree.batch(logits)
        with torch.no_grad():
            step = torch.where(k < tau, (1 - epsilon) * log_pf.exp() + epsilon / n_allowed, 1.0)
            stop = ((1 - epsilon) * log_pterm.exp() + epsilon / n_allowed).gather(1, tau)[:, 0]
            pi = step.prod(1) * stop
        d = log_z + torch.where(k < tau, log_pf, 0.0).sum(1) + log_pterm.gather(1, tau)[:, 0] - tree.log_r.gather(1, tau)[:, 0]
        loss = (pi * d ** 2).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert abs(float(pi.sum()) - 1) < 1e-9  # the explored sampler is a distribution over the objects
    return tree.tv(logits)


def test_tb_under_epsilon_exploration_still_reaches_the_target():
    torch.set_num_threads(1)
    tree = SparseTree()
    assert explored_tb_flow(tree, epsilon=0.5) < 0.02


def test_epsilon_trains_and_is_refused_for_on_policy_losses(tiny_gpt2, tmp_path, capsys):
    common = ["--model", tiny_gpt2, "--steps", "2", "--batch-size", "4", "--max-len", "4", "--min-len", "1",
              "--eval-every", "0"]
    assert train.main([*common, "--epsilon", "0.3", "--out", str(tmp_path / "a")]) == 0
    assert train.main([*common, "--epsilon", "0.3", "--loss", "rloo", "--out", str(tmp_path / "b")]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: --epsilon 0.3 cannot be used with --loss rloo")
    assert train.main([*common, "--epsilon", "1.5", "--out", str(tmp_path / "c")]) == 2
