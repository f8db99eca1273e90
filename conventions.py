"""
The authors' training conventions as one switch (METHOD.md §10). `--conventions ours` (the default) is this
repository's behaviour, unchanged; `--conventions authors` gives every flag below that the user left unset the value
the authors' released code and experiment configs use, so that their regime can be run, and walked back to ours one
flag at a time. An explicit flag always wins over the switch.

    logZ           --lr-logz, --log-z-weight-decay, --log-z-init, --log-z-dtype
    log-probs      --log-probs masked|raw        (the loss and the reference; sampling and the meter stay masked)
    prefix root    --prefix-root lmin|s0         (RapTB's rooted residuals and SubTB's windows)
    Expr24 target  --expr24-target ours|authors  (digits 1-9 and their reward)
    replay         --replay-min-items, --replay-valid-only, --buffer-validity, --buffer-reward,
                   --subm-w-val, --subm-len-bin, --subm-len-power, --subm-diversity
    schedules      --anneal-span
and the authors' per-method settings (AUTHORS_PER_METHOD), which only --conventions authors applies.
"""
import argparse


UNSET = object()  # stands for "not on the command line" while finding the flags the user gave


def add_arguments(p):
    g = p.add_argument_group("the authors' conventions (METHOD.md §10; the defaults are ours)")
    a = g.add_argument
    a("--conventions", default="ours", choices=["ours", "authors"],
      help="authors: every flag of this group, and the per-method settings, as in the authors' code, unless given")
    a("--log-z-dtype", default="float32", choices=["float32", "bfloat16"],
      help="logZ's storage; the authors train the whole module in bf16, where logZ stalls at 2^-4 (METHOD.md §10)")
    a("--log-z-weight-decay", type=float, default=0.0,
      help="logZ's AdamW weight decay (authors: the network's, logZ sits in its one optimiser group)")
    a("--log-probs", default="masked", choices=["masked", "raw"],
      help="raw: the loss and the reference read the full-vocabulary log-softmax (masks shape sampling only)")
    a("--prefix-root", default="lmin", choices=["lmin", "s0"],
      help="s0: RapTB's rooted residuals and SubTB's windows use every state from s_0 (needs --log-probs raw)")
    a("--expr24-target", default="ours", choices=["ours", "authors"],
      help="Expr24 only. authors: digits 1-9, and a solution of length L_max earns log R = lambda exactly")
    a("--replay-min-items", type=int, default=1, help="replay starts once the buffer holds this many (authors: a batch)")
    a("--replay-valid-only", action=argparse.BooleanOptionalAction, default=None,
      help="only valid items enter the buffer (default off; game24 on; authors: SubM, where 'valid' is "
           "--buffer-validity)")
    a("--buffer-validity", default=None, choices=["task", "score"],
      help="score: an item is valid when its score is > 0, as the authors' buffers read it (Expr24 and the Game of "
           "24: correct); default task; game24 score")
    a("--buffer-reward", default="final", choices=["final", "max-prefix", "prefix-sum"],
      help="an item's r(x) in the buffer: the score; the best prefix score (authors' SMILES SubM); or the sum of "
           "log R over its proper prefixes (authors' RP and PRT ranking)")
    a("--subm-w-val", type=float, default=1.0, help="SubM's validity weight w_val (authors: 10 for Expr24 RapTB)")
    a("--subm-len-bin", type=int, default=1, help="SubM's length bins, in tokens (authors: 2 on Expr24)")
    a("--subm-len-power", type=float, default=0.0,
      help="SubM's bin weights a_b = ((b + 1) / n_bins)^p; 0: all 1 (authors: 1, Expr24 RapTB 2)")
    a("--subm-diversity", default="coverage", choices=["coverage", "authors"],
      help="SubM's diversity gain: facility location (METHOD.md §4), or the authors' 1 - max similarity")
    a("--anneal-span", type=float, default=1.0,
      help="the linear schedules run over this many times --steps (authors' SMILES TB and SubTB: 10)")


def log_z_init(text):
    """--log-z-init: a number, or 'estimate' for the importance-sampling estimate (None)."""
    return None if text == "estimate" else float(text)


def explicit_flags(make_parser, argv, dests):
    """The flags on the command line: a second parse in which every default is UNSET (an object, never a string,
    so that argparse converts nothing) tells what was given from what was defaulted."""
    q = make_parser()
    q.set_defaults(**dict.fromkeys(dests, UNSET))
    return {k for k, v in vars(q.parse_args(argv)).items() if v is not UNSET}


# ----------------------------------------------------------------------------- the authors' settings

# What the authors' configs set per method (ComDec/ChemGFN, configs/experiment/), keyed (task, loss, replay);
# replay None: every replay. Under --conventions authors only, and only for flags left unset.
AUTHORS_PER_METHOD = {
    # smiles/{tb,subtb,tb_subm,subtb_subm}.yaml: the schedules' horizon is 50,000 steps in a 5,000-step run
    # (RapTB's configs: 5,000), so a tenth of each anneal happens
    ("smiles", "tb", None): dict(anneal_span=10.0),
    ("smiles", "subtb", None): dict(anneal_span=10.0),
    # expr24/subm_raptb.yaml
    ("expr24", "raptb", "subm"): dict(eta=0.1, alpha=0.5, beta=3.0, rho=0.3, k_min_start=7, k_min_end=3,
                                      subm_w_val=10.0, subm_len_power=2.0),
    # expr24/rp_raptb.yaml and prt_raptb.yaml
    ("expr24", "raptb", "rp"): dict(eta=0.25, alpha=0.8, beta=3.0, rho=0.5, k_min_start=7, k_min_end=3),
    ("expr24", "raptb", "prt"): dict(eta=0.25, alpha=0.8, beta=3.0, rho=0.5, k_min_start=7, k_min_end=3),
}


def authors_settings(args):
    """The authors' value of every convention flag for this task, loss and replay (after the task's defaults)."""
    expr24 = args.task == "expr24"
    s = dict(lr_logz=args.lr, log_z_weight_decay=args.weight_decay, log_z_init=0.0, log_z_dtype="bfloat16", huber=0.0,
             log_probs="raw", replay_min_items=args.batch_size, buffer_validity="score",
             replay_valid_only=args.replay == "subm", subm_diversity="authors", subm_w_val=1.0,
             subm_len_bin=2 if expr24 else 1, subm_len_power=1.0,
             buffer_reward="prefix-sum" if args.replay in ("rp", "prt") else "final" if expr24 else "max-prefix")
    if expr24:
        s["expr24_target"] = "authors"
    if args.log_z_mode in ("seen", "ref"):  # seen: a task's default (the Game of 24); the authors learn logZ(c)
        s["log_z_mode"] = "head"
    s.update(AUTHORS_PER_METHOD.get((args.task, args.loss, None), {}))
    s.update(AUTHORS_PER_METHOD.get((args.task, args.loss, args.replay), {}))
    return s


def apply(args, explicit):
    """--conventions authors: the authors' value for every convention flag not in `explicit`. The s_0 root needs
    raw log-probs, so it follows --log-probs when only that is given."""
    if args.conventions != "authors":
        return
    for name, value in authors_settings(args).items():
        if name not in explicit:
            setattr(args, name, value)
    if "prefix_root" not in explicit:
        args.prefix_root = "s0" if args.log_probs == "raw" else "lmin"


def problem(args):
    """Why these convention flags cannot run together (None if they can)."""
    if args.prefix_root == "s0" and args.log_probs != "raw":
        return ("--prefix-root s0 needs --log-probs raw: under the mask a state whose stop is masked has "
                "log q(stop) = -inf and cannot be a rooted prefix")
    if args.expr24_target != "ours" and args.task != "expr24":
        return "--expr24-target is for --task expr24"
    if args.buffer_reward == "prefix-sum" and args.replay == "subm":
        return "--buffer-reward prefix-sum is RP/PRT's ranking key; SubM needs a score in [0, 1]"
    if min(args.replay_min_items, args.subm_len_bin) < 1 or args.anneal_span < 1:
        return "--replay-min-items, --subm-len-bin and --anneal-span must be at least 1"
    if min(args.subm_w_val, args.subm_len_power, args.log_z_weight_decay) < 0:
        return "--subm-w-val, --subm-len-power and --log-z-weight-decay must be >= 0"


def describe(args):
    """One line naming the regime and, under the authors', what it set."""
    if args.conventions != "authors":
        return "conventions: ours"
    keys = authors_settings(args).keys() | {"prefix_root"}
    return "conventions: authors (" + ", ".join(f"{k}={getattr(args, k)}" for k in sorted(keys)) + ")"


# ----------------------------------------------------------------------------- the task

def task_for(args, task):
    """The task these conventions train on: Expr24 with the authors' digits and reward under --expr24-target."""
    if args.expr24_target == "authors":
        from tasks.expr24.task import Expr24AuthorsTask
        return Expr24AuthorsTask()
    return task
