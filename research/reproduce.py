"""
Reproduce Table 1 of the paper (METHOD.md §7) at small scale: train TB, SubTB, RapTB, TB+SubM and RapTB+SubM on the
SMILES scaffold task with the embedded prior, several seeds each, sample every run with sample.py, aggregate.

    python -m research.reproduce --quick            # a few minutes: the whole grid with a tiny budget (results/quick/)
    python -m research.reproduce                    # the default budget (results/)
    python -m research.reproduce --task expr24      # Expr24: {TB, SubTB, RapTB} x {RP, SubM} replay
    python -m research.reproduce --methods RLOO,GRPO,DPG,GRPO-TRL   # the RL baselines on the same target (METHOD.md §9)
    python -m research.reproduce --conventions authors --out results/authors   # the same grid in the authors' regime
    python -m research.reproduce --task game24 --train-args "--log-z batch"   # the Game of 24, exact per prompt (METHOD.md §11)

Every method runs train.py with the same defaults (the paper's) and the same --steps / --batch-size /
--grad-accum / --train-args: nothing is tuned per method (GRPO-TRL is GRPO at TRL's usual beta by definition). Runs live in OUT/runs/<method>-s<seed>/; rerunning the
same command skips finished runs and resumes interrupted ones. Writes OUT/table.md (also printed),
OUT/summary.json and OUT/{lengths,depth,curves}.png (curves.png: plot.py's panels, mean over seeds).
"""
import argparse
import csv
import json
import math
import os
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor, as_completed

import numpy as np
from tqdm import tqdm

import plot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: train.py, sample.py
# method name -> (train.py --loss, --replay). RP (top-B by reward) is the paper's baseline replay.
METHODS = {
    "smiles": {"TB": ("tb", "rp"), "SubTB": ("subtb", "rp"), "RapTB": ("raptb", "rp"),
               "TB+SubM": ("tb", "subm"), "RapTB+SubM": ("raptb", "subm")},
    "expr24": {"TB": ("tb", "rp"), "SubTB": ("subtb", "rp"), "RapTB": ("raptb", "rp"),
               "TB+SubM": ("tb", "subm"), "SubTB+SubM": ("subtb", "subm"), "RapTB+SubM": ("raptb", "subm")},
    # no proper prefix of a Game of 24 string can stop, so RapTB is TB there (METHOD.md §11.3): the same runs
    "game24": {"TB": ("tb", "rp"), "RapTB": ("raptb", "rp"), "TB+SubM": ("tb", "subm"), "RapTB+SubM": ("raptb", "subm")},
}
# the RL baselines on the same target (METHOD.md §9), on either task, run only when named in --methods; GRPO-TRL is
# GRPO at the setting TRL users run (beta 0.04, std-normalised) instead of beta = kappa / lambda
BASELINES = {"RLOO": ("rloo", "none"), "GRPO": ("grpo", "none"), "DPG": ("dpg", "none"), "GRPO-TRL": ("grpo", "none"),
             "Oracle": ("oracle", "none")}  # the oracle: maximum likelihood on exact samples of p* (enumerable targets)
# train.py flags of one method, on top of --train-args
PAPER_ETA = "--eta-end 0.25 --absorb-end 1"
METHOD_ARGS = {"GRPO-TRL": "--grpo-beta 0.04", "RapTB-eta": PAPER_ETA, "RapTB-eta+SubM": PAPER_ETA}
# --conventions authors (METHOD.md §10): the authors' Table 1 runs SMILES TB with PRT replay (their
# configs/experiment/smiles/tb.yaml); their other per-method settings are train.py's (conventions.py)
AUTHORS_REPLAY = {("smiles", "TB"): "prt"}
AUTHORS_N = {"expr24": 3 * 6400}  # their protocol: 3 sampling runs of 6,400, for NormCov both ways


# RapTB with the paper's eta and absorbed targets held all run (METHOD_ARGS), run only when named: the default RapTB
# anneals both to 0 over its first half, so that its fixed point is R/Z ("unbiased")
VARIANTS = {task: {"RapTB-eta": ("raptb", "rp"), "RapTB-eta+SubM": ("raptb", "subm")} for task in ("smiles", "expr24")}


def methods_of(task):
    return {**METHODS[task], **VARIANTS.get(task, {}), **BASELINES}
# table columns: (header, metric key, digits). log_pstop_final comes from the training log, not from sample.py;
# the distance to the target (KL, TV, missed mass, log Z) from sample.py's fidelity block (METHOD.md §8).
TARGET = [("KL(q‖p*)", "kl_q_target", 2), ("TV", "tv_target", 3), ("Missed", "missed_mass", 3),
          ("logZ learned", "log_z_learned", 2), ("logZ est.", "log_z_estimate", 2)]
# the cost, from the training log: sequences sent to the task (replayed ones are not rescored) and CPU seconds
COST = [("Reward calls", "reward_calls", 0), ("CPU s", "train_cpu_s", 0)]
COLUMNS = {
    "smiles": [("Acc", "acc", 3), ("Score", "score", 3), ("TokEnt", "tok_ent", 2), ("FPDiv", "fp_div", 3),
               ("Len", "len_mean", 2), ("Uniq", "uniqueness", 3), ("IntDiv", "int_div", 3),
               ("log P(stop)", "log_pstop_final", 2), *TARGET, *COST],
    "expr24": [("Acc", "acc", 3), ("Unique-correct", "unique_correct", 1), ("NormCov", "norm_cov", 3),
               ("NormCov 3×6400", "norm_cov_authors", 3), ("TokEnt", "tok_ent", 2), ("Len", "len_mean", 2),
               ("q(Sol)", "q_solution_mass", 3), *TARGET,
               ("KL(p*‖q)", "kl_target_q", 2), *COST],
    # exact, per prompt, averaged over each split's prompts (q(Sol|c) and Acc over the solvable ones)
    "game24": [(f"{name} {split}", f"{split}_{key}", d) for split in ("train", "heldout") for name, key, d in
               [("Acc", "acc", 3), ("q(Sol|c)", "q_solution_mass", 3), ("KL(q‖p*)", "kl_q_target", 2),
                ("KL(p*‖q)", "kl_target_q", 2), ("TV", "tv_target", 3), ("|logZ−log Z|", "log_z_gap_abs", 2)]]
              + COST,
}
# the paper's Table 1 (SMILES, L_max = 10, Llama-3.2-1B): Acc, Score, TokEnt, FPDiv, Len
PAPER = {"TB": (.998, .717, 2.50, .807, 3.06), "SubTB": (.328, .755, 2.13, .836, 8.35),
         "RapTB": (.996, .740, 2.45, .860, 6.14), "RapTB+SubM": (.988, .844, 2.73, .898, 7.44)}
PAPER_KEYS = ("acc", "score", "tok_ent", "fp_div", "len_mean")
T975 = [12.706204736, 4.302652730, 3.182446305, 2.776445105, 2.570581836,  # t_{0.975, df}, df = 1..10
        2.446911851, 2.364624252, 2.306004135, 2.262157163, 2.228138852]
SMILES_STEPS = 500  # x batch 32 without accumulation; Expr24 runs its task's own budget (Expr24Task.defaults, tasks/expr24/task.py)
DEFAULT_ACCUM, QUICK = 1, dict(steps=10, grad_accum=2, n=200)  # quick: enough batches to fill the buffer


def get_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    a = p.add_argument
    a("--task", default="smiles", choices=sorted(METHODS), help="default smiles")
    a("--methods", default=None, help="comma-separated subset of the task's methods (default: its GFlowNet methods; "
      f"the RL baselines {','.join(BASELINES)} run when named)")
    a("--seeds", type=int, default=3, help="seeds 0 .. N-1 per method (default 3)")
    a("--steps", type=int, default=None, help=f"training steps per run (default: SMILES {SMILES_STEPS}, Expr24 its task's; --quick {QUICK['steps']})")
    a("--batch-size", type=int, default=None, help="train.py --batch-size (default: train.py's, 32)")
    a("--grad-accum", type=int, default=None, help=f"train.py --grad-accum (default {DEFAULT_ACCUM}; --quick 2)")
    a("--n", type=int, default=None, help="samples per run for evaluation (default 3200, as the paper; --quick 200)")
    a("--quick", action="store_true", help="a smoke version of the grid in a few minutes")
    a("--model", default=None, help="train.py --model (default: the task's, i.e. the embedded prior for SMILES)")
    a("--train-args", default="", help="extra train.py flags, the same for every method, e.g. '--max-len 15'")
    a("--conventions", default="ours", choices=["ours", "authors"], help="train.py --conventions; authors also "
      "replays SMILES TB with PRT and samples Expr24 3 x 6400 times, as the authors do (METHOD.md §10)")
    a("--device", default="auto", help="train.py / sample.py --device (default auto)")
    a("--jobs", type=int, default=os.cpu_count(), help="runs in parallel, each with one thread (default: the number of CPU cores)")
    a("--out", default=None, help="output folder (default results/, or results/quick/ with --quick)")
    args = p.parse_args(argv)
    methods = methods_of(args.task)
    args.methods = args.methods.split(",") if args.methods else list(METHODS[args.task])
    if set(args.methods) - set(methods):
        p.error(f"unknown methods {sorted(set(args.methods) - set(methods))}; {args.task} has {list(methods)}")
    if args.steps is None:
        args.steps = QUICK["steps"] if args.quick else default_steps(args.task)
    if args.n is None:
        args.n = QUICK["n"] if args.quick else AUTHORS_N.get(args.task, 3200) if args.conventions == "authors" else 3200
        if args.task == "game24":  # per prompt, over all 495 prompts; the fidelity is exact, from no samples
            args.n = 8 if args.quick else 64
    if args.grad_accum is None:
        args.grad_accum = QUICK["grad_accum"] if args.quick else DEFAULT_ACCUM
    args.out = args.out or ("results/quick" if args.quick else "results")
    if min(args.seeds, args.steps, args.n, args.jobs) < 1:
        p.error("--seeds, --steps, --n and --jobs must be at least 1")
    return args


def method_table(args):
    """{method: (loss, replay)} of the task, with the authors' replay where they use another."""
    table = methods_of(args.task)
    if args.conventions == "authors":
        table.update({m: (table[m][0], r) for (task, m), r in AUTHORS_REPLAY.items() if task == args.task})
    return table


def default_steps(task):
    if task == "smiles":
        return SMILES_STEPS
    import rewards  # torch: imported only when needed
    return rewards.load_task(task).defaults["steps"]


# ----------------------------------------------------------------------------- statistics and the table

def t_quantile(df):
    """t_{0.975, df}: exact to 9 digits for df <= 10, else the Cornish-Fisher series (error < 1e-5)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959963984540054
    return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
            + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3)
            + (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / (92160 * df**4))


def mean_ci(values):
    """Mean, sample sd and the 95% CI half-width t_{0.975,n-1} * sd / sqrt(n) over the seeds that have a value
    (sample.py reports an undefined metric as None). ci is None below two values."""
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return dict(mean=None, sd=None, ci=None, n=0)
    sd = float(np.std(xs, ddof=1)) if len(xs) > 1 else None
    ci = t_quantile(len(xs) - 1) * sd / math.sqrt(len(xs)) if sd is not None else None
    return dict(mean=float(np.mean(xs)), sd=sd, ci=ci, n=len(xs))


def aggregate(per_seed):
    """{method: [metrics dict per seed]} -> {method: {key: mean_ci}} for every numeric key (bools excluded)."""
    out = {}
    for method, runs in per_seed.items():
        keys = sorted({k for r in runs for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
        out[method] = {k: mean_ci([r.get(k) for r in runs]) for k in keys}
    return out


def format_cell(stat, digits, n_runs):
    """'mean ± ci'; '(n=k)' marks a metric that only k of the n_runs seeds define (e.g. FPDiv needs 2 valid)."""
    if stat is None or stat["mean"] is None:
        return "—"
    cell = f"{stat['mean']:.{digits}f}" + (f" ± {stat['ci']:.{digits}f}" if stat["ci"] is not None else "")
    return cell + (f" (n={stat['n']})" if stat["n"] < n_runs else "")


def format_table(agg, task, conventions="ours"):
    """Markdown: one row per method (mean ± 95% CI over seeds); for SMILES each is followed by the paper's row."""
    cols = COLUMNS[task]
    lines = ["| Method | " + " | ".join(h for h, _, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    seeds = {m: max([s["n"] for s in stats.values()] or [0]) for m, stats in agg.items()}  # Acc is always defined
    for method, stats in agg.items():
        lines.append(f"| {method} | " + " | ".join(format_cell(stats.get(k), d, seeds[method]) for _, k, d in cols) + " |")
        if task == "smiles" and method not in BASELINES:
            paper = dict(zip(PAPER_KEYS, PAPER.get(method, ())))
            lines.append(f"| *{method} (paper)* | " + " | ".join(
                f"{paper[k]:.{d}f}" if k in paper else "—" for _, k, d in cols) + " |")
    stop_note = ("log P(stop): log-probability of stopping at the final state, in the training batches of the last "
                 "10% of steps. " if any(k == "log_pstop_final" for _, k, _ in cols) else "")
    lines.append(f"\nmean ± 95% CI (t distribution) over {'/'.join(map(str, sorted(set(seeds.values()))))} seeds. "
                 + stop_note + ("Paper rows: Llama-3.2-1B, 5000 steps." if task == "smiles" else "")
                 + (" The authors' conventions (train.py --conventions authors, METHOD.md §10)"
                    + (", SMILES TB with PRT replay." if task == "smiles" else ".") if conventions == "authors" else ""))
    return "\n".join(lines)


def final_log_pstop(log_rows, frac=0.1):
    """Mean of the training log's log_pstop_final over the last `frac` of the steps (at least one)."""
    tail = log_rows[-max(1, int(len(log_rows) * frac)):]
    return float(np.mean([r["log_pstop_final"] for r in tail])) if tail else None

# ----------------------------------------------------------------------------- running the grid

def run_settings(args, loss, replay, seed, method_args=""):
    """What defines a run: a run folder holding other settings is never silently reused."""
    return dict(task=args.task, loss=loss, replay=replay, seed=seed, steps=args.steps, batch_size=args.batch_size,
                grad_accum=args.grad_accum, model=args.model, train_args=args.train_args, n=args.n,
                **({"method_args": method_args} if method_args else {}),
                **({"conventions": args.conventions} if args.conventions != "ours" else {}))  # older folders: ours


def read_json(path):
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def train_command(args, s, run_dir):
    latest = os.path.join(run_dir, "latest")
    if os.path.isfile(latest):  # interrupted: train.py continues exactly from its newest checkpoint
        return ["--resume", "--out", run_dir, "--task", args.task, "--steps", str(args.steps), "--device", args.device]
    cmd = ["--task", args.task, "--loss", s["loss"], "--replay", s["replay"], "--seed", str(s["seed"]),
           "--steps", str(args.steps), "--out", run_dir, "--device", args.device,
           "--overwrite",  # no `latest`: what a run killed before its first checkpoint left, ours to replace
           "--eval-n", str(min(256, args.n)), "--eval-n-final", str(min(256, args.n)),  # sample.py measures the end
           *shlex.split(s.get("method_args", "")), *shlex.split(args.train_args),
           *(["--conventions", args.conventions] if args.conventions != "ours" else [])]  # the KL curve: 4 points + start
    for flag, value in [("--model", args.model), ("--batch-size", args.batch_size), ("--grad-accum", args.grad_accum)]:
        cmd += [flag, str(value)] if value is not None else []
    return cmd


def trained(run_dir, steps):
    latest = os.path.join(run_dir, "latest")
    if not os.path.isfile(latest):
        return False
    with open(latest) as f:
        return f.read().strip() == f"ckpt-{steps:06d}"


def finished(run_dir):
    return (read_json(os.path.join(run_dir, "run.json")) or {}).get("done") and \
        os.path.isfile(os.path.join(run_dir, "samples_metrics.json"))


def run_dir_of(args, method, seed):
    return os.path.join(args.out, "runs", f"{method}-s{seed}")


def run_one(args, method, loss, replay, seed):
    """Train (or resume) and evaluate one run in child processes; returns its run.json record."""
    run_dir = run_dir_of(args, method, seed)
    os.makedirs(run_dir, exist_ok=True)
    record = (read_json(os.path.join(run_dir, "run.json"))
              or dict(settings=run_settings(args, loss, replay, seed, METHOD_ARGS.get(method, "")), train_s=0.0, sample_s=0.0))
    if not trained(run_dir, args.steps):
        child(["train.py", *train_command(args, record["settings"], run_dir)], run_dir, "train", record)
    child(["sample.py", run_dir, "--n", str(args.n), "--seed", str(seed), "--device", args.device,
           "--fidelity-n", str(min(1000, args.n)), "--out", os.path.join(run_dir, "samples.csv"),
           "--overwrite"], run_dir, "sample", record)  # a run not `finished`: its samples, if any, are incomplete
    record["done"] = True
    write_json(os.path.join(run_dir, "run.json"), record)
    return record


def child(cmd, run_dir, name, record):
    """Run one of the repo's scripts with one thread, output to run_dir/<name>.log, time it into the record."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               TQDM_MININTERVAL="10")  # fewer progress-bar lines in the logs
    log_path, start = os.path.join(run_dir, f"{name}.log"), time.time()
    with open(log_path, "a") as log:
        log.write("$ python " + shlex.join(cmd) + "\n")
        log.flush()
        rc = subprocess.run([sys.executable, os.path.join(ROOT, cmd[0]), *cmd[1:]], env=env, stdout=log,
                            stderr=subprocess.STDOUT).returncode
    record[f"{name}_s"] += time.time() - start
    write_json(os.path.join(run_dir, "run.json"), record)
    if rc != 0:
        with open(log_path) as f:
            raise RuntimeError(f"{run_dir}: {cmd[0]} exited with {rc}; end of {log_path}:\n{f.read()[-1500:]}")


def write_json(path, obj):
    with open(path + ".tmp", "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(path + ".tmp", path)


def load_run(run_dir):
    """One finished run: sample.py's metrics plus the final log P(stop), and the training log (its rows with a
    KL measurement, train.py --eval-every, include step 0: the starting model)."""
    metrics = read_json(os.path.join(run_dir, "samples_metrics.json"))
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        log = [json.loads(line) for line in f]
    steps = [row for row in log if "loss" in row]
    cost = dict(reward_calls=sum(r.get("objects_scored", 0) for r in steps),
                train_cpu_s=sum(r.get("cpu_seconds", 0) for r in steps))
    return dict(metrics, log_pstop_final=final_log_pstop(steps), **cost), log

# ----------------------------------------------------------------------------- plots

def valid_lengths(csv_path, task):
    """Lengths of the valid samples (Expr24: the correct ones, as in its metrics)."""
    with open(csv_path) as f:
        rows = list(csv.DictReader(f))
    keep = (lambda r: float(r["score"]) == 1.0) if task == "expr24" else (lambda r: r["valid"] == "True")
    return [int(r["length"]) for r in rows if keep(r)]


def plot_all(out, task, run_dirs, agg, logs):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    spec, methods = methods_of(task), list(agg)
    losses = list(dict.fromkeys(spec[m][0] for m in agg))
    style = {m: dict(color=f"C{losses.index(spec[m][0])}", label=m,  # colour = loss, dashed = SubM
                     linestyle="--" if spec[m][1] == "subm" else "-") for m in methods}
    max_len = max([int(k.split("@")[1]) for s in agg.values() for k in s if "surv@" in k] or [1])
    fig, axes = plt.subplots(1, len(methods), figsize=(2.6 * len(methods), 2.8), sharey=True, squeeze=False)
    for ax, m in zip(axes[0], methods):
        lengths = [t for d in run_dirs[m] for t in valid_lengths(os.path.join(d, "samples.csv"), task)]
        if lengths:
            ax.hist(lengths, bins=np.arange(-0.5, max_len + 1.5), density=True, color=style[m]["color"])
        ax.set_title(f"{m}\nmean {np.mean(lengths):.2f}" if lengths else f"{m}\n(no valid samples)", fontsize=9)
        ax.set(xlabel="length (tokens)", xticks=range(0, max_len + 1, 2))
    axes[0][0].set_ylabel("fraction of valid samples" if task == "smiles" else "fraction of correct samples")
    paths = [save(fig, out, "lengths.png", plt)]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, ax in zip(["surv", "top1"], axes):
        for m in methods:
            ks = [k for k in range(1, max_len + 1) if agg[m].get(f"{name}@{k}", {}).get("mean") is not None]
            ax.plot(ks, [agg[m][f"{name}@{k}"]["mean"] for k in ks], marker="o", ms=3, **style[m])
        ax.set(xlabel="depth k", xticks=range(1, max_len + 1), ylim=(-0.03, 1.03),
               title={"surv": "Surv(k): fraction longer than k", "top1": "Top1(k): mass of the top depth-k prefix"}[name])
    axes[0].legend(fontsize=8)
    paths.append(save(fig, out, "depth.png", plt))
    paths.append(plot.draw(logs, os.path.join(out, "curves.png"), styles=style, legend_title="mean over seeds"))
    return paths


def save(fig, out, name, plt):
    fig.tight_layout()
    fig.savefig(os.path.join(out, name), dpi=110)
    plt.close(fig)
    return os.path.join(out, name)

# ----------------------------------------------------------------------------- main

def run_grid(args, grid):
    """Run the unfinished part of the grid, `jobs` at a time; returns the runs that failed."""
    todo = [g for g in grid if not finished(run_dir_of(args, g[0], g[3]))]
    print(f"{args.task}: {len(grid)} runs ({len(grid) - len(todo)} already done), {args.steps} steps each, "
          f"{args.jobs} in parallel; logs in {args.out}/runs/*/")
    failed = []
    with ThreadPoolExecutor(max(1, min(args.jobs, len(todo)))) as pool, \
            tqdm(total=len(grid), initial=len(grid) - len(todo), desc="runs", dynamic_ncols=True) as bar:
        futures = {pool.submit(run_one, args, *g): g for g in todo}
        try:
            for future in as_completed(futures):
                (method, _, _, seed), error = futures[future], future.exception()
                if error is None:
                    r = future.result()
                    tqdm.write(f"{method} seed {seed}: train {r['train_s']:.0f} s, sample {r['sample_s']:.0f} s")
                else:
                    failed.append(futures[future])
                    tqdm.write(f"FAILED {error}")
                bar.update(1)
        except KeyboardInterrupt:  # the children got the Ctrl-C too (train.py checkpoints): start nothing new
            for future in futures:
                future.cancel()
            raise
    return failed


def report(args, run_dirs):
    """table.md, summary.json and the plots from the finished runs {method: [run folders]}."""
    per_seed, logs = {}, {}
    for m, dirs in run_dirs.items():
        per_seed[m], logs[m] = map(list, zip(*[load_run(d) for d in dirs]))
    agg = aggregate(per_seed)
    table = format_table(agg, args.task, args.conventions)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(table + "\n")
    methods = {m: dict(loss=method_table(args)[m][0], replay=method_table(args)[m][1],
                       paper=dict(zip(PAPER_KEYS, PAPER[m])) if args.task == "smiles" and m in PAPER else None,
                       runs=[os.path.basename(d) for d in dirs], seeds=per_seed[m], aggregate=agg[m],
                       timings=[{k: read_json(os.path.join(d, "run.json"))[k] for k in ("train_s", "sample_s")} for d in dirs])
               for m, dirs in run_dirs.items()}
    settings = {k: v for k, v in vars(args).items() if k not in ("jobs", "out")}
    write_json(os.path.join(args.out, "summary.json"), dict(settings=settings, methods=methods))
    print(table)
    plots = plot_all(args.out, args.task, run_dirs, agg, logs)
    print(f"wrote {args.out}/table.md, {args.out}/summary.json" + "".join(f", {p}" for p in plots))


def main(argv=None):
    args = get_args(argv)
    # seed-major: a grid stopped part-way has every method at its first seeds
    grid = [(m, *method_table(args)[m], seed) for seed in range(args.seeds) for m in args.methods]
    clashes = [run_dir_of(args, m, seed) for m, loss, replay, seed in grid
               if (r := read_json(os.path.join(run_dir_of(args, m, seed), "run.json")))
               and r["settings"] != run_settings(args, loss, replay, seed, METHOD_ARGS.get(m, ""))]
    if clashes:
        print(f"error: {len(clashes)} run folders ({clashes[0]}, ...) hold runs with other settings (see their run.json); "
              "use another --out or delete them", file=sys.stderr)
        return 2
    try:
        failed = run_grid(args, grid)
    except KeyboardInterrupt:
        print("\ninterrupted: run the same command again to resume the grid", file=sys.stderr)
        return 130
    run_dirs = {}
    for m, _, _, seed in [g for g in grid if g not in failed]:
        run_dirs.setdefault(m, []).append(run_dir_of(args, m, seed))
    if not run_dirs:
        print("error: no run finished", file=sys.stderr)
        return 1
    report(args, run_dirs)
    if failed:
        print(f"{len(failed)} runs failed (see above); the table leaves them out", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
