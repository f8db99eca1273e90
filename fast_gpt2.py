"""
A plain Hugging Face GPT-2 on the CPU without its module machinery (METHOD.md §1): the same arithmetic as its
forward, for the two passes that need no gradient and whose cost on a tiny model is mostly per-call overhead:
sampling token by token (a static KV cache, the action columns of the head) and the reference's teacher-forced
pass. `GPT2Decoder.for_model` returns None for anything else (LoRA, FSDP, a GPU, other architectures, a hook),
which then runs the network's own forward.
"""
import torch
import torch.nn.functional as F


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


class GPT2Decoder:
    """Incremental decoding for Policy._sample of a plain Hugging Face GPT-2 (GPT2LMHeadModel in float32 on the
    CPU, no hook but transformers' own): the same arithmetic as its forward, up to float rounding, without the
    module machinery: the weights are read once, the KV cache is preallocated for the whole sequence (static), the
    prompt is computed once for all rows, and the LM head computes the action columns only. Calling it with the
    next ids [n, L] (L > 1 only for the prompt) returns the logits [n, A] of the actions after the last of them;
    `teacher_forced` reads a whole batch at once, with the network's own head (the reference pass)."""

    ACTIVATIONS = {"gelu_new": _gelu_tanh, "gelu_pytorch_tanh": _gelu_tanh, "gelu": F.gelu, "relu": F.relu,
                   "silu": F.silu, "swish": F.silu}  # gelu_new is GPT-2's tanh approximation, fused here

    @classmethod
    def for_model(cls, net, n, length, actions):
        try:
            from transformers import GPT2LMHeadModel
        except ImportError:
            return None
        if type(net) is not GPT2LMHeadModel or n < 1:  # LoRA (peft) and FSDP wrap or subclass it: not this path
            return None
        c = net.config
        if (getattr(c, "add_cross_attention", False) or c.activation_function not in cls.ACTIVATIONS
                or getattr(net.lm_head, "bias", None) is not None
                or any(p.device.type != "cpu" or p.dtype != torch.float32 for p in net.parameters())
                or any(cls._foreign_hook(h) for m in net.modules()
                       for h in (*m._forward_hooks.values(), *m._forward_pre_hooks.values()))
                or net.training and any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in net.modules())):
            return None
        return cls(net, n, length, actions)

    @staticmethod
    def _foreign_hook(hook):
        """A hook that may change what the forward computes; transformers' own output-capturing hooks, which it puts
        on every layer the first time hidden states are asked for (the logZ head's prompt_states), only record."""
        return getattr(hook, "__module__", None) != "transformers.utils.output_capturing"

    def __init__(self, net, n, length, actions):
        c, t = net.config, net.transformer
        self.E, self.H = c.n_embd, c.n_head
        self.D, self.eps = self.E // self.H, c.layer_norm_epsilon
        self.act = self.ACTIVATIONS[c.activation_function]
        scale = self.D ** -0.5 if c.scale_attn_weights else 1.0
        self.layers = [(b.ln_1.weight, b.ln_1.bias, b.attn.c_attn.weight, b.attn.c_attn.bias, b.attn.c_proj.weight,
                        b.attn.c_proj.bias, b.ln_2.weight, b.ln_2.bias, b.mlp.c_fc.weight, b.mlp.c_fc.bias,
                        b.mlp.c_proj.weight, b.mlp.c_proj.bias,
                        scale / (i + 1) if c.scale_attn_by_inverse_layer_idx else scale)
                       for i, b in enumerate(t.h)]
        self.wte, self.wpe, self.ln_f = t.wte.weight, t.wpe.weight, (t.ln_f.weight, t.ln_f.bias)
        self.head = net.lm_head.weight[actions]  # [A, E]: the action rows only
        self.vocab_head, self.actions = net.lm_head.weight, actions
        self.n, self.pos = n, 0
        self.k = torch.empty(len(self.layers), n, self.H, length, self.D)
        self.v = torch.empty_like(self.k)

    def __call__(self, ids):
        n, L = ids.shape
        if self.pos == 0 and n > 1 and bool((ids == ids[:1]).all()):  # the shared prompt: once, broadcast
            return self._forward(ids[:1]).expand(n, -1)
        return self._forward(ids)

    def _forward(self, ids):
        m, L = ids.shape  # m = 1 for the shared prompt, else n
        p, H, D = self.pos, self.H, self.D
        assert L == 1 or p == 0, "several new tokens only at the start"
        h = self._embed(ids, p)
        for i, layer in enumerate(self.layers):
            qkv = self._qkv(h, layer).view(m, L, 3, H, D)
            k, v = self.k[i, :, :, :p + L], self.v[i, :, :, :p + L]
            k[:, :, p:].copy_(qkv[:, :, 1].transpose(1, 2))  # m = 1 broadcasts into every row
            v[:, :, p:].copy_(qkv[:, :, 2].transpose(1, 2))
            q = qkv[:, :, 0].transpose(1, 2)
            if m != self.n:
                k, v = k[:m], v[:m]
            h = self._rest(h, F.scaled_dot_product_attention(q, k, v, is_causal=L > 1, scale=layer[-1]), layer)
        self.pos += L
        return self._head(h.view(m, L, self.E)[:, -1])

    def teacher_forced(self, ids):
        """The action logits after every position of ids [n, L] at once, [n, L, A], with no cache (the reference
        pass, under no_grad: what the network's forward computes, without the module machinery)."""
        m, L = ids.shape
        h = self._embed(ids, 0)
        for layer in self.layers:
            q, k, v = self._qkv(h, layer).view(m, L, 3, self.H, self.D).permute(2, 0, 3, 1, 4)
            h = self._rest(h, F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=layer[-1]), layer)
        return self._head(h, full=True).view(m, L, -1)

    def _embed(self, ids, p):
        return (F.embedding(ids, self.wte) + self.wpe[p:p + ids.shape[1]]).view(-1, self.E)

    def _qkv(self, h, layer):
        w1, b1, wa, ba = layer[:4]
        return torch.addmm(ba, F.layer_norm(h, (self.E,), w1, b1, self.eps), wa)

    def _rest(self, h, o, layer):
        """The attention's projection and the MLP, each added to the residual stream h [m * L, E]; o [m, H, L, D]."""
        wp, bp, w2, b2, wf, bf, wo, bo = layer[4:12]
        h = torch.addmm(bp, o.transpose(1, 2).reshape(h.shape), wp).add_(h)
        return torch.addmm(bo, self.act(torch.addmm(bf, F.layer_norm(h, (self.E,), w2, b2, self.eps), wf)), wo).add_(h)

    def _head(self, h, full=False):
        h = F.layer_norm(h, (self.E,), *self.ln_f, self.eps)
        if full:  # the network's own product over the whole vocabulary, then the action columns: its very bits
            return torch.mm(h, self.vocab_head.t())[:, self.actions]
        return torch.mm(h, self.head.t())
