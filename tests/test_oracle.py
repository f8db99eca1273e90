"""The oracle (--loss oracle, oracle.py): its exact gradient flow reaches p*, its sampler draws exactly from p*
(Expr24 with L_max 5, the Game of 24 per prompt), it trains end to end, and a task it cannot serve is one line."""
import functools
import itertools
import json
import math

import numpy as np
import pytest
import torch

import conditions
import fidelity
import model as modellib
import oracle
import rewards
import train
from losses import compute_loss
from test_fixed_points import SparseTree


# ----------------------------------------------------------------------------- the loss

def test_exact_flow_reaches_the_target():
    """Full-batch cross-entropy -sum_x p*(x) log q(x) on an enumerable tree: from P_ref it reaches p*, and p* itself
    is a stationary point (the gradient there is q - p* per state, weighted by the flow)."""
    torch.manual_seed(0)
    tree = SparseTree()
    logits = tree.ref_logits.clone().requires_grad_()
    opt = torch.optim.Adam([logits], lr=0.3)
    assert tree.tv(logits) > 0.5
    for _ in range(500):
        loss, _ = compute_loss("oracle", *tree.batch(logits), tree.log_r, tree.u, tree.lengths, torch.zeros(()),
                               exact_p=tree.target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert tree.tv(logits) < 0.01
    at_target = tree.target_logits().requires_grad_()
    loss, _ = compute_loss("oracle", *tree.batch(at_target), tree.log_r, tree.u, tree.lengths, torch.zeros(()),
                           exact_p=tree.target)
    loss.backward()
    assert at_target.grad.abs().max() < 1e-8


def test_loss_is_minus_the_mean_sequence_log_likelihood():
    """log q(x) = the actions' log-probs plus the stop's at tau; whatever stands past a row's end is never read."""
    log_pf = torch.tensor([[-1.0, -2.0, float("nan"), float("inf")], [-0.5, -0.25, -0.125, 7.0]], requires_grad=True)
    log_pterm = torch.tensor([[-9.0, float("-inf"), -3.0, float("nan")], [-9.0, -9.0, -9.0, -4.0]])
    loss, stats = compute_loss("oracle", log_pf, log_pterm, torch.full((2, 4), float("nan")), None,
                               torch.tensor([2, 3]), torch.zeros(()))
    assert loss.item() == pytest.approx(((1 + 2 + 3) + (0.875 + 4)) / 2)
    loss.backward()
    assert torch.isfinite(log_pf.grad).all() and log_pf.grad[0, 2:].eq(0).all() and log_pf.grad[1, 3] == 0


# ----------------------------------------------------------------------------- the exact samplers

def chi_square_in_random_bins(picks, p, n_bins=20, seed=0):
    """Pearson's statistic of the draws' counts against p over n_bins random groups of objects (n_bins - 1 dof):
    random groups, not groups of similar p, so that drawing the wrong object of a similar probability shows too."""
    groups = np.random.default_rng(seed).integers(n_bins, size=len(p))
    observed = np.bincount(groups[picks], minlength=n_bins)
    expected = len(picks) * np.bincount(groups, weights=p, minlength=n_bins)
    return float(((observed - expected) ** 2 / expected).sum())


CHI2_19_DOF_AT_1E4 = 48.0  # P(chi-square with 19 dof > 48) is about 2e-4


@pytest.fixture(scope="module")
def expr24_policy(tmp_path_factory):
    """A warm-started scratch reference of Expr24 with L_max 5 (3 or 5 characters: 15,600 expressions) and its
    policy, a frozen copy, as train.py builds them."""
    path = str(tmp_path_factory.mktemp("expr24"))
    task = rewards.load_task("expr24")
    texts = task.random_objects(2000, np.random.default_rng(0), 3, 5)
    modellib.build_scratch_model(path, sorted(task.charset), warmup_texts=texts, warmup_steps=100, seed=0)
    net, tokenizer = modellib.load_model(path)
    allowed = rewards.allowed_token_ids(tokenizer, task.charset, max_chars=1)
    return modellib.Policy(net, tokenizer, allowed, 3, 5, reference=modellib.frozen_copy(net),
                           state_mask=task.state_mask)


def every_expression(max_numbers=3):
    """Every expression the grammar mask allows with 3 or 5 characters (no 0 after '/')."""
    steps = [op + d for op in "+-*/" for d in "0123456789" if op + d != "/0"]
    out = [d + s for d in "0123456789" for s in steps]
    return out + [x + s for x in out for s in steps]


def test_expr24_sampler_draws_exactly_from_the_target(expr24_policy):
    """lam = 3 puts a visible share of p* on the non-solutions too, so both branches of the sampler are measured:
    the share of solutions against p*(Sol) (binomial, 5 sigma), and every expression's frequency against p* (the
    whole space of 15,600, enumerated and teacher-forced here) by a chi-square."""
    policy, task, lam, n = expr24_policy, rewards.load_task("expr24"), 3.0, 40000
    args = type("Args", (), dict(lam=lam, kappa=1.0))()
    objects = every_expression()
    assert len(objects) == 15600
    log_ref = fidelity.solution_log_probs(policy, objects, reference=True)
    assert np.exp(np.logaddexp.reduce(log_ref)) == pytest.approx(1, abs=1e-4)  # the whole space under the mask
    scores = np.array(task.score_batch(objects))
    log_p = log_ref + lam * scores
    p = np.exp(log_p - np.logaddexp.reduce(log_p))
    torch.manual_seed(0)
    tokens, lengths = oracle.sample(args, task, policy, n, np.random.default_rng(1))
    texts = policy.texts(tokens, lengths)
    index = {t: i for i, t in enumerate(objects)}
    picks = np.array([index[t] for t in texts])
    p_sol = p[scores == 1].sum()
    assert 0.05 < p_sol < 0.95
    assert abs(scores[picks].mean() - p_sol) < 5 * math.sqrt(p_sol * (1 - p_sol) / n)
    assert chi_square_in_random_bins(picks, p) < CHI2_19_DOF_AT_1E4
    assert chi_square_in_random_bins(picks, p, seed=1) < CHI2_19_DOF_AT_1E4


def test_expr24_sampler_at_the_default_lambda_draws_solutions(expr24_policy):
    """lam = 50: p*(Sol) is 1 to within e^-50 / P_ref(Sol), and each solution comes in proportion to P_ref."""
    policy, task, n = expr24_policy, rewards.load_task("expr24"), 20000
    args = type("Args", (), dict(lam=50.0, kappa=1.0))()
    tokens, lengths = oracle.sample(args, task, policy, n, np.random.default_rng(2))
    solutions = task.solutions(3, 5)
    index = {t: i for i, t in enumerate(solutions)}
    picks = np.array([index[t] for t in policy.texts(tokens, lengths)])  # a KeyError would be a non-solution
    log_ref = fidelity.reference_solution_log_probs(policy, solutions)
    p = np.exp(log_ref - np.logaddexp.reduce(log_ref))
    assert chi_square_in_random_bins(picks, p) < CHI2_19_DOF_AT_1E4


def test_game24_sampler_draws_exactly_from_each_prompts_target():
    """Two prompts in one batch: each row's draw is p*(.|c) of its own prompt (every string of the prompt listed and
    teacher-forced: P_ref(x|c) e^{lam S} / Z(c))."""
    args = train.get_args(["--task", "game24", "--loss", "oracle", "--lam", "2"])
    task = train.build_task(args)
    torch.manual_seed(args.seed)
    policy = train.build_policy(args, task)
    task, policy, _, _ = conditions.build(args, task, policy)
    chosen, n = ["1139:", "2468:"], 20000
    rows = [c for c in chosen for _ in range(n)]
    tokens, lengths = oracle.sample_conditions(args, task, policy, rows, np.random.default_rng(3))
    texts = policy.texts(tokens, lengths)
    for j, c in enumerate(chosen):
        given = task.given(c)
        objects = given.objects()
        log_ref = fidelity.solution_log_probs(policy.view([c]), objects, reference=True)
        log_p = log_ref + args.lam * np.array(given.score_batch(objects))
        p = np.exp(log_p - np.logaddexp.reduce(log_p))
        index = {t: i for i, t in enumerate(objects)}
        picks = np.array([index[t] for t in texts[j * n:(j + 1) * n]])
        assert chi_square_in_random_bins(picks, p) < CHI2_19_DOF_AT_1E4


# ----------------------------------------------------------------------------- through train.py

@pytest.fixture
def quick_warm_start(monkeypatch):
    quick = functools.partial(modellib.build_scratch_model, warmup_steps=5)  # a few warm-up steps exercise the path
    monkeypatch.setattr(modellib, "build_scratch_model", quick)


def test_train_py_runs_the_oracle_on_expr24(tmp_path, quick_warm_start):
    out = tmp_path / "run"
    assert train.main(["--task", "expr24", "--loss", "oracle", "--max-len", "5", "--steps", "3", "--batch-size", "8",
                       "--eval-every", "3", "--eval-exact", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in steps)
    assert all(r["reward"] == 1.0 and r["replay"] == 0 for r in steps)  # lam 50: every draw a solution, no replay
    assert [r["step"] for r in rows if r.get("exact")] == [0, 3]  # --eval-exact: exact at the start as well
    assert not any("log_z" in r or "log_z_learned" in r for r in rows)  # the oracle has no logZ to report


def test_train_py_runs_the_oracle_on_game24(tmp_path):
    out = tmp_path / "run"
    assert train.main(["--task", "game24", "--loss", "oracle", "--steps", "2", "--batch-size", "8",
                       "--samples-per-prompt", "4", "--eval-every", "0", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    assert len(rows) == 2 and all(math.isfinite(r["loss"]) for r in rows)


def one_line_error(capsys, argv):
    with pytest.raises(SystemExit) as e:
        train.get_args(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and len(err.splitlines()) == 1, err
    return err


def test_a_task_without_its_target_enumerated_is_refused(capsys, tmp_path):
    assert "cannot enumerate" in one_line_error(capsys, ["--task", "smiles", "--loss", "oracle"])
    user = tmp_path / "mine.py"
    user.write_text("def score(texts):\n    return [float('a' in t) for t in texts]\n")
    assert "cannot enumerate" in one_line_error(capsys, ["--task", f"{user}:score", "--loss", "oracle"])
    assert "--kappa 1" in one_line_error(capsys, ["--task", "expr24", "--loss", "oracle", "--kappa", "2"])
    assert "exact samples" in one_line_error(capsys, ["--task", "expr24", "--loss", "oracle", "--replay", "subm"])
    assert "exact samples" in one_line_error(capsys, ["--task", "expr24", "--loss", "oracle", "--temp-prob", "0.5"])
    args = train.get_args(["--task", "expr24", "--loss", "oracle"])
    assert args.replay == "none" and args.temp_prob == 0
    args.fsdp = True  # (--fsdp itself needs torchrun to parse)
    assert "--fsdp" in oracle.problem(args, train.build_task(args))


def test_a_user_task_with_solutions_is_served(tmp_path):
    """A user's task class with solutions(min_len, max_len) gets the oracle (its score 1 exactly on them)."""
    user = tmp_path / "mine.py"
    user.write_text("class Mine:\n    charset = frozenset('ab')\n"
                    "    defaults = dict(model=None, min_len=1, max_len=3)\n"
                    "    def score(self, text):\n        return float(text == 'ab')\n"
                    "    def solutions(self, min_len=0, max_len=None):\n        return ('ab',)\n")
    args = train.get_args(["--task", f"{user}:Mine", "--loss", "oracle"])
    assert oracle.problem(args, train.build_task(args)) is None


def test_an_oracle_run_resumes_bit_identically(tmp_path, quick_warm_start, ctrl_c_after_step):
    """The draws come from the run's own generators, which every checkpoint saves: kill and resume repeat them."""
    import tracking
    args = ["--task", "expr24", "--loss", "oracle", "--max-len", "5", "--steps", "4", "--batch-size", "8",
            "--eval-every", "0", "--lam", "3"]  # lam 3: non-solutions too, from the reference's sampler
    assert train.main([*args, "--out", str(tmp_path / "straight")]) == 0
    undo = ctrl_c_after_step(2)
    assert train.main([*args, "--out", str(tmp_path / "killed")]) == 130
    undo()
    assert train.main(["--resume", "--out", str(tmp_path / "killed"), "--steps", "4"]) == 0
    straight, killed = (tracking.read_metrics(str(tmp_path / d), timings=False) for d in ("straight", "killed"))
    assert straight == killed and len(straight) == 4


def test_replay_oracle_puts_exact_samples_in_the_replays_place(tmp_path, quick_warm_start, capsys):
    """--replay oracle (a diagnostic): a replayed batch is drawn from p* itself, scored and trained on by the
    method's own objective; the other batches are on-policy, and no buffer is kept."""
    out = tmp_path / "run"
    assert train.main(["--task", "expr24", "--replay", "oracle", "--p-replay-start", "1", "--p-replay-end", "0",
                       "--max-len", "5", "--steps", "4", "--batch-size", "8", "--eval-every", "0", "--out", str(out)]) == 0
    steps = [json.loads(line) for line in open(out / "metrics.jsonl")]
    exact = [r for r in steps if r["replay"] == 1.0]
    assert exact and all(r["reward"] == 1.0 and r["objects_scored"] == 0 and math.isfinite(r["loss"]) for r in exact)
    assert steps[0]["replay"] == 1.0 and "log_z" in steps[0]  # p_replay starts at 1; TB keeps its logZ
    capsys.readouterr()  # the run's progress bars
    assert "cannot enumerate" in one_line_error(capsys, ["--task", "smiles", "--replay", "oracle"])
    assert "--replay oracle" in one_line_error(capsys, ["--task", "smiles", "--replay", "oracle"])


def test_reference_pass_over_the_solutions_is_made_once_for_every_view(expr24_policy, monkeypatch):
    """The reference never changes, so its pass over a solution list is kept in the cache every view of the policy
    shares (each evaluation works on a new view); another prompt is another pass, with its own log-probs."""
    policy, solutions = expr24_policy, rewards.load_task("expr24").solutions(3, 5)
    expected = fidelity.solution_log_probs(policy, solutions, reference=True)
    calls = []
    real = fidelity.solution_log_probs
    monkeypatch.setattr(fidelity, "solution_log_probs", lambda *a, **k: calls.append(1) or real(*a, **k))
    policy.ref_cache.clear()
    for view in (policy, policy.with_prompts(policy.prompt, policy.task_mask), policy):
        np.testing.assert_array_equal(fidelity.reference_solution_log_probs(view, solutions), expected)
    assert len(calls) == 1
    other = policy.with_prompts(torch.tensor(policy.encode_prompt("3"), dtype=torch.long), policy.task_mask)
    assert not np.allclose(fidelity.reference_solution_log_probs(other, solutions), expected)
    assert len(calls) == 2


def test_the_masked_uniform_sampler_draws_each_expression_with_its_probability(expr24_policy):
    """--explore-from uniform: every step uniform over the actions the grammar and the length bounds allow, with no
    network pass; each draw's log-prob is that product exactly, and the draws follow it (all 15,600 expressions)."""
    policy, n = expr24_policy, 40000
    torch.manual_seed(0)
    tokens, lengths, log_u = policy.sample(n, uniform=True)

    # a digit is 1 of 10 (1 of 9 after '/'), an operator 1 of 4 at k = 1 (the stop is below L_min) and 1 of 5 with
    # the stop at k = 3, and the stop is forced at L_max = 5
    def log_uniform(text):
        p = 1.0
        for k, c in enumerate(text):
            p /= (9 if text[k - 1] == "/" else 10) if k % 2 == 0 else (4 if k == 1 else 5)
        return math.log(p * (0.2 if len(text) == 3 else 1.0))

    texts = policy.texts(tokens, lengths)
    np.testing.assert_allclose(log_u.sum(1).double().numpy(), [log_uniform(t) for t in texts], atol=1e-5)
    every = ["".join(d + o for d, o in zip(digits, ops + ("",))) for m in (2, 3)
             for digits in itertools.product("0123456789", repeat=m) for ops in itertools.product("+-*/", repeat=m - 1)]
    every = [t for t in every if "/0" not in t]
    p = np.exp([log_uniform(t) for t in every])
    assert len(every) == 15600 and abs(p.sum() - 1) < 1e-9
    index = {t: i for i, t in enumerate(every)}
    assert chi_square_in_random_bins(np.array([index[t] for t in texts]), p) < CHI2_19_DOF_AT_1E4
