"""
The Game of 24's reference (prior/ beside this file, METHOD.md §11.3): a tiny character-level GPT-2 that reads the prompt
('1139:') and is fitted by maximum likelihood to uniformly random valid strings of every one of the 495
conditions, under the task's own state mask, so that P_ref(x|c) is close to uniform over the strings c allows.

    python -m tasks.game24.train_prior fit        # builds tasks/game24/prior/ and measures it (a few CPU minutes)
    python -m tasks.game24.train_prior measure    # the exact distance to uniform, per prompt, of that model

Uniform per prompt makes the target p*(x|c) ∝ P_ref(x|c) exp(lam S(x, c)) near uniform over each prompt's
solutions, and equal to P_ref for a prompt without any. All 495 conditions are fitted (the held-out ones too): the
reference defines the target of every prompt, and it knows nothing of the score.
"""
import argparse
import json
import math
import os
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import conditions
import fidelity
import model as modellib
import rewards
from tasks.game24.task import GAME24_LENGTH, Game24Task, game24_solutions

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "prior")  # the recipe sits beside what it makes

RECIPE = dict(steps=3000, batch_size=256, lr=3e-3, seed=0, n_layer=3, n_embd=64, n_head=4, n_positions=16)


def game24_policy(path):
    """tasks/game24/prior (or any model folder) as the task's masked policy over every condition."""
    net, tokenizer = modellib.load_model(path)
    task = Game24Task()
    task.conditions = dict(all=sorted(conditions.all_conditions(task)))
    allowed = rewards.allowed_token_ids(tokenizer, task.charset, max_chars=1)
    policy = modellib.Policy(net, tokenizer, allowed, GAME24_LENGTH, GAME24_LENGTH)
    return conditions.ConditionalPolicy(policy, task), task


def uniform_batch(policy, task, rng, n):
    """n conditions drawn uniformly, and a uniformly random valid string of each, as action tokens."""
    prompts = task.conditions["all"]
    picked = [prompts[i] for i in rng.integers(len(prompts), size=n)]
    texts = [objects[rng.integers(len(objects))] for objects in (task.given(p).objects() for p in picked)]
    ids = {text: i for i, text in policy.token_texts.items()}
    tokens = torch.tensor([[ids[ch] for ch in t] for t in texts])
    return tokens, torch.full((n,), GAME24_LENGTH), picked


def fit(path=OUT, steps=RECIPE["steps"], batch_size=RECIPE["batch_size"], lr=RECIPE["lr"], seed=RECIPE["seed"]):
    """Build the model and fit it: AdamW, learning rate decaying linearly to 0, the masked log-likelihood of the
    sampled strings (the same masked distribution the task samples from)."""
    torch.manual_seed(seed)
    alphabet = sorted(Game24Task.charset | {":"})
    modellib.build_scratch_model(path, alphabet, n_layer=RECIPE["n_layer"], n_embd=RECIPE["n_embd"],
                                 n_head=RECIPE["n_head"], n_positions=RECIPE["n_positions"])
    policy, task = game24_policy(path)
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW(policy.model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    started, cpu, bar = time.perf_counter(), time.process_time(), tqdm(range(steps), desc="fitting the Game of 24 reference", mininterval=2)
    for _ in bar:
        tokens, lengths, prompts = uniform_batch(policy, task, rng, batch_size)
        log_pf, log_pterm = policy.log_probs(tokens, lengths, prompts)
        loss = -(log_pf.sum(1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        bar.set_postfix(nll=f"{loss.item():.3f}")
    policy.model.save_pretrained(path)
    policy.tokenizer.save_pretrained(path)
    return time.perf_counter() - started, time.process_time() - cpu


@torch.no_grad()
def measure(path=OUT):
    """The exact distance of P_ref(.|c) to the uniform distribution over c's strings, for each of the 495 prompts:
    KL(U || P_ref), KL(P_ref || U), TV, and P_ref's mass on the solutions against the uniform share."""
    policy, task = game24_policy(path)
    policy.model.eval()
    rows, solutions = [], game24_solutions()
    for prompt in tqdm(task.conditions["all"], desc="measuring", mininterval=2):
        objects = task.given(prompt).objects()
        log_p = conditions_log_probs(policy, prompt, objects)
        log_u = -math.log(len(objects))
        p = np.exp(log_p)
        n_sol = len(solutions[prompt[:4]])
        sol = np.isin(objects, solutions[prompt[:4]])
        rows.append(dict(prompt=prompt, n=len(objects), mass=float(p.sum()), kl_u_ref=float(np.mean(log_u - log_p)),
                         kl_ref_u=float(np.sum(p * (log_p - log_u))), tv=0.5 * float(np.abs(p - 1 / len(objects)).sum()),
                         ref_solution_mass=float(p[sol].sum()), uniform_solution_mass=n_sol / len(objects)))
    summary = {key: dict(mean=float(np.mean([r[key] for r in rows])), max=float(np.max([r[key] for r in rows])))
               for key in ("kl_u_ref", "kl_ref_u", "tv")}
    solvable = [r for r in rows if r["uniform_solution_mass"] > 0]
    summary["solution_mass_ratio"] = dict(  # P_ref(Sol|c) / U(Sol|c) over the solvable prompts
        mean=float(np.mean([r["ref_solution_mass"] / r["uniform_solution_mass"] for r in solvable])),
        min=float(np.min([r["ref_solution_mass"] / r["uniform_solution_mass"] for r in solvable])),
        max=float(np.max([r["ref_solution_mass"] / r["uniform_solution_mass"] for r in solvable])))
    summary["mass"] = dict(min=float(min(r["mass"] for r in rows)), max=float(max(r["mass"] for r in rows)))
    return summary, rows


def conditions_log_probs(policy, prompt, objects):
    return fidelity.solution_log_probs(policy.view([prompt]), objects)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["fit", "measure"])
    p.add_argument("--out", default=OUT, help="the model folder (default tasks/game24/prior/)")
    p.add_argument("--steps", type=int, default=RECIPE["steps"])
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    record = {}
    if args.command == "fit":
        seconds, cpu = fit(args.out, steps=args.steps)
        record = dict(recipe=dict(RECIPE, steps=args.steps), fit_seconds=round(seconds, 1), fit_cpu_seconds=round(cpu, 1))
    summary, _ = measure(args.out)
    record["uniform_distance"] = summary
    print(json.dumps(record, indent=1))
    if args.command == "fit":
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
