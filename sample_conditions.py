"""
sample.py for a run with conditions (METHOD.md §11): every condition of a split (--split) or of --prompts FILE gets
--n samples; samples.csv has a `prompt` column beside `generated` and `score`; the metrics (METHOD.md §7) and the
distance to the target (§11.4) are computed per condition and averaged per split in samples_metrics.json.
Under torchrun the conditions are shared out over the ranks (each condition's samples come from its own seed, so
the files do not depend on the number of processes) and rank 0 writes the files.
"""
import json
import os

import numpy as np
import torch
from tqdm import tqdm

import condition_fidelity
import conditions
from distributed import gather_to_first, my_share

PER_PROMPT_N = 100  # sample.py --n with conditions: samples per prompt


def chosen_conditions(args, task):
    """(split, prompt) pairs: the prompts of --prompts, or every condition of --split ('all': both splits)."""
    if args.prompts:
        return [("prompts", p) for p in conditions.read_prompts(args.prompts)]
    splits = condition_fidelity.SPLITS if args.split == "all" else (args.split,)
    return [(s, c) for s in splits for c in task.conditions.get(s, [])]


def learned_head(settings, policy):
    """The run's logZ head from its checkpoint (None for a bare model or another kind of logZ)."""
    if not isinstance(settings.log_z, dict):
        return None
    head = conditions.LogZHead(conditions.hidden_size(policy)).to(policy.device)
    head.load_state_dict(settings.log_z)
    return head


def draw(policy, task, prompt, n, temperature, batch_size):
    """n samples of one condition, as sample.py's sample dicts with the prompt."""
    view, given, out = policy.view([prompt]), task.given(prompt), []
    while len(out) < n:
        tokens, lengths, log_q = view.sample(min(batch_size, n - len(out)), temperature)
        for row, tau, text, lp in zip(tokens.tolist(), lengths.tolist(), policy.texts(tokens, lengths),
                                      log_q.sum(1).tolist()):
            out.append(dict(prompt=prompt, tokens=row[:tau], length=tau, generated=text, molecule=given.full(text),
                            valid=given.is_valid(text), score=given.score(text), log_prob=lp))
    return out


def average(rows, split):
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
    out.update(condition_fidelity.summarise([r["fidelity"] for r in rows if r.get("fidelity")], split))
    out[f"{split}_n_conditions"] = len(rows)
    return out


def run(args, settings, task, policy, ckpt, task_metrics, write_csv, columns):
    """Sample, measure and write; returns sample.py's exit code."""
    task = conditions.as_conditional(task)
    policy = conditions.ConditionalPolicy(policy, task, settings.prompt)
    chosen = chosen_conditions(args, task)
    for _, prompt in chosen:
        task.given(prompt)  # a prompt the task refuses: one line, before any work
    head, n = learned_head(settings, policy), args.n or PER_PROMPT_N
    rows, mine = [], my_share(list(enumerate(chosen)))
    for i, (split, prompt) in tqdm(mine, desc="sampling per prompt"):
        torch.manual_seed(args.seed + i)
        samples = draw(policy, task, prompt, n, args.temperature, args.batch_size)
        row = dict(index=i, prompt=prompt, split=split, samples=samples,
                   metrics=task_metrics(task.given(prompt), samples, settings, args.train_smiles))
        if args.fidelity_n > 0:
            learned = [head(policy.prompt_states([prompt])).item()] if head is not None else None
            with torch.no_grad():
                row["fidelity"] = condition_fidelity.measure(policy, task, [prompt], settings.kappa, settings.lam,
                                                             args.fidelity_n, learned, seed=args.seed + i)[0]
        rows.append(row)
    gathered = gather_to_first(rows)
    if gathered is None:
        return 0
    rows = sorted((r for part in gathered for r in part), key=lambda r: r["index"])
    out = args.out or os.path.join(os.path.dirname(ckpt) if ckpt else ".", "samples.csv")
    write_csv(out, [s for r in rows for s in r["samples"]], ["prompt", *columns])
    summary = {}
    for split in dict.fromkeys(r["split"] for r in rows):
        summary.update(average([r for r in rows if r["split"] == split], split))
    per_condition = [dict(prompt=r["prompt"], split=r["split"], **r["metrics"], **{
        f"fidelity_{k}": v for k, v in (r.get("fidelity") or {}).items() if k != "prompt"}) for r in rows]
    with open(os.path.splitext(out)[0] + "_metrics.json", "w") as f:
        json.dump(dict(summary, conditional=True, samples_per_prompt=n, conditions=per_condition), f, indent=1,
                  default=str)
    print(format_summary(summary))
    print(f"wrote {out} and {os.path.splitext(out)[0]}_metrics.json")
    return 0


def format_summary(summary):
    lines = []
    for split in dict.fromkeys(k.split("_")[0] for k in summary if k.endswith("_n_conditions")):
        g = lambda key, d=3: f"{summary[f'{split}_{key}']:.{d}f}" if f"{split}_{key}" in summary else "-"
        lines.append(f"{split} ({summary[f'{split}_n_conditions']} prompts): Acc {g('acc')}  "
                     f"valid {g('valid_frac') if f'{split}_valid_frac' in summary else g('validity')}  "
                     f"score {g('score')}  NormCov {g('norm_cov')}  (task metrics: mean over the prompts)")
    fid = {k: v for k, v in summary.items() if any(k.startswith(f"{s}_") for s in condition_fidelity.SPLITS)}
    if any(k.endswith("_kl_q_target") for k in fid):
        lines.append(condition_fidelity.format_fidelity(fid, explain=True))
    return "\n".join(lines)
