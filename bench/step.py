"""
Benchmarks of the training step (not tests): `python -m bench step [--task NAME]` (sampler, fidelity, gpu, expr24).

step [--task NAME]: a task's real step (SMILES by default) phase by phase, with its default method beside the
oracle's, `step / oracle step: R`, or for SMILES beside the step without its syntax mask, with the mask's sampling
ratio; each with step / (forward + backward).
sampler: Policy.sample's cost per token step against the GEMMs of that step and a teacher-forced forward.
fidelity, fidelity-expr24: the fidelity meter's share of a default run. gpu: MFU and the step on a GPU.
expr24: the grammar mask's cost.
"""
import collections
import contextlib
import os
import sys
import time

import numpy as np
import torch

import losses


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def random_gpt2(n_positions, device):
    """The embedded prior's shape (4 layers, width 256) with a longer context, random weights:
    speed does not depend on the weights, and the prior's context (128) is shorter than 256 + prompt."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
    import model as modellib
    tokenizer = AutoTokenizer.from_pretrained(modellib.DEFAULT_MODEL)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=256, n_layer=4, n_head=4,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(config).to(device), tokenizer


# ----------------------------------------------------------------------------- the training step, phase by phase

def step_phases():
    """(owner, attribute, label) of the functions train.py's step spends its time in; "of which" rows are inside the
    row above them. Two owners under one label (a task with conditions wraps the policy and the buffer) count once."""
    import batches
    import conditions
    import model as modellib
    import replay
    import train
    return [(train, "get_batch", "batch"), (modellib.Policy, "sample", "  of which sampling"),
            (batches, "prefix_scores", "reward"), (modellib.Policy, "log_ref_stop", "reference"),
            (conditions.ConditionalPolicy, "log_ref_stop", "reference"), (train, "loss_log_probs", "forward"),
            (conditions, "row_log_z", "logZ"), (losses, "compute_loss", "loss"), (torch.Tensor, "backward", "backward"),
            (replay.ReplayBuffer, "add", "refresh"), (replay.ConditionalBuffer, "add", "refresh"),
            (train, "optimizer_step", "optimiser"), (train, "train_step", "step")]


@contextlib.contextmanager
def timed_calls(phases, spent, counting):
    """Within the block, every call of each phase's function adds this thread's CPU time inside it to spent[label]
    while counting() holds (on a GPU, wall time between synchronisations), a call inside another of the same label
    not again; the functions are put back after."""
    gpu = torch.cuda.is_available()
    clock, sync = (time.perf_counter, torch.cuda.synchronize) if gpu else (time.thread_time, lambda: None)
    real = {(owner, name): getattr(owner, name) for owner, name, _ in phases}
    inside = collections.Counter()

    def timer(fn, label):
        def timed(*a, **k):
            if inside[label]:
                return fn(*a, **k)
            inside[label] += 1
            sync()
            start = clock()
            try:
                return fn(*a, **k)
            finally:
                sync()
                inside[label] -= 1
                if counting():
                    spent[label] += clock() - start
        return timed
    for owner, name, label in phases:
        setattr(owner, name, timer(real[owner, name], label))
    try:
        yield
    finally:
        for (owner, name), fn in real.items():
            setattr(owner, name, fn)


def timed_run(flags, warmup, steps):
    """A short train.py run (one thread, no measuring, no checkpoint but the last, in a temporary folder): CPU ms per
    optimiser step in each phase over `steps` steps after `warmup`, or None when train.py refused (its line printed)."""
    import tempfile
    import train
    torch.set_num_threads(1)
    spent, done = collections.defaultdict(float), [0]
    phases = step_phases()

    def counting():
        return warmup <= done[0] < warmup + steps
    with timed_calls(phases, spent, counting), tempfile.TemporaryDirectory() as out:
        real_step = train.train_step

        def counted(*a, **k):
            result = real_step(*a, **k)
            done[0] += 1
            return result
        train.train_step = counted
        try:
            code = train.main([*flags, "--steps", str(warmup + steps), "--eval-every", "0",
                               "--ckpt-every", str(10 ** 9), "--out", os.path.join(out, "run")])
        finally:
            train.train_step = real_step
    if code != 0:
        return None
    return {label: 1000 * spent[label] / steps for _, _, label in phases}  # CPU ms per step


def bench_step(task="smiles", steps=None, warmup=None, extra=()):
    """A task's real training step (train.py's own functions, timed from outside), CPU ms per optimiser step, phase
    by phase, with its default method beside a second run in the same call: the oracle's step (--loss oracle: the
    same model, batch, masks and schedule, exact samples of p* instead of on-policy ones, no replay), or for a task
    that cannot enumerate its target (SMILES) the same step without its syntax mask. Ends with each run's
    step / (forward + backward), and `step / oracle step: R` (or the mask's sampling ratio). Means over `steps`
    steps after `warmup`: a step is on-policy or replayed by a coin, two costs. With conditions the warm-up is 400
    steps: the oracle's first draw from a prompt costs a reference pass over all its strings (about 20 s over the
    Game of 24's 396), which the steady step does not."""
    import train
    flags = ["--task", task, *extra]
    conditional = getattr(train.build_task(train.get_args([*flags, "--out", "/tmp/bench-step"])), "conditions", None)
    warmup = warmup if warmup is not None else 400 if conditional else 10
    steps = steps or (200 if task != "smiles" else 30)
    try:
        train.get_args([*flags, "--loss", "oracle", "--out", "/tmp/bench-step"])
        second = ("oracle", ["--loss", "oracle"])
    except SystemExit:  # its one line is printed: the task cannot enumerate its target
        second = ("no mask", ["--no-smiles-mask"]) if task == "smiles" else None
    runs = {"default": timed_run(flags, warmup, steps)}
    if second:
        runs[second[0]] = timed_run([*flags, *second[1]], warmup, steps)
    if None in runs.values():
        return print(f"{task}: train.py refused (its line above)")
    print(f"\n== {task}: one optimiser step, CPU ms, phase by phase (mean of {steps} steps after {warmup}; one thread; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores) ==")
    print(f"{'phase':>20}" + "".join(f" {name:>10}" for name in runs))
    for label in dict.fromkeys(label for _, _, label in step_phases()):
        print(f"{label:>20}" + "".join(f" {run[label]:10.1f}" for run in runs.values()))
    for name, run in runs.items():
        print(f"{name:>10}: step / (forward + backward) = {run['step'] / (run['forward'] + run['backward']):.2f}")
    if "oracle" in runs:
        print(f"step / oracle step: {runs['default']['step'] / runs['oracle']['step']:.2f}")
    if "no mask" in runs:
        print(f"sampling with the SMILES mask / without: "
              f"{runs['default']['  of which sampling'] / runs['no mask']['  of which sampling']:.2f}")
    return runs


def bench_sampler(model="prior", n=32, max_len=10, repeats=15):
    """The per-token cost of Policy.sample against the FLOPs of the token: one sampling step (n new tokens through
    the whole network with a KV cache) next to (a) the step's matrix products alone (the GEMMs of one forward of
    n tokens, weights [E, 3E], [E, E], [E, 4E], [4E, E] per layer + the action rows of the LM head) and (b) a
    teacher-forced forward per token column (n x (max_len + 1) tokens at once, divided by max_len + 1). Today's
    Minimum CPU time over repeats."""
    import model as modellib
    import rewards
    from tasks.smiles.task import SmilesTask
    torch.set_num_threads(1)
    net, tokenizer = modellib.load_model(model)
    allowed = rewards.allowed_token_ids(tokenizer, SmilesTask.charset)
    policy = modellib.Policy(net, tokenizer, allowed, max_len, max_len)  # every row max_len tokens: 11 steps
    steps = max_len + 1
    blocks = net.transformer.h
    x = {d: torch.randn(n, d) for d in (net.config.n_embd, 4 * net.config.n_embd)}
    head = net.lm_head.weight[policy.actions].detach()

    def gemms():
        with torch.no_grad():
            for b in blocks:
                for lin in (b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj):
                    torch.addmm(lin.bias, x[lin.weight.shape[0]], lin.weight)
            torch.mm(x[net.config.n_embd], head.t())
    tokens = policy.actions[torch.randint(len(policy.actions) - 1, (n, max_len))]
    lengths = torch.full((n,), max_len)

    def forward():
        with torch.no_grad():
            policy.log_probs(tokens, lengths)

    def best(fn):
        times = []
        for _ in range(repeats):
            t = time.thread_time()
            fn()
            times.append(time.thread_time() - t)
        return min(times)
    res = dict(new=[], gemm=[], forward=[])
    for _ in range(2):
        res["new"].append(best(lambda: policy.sample(n)) / steps)
        res["gemm"].append(best(gemms))
        res["forward"].append(best(forward) / steps)
    r = {k: min(v) * 1e3 for k, v in res.items()}
    flops = 2 * n * (sum(p.numel() for b in blocks for p in b.parameters() if p.dim() == 2) + head.numel())
    print(f"\n== sampler, per token step ({model}, n={n}, {steps} steps, {torch.get_num_threads()} thread, "
          f"{flops / 1e6:.0f} MFLOP per step) ==")
    print(f"{'GEMMs of the step alone':>36} {r['gemm']:7.2f} ms  ({flops / r['gemm'] / 1e6:.0f} GFLOP/s)")
    print(f"{'teacher-forced forward per column':>36} {r['forward']:7.2f} ms")
    print(f"{'Policy.sample (GPT-2 decoder)':>36} {r['new']:7.2f} ms  = {r['new'] / r['gemm']:.2f}x the GEMMs, "
          f"{r['new'] / r['forward']:.2f}x a forward column")
    return r


def bench_fidelity(model="prior", n=256, steps=3, task_name="smiles"):
    """The fidelity meter's share of a default run: one fidelity.measure(policy, task, 1, 50, n=256) against one
    optimiser step at the defaults (B = 32 x grad_accum 4, SubM, the run's mean replay share), both timed here,
    and the share for the default 5000-step run with its evaluations (train.eval_due: every steps // 4 and the
    start and the end). Expr24 (task_name="expr24"): its scratch model, untrained (speed does not depend on
    the weights), and the exact measurement over all 113,662 solutions."""
    from tasks.expr24.task import Expr24Task
    import fidelity
    import model as modellib
    import train
    torch.set_num_threads(1)
    if task_name == "expr24":
        model = "/tmp/bench-fidelity-expr24-model"
        if not os.path.isdir(model):
            torch.manual_seed(0)
            modellib.build_scratch_model(model, sorted(Expr24Task.charset))
    args = train.get_args(["--task", task_name, "--model", model, "--out", "/tmp/bench-fidelity"])
    task = train.build_task(args)
    torch.manual_seed(0)
    policy = train.build_policy(args, task)
    buffer = train.build_buffer(args, task)
    log_z = torch.nn.Parameter(torch.zeros(()))
    optimizer = torch.optim.AdamW([dict(params=[p for p in policy.model.parameters() if p.requires_grad],
                                        lr=args.lr), dict(params=[log_z], lr=args.lr_logz)])
    rng = np.random.default_rng(0)
    step_times = []
    for step in range(steps + 2):  # fill the buffer first: replay needs a full batch
        t = time.perf_counter()
        train.train_step(train.Training(args, task, policy, buffer, log_z, optimizer, rng), step)
        step_times.append(time.perf_counter() - t)
    step_s = float(np.median(step_times[2:]))
    t = time.perf_counter()
    fidelity.measure(policy, task, args.kappa, args.lam, n=n, log_z_learned=log_z.item(), seed=0)
    measure_s = time.perf_counter() - t
    t = time.perf_counter()
    fidelity.measure(policy, task, args.kappa, args.lam, n=n, log_z_learned=log_z.item(), seed=1)
    measure2_s = time.perf_counter() - t
    evals = sum(train.eval_due(args, s) for s in range(args.steps + 1))
    run_s = args.steps * step_s
    meter_s = measure_s + (evals - 1) * measure2_s  # what the first one caches (Expr24: P_ref of every solution) stays
    print(f"\n== fidelity meter's cost ({task_name}, {model}, n={n}; wall time, load average {os.getloadavg()[0]:.1f}) ==")
    print(f"one optimiser step (B={args.batch_size} x {args.grad_accum}): {step_s:.2f} s (median of {steps}); "
          f"one measurement: {measure_s:.2f} s (first), {measure2_s:.2f} s (second, RDKit caches warm)")
    print(f"default run: {args.steps} steps = {run_s / 60:.0f} min of steps, {evals} measurements = "
          f"{meter_s:.0f} s: {meter_s / (run_s + meter_s):.1%} of the run")
    return dict(step_s=step_s, measure_s=measure_s, measure2_s=measure2_s, evals=evals, share=meter_s / (run_s + meter_s))


def bench_gpu(peak_tflops=989.0):
    """On a GPU: a Qwen2-0.5B-shaped transformer (24 layers, width 896, 14 query / 2 KV heads, MLP 4864) with
    the embedded prior's 450-token vocabulary, random weights. Forward+backward tokens/s and MFU (model FLOPs
    6 * params * tokens + attention, over the GPU's dense bf16 peak: H100 SXM 989 TFLOP/s), then the trainer
    end to end with LoRA + bf16 (samples/s) and its step breakdown."""
    import json
    import subprocess
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    import model as modellib
    if not torch.cuda.is_available():
        print("\n== gpu: skipped (no CUDA) ==")
        return
    tokenizer = AutoTokenizer.from_pretrained(modellib.DEFAULT_MODEL)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                         num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    net = Qwen2ForCausalLM(config).cuda()
    path = "/tmp/bench-qwen2-shaped"
    net.save_pretrained(path)
    tokenizer.save_pretrained(path)
    n_params = sum(p.numel() for p in net.parameters())
    print(f"\n== gpu: {torch.cuda.get_device_name()}, Qwen2-0.5B-shaped, {n_params / 1e6:.0f}M parameters ==")
    print(f"{'batch x len':>12} {'tokens/s':>10} {'TFLOP/s':>8} {'MFU':>6}   (full fine-tune, fp32 weights, bf16 autocast)")
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-5)
    for batch, length in ((32, 11), (32, 128), (64, 512)):
        ids = torch.randint(len(tokenizer), (batch, length), device="cuda")

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = net(input_ids=ids, labels=ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t = median_time(lambda: (step(), torch.cuda.synchronize()), 10)
        flops = 6 * n_params * batch * length + 12 * config.num_hidden_layers * config.hidden_size * batch * length ** 2
        print(f"{batch:>5} x {length:<5} {batch * length / t:>10.0f} {flops / t / 1e12:>8.1f} {flops / t / 1e12 / peak_tflops:>6.1%}")
    net = optimizer = None  # free the GPU for the trainer run below
    torch.cuda.empty_cache()
    out = "/tmp/bench-qwen2-run"
    subprocess.run([sys.executable, "train.py", "--model", path, "--lora", "--steps", "30", "--grad-accum", "1",
                    "--replay", "subm", "--out", out, "--ckpt-every", "1000", "--overwrite"],  # the bench's own folder
                   check=True, capture_output=True)
    log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    print(f"trainer, LoRA + bf16, batch 32, SubM: see the step breakdown below ({len(log)} steps ran)")
    bench_step(extra=["--model", path, "--lora"])


def bench_expr24(batch=64, repeats=15):
    """What Expr24's grammar mask (a state mask, METHOD.md §1) costs: sampling and the one-pass log-probs
    (forward + backward) of train.py's scratch model shape (3 layers, width 64, random weights) with and
    without the mask, and the mask function alone over all states of a batch."""
    import tempfile

    import model as modellib
    import rewards
    from tasks.expr24.task import Expr24Task
    task = Expr24Task()
    with tempfile.TemporaryDirectory() as path:
        modellib.build_scratch_model(path, sorted(task.charset), seed=0)
        net, tokenizer = modellib.load_model(path)
    allowed = rewards.allowed_token_ids(tokenizer, task.charset, max_chars=1)
    policies = {name: modellib.Policy(net, tokenizer, allowed, 3, 9, state_mask=mask)
                for name, mask in (("no mask", None), ("grammar mask", task.state_mask))}
    torch.manual_seed(0)
    tokens, lengths, _ = policies["grammar mask"].sample(batch)
    print(f"\n== Expr24: cost of the grammar mask (B={batch}, scratch-model shape, CPU, median of {repeats}) ==")
    print(f"{'':>14} {'sample ms':>10} {'log_probs+bwd ms':>17}")
    for name, policy in policies.items():
        def one_pass():
            log_pf, log_pterm = policy.log_probs(tokens, lengths)
            (log_pf.sum() + torch.where(log_pterm.isfinite(), log_pterm, 0.0).sum()).backward()
        t_sample = median_time(lambda: policy.sample(batch), repeats)
        t_pass = median_time(one_pass, repeats)
        print(f"{name:>14} {t_sample * 1e3:>10.1f} {t_pass * 1e3:>17.1f}")
    policy = policies["grammar mask"]
    t_mask = median_time(lambda: policy.allowed_actions(tokens, int(lengths.max()), lengths), repeats)
    print(f"mask function alone, all {int(lengths.max()) + 1} states of the batch: {t_mask * 1e3:.2f} ms")
    ref = modellib.Policy(net, tokenizer, allowed, 3, 9, reference=modellib.frozen_copy(net), state_mask=task.state_mask)
    t_ref = median_time(lambda: ref.sample(1024, reference=True), 5)
    t_uniform = median_time(lambda: ref.sample(4096, uniform=True), 5)
    print(f"--explore-ref's draws: 1,024 from the reference {t_ref * 1e3:.0f} ms, 4,096 from the masked uniform policy "
          f"(--explore-from uniform) {t_uniform * 1e3:.0f} ms ({t_ref / t_uniform:.1f}x)")
    from tasks.expr24.task import evaluate_expression, solution_set
    texts, _ = task.random_objects(1024, np.random.default_rng(0)), solution_set()  # the set made before timing

    def by_value():
        evaluate_expression.cache_clear()  # --explore-ref's draws are nearly all new texts
        return [float(evaluate_expression(t) == 24) for t in texts]
    t_value, t_set = median_time(by_value, repeats), median_time(lambda: task.score_batch(texts), repeats)
    print(f"scoring 1024 draws (--explore-ref 1024, every step): exact Fraction value {t_value * 1e3:.1f} ms, "
          f"the solution set {t_set * 1e3:.2f} ms ({t_value / t_set:.0f}x)")
