"""The Game of 24 (METHOD.md §11.3-10.4): the counts by an independent enumeration, the splits, the state mask, the
shipped reference, the exact per-prompt meter, the defaults, training with a logZ head or the seen logZ (kill and
resume exact) and sample.py per prompt, also over two processes."""
import csv
import itertools
import json
import os
import statistics

import numpy as np
import pytest
import torch

import batches
import fidelity
import losses
import sample
import tracking
import checkpoint
import train
from tasks.game24 import task as game24
from test_distributed import free_port, start_ranks

DIGITS = "123456789"
FAST = ["--task", "game24", "--steps", "4", "--batch-size", "8", "--samples-per-prompt", "4", "--eval-every", "0"]


def python_solutions():
    """Every condition's solutions, evaluated by Python itself: each of the 64 operator patterns becomes one
    expression over arrays of all 6,561 digit orders, so Python's parser gives the precedence and numpy the float
    value. Exact: a value has a denominator dividing 9^3, so a value other than 24 is at least 1/729 away."""
    orders = np.array(list(itertools.product(range(1, 10), repeat=4)), dtype=np.float64).T
    found = {"".join(c): set() for c in itertools.combinations_with_replacement(DIGITS, 4)}
    for ops in itertools.product("+-*/", repeat=3):
        value = eval("a {} b {} c {} d".format(*ops), {}, dict(zip("abcd", orders)))  # noqa: S307 (our own text)
        for row in np.flatnonzero(np.abs(value - 24) < 1e-9):
            d = [str(int(x)) for x in orders[:, row]]
            found["".join(sorted(d))].add(d[0] + ops[0] + d[1] + ops[1] + d[2] + ops[2] + d[3])
    return found


def test_the_counts_of_the_game_of_24():
    found = python_solutions()
    counts = [len(s) for s in found.values() if s]
    assert len(found) == 495 and len(counts) == 195 and sum(counts) == 2520
    assert (min(counts), max(counts), statistics.median(counts)) == (1, 54, 12)
    sizes = [len(game24.game24_objects(c)) for c in found]
    assert max(sizes) == 1536 and sum(sizes) == 64 * 9 ** 4  # every digit order once, times 4^3 operator patterns
    task = game24.Game24Task()
    for c, solutions in found.items():
        assert set(task.given(c + ":").solutions()) == solutions
    for c in ["1139", "3389", "4468", "1118"]:  # the score itself, string by string (exact fractions)
        given = task.given(c + ":")
        assert [s for s in given.objects() if given.score(s) == 1] == sorted(found[c])


def test_the_splits_are_fixed_disjoint_and_stratified():
    split, again = game24.game24_split(), game24.game24_split()
    assert split == again
    assert not set(split["train"]) & set(split["heldout"]) and len(split["train"]) + len(split["heldout"]) == 495
    solvable = {c for c, s in python_solutions().items() if s}
    assert len(solvable & set(split["heldout"])) == 39 and len(set(split["heldout"]) - solvable) == 60
    assert game24.Game24Task().conditions["heldout"][0].endswith(":")


def reference():
    from tasks.game24.train_prior import game24_policy
    return game24_policy("prior_game24")


def walk(mask, actions, prefix=(), k=0):
    """Every action sequence the mask allows from `prefix`, depth first, ending with the stop (the last action)."""
    allowed = mask(torch.tensor([list(prefix)], dtype=torch.long), k)[0]
    out = [prefix] if allowed[-1] else []
    for a in torch.nonzero(allowed[:-1]).flatten().tolist():
        out += walk(mask, actions, prefix + (a,), k + 1)
    return out


@pytest.mark.parametrize("digits", ["1139", "2468", "5555"])
def test_the_state_mask_allows_exactly_the_strings_of_the_condition(digits):
    policy, task = reference()
    given = task.given(digits + ":")
    texts = policy.action_texts
    strings = ["".join(texts[a] for a in seq) for seq in walk(policy._mask(digits + ":"), texts)]
    assert sorted(strings) == list(given.objects()) and all(given.is_valid(s) for s in strings)
    rows = ["1139:", "2468:", "5555:", "1139:"]
    prev = torch.tensor([[texts.index(c) for c in "5+5"]] * 4)
    together = task.rows_mask(texts, rows)(prev, 3)
    alone = torch.cat([policy._mask(r)(prev[:1], 3) for r in rows])
    assert torch.equal(together, alone)


def test_the_shipped_reference_is_a_distribution_close_to_uniform_per_prompt():
    policy, task = reference()
    policy.model.eval()
    with torch.no_grad():
        for prompt in ["1139:", "3389:", "4679:", "9999:"]:
            objects = task.given(prompt).objects()
            log_p = fidelity.solution_log_probs(policy.view([prompt]), objects)
            assert abs(np.exp(log_p).sum() - 1) < 1e-5  # the listed strings hold all of P_ref's mass
            assert np.mean(-np.log(len(objects)) - log_p) < 0.12  # KL(uniform || P_ref), nats
    metrics = json.load(open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "game24", "prior", "metrics.json")))
    assert metrics["uniform_distance"]["kl_u_ref"]["mean"] < 0.05


def test_the_exact_meter_on_a_small_listing():
    rng = np.random.default_rng(0)
    log_ref = np.log(rng.dirichlet(np.ones(6)))
    scores = np.array([1, 0, 0, 1, 0, 0])
    log_r = log_ref + 4 * scores
    log_p = log_r - np.log(np.exp(log_r).sum())
    at_target = fidelity.enumerated_fidelity(log_p, log_ref, scores, 1.0, 4.0)
    assert abs(at_target["tv_target"]) < 1e-12 and abs(at_target["kl_q_target"]) < 1e-12
    assert abs(at_target["q_solution_mass"] - np.exp(log_p[[0, 3]]).sum()) < 1e-12
    q = rng.dirichlet(np.ones(6))
    f = fidelity.enumerated_fidelity(np.log(q), log_ref, scores, 1.0, 4.0)
    p = np.exp(log_p)
    assert abs(f["tv_target"] - 0.5 * sum(abs(a - b) for a, b in zip(q, p))) < 1e-12
    assert abs(f["kl_q_target"] - sum(a * np.log(a / b) for a, b in zip(q, p))) < 1e-12
    assert abs(f["kl_target_q"] - sum(b * np.log(b / a) for a, b in zip(q, p))) < 1e-12
    assert abs(f["log_z_exact"] - np.log(np.exp(log_r).sum())) < 1e-12


def test_final_scores_score_each_row_with_its_conditions_task():
    """final_scores scores the rows of each condition in one call: the scores each row's own task gives it alone."""
    policy, task = reference()
    conds = ["1146:", "2468:", "1146:", "3389:", "2468:", "1146:"] * 4
    torch.manual_seed(0)
    tokens, lengths, _ = policy.sample(conds)
    for i in (0, 1):  # a solution in some rows, to tell the conditions' scores apart
        text = task.given(conds[i]).solutions()[0]
        tokens[i, :len(text)] = policy.actions[[policy.action_texts.index(ch) for ch in text]]
        lengths[i] = len(text)
    texts, final = batches.final_scores(task, policy, tokens, lengths, conds)
    assert texts == policy.texts(tokens, lengths)
    alone = [task.given(c).score_batch([x])[0] for c, x in zip(conds, texts)]
    assert final.tolist() == alone and alone[:2] == [1.0, 1.0] and sum(alone) < len(alone)
    assert task.given(conds[1]).score_batch([texts[0]])[0] == 0  # 1146's solution does not solve 2468


def test_raptb_is_tb_here():
    """No proper prefix can stop, so RapTB's dense term is empty: the same value and gradient as TB."""
    policy, task = reference()
    policy.policy.reference = __import__("model").frozen_copy(policy.model)
    conds = ["1139:"] * 3 + ["3389:"] * 3
    tokens, lengths, _ = policy.sample(conds)
    log_pf, log_pterm = policy.log_probs(tokens, lengths, conds)
    log_r, u = batches.score_rows(argparse_like(), task, policy, tokens, lengths, None, conds)[:2]
    log_z = torch.tensor([1.0] * 3 + [30.0] * 3, requires_grad=True)
    rap = losses.raptb_loss(log_pf, log_pterm, log_r, u, lengths, log_z, k_min=2, min_len=7)[0]
    tb = losses.tb_loss(log_pf, log_pterm, log_r, lengths, log_z)[0]
    assert torch.equal(rap, tb)
    params = [log_z] + list(policy.model.parameters())[:3]
    for a, b in zip(torch.autograd.grad(rap, params, retain_graph=True), torch.autograd.grad(tb, params)):
        assert torch.equal(a, b)


def argparse_like():
    return train.get_args(["--task", "game24"])


def read_log(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_the_defaults_are_the_measured_objective_settings_and_the_authors_keep_theirs():
    """The Game of 24's defaults (task.py, RESULTS.md): logZ from the solutions drawn, the rows of prompts without
    one weighing 16, residuals bounded at 4 nats, a buffer of solutions only; --conventions authors learns logZ(c)
    with squares and --log-z head without the anchor; a flag given wins over all."""
    settings = lambda *flags: (lambda a: (a.log_z_mode, a.anchor, a.huber, a.replay_valid_only, a.buffer_validity))(
        train.get_args(["--task", "game24", "--out", "/tmp/unused", *flags]))
    assert settings() == ("seen", 16.0, 4.0, True, "score")
    assert settings("--conventions", "authors") == ("head", 1.0, 0.0, True, "score")  # their SubM: valid items only
    assert settings("--log-z", "head", "--no-replay-valid-only") == ("head", 1.0, 4.0, False, "score")  # no anchor
    assert settings("--anchor", "4", "--huber", "0") == ("seen", 4.0, 0.0, True, "score")
    other = train.get_args(["--task", "smiles", "--out", "/tmp/unused"])
    assert (other.anchor, other.huber) == (1.0, 0.0)  # other tasks: no weights, squares


def test_raptb_with_subm_and_tb_with_rp_are_one_run_here(tmp_path):
    """RESULTS.md ("the Game of 24 at 18,000 steps"): no proper prefix can stop, so RapTB is TB, and a buffer of 64
    holds every solution of any prompt (at most 54), so SubM, which only chooses when its ground set overflows,
    keeps what RP keeps. The two runs write the same record but for RapTB's own diagnostics."""
    assert max(map(len, game24.game24_solutions().values())) < game24.Game24Task.defaults["buffer_size"]
    records = []
    for loss, replay in (("raptb", "subm"), ("tb", "rp")):
        out = tmp_path / loss
        # every sample enters the buffer here, so that 6 small steps replay (fewer than 64 per prompt all the same)
        assert train.main([*FAST, "--steps", "6", "--no-replay-valid-only", "--loss", loss, "--replay", replay,
                           "--out", str(out)]) == 0
        records.append([{k: v for k, v in r.items() if k not in tracking.TIMINGS} for r in read_log(out)])
    raptb, tb = records
    assert any(r.get("replay") == 1.0 for r in tb)
    assert [{k: r[k] for k in t} for r, t in zip(raptb, tb)] == tb


def test_anchor_trains_and_sets_each_rows_weight(tmp_path, monkeypatch):
    """--anchor 16: the loss sees weight 16 on the rows of prompts with no solution drawn, 1 on the others."""
    seen_weights, real = [], losses.compute_loss
    monkeypatch.setattr(losses, "compute_loss", lambda *a, **k: seen_weights.append(k["row_weight"]) or real(*a, **k))
    assert train.main([*FAST, "--anchor", "16", "--replay", "oracle", "--out", str(tmp_path / "run")]) == 0
    weights = torch.cat(seen_weights)
    assert set(weights.tolist()) == {1.0, 16.0}  # replayed exact samples: solutions, so both kinds of prompt


@pytest.mark.parametrize("log_z", ["head", "seen"])
def test_a_game24_run_resumes_bit_identically(tmp_path, ctrl_c_after_step, log_z):
    args = [*FAST, "--log-z", log_z, "--eval-every", "2", "--eval-prompts", "1",
            *(["--replay", "oracle"] if log_z == "seen" else [])]  # replayed exact samples: solutions to count
    assert train.main([*args, "--out", str(tmp_path / "straight")]) == 0
    disarm = ctrl_c_after_step(2)
    assert train.main([*args, "--out", str(tmp_path / "killed")]) == 130
    disarm()
    assert train.main(["--resume", "--out", str(tmp_path / "killed"), "--steps", "4"]) == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in tracking.TIMINGS} for r in rows]
    straight, killed = strip(read_log(tmp_path / "straight")), strip(read_log(tmp_path / "killed"))
    assert straight == killed and "heldout_tv_target" in straight[-1] and "train_kl_q_target" in straight[0]
    a, b = (torch.load(os.path.join(checkpoint.find_checkpoint(str(tmp_path / d)), "state.pt"), weights_only=True)
            for d in ("straight", "killed"))
    if log_z == "head":
        assert set(a["log_z"]) == {"linear.weight", "linear.bias"}
        assert all(torch.equal(a["log_z"][k], b["log_z"][k]) for k in a["log_z"])
        assert a["log_z"]["linear.weight"].abs().sum() > 0  # the head did learn
    else:  # the objects with R > P_ref drawn so far, and their sums
        assert a["log_z"]["_extra_state"] == b["log_z"]["_extra_state"] and a["log_z"]["_extra_state"]["found"]
    assert straight[-1]["log_z"] != 0


def test_a_tampered_seen_log_z_is_one_line(tmp_path, capsys):
    """--log-z seen keeps its objects in state.pt as plain lists: any other structure is refused with one line."""
    out = tmp_path / "run"
    assert train.main([*FAST, "--steps", "1", "--log-z", "seen", "--out", str(out)]) == 0
    path = os.path.join(checkpoint.find_checkpoint(str(out)), "state.pt")
    state = torch.load(path, weights_only=True)
    state["log_z"]["_extra_state"] = {"found": 5}
    torch.save(state, path)
    capsys.readouterr()
    assert sample.main([str(out), "--split", "train", "--n", "2", "--out", str(tmp_path / "s.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: corrupt checkpoint: its --log-z seen state is not what train.py writes"


def test_sample_py_per_prompt(tmp_path):
    assert train.main([*FAST, "--steps", "1", "--out", str(tmp_path / "run")]) == 0
    prompts = tmp_path / "p.txt"
    prompts.write_text("1139:\n1138:\n")
    out = tmp_path / "s.csv"
    assert sample.main([str(tmp_path / "run"), "--prompts", str(prompts), "--n", "6", "--out", str(out)]) == 0
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and [r["prompt"] for r in rows] == ["1139:"] * 6 + ["1138:"] * 6
    assert all(game24.Game24Task().given(r["prompt"]).is_valid(r["generated"]) for r in rows)
    metrics = json.load(open(tmp_path / "s_metrics.json"))
    per = {c["prompt"]: c for c in metrics["conditions"]}
    assert per["1138:"]["n_solutions"] > 0 and per["1139:"]["n_solutions"] == 0
    assert metrics["prompts_n_conditions"] == 2 and "prompts_kl_q_target" in metrics
    assert per["1138:"]["fidelity_log_z_learned"] is not None and per["1139:"]["fidelity_q_mass"] == pytest.approx(1, 1e-5)


def sample_on_ranks(rank, world, run, out, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    code = sample.main([run, "--split", "heldout", "--n", "3", "--out", out, "--fidelity-n", "0"])
    assert code == 0
    if world > 1:
        torch.distributed.destroy_process_group()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")
def test_two_processes_share_the_prompts_and_write_what_one_writes(tmp_path):
    assert train.main([*FAST, "--steps", "1", "--out", str(tmp_path / "run")]) == 0
    start_ranks(sample_on_ranks, 2, 2, str(tmp_path / "run"), str(tmp_path / "two.csv"), free_port())
    start_ranks(sample_on_ranks, 1, 1, str(tmp_path / "run"), str(tmp_path / "one.csv"), free_port())
    assert open(tmp_path / "two.csv").read() == open(tmp_path / "one.csv").read()
    assert len(open(tmp_path / "one.csv").read().splitlines()) == 1 + 99 * 3


@pytest.mark.parametrize("flags, message", [(["--log-z", "scalar"], "its own Z(c)"),
                                            (["--samples-per-prompt", "3"], "must divide"),
                                            (["--log-z", "batch", "--samples-per-prompt", "1"], ">= 2")])
def test_bad_conditional_flags_are_one_line(tmp_path, capsys, flags, message):
    assert train.main([*FAST, "--out", str(tmp_path), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and message in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("loss", ["rloo", "grpo"])
def test_rl_baselines_run_on_the_game24_with_a_group_per_prompt(tmp_path, loss):
    assert train.main([*FAST, "--loss", loss, "--out", str(tmp_path)]) == 0
    assert [r["step"] for r in read_log(tmp_path)] == [1, 2, 3, 4]
    assert train.main([*FAST, "--loss", "dpg", "--out", str(tmp_path / "dpg")]) == 2  # one Z: not per prompt



def test_the_authors_conventions_apply_to_each_rows_condition(tmp_path, capsys):
    """--conventions authors on a conditional task: raw log-probs and the s_0 root reach the loss through each row's
    prompt (the same values as the row alone), and a run trains with them and a bf16 logZ head."""
    args = train.get_args([*FAST, "--conventions", "authors", "--out", str(tmp_path / "run")])
    assert (args.log_probs, args.prefix_root, args.log_z_dtype) == ("raw", "s0", "bfloat16")
    policy, task = reference()
    conds = ["1139:"] * 2 + ["3389:"] * 2
    tokens, lengths, _ = policy.sample(conds)
    log_pf, log_pterm = batches.loss_log_probs(args, policy, tokens, lengths, conds)
    masked = policy.log_probs(tokens, lengths, conds)
    assert not torch.equal(log_pterm, masked[1])  # raw: the stop keeps its own log-prob where the mask forces it
    for i, c in enumerate(conds):
        alone = policy.view([c]).log_probs(tokens[i:i + 1], lengths[i:i + 1], raw=True)
        assert torch.allclose(log_pf[i:i + 1], alone[0], atol=1e-6) and torch.allclose(log_pterm[i:i + 1], alone[1], atol=1e-6)
    assert train.main([*FAST, "--conventions", "authors", "--out", str(tmp_path / "run")]) == 0
    assert "log_probs=raw" in capsys.readouterr().out
