"""
Train the small SMILES prior that ships in this folder, prior/ (tokenizer + GPT-2), so that
`python train.py --task smiles` works offline on a fresh machine. Run from the repository root:

    python -m tasks.smiles.train_prior                   # tokenizer + training + evaluation -> prior/
    python -m tasks.smiles.train_prior --eval-only       # re-evaluate the shipped prior (CPU is fine)
    python -m tasks.smiles.train_prior --steps 20 --batch-size 64 --out /tmp/prior_smoke   # quick smoke run

The shipped prior: `python -m tasks.smiles.train_prior --no-eval` on one H100 (8000 steps, ~2.6 min of
training), then `python -m tasks.smiles.train_prior --eval-only` on a CPU with RDKit. Hugging Face loads this
folder as a model; it never runs this file (no auto_map in config.json), and saving a new prior keeps it.

The prior is trained on exactly tasks/smiles/data/moses_train_subset.smi.gz (see data/README.md), so
novelty is measured against exactly its training set, offline.

Tokenizer contract (ids are fixed by smiles_vocabulary(), special tokens first):
  <pad>=0 <bos>=1 <eos>=2 <unk>=3
  tokenizer("CCO").input_ids == [1, C, C, O]       (BOS prepended, like Llama; never EOS)
  tokenizer("CCO", add_special_tokens=False)       -> [C, C, O]
  tokenizer.decode(ids, skip_special_tokens=True)  -> the exact SMILES string
A training sequence is <bos> tokens <eos>, right-padded with <pad> (pad is not eos, so the
loss can learn to stop).
"""

import argparse
import gzip
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from tqdm import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

ROOT = os.path.dirname(os.path.abspath(__file__))  # the task's folder: data/ and prior/

# Atom-level SMILES regex (Schwaller et al. 2019, Molecular Transformer). Note "Br?" and
# "Cl?": the two-letter halogens win over B and C.
SMILES_REGEX = (r"(\[[^\]]+]|Br?|Cl?|N|O|S|P|F|I|b|c|n|o|s|p|\(|\)|\.|=|#|-|\+|\\|\/|:|~|@|\?|>|\*|\$"
                r"|\%[0-9]{2}|[0-9])")
SMILES_PATTERN = re.compile(SMILES_REGEX)
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = [PAD, BOS, EOS, UNK]

ORGANIC_ATOMS = ["B", "C", "N", "O", "P", "S", "F", "Cl", "Br", "I"]
AROMATIC_ATOMS = ["b", "c", "n", "o", "p", "s"]
BONDS = ["-", "=", "#", ":", "/", "\\", "."]
BRANCHES = ["(", ")"]
RING_CLOSURES = [str(d) for d in range(10)] + [f"%{d}" for d in range(10, 100)]
EXTRA_BRACKET_ATOMS = ["[H]", "[2H]", "[H+]", "[H-]", "[Li+]", "[Na+]", "[K+]", "[Mg+2]", "[Ca+2]",
                       "[Zn+2]", "[O-2]", "[S-2]", "[NH4+]", "[B-]", "[BH4-]", "[N@@+]", "[N@+]"]


def generated_bracket_atoms():
    """A broad fixed set of bracket atoms: element x chirality x H count x charge."""
    tetrahedral = {"C", "N", "P", "S", "Si"}  # elements that carry @/@@ in drug-like SMILES
    atoms = []
    for element in ORGANIC_ATOMS + ["Si", "Se"]:
        for chirality in (["", "@", "@@"] if element in tetrahedral else [""]):
            for hydrogens in ["", "H", "H2", "H3"]:
                for charge in ["", "+", "-"]:
                    atoms.append(f"[{element}{chirality}{hydrogens}{charge}]")
    for element in AROMATIC_ATOMS + ["se"]:
        for hydrogens in ["", "H"]:
            for charge in ["", "+", "-"]:
                atoms.append(f"[{element}{hydrogens}{charge}]")
    return atoms + EXTRA_BRACKET_ATOMS


def smiles_vocabulary(extra_tokens=()):
    """The fixed token list; a token's id is its index. Extra (data) tokens go last, sorted."""
    fixed = SPECIAL_TOKENS + ORGANIC_ATOMS + AROMATIC_ATOMS + ["*"] + BONDS + BRANCHES + RING_CLOSURES
    fixed += generated_bracket_atoms()
    fixed = list(dict.fromkeys(fixed))  # drop duplicates, keep the first position
    return fixed + sorted(set(extra_tokens) - set(fixed))


def regex_tokens(smiles):
    return SMILES_PATTERN.findall(smiles)


def distinct_regex_tokens(smiles_list):
    """All regex tokens of a corpus; raises if the regex would silently drop characters."""
    seen = set()
    for smiles in smiles_list:
        tokens = regex_tokens(smiles)
        if "".join(tokens) != smiles:
            raise ValueError(f"SMILES regex does not cover every character of {smiles!r}")
        seen.update(tokens)
    return seen


def build_tokenizer(training_smiles=(), max_length=128):
    """WordLevel over the fixed vocabulary; bracket atoms of the data missing from it are appended."""
    fixed = set(smiles_vocabulary())
    data_brackets = {t for t in distinct_regex_tokens(training_smiles) if t.startswith("[")}
    vocab = smiles_vocabulary(extra_tokens=data_brackets - fixed)
    core = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(vocab)}, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(SMILES_REGEX), behavior="isolated")
    core.decoder = decoders.Fuse()  # concatenate tokens, no spaces
    core.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, vocab.index(BOS))])
    core.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
        model_max_length=max_length, padding_side="right", clean_up_tokenization_spaces=False)


def check_coverage(tokenizer, smiles_list):
    missing = distinct_regex_tokens(smiles_list) - set(tokenizer.get_vocab())
    if missing:
        raise ValueError(f"tokens missing from the vocabulary: {sorted(missing)}")


def read_smiles(path):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt") as f:
        return [line.strip() for line in f if line.strip()]


# -----------------------------------------------------------------------------
# training


def encode_corpus(tokenizer, smiles_list, max_length):
    """All sequences as one right-padded int32 tensor [N, max_len] plus lengths; <bos> x <eos>."""
    # Regex + vocabulary lookup is exactly what the WordLevel tokenizer does (checked on a sample
    # here and on the held-out set in test_prior.py), and ~7x faster than its Python wrapper.
    vocab = tokenizer.get_vocab()
    ids = [[vocab.get(t, tokenizer.unk_token_id) for t in regex_tokens(s)] for s in smiles_list]
    sample = smiles_list[:1000]
    assert ids[:1000] == tokenizer(sample, add_special_tokens=False)["input_ids"], "fast path != tokenizer"
    seqs = [[tokenizer.bos_token_id] + x + [tokenizer.eos_token_id] for x in ids]
    too_long = sum(len(s) > max_length for s in seqs)
    if too_long:
        raise ValueError(f"{too_long} sequences longer than the context ({max_length})")
    lengths = torch.tensor([len(s) for s in seqs])
    data = torch.full((len(seqs), int(lengths.max())), tokenizer.pad_token_id, dtype=torch.int32)
    filled = torch.arange(data.shape[1])[None, :] < lengths[:, None]  # row-major, like the flat list
    data[filled] = torch.tensor([t for s in seqs for t in s], dtype=torch.int32)
    return data, lengths


def get_batch(data, lengths, rows, device):
    """Per-batch padding: cut to the longest sequence of the batch; pads are ignored by the loss."""
    width = int(lengths[rows].max())
    input_ids = data[rows.to(data.device), :width].to(device=device, dtype=torch.long)
    attention_mask = torch.arange(width, device=device)[None, :] < lengths[rows].to(device)[:, None]
    labels = input_ids.masked_fill(~attention_mask, -100)
    return input_ids, attention_mask.long(), labels


def cosine_with_warmup(step, warmup, total, min_ratio):
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def validation_loss(model, data, lengths, batch_size, device, bf16):
    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(data), batch_size):
        rows = torch.arange(start, min(start + batch_size, len(data)))
        input_ids, attention_mask, labels = get_batch(data, lengths, rows, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        n = int((labels[:, 1:] != -100).sum())
        total, count = total + loss.item() * n, count + n
    model.train()
    return total / count


def use_bf16(device, precision):
    """bf16 autocast where the hardware has it: CUDA, or CPUs with native bf16 (AVX512/AMX).
    Emulated bf16 on an AVX2-only CPU is ~40x slower than fp32, so "auto" falls back to fp32."""
    if precision != "auto":
        return precision == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def train(args, device):
    torch.manual_seed(args.seed)
    bf16 = use_bf16(device, args.precision)
    train_smiles = read_smiles(args.data)
    tokenizer = build_tokenizer(train_smiles, max_length=args.context)
    check_coverage(tokenizer, train_smiles)
    data, lengths = encode_corpus(tokenizer, train_smiles, args.context)
    val_data, val_lengths = encode_corpus(tokenizer, read_smiles(args.heldout), args.context)
    data, val_data = data.to(device), val_data.to(device)  # ~100 MB as int32; lengths stay on the CPU
    print(f"{len(train_smiles)} training SMILES, vocab {len(tokenizer)}, longest sequence {data.shape[1]}")

    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=args.context, n_embd=args.width, n_layer=args.layers,
        n_head=args.heads, resid_pdrop=args.dropout, embd_pdrop=args.dropout, attn_pdrop=args.dropout,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = GPT2LMHeadModel(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"GPT-2 prior: {n_params / 1e6:.2f}M parameters, {'bf16 autocast' if bf16 else 'fp32'} on {device_name(device)}")

    decay = [p for p in model.parameters() if p.dim() >= 2]  # no weight decay on biases and LayerNorms
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_with_warmup(s, args.warmup, args.steps, args.min_lr_ratio))

    generator = torch.Generator().manual_seed(args.seed)
    order, cursor = torch.randperm(len(data), generator=generator), 0
    start, history, step = time.time(), [], 0
    progress = tqdm(range(args.steps), desc="train prior", mininterval=5)
    for step in progress:
        if cursor + args.batch_size > len(data):  # reshuffle every epoch, drop the ragged tail
            order, cursor = torch.randperm(len(data), generator=generator), 0
        rows = order[cursor: cursor + args.batch_size]
        cursor += args.batch_size
        input_ids, attention_mask, labels = get_batch(data, lengths, rows, device)
        with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        schedule.step()
        if step % args.log_every == 0 or step == args.steps - 1:
            val = validation_loss(model, val_data, val_lengths, 500, device, bf16)
            history.append({"step": step, "train_loss": round(loss.item(), 4), "val_loss": round(val, 4),
                            "lr": schedule.get_last_lr()[0], "seconds": round(time.time() - start, 1)})
            progress.set_postfix(loss=f"{loss.item():.3f}", val=f"{val:.3f}", refresh=False)
            print(f"step {step}: train {loss.item():.4f} val {val:.4f} ({time.time() - start:.0f} s)")
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            print(f"time budget of {args.max_minutes} min reached at step {step}: stopping early")
            break

    final_val = validation_loss(model, val_data, val_lengths, 500, device, bf16)
    info = {"steps_done": step + 1, "steps_planned": args.steps, "epochs": round((step + 1) * args.batch_size / len(data), 2),
            "wall_seconds": round(time.time() - start, 1), "final_val_loss_per_token": round(final_val, 4),
            "parameters": n_params, "vocab_size": len(tokenizer), "device": device_name(device), "bf16_autocast": bf16,
            "torch": torch.__version__, "transformers": __import__("transformers").__version__,
            "args": vars(args), "history": history}
    return model, tokenizer, info


def device_name(device):
    return torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"


# -----------------------------------------------------------------------------
# saving (atomic: build the whole folder aside, then swap it in)


def save_prior(model, tokenizer, metrics, out_dir):
    """The model, tokenizer and metrics.json replace out_dir's; a recipe kept there (this file) stays."""
    out_dir = os.path.abspath(out_dir)
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".prior-", dir=parent)
    model.to(torch.bfloat16).save_pretrained(tmp, safe_serialization=True)  # a few MB instead of ~13
    model.float()
    tokenizer.save_pretrained(tmp)
    write_json(os.path.join(tmp, "metrics.json"), metrics)
    os.chmod(tmp, 0o755)  # mkdtemp (and safetensors) make things private
    for name in os.listdir(tmp):
        os.chmod(os.path.join(tmp, name), 0o644)
    old = None
    if os.path.exists(out_dir):
        old = tempfile.mkdtemp(prefix=".prior-old-", dir=parent)
        os.rename(out_dir, os.path.join(old, "prior"))
    os.rename(tmp, out_dir)
    if old:
        shutil.rmtree(old)


def write_json(path, obj):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def load_prior(prior_dir, device="cpu"):
    """The shipped prior, offline, in float32 (weights are stored in bf16)."""
    tokenizer = AutoTokenizer.from_pretrained(prior_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(prior_dir, local_files_only=True, dtype=torch.float32)
    return model.to(device).eval(), tokenizer


# -----------------------------------------------------------------------------
# evaluation: validity / uniqueness / novelty of unconditional samples


@torch.no_grad()
def sample_smiles(model, tokenizer, n, seed=0, batch_size=500, temperature=1.0):
    """Pure ancestral sampling from <bos> until <eos> or the context length."""
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    out = []
    for start in range(0, n, batch_size):
        size = min(batch_size, n - start)
        prompt = torch.full((size, 1), tokenizer.bos_token_id, dtype=torch.long, device=device)
        ids = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=True, top_k=0, top_p=1.0,
                             temperature=temperature, max_length=model.config.n_positions,
                             eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
        for row in ids[:, 1:].tolist():
            if tokenizer.eos_token_id in row:
                row = row[: row.index(tokenizer.eos_token_id)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out


def canonical_smiles(smiles):
    """RDKit canonical SMILES, or None for an empty or unparsable string."""
    from rdkit import Chem
    mol = Chem.MolFromSmiles(smiles) if smiles else None
    return Chem.MolToSmiles(mol) if mol is not None and mol.GetNumAtoms() > 0 else None


def canonical_training_set(data_path):
    """Canonical SMILES of the training file; cached per (file hash, RDKit version) in ~/.cache."""
    import rdkit
    with open(data_path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    cache_dir = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "smiles-prior")
    cache = os.path.join(cache_dir, f"train-canonical-{digest}-rdkit{rdkit.__version__}.smi.gz")
    if os.path.exists(cache):
        return set(read_smiles(cache))
    smiles = read_smiles(data_path)
    canon = {c for s in tqdm(smiles, desc="canonicalise training set", mininterval=5)
             if (c := canonical_smiles(s)) is not None}
    os.makedirs(cache_dir, exist_ok=True)
    tmp = cache + f".{os.getpid()}.tmp"
    with gzip.open(tmp, "wt") as f:
        f.write("\n".join(sorted(canon)) + "\n")
    os.replace(tmp, cache)
    return canon


def generation_metrics(samples, training_canonical):
    canon = [canonical_smiles(s) for s in samples]
    valid = [c for c in canon if c is not None]
    unique = set(valid)
    novel = unique - training_canonical
    return {"n_samples": len(samples), "validity": len(valid) / len(samples),
            "uniqueness": len(unique) / max(1, len(valid)), "novelty": len(novel) / max(1, len(unique)),
            "mean_length_chars": sum(map(len, samples)) / len(samples)}


def evaluate(prior_dir, data_path, n, seed, device):
    from rdkit import RDLogger
    RDLogger.DisableLog("rdApp.*")  # invalid samples are expected; do not flood the log
    model, tokenizer = load_prior(prior_dir, device)
    start = time.time()
    samples = sample_smiles(model, tokenizer, n, seed=seed)
    seconds = time.time() - start
    metrics = generation_metrics(samples, canonical_training_set(data_path))
    metrics.update({"temperature": 1.0, "seed": seed, "sampling_seconds": round(seconds, 1),
                    "device": device_name(device), "examples": samples[:10]})
    return metrics


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default=os.path.join(ROOT, "data", "moses_train_subset.smi.gz"),
                   help="training SMILES, one per line")
    p.add_argument("--heldout", default=os.path.join(ROOT, "data", "moses_test_holdout.smi"),
                   help="held-out SMILES for the val loss")
    p.add_argument("--out", default=os.path.join(ROOT, "prior"), help="output folder (replaced atomically)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--context", type=int, default=128)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-ratio", type=float, default=0.05, help="final lr as a fraction of --lr")
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--max-minutes", type=float, default=0, help="stop training early after this long (0: no limit)")
    p.add_argument("--log-every", type=int, default=250)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--precision", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: bf16 autocast on CUDA and on CPUs with native bf16, else fp32")
    p.add_argument("--eval-only", action="store_true", help="only evaluate the prior in --out")
    p.add_argument("--no-eval", action="store_true", help="skip the evaluation (e.g. where RDKit is missing)")
    p.add_argument("--eval-samples", type=int, default=2000)
    p.add_argument("--eval-device", default="cpu", help="device for the evaluation samples")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device)
    if not args.eval_only:
        model, tokenizer, info = train(args, device)
        save_prior(model.cpu(), tokenizer, {"train": info}, args.out)
        print(f"saved prior to {args.out}")
    if args.no_eval:
        return
    metrics = evaluate(args.out, args.data, args.eval_samples, args.seed, torch.device(args.eval_device))
    path = os.path.join(args.out, "metrics.json")
    everything = {}
    if os.path.exists(path):
        with open(path) as f:
            everything = json.load(f)
    everything["eval"] = metrics
    write_json(path, everything)
    print(json.dumps({k: v for k, v in metrics.items() if k != "examples"}, indent=2))


if __name__ == "__main__":
    main()
