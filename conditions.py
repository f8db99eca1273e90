"""
Conditions (METHOD.md §11): tasks whose prompt varies. A conditional task carries `conditions`, a dict of splits
{"train": [prompt texts], "heldout": [...]}, and `given(prompt)`, the task of one condition (its score, validity,
canonical form, state mask, ...), which follows rewards.Task's protocol like any unconditional task. A batch holds
m conditions x k samples; the policy and the reference read each row's condition in its prompt (BOS + --prompt +
the condition's text), and each row's log R, logZ and replay buffer are its condition's.

Rows whose prompts have the same number of tokens are sampled and teacher-forced together (the prompt is then an
[n, P] tensor, model.Policy.with_prompts), so nothing is padded: every row sees exactly the ids it would see alone,
and the GPT-2 fast decoder still applies. Prompts of different lengths go in separate passes.

Batches, scores and the loss are train.py's and batches.py's, the same for both kinds of task: a condition is a
property of a row. What is here is what only a task with conditions needs: the policy over conditions and logZ per
condition (the buffer per condition is replay.ConditionalBuffer). A task without conditions comes here only with
--log-z head|batch|seen|ref, which runs it as a task with one condition, its --prompt.
"""
import inspect
import math
import os

import numpy as np
import torch

import model as modellib
import rewards
from batches import draw_conditions, score_rows
from distributed import average_across_ranks
from replay import ConditionalBuffer, buffer_options, keeps_buffer

SEEN_MODES = ("seen", "ref")  # the logZ modes that count what the run has drawn (SeenLogZ)


def is_conditional(task):
    return getattr(task, "conditions", None) is not None


class OnePrompt:
    """An unconditional task seen as a conditional one with a single condition, the empty text (so the prompt is
    BOS + --prompt, as before): what --log-z head|batch need to run on it."""

    def __init__(self, task):
        self.task, self.conditions = task, dict(train=[""], heldout=[])

    def __getattr__(self, name):
        return getattr(self.task, name)

    def given(self, prompt):
        return self.task


def as_conditional(task):
    return task if is_conditional(task) else OnePrompt(task)


def all_conditions(task):
    """Every condition of every split (none for an unconditional task)."""
    return [c for split in (task.conditions.values() if is_conditional(task) else ()) for c in split]


def read_prompts(path):
    """One prompt per line, as written (blank lines skipped)."""
    try:
        with open(path, encoding="utf-8") as f:
            prompts = [line.rstrip("\r\n") for line in f if line.strip()]
    except OSError as e:
        raise rewards.TaskError(f"cannot read prompts file {path!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:  # a binary file, or another encoding
        raise rewards.TaskError(f"prompts file {path!r} is not UTF-8 text (byte {e.object[e.start]:#04x} at "
                                f"offset {e.start})") from None
    if not prompts:
        raise rewards.TaskError(f"prompts file {path!r} holds no prompt")
    return list(dict.fromkeys(prompts))


def prompt_parameter(fn):
    """How a score function takes prompts: "required", "optional" (a default or **kwargs) or None."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return None
    if "prompts" in params:
        return "required" if params["prompts"].default is inspect.Parameter.empty else "optional"
    return "optional" if any(p.kind is p.VAR_KEYWORD for p in params.values()) else None


class PromptSet:
    """A task trained on the prompts of a file (train.py --prompts) and measured on those of another
    (--heldout-prompts). Each prompt's task is the task's own `given` for a conditional task; for a score function
    that takes `prompts`, that function called with the prompt of every text (TRL's convention); else the task
    itself (a reward that does not read the prompt)."""

    def __init__(self, task, train, heldout=()):
        self.task, self.conditions, self._given = task, dict(train=list(train), heldout=list(heldout)), {}
        for prompt in self.conditions["train"] + self.conditions["heldout"]:
            self.given(prompt)  # a prompt the task refuses fails here, before any work

    def __getattr__(self, name):
        return getattr(self.task, name)

    def given(self, prompt):
        if prompt not in self._given:
            task = self.task
            if is_conditional(task):
                task = task.given(prompt)
            elif isinstance(task, rewards.ScoreFunctionTask) and prompt_parameter(task.fn):
                fn = task.fn
                task = rewards.ScoreFunctionTask(lambda texts: fn(texts, prompts=[prompt] * len(texts)), task.name,
                                                 task.charset, task.timeout)
            self._given[prompt] = task
        return self._given[prompt]


def with_prompt_files(task, train=None, heldout=None):
    if train is None:
        if heldout is not None:
            raise rewards.TaskError("--heldout-prompts needs --prompts (the prompts to train on)")
        if isinstance(task, rewards.ScoreFunctionTask) and prompt_parameter(task.fn) == "required":
            raise rewards.TaskError(f"score function {task.name} takes prompts: give them with --prompts FILE")
        return task
    return PromptSet(task, read_prompts(train), read_prompts(heldout) if heldout else ())


def runs_conditional(args, task):
    return is_conditional(task) or args.log_z_mode in ("head", "batch") + SEEN_MODES


def flag_problem(args, task):
    """Why the conditional flags do not fit (None if they do)."""
    conditional = is_conditional(task)
    k = args.samples_per_prompt
    if args.log_z_mode == "scalar" and conditional:
        return "--log-z scalar: each condition has its own Z(c); use --log-z head or --log-z batch"
    if k < 1 or args.batch_size % k:
        return f"--samples-per-prompt {k} must divide --batch-size {args.batch_size}"
    mode = args.log_z_mode
    if mode in SEEN_MODES and (args.kappa != 1 or args.log_probs == "raw"):
        return (f"--log-z {mode} needs --kappa 1 and normalised log-probs: it counts on P_ref summing to 1 over the "
                "objects; give --log-z head otherwise")
    if mode in SEEN_MODES and int(os.environ.get("WORLD_SIZE", 1)) > 1:
        return f"--log-z {mode} counts one process's draws: under torchrun give --log-z head"
    if mode == "ref" and not args.explore_ref:
        return "--log-z ref averages over the reference's draws: give --explore-ref N (N > 0) too"
    if args.anchor != 1 and mode not in SEEN_MODES:
        return "--anchor weighs the rows of prompts with no solution drawn yet, which only --log-z seen or ref counts"
    if args.log_z_mode == "batch" and k < 2:
        return "--log-z batch needs --samples-per-prompt >= 2 (one sample's estimate is its own log R - log q)"
    if args.eval_prompts < 0:
        return "--eval-prompts must be >= 0"
    if conditional and (args.loss == "dpg" or (args.loss == "grpo" and args.grpo_epochs > 1)):
        return (f"--loss {args.loss}{' with --grpo-epochs > 1' if args.loss == 'grpo' else ''} runs on one prompt; "
                f"with conditions use rloo or grpo (one group per condition)")
    if conditional and args.loss in ("rloo", "grpo") and k < 2:
        return f"--loss {args.loss} compares each condition's samples: it needs --samples-per-prompt >= 2"
    if args.fsdp and runs_conditional(args, task):
        return "--fsdp runs one prompt: conditions and --log-z head|batch are not supported with it yet"
    return None


def build(args, task, policy):
    """The conditional run's task, policy, replay buffer and logZ (with its parameters)."""
    task = as_conditional(task)
    policy = ConditionalPolicy(policy, task, args.prompt)
    buffer = ConditionalBuffer(args.replay, args.buffer_size, task.similarity, **buffer_options(args)) \
        if keeps_buffer(args) else None
    return task, policy, buffer, make_condition_log_z(args, policy)


# ----------------------------------------------------------------------------- the policy over conditions

class ConditionalPolicy:
    """A model.Policy whose rows each carry a condition: sample / log_probs / log_ref_stop take the rows'
    conditions (prompt texts) and run one pass per prompt length. Everything else (model, tokenizer, texts, ...)
    is the wrapped Policy's. `template` (train.py --prompt) is put before every condition's text."""

    def __init__(self, policy, task, template=""):
        self.policy, self.task, self.template = policy, task, template
        self._ids, self._masks = {}, {}

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def prompt_ids(self, condition):
        if condition not in self._ids:
            self._ids[condition] = self.policy.encode_prompt(self.template + condition)
        return self._ids[condition]

    def _mask(self, condition):
        if condition not in self._masks:
            given = self.task.given(condition).state_mask
            self._masks[condition] = modellib.state_mask_for(given, self.policy.action_texts, self.policy.max_len)
        return self._masks[condition]

    def view(self, conditions):
        """A Policy for rows with these conditions (one per row, all of one prompt length)."""
        distinct = list(dict.fromkeys(conditions))
        if len(distinct) == 1:
            return self.policy.with_prompts(torch.tensor(self.prompt_ids(distinct[0])), self._mask(distinct[0]))
        ids = torch.tensor([self.prompt_ids(c) for c in conditions])
        rows_mask = getattr(self.task, "rows_mask", None)
        if rows_mask is not None:
            return self.policy.with_prompts(ids, rows_mask(self.policy.action_texts, conditions))
        return self.policy.with_prompts(ids, self._rows_mask(conditions))

    def _rows_mask(self, conditions):
        """Each row's condition's own mask, called once per condition."""
        parts = [(self._mask(c), torch.tensor([i for i, x in enumerate(conditions) if x == c]))
                 for c in dict.fromkeys(conditions)]
        if all(fn is None for fn, _ in parts):
            return None

        def allowed(prev, k):
            out = torch.ones(len(prev), len(self.policy.actions), dtype=torch.bool, device=prev.device)
            for fn, rows in parts:
                if fn is not None:
                    rows = rows.to(prev.device)
                    out[rows] = fn(prev[rows], k)
            return out
        return allowed

    def groups(self, conditions):
        """Row indices by prompt length, in order of first appearance."""
        length, by_length = {c: len(self.prompt_ids(c)) for c in dict.fromkeys(conditions)}, {}
        for i, c in enumerate(conditions):
            by_length.setdefault(length[c], []).append(i)
        return [torch.tensor(rows) for rows in by_length.values()]

    def sample(self, conditions, temperature=1.0, reference=False, epsilon=0.0, prefix=None, uniform=False):
        """One sample per entry of `conditions`: tokens [n, L_max], lengths [n], log_q [n, T] (Policy.sample)."""
        n, T = len(conditions), self.policy.max_len + 1
        tokens = torch.full((n, self.policy.max_len), self.policy.eos, device=self.policy.device)
        lengths = torch.zeros(n, dtype=torch.long, device=self.policy.device)
        log_q = torch.zeros(n, T, device=self.policy.device)
        for rows in self.groups(conditions):
            view = self.view([conditions[i] for i in rows.tolist()])
            t, l, q = view.sample(len(rows), temperature, reference, epsilon, None if prefix is None else prefix[rows],
                                  uniform)
            rows = rows.to(tokens.device)
            tokens[rows], lengths[rows], log_q[rows] = t, l, q
        return tokens, lengths, log_q

    def log_probs(self, tokens, lengths, conditions, reference=False, raw=False):
        """Policy.log_probs with each row's prompt: log_pf, log_pterm [B, T]."""
        groups = self.groups(conditions)
        if len(groups) == 1:
            return self.view(conditions).log_probs(tokens, lengths, reference, raw)
        out = [None, None]
        for rows in groups:
            rows = rows.to(tokens.device)
            parts = self.view([conditions[i] for i in rows.tolist()]).log_probs(tokens[rows], lengths[rows],
                                                                                 reference, raw)
            for j, part in enumerate(parts):
                if out[j] is None:
                    out[j] = part.new_zeros(len(tokens), part.shape[1])
                out[j] = out[j].index_put((rows,), part)  # out of place: autograd sees every group
        return tuple(out)

    @torch.no_grad()
    def log_ref_stop(self, tokens, lengths, conditions, raw=False):
        log_pf, log_pterm = self.log_probs(tokens, lengths, conditions, reference=True, raw=raw)
        return torch.cumsum(log_pf, 1) - log_pf + log_pterm

    def stop_allowed(self, tokens, lengths, conditions):
        """Policy.stop_allowed under each row's own mask."""
        out = torch.zeros(len(tokens), self.policy.max_len + 1, dtype=torch.bool, device=tokens.device)
        for rows in self.groups(conditions):
            rows = rows.to(tokens.device)
            out[rows] = self.view([conditions[i] for i in rows.tolist()]).stop_allowed(tokens[rows], lengths[rows])
        return out

    def prompt_states(self, conditions):
        """The policy network's last hidden state at the last prompt position of each condition, [n, E] (with
        gradient): what the logZ head reads."""
        unique = list(dict.fromkeys(conditions))
        states = {}
        for rows in self.groups(unique):
            ids = torch.tensor([self.prompt_ids(unique[i]) for i in rows], device=self.policy.device)
            with self.policy._autocast():
                hidden = self.policy.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][:, -1]
            states.update({unique[i]: h for i, h in zip(rows.tolist(), hidden.float())})
        return torch.stack([states[c] for c in conditions])


def hidden_size(policy):
    return policy.model.get_input_embeddings().embedding_dim


class LogZHead(torch.nn.Module):
    """logZ(c) = w . h(c) + b, h(c) the policy's last hidden state at the end of c's prompt (METHOD.md §11.2).
    w starts at 0, so logZ(c) starts at b for every condition; a prompt never trained on still gets a value."""

    def __init__(self, size, init=0.0, dtype=torch.float32):
        super().__init__()
        self.linear = torch.nn.Linear(size, 1, dtype=dtype)  # bf16: --log-z-dtype, the authors' storage
        with torch.no_grad():
            self.linear.weight.zero_()
            self.linear.bias.fill_(init)

    def forward(self, states):
        return self.linear(states.to(self.linear.weight.dtype)).squeeze(-1).float()


def batch_log_z(conditions, log_pf, log_pterm, log_r, lengths):
    """logZ(c) = the mean of log R(x) - log q(x) over the rows of condition c (detached), one value per row: at
    q = p* every term is log Z(c); under q it is log Z(c) - KL(q || p*) in expectation (METHOD.md §11.2)."""
    with torch.no_grad():
        tau = lengths[:, None]
        log_w = (log_r.gather(1, tau) - log_pterm.gather(1, tau)).squeeze(1) - torch.where(
            torch.arange(log_pf.shape[1], device=log_pf.device)[None] < tau, log_pf, 0.0).sum(1)
        index = {c: i for i, c in enumerate(dict.fromkeys(conditions))}
        group = torch.tensor([index[c] for c in conditions], device=log_w.device)
        sums = torch.zeros(len(index), dtype=log_w.dtype, device=log_w.device).index_add_(0, group, log_w)
        counts = torch.bincount(group, minlength=len(index)).to(log_w.dtype)
        return (sums / counts)[group]


class SeenLogZ(torch.nn.Module):
    """--log-z seen: logZ(c) from the objects the run has drawn for c; nothing is learned (METHOD.md §11.2). With
    kappa = 1 and P_ref summing to 1, Z(c) = 1 + sum_x (R(x|c) - P_ref(x|c)), where only objects with R != P_ref
    (S != 0) count. So logZ(c) = log(1 + the sum over the drawn objects with R > P_ref) is exact once every such
    object has been drawn and, with S >= 0, a lower bound before; a prompt without a solution has exactly 0.
    --log-z ref also reads the same identity as Z(c) = E_{x ~ P_ref}[R / P_ref] (add_reference): the mean of
    R / P_ref - 1 over the reference's draws is an unbiased estimate of the sum with bounded weights, near it long
    before every solution is drawn, and logZ(c) takes the larger of the two. Its one parameter is unused: it keeps
    logZ's optimiser group. The objects and sums ride in checkpoints (extra state)."""

    def __init__(self, device):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros((), device=device))
        self.found = {}  # condition -> the objects (token tuples) with R > P_ref drawn so far
        self.log_sum = {}  # condition -> log of their sum of R - P_ref
        self.n_ref = {}  # --log-z ref: condition -> the reference's draws counted, repeats too (each is a sample)
        self.log_excess = {}  # condition -> log of the sum over them of R / P_ref - 1 (0 for an object with S = 0)

    def add(self, conditions, tokens, lengths, log_r, log_ref):
        """Count the rows' objects not counted yet: log(R - P_ref) = log R + log(1 - P_ref / R)."""
        final_r = log_r.gather(1, lengths[:, None]).squeeze(1).double().tolist()
        final_ref = log_ref.gather(1, lengths[:, None]).squeeze(1).double().tolist()
        for c, row, tau, lr, lp in zip(conditions, tokens.tolist(), lengths.tolist(), final_r, final_ref):
            x = tuple(row[:tau])
            if lr > lp and x not in self.found.get(c, ()):
                self.found.setdefault(c, set()).add(x)
                self.log_sum[c] = float(np.logaddexp(self.log_sum.get(c, -np.inf), lr + np.log(-np.expm1(lp - lr))))

    def add_reference(self, drawn, conditions, tokens, lengths, log_r, log_ref, log_proposal=None):
        """Count the reference's draws (`drawn`: each draw's condition), and add the rows of those among them with
        R > P_ref (the others add 0 to either sum) to the mean and, like add, to the seen sum:
        log(R / P_ref - 1) = log expm1(u). Draws from another proposal Q with the same support (--explore-from
        uniform; `log_proposal`: the rows' log Q(x)) are weighted by P_ref / Q, the mean of (R - P_ref) / Q."""
        for c in drawn:
            self.n_ref[c] = self.n_ref.get(c, 0) + 1
        at_end = lambda v: v.gather(1, lengths[:, None]).squeeze(1).double()
        u = at_end(log_r - log_ref)
        shift = torch.zeros_like(u) if log_proposal is None else at_end(log_ref) - log_proposal.to(u)
        for c, u_x, s in zip(conditions, u.tolist(), shift.tolist()):
            if u_x > 0:
                log_w = s + u_x + np.log(-np.expm1(-u_x))
                self.log_excess[c] = float(np.logaddexp(self.log_excess.get(c, -np.inf), log_w))
        self.add(conditions, tokens, lengths, log_r, log_ref)

    def values(self, conditions):
        mean = {c: v - math.log(self.n_ref[c]) for c, v in self.log_excess.items()}
        return [float(np.logaddexp(0.0, max(self.log_sum.get(c, -np.inf), mean.get(c, -np.inf)))) for c in conditions]

    def row_weights(self, conditions, weight):
        """--anchor: `weight` for the rows of a condition with no object counted yet, 1 for the others."""
        return torch.tensor([1.0 if c in self.found else weight for c in conditions])

    def get_extra_state(self):
        return {name: [[c, [list(x) for x in v] if name == "found" else v] for c, v in getattr(self, name).items()]
                for name in ("found", "log_sum", "n_ref", "log_excess")}

    def set_extra_state(self, state):
        try:
            found = {c: {tuple(int(t) for t in x) for x in xs} for c, xs in state["found"]}
            log_sum = {c: float(v) for c, v in state["log_sum"]}
            n_ref = {c: int(n) for c, n in state.get("n_ref", [])}  # a checkpoint from before --log-z ref: none
            log_excess = {c: float(v) for c, v in state.get("log_excess", [])}
        except (KeyError, TypeError, ValueError):
            raise modellib.ModelError("corrupt checkpoint: its --log-z seen state is not what train.py writes") from None
        self.found, self.log_sum, self.n_ref, self.log_excess = found, log_sum, n_ref, log_excess


def row_log_z(args, log_z, policy, conditions, tokens, log_pf, log_pterm, log_r, log_ref, lengths):
    """Each row's logZ for the losses: the head's value for its condition, the batch estimate, or what the run has
    seen (this batch included)."""
    if args.log_z_mode == "batch":
        return batch_log_z(conditions, log_pf, log_pterm, log_r, lengths)
    if args.log_z_mode in SEEN_MODES:
        log_z.add(conditions, tokens, lengths, log_r, log_ref)
        return torch.tensor(log_z.values(conditions), dtype=torch.float32, device=log_r.device)
    return log_z(policy.prompt_states(conditions))


def make_condition_log_z(args, policy):
    """The learned part of logZ and its parameters (logZ's own optimiser group): the head, the seen objects, or for
    --log-z batch the unused scalar that keeps the optimiser's and the checkpoint's layout."""
    if args.log_z_mode in SEEN_MODES:
        log_z = SeenLogZ(policy.device)
        return log_z, list(log_z.parameters())
    if args.log_z_mode == "head":
        dtype = torch.bfloat16 if args.log_z_dtype == "bfloat16" else torch.float32
        head = LogZHead(hidden_size(policy), dtype=dtype).to(policy.device)
        return head, list(head.parameters())
    log_z = torch.nn.Parameter(torch.zeros((), device=policy.device))
    return log_z, [log_z]


def init_log_z(args, log_z, task, policy):
    """The head's bias starts at --log-z-init, else at the mean over one batch's conditions of the
    importance-sampling estimate log mean exp(log R - log q) from k samples each (batches.estimate_log_z)."""
    if args.log_z_mode != "head":
        return
    value = args.log_z_init
    if value is None:
        conditions = draw_conditions(args, task, np.random.default_rng(args.seed))
        tokens, lengths, log_q = policy.sample(conditions)
        log_r = score_rows(args, task, policy, tokens, lengths, None, conditions)[0]
        log_w = log_r.gather(1, lengths[:, None]).squeeze(1).double() - log_q.sum(1).double()
        per = [torch.logsumexp(log_w[[i for i, x in enumerate(conditions) if x == c]], 0)
               - math.log(conditions.count(c)) for c in dict.fromkeys(conditions)]
        value = average_across_ranks([torch.stack(per).mean().cpu()])[0].item()
    with torch.no_grad():
        log_z.linear.bias.fill_(value)


def learned_log_z(args, log_z, policy, conditions):
    """logZ(c) of the learned head, or of the seen objects, for each condition (None without either), for the meter."""
    if args.log_z_mode in SEEN_MODES:
        return log_z.values(conditions)
    if args.log_z_mode != "head":
        return [None] * len(conditions)
    with torch.no_grad():
        return log_z(policy.prompt_states(conditions)).tolist()
