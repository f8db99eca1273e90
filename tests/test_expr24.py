"""Expr24: the exact evaluator, the solution enumeration, the metrics, and training + sampling end to end on CPU."""
import functools
import itertools
import json
import math
import random
from collections import Counter
from fractions import Fraction

import numpy as np
import pytest

import rewards
import metrics
import sample
import train
from tasks.expr24.task import EXPR24_DIGITS, EXPR24_OPS, Expr24Task, evaluate_expression, expr24_solutions
from rewards import TaskError
from test_losses import PrefixTree


def oracle(text):
    """An independent evaluator for short, well-formed test strings: Python's own parser and precedence on
    Fractions (the task itself must not use eval). None on division by zero."""
    try:
        return eval("".join(f"F({c})" if c.isdigit() else c for c in text), {"F": Fraction, "__builtins__": {}})
    except ZeroDivisionError:
        return None


def brute_force_solutions(max_numbers):
    """itertools + Fraction, no vectorisation: every expression with 1..max_numbers numbers worth 24."""
    found = set()
    for n in range(1, max_numbers + 1):
        for digits in itertools.product("0123456789", repeat=n):
            for ops in itertools.product("+-*/", repeat=n - 1):
                text = "".join(d + o for d, o in zip(digits, ops + ("",)))
                if oracle(text) == 24:
                    found.add(text)
    return found


# ----------------------------------------------------------------------------- evaluator

@pytest.mark.parametrize("text, value", [
    ("2+3*4", 14), ("8/3*9", 24), ("1/3*3", 1), ("1/3", Fraction(1, 3)), ("9-8/4*2", 5), ("4*6", 24),
    ("1-2-3", -4), ("8/2/2", 2), ("7", 7), ("0*5+3", 3), ("6/4*8*2", 24), ("1+2*3-4/8", Fraction(13, 2)),
])
def test_hand_written_values(text, value):
    assert evaluate_expression(text) == value and isinstance(evaluate_expression(text), Fraction)
    assert evaluate_expression(text) == oracle(text)


@pytest.mark.parametrize("text", ["", "3+", "+3", "12+3", "3++4", "3+4*", "3 + 4", "2**3", "(3)", "a+1", "3/0",
                                  "0/0", "5*0/0+1", "1+2+3+4+5+6", "²+1", "24"])
def test_invalid_strings(text):
    task = Expr24Task()
    assert evaluate_expression(text) is None
    assert not task.is_valid(text) and task.score(text) == 0.0


def test_validity_is_the_exact_evaluations():
    """is_valid reads the grammar and '/0' alone: the same answer as the exact evaluation on every string of up to
    4 characters over the digits, the operators and two others, on 20,000 random ones of 5-11, and with 4 numbers."""
    chars = EXPR24_DIGITS + EXPR24_OPS + " ("
    texts = ["".join(t) for n in range(5) for t in itertools.product(chars, repeat=n)]
    rng = np.random.default_rng(0)
    texts += ["".join(rng.choice(list(chars), size=n)) for n in rng.integers(5, 12, size=10000)]
    texts += ["".join(rng.choice(list(EXPR24_OPS)) if k % 2 else rng.choice(list(EXPR24_DIGITS)) for k in range(n))
              for n in rng.integers(5, 12, size=10000)]  # in the grammar's alternation, so nearly all near the edge
    four = Expr24Task()
    four.max_numbers = 4
    for task in (Expr24Task(), four):
        assert [task.is_valid(t) for t in texts] == [evaluate_expression(t, task.max_numbers) is not None for t in texts]


def test_scores_and_prefixes():
    task = Expr24Task()
    assert task.score("8/3*9") == 1.0 and task.is_valid("8/3*9")
    assert task.score("2+3*4") == 0.0 and task.is_valid("2+3*4")
    # a prefix already worth 24 scores 1 (what RapTB's absorption backs up); incomplete prefixes score 0
    assert [task.score("4*6+0"[:k]) for k in range(6)] == [0, 0, 0, 1, 0, 1]
    assert task.full("3*8") == task.canonical("3*8") == "3*8" and task.canonical("8*3") == "8*3"


def test_prefix_scores_in_the_trainer_contract():
    texts = {i: c for i, c in enumerate("0123456789+-*/")}
    ids = {c: i for i, c in texts.items()}
    import torch
    tokens = torch.tensor([[ids[c] for c in "4*6+0"] + [0] * 4, [ids[c] for c in "9-9/0+24"][:8] + [0]])
    scores = rewards.prefix_scores(Expr24Task(), texts, tokens, torch.tensor([5, 7]), 9)
    assert scores[0].tolist() == [0, 0, 0, 1, 0, 1, 0, 0, 0, 0]
    assert scores[1].tolist() == [0] * 10  # 9-9/0... divides by zero


def test_allowlist_keeps_single_characters(tiny_gpt2):
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2)
    texts = {i: tokenizer.decode([i]) for i in rewards.allowed_token_ids(tokenizer, Expr24Task.charset, max_chars=1)}
    assert texts and all(len(t) == 1 and t in Expr24Task.charset for t in texts.values())
    longer = rewards.allowed_token_ids(tokenizer, Expr24Task.charset)  # the SMILES call is unchanged
    assert set(texts) <= set(longer)


# ----------------------------------------------------------------------------- enumeration

@pytest.mark.parametrize("n", [1, 2, 3])
def test_enumeration_matches_brute_force(n):
    assert set(expr24_solutions(max_numbers=n)) == brute_force_solutions(n)
    assert len(expr24_solutions(max_numbers=n)) == len(set(expr24_solutions(max_numbers=n)))


def test_enumeration_other_target_matches_brute_force():
    found = {t for n in (1, 2, 3) for d in itertools.product("0123456789", repeat=n)
             for o in itertools.product("+-*/", repeat=n - 1)
             for t in ["".join(a + b for a, b in zip(d, o + ("",)))] if oracle(t) == 0}
    assert set(expr24_solutions(max_numbers=3, target=0)) == found


def test_full_enumeration_structure():
    solutions = expr24_solutions()
    assert len(set(solutions)) == len(solutions)
    assert {len(s) for s in solutions} == {3, 5, 7, 9}  # no single digit is 24
    assert set(expr24_solutions(max_numbers=3)) == {s for s in solutions if len(s) <= 5}
    rng = random.Random(0)
    for text in rng.sample(solutions, 1000):
        assert oracle(text) == 24 and evaluate_expression(text) == 24
    # and the converse on random 4- and 5-number expressions: worth 24 <=> enumerated
    members = set(solutions)
    hits = 0
    for _ in range(5000):
        n = rng.choice([4, 5])
        text = "".join(rng.choice("0123456789") + rng.choice("+-*/") for _ in range(n))[:-1]
        hits += oracle(text) == 24
        assert (oracle(text) == 24) == (text in members), text
    assert hits > 0
    task = Expr24Task()
    assert task.solutions(3, 9) == solutions and task.solutions(3, 5) == expr24_solutions(max_numbers=3)
    assert task.solutions(6, 7) == tuple(s for s in solutions if len(s) == 7)


def test_score_is_the_exact_value_test():
    """score reads the solution set; it says what the exact evaluation says, in and out of the grammar."""
    task, rng = Expr24Task(), np.random.default_rng(0)
    texts = task.random_objects(3000, rng) + list(expr24_solutions()[::97]) + \
        ["", "24", "3*8+", "3**8", "8*3*1*1*1*1", "6/0*4", "3x8", " 3*8", "4*6/1"]
    assert {task.score(t) for t in texts} == {0.0, 1.0}
    for text in texts:
        assert task.score(text) == float(evaluate_expression(text) == 24), text


# ----------------------------------------------------------------------------- metrics

def fake(text, task=Expr24Task()):
    return dict(tokens=list(text), length=len(text), generated=text, molecule=text, valid=task.is_valid(text),
                score=task.score(text))


def test_metrics_by_hand():
    solutions = ["3*8", "8*3", "4*6", "6*4"]  # a small made-up solution set, so everything is countable
    samples = [fake(t) for t in ["3*8", "3*8", "8*3", "3+3", "3+", "9/0"]]
    m = metrics.expr24_metrics(samples, solutions)
    assert m["n"] == 6 and m["n_correct"] == 3 and m["acc"] == 0.5
    assert m["n_syntax_valid"] == 4 and m["valid_frac"] == pytest.approx(4 / 6)  # 3+ is cut short, 9/0 undefined
    assert m["unique_correct"] == 2 and m["norm_cov"] == 2 / 4 and m["n_solutions"] == 4
    assert m["cov_by_len"] == {3: 0.5}
    assert m["len_mean"] == 3.0 and m["len_all_mean"] == pytest.approx((3 * 5 + 2) / 6)
    # per position, with the sampler's counts smoothed by 0.5 over the target's support:
    # k=0: target {3,8,4,6} uniform, sampler counts 3:2 8:1 -> (2.5, 1.5, .5, .5) / 5
    # k=1: target {*: 1}, both degenerate -> 0;  k=2: same as k=0 with 8:2 3:1 (mirror image)
    p0 = [2.5 / 5, 1.5 / 5, 0.5 / 5, 0.5 / 5]
    kl_fwd0 = sum(p * math.log(p / 0.25) for p in p0)
    kl_rev0 = sum(0.25 * math.log(0.25 / p) for p in p0)
    js0 = sum(0.5 * p * math.log(p / ((p + .25) / 2)) + 0.5 * .25 * math.log(.25 / ((p + .25) / 2)) for p in p0)
    assert m["pos_kl_fwd"] == pytest.approx([kl_fwd0, 0, kl_fwd0])
    assert m["pos_kl_rev"] == pytest.approx([kl_rev0, 0, kl_rev0])
    assert m["pos_js"] == pytest.approx([js0, 0, js0])
    assert m["kl_fwd"] == pytest.approx(2 * kl_fwd0 / 3) and m["js"] == pytest.approx(2 * js0 / 3)
    # whole expressions, unsmoothed: sampler (2/3, 1/3, 0, 0) vs uniform 1/4
    q = [2 / 3, 1 / 3]
    assert m["seq_kl"] == pytest.approx(sum(p * math.log(p * 4) for p in q))
    mix = [(p + .25) / 2 for p in q]
    js = sum(.5 * p * math.log(p / x) + .5 * .25 * math.log(.25 / x) for p, x in zip(q, mix)) + .5 * .5 * math.log(2)
    assert m["seq_js"] == pytest.approx(js)
    report = sample.format_report(m)
    assert "Unique-correct 2" in report and "NormCov 0.500" in report and "Acc 0.500" in report


def test_metrics_end_symbol_and_perfect_sampler():
    solutions = ["3*8", "4*6", "6*2*2", "2*2*6"]
    m = metrics.expr24_metrics([fake(t) for t in solutions], solutions)
    # a sampler that is exactly uniform over the solutions: zero divergence everywhere except smoothing
    assert m["seq_kl"] == pytest.approx(0) and m["seq_js"] == pytest.approx(0)
    assert m["norm_cov"] == 1.0 and m["cov_by_len"] == {3: 1.0, 5: 1.0}
    counts = metrics.position_counts(solutions, 5)
    assert counts[3] == Counter({"$": 2, "*": 2}) and counts[4] == Counter({"$": 2, "2": 1, "6": 1})


def test_metrics_without_correct_samples():
    m = metrics.expr24_metrics([fake("3+4"), fake("1")], ["3*8", "8*3"])
    assert m["acc"] == 0 and m["unique_correct"] == 0 and m["norm_cov"] == 0
    assert m["kl_fwd"] is None and m["seq_kl"] is None
    assert "Acc 0.000" in sample.format_report(m)


def test_metrics_reject_a_wrong_solution_set():
    with pytest.raises(ValueError, match="not in the solution set"):
        metrics.expr24_metrics([fake("3*8")], ["8*3"])


# ----------------------------------------------------------------------------- end to end on CPU

@pytest.fixture
def quick_warm_start(monkeypatch):
    """train.py warm-starts its scratch model for 600 steps; a few are enough to exercise the path."""
    import model
    monkeypatch.setattr(model, "build_scratch_model", functools.partial(model.build_scratch_model, warmup_steps=5))


@pytest.mark.parametrize("replay", ["none", "subm"])
def test_train_and_sample_from_scratch(tmp_path, replay, capsys, quick_warm_start):
    out = tmp_path / "run"
    assert train.main(["--task", "expr24", "--out", str(out), "--steps", "3", "--batch-size", "8",
                       "--grad-accum", "1", "--replay", replay, "--eval-every", "0"]) == 0
    assert (out / "init" / "config.json").is_file()  # the scratch model the run started from
    with open(out / "metrics.jsonl") as f:
        log = [json.loads(line) for line in f]
    assert [m["step"] for m in log] == [1, 2, 3] and all(math.isfinite(m["loss"]) for m in log)
    csv_path = tmp_path / "s.csv"
    assert sample.main([str(out), "--n", "50", "--out", str(csv_path), "--fidelity-n", "0"]) == 0  # exact: test_fidelity
    metrics = json.load(open(tmp_path / "s_metrics.json"))
    if replay == "subm":  # the GFlowNet recipe's --log-z ref counts per condition: Expr24 runs as one, the empty prompt
        assert [c["prompt"] for c in metrics["conditions"]] == [""]
        metrics = metrics["conditions"][0]
    assert metrics["n"] == 50 and metrics["n_solutions"] == len(expr24_solutions())
    assert 0 <= metrics["acc"] <= metrics["valid_frac"] == 1  # the grammar mask: every sample is an expression
    assert all(3 <= n <= 9 for n in map(int, metrics["len_all_hist"]))
    assert "NormCov" in capsys.readouterr().out


def test_scratch_model_is_a_character_model(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import model
    for name in ("a", "b"):
        torch.manual_seed(3)
        model.build_scratch_model(str(tmp_path / name), sorted(Expr24Task.charset))
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path / "a"))
    ids = tokenizer("8/3*9", add_special_tokens=False).input_ids
    assert len(ids) == 5 and tokenizer.decode(ids) == "8/3*9"
    assert len(tokenizer) == 14 + 4 and tokenizer.eos_token_id is not None and tokenizer.bos_token_id is not None
    a, b = (AutoModelForCausalLM.from_pretrained(str(tmp_path / n)) for n in "ab")
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))  # same torch seed, same model


# ----------------------------------------------------------------------------- grammar warm start

def test_random_objects_are_uniform_over_valid_expressions():
    task = Expr24Task()
    texts = task.random_objects(4000, np.random.default_rng(0))
    assert texts == task.random_objects(4000, np.random.default_rng(0))  # deterministic given the generator
    assert all(task.is_valid(t) for t in texts)
    # uniform over all valid expressions = a length with m operators in proportion to the 10 * 39^m valid ones,
    # first digit uniform, every (operator, digit) step uniform over the 39 that do not divide by zero;
    # counts within 5 sd
    def near(count, n, p):
        return abs(count - n * p) < 5 * math.sqrt(n * p * (1 - p)) + 1e-9

    def near_uniform(counts, n_kinds):
        n = sum(counts.values())
        return len(counts) == n_kinds and all(near(c, n, 1 / n_kinds) for c in counts.values())
    lengths = Counter(map(len, texts))
    assert set(lengths) <= {3, 5, 7, 9} and near(lengths[9], 4000, 39 ** 4 / (39 + 39 ** 2 + 39 ** 3 + 39 ** 4))
    short = Counter(map(len, task.random_objects(4000, np.random.default_rng(2), min_len=3, max_len=5)))
    assert set(short) == {3, 5} and near(short[3], 4000, 1 / 40)
    assert near_uniform(Counter(t[0] for t in texts), 10)
    steps = Counter(t[i:i + 2] for t in texts for i in range(1, len(t), 2))
    assert "/0" not in steps and near_uniform(steps, 39)
    assert {len(t) for t in task.random_objects(200, np.random.default_rng(1), min_len=4, max_len=8)} == {5, 7}
    with pytest.raises(TaskError):
        task.random_objects(1, np.random.default_rng(0), min_len=10, max_len=12)


def valid_fraction(path, n=300, masked=False):
    import torch

    import model
    net, tokenizer = model.load_model(path)
    allowed = rewards.allowed_token_ids(tokenizer, Expr24Task.charset, max_chars=1)
    policy = model.Policy(net, tokenizer, allowed, Expr24Task.defaults["min_len"], Expr24Task.defaults["max_len"],
                          state_mask=Expr24Task().state_mask if masked else None)
    torch.manual_seed(0)
    texts = policy.texts(*policy.sample(n)[:2])
    return sum(map(Expr24Task().is_valid, texts)) / n


def test_warm_start_makes_the_scratch_model_a_grammar_prior(tmp_path):
    import torch

    import model
    task = Expr24Task()
    texts = task.random_objects(2000, np.random.default_rng(0))
    build = functools.partial(model.build_scratch_model, alphabet=sorted(task.charset), seed=0)
    build(str(tmp_path / "random"))
    build(str(tmp_path / "warm"), warmup_texts=texts, warmup_steps=100)  # 600 in train.py
    # random: nearly every sample breaks the grammar; warm-started: most are valid (600 steps: about 99%)
    assert valid_fraction(str(tmp_path / "random")) < 0.2 and valid_fraction(str(tmp_path / "warm")) > 0.7
    # under the grammar mask (what train.py uses) every sample of either is a valid expression
    assert valid_fraction(str(tmp_path / "random"), 200, True) == valid_fraction(str(tmp_path / "warm"), 200, True) == 1
    # deterministic given the seed, and the global RNG left alone
    rng_state = torch.random.get_rng_state()
    for name in ("a", "b"):
        build(str(tmp_path / name), warmup_texts=texts[:100], warmup_steps=5)
    assert torch.equal(torch.random.get_rng_state(), rng_state)
    a, b, untrained = (model.load_model(str(tmp_path / n))[0] for n in ("a", "b", "random"))
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not all(torch.equal(p, q) for p, q in zip(a.parameters(), untrained.parameters()))


# ----------------------------------------------------------------------------- the grammar as a state mask (METHOD.md §1)

ACTION_TEXTS = list("0123456789+-*/") + [""]  # a policy's action columns: the tokens' texts, then the stop ("")


def masked_strings(texts, max_len):
    """Every string of at most max_len characters that a sampler under the state mask can finish, found by walking
    the prefix tree level by level; each level is one batched call of the mask function."""
    import torch
    fn = Expr24Task().state_mask(texts)
    stop, found = len(texts) - 1, set()
    level = torch.zeros(1, 0, dtype=torch.long)  # the prefixes with k characters, as action columns
    for k in range(max_len + 1):
        allowed = fn(level, k)
        assert allowed.shape == (len(level), len(texts)) and allowed.any(1).all()  # no dead end
        found |= {"".join(texts[a] for a in row) for row in level[allowed[:, stop]].tolist()}
        rows, cols = allowed[:, :stop].nonzero(as_tuple=True)
        level = torch.cat([level[rows], cols[:, None]], 1)
    return found


@pytest.mark.parametrize("shuffle", [False, True])
def test_state_mask_allows_exactly_the_grammar(shuffle):
    import torch
    texts = ACTION_TEXTS[:-1]
    if shuffle:  # a tokenizer's own order
        random.Random(0).shuffle(texts)
    texts += [""]
    grammar = {"".join(d + o for d, o in zip(ds, ops + ("",))) for n in (1, 2, 3)
               for ds in itertools.product("0123456789", repeat=n) for ops in itertools.product("+-*/", repeat=n - 1)}
    grammar = {t for t in grammar if "/0" not in t}
    assert len(grammar) == 10 + 390 + 15210 and masked_strings(texts, 5) == grammar
    assert all(evaluate_expression(t) is not None for t in grammar)
    # after the paper's 5 numbers only the stop
    prev = torch.tensor([[texts.index(c) for c in "1+2+3+4+5"]])
    assert Expr24Task().state_mask(texts)(prev, 9)[0].tolist() == [False] * 14 + [True]


@pytest.fixture(scope="module")
def scratch_policy(tmp_path_factory):
    """A randomly initialised character model (no warm start: the mask alone makes every sample valid) under the
    grammar mask, with a frozen copy as the reference, as train.py builds them."""
    import model
    path = str(tmp_path_factory.mktemp("scratch"))
    model.build_scratch_model(path, sorted(Expr24Task.charset), seed=0)
    net, tokenizer = model.load_model(path)
    allowed = rewards.allowed_token_ids(tokenizer, Expr24Task.charset, max_chars=1)
    return model.Policy(net, tokenizer, allowed, 3, 9, reference=model.frozen_copy(net),
                        state_mask=Expr24Task().state_mask)


def test_masked_log_probs_match_the_sampler(scratch_policy):
    import torch
    policy, task = scratch_policy, Expr24Task()
    torch.manual_seed(0)
    tokens, lengths, log_q = policy.sample(64)
    assert all(task.is_valid(t) for t in policy.texts(tokens, lengths)) and set(lengths.tolist()) <= {3, 5, 7, 9}
    log_pf, log_pterm = policy.log_probs(tokens, lengths)
    k, tau = torch.arange(10), lengths[:, None]
    one_pass = torch.where(k < tau, log_pf, 0.0) + torch.where(k == tau, log_pterm, 0.0)
    assert torch.allclose(one_pass, log_q, atol=1e-5)  # the sampler's per-step log-probs
    # the stop is exactly -inf wherever the grammar (k even) or L_min (k < 3) forbids it, and nowhere else
    stop_masked = (k <= tau) & ((k % 2 == 0) | (k < 3))
    assert torch.equal(log_pterm.isneginf(), stop_masked) and torch.isfinite(log_pf).all()
    # the reference (an identical frozen copy here) is the same masked distribution
    ref_pf, ref_pterm = policy.log_probs(tokens, lengths, reference=True)
    assert torch.allclose(ref_pf, log_pf) and torch.allclose(ref_pterm, log_pterm)


@pytest.mark.parametrize("loss", ["tb", "subtb", "raptb", "avgprefixtb", "rootsubtb"])
def test_masked_losses_have_finite_gradients(scratch_policy, loss):
    """A stricter mask that allows nothing after the stop: the teacher-forced pass must not turn those
    fully masked states past each row's end into NaN, in the loss or in its gradient."""
    import torch

    import losses
    policy, texts = scratch_policy, ["3*8", "2*3*4", "8/1/1/1*3", "9+8+7"]
    grammar, stop = policy.task_mask, len(policy.actions) - 1
    policy.task_mask = lambda prev, k: grammar(prev, k) & ~(prev == stop).any(1, keepdim=True)
    try:
        ids = {t: a for a, t in policy.token_texts.items()}
        tokens = torch.full((len(texts), 9), policy.eos)
        for b, t in enumerate(texts):
            tokens[b, :len(t)] = torch.tensor([ids[c] for c in t])
        lengths = torch.tensor([len(t) for t in texts])
        scores = rewards.prefix_scores(Expr24Task(), policy.token_texts, tokens, lengths, 9)
        log_r, u = rewards.log_reward(policy.log_ref_stop(tokens, lengths).double(), scores)
        log_pf, log_pterm = policy.log_probs(tokens, lengths)
        log_z = torch.zeros((), requires_grad=True)
        value, _ = losses.compute_loss(loss, log_pf, log_pterm, log_r.float(), u.float(), lengths, log_z,
                                       min_len=3, k_min=3)
        policy.model.zero_grad()
        with torch.autograd.detect_anomaly():  # fails on any NaN inside backward, even one masked out later
            value.backward()
    finally:
        policy.task_mask = grammar
    grads = [p.grad for p in policy.model.parameters() if p.grad is not None]
    assert torch.isfinite(value) and grads and all(torch.isfinite(g).all() for g in grads)


def brute_subtb(log_pf, log_pterm, log_r, lengths, lam):
    """Modified SubTB by enumerating every window between two states that can stop."""
    num = den = 0.0
    for b, tau in enumerate(lengths.tolist()):
        usable = [k for k in range(tau + 1) if log_pterm[b, k] > float("-inf")]
        g = {k: log_pf[b, :k].sum() + log_pterm[b, k] - log_r[b, k] for k in usable}
        for i, j in itertools.combinations(usable, 2):
            num, den = num + lam ** (j - i - 1) * (g[j] - g[i]) ** 2, den + lam ** (j - i - 1)
    return num / den


@pytest.mark.parametrize("lam", [1.0, 0.8])
def test_subtb_windows_skip_states_that_cannot_stop(lam):
    import torch

    import losses
    g = torch.Generator().manual_seed(0)
    B, T = 6, 8
    log_pf, log_pterm, log_r = (torch.randn(B, T, generator=g, dtype=torch.float64) for _ in range(3))
    lengths = torch.tensor([7, 6, 3, 7, 1, 5])
    masked = torch.rand(B, T, generator=g) < 0.4  # a task mask forbids the stop here (never at tau)
    masked[torch.arange(B), lengths] = False
    log_pterm[masked], log_r[masked] = float("-inf"), float("-inf")
    value, _ = losses.subtb_loss(log_pf, log_pterm, log_r, lengths, lam=lam)
    assert value.item() == pytest.approx(brute_subtb(log_pf, log_pterm, log_r, lengths, lam).item(), rel=1e-9)


class GrammarTree(PrefixTree):
    """PrefixTree's batch and exact TV over another tree: every string over V tokens of length <= L_max (even), with the stop allowed at even lengths only (a state
    mask like Expr24's), random rewards on the objects, and one tabular logit vector per state."""

    def __init__(self, V=2, L_max=4, seed=0):
        import torch
        g = torch.Generator().manual_seed(seed)
        states = [()]
        for n in range(L_max):
            states += [s + (v,) for s in states if len(s) == n for v in range(V)]
        index = {s: i for i, s in enumerate(states)}
        self.V, self.states = V, states
        self.mask = torch.tensor([[len(s) < L_max] * V + [len(s) % 2 == 0] for s in states])
        objects = [s for s in states if len(s) % 2 == 0]
        u = torch.where(torch.rand(len(states), generator=g) < 0.5, 0.0, 3.0)  # half the objects score
        log_r_state = torch.where(self.mask[:, V], 0.5 * torch.randn(len(states), generator=g, dtype=torch.float64)
                                  + u, float("-inf"))
        T = L_max + 1
        self.lengths = torch.tensor([len(x) for x in objects])
        self.state_idx = torch.tensor([[index[x[:min(k, len(x))]] for k in range(T)] for x in objects])
        self.token = torch.tensor([[x[k] if k < len(x) else 0 for k in range(T)] for x in objects])
        self.log_r, self.u = log_r_state[self.state_idx], u.double()[self.state_idx]
        target = log_r_state[[index[x] for x in objects]]
        self.target = (target - torch.logsumexp(target, 0)).exp()


@pytest.mark.parametrize("name, knobs", [("tb", {}), ("subtb", {"lam": 0.8}), ("rootsubtb", {}),
                                         ("raptb", {"absorb": False, "k_min": 1})], ids=str)
def test_losses_match_the_target_under_a_state_mask(name, knobs):
    """Full-batch training of a tabular policy on a tree where a state mask forbids the stop at odd depths: every
    objective reaches the target, so the prefix terms use exactly the states that can stop."""
    import torch

    import losses
    torch.set_num_threads(1)
    tree = GrammarTree(seed=1)
    logits = torch.zeros(len(tree.states), tree.V + 1, dtype=torch.float64, requires_grad=True)
    log_z = torch.zeros((), dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.Adam([logits, log_z], lr=0.2)
    for _ in range(150):
        log_pf, log_pterm = tree.batch(logits)
        loss, _ = losses.compute_loss(name, log_pf, log_pterm, tree.log_r, tree.u, tree.lengths, log_z, **knobs)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert torch.isfinite(logits.grad[tree.mask]).all() and tree.tv(logits) < 0.02


def test_the_scratch_model_has_the_tasks_width_and_depth(tmp_path, monkeypatch, quick_warm_start):
    monkeypatch.setattr(Expr24Task, "scratch_model", dict(n_layer=2, n_embd=32, n_head=2))
    out = tmp_path / "run"
    assert train.main(["--task", "expr24", "--out", str(out), "--steps", "1", "--batch-size", "4", "--max-len", "5",
                       "--eval-every", "0"]) == 0
    config = json.load(open(out / "init" / "config.json"))
    assert (config["n_layer"], config["n_embd"], config["n_head"]) == (2, 32, 2)


def test_expr24_defaults_reach_train_py():
    for key, value in Expr24Task.defaults.items():
        assert getattr(train.get_args(["--task", "expr24"]), key) == value
    smiles = train.get_args(["--task", "smiles"])  # a task without its own settings gets the paper's
    assert (smiles.steps, smiles.batch_size, smiles.grad_accum, smiles.lr) == (5000, 32, 4, 1e-4)
    assert train.get_args(["--task", "expr24", "--lr", "1e-4", "--steps", "7"]).lr == 1e-4  # flags win


def test_the_gflownet_losses_take_the_recipe_and_runs_without_a_buffer_do_not():
    """Expr24's GFlowNet defaults (task.py, RESULTS.md): a buffer keeping every solution drawn, 4,096 draws a step from
    the masked uniform policy, --log-z ref, the anchor and bounded residuals. The RL baselines and the oracle train
    on their own samples and --replay none keeps no buffer: none of it; --replay subm keeps the paper's 200 items."""
    def settings(*flags):
        a = train.get_args(["--task", "expr24", "--out", "/tmp/unused", *flags])
        return a.replay, a.buffer_size, a.explore_ref, a.explore_from, a.log_z_mode, a.anchor, a.huber
    recipe = ("rp", 131072, 4096, "uniform", "ref", 16.0, 4.0)
    assert settings() == settings("--loss", "tb") == settings("--loss", "subtb") == recipe
    for flags in (["--loss", "rloo"], ["--loss", "dpg"], ["--loss", "oracle"], ["--replay", "none"]):
        assert settings(*flags) == (flags[1] if flags[0] == "--replay" else "none", 200, 0, "reference", "scalar", 1.0, 0.0)
    assert settings("--replay", "subm")[:3] == ("subm", 200, 4096)
    assert settings("--replay", "subm", "--buffer-size", "1000")[:2] == ("subm", 1000)
    assert settings("--explore-ref", "0")[2:5] == (0, "reference", "seen")  # no draws: no proposal, the seen logZ
