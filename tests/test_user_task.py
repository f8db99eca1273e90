"""A user's own task without forking (METHOD.md §6.3): README's example trains, bad score functions are one line."""
import json
import os
import re

import pytest

import rewards
import sample
import train

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository
FAST = ["--steps", "3", "--batch-size", "6", "--grad-accum", "1", "--max-len", "5", "--min-len", "1",
        "--k-min-start", "2", "--k-min-end", "1", "--eval-every", "0"]


def readme_example():
    """The Python block and the train.py command of README's "Your own task in 20 lines"."""
    text = open(os.path.join(HERE, "README.md")).read()
    section = text[text.index("## Your own task in 20 lines"):]
    section = section[:section.index("\n## ", 1)]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    command = next(line for line in re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()
                   if line.startswith("python train.py"))
    return code, command


def write(path, code):
    path.write_text(code)
    return str(path)


def error_of(capsys, code):
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_readme_example_trains_and_samples(tiny_gpt2, tmp_path, monkeypatch, capsys):
    code, command = readme_example()
    monkeypatch.chdir(tmp_path)  # the README runs from the folder holding the user's file
    name = re.search(r"--task (\S+?)\.py:", command).group(1)
    write(tmp_path / f"{name}.py", code)
    spec = re.search(r"--task (\S+)", command).group(1)
    args = command.split()[2:]  # after "python train.py", with the model and budget cut down for a test
    args = [a for i, a in enumerate(args) if a not in ("--out", "--steps") and args[i - 1] not in ("--out", "--steps")]
    assert train.main([*args, "--model", tiny_gpt2, "--out", str(tmp_path / "run"), *FAST]) == 0
    assert sample.main([str(tmp_path / "run"), "--n", "20", "--fidelity-n", "16"]) == 2  # the task's code: only when
    assert "pass --task" in capsys.readouterr().err  # the user names it again, never from the checkpoint alone
    assert sample.main([str(tmp_path / "run"), "--task", spec, "--n", "20", "--fidelity-n", "16"]) == 0
    metrics = json.load(open(tmp_path / "run" / "samples_metrics.json"))
    assert metrics["n"] == 20 and "uniqueness" in metrics and "kl_q_target" in metrics
    assert "fp_div" not in metrics  # chemistry metrics only where the task is chemical


def test_a_task_class_with_a_state_mask(tiny_gpt2, tmp_path, capsys):
    code = '''
import torch
from rewards import Task

class OnlyC(Task):
    """Strings of C; the mask allows nothing else, so every sample is one."""
    defaults = dict(model=None, min_len=1, max_len=4)
    charset = frozenset("C")
    def score(self, text):
        return len(text) / 4
    def state_mask(self, action_texts):
        row = torch.tensor([t in ("C", "") for t in action_texts])
        return lambda prev, k: row.expand(len(prev), -1)
'''
    path = write(tmp_path / "only_c.py", code)
    task = rewards.load_task(f"{path}:OnlyC")
    assert task.name == f"{path}:OnlyC" and task.canonical("CC") == "CC" and task.is_valid("CC")
    assert train.main(["--task", f"{path}:OnlyC", "--model", tiny_gpt2, "--out", str(tmp_path / "run"),
                       *FAST, "--max-len", "4"]) == 0
    assert sample.main([str(tmp_path / "run"), "--task", f"{path}:OnlyC", "--n", "30", "--fidelity-n", "0"]) == 0
    rows = open(tmp_path / "run" / "samples.csv").read().splitlines()[1:]
    assert rows and all(set(r.split(",")[0]) == {"C"} for r in rows)


def test_a_module_on_the_path(tiny_gpt2, tmp_path, monkeypatch):
    write(tmp_path / "my_scores.py", "def score(texts):\n    return [min(1.0, len(t) / 5) for t in texts]\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    task = rewards.load_task("my_scores:score")
    assert task.score_batch(["ab", "abcdefg"]) == [0.4, 1.0]


@pytest.mark.parametrize("body, message", [
    ("raise RuntimeError('boom')", "raised RuntimeError"),
    ("return [float('nan')] * len(texts)", "must be numbers in [0, 1]"),
    ("return [2.0] * len(texts)", "must be numbers in [0, 1]"),
    ("return [0.5]", "values for"),
    ("return ['high'] * len(texts)", "not a number"),
    ("return ['0.5'] * len(texts)", "returned '0.5' (str) for"),  # a number's text is still not a number
    ("return 'hello'", "returned 'hello' (str) for"),  # not 5 values of which the first is 'h'
    ("return None", "returned None (NoneType) for"),  # not "raised TypeError"
    ("return 0.5", "returned 0.5 (float) for"),
    ("import sys; sys.exit(3)", "called sys.exit(3) on texts such as"),
    ("import time; time.sleep(3)", "did not return within 0.2 s on"),  # the limit: --score-timeout 0.2
])
def test_a_misbehaving_score_function_is_one_line(tiny_gpt2, tmp_path, capsys, body, message):
    path = write(tmp_path / "bad.py", f"def score(texts):\n    {body}\n")
    out = tmp_path / "run"
    err = error_of(capsys, train.main(["--task", f"{path}:score", "--model", tiny_gpt2, "--out", str(out), *FAST,
                                       "--score-timeout", "0.2"]))
    assert message in err and f"{path}:score" in err
    assert not os.path.exists(out / "latest") and not os.path.exists(out / "metrics.jsonl")  # nothing half-written


@pytest.mark.parametrize("spec, message", [
    ("nonsense", "unknown task"), ("no_such_module_xyz:score", "cannot import"),
    ("{tmp}/missing.py:score", "no file"), ("{tmp}/ok.py:nothing", "no attribute"), ("{tmp}/ok.py:VALUE", "neither"),
])
def test_a_bad_task_name_is_one_line(tmp_path, capsys, spec, message):
    write(tmp_path / "ok.py", "VALUE = 3\ndef score(texts):\n    return [0.0] * len(texts)\n")
    assert message in error_of(capsys, train.main(["--task", spec.format(tmp=tmp_path), "--out", str(tmp_path / "o")]))


def test_a_score_function_that_takes_prompts_has_the_same_time_limit(tiny_gpt2, tmp_path, capsys):
    path = write(tmp_path / "slow.py", "import time\ndef score(texts, prompts):\n    time.sleep(3)\n")
    (tmp_path / "train.txt").write_text("C\nO\n")
    err = error_of(capsys, train.main(["--task", f"{path}:score", "--model", tiny_gpt2, "--charset", "CON",
                                       "--prompts", str(tmp_path / "train.txt"), "--samples-per-prompt", "2",
                                       "--out", str(tmp_path / "run"), *FAST, "--batch-size", "4",
                                       "--score-timeout", "0.2"]))
    assert "did not return within 0.2 s" in err and f"{path}:score" in err


@pytest.mark.parametrize("body, message", [
    ("return 'hello'", "returned 'hello' (str) for"),
    ("return [1.5] * len(texts)", "must be numbers in [0, 1]"),
    ("import time; time.sleep(3)", "did not return within 0.2 s on"),
])
def test_a_task_class_is_checked_like_a_score_function(tiny_gpt2, tmp_path, capsys, body, message):
    path = write(tmp_path / "cls.py", f"from rewards import Task\nclass Bad(Task):\n    def score_batch(self, texts):\n"
                                      f"        {body}\n")
    err = error_of(capsys, train.main(["--task", f"{path}:Bad", "--model", tiny_gpt2, "--out", str(tmp_path / "run"),
                                       *FAST, "--score-timeout", "0.2"]))
    assert message in err and f"task {path}:Bad" in err
