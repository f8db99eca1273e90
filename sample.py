"""
Evaluation: sample N sequences from a trained policy (or a bare model), write them to a CSV and report the
metrics of METHOD.md §7 and the distance to the target of §8. The measurements themselves live in metrics.py.
A run with conditions (METHOD.md §11) gets --n samples of every condition of a split (--split) or of --prompts FILE,
a `prompt` column in samples.csv, and the metrics and the distance (§11.4) per condition, averaged per split;
under torchrun the conditions are shared out over the ranks (each condition's samples come from its own seed, so
the files do not depend on the number of processes) and rank 0 writes the files.

    python sample.py out                 # a run folder (its `latest` checkpoint), 3200 samples
    python sample.py prior --n 500       # a bare model, with train.py's defaults for the task
"""
import argparse
import csv
import gzip
import json
import math
import os
import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch and transformers import: one line, not a traceback
    signal.signal(signal.SIGINT, lambda *_: (print("\ninterrupted (Ctrl-C) while starting; nothing was written",
                                                   file=sys.stderr), os._exit(130)))

import numpy as np  # noqa: E402 (after the handler above)
import torch  # noqa: E402
from tqdm import tqdm  # noqa: E402

import conditions
import fidelity
import tracking
from distributed import gather_to_first, my_share
from metrics import expr24_metrics, sequence_metrics, smiles_metrics

PRIOR_TRAIN_SMILES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tasks", "smiles", "data",
                                  "moses_train_subset.smi.gz")
CSV_COLUMNS = ["generated", "molecule", "valid", "score", "length", "log_prob"]
PER_PROMPT_N = 100  # --n with conditions: samples per prompt

# -----------------------------------------------------------------------------
# output

def write_csv(path, rows, columns=CSV_COLUMNS):
    """One row per sample. Keys outside `columns` (e.g. tokens) are ignored; missing ones are
    written empty."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value, digits=3):
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _expr24_headline(metrics, g):
    return [
        f"samples {g('n')}  syntactically valid {g('n_syntax_valid')} ({g('valid_frac')})  correct {g('n_correct')}",
        f"Acc {g('acc')}  Unique-correct {g('unique_correct')} of {g('n_solutions')} solutions  "
        f"NormCov {g('norm_cov')} (N = 3200: {g('norm_cov_at_3200')}; the authors', 3 x 6400 samples: "
        f"{g('norm_cov_authors')})  TokEnt {g('tok_ent')} nats",
        f"Len mean {g('len_mean')}  median {g('len_median')}  p90 {g('len_p90')} (correct; all samples: "
        f"{g('len_all_mean')} / {g('len_all_median')} / {g('len_all_p90')})",
        f"vs uniform over the solutions, per position: KL(sampler||target) {g('kl_fwd')}  "
        f"KL(target||sampler) {g('kl_rev')}  JS {g('js')};  whole expressions: KL {g('seq_kl')}  JS {g('seq_js')}",
        "coverage by length: " + "  ".join(f"{n}: {c:.4f}" for n, c in metrics.get("cov_by_len", {}).items()),
        f"length histogram (correct): {metrics.get('len_hist', {})}",
        f"{'depth':>5} {'Surv':>6} {'PefEnt':>7} {'Top1':>6}",
    ]


def format_report(metrics):
    """Headline metrics in the paper's Table-1 order, then the prefix diagnostics by depth."""
    def g(key):  # chemistry keys are absent from sequence_metrics output
        return _fmt(metrics.get(key))

    lines = _expr24_headline(metrics, g) if "norm_cov" in metrics else [
        f"samples {g('n')}  valid {g('n_valid')}",
        f"Acc {g('acc')}  Score {g('score')} (all samples {g('score_all')})  TokEnt {g('tok_ent')} nats"
        f"  FPDiv {g('fp_div')}  MacroFP {g('macro_fp')}",
        f"Len mean {g('len_mean')}  median {g('len_median')}  p90 {g('len_p90')}"
        f"  (all samples: {g('len_all_mean')} / {g('len_all_median')} / {g('len_all_p90')})",
        f"uniqueness {g('uniqueness')}  novelty {g('novelty')}  scaffolds {g('scaffolds')}"
        f"  IntDiv {g('int_div')}",
        f"length histogram (valid): {metrics.get('len_hist', {})}",
        f"{'depth':>5} {'Surv':>6} {'PefEnt':>7} {'Top1':>6}",
    ]
    depth = 1
    while f"surv@{depth}" in metrics:
        lines.append(f"{depth:>5} {g(f'surv@{depth}'):>6} {g(f'pef_ent@{depth}'):>7} "
                     f"{g(f'top1@{depth}'):>6}")
        depth += 1
    return "\n".join(lines)

# -----------------------------------------------------------------------------
# CLI

def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sample from a trained policy (or a bare model) and report its metrics "
                                "(METHOD.md §7) and its distance to the target (§8).")
    p.add_argument("ckpt", help="a run folder (uses its `latest`), a ckpt-* folder, or a bare model name/folder")
    p.add_argument("--n", type=int, default=None, help="number of samples (default 3200; with conditions, per prompt: "
                   "default 100)")
    p.add_argument("--split", default="all", choices=["train", "heldout", "all"],
                   help="with conditions (METHOD.md §11): sample every prompt of this split (all: both)")
    p.add_argument("--prompts", default=None, help="with conditions: sample the prompts of this file (one per line) "
                   "instead of a split")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--trust-remote-code", action="store_true", help="run a hub model's own code (never from a checkpoint)")
    p.add_argument("--out", default=None, help="CSV path (default: samples.csv beside the checkpoint, or ./samples.csv); "
                   "its metrics go beside it, NAME_metrics.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out CSV and its _metrics.json "
                   "(without it they are never replaced: the command stops before sampling)")
    p.add_argument("--train-smiles", default=None, help="SMILES file (.smi or .smi.gz) for novelty; "
                   "default: the embedded prior's training set when the model is the prior")
    p.add_argument("--task", default=None, help="for a bare model: the task (default smiles); "
                   "for a run on your own task (module:attr), that task again: loading it runs its code")
    p.add_argument("--any-task", action="store_true", help="sample a checkpoint under another --task than the one it "
                   "was trained on (its metrics and distance then describe that task)")
    p.add_argument("--scaffold", default=None, help="for a bare model: the scaffold (default the paper's)")
    p.add_argument("--min-len", type=int, default=None, help="for a bare model")
    p.add_argument("--max-len", type=int, default=None, help="for a bare model")
    p.add_argument("--prompt", default=None, help="for a bare model")
    p.add_argument("--target-lams", default=None, help="sampling a bare reference model: describe the target "
                   "P_ref e^{lam S} for these comma-separated lam (length distribution, ESS, objects holding 50%% / 90%%)")
    p.add_argument("--fidelity-n", type=int, default=1000, help="policy samples (and as many reference samples) "
                   "for the distance to the target, METHOD.md §8 (0: skip it)")
    p.error = lambda message: p.exit(2, f"error: {message}\n")  # one line, not argparse's screenful of usage
    args = p.parse_args(argv)
    problem = number_problem(args)
    if problem:
        p.error(problem)
    folder = os.path.dirname(os.path.abspath(args.out or "samples.csv"))
    if args.out is not None and (os.path.isdir(args.out) or not os.access(folder, os.W_OK)):
        p.error(f"--out {args.out!r}: need a file name in a folder that exists and can be written")
    if args.train_smiles is not None and not os.path.isfile(args.train_smiles):
        p.error(f"--train-smiles {args.train_smiles!r}: no such file")
    import flags  # torch: only once the flags parse
    if flags.device_problem(args.device):
        p.error(flags.device_problem(args.device))
    return args


def number_problem(args):
    """The first flag out of range, in one line, or None."""
    for name in ("n", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})"
    if not 0 < args.temperature < float("inf"):  # nan fails both
        return f"--temperature must be a positive finite number (got {args.temperature})"
    for name in ("seed", "fidelity_n", "min_len"):
        if (getattr(args, name) or 0) < 0:
            return f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})"
    if (args.max_len or 1) < max(1, args.min_len or 0):
        return f"--max-len must be at least 1 and at least --min-len (got {args.max_len})"
    try:
        lams = [float(x) for x in args.target_lams.split(",")] if args.target_lams is not None else []
    except ValueError:
        return f"--target-lams {args.target_lams!r}: need comma-separated numbers, such as 10,50"
    if not all(map(math.isfinite, lams)) or (args.target_lams is not None and not lams):
        return f"--target-lams {args.target_lams!r}: need finite numbers"


def output_problem(out, overwrite):
    """Why writing the CSV `out` and its _metrics.json would replace earlier samples unasked, or None."""
    found = [p for p in (out, os.path.splitext(out)[0] + "_metrics.json") if os.path.exists(p)]
    if found and not overwrite:
        return (f"{found[0]} already exists (earlier samples): add --overwrite to replace it, or --out NEW.csv to "
                f"keep it")


def not_a_model_problem(path):
    """Why a local folder given as the checkpoint is neither a run, a checkpoint nor a model, or None."""
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, f)) for f in
                                       ("latest", "state.pt", "config.json", "adapter_config.json")):
        return (f"{path!r} is a folder, but not a run (no `latest`), a checkpoint (no state.pt) nor a model "
                f"(no config.json)")


def run_settings(args):
    """The training run's settings from a checkpoint, or train.py's defaults around a bare model."""
    import checkpoint
    import flags
    import train
    from model import ModelError
    from rl_losses import NO_LOG_Z
    if not_a_model_problem(args.ckpt):
        raise ModelError(not_a_model_problem(args.ckpt))
    if os.path.isfile(os.path.join(args.ckpt, "latest")) or os.path.isfile(os.path.join(args.ckpt, "state.pt")):
        ckpt = checkpoint.find_checkpoint(args.ckpt)
        state = checkpoint.load_state(ckpt, args.task)
        saved = state["args"].get("task", "smiles")
        if args.task not in (None, saved) and not args.any_task:
            raise ModelError(f"checkpoint {ckpt!r} was trained on the task {saved!r}, not {args.task!r}; to sample it "
                             f"under {args.task!r} anyway, add --any-task")
        log_z = state["log_z"] if isinstance(state["log_z"], dict) else float(state["log_z"])  # a dict: a logZ head
        if state["args"].get("loss") in NO_LOG_Z:  # RLOO, GRPO and the oracle learn none: nothing to compare
            log_z = None
        defaults = vars(flags.make_parser().parse_args([]))  # no task is loaded: a checkpoint never runs task code
        settings = checkpoint.saved_settings({**state["args"], "task": args.task or saved, "log_z": log_z}, defaults)
    else:
        argv = ["--model", args.ckpt, "--task", args.task or "smiles", "--out", "."]  # train.py checks them all
        for name in ("scaffold", "min_len", "max_len", "prompt", "prompts"):
            if getattr(args, name) is not None:
                argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        ckpt, settings = None, train.get_args(argv)
        settings.log_z = None
    settings.device, settings.trust_remote_code = args.device, args.trust_remote_code  # not from the checkpoint
    return ckpt, settings


def main(argv=None):
    import train
    from model import ModelError
    from rewards import TaskError
    try:
        args = get_args(argv)
        if args.prompts:  # read now, not after the model loads
            conditions.read_prompts(args.prompts)
        ckpt, settings = run_settings(args)  # a bare model's flags go through train.py's checks
        args.out = args.out or os.path.join(os.path.dirname(ckpt) if ckpt else ".", "samples.csv")  # beside it
        if output_problem(args.out, args.overwrite):  # before any sampling: nothing is replaced unasked
            raise ModelError(output_problem(args.out, args.overwrite))
        task = train.build_task(settings)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: the prompts are shared out (run_conditions)
            train.setup_distributed(settings)
        conditional = conditions.runs_conditional(settings, task)
        if not conditional and (args.prompts or args.split != "all"):
            flag = "--prompts" if args.prompts else f"--split {args.split}"
            raise TaskError(f"{flag}: this run has no conditions (it was trained on one prompt, --prompt)")
        policy = train.build_policy(settings, task, ckpt, with_reference=args.fidelity_n > 0)
        if conditional:  # a prompt per condition, measured per condition
            return run_conditions(args, settings, task, policy, ckpt)
        args.n = args.n or 3200
    except (ModelError, TaskError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:  # argparse (or train.py's check of a bare model's flags) printed one line
        return e.code
    torch.manual_seed(args.seed)
    samples = []
    with tqdm(total=args.n, desc="sampling") as bar:
        while len(samples) < args.n:
            tokens, lengths, log_q = policy.sample(min(args.batch_size, args.n - len(samples)), args.temperature)
            for row, tau, text, lp in zip(tokens.tolist(), lengths.tolist(), policy.texts(tokens, lengths),
                                          log_q.sum(1).tolist()):
                samples.append(dict(tokens=row[:tau], length=tau, generated=text, molecule=task.full(text),
                                    valid=task.is_valid(text), score=task.score(text), log_prob=lp))
            bar.update(len(tokens))
    out = args.out  # set above: the default beside the checkpoint, checked before sampling
    write_csv(out, samples)
    metrics = task_metrics(task, samples, settings, args.train_smiles)
    if args.fidelity_n > 0:
        metrics.update(fidelity.measure(policy, task, settings.kappa, settings.lam, args.fidelity_n, settings.log_z,
                                        seed=args.seed))
    profiles = [fidelity.target_profile([s["molecule"] for s in samples], [s["score"] for s in samples],
                                        [s["length"] for s in samples], float(lam), settings.max_len)
                for lam in (args.target_lams.split(",") if args.target_lams else [])]
    if profiles:
        metrics["target_profiles"] = profiles
    with open(os.path.splitext(out)[0] + "_metrics.json", "w") as f:
        json.dump(metrics, f, indent=1, default=str)
    print(format_report(metrics))
    if args.fidelity_n > 0:
        print(tracking.format_distance(metrics, explain=True))
    for p in profiles:
        print(f"target at lam {p['lam']:g} (from these {p['n']} reference samples): ESS {p['ess']:.1f}, "
              f"{p['objects_50']} / {p['objects_90']} objects hold 50% / 90% of its mass, {p['at_max_len']:.3f} at "
              f"L_max; by length {p['length_dist']}")
    print(f"wrote {out} and {os.path.splitext(out)[0]}_metrics.json")
    return 0


def task_metrics(task, samples, settings, train_smiles=None):
    """Expr24's coverage metrics against its solution set, chemistry for a chemical task, else the generic ones
    (Acc, Score, TokEnt, lengths, prefix diagnostics, uniqueness of the canonical forms)."""
    if getattr(task, "solutions", None) is not None:
        return expr24_metrics(samples, task.solutions(settings.min_len, settings.max_len), settings.max_len)
    if task.chemical:
        default = PRIOR_TRAIN_SMILES if os.path.basename(str(settings.model)).startswith("prior") else None
        return smiles_metrics(samples, load_smiles(train_smiles or default), max_depth=settings.max_len)
    out = sequence_metrics(samples, max_depth=settings.max_len)
    keys = [task.canonical(s["generated"]) for s in samples if s["valid"]]
    out.update(n_unique=len(set(keys)), uniqueness=len(set(keys)) / len(keys) if keys else None)
    return out


def load_smiles(path):
    """The SMILES of a .smi / .smi.gz file (first column) as a set, for novelty; None without a file. They are
    compared as they are, so the file must hold RDKit-canonical SMILES: MOSES does (4998 of 5000 lines of the
    prior's training file are unchanged by canonicalisation). tasks/smiles/train_prior.py canonicalises it for its own eval."""
    if path is None:
        return None
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return {line.split()[0] for line in f if line.strip()}


# ----------------------------------------------------------------------------- with conditions

def chosen_conditions(args, task):
    """(split, prompt) pairs: the prompts of --prompts, or every condition of --split ('all': both splits)."""
    if args.prompts:
        return [("prompts", p) for p in conditions.read_prompts(args.prompts)]
    splits = fidelity.SPLITS if args.split == "all" else (args.split,)
    return [(s, c) for s in splits for c in task.conditions.get(s, [])]


def saved_log_z(settings, policy):
    """The run's logZ from its checkpoint, built as train.py builds it: its head or its seen objects (None for a bare
    model or a logZ without per-prompt state)."""
    if not isinstance(settings.log_z, dict):
        return None
    log_z, _ = conditions.make_condition_log_z(settings, policy)
    log_z.load_state_dict(settings.log_z)
    return log_z


def draw_condition(policy, task, prompt, n, temperature, batch_size):
    """n samples of one condition, as sample.py's sample dicts with the prompt."""
    view, given, out = policy.view([prompt]), task.given(prompt), []
    while len(out) < n:
        tokens, lengths, log_q = view.sample(min(batch_size, n - len(out)), temperature)
        for row, tau, text, lp in zip(tokens.tolist(), lengths.tolist(), policy.texts(tokens, lengths),
                                      log_q.sum(1).tolist()):
            out.append(dict(prompt=prompt, tokens=row[:tau], length=tau, generated=text, molecule=given.full(text),
                            valid=given.is_valid(text), score=given.score(text), log_prob=lp))
    return out


def average_split(rows, split):
    """The mean over a split's conditions of every numeric metric; with a solution set (the Game of 24) the sample
    metrics over the solvable prompts only (elsewhere Acc is 0 and coverage undefined by construction)."""
    out = {}
    solvable = [r for r in rows if r["metrics"].get("n_solutions", 1)]
    keys = sorted({k for r in rows for k, v in r["metrics"].items() if isinstance(v, (int, float))
                   and not isinstance(v, bool)})
    for key in keys:
        values = [r["metrics"][key] for r in solvable if isinstance(r["metrics"].get(key), (int, float))]
        if values:
            out[f"{split}_{key}"] = float(np.mean(values))
    out.update(fidelity.summarise_split([r["fidelity"] for r in rows if r.get("fidelity")], split))
    out[f"{split}_n_conditions"] = len(rows)
    return out


def run_conditions(args, settings, task, policy, ckpt):
    """Sample, measure and write; returns sample.py's exit code."""
    task = conditions.as_conditional(task)
    policy = conditions.ConditionalPolicy(policy, task, settings.prompt)
    chosen = chosen_conditions(args, task)
    for _, prompt in chosen:
        task.given(prompt)  # a prompt the task refuses: one line, before any work
    log_z, n = saved_log_z(settings, policy), args.n or PER_PROMPT_N
    rows, mine = [], my_share(list(enumerate(chosen)))
    for i, (split, prompt) in tqdm(mine, desc="sampling per prompt"):
        torch.manual_seed(args.seed + i)
        samples = draw_condition(policy, task, prompt, n, args.temperature, args.batch_size)
        row = dict(index=i, prompt=prompt, split=split, samples=samples,
                   metrics=task_metrics(task.given(prompt), samples, settings, args.train_smiles))
        if args.fidelity_n > 0:
            learned = conditions.learned_log_z(settings, log_z, policy, [prompt]) if log_z is not None else None
            with torch.no_grad():
                row["fidelity"] = fidelity.measure_conditions(policy, task, [prompt], settings.kappa, settings.lam,
                                                             args.fidelity_n, learned, seed=args.seed + i)[0]
        rows.append(row)
    gathered = gather_to_first(rows)
    if gathered is None:
        return 0
    rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    out = args.out or os.path.join(os.path.dirname(ckpt) if ckpt else ".", "samples.csv")
    write_csv(out, [s for r in rows for s in r["samples"]], ["prompt", *CSV_COLUMNS])
    summary = {}
    for split in dict.fromkeys(r["split"] for r in rows):
        summary.update(average_split([r for r in rows if r["split"] == split], split))
    per_condition = [dict(prompt=r["prompt"], split=r["split"], **r["metrics"], **{
        f"fidelity_{k}": v for k, v in (r.get("fidelity") or {}).items() if k != "prompt"}) for r in rows]
    with open(os.path.splitext(out)[0] + "_metrics.json", "w") as f:
        json.dump(dict(summary, conditional=True, samples_per_prompt=n, conditions=per_condition), f, indent=1,
                  default=str)
    print(format_conditions_summary(summary))
    print(f"wrote {out} and {os.path.splitext(out)[0]}_metrics.json")
    return 0


def format_conditions_summary(summary):
    lines = []
    for split in dict.fromkeys(k.split("_")[0] for k in summary if k.endswith("_n_conditions")):
        g = lambda key, d=3: f"{summary[f'{split}_{key}']:.{d}f}" if f"{split}_{key}" in summary else "-"
        lines.append(f"{split} ({summary[f'{split}_n_conditions']} prompts): Acc {g('acc')}  "
                     f"valid {g('valid_frac') if f'{split}_valid_frac' in summary else g('validity')}  "
                     f"score {g('score')}  NormCov {g('norm_cov')}  (task metrics: mean over the prompts)")
    fid = {k: v for k, v in summary.items() if any(k.startswith(f"{s}_") for s in fidelity.SPLITS)}
    if any(k.endswith("_kl_q_target") for k in fid):
        lines.append(tracking.format_conditions(fid, explain=True))
    return "\n".join(lines)


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # samples and metrics are written at the end: an interrupted sampling wrote nothing
        print("\ninterrupted (Ctrl-C); nothing was written", file=sys.stderr)
        sys.exit(130)
