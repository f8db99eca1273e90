"""
Documentation checks (fast: no model is loaded, nothing is trained or sampled).

- every *.py and *.md file of the repository cites only markdown files that exist, and nothing outside
  the repository (the method notes are METHOD.md);
- every "METHOD.md §N" cited anywhere is a numbered section of METHOD.md;
- every `python X.py ...` line in the bash blocks of README.md and RESULTS.md is accepted by X.py's argument
  parser, and README.md stays a user's document of at most 20 KB (the measurements live in RESULTS.md).
"""
import argparse
import importlib
import importlib.util
import os
import re
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "out", "runs", ".benchmarks"}

# built from pieces so that this file does not trip its own check
DOT_MD = ".m" + "d"
FORBIDDEN = ("S" + "PEC" + DOT_MD, "S" + "PEC §", "../" + "shared")
BARE = re.compile(r"\bS" + r"PEC\b")  # "the S-P-E-C", "S-P-E-C's C_k": the same missing document by another name
MD_NAME = re.compile(r"(?<![\w/.\-])([A-Za-z0-9_][A-Za-z0-9_/.\-]*\.md)(?![\w])")
URL = re.compile(r"[a-z][a-z0-9+.\-]*://\S+", re.IGNORECASE)
METHOD_CITE = re.compile(r"METHOD\.md,?\s*§\s*(\d+(?:\.\d+)*)")
HEADING = re.compile(r"^#{1,6}\s+§?\s*(\d+(?:\.\d+)*)\.?\s")


def repo_files(exts=(".py", ".md")):
    """Tracked and untracked-but-not-ignored files (git), else a walk that skips build and run folders."""
    try:
        out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout.decode()
        paths = [p for p in out.split("\0") if p]
    except (OSError, subprocess.SubprocessError):
        paths = []
        for folder, dirs, files in os.walk(ROOT):
            dirs[:] = [d for d in dirs if d not in SKIP_DIRS]
            paths += [os.path.relpath(os.path.join(folder, f), ROOT) for f in files]
    keep = []
    for p in sorted(set(paths)):
        parts = p.split("/")
        if p.endswith(exts) and not SKIP_DIRS & set(parts[:-1]) and os.path.isfile(os.path.join(ROOT, p)):
            keep.append(p)
    return keep


def read_lines(rel):
    with open(os.path.join(ROOT, rel), encoding="utf-8", errors="replace") as f:
        return f.read().splitlines()


def md_exists(name, citing, basenames):
    """A cited markdown path exists relative to the repository root or to the citing file's folder. A name
    whose file exists elsewhere in the repository also passes: that is a file a script writes (research/reproduce.py's
    OUT/table.md, shipped as results/table.md), not a citation of something missing."""
    bases = [ROOT, os.path.join(ROOT, os.path.dirname(citing))]
    return (any(os.path.isfile(os.path.normpath(os.path.join(base, name))) for base in bases)
            or os.path.basename(name) in basenames)


def test_no_citation_of_missing_files():
    offenders, files = [], repo_files()
    basenames = {os.path.basename(f) for f in files if f.endswith(".md")}
    for rel in files:
        for n, line in enumerate(read_lines(rel), 1):
            for bad in FORBIDDEN:
                if bad in line:
                    offenders.append(f"{rel}:{n}: mentions {bad!r}: {line.strip()[:120]}")
            if BARE.search(line) and not any(bad in line for bad in FORBIDDEN):
                offenders.append(f"{rel}:{n}: mentions {BARE.search(line).group()!r}: {line.strip()[:120]}")
            for name in MD_NAME.findall(URL.sub(" ", line)):  # a URL is not a file of this repository
                if not md_exists(name, rel, basenames):
                    offenders.append(f"{rel}:{n}: cites {name!r}, which is not in the repository: "
                                     f"{line.strip()[:120]}")
    assert not offenders, (f"{len(offenders)} citation(s) of files outside the repository "
                           f"(the method notes are METHOD.md):\n" + "\n".join(offenders))


def method_sections():
    path = os.path.join(ROOT, "METHOD.md")
    assert os.path.isfile(path), "METHOD.md is missing"
    return [m.group(1) for m in map(HEADING.match, read_lines("METHOD.md")) if m]


def test_method_sections_cited_exist():
    sections = method_sections()
    top = [int(s) for s in sections if "." not in s]
    assert top == list(range(1, len(top) + 1)), f"METHOD.md's top-level sections are not 1..N in order: {top}"
    missing = []
    for rel in repo_files():
        for n, line in enumerate(read_lines(rel), 1):
            for number in METHOD_CITE.findall(line):
                if number not in sections:
                    missing.append(f"{rel}:{n}: METHOD.md §{number}: {line.strip()[:120]}")
    # METHOD.md's references to its own sections (§N, §N.M, §1-§5)
    for n, line in enumerate(read_lines("METHOD.md"), 1):
        if HEADING.match(line):
            continue
        for number in re.findall(r"§\s*(\d+(?:\.\d+)*)", line):
            if number not in sections:
                missing.append(f"METHOD.md:{n}: §{number}: {line.strip()[:120]}")
    assert not missing, f"cited sections that METHOD.md does not have (it has {sections}):\n" + "\n".join(missing)


# ----------------------------------------------------------------------------- the commands of the documents

DOCS_WITH_COMMANDS = ("README.md", "RESULTS.md")
README_MAX_BYTES = 20_000  # nanoGPT's README is 13.9 KB: a user's document, read in minutes
ENV_PREFIX = re.compile(r"^(?:[A-Z_][A-Z0-9_]*=\S*\s+)+")  # OMP_NUM_THREADS=1 python ...


def doc_commands(doc):
    """(line number, command) for every `python X.py ...` line of the document's bash blocks, backslash
    continuations joined, environment assignments in front dropped; torchrun / pip / pytest lines are skipped."""
    commands, in_bash, pending, start = [], False, "", 0
    for n, line in enumerate(read_lines(doc), 1):
        stripped = line.strip()
        if stripped.startswith("```"):
            in_bash = not in_bash and stripped[3:].strip() in ("bash", "sh", "shell", "console")
            continue
        if not in_bash:
            continue
        if not pending:
            start = n
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        command, pending = ENV_PREFIX.sub("", (pending + stripped).strip()), ""
        if command.startswith(("torchrun", "pip", "pytest")):
            continue
        if re.match(r"python3?\s+(\S+\.py|-m\s+\w+)(\s|$)", command):
            commands.append((start, command))
    return commands


class _Parsed(Exception):
    """Raised in place of running a script once its argument parser has accepted the arguments."""


def parse_only(fn, argv):
    """Call fn(argv) with every ArgumentParser.parse_args stopping right after a successful parse, so a
    script's main() parses its arguments and runs nothing."""
    original = argparse.ArgumentParser.parse_args

    def parse_and_stop(self, args=None, namespace=None):
        raise _Parsed(original(self, args, namespace))

    argparse.ArgumentParser.parse_args = parse_and_stop
    try:
        fn(argv)
    except _Parsed:
        return
    finally:
        argparse.ArgumentParser.parse_args = original
    raise AssertionError("returned without ever parsing its arguments")


def import_script(script):
    """The module a command runs: `X.py` at the root, `folder/X.py` (a recipe beside what it makes) by its path,
    `-m package` as its __main__."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    if not script.endswith(".py"):
        is_package = os.path.isfile(os.path.join(ROOT, script, "__main__.py"))
        return importlib.import_module(f"{script}.__main__" if is_package else script)
    if "/" not in script:
        return importlib.import_module(script[:-3])
    name = "doc_" + re.sub(r"\W", "_", script[:-3])
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, script))
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_parses(script, argv):
    """None if `script` accepts `argv`, else why not. get_args / parse_args are called as they are (their
    own checks included); a script with only main(argv) is checked by its argparse call alone."""
    if script.endswith(".py") and not os.path.isfile(os.path.join(ROOT, script)):
        return f"{script} is not a script of the repository"
    try:
        module = import_script(script)
    except Exception as e:
        return f"cannot import {script} to find its parser: {type(e).__name__}: {e}"
    sections = getattr(module, "SECTIONS", None)  # bench: positional section names, no argparse
    if isinstance(sections, dict) and not any(hasattr(module, f) for f in ("get_args", "parse_args", "make_parser")):
        unknown = [a for a in argv if a not in sections]
        return f"unknown section(s) {unknown}; {script} has {list(sections)}" if unknown else None
    if callable(getattr(module, "get_args", None)):
        call = module.get_args
    elif callable(getattr(module, "parse_args", None)):
        call = module.parse_args
    elif callable(getattr(module, "make_parser", None)):
        call = lambda a: module.make_parser().parse_args(a)  # noqa: E731
    elif callable(getattr(module, "main", None)):
        call = lambda a: parse_only(module.main, a)  # noqa: E731
    else:
        return f"{script} has no importable parser (get_args, parse_args, make_parser or main(argv))"
    try:
        call(argv)
    except SystemExit as e:
        if e.code not in (0, None):
            return f"the parser rejected the arguments (exit code {e.code})"
    except AssertionError as e:
        return f"{script}: {e}"
    except Exception as e:  # validation beyond parsing (a file that must exist, ...): parsing itself succeeded
        print(f"note: {script} {' '.join(argv)}: {type(e).__name__}: {e}")
    return None


@pytest.mark.parametrize("doc", DOCS_WITH_COMMANDS)
def test_doc_commands_parse(doc, capsys, tmp_path, monkeypatch):
    commands = doc_commands(doc)
    assert commands, f"{doc} has no `python X.py` line in a bash block"
    readme = open(os.path.join(ROOT, "README.md")).read()
    for name, code in re.findall(r"```python\n# (\w+\.py):.*?\n(.*?)```", readme, re.S):
        (tmp_path / name).write_text(code)  # README's own example files, e.g. the task of "Your own task"
    monkeypatch.chdir(tmp_path)
    failures = []
    for n, command in commands:
        tokens = shlex.split(command, comments=True)
        script, argv = (tokens[2], tokens[3:]) if tokens[1] == "-m" else (tokens[1], tokens[2:])
        reason = check_parses(script, argv)
        if reason:
            failures.append(f"{doc}:{n}: {command}\n    -> {reason}")
    stderr = capsys.readouterr().err  # argparse's own message for a rejected command
    assert not failures, f"{doc} commands that do not parse:\n" + "\n".join(failures) + (
        f"\nparser output:\n{stderr}" if stderr else "")


def test_readme_is_a_users_document():
    size = os.path.getsize(os.path.join(ROOT, "README.md"))
    assert size <= README_MAX_BYTES, (f"README.md is {size} bytes, over {README_MAX_BYTES}: measurements go to "
                                      f"RESULTS.md (newest first, each table with its command), not README")
    readme = open(os.path.join(ROOT, "README.md")).read()
    assert "(RESULTS.md)" in readme, "README's results summary links to RESULTS.md"


def test_every_train_flag_has_a_help_line_with_its_real_default():
    """train.py --help: every flag explains itself, and none reads "(default: None)" where a value exists (a flag
    whose value depends on the task or the loss states it, with the built-in tasks' own)."""
    if ROOT not in sys.path:
        sys.path.insert(0, ROOT)
    import train
    parser = train.make_parser()
    assert not [a.option_strings for a in parser._actions if not a.help]
    text = parser.format_help()
    assert "default: None" not in text and "(default 5000; expr24" in " ".join(text.split())
