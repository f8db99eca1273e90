"""Conditions (METHOD.md §11): per-row logZ in every loss (loop references), logZ per prompt by the head and by the
batch estimate against exact Z on an enumerable conditional tree, per-condition replay, and the unconditional path
left alone."""
import itertools
import json
import math

import numpy as np
import pytest
import torch

import conditions
import losses
import model as modellib
import replay
import rewards
import train
from test_losses import assert_same, make_batch, ref_avgprefixtb, ref_prefix_res, ref_raptb, ref_tb


# ----------------------------------------------------------------------------- logZ per row in the losses

def per_row_z(B, seed=0):
    return (torch.randn(B, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 3).requires_grad_()


def mean_of_rows(ref, batch, log_z, **knobs):
    """A loss that is a mean over rows, from its loop reference applied to one row at a time with that row's logZ."""
    log_pf, log_pterm, log_r, u, lengths = batch
    rows = [ref(log_pf[b:b + 1], log_pterm[b:b + 1], log_r[b:b + 1], *([u[b:b + 1]] if ref is ref_raptb else []),
                lengths[b:b + 1], log_z[b], **knobs) for b in range(len(lengths))]
    return sum(rows) / len(rows)


def ref_rootsubtb_rows(log_pf, log_pterm, log_r, lengths, log_z, lam=1.0, min_len=0):
    num, den = 0.0, 0.0
    for b, tau in enumerate(lengths.tolist()):
        for k in range(min_len, tau + 1):
            num = num + lam ** (k - min_len) * ref_prefix_res(log_pf, log_pterm, log_r, log_z[b], b, k) ** 2
            den = den + lam ** (k - min_len)
    return num / den


@pytest.mark.parametrize("min_len", [0, 2])
def test_every_loss_with_logz_takes_one_value_per_row(min_len):
    *batch, _ = make_batch(seed=4, min_len=min_len)
    log_pf, log_pterm, log_r, u, lengths = batch
    log_z = per_row_z(len(lengths))
    inputs = (log_pf, log_pterm, log_r, log_z)
    assert_same(losses.tb_loss(log_pf, log_pterm, log_r, lengths, log_z)[0], mean_of_rows(ref_tb, batch, log_z), inputs)
    knobs = dict(k_min=min_len + 1, min_len=min_len)
    assert_same(losses.raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z, **knobs)[0],
                mean_of_rows(ref_raptb, batch, log_z, **knobs), inputs)
    assert_same(losses.avgprefixtb_loss(log_pf, log_pterm, log_r, lengths, log_z, min_len=min_len)[0],
                mean_of_rows(ref_avgprefixtb, batch, log_z, min_len=min_len), inputs)
    assert_same(losses.rootsubtb_loss(log_pf, log_pterm, log_r, lengths, log_z, lam=0.9, min_len=min_len)[0],
                ref_rootsubtb_rows(log_pf, log_pterm, log_r, lengths, log_z, 0.9, min_len), inputs)


@pytest.mark.parametrize("name", ["tb", "raptb", "avgprefixtb", "rootsubtb", "subtb"])
def test_a_constant_row_logz_is_the_scalar(name):
    log_pf, log_pterm, log_r, u, lengths, log_z = make_batch(seed=9)
    rows = log_z.detach().expand(len(lengths)).clone()
    a = losses.compute_loss(name, log_pf, log_pterm, log_r, u, lengths, log_z)[0]
    b = losses.compute_loss(name, log_pf, log_pterm, log_r, u, lengths, rows)[0]
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="one value per row"):
        losses.compute_loss(name if name != "subtb" else "tb", log_pf, log_pterm, log_r, u, lengths, rows[:-1])


# ----------------------------------------------------------------------------- an enumerable conditional tree

PROMPTS = ["CC", "CO", "CN"]  # three conditions; the objects: '' and every string of C, O, N up to 2 characters
CHARS, MAX_LEN = "CON", 2


def score(text, prompt):
    """A reward of its own for every condition (a fixed pseudo-random table over the 13 objects)."""
    rng = np.random.default_rng(list(prompt.encode()))
    table = rng.random(13)
    objects = [""] + ["".join(p) for n in (1, 2) for p in itertools.product(CHARS, repeat=n)]
    return float(table[objects.index(text)])


def tree_policy(model, prompts=PROMPTS):
    net, tokenizer = modellib.load_model(model)
    allowed = rewards.allowed_token_ids(tokenizer, frozenset(CHARS), max_chars=1)
    task = conditions.PromptSet(rewards.ScoreFunctionTask(lambda texts, prompts: [score(t, p) for t, p in
                                                                                  zip(texts, prompts)], "tree"),
                                prompts)
    return conditions.ConditionalPolicy(modellib.Policy(net, tokenizer, allowed, 0, MAX_LEN), task), task


def every_object(policy, prompts):
    """Every object of every condition as rows: tokens, lengths, their conditions and texts."""
    actions = policy.actions[:-1].tolist()
    seqs = [()] + [s for n in range(1, MAX_LEN + 1) for s in itertools.product(actions, repeat=n)]
    rows = [(s, c) for c in prompts for s in seqs]
    tokens = torch.tensor([list(s) + [policy.eos] * (MAX_LEN - len(s)) for s, _ in rows])
    lengths = torch.tensor([len(s) for s, _ in rows])
    conds = [c for _, c in rows]
    return tokens, lengths, conds, policy.texts(tokens, lengths)


def exact_log_r(task, conds, texts, lam=3.0):
    return torch.tensor([lam * task.given(c).score(t) for c, t in zip(conds, texts)], dtype=torch.float64)


def sequence_log_q(policy, tokens, lengths, conds):
    log_pf, log_pterm = policy.log_probs(tokens, lengths, conds)
    return (log_pf.sum(1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)).double()


def per_condition(values, conds):
    return {c: values[[i for i, x in enumerate(conds) if x == c]] for c in dict.fromkeys(conds)}


def test_the_tree_is_a_distribution_per_condition(tiny_gpt2):
    policy, task = tree_policy(tiny_gpt2)
    tokens, lengths, conds, texts = every_object(policy, PROMPTS)
    assert len(policy.actions) == 4 and len(set(zip(conds, texts))) == 3 * 13
    log_q = sequence_log_q(policy, tokens, lengths, conds)
    for c, lq in per_condition(log_q, conds).items():
        assert abs(lq.exp().sum().item() - 1) < 1e-5
    # each condition's rows read their own prompt: the same rows under another prompt get other probabilities
    assert not torch.allclose(per_condition(log_q, conds)["CC"], per_condition(log_q, conds)["CN"])
    # and a row alone (a one-row view) gets what it gets in the stacked batch
    one = sequence_log_q(policy, tokens[5:6], lengths[5:6], conds[5:6])
    torch.testing.assert_close(one, log_q[5:6], rtol=1e-5, atol=1e-6)


def test_batch_log_z_at_the_target_is_log_z_and_below_it_is_log_z_minus_kl(tiny_gpt2):
    policy, task = tree_policy(tiny_gpt2)
    tokens, lengths, conds, texts = every_object(policy, PROMPTS)
    with torch.no_grad():
        log_pf, log_pterm = policy.log_probs(tokens, lengths, conds)
    log_q = (log_pf.sum(1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)).double()
    zero_r = torch.zeros_like(log_pf)
    # q = p*: a reward R(x|c) = Z_c q(x|c) makes every sample's log R - log q equal to log Z_c, so any k rows give it
    log_z = {"CC": 1.5, "CO": -2.0, "CN": 7.25}
    log_r = zero_r.double().scatter(1, lengths[:, None], (log_q + torch.tensor([log_z[c] for c in conds]))[:, None])
    picks = [0, 7, 13 + 2, 13 + 12, 26 + 5, 26 + 6, 26 + 0]  # rows of all three conditions, unevenly many
    est = conditions.batch_log_z([conds[i] for i in picks], log_pf[picks].double(), log_pterm[picks].double(),
                                 log_r[picks], lengths[picks])
    torch.testing.assert_close(est, torch.tensor([log_z[conds[i]] for i in picks], dtype=torch.float64))
    # q != p*: over every pair of samples drawn from q (weights q(x1) q(x2)), the estimate's mean is log Z - KL(q||p*)
    log_r = zero_r.double().scatter(1, lengths[:, None], exact_log_r(task, conds, texts)[:, None])
    for c in PROMPTS:
        rows = [i for i, x in enumerate(conds) if x == c]
        lr, lq = log_r[rows].gather(1, lengths[rows][:, None]).squeeze(1), log_q[rows]
        exact_z = torch.logsumexp(lr, 0)
        kl = (lq.exp() * (lq - (lr - exact_z))).sum()
        mean = 0.0
        for i, j in itertools.product(range(len(rows)), repeat=2):
            pair = [rows[i], rows[j]]
            value = conditions.batch_log_z([c, c], log_pf[pair].double(), log_pterm[pair].double(), log_r[pair],
                                           lengths[pair])[0]
            mean += (lq[i] + lq[j]).exp() * value
        torch.testing.assert_close(mean, exact_z - kl, rtol=0, atol=1e-6)
        assert kl > 0.05  # the start is far from the target: the estimate is biased low by that much


def exact_per_condition(log_q, log_r, conds):
    """log Z(c), KL(q || p*) and TV(q, p*) of each condition, by enumeration."""
    out = {}
    for (c, q), r in zip(per_condition(log_q, conds).items(), per_condition(log_r, conds).values()):
        log_z = torch.logsumexp(r, 0)
        out[c] = dict(log_z=log_z.item(), kl=(q.exp() * (q - r + log_z)).sum().item(),
                      tv=0.5 * (q.exp() - (r - log_z).exp()).abs().sum().item())
    return out


@pytest.mark.parametrize("at_target", [True, False])
def test_the_head_learns_what_tb_asks_of_logz_per_prompt(tiny_gpt2, at_target):
    """The network fixed, TB's expected loss over q is smallest at logZ(c) = E_q[log R - log q] = log Z(c) -
    KL(q || p*): the head, reading each prompt's hidden state, reaches it for every prompt at once; at q = p*
    (a reward made from q itself) that is log Z(c) exactly."""
    policy, task = tree_policy(tiny_gpt2)
    tokens, lengths, conds, texts = every_object(policy, PROMPTS)
    with torch.no_grad():
        log_q = sequence_log_q(policy, tokens, lengths, conds)
        states = policy.prompt_states(conds)
    shift = {"CC": 2.5, "CO": -1.0, "CN": 6.0}
    log_r = log_q + torch.tensor([shift[c] for c in conds]) if at_target else exact_log_r(task, conds, texts)
    exact = exact_per_condition(log_q, log_r, conds)
    torch.manual_seed(0)
    head = conditions.LogZHead(conditions.hidden_size(policy))
    optimizer = torch.optim.Adam(head.parameters(), lr=0.1)
    decay = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / 400)
    for _ in range(400):
        loss = (log_q.exp() * (head(states).double() + log_q - log_r) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        decay.step()
    learned = dict(zip(PROMPTS, head(policy.prompt_states(PROMPTS)).tolist()))
    for c in PROMPTS:
        assert abs(learned[c] - (exact[c]["log_z"] - exact[c]["kl"])) < 2e-3, (c, learned[c], exact[c])
        assert (exact[c]["kl"] < 1e-6) if at_target else (exact[c]["kl"] > 0.05)  # biased low while q != p*


def test_the_batch_estimate_trains_q_to_the_target_of_every_prompt(tiny_gpt2):
    """The variance form with logZ(c) = E_q[log R - log q] (the batch estimate as k grows), exact expected loss over
    every object (weights q(x|c) detached): q(.|c) reaches p*(.|c) and the estimate reaches log Z(c), per prompt."""
    policy, task = tree_policy(tiny_gpt2)
    tokens, lengths, conds, texts = every_object(policy, PROMPTS)
    log_r = exact_log_r(task, conds, texts)
    torch.manual_seed(0)
    optimizer = torch.optim.Adam(policy.model.parameters(), lr=1e-2)
    for _ in range(250):
        log_q = sequence_log_q(policy, tokens, lengths, conds)
        parts = per_condition(log_q.detach().exp() * (log_r - log_q.detach()), conds).values()
        log_z = torch.cat([p.sum().expand(len(p)) for p in parts])
        loss = (log_q.detach().exp() * (log_z + log_q - log_r) ** 2).sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        log_q = sequence_log_q(policy, tokens, lengths, conds)
    exact = exact_per_condition(log_q, log_r, conds)
    assert len({round(e["log_z"], 3) for e in exact.values()}) == 3  # three different targets
    for c, e in exact.items():
        assert e["tv"] < 0.02 and e["kl"] < 2e-3, (c, e)  # the estimate's gap to log Z(c) is KL(q || p*)


def test_the_seen_log_z_is_exact_once_every_object_is_drawn_and_below_it_before(tiny_gpt2, tmp_path):
    """--log-z seen (kappa = 1): log R = log P_ref + lam S with S = 0 on about half the objects and on every object of
    one prompt. Half the objects drawn: below log Z(c); all of them: log Z(c); drawn again: unchanged; the prompt
    without a positive score: exactly 0, and --anchor's weight on its rows. The state survives a checkpoint's
    weights-only load."""
    policy, task = tree_policy(tiny_gpt2)
    tokens, lengths, conds, texts = every_object(policy, PROMPTS)
    with torch.no_grad():
        log_ref = sequence_log_q(policy, tokens, lengths, conds)  # any distribution over each prompt's objects
    s = torch.tensor([0.0 if c == "CN" else task.given(c).score(t) for c, t in zip(conds, texts)], dtype=torch.float64)
    log_r = log_ref + 3.0 * torch.where(s > 0.5, s, 0.0)
    exact = {c: torch.logsumexp(r, 0).item() for c, r in per_condition(log_r, conds).items()}
    at_end = lambda v: torch.zeros(len(v), MAX_LEN + 1, dtype=torch.float64).scatter(1, lengths[:, None], v[:, None])
    seen, half = conditions.SeenLogZ("cpu"), torch.arange(len(conds)) % 2 == 0
    seen.add([c for c, h in zip(conds, half) if h], tokens[half], lengths[half], at_end(log_r)[half], at_end(log_ref)[half])
    below = dict(zip(PROMPTS, seen.values(PROMPTS)))
    for _ in range(2):  # everything, then everything again
        seen.add(conds, tokens, lengths, at_end(log_r), at_end(log_ref))
    full = dict(zip(PROMPTS, seen.values(PROMPTS)))
    for c in ("CC", "CO"):
        assert below[c] < full[c] - 0.01 and abs(full[c] - exact[c]) < 1e-5, (c, below[c], full[c], exact[c])
    assert full["CN"] == below["CN"] == 0.0 and abs(exact["CN"]) < 1e-5
    assert seen.row_weights(["CN", "CC", "CN", "XX"], 16.0).tolist() == [16.0, 1.0, 16.0, 16.0]  # --anchor 16
    torch.save(seen.state_dict(), tmp_path / "state.pt")
    loaded = conditions.SeenLogZ("cpu")
    loaded.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert loaded.values(PROMPTS) == seen.values(PROMPTS) and loaded.found == seen.found


def test_the_ref_log_z_is_an_unbiased_estimate_from_the_references_draws(tiny_gpt2, tmp_path):
    """--log-z ref: on the tree, n draws of each prompt from its P_ref give a mean of R / P_ref within 5 standard
    errors of Z(c), the error computed exactly from the weights' variance under P_ref; a prompt without a positive
    score stays at exactly 0; a prompt never drawn from the reference keeps its seen value; and the estimate never
    sits below the seen sum. The state survives a checkpoint's weights-only load."""
    policy, task = tree_policy(tiny_gpt2)
    tokens, lengths, conds, texts = every_object(policy, PROMPTS)
    with torch.no_grad():
        log_ref = sequence_log_q(policy, tokens, lengths, conds)
    s = torch.tensor([0.0 if c == "CN" else task.given(c).score(t) for c, t in zip(conds, texts)], dtype=torch.float64)
    log_r = log_ref + 3.0 * torch.where(s > 0.5, s, 0.0)
    at_end = lambda v: torch.zeros(len(v), MAX_LEN + 1, dtype=torch.float64).scatter(1, lengths[:, None], v[:, None])
    ref, n = conditions.SeenLogZ("cpu"), 4000
    gen = torch.Generator().manual_seed(0)
    for c in ("CC", "CN"):  # "CO" is never drawn from the reference, only seen in a batch
        rows = torch.tensor([i for i, x in enumerate(conds) if x == c])
        draws = rows[torch.multinomial(log_ref[rows].exp(), n, replacement=True, generator=gen)]
        ref.add_reference([c] * n, [c] * n, tokens[draws], lengths[draws], at_end(log_r)[draws], at_end(log_ref)[draws])
    co = torch.tensor([i for i, x in enumerate(conds) if x == "CO"][:3])
    ref.add(["CO"] * 3, tokens[co], lengths[co], at_end(log_r)[co], at_end(log_ref)[co])
    values = dict(zip(PROMPTS, ref.values(PROMPTS)))
    rows = torch.tensor([i for i, x in enumerate(conds) if x == "CC"])
    w, p = (log_r[rows] - log_ref[rows]).exp(), log_ref[rows].exp()
    z, var = (p * w).sum().item(), (p * w ** 2).sum().item() - (p * w).sum().item() ** 2
    assert var > 0 and abs(math.exp(values["CC"]) - z) < 5 * math.sqrt(var / n), (values["CC"], math.log(z))
    assert values["CN"] == 0.0
    seen = conditions.SeenLogZ("cpu")
    seen.add(["CO"] * 3, tokens[co], lengths[co], at_end(log_r)[co], at_end(log_ref)[co])
    assert values["CO"] == seen.values(["CO"])[0] > 0
    # --explore-from uniform: draws from another proposal Q with P_ref's support (here one that favours the solutions),
    # weighted by P_ref / Q; unweighted, the same draws would estimate 1 + E_Q[R / P_ref - 1], far from Z
    logits = torch.randn(len(rows), generator=gen, dtype=torch.float64) + 2 * s[rows]
    other, q = conditions.SeenLogZ("cpu"), torch.softmax(logits, 0)
    picks = torch.multinomial(q, n, replacement=True, generator=gen)
    other.add_reference(["CC"] * n, ["CC"] * n, tokens[rows[picks]], lengths[rows[picks]], at_end(log_r)[rows[picks]],
                        at_end(log_ref)[rows[picks]], log_proposal=q.log()[picks])
    w_q = (log_r[rows].exp() - p) / q  # (R - P_ref) / Q of every object
    var_q = (q * w_q ** 2).sum().item() - (q * w_q).sum().item() ** 2
    assert var_q > 0 and abs(math.exp(other.values(["CC"])[0]) - z) < 5 * math.sqrt(var_q / n)
    unweighted = 1 + (q * (w - 1)).sum().item()
    assert abs(unweighted - z) > 10 * math.sqrt(var_q / n)  # measured: 11.7 standard errors off
    ref.log_excess["CC"] = -50.0  # an estimate below what has been drawn: the seen sum holds
    assert ref.values(["CC"]) == [float(np.logaddexp(0.0, ref.log_sum["CC"]))]
    torch.save(ref.state_dict(), tmp_path / "state.pt")
    loaded = conditions.SeenLogZ("cpu")
    loaded.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert loaded.values(PROMPTS) == ref.values(PROMPTS) and loaded.n_ref == ref.n_ref


# ----------------------------------------------------------------------------- replay per condition

def test_replay_keeps_each_condition_apart(tmp_path):
    from replay import Item
    buffer = replay.ConditionalBuffer("subm", capacity=3, similarity="bigram")
    items = [Item(tokens=(i,), text=t, key=t, score=s, valid=True, length=1)
             for i, (t, s) in enumerate([("a", 1.0), ("a", 0.5), ("b", 0.2), ("c", 0.1), ("d", 0.9)])]
    buffer.add(items, ["x", "y", "x", "x", "x"])  # 'a' twice, but in two conditions: both kept
    assert sorted(it.text for it in buffer.buffers["x"].items) == ["a", "b", "d"]  # capacity 3, within x only
    assert [it.text for it in buffer.buffers["y"].items] == ["a"]
    drawn, conds = buffer.sample(4, 2, np.random.default_rng(0))
    assert len(drawn) == 8 and all(it in buffer.buffers[c].items for it, c in zip(drawn, conds))
    assert conds[0::2] == conds[1::2]  # k items of each drawn condition, side by side
    state = buffer.state_dict()
    torch.save(state, tmp_path / "b.pt")
    again = replay.ConditionalBuffer("rp", 1, "tanimoto")
    again.load_state_dict(torch.load(tmp_path / "b.pt", weights_only=True))
    assert {c: [it.text for it in b.items] for c, b in again.buffers.items()} == \
        {c: [it.text for it in b.items] for c, b in buffer.buffers.items()}


# ----------------------------------------------------------------------------- the unconditional path

def test_an_unconditional_run_never_enters_the_conditional_code(tiny_gpt2, tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("the unconditional path called the conditional code")
    for name in ("build", "row_log_z", "init_log_z", "make_condition_log_z", "ConditionalPolicy", "ConditionalBuffer"):
        monkeypatch.setattr(conditions, name, refuse)
    assert train.main(["--model", tiny_gpt2, "--out", str(tmp_path), "--steps", "2", "--batch-size", "4",
                       "--max-len", "4", "--min-len", "1", "--eval-every", "0"]) == 0


def test_a_score_function_that_takes_prompts_gets_each_texts_prompt(tiny_gpt2, tmp_path, capsys, monkeypatch):
    (tmp_path / "prompted.py").write_text(
        "import json, os\n"
        "def score(texts, prompts):\n"
        "    with open(os.environ['PROMPTED_LOG'], 'a') as f:\n"
        "        f.write(json.dumps([texts, prompts]) + '\\n')\n"
        "    return [float(p in t) for t, p in zip(texts, prompts)]\n")
    (tmp_path / "train.txt").write_text("C\nO\n")
    (tmp_path / "heldout.txt").write_text("N\n")
    log = tmp_path / "calls.jsonl"
    monkeypatch.setenv("PROMPTED_LOG", str(log))
    spec = f"{tmp_path / 'prompted.py'}:score"
    common = ["--task", spec, "--model", tiny_gpt2, "--charset", "CON", "--max-len", "3", "--min-len", "1",
              "--batch-size", "4", "--steps", "2", "--k-min-start", "2", "--k-min-end", "2"]
    assert train.main([*common, "--out", str(tmp_path / "a")]) == 2  # without prompts: one line, no traceback
    assert "takes prompts" in capsys.readouterr().err
    assert train.main([*common, "--prompts", str(tmp_path / "train.txt"), "--heldout-prompts",
                       str(tmp_path / "heldout.txt"), "--samples-per-prompt", "2", "--eval-every", "2",
                       "--eval-n", "8", "--out", str(tmp_path / "b")]) == 0
    calls = [json.loads(line) for line in open(log)]
    assert {p for _, prompts in calls for p in prompts} == {"C", "O", "N"}  # N: only while measuring
    assert all(len(texts) == len(prompts) and len(set(prompts)) == 1 for texts, prompts in calls)
    rows = [json.loads(line) for line in open(tmp_path / "b" / "metrics.jsonl")]
    assert "heldout_kl_q_target" in rows[-1] and rows[1]["log_z"] != 0
