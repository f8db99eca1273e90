"""
The policy (METHOD.md §1): a Hugging Face causal LM whose next-token distribution is restricted to the task's
actions (allowlisted tokens + EOS as the stop action), with L_min <= tau <= L_max enforced on the stop action.
The same masked distribution is used to sample and to compute log-probabilities for the loss.
"""
import contextlib
import copy
import inspect
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from fast_gpt2 import GPT2Decoder

HERE = os.path.dirname(os.path.abspath(__file__))
# the embedded models, by the names --model and old checkpoints use: whole molecules, side chains (METHOD.md §6.1),
# the Game of 24 (§11.3)
EMBEDDED = {"prior": "tasks/smiles/prior", "prior_sidechain": "tasks/smiles/prior_sidechain",
            "prior_game24": "tasks/game24/prior"}
DEFAULT_MODEL = os.path.join(HERE, EMBEDDED["prior"])


class ModelError(RuntimeError):
    """A model or checkpoint that cannot be loaded; train.py and sample.py print it as one line."""


def first_line(error):
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def one_line(error, limit=300):
    """The whole message of `error` on one line (a library's message may span several), at most `limit` characters."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def resolve(name):
    """'prior', 'prior_sidechain' and 'prior_game24' mean the embedded models wherever the scripts are run from;
    anything else is passed on."""
    return os.path.join(HERE, EMBEDDED[name]) if name in EMBEDDED else name


def load_model(name, *, lora=False, adapter=None, dtype=torch.float32, trust_remote_code=False):
    """Load a causal LM and its tokenizer by hub name or local path (from the local cache when offline).
    With `lora`, wrap it in fresh LoRA adapters (paper: r=16, alpha=16, dropout 0.1 on every attention and MLP
    projection); with `adapter`, load trained LoRA adapters from that folder instead."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging
    logging.disable_progress_bar()  # one bar per run (train.py's), not one per weight file
    name = resolve(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, trust_remote_code=trust_remote_code,
                                                     use_safetensors=True)  # weights never from a pickle
    except Exception as e:  # OSError, ValueError, safetensors errors, ...: all mean "this is not a usable model"
        where = ("not a model folder: no config.json" if not os.path.isfile(os.path.join(name, "config.json")) else
                 "its files are incomplete or damaged") if os.path.isdir(name) else \
            "not a model folder, or not in the local Hugging Face cache while offline"
        raise ModelError(f"cannot load model {name!r} ({where}): {one_line(e)}") from None
    if tokenizer.eos_token_id is None:
        raise ModelError(f"model {name!r}: its tokenizer has no EOS token to use as the stop action")
    # GFlowNet residuals compare log-probs taken in different calls, so the base network must be deterministic:
    # switch its dropout off (LoRA's own dropout, added below, is the paper's regulariser and stays).
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    fuse_gelu(model)
    if lora or adapter:
        from peft import LoraConfig, PeftModel, get_peft_model
        if adapter:
            try:
                model = PeftModel.from_pretrained(model, adapter, is_trainable=True)
            except Exception as e:
                raise ModelError(f"cannot load LoRA adapter {adapter!r} onto {name!r}: {first_line(e)}") from None
        else:
            config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear")
            model = get_peft_model(model, config)
    return model, tokenizer


def cache_argument(net):
    """The name of the key-value cache in the network's forward and output: `cache` since transformers renamed
    `past_key_values` (which then warns on every call), `past_key_values` before."""
    base = net.get_base_model() if hasattr(net, "get_base_model") else net  # LoRA: PEFT's forward takes **kwargs
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def fuse_gelu(model):
    """GPT-2's gelu_new is the tanh GELU written as five tensor ops, each kept for backward; torch's native
    F.gelu(approximate="tanh") is the same function (to ~1e-7) in one kernel, 10-15% of a CPU forward+backward."""
    from transformers.activations import NewGELUActivation
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, NewGELUActivation):
                setattr(module, name, torch.nn.GELU(approximate="tanh"))


def state_mask_for(state_mask, action_texts, max_len):
    """A task's state_mask(action_texts) called for these actions (None without one); a mask that plans ahead, like
    the SMILES syntax's budget, takes L_max as well."""
    if state_mask is None:
        return None
    return state_mask(action_texts, max_len) if "max_len" in inspect.signature(state_mask).parameters \
        else state_mask(action_texts)


class Policy:
    """Masked action space over a causal LM. Action columns: the allowlisted token ids, then EOS (= stop).
    `reference` is the frozen starting model for log P_ref; None means "this model with LoRA disabled".
    `state_mask` is a task's `state_mask(action_texts)` method (METHOD.md §1): it returns None, or
    fn(prev [B, k] action columns chosen so far, k) -> [B, A] bool of the actions allowed next, which is ANDed
    with the length bounds in every state, the same way when sampling, in log_probs and for the reference."""

    def __init__(self, model, tokenizer, allowed_ids, min_len, max_len, prompt="", reference=None, state_mask=None):
        if not 0 <= min_len <= max_len:
            raise ValueError(f"need 0 <= min_len <= max_len, got {min_len}, {max_len}")
        self.model, self.reference, self.tokenizer = model, reference, tokenizer
        self.min_len, self.max_len = min_len, max_len
        self.eos = tokenizer.eos_token_id
        device = next(model.parameters()).device
        self.actions = torch.tensor(sorted(set(allowed_ids) - {self.eos}) + [self.eos], device=device)
        self.stop = len(self.actions) - 1
        self.action_of = torch.full((max(len(tokenizer), int(self.actions.max()) + 1),), self.stop,
                                    device=device)
        self.action_of[self.actions] = torch.arange(len(self.actions), device=device)
        # the text each action appends (decoded one token at a time, so prefixes can be scored cheaply)
        texts = tokenizer.batch_decode([[int(a)] for a in self.actions[:-1]], clean_up_tokenization_spaces=False)
        self.token_texts = dict(zip(self.actions[:-1].tolist(), texts))
        self.action_texts = texts + [""]  # "" = the stop's text
        self.task_mask = state_mask_for(state_mask, self.action_texts, max_len)
        self.prompt = torch.tensor(self.encode_prompt(prompt), device=device)
        self.ref_cache = {}  # fidelity's log P_ref of listed objects, shared by every view (with_prompts copies)

    def encode_prompt(self, prompt):
        """BOS (EOS for a tokenizer without one) + the prompt's tokens, as a list of ids."""
        start = self.tokenizer.bos_token_id if self.tokenizer.bos_token_id is not None else self.eos
        return [start] + (self.tokenizer(prompt, add_special_tokens=False).input_ids if prompt else [])

    def with_prompts(self, prompt, task_mask):
        """The same policy (same networks) with another prompt and task mask (METHOD.md §11): `prompt` is [P] ids
        shared by every row or [n, P], one prompt per row (all of one token length, so no padding is needed:
        sampling and log_probs then take exactly n rows); `task_mask` is fn(prev, k) -> [n, A] bool, or None."""
        view = copy.copy(self)
        view.prompt, view.task_mask = prompt.to(self.device), task_mask
        return view

    @property
    def device(self):
        return self.prompt.device

    def action_log_probs(self, logits, k, allowed=None):
        """Masked log-softmax over the actions at states with k generated tokens: stop only once k >= L_min,
        tokens only while k < L_max, and of those only the `allowed` ones (the task mask, [..., A] bool, or
        None), except that at k = L_max the stop is forced whatever the task mask says, so that no state is left
        without an action. logits [..., V]; k an int or a tensor broadcastable to logits[..., 0]."""
        return self._masked_log_softmax(logits[..., self.actions].float(), k, allowed)

    def _masked_log_softmax(self, x, k, allowed):  # action_log_probs on the action columns x [..., A]
        return torch.log_softmax(x.masked_fill(~self._action_mask(x, k, allowed), float("-inf")), -1)

    def _action_mask(self, x, k, allowed):
        """The actions action_log_probs leaves finite, a bool tensor shaped like x [..., A]."""
        k = torch.as_tensor(k, device=x.device)
        go = (k < self.max_len).unsqueeze(-1).expand_as(x[..., :-1])
        stop = (k >= self.min_len).unsqueeze(-1).expand_as(x[..., -1:])
        if allowed is not None:
            go = go & allowed[..., :-1]
            stop = stop & (allowed[..., -1:] | (k == self.max_len).unsqueeze(-1))
        return torch.cat([go, stop], -1)

    def allowed_actions(self, tokens, depth, lengths):
        """The task mask at every state k = 0..depth of each row, [B, depth + 1, A]; None without one. States
        past a row's end (k > tau) allow every action: their values are dropped later, but a fully masked row
        would make the log-softmax NaN, and NaN poisons backward even through torch.where."""
        if self.task_mask is None:
            return None
        prev = self.action_of[tokens[:, :depth]]
        allowed = torch.stack([self.task_mask(prev[:, :k], k) for k in range(depth + 1)], 1)
        past_end = torch.arange(depth + 1, device=allowed.device)[None] > lengths[:, None]
        return allowed | past_end[..., None]

    def log_probs(self, tokens, lengths, reference=False, raw=False):
        """One teacher-forced pass over prompt + tokens: log_pf [B, T] (log q(y_{k+1} | s_k), k < tau) and
        log_pterm [B, T] (log q(stop | s_k), k <= tau), zero past tau, T = L_max + 1. With `raw`, the authors'
        convention for the loss and the reference (METHOD.md §10): both are read off the full-vocabulary
        log-softmax, no mask applied, and the stop at L_max keeps its own log-prob."""
        net = self.model if not reference else (self.reference or self.model)
        depth = int(lengths.max()) if len(lengths) else 0
        read = depth if raw else min(depth, self.max_len - 1)  # masked: at L_max stop is forced (log 1 = 0)
        ids = torch.cat([self.prompt.expand(len(tokens), -1), tokens[:, :read]], 1)
        k = torch.arange(depth + 1, device=ids.device)
        allowed = None if raw else self.allowed_actions(tokens, read, lengths)
        decoder = GPT2Decoder.for_model(net, len(ids), 0, self.actions) \
            if self.fast_gpt2 and not raw and not torch.is_grad_enabled() else None
        if decoder is not None:  # no gradient (the reference pass): the decoder's arithmetic, teacher-forced
            logits = decoder.teacher_forced(ids)[:, self.prompt.shape[-1] - 1:]
            logp = self._masked_log_softmax(logits, k[:read + 1], allowed)
        else:
            with self._adapters_off() if reference and self.reference is None else contextlib.nullcontext(), \
                    self._autocast():
                logits = net(input_ids=ids).logits[:, self.prompt.shape[-1] - 1:]  # state k is read at prompt end + k
            logp = torch.log_softmax(logits.float(), -1)[..., self.actions] if raw else \
                self.action_log_probs(logits, k[:read + 1], allowed)
        log_pterm = F.pad(logp[..., self.stop], (0, depth - read))
        next_action = self.action_of[tokens[:, :depth]]
        log_pf = F.pad(logp[:, :depth].gather(-1, next_action.unsqueeze(-1)).squeeze(-1), (0, 1))
        live = k[None] < lengths[:, None]
        log_pf = torch.where(live, log_pf, 0.0)
        log_pterm = torch.where(k[None] <= lengths[:, None], log_pterm, 0.0)
        pad = self.max_len - depth  # back to the fixed width of the loss contract
        return F.pad(log_pf, (0, pad)), F.pad(log_pterm, (0, pad))

    @torch.no_grad()
    def log_ref_stop(self, tokens, lengths, raw=False):
        """log P_ref(s_k T) = sum_{t<k} log p_ref(y_{t+1} | s_t) + log p_ref(stop | s_k), [B, T] (raw: log_probs)."""
        log_pf, log_pterm = self.log_probs(tokens, lengths, reference=True, raw=raw)
        return torch.cumsum(log_pf, 1) - log_pf + log_pterm

    def stop_allowed(self, tokens, lengths):
        """[B, L_max + 1] bool: where action_log_probs allows the stop (k >= L_min, and the task mask allows it or
        k = L_max), and everywhere past a row's end."""
        k = torch.arange(self.max_len + 1, device=tokens.device)
        ok = (k >= self.min_len)[None].expand(len(tokens), -1)
        if self.task_mask is not None:
            ok = ok & (self.allowed_actions(tokens, self.max_len, lengths)[..., -1] | (k == self.max_len))
        return ok | (k[None] > lengths[:, None])

    def _adapters_off(self):
        return self.model.disable_adapter()

    def _autocast(self):  # bf16 matmuls on GPU; log-softmax and everything after it stay in float32
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda")

    @torch.no_grad()
    def sample(self, n, temperature=1.0, reference=False, epsilon=0.0, prefix=None, uniform=False):
        """Sample n sequences with a KV cache at `temperature` (masked logits / temperature); from the reference
        P_ref instead of the policy with `reference` (the fidelity meter's second proposal); from the masked
        uniform policy U, no network pass, with `uniform` (--explore-from uniform). With `epsilon`, each
        step takes a uniformly random allowed action with that probability (exploration: the sampler is then
        (1 - epsilon) q + epsilon U at every state, full support under the mask). With `prefix` ([n, c] action
        token ids), each row continues that prefix instead of starting empty (local search's regrowth).
        Returns tokens [n, L_max] (EOS past tau), lengths [n], and log_q [n, T]: the log-prob of each chosen
        action under the temperature-1 sampler (for checks and for the CSV's log-prob column)."""
        if uniform:
            return self._sample(None, n, 1.0, 0.0, prefix)
        if reference:
            with self._adapters_off() if self.reference is None else contextlib.nullcontext():
                return self._sample(self.reference or self.model, n, temperature, epsilon, prefix)
        return self._sample(self.model, n, temperature, epsilon, prefix)

    # False: sampling and the passes without gradient (the reference's) run the network's own (Hugging Face) forward
    fast_gpt2 = True

    def _sample(self, net, n, temperature, epsilon=0.0, prefix=None):
        was_training = self.model.training
        self.model.eval()
        T = self.max_len + 1
        tokens = torch.full((n, self.max_len), self.eos, device=self.device)
        lengths = torch.full((n,), self.max_len, device=self.device)
        log_q = torch.zeros(n, T, device=self.device)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        # a plain GPT-2 on CPU decodes with its own static KV cache and the action rows of the LM head only;
        # anything else (LoRA, FSDP, other architectures, GPU) runs the network's forward with HF's cache
        decoder = GPT2Decoder.for_model(net, n, self.prompt.shape[-1] + self.max_len, self.actions) \
            if self.fast_gpt2 and net is not None else None
        if decoder is not None:  # the length bounds: 0 / -inf per state k, read off action_log_probs itself
            probe = torch.zeros(T, len(self.action_of), device=self.device)
            bias = torch.zeros(T, len(self.actions), device=self.device).masked_fill_(
                self.action_log_probs(probe, torch.arange(T, device=self.device)).isneginf(), float("-inf"))
        ids, past, cache_name = self.prompt.expand(n, -1), None, net and cache_argument(net)
        start = 0 if prefix is None else prefix.shape[1]
        if start:  # the prefix is read in the first forward, then sampling goes on from state s_start
            tokens[:, :start] = prefix
            ids = torch.cat([ids, prefix.to(ids.device)], 1)
        for k in range(start, T):
            if k == self.max_len:  # the stop is forced whatever the logits (METHOD.md §1): q(T | s_Lmax) = 1, so the
                break  # rows still going end here with what they hold (tau = L_max, log q = 0), and no forward runs
            allowed = None
            if self.task_mask is not None:  # finished rows allow everything: what they draw is ignored
                allowed = self.task_mask(self.action_of[tokens[:, :k]], k) | done[:, None]
            if net is None:  # the masked uniform policy (temperature and epsilon leave it as it is)
                a, log_qk = self._uniform_draw(n, k, allowed)
            else:
                if decoder is not None:  # [n, A] logits of the action columns
                    logits = decoder(ids)
                else:
                    with self._autocast():
                        out = net(input_ids=ids, **{cache_name: past}, use_cache=True)
                    past, logits = getattr(out, cache_name), out.logits[:, -1]
                a, log_qk = self._draw(logits, k, allowed, None if decoder is None else bias[k], temperature, epsilon)
            log_q[:, k] = torch.where(done, 0.0, log_qk)
            stopping = (a == self.stop) & ~done
            lengths.masked_fill_(stopping, k)
            done |= stopping
            if self._all_done(done):
                break
            tokens[:, k] = torch.where(done, self.eos, self.actions[a])  # finished rows keep EOS
            ids = tokens[:, k:k + 1]
        self.model.train(was_training)
        return tokens, lengths, log_q

    def _draw(self, logits, k, allowed, bias, temperature, epsilon):
        """One action per row from the policy's logits at states with k tokens, and its log q. `bias`: the
        decoder's action-column logits come with the length bounds as 0 / -inf (x + 0 is x, x + -inf is masked),
        so only the task mask is left to apply."""
        if bias is not None:
            logp = logits + bias
            logp = torch.log_softmax(logp if allowed is None else logp.masked_fill_(~allowed, float("-inf")), -1)
        else:
            logp = self.action_log_probs(logits, k, allowed)
        if allowed is not None:
            self._check_some_action(logp.isfinite(), k)  # a row all masked is NaN, not -inf
        probs = torch.softmax(logp / temperature if temperature != 1 else logp, -1)
        if epsilon:  # the masked uniform policy mixed in: every allowed action keeps probability >= epsilon / A
            allowed_now = logp.isfinite().to(probs.dtype)
            probs = (1 - epsilon) * probs + epsilon * allowed_now / allowed_now.sum(-1, keepdim=True)
        a = torch.multinomial(probs, 1).squeeze(-1)
        return a, logp.gather(-1, a[:, None]).squeeze(-1)

    @staticmethod
    def _check_some_action(ok, k):
        """One line, not a sampler's NaN, where the task's mask leaves a row ([n, A] bool `ok`) no action."""
        if not bool(ok.any(-1).all()):
            raise ValueError(f"the task's state mask and L_min leave no action at a state with {k} tokens")

    def _uniform_draw(self, n, k, allowed):
        """One action per row uniform over those action_log_probs allows at k tokens, and its log q = -log(count):
        the largest of independent uniform keys falls on each allowed action equally often (float64 keys: a tie,
        which argmax would settle by the lower index, has odds of about 1e-14). No softmax, no multinomial."""
        ok = self._action_mask(torch.zeros(n, len(self.actions), device=self.device), k, allowed)
        if allowed is not None:
            self._check_some_action(ok, k)
        count = ok.sum(-1)
        keys = torch.rand(n, len(self.actions), dtype=torch.float64, device=self.device)
        a = keys.masked_fill_(~ok, -1.0).argmax(-1)
        return a, -count.float().log()

    sync_ranks = False  # train.py --fsdp: every forward is a collective, so all ranks must stop sampling together

    def _all_done(self, done):
        """Every sequence has stopped; with sync_ranks, on every rank (a rank done early keeps stepping, harmlessly:
        finished rows are frozen)."""
        if not self.sync_ranks:
            return bool(done.all())
        flag = done.all().float().reshape(1)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MIN)
        return bool(flag)

    def texts(self, tokens, lengths):
        """The generated string of each row (concatenated token texts, no EOS)."""
        text_of = self.token_texts.__getitem__  # map with a bound lookup: 7x a generator on 4,096 rows
        return ["".join(map(text_of, row[:tau])) for row, tau in zip(tokens.tolist(), lengths.tolist())]


def frozen_copy(model):
    """The reference network without LoRA: a copy of the starting weights that never trains."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def fit_texts(model, tokenizer, texts, steps=600, batch_size=32, lr=3e-3):
    """Plain maximum likelihood (teacher forcing) on BOS + text + EOS, the way Policy reads a sequence, with
    AdamW and a linearly decaying learning rate; batches come from torch's global RNG. The scratch model's
    600 default steps take about half a minute of one CPU core."""
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [[bos] + ids + [eos] for ids in tokenizer(list(texts), add_special_tokens=False).input_ids]
    width = max(map(len, rows))
    ids = torch.tensor([row + [pad] * (width - len(row)) for row in rows])
    targets = ids[:, 1:].masked_fill(ids[:, 1:] == pad, -100)  # padding only follows EOS: no attention mask needed
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / max(steps, 1))
    model.train()
    for _ in tqdm(range(steps), desc="fitting the reference", leave=False, mininterval=1):
        batch = torch.randint(len(rows), (batch_size,))
        inputs = ids[batch, :-1]  # every position attends: padding only follows EOS and is never a target
        logits = model(input_ids=inputs, attention_mask=torch.ones_like(inputs)).logits
        loss = F.cross_entropy(logits.flatten(0, 1), targets[batch].flatten(), ignore_index=-100)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


def scratch_model_once(path, task, seed, min_len, max_len):
    """A task without a pretrained model (Expr24): a tiny one at `path`, built once (a resumed or repeated run finds
    it there), warm-started on random valid objects, since a random model is no prior."""
    if os.path.isdir(path):
        return path
    torch.manual_seed(seed)
    texts = task.random_objects(20000, np.random.default_rng(seed), min_len, max_len)
    return build_scratch_model(path, sorted(task.charset), warmup_texts=texts,
                               **getattr(task, "scratch_model", {}))  # e.g. Expr24's width and depth


def build_scratch_model(path, alphabet, warmup_texts=None, warmup_steps=600, n_layer=3, n_embd=64, n_head=4,
                        n_positions=32, seed=None):
    """A tiny character-level GPT-2 for a task with a small alphabet (Expr24), saved with save_pretrained into
    `path` so that load_model(path) and AutoTokenizer.from_pretrained(path) load it like any hub model. One token
    per character plus <pad> <s> </s> <unk>; decoding concatenates without spaces. Randomly initialised, then,
    given `warmup_texts`, fitted to them by maximum likelihood (fit_texts) so that as P_ref it is a sensible
    prior rather than noise. The weights and batches come from torch's global RNG (seed it first), or from
    `seed` alone, leaving the global RNG untouched."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = sorted(set(alphabet))
    vocab = {t: i for i, t in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # every character is a word
    tok.decoder = decoders.Fuse()  # join tokens with nothing in between
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                        unk_token="<unk>", clean_up_tokenization_spaces=False)
    config = GPT2Config(vocab_size=len(vocab), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                        bos_token_id=vocab["<s>"], eos_token_id=vocab["</s>"], pad_token_id=vocab["<pad>"],
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,  # load_model drops dropout anyway; fits faster
                        activation_function="gelu_pytorch_tanh")  # GPT-2's GELU, in one native op: 2x faster on CPU
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        if warmup_texts is not None:
            fit_texts(model, tokenizer, warmup_texts, steps=warmup_steps)
    tmp = path + ".tmp"  # renamed into place once whole: a run stopped while writing it leaves no half a model
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    os.replace(tmp, path)
    return path
