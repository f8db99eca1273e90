"""
The training step as it was before issue 15, kept only so that `python bench.py step` (bench_step.py) can time
today's step against it in the same run: the sampler on Hugging Face's forward and cache, the teacher-forced pass
that read the forced last state, the lazy greedy without groups, the SubM refresh that fingerprinted every item
and recomputed the whole similarity matrix, and GPT-2's gelu_new as Hugging Face computes it.
"""
import contextlib

import numpy as np
import torch

from replay import GreedyState, SubMBuffer
from similarity import bigram_fp, jaccard_matrix, morgan_fp, tanimoto_matrix


def legacy_sample(policy, net, n, temperature=1.0):
    """Policy._sample before the GPT-2 decoder: the network's own Hugging Face forward and cache at every step."""
    was_training = policy.model.training
    policy.model.eval()
    T = policy.max_len + 1
    tokens = torch.full((n, policy.max_len), policy.eos, device=policy.device)
    lengths = torch.full((n,), policy.max_len, device=policy.device)
    log_q = torch.zeros(n, T, device=policy.device)
    done = torch.zeros(n, dtype=torch.bool, device=policy.device)
    ids, past = policy.prompt.expand(n, -1), None
    with torch.no_grad():
        for k in range(T):
            with policy._autocast():
                out = net(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            allowed = None
            if policy.task_mask is not None:
                allowed = policy.task_mask(policy.action_of[tokens[:, :k]], k) | done[:, None]
            logp = policy.action_log_probs(out.logits[:, -1], k, allowed)
            if allowed is not None and bool(logp.isneginf().all(-1).any()):
                raise ValueError(f"the task's state mask and L_min leave no action at a state with {k} tokens")
            a = torch.multinomial(torch.softmax(logp / temperature, -1), 1).squeeze(-1)
            log_q[:, k] = torch.where(done, 0.0, logp.gather(-1, a[:, None]).squeeze(-1))
            stopping = (a == policy.stop) & ~done
            lengths[stopping] = k
            done |= stopping
            if policy._all_done(done):
                break
            tokens[~done, k] = policy.actions[a[~done]]
            ids = tokens[:, k:k + 1]
    policy.model.train(was_training)
    return tokens, lengths, log_q


def legacy_log_probs(policy, tokens, lengths, reference=False):
    """Policy.log_probs before it skipped the last state at L_max (where the stop is forced): every state read."""
    import torch.nn.functional as F
    net = policy.model if not reference else (policy.reference or policy.model)
    depth = int(lengths.max()) if len(lengths) else 0
    ids = torch.cat([policy.prompt.expand(len(tokens), -1), tokens[:, :depth]], 1)
    with torch.no_grad() if reference else contextlib.nullcontext(), policy._autocast():
        logits = net(input_ids=ids).logits[:, len(policy.prompt) - 1:]
    k = torch.arange(depth + 1, device=ids.device)
    logp = policy.action_log_probs(logits, k, policy.allowed_actions(tokens, depth, lengths))
    log_pterm = logp[..., policy.stop]
    log_pf = F.pad(logp[:, :-1].gather(-1, policy.action_of[tokens[:, :depth]].unsqueeze(-1)).squeeze(-1), (0, 1))
    log_pf = torch.where(k[None] < lengths[:, None], log_pf, 0.0)
    log_pterm = torch.where(k[None] <= lengths[:, None], log_pterm, 0.0)
    pad = policy.max_len - depth
    log_pf, log_pterm = F.pad(log_pf, (0, pad)), F.pad(log_pterm, (0, pad))
    return (torch.cumsum(log_pf, 1) - log_pf + log_pterm) if reference else (log_pf, log_pterm)


def legacy_lazy_greedy(state, k):
    """replay._lazy_greedy before the groups of items that cover nothing."""
    import heapq
    n = len(state.scores)
    heap = [(-g, i) for i, g in enumerate(state.gains(np.arange(n)).tolist())]
    heapq.heapify(heap)
    fresh_at = [0] * n
    picks, gains = [], []
    for step in range(k):
        while True:
            neg_g, i = heap[0]
            if fresh_at[i] == step:
                heapq.heappop(heap)
                break
            g = state.gain(i)
            fresh_at[i] = step
            heapq.heapreplace(heap, (-g, i))
        picks.append(i)
        gains.append(-neg_g)
        state.add(i)
    return picks, gains


class LegacySubMBuffer(SubMBuffer):
    """SubMBuffer's refresh before: every entering item fingerprinted (parsed again), the whole similarity matrix
    recomputed by one BLAS product, lazy greedy without the groups. Keeps the same items as SubMBuffer."""

    def add(self, items):
        from dataclasses import replace
        entered = []
        for it in items:
            fp = morgan_fp(it.text, it.valid) if self.similarity == "tanimoto" else bigram_fp(it.text)
            entered.append(replace(it, tokens=tuple(it.tokens), fp=fp))
        ground = self._dedupe(self.items + entered)
        if self.valid_only:
            ground = [it for it in ground if it.valid]
        self.items = ground if len(ground) <= self.capacity else self._legacy_select(ground)

    def _legacy_select(self, ground):
        scores = np.array([self.w_rew * it.score + self.w_val * it.valid for it in ground])
        bins = np.array([it.length // self.len_bin_size for it in ground])
        a = None
        if self.bin_weights == "authors":
            n_bins = int(bins.max()) + 1
            a = ((np.arange(n_bins) + 1.0) / n_bins) ** self.len_power
        fps = [it.fp for it in ground]
        sim = tanimoto_matrix(np.stack(fps)) if self.similarity == "tanimoto" else jaccard_matrix(fps)
        state = GreedyState(scores, sim, bins, self.capacity, self.w_div, self.w_len, a, self.diversity)
        picks = legacy_lazy_greedy(state, min(self.capacity, len(ground)))[0]
        return [ground[i] for i in np.sort(picks)]


def set_gelu(policy, fused):
    """GPT-2's MLP activation gelu_new as Hugging Face computes it (five Python-level tensor ops, each kept for
    backward) or fused into one kernel as load_model leaves it (model.fuse_gelu)."""
    from transformers.activations import NewGELUActivation
    for net in (policy.model, policy.reference):
        for m in (net.modules() if net is not None else ()):
            if type(m).__name__ == "GPT2MLP":
                m.act = torch.nn.GELU(approximate="tanh") if fused else NewGELUActivation()
