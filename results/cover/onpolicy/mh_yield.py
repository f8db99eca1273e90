"""How often regrowing the last K tokens of a found Expr24 solution from P_ref gives a solution (a diagnostic, not the
trainer's): N reference draws give the seeds (exact samples of p* = P_ref | Sol); each of STEPS rounds regrows every
chain's last K tokens from P_ref and moves iff the result is a solution (Metropolis-Hastings for p* with P_ref's
regrowth as the proposal). MODEL: a run's init/ folder (the Expr24 reference).

    python results/cover/onpolicy/mh_yield.py OUT/init 20000 4 20
"""
import collections, os, sys, time
import torch
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import train
from tasks.expr24.task import expr24_solutions
torch.manual_seed(0); torch.set_num_threads(1)
MODEL, N, K, STEPS = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
args = train.get_args(["--task", "expr24", "--model", MODEL])
task = train.build_task(args)
policy = train.build_policy(args, task)
sols = set(expr24_solutions(5, 24))
def draw(n, prefix=None):
    t, l, lq = policy.sample(n, reference=True, prefix=prefix)
    return t, l, lq, policy.texts(t, l)
t0 = time.process_time()
t, l, lq, texts = draw(N)
seeds = [i for i, x in enumerate(texts) if x in sols]
print(f"reference draws {N}: {len(seeds)} solutions ({len(seeds)/N:.4f})")
tok, ln = t[seeds].clone(), l[seeds].clone()
cur = [texts[i] for i in seeds]
found = collections.Counter(cur); visits = list(cur); accepted = 0; proposals = 0
for step in range(STEPS):
    cut = (ln - K).clamp(min=0)
    new_t, new_l = tok.clone(), ln.clone()
    for c in cut.unique().tolist():
        rows = (cut == c).nonzero().squeeze(1)
        nt, nl, _ = policy.sample(len(rows), reference=True, prefix=tok[rows, :c])
        new_t[rows], new_l[rows] = nt, nl
    new_texts = policy.texts(new_t, new_l)
    # regrowth from P_ref given the kept prefix, target p* = P_ref | Sol: accept iff the new one is a solution
    ok = torch.tensor([x in sols for x in new_texts])
    proposals += len(ok); accepted += int(ok.sum())
    tok[ok], ln[ok] = new_t[ok], new_l[ok]
    cur = [n if o else c for n, c, o in zip(new_texts, cur, ok.tolist())]
    visits += cur; found.update(x for x, o in zip(new_texts, ok.tolist()) if o)
print(f"K={K} steps={STEPS}: acceptance {accepted/max(proposals,1):.3f}, distinct solutions {len(set(visits))} from {len(seeds)} seeds, cpu {time.process_time()-t0:.0f}s")
ops = collections.Counter(ch for x in set(visits) for ch in x[1::2]); tot = sum(ops.values())
print("operators among distinct:", {k: round(v/tot, 3) for k, v in ops.items()})
seedops = collections.Counter(ch for x in set(texts[i] for i in seeds) for ch in x[1::2]); tot = sum(seedops.values())
print("operators among seeds:", {k: round(v/tot, 3) for k, v in seedops.items()})
