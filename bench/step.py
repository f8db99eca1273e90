"""
Benchmarks of the training step (not tests): `python -m bench step [--task NAME]` (sampler, fidelity, gpu, expr24).

step --task NAME: the task's whole step with its default method beside the oracle's, `step / oracle step: R`.

step: one training micro-batch phase by phase (on-policy and replayed), CPU time of each phase; for SMILES with
and without its syntax mask in the same run, with total / (forward + backward) and the mask's sampling ratio.
sampler: Policy.sample's cost per token step against the GEMMs of that step and a teacher-forced forward.
fidelity, fidelity-expr24: the fidelity meter's share of a default run. gpu: MFU and the step on a GPU.
expr24: the grammar mask's cost.
"""
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

STEP_PHASES = ("sample", "fetch", "reward", "reference", "forward", "loss", "backward", "refresh")


def bench_step(model="prior", extra=(), steps=12, warmup=3, seed=0):
    """Where one training micro-batch's time goes (SMILES task, batch 32, one thread, the embedded prior by
    default). Each micro-batch is timed twice: on-policy (sample, score, loss, refresh the buffer) and replayed
    (fetch 32 items, their cached reference pass and scores, loss). Times are CPU time of this thread (robust to
    other processes sharing the cores) and wall time. For SMILES with its syntax mask, the same run is made again
    with --no-smiles-mask, micro-batch by micro-batch in turn (so both see the same load), to price the mask."""
    torch.set_num_threads(1)
    runs = {"mask": StepRun(model, extra, seed)}
    if runs["mask"].policy.task_mask is not None and runs["mask"].args.task == "smiles":
        runs["no mask"] = StepRun(model, [*extra, "--no-smiles-mask"], seed)
    for i in range(warmup + steps):
        for run in runs.values():
            run.micro_batches(record=i >= warmup)
    for name, run in runs.items():
        run.report(f"{model}, {name}" if len(runs) > 1 else model, steps)
    for name, run in runs.items():
        print(f"{name:>8}: on-policy total / (forward + backward) = {run.ratio():.2f}")
    if len(runs) > 1:
        sample = {name: run.cpu["policy"]["sample"] for name, run in runs.items()}
        print(f"sampling with the SMILES mask / without: {sample['mask'] / sample['no mask']:.2f}")
    return {name: dict(cpu=run.cpu, wall=run.wall, steps=steps, ratio=run.ratio()) for name, run in runs.items()}


def bench_task_step(task="expr24", steps=200, warmup=None):
    """A task's whole training step with its default method against the oracle's (--loss oracle: the same model,
    batch, masks and schedule; exact samples of p* instead of on-policy ones, no replay), each a short train.py run
    with the same flags, CPU ms per optimiser step over `steps` steps after `warmup`; ends with the line
    `step / oracle step: R`, R of the means (what a run pays per step: the default's steps are on-policy or replayed
    by a coin, two costs, so their median lands on either; it is printed beside the mean). With conditions the
    warm-up is 400 steps: the oracle's first draw from a prompt costs a reference pass over all its strings (once per
    prompt and run, about 20 s over the Game of 24's 396), which the steady step does not. A task that cannot enumerate its target (SMILES) has no oracle: its phases instead."""
    import tempfile
    import train
    torch.set_num_threads(1)
    if warmup is None:
        warmup = 400 if getattr(train.build_task(train.get_args(["--task", task])), "conditions", None) else 10
    flags = ["--task", task, "--steps", str(warmup + steps), "--eval-every", "0", "--ckpt-every", str(10 ** 9)]
    try:
        train.get_args([*flags, "--loss", "oracle"])
    except SystemExit:  # its one line is printed: the task cannot enumerate its target
        return bench_step(extra=["--task", task])
    mean, median = {}, {}
    for name, extra in (("default", []), ("oracle", ["--loss", "oracle"])):
        code, times = step_times(train, [*flags, "--out", os.path.join(tempfile.mkdtemp(), name), *extra])
        if code != 0:
            return print(f"{task}: train.py exit {code} (its line above)")
        mean[name], median[name] = 1000 * float(np.mean(times[warmup:])), 1000 * float(np.median(times[warmup:]))
    print(f"\n== {task}: one optimiser step, CPU ms (mean of {steps} after {warmup}, median in brackets; one thread; "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores) ==")
    print(f"default method: {mean['default']:.1f} ms ({median['default']:.1f})   "
          f"oracle: {mean['oracle']:.1f} ms ({median['oracle']:.1f})")
    print(f"step / oracle step: {mean['default'] / mean['oracle']:.2f}")


def step_times(train, argv):
    """train.main(argv) with the CPU time of each train_step recorded: (exit code, seconds per step)."""
    real, times = train.train_step, []

    def timed(*a, **k):
        start = time.process_time()
        out = real(*a, **k)
        times.append(time.process_time() - start)
        return out
    train.train_step = timed
    try:
        return train.main(argv), times
    finally:
        train.train_step = real


class StepRun:
    """One configuration of bench_step: its policy, buffer and accumulated CPU / wall time per phase."""

    SOURCES = ("policy", "replay")

    def __init__(self, model, extra, seed):
        import train
        self.args = train.get_args(["--model", model, "--replay", "subm", "--out", "/tmp/bench-step", *extra])
        self.task = train.build_task(self.args)
        torch.manual_seed(seed)
        self.policy = train.build_policy(self.args, self.task)
        self.log_z = torch.nn.Parameter(torch.zeros((), device=self.policy.device))
        self.rng = np.random.default_rng(seed)
        self.buffer = train.build_buffer(self.args, self.task)
        self.cpu = {s: dict.fromkeys(STEP_PHASES, 0.0) for s in self.SOURCES}
        self.wall = dict.fromkeys(self.SOURCES, 0.0)

    def micro_batches(self, record):
        """One on-policy micro-batch, then a replayed one once the buffer holds a batch."""
        self.micro_batch("policy", record)
        if len(self.buffer) >= self.args.batch_size:
            self.micro_batch("replay", record)

    def micro_batch(self, source, record):
        import batches
        import train
        args, task, policy, buffer = self.args, self.task, self.policy, self.buffer
        sync = torch.cuda.synchronize if policy.device.type == "cuda" else (lambda: None)
        times = dict.fromkeys(STEP_PHASES, 0.0)

        def timed(name, fn):
            sync()
            t = time.thread_time()
            out = fn()
            sync()
            times[name] += time.thread_time() - t
            return out
        start = time.perf_counter()
        items = None
        if source == "policy":
            temperature = 1.0 if self.rng.random() >= args.temp_prob else float(self.rng.uniform(0.8, 1.5))
            tokens, lengths, _ = timed("sample", lambda: policy.sample(args.batch_size, temperature))
        else:
            items = timed("fetch", lambda: buffer.sample(args.batch_size, self.rng))
            tokens, lengths = timed("fetch", lambda: batches.from_items(policy, items))
        cached = timed("fetch", lambda: batches.cached_rows(args, policy, items))
        if cached is None:
            scores = timed("reward", lambda: train.rewards.prefix_scores(task, policy.token_texts, tokens, lengths,
                                                                         args.max_len).to(policy.device))
            log_ref = timed("reference", lambda: policy.log_ref_stop(tokens, lengths))
        else:
            log_ref, scores = cached
        log_r, u = train.rewards.log_reward(log_ref.double(), scores, args.kappa, args.lam)
        log_pf, log_pterm = timed("forward", lambda: policy.log_probs(tokens, lengths))
        loss, _ = timed("loss", lambda: losses.compute_loss("raptb", log_pf, log_pterm, log_r.float(), u.float(),
                                                            lengths, self.log_z, **train.loss_knobs(args, 0.0)))
        timed("backward", lambda: loss.backward())
        if source == "policy":
            texts = policy.texts(tokens, lengths)
            final = scores.gather(1, lengths[:, None]).squeeze(1)
            timed("refresh", lambda: buffer.add(batches.to_items(task, tokens, lengths, texts, final, log_ref, scores)))
        elapsed = time.perf_counter() - start
        policy.model.zero_grad(set_to_none=True)
        self.log_z.grad = None
        if record:
            for name, t in times.items():
                self.cpu[source][name] += t
            self.wall[source] += elapsed

    def ratio(self):
        """On-policy total over forward + backward: what a step costs beyond the gradient itself."""
        phases = self.cpu["policy"]
        return sum(phases.values()) / (phases["forward"] + phases["backward"])

    def report(self, title, steps):
        args, cpu = self.args, self.cpu
        p = (args.p_replay_start + args.p_replay_end) / 2  # the mean replay probability over a run (linear schedule)
        print(f"\n== one training micro-batch, phase by phase ({title}, {args.task}, B={args.batch_size}, SubM buffer "
              f"{args.buffer_size}, {self.policy.device}, {torch.get_num_threads()} thread, {steps} micro-batches "
              f"each; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores) ==")
        print(f"CPU ms of this thread per micro-batch\n{'phase':>10} {'on-policy':>10} {'replayed':>10}")
        for name in STEP_PHASES + ("total",):
            vals = [(sum(cpu[s].values()) if name == "total" else cpu[s][name]) / steps * 1e3 for s in self.SOURCES]
            print(f"{name:>10}" + "".join(f" {v:10.1f}" for v in vals))
        print(f"{'wall':>10}" + "".join(f" {self.wall[s] / steps * 1e3:10.1f}" for s in self.SOURCES))
        total = {s: sum(cpu[s].values()) / steps for s in self.SOURCES}
        mixed = (1 - p) * total["policy"] + p * total["replay"]
        print(f"{mixed * 1e3:.1f} CPU ms per micro-batch at the run's mean replay share {p:.3f}, "
              f"{mixed * args.grad_accum * 1e3:.0f} ms per optimiser step of {args.grad_accum} (before AdamW)")


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
    bench_step(path, ["--lora"])


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
