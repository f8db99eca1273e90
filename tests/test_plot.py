"""plot.py: a run's curves from metrics.jsonl; train.py draws curves.png when a run ends and on Ctrl-C; bad input is
one line."""
import json

import numpy as np
import pytest

import plot
import train

PNG = b"\x89PNG\r\n\x1a\n"


def write_run(folder, rows, tail=""):
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return str(folder)


def steps(n, reward=0.5, kl_every=2):
    rows = [dict(step=0, kl_q_target=4.0, kl_q_target_ci=[3.0, 5.0])]
    for s in range(1, n + 1):
        row = dict(step=s, loss=1.0, reward=reward, validity=1.0, length=5.0, log_z=float(s), log_pstop_final=-0.5)
        if s % kl_every == 0:
            row.update(kl_q_target=4.0 / s, kl_q_target_ci=[2.0 / s, 6.0 / s])
        rows.append(row)
    return rows


def test_moving_average_by_hand():
    assert plot.moving_average([1, 2, 3, 4], 2).tolist() == [1.0, 1.5, 2.5, 3.5]
    assert plot.moving_average([5.0], 3).tolist() == [5.0]


def test_curves_average_runs_and_band_one_run(tmp_path):
    one = plot.read_run(write_run(tmp_path / "a", steps(4, reward=0.2)))
    other = plot.read_run(write_run(tmp_path / "b", steps(6, reward=0.6)))
    at, mean = plot._step_curve([one, other], "reward")
    assert at == [1, 2, 3, 4] and mean == pytest.approx([0.4] * 4)  # over the steps both runs have
    kl_at, kl, band = plot._kl_points([one])
    assert kl_at == [0, 2, 4] and kl == [4.0, 2.0, 1.0] and band == [(0, [3.0, 5.0]), (2, [1.0, 3.0]), (4, [0.5, 1.5])]
    assert plot._kl_points([one, other])[2] == []  # several seeds: their mean, no one run's interval


def test_a_half_written_last_line_is_skipped_and_a_bad_one_is_an_error(tmp_path):
    rows = plot.read_run(write_run(tmp_path / "killed", steps(2), tail='{"step": 3, "lo'))
    assert [r["step"] for r in rows] == [0, 1, 2]
    (tmp_path / "killed" / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(plot.PlotError, match="not one JSON object per line"):
        plot.read_run(str(tmp_path / "killed"))


def test_overlay_writes_a_png(tmp_path, capsys):
    a, b = write_run(tmp_path / "a", steps(30)), write_run(tmp_path / "b", steps(30, reward=0.7, kl_every=10**6))
    assert plot.main([a, b, "--out", str(tmp_path / "ab.png")]) == 0
    assert (tmp_path / "ab.png").read_bytes().startswith(PNG) and "wrote" in capsys.readouterr().out
    assert plot.main([a]) == 0 and (tmp_path / "a" / "curves.png").read_bytes().startswith(PNG)


@pytest.mark.parametrize("case, message", [("missing", "is not a folder"), ("empty", "has no metrics.jsonl"),
                                           ("out", "--out")])
def test_bad_input_is_one_line(tmp_path, capsys, case, message):
    (tmp_path / "empty").mkdir()
    run = write_run(tmp_path / "ok", steps(3))
    argv = {"missing": [str(tmp_path / "nope")], "empty": [run, str(tmp_path / "empty")],
            "out": [run, "--out", str(tmp_path / "no" / "such" / "dir.png")]}[case]
    with pytest.raises(SystemExit) as e:
        plot.main(argv)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and err.startswith("error:") and message in err and len(err.splitlines()) == 1


@pytest.mark.curves
def test_train_draws_curves_at_the_end_and_on_ctrl_c(tiny_gpt2, tmp_path, ctrl_c_after_step):
    out = tmp_path / "run"
    argv = ["--model", tiny_gpt2, "--out", str(out), "--steps", "3", "--batch-size", "4", "--grad-accum", "1",
            "--max-len", "4", "--min-len", "1", "--k-min-start", "2", "--k-min-end", "1", "--eval-every", "2",
            "--eval-n", "8"]
    disarm = ctrl_c_after_step(2)
    assert train.main(argv) == 130
    first = (out / "curves.png").read_bytes()
    assert first.startswith(PNG)
    disarm()
    assert train.main(["--resume", "--out", str(out), "--steps", "3"]) == 0
    assert (out / "curves.png").read_bytes().startswith(PNG) and (out / "curves.png").read_bytes() != first
    assert np.isfinite([r["kl_q_target"] for r in plot.read_run(str(out)) if "kl_q_target" in r]).all()
