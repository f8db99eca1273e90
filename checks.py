"""
train.py's flag checks, made before any work starts: numbers finite and in range, the device, --out, the model's
context and the prompt's tokens. Each says what is wrong in one line (train.py and sample.py print it as
`error: ...`, exit code 2), or None.
"""
import inspect
import math
import os

import torch

import conditions
import model as modellib


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
                 "eval_every"):
        if (getattr(args, name) or 0) < 0:  # eval_every None: the default schedule
            return f"--{name.replace('_', '-')} must be >= 0 (got {getattr(args, name)})"
    if args.horizon is not None and args.horizon < 1:
        return "--horizon must be at least 1"
    for name in ("steps", "batch_size", "grad_accum", "buffer_size", "ckpt_every", "eval_n", "eval_n_final"):
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be at least 1"
    for name in ("p_replay_start", "p_replay_end", "temp_prob", "alpha", "gamma", "subtb_lam", "absorb_end", "eta_anneal"):
        if not 0 <= getattr(args, name) <= 1:
            return f"--{name.replace('_', '-')} must be in [0, 1]"
    for name in ("t_lo_start", "t_lo_end", "t_hi_start", "t_hi_end", "lr", "lr_logz", "beta"):
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


