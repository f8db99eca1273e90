"""A diagnostic, not the trainer's: how much do the reference's own rollouts, failures included, say about p*? It
learns V(s) = P_ref(Sol | s) by Monte-Carlo classification (a copy of the reference's body and a scalar head, binary
cross-entropy of each rollout's score at each of its prefixes, STEPS steps of 512 rollouts, Adam 1e-3 cosine) on
R rollouts of P_ref, then measures KL(p*||pi_V) of the value-guided policy pi_V(a|s) = P_ref(a|s) V(s a) / N(s)
(the stop's V is the prefix's own score), which is p* itself when V is exact, on 2,000 exact samples of p*.

    python results/cover/onpolicy/value_probe.py OUT/init 240000 3000     # OUT/init: an Expr24 run's reference
"""
import copy, math, os, sys, time
import numpy as np, torch, torch.nn.functional as F
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import fidelity, oracle, train
torch.manual_seed(0); torch.set_num_threads(1)
MODEL, R, STEPS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
args = train.get_args(["--task", "expr24", "--model", MODEL])
task = train.build_task(args)
policy = train.build_policy(args, task)
ref = policy.reference; ref.eval()
P = policy.prompt.shape[-1]; L = policy.max_len; A = len(policy.actions)
t0 = time.process_time()
toks, lens = [], []
with torch.no_grad():
    for i in range(0, R, 4096):
        t, l, _ = policy.sample(min(4096, R - i), reference=True)
        toks.append(t); lens.append(l)
toks, lens = torch.cat(toks), torch.cat(lens)
texts = policy.texts(toks, lens)
S = torch.tensor([task.score(x) for x in texts])
print(f"{R} rollouts, {int(S.sum())} solutions ({S.mean():.4f}), cpu {time.process_time() - t0:.0f}s", flush=True)

body = copy.deepcopy(ref.transformer).train()
for p in body.parameters():
    p.requires_grad_(True)
head = torch.nn.Linear(body.config.n_embd, 1)
torch.nn.init.zeros_(head.weight); head.bias.data.fill_(math.log(S.mean() / (1 - S.mean())))
opt = torch.optim.Adam(list(body.parameters()) + list(head.parameters()), lr=1e-3)
def values(ids):  # logit of V at every position (state read at prompt end + k)
    return head(body(input_ids=ids).last_hidden_state).squeeze(-1)
k = torch.arange(L + 1)
g = torch.Generator().manual_seed(0)
for step in range(STEPS):
    lr = 1e-3 * 0.5 * (1 + math.cos(math.pi * step / STEPS))
    for grp in opt.param_groups: grp["lr"] = lr
    idx = torch.randint(0, R, (512,), generator=g)
    ids = torch.cat([policy.prompt.expand(512, -1), toks[idx, :L]], 1)
    z = values(ids)[:, P - 1:P + L]  # states k = 0..L
    live = k[None] <= lens[idx, None]
    loss = F.binary_cross_entropy_with_logits(z, S[idx, None].expand_as(z), reduction="none")[live].mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if step % 500 == 0: print(step, round(loss.item(), 5), flush=True)
print(f"classifier trained, cpu {time.process_time() - t0:.0f}s", flush=True)

body.eval()
target = oracle.SolutionTarget(policy, task, args.lam)
rng = np.random.default_rng(1)
M = 2000
st, sl = target.sample(policy, M, rng)
with torch.no_grad():
    ids = torch.cat([policy.prompt.expand(M, -1), st[:, :L - 1]], 1)
    logits = ref(input_ids=ids).logits[:, P - 1:]
    kk = torch.arange(L)
    logp = policy.action_log_probs(logits, kk, policy.allowed_actions(st, L - 1, sl))  # [M, L, A], states 0..L-1
    log_ref_x = (torch.where(kk[None] < sl[:, None], logp.gather(-1, policy.action_of[st[:, :L]].unsqueeze(-1)).squeeze(-1), 0.0)).sum(1)
    log_ref_x = log_ref_x + torch.where(sl < L, logp[torch.arange(M), sl.clamp(max=L - 1), policy.stop], torch.zeros(M))
    log_v_child = torch.full((M, L, A), -math.inf)
    for depth in range(L):
        base = torch.cat([policy.prompt.expand(M, -1), st[:, :depth]], 1)
        kids = torch.cat([base.repeat_interleave(A - 1, 0), policy.actions[:-1].repeat(M)[:, None]], 1)
        out = torch.cat([F.logsigmoid(values(kids[i:i + 8192])[:, -1]) for i in range(0, len(kids), 8192)])
        log_v_child[:, depth, :A - 1] = out.view(M, A - 1)
        prefix_text = policy.texts(st[:, :depth], sl.clamp(max=depth))
        log_v_child[:, depth, A - 1] = torch.tensor([0.0 if task.score(x) == 1.0 else -math.inf for x in prefix_text])
    log_n = torch.logsumexp(logp + log_v_child, -1)  # [M, L]
    nxt = policy.action_of[st[:, :L]]
    step_term = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) + log_v_child.gather(-1, nxt.unsqueeze(-1)).squeeze(-1) - log_n
    log_pi = torch.where(kk[None] < sl[:, None], step_term, 0.0).sum(1)
    stop_term = logp[:, :, A - 1] + log_v_child[:, :, A - 1] - log_n
    log_pi = log_pi + torch.where(sl < L, stop_term[torch.arange(M), sl.clamp(max=L - 1)], torch.zeros(M))
log_ref_sol = fidelity.reference_solution_log_probs(policy, target.solutions)
log_p_sol = float(np.logaddexp.reduce(np.asarray(log_ref_sol, dtype=float)))
check = policy.log_ref_stop(st, sl).gather(1, sl[:, None]).squeeze(1)
print("log P_ref(x) check, max abs diff:", float((check - log_ref_x).abs().max()), " log P_ref(Sol):", round(log_p_sol, 4))
terms = (log_ref_x - log_p_sol - log_pi).double()
print(f"KL(p*||pi_V) = {terms.mean():.3f} +- {1.96 * terms.std() / math.sqrt(M):.3f} (reference: {-log_p_sol:.3f}), "
      f"cpu {time.process_time() - t0:.0f}s", flush=True)
