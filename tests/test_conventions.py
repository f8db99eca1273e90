"""The authors' conventions (conventions.py, METHOD.md §10): each against what the authors' code does, the switch's
precedence, and `--conventions ours` changing nothing."""
import argparse
import itertools
import json
import math
import os
from collections import Counter

import numpy as np
import pytest
import torch

import batches
import fidelity
import model as modellib
import rewards
import tracking
import checkpoint
import train
from losses import raptb_loss, subtb_loss
from metrics import blockwise_coverage, expr24_metrics
from tasks.expr24.task import EXPR24_OPS, Expr24AuthorsTask
from tasks.smiles.task import SmilesTask
from replay import Item
from test_losses import assert_same, make_batch, ref_raptb, ref_subtb

FAST = ["--steps", "3", "--batch-size", "6", "--grad-accum", "2", "--max-len", "5", "--min-len", "1",
        "--k-min-start", "3", "--k-min-end", "1", "--ckpt-every", "100", "--eval-every", "0"]


def settings(*flags, task="smiles"):
    return train.get_args(["--task", task, "--out", "/tmp/unused-conventions", *flags])


# ----------------------------------------------------------------------------- the switch

def test_ours_changes_nothing(tiny_gpt2, tmp_path):
    same = lambda args: {k: v for k, v in vars(args).items() if k != "explicit"}  # the flags given differ
    assert same(settings()) == same(settings("--conventions", "ours"))
    logs = []
    for name, extra in (("plain", []), ("ours", ["--conventions", "ours"])):
        assert train.main(["--model", tiny_gpt2, "--out", str(tmp_path / name), *FAST, "--replay", "subm", *extra]) == 0
        logs.append(tracking.read_metrics(tmp_path / name, timings=False))
    assert logs[0] == logs[1] and len(logs[0]) == 3  # the same numbers, to the last digit


def test_authors_settings_and_an_explicit_flag_wins():
    ours, authors = settings(), settings("--conventions", "authors")
    assert (ours.lr_logz, ours.log_z_weight_decay, ours.log_z_init, ours.log_z_dtype) == (0.1, 0.0, None, "float32")
    assert (authors.lr_logz, authors.log_z_weight_decay, authors.log_z_init, authors.log_z_dtype) == \
        (authors.lr, authors.weight_decay, 0.0, "bfloat16")  # logZ in the network's AdamW group, from 0, in bf16
    assert (authors.log_probs, authors.prefix_root, authors.replay_min_items) == ("raw", "s0", authors.batch_size)
    assert (authors.replay_valid_only, authors.subm_diversity, authors.buffer_reward) == (True, "authors", "max-prefix")
    given = settings("--conventions", "authors", "--lr-logz", "0.1", "--log-probs", "masked", "--log-z-init",
                     "estimate", "--no-replay-valid-only")
    assert (given.lr_logz, given.log_probs, given.log_z_init, given.replay_valid_only) == (0.1, "masked", None, False)
    assert given.prefix_root == "lmin" and given.log_z_dtype == "bfloat16"  # the root follows the log-probs given


def test_the_authors_per_method_settings():
    knobs = ("eta", "alpha", "beta", "rho", "k_min_start", "k_min_end")
    subm = settings("--conventions", "authors", "--loss", "raptb", "--replay", "subm", task="expr24")
    assert [getattr(subm, k) for k in knobs] == [0.1, 0.5, 3.0, 0.3, 7, 3]
    assert (subm.subm_w_val, subm.subm_len_power, subm.subm_len_bin, subm.expr24_target) == (10.0, 2.0, 2, "authors")
    rp = settings("--conventions", "authors", "--loss", "raptb", "--replay", "rp", task="expr24")
    assert [getattr(rp, k) for k in knobs] == [0.25, 0.8, 3.0, 0.5, 7, 3] and rp.buffer_reward == "prefix-sum"
    tb = settings("--conventions", "authors", "--loss", "tb", "--replay", "subm", task="expr24")
    assert (tb.subm_w_val, tb.subm_len_power, tb.anneal_span) == (1.0, 1.0, 1.0)
    assert settings("--conventions", "authors", "--loss", "tb").anneal_span == 10.0  # SMILES: 50,000 of 5,000
    assert settings("--conventions", "authors", "--loss", "raptb").anneal_span == 1.0
    for loss, replay in itertools.product(("tb", "subtb", "raptb"), ("rp", "subm")):  # ours: one setting for all
        mine = settings("--loss", loss, "--replay", replay, task="expr24")
        assert [getattr(mine, k) for k in knobs] == [0.25, 0.5, 5.0, 0.1, 5, 2] and mine.anneal_span == 1.0


@pytest.mark.parametrize("flags", [["--prefix-root", "s0"], ["--expr24-target", "authors"],
                                   ["--replay", "subm", "--buffer-reward", "prefix-sum"], ["--anneal-span", "0.5"]])
def test_bad_combinations_are_one_line(flags, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        train.get_args(["--out", str(tmp_path), *flags])
    assert e.value.code == 2 and capsys.readouterr().err.startswith("error: ")


def test_schedules_anneal_over_the_span():
    args = argparse.Namespace(steps=11, anneal_span=10.0)
    assert train.schedule_frac(args, 10) == pytest.approx(0.1)
    assert train.schedule_frac(argparse.Namespace(steps=11, anneal_span=1.0), 10) == 1.0


# ----------------------------------------------------------------------------- 1. logZ

def test_log_z_in_bf16_stalls_at_two_to_the_minus_4():
    """logZ at the network's lr 1e-4 and weight decay 0.01 from 0, under a TB gradient that always says 'up'
    (residuals near -38, as at the start on SMILES). In float32 it climbs lr per step; in bf16 a number in
    [2^-4, 2^-3) is 2^-11 from the next one, so any AdamW step below half that (2.4e-4 > 2 lr) rounds away."""
    found = {}
    for dtype in ("float32", "bfloat16"):
        args = settings("--conventions", "authors", "--log-z-dtype", dtype)
        log_z = train.make_log_z(args, "cpu")
        weight = torch.nn.Parameter(torch.zeros(3))
        optimizer = train.make_optimizer(args, [weight], [log_z])
        assert optimizer.param_groups[1]["lr"] == 1e-4 and optimizer.param_groups[1]["weight_decay"] == 0.01
        for step in range(1, 1101):
            optimizer.zero_grad()
            (log_z.float() * -76.0 + weight.sum()).backward()  # d/dlogZ of mean (logZ - 38)^2 near 0
            optimizer.step()
            found.setdefault(dtype, {})[step] = log_z.item()
    assert found["float32"][1100] == pytest.approx(1100 * 1e-4, rel=0.01)  # so at most 0.5 nats in 5000 steps
    assert found["bfloat16"][1000] == found["bfloat16"][1100] == 2 ** -4  # stalled
    assert torch.tensor(2 ** -4 + 2 * 1e-4, dtype=torch.bfloat16).item() == 2 ** -4


# ----------------------------------------------------------------------------- 2. raw log-probs

@pytest.fixture(scope="module")
def authors_policy(tmp_path_factory):
    """A random character model over the authors' Expr24 alphabet (digits 1-9) under the grammar mask, with a
    differently initialised frozen reference."""
    task = Expr24AuthorsTask()
    paths = [modellib.build_scratch_model(str(tmp_path_factory.mktemp(f"a{s}")), sorted(task.charset), n_layer=1,
                                          n_embd=16, n_head=2, seed=s) for s in (0, 1)]
    net, tokenizer = modellib.load_model(paths[0])
    allowed = rewards.allowed_token_ids(tokenizer, task.charset, max_chars=1)
    policy = modellib.Policy(net, tokenizer, allowed, 3, 9, reference=modellib.frozen_copy(
        modellib.load_model(paths[1])[0]), state_mask=task.state_mask)
    return task, policy


def encode(policy, texts):
    ids = {text: i for i, text in policy.token_texts.items()}
    tokens = torch.full((len(texts), policy.max_len), policy.eos)
    for b, text in enumerate(texts):
        tokens[b, :len(text)] = torch.tensor([ids[c] for c in text])
    return tokens, torch.tensor([len(t) for t in texts])


def test_raw_log_probs_are_a_full_vocabulary_log_softmax(authors_policy):
    task, policy = authors_policy
    torch.manual_seed(0)
    tokens, lengths, _ = policy.sample(32)
    tokens[0, :9], lengths[0] = encode(policy, ["3*8+2-1-1"])[0][0], 9  # a row that reaches L_max
    for reference, net in ((False, policy.model), (True, policy.reference)):
        log_pf, log_pterm = policy.log_probs(tokens, lengths, reference=reference, raw=True)
        with torch.no_grad():
            ids = torch.cat([policy.prompt.expand(len(tokens), -1), tokens], 1)
            logp = torch.log_softmax(net(input_ids=ids).logits.float(), -1)[:, len(policy.prompt) - 1:]
        for b, tau in enumerate(lengths.tolist()):
            for k in range(tau + 1):
                assert log_pterm[b, k].item() == pytest.approx(logp[b, k, policy.eos].item(), abs=1e-5)
                if k < tau:
                    assert log_pf[b, k].item() == pytest.approx(logp[b, k, tokens[b, k]].item(), abs=1e-5)
        assert -30 < log_pterm[0, 9] < 0  # the forced stop keeps its raw log-prob (masked: log 1 = 0)
    masked = policy.log_probs(tokens, lengths)[1]
    args = argparse.Namespace(log_probs="raw", prefix_root="lmin")
    ours_root = batches.loss_log_probs(args, policy, tokens, lengths)[1]  # raw values, our states
    assert torch.equal(ours_root.isneginf(), masked.isneginf()) and masked[0, 9] == 0


# ----------------------------------------------------------------------------- 3. the s_0 root

@pytest.mark.parametrize("seed", [0, 1])
def test_s0_root_matches_a_loop_over_every_state(seed):
    """The authors' RapTB and SubTB: every state k <= tau, rooted at s_0, whatever L_min (raw log-probs are finite
    at states whose stop the mask forbids). The loop references of test_losses with nothing excluded."""
    log_pf, log_pterm, log_r, u, lengths, log_z = make_batch(seed=seed)  # finite everywhere up to tau
    inputs = (log_pf, log_pterm, log_r, log_z)
    for k_min in (1, 3):
        loss = raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z, k_min=k_min, min_len=3, root="s0")[0]
        assert_same(loss, ref_raptb(log_pf, log_pterm, log_r, u, lengths, log_z, k_min=k_min, min_len=0), inputs)
        ours = raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z, k_min=k_min, min_len=3)[0]
        assert not torch.isclose(ours, loss)
    for lam in (1.0, 0.9):
        loss = subtb_loss(log_pf, log_pterm, log_r, lengths, lam=lam, min_len=3, root="s0")[0]
        assert_same(loss, ref_subtb(log_pf, log_pterm, log_r, lengths, lam=lam, min_len=0), inputs[:3])


# ----------------------------------------------------------------------------- 4. the authors' Expr24

def test_authors_solution_set_by_enumeration():
    """Digits 1-9: counted here in float64 (values are fractions with denominators <= 9^4, so |x - 24| < 1e-9
    is exact) against the task's exact rational enumeration."""
    counts = {}
    for n in range(1, 6):
        digits = np.array(list(itertools.product(range(1, 10), repeat=n)), dtype=np.float64)
        for ops in itertools.product(EXPR24_OPS, repeat=n - 1):
            total, term = np.zeros(len(digits)), digits[:, 0].copy()
            for op, d in zip(ops, digits[:, 1:].T):
                if op in "+-":
                    total, term = total + term, (d if op == "+" else -d)
                else:
                    term = term * d if op == "*" else term / d
            counts[2 * n - 1] = counts.get(2 * n - 1, 0) + int(np.sum(np.abs(total + term - 24) < 1e-9))
    solutions = Expr24AuthorsTask().solutions(3, 9)
    assert dict(Counter(map(len, solutions))) == {k: v for k, v in counts.items() if v} == \
        {3: 4, 5: 82, 7: 2520, 9: 72839}
    assert len(solutions) == 75445 and not any("0" in s for s in solutions)


def test_authors_reward_gives_a_full_length_solution_lambda_exactly(authors_policy):
    task, policy = authors_policy
    texts = ["3*8+2-1-1", "3*8", "1+2*3", "1+1+1+1+1", "3*8+2-1"]  # ... and a 7-character non-solution
    tokens, lengths = encode(policy, texts)
    args = argparse.Namespace(kappa=1.0, lam=50.0, max_len=9, log_probs="masked")
    log_r, u, _, final, log_ref, scores = batches.score_rows(args, task, policy, tokens, lengths)
    at = lambda x: x.gather(1, lengths[:, None]).squeeze(1)  # noqa: E731
    assert at(log_r)[0].item() == 50.0  # exactly lambda: the reference's log-prob cancels
    assert at(log_r)[1].item() == pytest.approx(50.0 + at(log_ref)[1].item(), abs=1e-4)  # shorter: lam + log P_ref
    assert at(log_r)[2:].tolist() == pytest.approx(at(log_ref)[2:].tolist(), abs=1e-5)  # non-solutions: log P_ref
    # the prefix 3*8 of the full-length solution: log P_ref(3*8 T) - log P_ref(x T) + lam, as in the authors' code
    assert log_r[0, 3].item() == pytest.approx((log_ref[0, 3] - log_ref[0, 9] + 50).item(), abs=1e-4)
    assert u[0, 3].item() == pytest.approx((50 - log_ref[0, 9]).item(), abs=1e-4) and u[3].abs().max() == 0
    objects = task.object_log_reward(at(log_ref).double().numpy(), final.numpy(), lengths.numpy(), 1.0, 50.0, 9)
    assert objects.tolist() == pytest.approx(at(log_r).tolist(), abs=1e-4) and objects[0] == 50.0


def grammar_strings(digits, max_numbers):
    out = []
    for n in range(1, max_numbers + 1):
        for ds in itertools.product(digits, repeat=n):
            for ops in itertools.product(EXPR24_OPS, repeat=n - 1):
                out.append("".join(d + o for d, o in zip(ds, ops + ("",))))
    return out


def test_exact_meter_under_the_authors_target_equals_brute_force(tmp_path):
    """Expr24 with at most 3 numbers (L_max = 5), every object enumerated: Z = sum of the authors' R."""
    task = Expr24AuthorsTask()
    task.max_numbers = 3
    paths = [modellib.build_scratch_model(str(tmp_path / f"m{s}"), sorted(task.charset), n_layer=1, n_embd=16,
                                          n_head=2, seed=s) for s in (0, 1)]
    net, tokenizer = modellib.load_model(paths[0])
    allowed = rewards.allowed_token_ids(tokenizer, task.charset, task.max_token_chars)
    policy = modellib.Policy(net, tokenizer, allowed, 1, 5, reference=modellib.frozen_copy(
        modellib.load_model(paths[1])[0]), state_mask=task.state_mask)
    lam, strings = 50.0, grammar_strings("123456789", 3)
    log_q = fidelity.solution_log_probs(policy, strings)
    log_ref = fidelity.solution_log_probs(policy, strings, reference=True)
    assert np.logaddexp.reduce(log_q) == pytest.approx(0, abs=1e-4)  # the whole object space
    score = np.array([task.score(s) for s in strings])
    full = np.array([len(s) == 5 for s in strings])
    log_r = np.where(score == 1, np.where(full, lam, lam + log_ref), log_ref)  # the authors' R, by cases
    log_z = float(np.logaddexp.reduce(log_r))
    log_p = log_r - log_z
    p, q = np.exp(log_p), np.exp(log_q)
    f = fidelity.measure(policy, task, kappa=1.0, lam=lam, n=2000)
    assert f["exact"] and f["log_z_estimate"] == pytest.approx(log_z, rel=1e-6)
    assert f["log_z_estimate"] > fidelity.exact_log_z(lam, log_ref[score == 1])[0] + 1  # not our Z
    assert f["tv_target"] == pytest.approx(0.5 * np.abs(p - q).sum(), abs=1e-5)
    assert f["kl_target_q"] == pytest.approx(float(np.sum(p * (log_p - log_q))), abs=1e-4)
    assert f["missed_mass"] == pytest.approx(float(p[log_q < log_p - math.log(10)].sum()), abs=1e-6)
    assert f["kl_q_target"] == pytest.approx(float(np.sum(q * (log_q - log_p))), abs=0.1)
    between = fidelity.measure(policy, task, kappa=1.0, lam=lam, n=200, exact=False)
    assert between["log_z_estimate"] == pytest.approx(log_z, rel=1e-9)


def test_norm_cov_both_ways():
    samples = [dict(generated=g, score=1.0, valid=True, tokens=list(g), length=len(g)) for g in "aabbcdde"]
    mean, counts = blockwise_coverage(samples, [True] * 8, block=3, repeats=3)  # aab bcd (de: not a full block)
    assert counts == [2, 3] and mean == pytest.approx(5 / 6)
    assert blockwise_coverage(samples, [True] * 8, block=9) == (None, [])
    m = expr24_metrics([dict(generated="3*8", score=1.0, valid=True, tokens=[1, 2, 3], length=3)] * 5, ["3*8", "8*3"])
    assert m["norm_cov"] == m["norm_cov_at_3200"] == 0.5 and m["norm_cov_authors"] is None


# ----------------------------------------------------------------------------- 5. the authors' buffers

def test_only_correct_expressions_enter_the_authors_expr24_buffer(authors_policy):
    task, policy = authors_policy
    args = settings("--conventions", "authors", "--loss", "raptb", "--replay", "subm", "--buffer-size", "3",
                    task="expr24")
    buffer = train.build_buffer(args, task)
    assert (buffer.w_val, buffer.len_bin_size, buffer.bin_weights, buffer.len_power, buffer.diversity) == \
        (10.0, 2, "authors", 2.0, "authors") and buffer.valid_only
    texts = ["3*8", "1+2*3", "4*6", "1+1+1+1+1", "6*4+1-1", "2*2*6", "9-1-2"]  # four solutions
    tokens, lengths = encode(policy, texts)
    sargs = argparse.Namespace(kappa=1.0, lam=50.0, max_len=9, log_probs="raw")
    log_r, _, texts_, final, log_ref, scores = batches.score_rows(sargs, task, policy, tokens, lengths)
    items = batches.to_items(task, tokens, lengths, texts_, final, log_ref, scores)
    assert all(it.valid for it in items)  # our validity: every sample of the grammar is a valid expression
    kept = batches.buffer_items(args, items, scores, log_r, lengths)
    assert [it.valid for it in kept] == [s == 1.0 for s in final.tolist()]  # theirs: valid = correct
    buffer.add(kept)
    assert len(buffer) == 3 and all(task.score(it.text) == 1.0 for it in buffer.items)
    # RP and PRT rank by the sum of log R over the proper prefixes k < tau (their heap key)
    rp = settings("--conventions", "authors", "--loss", "tb", "--replay", "rp", task="expr24")
    ranked = batches.buffer_items(rp, items, scores, log_r, lengths)
    assert ranked[0].score == pytest.approx(log_r[0, :3].sum().item(), rel=1e-6) and ranked[0].valid
    assert ranked[1].score == pytest.approx(log_r[1, :5].sum().item(), rel=1e-6) and not ranked[1].valid


def test_the_authors_smiles_item_reward_is_the_best_prefix_score():
    args = settings("--conventions", "authors", "--replay", "subm")
    item = Item(tokens=(1, 2, 3), text="x", key="x", score=0.4, valid=True, length=3)
    scores = torch.tensor([[0.0, 0.7, 0.0, 0.4, 0.9]], dtype=torch.float64)  # past tau: ignored
    (kept,) = batches.buffer_items(args, [item], scores, torch.zeros(1, 5), torch.tensor([3]))
    assert kept.score == 0.7 and kept.valid
    (bad,) = batches.buffer_items(args, [Item((1,), "y", "y", 0.0, True, 1)], scores, torch.zeros(1, 5),
                                      torch.tensor([1]))
    assert not bad.valid  # scored 0: invalid to the authors' buffer, whatever the task says


def test_replay_waits_for_a_batch_of_items(tiny_gpt2, tmp_path):
    from distributed import replay_ready
    args = settings("--conventions", "authors", "--batch-size", "4")
    buffer = train.build_buffer(args, SmilesTask())
    buffer.items = [Item((1,), "C", str(i), 0.5, True, 1) for i in range(3)]
    assert not replay_ready(args, buffer)
    buffer.items.append(Item((1,), "C", "3", 0.5, True, 1))
    assert replay_ready(args, buffer) and replay_ready(settings(), buffer)


# ----------------------------------------------------------------------------- end to end

def test_authors_run_end_to_end(tiny_gpt2, tmp_path):
    out = tmp_path / "authors"
    assert train.main(["--model", tiny_gpt2, "--out", str(out), *FAST, "--conventions", "authors",
                       "--loss", "raptb", "--replay", "prt"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows) and abs(rows[-1]["log_z"]) < 0.01  # from 0, at 1e-4
    state = torch.load(os.path.join(checkpoint.find_checkpoint(str(out)), "state.pt"), weights_only=True)
    assert state["log_z"].dtype == torch.bfloat16 and state["args"]["prefix_root"] == "s0"


def test_authors_run_resumes_bit_identically(tiny_llama, tmp_path, ctrl_c_after_step):
    """The bf16 logZ and its AdamW state go through a checkpoint unchanged (test_train's kill-and-resume check)."""
    import test_train
    test_train.test_kill_and_resume_is_bit_identical(tiny_llama, tmp_path, ctrl_c_after_step,
                                                     ["--replay", "subm", "--conventions", "authors"])


def test_reproduce_runs_the_grid_in_either_regime(tmp_path):
    from research import reproduce
    ours = reproduce.get_args(["--out", str(tmp_path)])
    authors = reproduce.get_args(["--out", str(tmp_path), "--conventions", "authors"])
    assert reproduce.method_table(ours)["TB"] == ("tb", "rp") and reproduce.method_table(authors)["TB"] == ("tb", "prt")
    assert reproduce.method_table(authors)["RapTB"] == ("raptb", "rp") and ours.n == 3200
    assert reproduce.get_args(["--task", "expr24", "--conventions", "authors"]).n == 3 * 6400
    command = reproduce.train_command(authors, reproduce.run_settings(authors, "tb", "prt", 0), str(tmp_path))
    assert command[command.index("--conventions") + 1] == "authors" and "--conventions" not in reproduce.train_command(
        ours, reproduce.run_settings(ours, "tb", "rp", 0), str(tmp_path))
    assert "conventions" not in reproduce.run_settings(ours, "tb", "rp", 0)  # earlier run folders still match
