"""research/reproduce.py: the statistics and the table on synthetic metrics, then a tiny grid end to end."""
import json
import math

import numpy as np
import pytest

from research import reproduce


def test_t_quantiles_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 60):
        assert reproduce.t_quantile(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1e-5)


def test_mean_ci_by_hand_for_three_seeds():
    # 0.5, 0.7, 0.9: mean 0.7, sd sqrt((0.04 + 0 + 0.04) / 2) = 0.2; t_{0.975,2} = 4.3027 (any t table)
    s = reproduce.mean_ci([0.5, 0.7, 0.9])
    assert s["n"] == 3 and s["mean"] == pytest.approx(0.7) and s["sd"] == pytest.approx(0.2)
    assert s["ci"] == pytest.approx(4.3027 * 0.2 / math.sqrt(3), abs=1e-4)  # 0.4968
    missing = reproduce.mean_ci([1.0, None, 3.0])  # an undefined metric (None) drops that seed only
    assert missing["n"] == 2 and missing["mean"] == 2.0 and missing["ci"] == pytest.approx(12.7062, abs=1e-4)
    assert reproduce.mean_ci([0.3])["ci"] is None and reproduce.mean_ci([0.3])["mean"] == 0.3
    assert reproduce.mean_ci([None, None]) == dict(mean=None, sd=None, ci=None, n=0)


@pytest.mark.parametrize("n", [2, 3, 5])
def test_ci_covers_the_true_mean_95_percent_of_the_time(n):
    rng = np.random.default_rng(n)
    draws = rng.normal(1.0, 2.0, size=(4000, n))
    cover = [abs(reproduce.mean_ci(row)["mean"] - 1.0) <= reproduce.mean_ci(row)["ci"] for row in draws.tolist()]
    assert np.mean(cover) == pytest.approx(0.95, abs=0.015)  # a normal quantile (1.96) would give ~0.70 .. 0.88


def synthetic():
    tb = [dict(acc=0.5, score=0.1, len_mean=3.0, flag=True, len_hist={"3": 2}, log_pstop_final=-0.1),
          dict(acc=0.7, score=0.2, len_mean=3.0, flag=False, len_hist={"3": 2}, log_pstop_final=-0.3),
          dict(acc=0.9, score=None, len_mean=3.0, flag=True, len_hist={"3": 2}, log_pstop_final=-0.2)]
    return {"TB": tb, "TB+SubM": [dict(acc=1.0, score=0.5)]}


def test_aggregate_keeps_numbers_only():
    agg = reproduce.aggregate(synthetic())
    assert set(agg["TB"]) == {"acc", "score", "len_mean", "log_pstop_final"}  # no bools, no dicts
    assert agg["TB"]["score"]["n"] == 2 and agg["TB"]["len_mean"]["ci"] == 0.0
    assert agg["TB+SubM"]["acc"] == dict(mean=1.0, sd=None, ci=None, n=1)


def test_table_has_our_rows_and_the_papers():
    table = reproduce.format_table(reproduce.aggregate(synthetic()), "smiles")
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    assert header[:6] == ["Method", "Acc", "Score", "TokEnt", "FPDiv", "Len"]
    cells = {r.split("|")[1].strip(): [c.strip() for c in r.strip("|").split("|")[1:]] for r in rows[1:]}
    # score: one seed has None, so n = 2 and the CI is 12.706 * sd(0.1, 0.2) / sqrt(2); the cell says so
    assert cells["TB"][:2] == ["0.700 ± 0.497", "0.150 ± 0.635 (n=2)"]
    assert cells["TB"][2] == "—"  # tok_ent missing
    assert cells["*TB (paper)*"][:5] == ["0.998", "0.717", "2.50", "0.807", "3.06"]
    assert cells["TB+SubM"][0] == "1.000" and set(cells["*TB+SubM (paper)*"]) == {"—"}
    expr = reproduce.format_table(reproduce.aggregate(synthetic()), "expr24")
    assert "paper" not in expr and "NormCov" in expr


def test_final_log_pstop():
    log = [dict(log_pstop_final=float(i)) for i in range(20)]
    assert reproduce.final_log_pstop(log) == 18.5  # the last 10%: steps 19 and 20
    assert reproduce.final_log_pstop(log[:3]) == 2.0


def test_resumes_an_interrupted_run(tmp_path):
    args = reproduce.get_args(["--out", str(tmp_path), "--steps", "7"])
    settings = reproduce.run_settings(args, "tb", "rp", 1)
    fresh = reproduce.train_command(args, settings, str(tmp_path))
    assert "--resume" not in fresh and fresh[fresh.index("--loss") + 1] == "tb"
    (tmp_path / "latest").write_text("ckpt-000004\n")
    resumed = reproduce.train_command(args, settings, str(tmp_path))
    assert resumed[0] == "--resume" and resumed[resumed.index("--steps") + 1] == "7"
    assert not reproduce.trained(str(tmp_path), 7) and reproduce.trained(str(tmp_path), 4)


def test_tiny_grid_end_to_end(tiny_gpt2, tmp_path, capsys):
    """The grid's children are real interpreters (research/reproduce.py's own subprocess calls): a forkserver that
    pre-imported torch saved 13 s here, but under load it sometimes lost a child's exit status (reported as 255)."""
    out = tmp_path / "results"
    argv = ["--model", tiny_gpt2, "--methods", "TB,RapTB", "--seeds", "1", "--steps", "2", "--n", "24",
            "--batch-size", "6", "--grad-accum", "1", "--jobs", "2", "--device", "cpu", "--out", str(out),
            "--train-args", "--max-len 5 --min-len 1 --k-min-start 3 --k-min-end 1"]
    assert reproduce.main(argv) == 0
    table = (out / "table.md").read_text()
    assert "| TB |" in table and "| RapTB |" in table and "| *RapTB (paper)* | 0.996" in table
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["methods"]) == {"TB", "RapTB"}
    tb = summary["methods"]["TB"]
    assert tb["loss"] == "tb" and tb["replay"] == "rp" and tb["paper"]["acc"] == 0.998
    assert len(tb["seeds"]) == 1 and tb["seeds"][0]["n"] == 24 and tb["aggregate"]["acc"]["n"] == 1
    with open(out / "runs" / "TB-s0" / "metrics.jsonl") as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows] == [0, 1, 2] and all("kl_q_target" in r for r in rows)  # step 0: the start
    assert "KL(q‖p*)" in table and "logZ est." in table and "Reward calls" in table
    fresh = sum(6 for r in rows if r.get("replay") == 0.0)  # replayed batches are not rescored
    assert fresh > 0 and tb["seeds"][0]["reward_calls"] == fresh and tb["seeds"][0]["train_cpu_s"] > 0
    assert all((out / name).stat().st_size > 0 for name in ("lengths.png", "depth.png", "curves.png"))

    # a second call finds everything done and only aggregates; other settings in the same folder are refused
    before = (out / "runs" / "TB-s0" / "run.json").read_text()
    capsys.readouterr()
    assert reproduce.main(argv) == 0
    assert "2 already done" in capsys.readouterr().out
    assert (out / "runs" / "TB-s0" / "run.json").read_text() == before
    assert reproduce.main([*argv[:-2], "--steps", "3", *argv[-2:]]) == 2


def test_the_rl_baselines_are_methods_by_name(tmp_path):
    """RLOO, GRPO, DPG and GRPO-TRL (METHOD.md §9) run when named, through train.py's own parser, and the default
    grid stays the GFlowNet one."""
    import train
    assert reproduce.get_args(["--out", str(tmp_path)]).methods == list(reproduce.METHODS["smiles"])
    args = reproduce.get_args(["--out", str(tmp_path), "--methods", "RLOO,GRPO,DPG,GRPO-TRL", "--task", "expr24"])
    for method in args.methods:
        loss, replay = reproduce.methods_of("expr24")[method]
        settings = reproduce.run_settings(args, loss, replay, 0, reproduce.METHOD_ARGS.get(method, ""))
        parsed = train.get_args(reproduce.train_command(args, settings, str(tmp_path / method)))
        assert (parsed.loss, parsed.replay, parsed.temp_prob) == (loss, "none", 0.0)
        assert parsed.grpo_beta == pytest.approx(0.04 if method == "GRPO-TRL" else 1 / 50)
    assert "method_args" not in reproduce.run_settings(args, "tb", "rp", 0)  # older run folders still match


def test_oracle_efficiency_reads_a_grid_against_its_oracle(tmp_path, capsys):
    """research.oracle_efficiency: (KL_ref - KL) / (KL_ref - KL_oracle) at the same step, the collapsed seeds
    (ending above the reference), the distinct solutions by length, the first step at half the oracle's reduction."""
    from research import oracle_efficiency

    def run(name, kls, samples=()):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"done": True}))
        rows = [{"step": s, "loss": 1.0, "cpu_seconds": 2.0} for s in range(1, 3001)]
        rows += [dict(step=s, kl_target_q=k, kl_q_target=2 * k, tv_target=0.5, q_solution_mass=0.1)
                 for s, k in zip((0, 1000, 2000, 3000), kls)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        (d / "samples.csv").write_text("generated,score,length\n" + "".join(f"{t},{s},{len(t)}\n" for t, s in samples))
    run("Oracle-s0", (5.0, 4.0, 3.0, 1.0))
    run("TB-s0", (5.0, 4.5, 3.5, 3.0), [("3*8", 1.0), ("8*3", 1.0), ("8*3", 1.0), ("1+1", 0.0), ("4*3*2", 1.0)])
    run("TB-s1", (5.0, 6.0, 7.0, 9.0))
    oracle_efficiency.main([str(tmp_path)])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| TB |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and cells[7] == "1/2"  # two seeds, one ended above the reference's 5.0
    assert cells[6].startswith("-0.25 ± ")  # efficiencies (5 - 3) / 4 = 0.5 and (5 - 9) / 4 = -1
    assert cells[8] == "3: 1, 5: 0"  # means over the seeds (2 and 0 of 3 characters, 1 and 0 of 5), to the unit
    assert cells[9] == "1/2: 3000 (6000 s)"  # half of the oracle's 4-nat reduction: KL <= 3, first at step 3000


def test_oracle_efficiency_reads_one_condition_measured_either_way(tmp_path, capsys):
    """--split train: a run measured per condition (train_ keys, Expr24 under --log-z seen) against an oracle measured
    as a whole (no prefix), the same one condition; q(Sol) over the runs that report it."""
    from research import oracle_efficiency

    def run(name, kls, prefix):
        d = tmp_path / "runs" / name
        d.mkdir(parents=True)
        (d / "run.json").write_text(json.dumps({"done": True}))
        rows = [{"step": s, "loss": 1.0, "cpu_seconds": 1.0} for s in range(1, 3)]
        rows += [{"step": s, prefix + "kl_target_q": k, prefix + "kl_q_target": k, prefix + "tv_target": 0.5}
                 for s, k in zip((0, 2), kls)]
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    run("Oracle-s0", (5.0, 1.0), "")
    run("TB-s0", (5.0, 2.0), "train_")
    oracle_efficiency.main([str(tmp_path), "--split", "train"])
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| TB |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "—" and cells[6] == "0.75"  # no q(Sol) reported; (5 - 2) / (5 - 1)
