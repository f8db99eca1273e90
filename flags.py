"""
What train.py accepts: every flag with its default and its help (make_parser), and the checks made before any work
starts: numbers finite and in range, the device, --out, the model's context and the prompt's tokens. Each check says
what is wrong in one line (train.py and sample.py print it as `error: ...`, exit code 2), or None.
"""
import argparse
import inspect
import math
import os

import torch

import conditions
import conventions
import losses
import model as modellib
import rewards
import rl_losses
from tasks.smiles.task import PAPER_SCAFFOLD

# the paper's optimisation settings (SMILES), used for every flag left unset that the task's defaults do not set
PAPER_DEFAULTS = dict(steps=5000, batch_size=32, grad_accum=4, lr=1e-4, buffer_size=200)
# the other flags a task's `defaults` may set (the Game of 24 sets them all), at their value for every other task
GENERAL_DEFAULTS = dict(huber=0.0, anchor=1.0, replay_valid_only=False, buffer_validity="task", explore_ref=0,
                        explore_from="reference")
# how the defaults reach the target (RESULTS.md, "Reach the target"), the same for every method: RapTB's eta goes to 0
# over the first half of the run (so the second half trains TB, whose fixed point is R/Z, while the first keeps the
# dense early credit), and the learning rate follows a cosine to 0. --paper restores the paper's constant eta and lr.
OURS = dict(eta_end=0.0, eta_anneal=0.5, lr_schedule="cosine")
PAPER = dict(eta_end=None, eta_anneal=1.0, lr_schedule="constant")  # eta_end None: --eta throughout


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each flag's default; a flag whose default depends on the task or the loss (None here, filled by
    check_args) says its value in its own help instead of "(default: None)"."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def own_samples(loss):
    """The RL baselines need their own samples at temperature 1, the oracle exact samples of p*: no replay."""
    return loss in rl_losses.LOSSES or loss == "oracle"


def task_defaults(task, loss, replay=None):
    """A task's `defaults`, with its `gflownet_defaults` (a recipe of buffer, exploration and logZ) for a GFlowNet
    loss with a buffer: the RL baselines and the oracle train on their own samples, and --replay none or oracle keeps
    no buffer to explore for, so they take none of the recipe."""
    bufferless = own_samples(loss) or replay in ("none", "oracle")
    return {**task.defaults, **({} if bufferless else getattr(task, "gflownet_defaults", {}))}


def by_task(key):
    """A flag's value for the default task, then the built-in tasks' own (their `defaults`), for --help."""
    values = {name: task_defaults(rewards.builtin_task(name), "raptb").get(
        key, {**PAPER_DEFAULTS, **GENERAL_DEFAULTS}.get(key)) for name in rewards.BUILTIN}
    default = values.pop("smiles")
    others = ", ".join(f"{name} {v}" for name, v in values.items() if v != default)
    return f"default {default}" + (f"; {others}" if others else "")


def make_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    a = p.add_argument
    # task and model
    a("--task", default="smiles", help="smiles, expr24, game24, or your own: my_module:score, path/to/file.py:MyTask")
    a("--charset", default=None, help="your own task: the characters a token may use (default: any; a built-in task "
      "has its own)")
    a("--model", default=None, help="hub name or local folder (default prior_sidechain, the embedded side-chain "
      "GPT-2; with --scaffold '' prior, the whole-molecule one; expr24 a tiny model built in OUT/init; game24 "
      "prior_game24)")
    a("--lora", action="store_true", help="train LoRA adapters (r=16, alpha=16, dropout 0.1) instead of all weights")
    a("--trust-remote-code", action="store_true", help="let a hub model run its own code (never from a checkpoint)")
    a("--prompt", default="", help="text before the generated part (the embedded prior uses BOS only); with "
      "conditions, before each condition's text")
    a("--prompts", default=None, help="(default none) a file of prompts, one per line, to train on: each is a condition (METHOD.md "
      "§11); your own score function gets them if it takes a `prompts` argument (TRL's convention)")
    a("--heldout-prompts", default=None, help="(default none) with --prompts: prompts never trained on, measured beside them")
    a("--scaffold", default=PAPER_SCAFFOLD, help="SMILES with one '*' to fill; '' for whole molecules")
    a("--scaffolds", default=None, help="(default none) a file of scaffolds (one SMILES with one '*' per line, a tab and 'heldout' "
      "marking held-out ones): each is a condition (METHOD.md §11.5; tasks/smiles/data/scaffolds.tsv ships a MOSES set)")
    a("--attach", default="graph", choices=["graph", "string"],
      help="join the side chain to the scaffold on the molecular graph, or paste the string as the paper does")
    a("--no-smiles-mask", action="store_true", help="sample and train without the SMILES syntax "
      "mask (tasks/smiles/grammar.py), which removes most invalid outputs (each costs about lambda nats of KL); RDKit judges validity")
    a("--min-len", type=int, default=None, help="L_min: stop is masked before this many generated tokens "
      f"({by_task('min_len')})")
    a("--max-len", type=int, default=None, help="L_max: stop is forced after this many generated tokens "
      f"({by_task('max_len')})")
    a("--kappa", type=float, default=1.0, help="weight of log P_ref in log R")
    a("--lam", type=float, default=50.0, help="lambda_r: weight of the task score S in log R")
    # objective
    a("--loss", default="raptb", choices=sorted(losses.LOSSES), help="the objective (METHOD.md §3, §9); oracle: "
      "maximum likelihood on exact samples of p* (a task that enumerates its target), the ceiling every method is "
      "measured against")
    a("--eta", type=float, default=0.25, help="weight of RapTB's rooted prefix term (the paper's 0.25) at the start")
    a("--eta-end", type=float, default=None, help="eta at the end of --eta-anneal (default 0: absorbed targets bias "
      "RapTB's fixed point away from R/Z, METHOD.md §3.3; with --paper, --eta throughout)")
    a("--absorb-end", type=float, default=1.0, help="absorption strength at the end of --eta-anneal (1: the paper's "
      "absorbed targets throughout; 0: RapTB without absorption, whose fixed point is R/Z)")
    a("--eta-anneal", type=float, default=None, help="fraction of the run over which eta and the absorption move to their "
      "end values, then held (default 0.5, so the rest trains an unbiased objective; --paper 1)")
    a("--gamma", type=float, default=0.99, help="RapTB: discount of the absorbed offset over the steps to the horizon")
    a("--alpha", type=float, default=0.5, help="1 = max-only absorbed target, 0 = soft-only")
    a("--beta", type=float, default=5.0, help="RapTB: inverse temperature of the soft-max absorbed target")
    a("--rho", type=float, default=0.1, help="RapTB: the soft target's penalty per step of distance")
    a("--k-min-start", type=int, default=5, help="k_min is linear from this ...")
    a("--k-min-end", type=int, default=2, help="... to this over training")
    a("--subtb-lam", type=float, default=1.0, help="window / prefix weight lambda of SubTB and RapTB")
    a("--eps-absorb", type=float, default=1e-6, help="RapTB: a prefix absorbs when its |u| is at most this")
    a("--horizon", type=int, default=None, help="RapTB: the horizon K of its prefixes (default: each row's length)")
    a("--huber", type=float, default=None, help="each residual's square becomes its Huber loss beyond this many nats "
      "(0: squares, the paper's), so no row pulls harder than a residual of this size: replayed solutions tens of nats "
      f"off no longer drown the rows that hold other prompts in place; the fixed point is the same ({by_task('huber')})")
    a("--anchor", type=float, default=None, metavar="W", help="with --log-z seen or ref: the rows of a prompt with no "
      "object of positive score drawn yet (its logZ is exactly 0, so the reference is its target so far) weigh W in "
      "the loss, the others 1, so that the prompts without a solution hold their place while the shared model "
      f"learns the rest; a weight does not move a row's zero, so the fixed point is the same (1: off; "
      f"{by_task('anchor')}; 1 with another logZ)")
    a("--no-detach", action="store_true", help="ablation: let the aux term send gradient to log P(stop)")
    a("--no-absorb", action="store_true", help="ablation: RapTB without absorbed targets")
    # the RL baselines (rloo, grpo, dpg; METHOD.md §9): on-policy at temperature 1, no replay
    a("--grpo-std-norm", action=argparse.BooleanOptionalAction, default=True, help="grpo: advantages (S - mean) / "
      "(std + 1e-4) and a per-sequence mean over actions, as practitioners run it; --no-grpo-std-norm is Dr. GRPO "
      "(S - mean and a constant normaliser: no length or difficulty weighting, Liu et al. 2025)")
    a("--grpo-clip", type=float, default=0.2, help="grpo: the ratio is clipped to [1 - eps, 1 + eps] (PPO's 0.2)")
    a("--grpo-beta", type=float, default=None, help="grpo: weight of the per-action k3 KL penalty to the reference "
      "(default kappa / lambda = 0.02, the weight of KL(q || P_ref) in the target's objective; TRL's default: 0.04 "
      "before v0.19, 0 since)")
    a("--grpo-epochs", type=int, default=1, help="grpo: optimiser steps on each sampled batch (q_old fixed); "
      "more reuse each reward call, 1 is on-policy and leaves the clip inert")
    # exploration and replay
    a("--replay", default=None, choices=["none", "rp", "prt", "subm", "oracle"],
      help="the replay buffer (default subm for the GFlowNet losses, Expr24's rp; none for rloo, grpo, dpg and "
      "oracle, whose gradients need their own samples); oracle, a diagnostic: replayed batches are exact samples of "
      "p* (a task that enumerates its target), which separates what an objective learns from what its sampler finds")
    a("--buffer-size", type=int, default=None,
      help=f"items the replay buffer keeps, per prompt with conditions ({by_task('buffer_size')}); SubM's "
           "greedy refresh of a full buffer slows fast as it grows: at 4,096 a step took 10-24 s (Expr24, "
           "RESULTS.md)")
    a("--p-replay-start", type=float, default=0.5, help="probability that a batch is replayed, at the start ...")
    a("--p-replay-end", type=float, default=0.25, help="... and at the end, linear in between")
    a("--temp-prob", type=float, default=None, help="probability of a tempered on-policy batch "
      "(default 0.666; 0 for rloo, grpo and dpg, which must sample at temperature 1)")
    a("--epsilon", type=float, default=0.0, help="exploration: at each step of an on-policy batch, a uniformly random "
      "allowed action with this probability instead of the policy's (torchgfn's epsilon); off-policy, the "
      "GFlowNet objectives keep R/Z as their fixed point (every object can still be drawn)")
    a("--local-search", type=int, default=0, metavar="K", help="exploration (Kim et al., ICLR 2024): each on-policy "
      "sample backs up K tokens, the policy regrows them, and the regrown object replaces it where its log R is at "
      "least as high; off-policy, so the GFlowNet objectives keep R/Z as their fixed point (a second sampling pass "
      "and two more reward passes per on-policy batch); 0: off")
    a("--explore-ref", type=int, default=None, metavar="N", help="exploration: each batch, N more objects drawn from "
      "the reference, which only enter the replay buffer (and --log-z seen's sum, ref's mean), no loss, so no fixed "
      "point moves: they find the solutions a narrowing policy stops drawing, which P_ref finds least likely (on Expr24 "
      "with four numbers, all of a run's distance from p*; RESULTS.md); costs N samples and final scores per batch "
      f"(prefix scores only for what can enter the buffer); 0: off ({by_task('explore_ref')}, "
      "GFlowNet losses)")
    a("--explore-from", choices=("reference", "uniform"), default=None, help="where --explore-ref's draws come "
      "from: the reference P_ref (a network pass per token), or the masked uniform policy U (uniform over the actions "
      "the task's mask allows at each state; no network pass, so thousands of draws cost what a few hundred reference "
      f"draws do); --log-z ref then weights each draw by P_ref / U, still unbiased (U has P_ref's support) "
      f"({by_task('explore_from')})")
    a("--t-lo-start", type=float, default=0.8, help="a tempered batch's temperature is uniform in [lo, hi]: lo at the "
      "start ...")
    a("--t-lo-end", type=float, default=1.0, help="... lo at the end (linear in between)")
    a("--t-hi-start", type=float, default=1.5, help="hi at the start ...")
    a("--t-hi-end", type=float, default=1.0, help="... hi at the end")
    # optimisation
    # these four (and --buffer-size) default to the task's choice (its `defaults`), else the paper's (PAPER_DEFAULTS)
    a("--steps", type=int, default=None, help=f"optimiser steps ({by_task('steps')})")
    a("--batch-size", type=int, default=None, help=f"sequences per batch ({by_task('batch_size')})")
    a("--grad-accum", type=int, default=None, help=f"batches per optimiser step ({by_task('grad_accum')})")
    a("--lr", type=float, default=None, help=f"learning rate of the network ({by_task('lr')})")
    a("--lr-logz", type=float, default=0.1, help="logZ's own learning rate (not stated in the paper)")
    a("--lr-schedule", default=None, choices=["constant", "cosine"], help="both learning rates over the run: cosine to "
      "0 (default cosine: the late steps average out sampling noise, which sets the last tenths of a nat) or the "
      "paper's constant")
    a("--paper", action="store_true", help="the paper's settings for every flag left unset: constant eta and learning "
      "rate (the defaults differ only there; see OURS and PAPER at the top of train.py; --conventions authors "
      "implies them)")
    a("--log-z", dest="log_z_mode", default=None, choices=["scalar", "head", "batch", "seen", "ref"],
      help="logZ: one learned scalar (default for a single prompt; Expr24's GFlowNet losses: ref); head: logZ(c) "
      "learned from the prompt's last hidden state (default with conditions); batch: no learned logZ, the mean of "
      "log R - log q over each condition's k samples (VarGrad), which is log Z(c) - KL(q||p*) in expectation, so "
      "biased low while q is far from p*; seen: no learned logZ, log(1 + the sum of R - P_ref over the distinct "
      "objects drawn so far), exact once every object with S > 0 has been drawn and a lower bound before, 0 for a "
      "prompt without a solution (kappa 1; METHOD.md §11.2; the Game of 24's default); ref: seen, or where larger the "
      "mean of R / P_ref over every --explore-ref draw, an unbiased estimate of Z near log Z long before every "
      "solution is drawn")
    a("--samples-per-prompt", type=int, default=None, help="k: each batch holds batch-size / k conditions x k "
      "samples (default: the whole batch; with conditions 8); --log-z batch needs k >= 2 to compare samples")
    a("--log-z-init", type=conventions.log_z_init, default="estimate",
      help="initial logZ, or 'estimate': the importance-sampling estimate log mean exp(log R - log q) of one batch")
    a("--weight-decay", type=float, default=0.01, help="AdamW's weight decay of the network")
    a("--grad-clip", type=float, default=0.5, help="clip the global gradient norm to this (the paper's 0.5)")
    a("--seed", type=int, default=0, help="the starting weights' and every sample's seed")
    # run
    a("--out", default="out", help="the run's folder: metrics.jsonl, checkpoints, curves.png")
    a("--ckpt-every", type=int, default=250, help="save a checkpoint every this many steps (and at the end)")
    a("--resume", action="store_true", help="continue from --out/latest with all its saved settings (--steps, "
      "--ckpt-every, ... included); a run-only or measuring flag given again replaces the saved one, said in one line")
    a("--overwrite", action="store_true", help="start afresh in an --out that already holds a run: its metrics.jsonl, "
      "checkpoints, curves.png and init/ are deleted first (without it such an --out is refused)")
    a("--score-timeout", type=float, default=300.0, help="your own score function: seconds one call may take before "
      "the run stops with one line (a hang otherwise prints nothing)")
    a("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    a("--eval-every", type=int, default=None, help="measure the distance to the target every N steps, at the start "
      "and at the end (METHOD.md §8; default --steps / 4; 0: never)")
    a("--eval-exact", action="store_true", help="measure exactly at every evaluation, not only the last (Expr24: "
      "one pass of the policy over all 113,662 solutions, about 8 s on one CPU core; for a KL-against-step curve)")
    a("--eval-n", type=int, default=256, help="policy samples (and as many reference samples) per measurement")
    a("--eval-n-final", type=int, default=1000, help="samples for the measurement at the end: at 256 + 256 a few "
      "invalid samples decide the estimate and its interval covers the truth about half the time (RESULTS.md)")
    a("--eval-prompts", type=int, default=32, help="with conditions: the prompts of each split measured (spread "
      "over the split, the same each time; 0: all), to keep a measurement to seconds")
    a("--wandb", default=None, metavar="PROJECT", help="also log metrics.jsonl's scalars to this Weights & Biases "
      "project (pip install wandb; WANDB_MODE=offline needs no account); metrics.jsonl stays the record")
    a("--tensorboard", action="store_true", help="also write them as TensorBoard events to OUT/tensorboard "
      "(pip install tensorboard)")
    # models that do not fit one GPU
    a("--fsdp", action="store_true", help="shard weights, gradients and optimizer state over the ranks (FSDP2)")
    a("--grad-ckpt", action="store_true", help="activation checkpointing: keep block inputs only, recompute in backward")
    conventions.add_arguments(p)
    return p


def fill_defaults(args, task, explicit=()):
    """Every flag left unset (None) gets its value here, the one place defaults are resolved, in this order."""
    # our schedules, or the paper's (--paper; --conventions authors implies it)
    for key, value in (PAPER if args.paper or args.conventions == "authors" else OURS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # the task's own (SMILES: its prior, 2..10 tokens; Expr24: 3..9 and its budget), else the paper's optimisation
    for key, value in {**PAPER_DEFAULTS, **GENERAL_DEFAULTS, **task_defaults(task, args.loss, args.replay)}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    # the loss's (own_samples)
    if args.replay is None:
        args.replay = "none" if own_samples(args.loss) else "subm"
    if not args.explore_ref:  # --explore-ref 0 under a recipe: where its draws come from and the logZ they make go too
        if "explore_from" not in explicit:
            args.explore_from = "reference"
        if args.log_z_mode == "ref" and "log_z_mode" not in explicit:
            args.log_z_mode = "seen"  # the same identity without the draws' mean
    if args.replay == "subm" and "buffer_size" not in explicit:  # a task's buffer for RP (Expr24's 131,072) would
        args.buffer_size = min(args.buffer_size, PAPER_DEFAULTS["buffer_size"])  # take SubM's refresh seconds a step
    if args.temp_prob is None:
        args.temp_prob = 0.0 if own_samples(args.loss) else 0.666
    if args.grpo_beta is None and args.lam > 0:
        args.grpo_beta = args.kappa / args.lam
    # conditions: logZ per prompt, k samples of each prompt per batch
    conditional = conditions.is_conditional(task)
    if args.log_z_mode is None:
        args.log_z_mode = "head" if conditional else "scalar"
    if args.samples_per_prompt is None:
        args.samples_per_prompt = min(args.batch_size, 8) if conditional else args.batch_size
    # --conventions authors: the authors' value of every convention flag not given
    conventions.apply(args, explicit)
    if args.log_z_mode not in ("seen", "ref") and "anchor" not in explicit:  # a task's anchor counts on the seen logZ
        args.anchor = 1.0
    if args.eta_end is None:  # --paper: eta throughout
        args.eta_end = args.eta


# ----------------------------------------------------------------------------- the checks

def first_problem(args, task, *found):
    """The first problem with the settings (the numbers, then `found`: the other modules' own checks, then the
    device, --out and the model's context), or None."""
    for problem in (number_problem(args), *found, device_problem(args.device), out_problem(args.out),
                    model_problem(args.model), context_problem(args, task)):
        if problem:
            return problem


def number_problem(args):
    """Flags out of range: finite floats, lengths, counts, probabilities, rates."""
    bad = [k for k, v in vars(args).items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        return f"--{bad[0].replace('_', '-')} must be a finite number (got {getattr(args, bad[0])})"
    if args.max_len < args.min_len or args.min_len < 0 or args.max_len < 1:
        return f"need 0 <= --min-len <= --max-len and --max-len >= 1 (got {args.min_len} and {args.max_len})"
    for name in ("kappa", "eps_absorb", "k_min_start", "k_min_end", "seed", "eta", "eta_end", "rho", "weight_decay",
                 "eval_every", "local_search", "huber", "explore_ref"):
        if (getattr(args, name) or 0) < 0:  # eval_every None: the default schedule
            return f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})"
    if args.horizon is not None and args.horizon < 1:
        return "--horizon must be at least 1"
    for name in ("steps", "batch_size", "grad_accum", "buffer_size", "ckpt_every", "eval_n", "eval_n_final"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    for name in ("p_replay_start", "p_replay_end", "temp_prob", "epsilon", "alpha", "gamma", "subtb_lam", "absorb_end", "eta_anneal"):
        if not 0 <= getattr(args, name) <= 1:
            return f"--{name.replace('_', '-')} must be in [0, 1]"
    for name in ("t_lo_start", "t_lo_end", "t_hi_start", "t_hi_end", "lr", "lr_logz", "beta", "anchor"):
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})"
    for name in ("grad_clip", "score_timeout"):
        if not getattr(args, name) > 0:
            return f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})"
    return run_problem(args)


def run_problem(args):
    """Flags that contradict each other or say nothing."""
    if args.resume and args.overwrite:
        return "--resume continues the run in --out and --overwrite deletes it: give one of them"
    if args.charset == "":
        return "--charset '' allows no character: name the characters a token may use, or leave it out for any"
    if args.explore_from != "reference" and not args.explore_ref:
        return (f"--explore-from {args.explore_from} says where --explore-ref's draws come from: "
                "give --explore-ref N too")
    if args.explore_ref and args.replay in ("none", "oracle"):
        return f"--explore-ref only fills the replay buffer, and --replay {args.replay} keeps none: give rp, prt or subm"
    if args.loss == "subtb" and args.min_len == args.max_len and args.prefix_root == "lmin":
        return (f"--loss subtb has no window when every object has {args.max_len} tokens: no proper prefix can stop, "
                f"so its loss is 0: use tb")


def device_problem(name):
    """Why --device names no device of this machine (None if it does)."""
    try:
        device = torch.device(name if name != "auto" else "cpu")
    except (RuntimeError, ValueError):
        return f"--device {name!r} is not a device (auto, cpu, cuda, cuda:1, mps, ...)"
    count = getattr(getattr(torch, device.type, None), "device_count", lambda: 0)()
    if device.type != "cpu" and (device.index or 0) >= count:
        return f"--device {name}: this machine (this torch build) has {count} {device.type} device(s)"


def out_problem(out):
    """Why --out cannot hold the run: a file, or under a folder that cannot be written (None if it can)."""
    if os.path.exists(out) and not os.path.isdir(out):
        return f"--out {out!r} is an existing file, not a folder"
    parent = os.path.abspath(out)
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        return f"--out {out!r} cannot be created or written ({parent!r} is not a writable folder)"


def model_problem(model):
    """Why a local folder given as --model holds no model (None if it may: hub names are checked when loaded)."""
    if model and os.path.isdir(model) and not os.path.isfile(os.path.join(model, "config.json")):
        return f"--model {model!r} is a folder without config.json: not a model folder (nor a ckpt-* folder of a run)"


def context_problem(args, task=None):
    """BOS + prompt + --max-len tokens must fit the model's positions, read from its config without the weights
    (with conditions, the longest condition's prompt). No check when the config cannot be read here (offline, not
    a model): loading the model says why later."""
    from transformers import AutoConfig, AutoTokenizer
    texts = [args.prompt + c for c in conditions.all_conditions(task)] or [args.prompt]
    if args.model is None:  # the task's scratch model, one token per character, built by run()
        n, prompt = inspect.signature(modellib.build_scratch_model).parameters["n_positions"].default, max(map(len, texts))
        charset = task.charset or ()  # the scratch model's vocabulary
        unknown = [c for c in dict.fromkeys(args.prompt) if c not in charset]
    else:
        try:
            path, remote = modellib.resolve(args.model), args.trust_remote_code
            config = AutoConfig.from_pretrained(path, trust_remote_code=remote).get_text_config()
            n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
            tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=remote)
            prompt = max(len(tokenizer(t, add_special_tokens=False).input_ids) if t else 0 for t in texts)
            unknown = unknown_text(tokenizer, args.prompt)
        except Exception:
            return None
    if unknown:  # the model would be prompted with <unk> in their place
        return (f"--prompt {args.prompt!r}: the model's tokenizer cannot represent {', '.join(map(repr, unknown))} "
                f"(it reads <unk> there); write the prompt without it")
    if n and 1 + prompt + args.max_len > n:
        return (f"--max-len {args.max_len} does not fit the model: BOS + {prompt} prompt tokens + {args.max_len} "
                f"> its {n} positions")


def unknown_text(tokenizer, text):
    """The pieces of `text` the tokenizer maps to its unknown token, in order (byte-level BPE has none). A fast
    tokenizer says which characters each token covers; a slow one is asked character by character."""
    unk = tokenizer.unk_token_id
    if not text or unk is None:
        return []
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        pieces = [text[a:b] for i, (a, b) in zip(enc.input_ids, enc.offset_mapping) if i == unk]
    except NotImplementedError:  # slow tokenizers have no offsets
        pieces = [c for c in text if unk in tokenizer(c, add_special_tokens=False).input_ids]
    return list(dict.fromkeys(pieces))


