"""
A side-chain prior for the scaffold task, prior_sidechain/ beside this file: the embedded whole-molecule prior (prior/)
fine-tuned on side chains cut from MOSES molecules, so that P_ref(x) is a distribution over short substituents
that stop. Run from the repository root:

    python -m tasks.smiles.sidechains derive      # tasks/smiles/data/sidechains_{train,heldout}.tsv.gz from MOSES molecules
    python -m tasks.smiles.sidechains fine-tune   # prior/ fine-tuned on them -> prior_sidechain/ (+ measure)
    python -m tasks.smiles.sidechains measure     # the quality bar under the task's mask, for both priors

Why: under the task's mask (2 <= length <= 10 tokens) the whole-molecule prior almost never stops early
(log p_ref(stop | s_k) is about -15 nats), so every target P_ref(x) exp(lambda S(x)) sits at L_max.

The fine-tune keeps only side chains of the task's window (2..10 tokens, 34% of occurrences), so P_ref is the
side-chain distribution given the task's lengths. Trained on all of them (--min-tokens 1 --max-tokens 0) the
model puts ~36% of its mass beyond 10 tokens, which the mask cuts at L_max, mostly into invalid text, and ~30%
on one-atom chains that L_min = 2 forbids: 52% valid, 53% at L_max after 100 steps (prior_sidechain/metrics.json).

A side chain is the smaller piece (by heavy atoms) of a molecule cut at one acyclic single bond between two
heavy atoms, written as SMILES rooted at the atom that was bonded to the rest ('[*:1]' + text re-attaches it).
"""
import argparse
import copy
import gzip
import json
import math
import os
import statistics
import sys
import time
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

ROOT = os.path.dirname(os.path.abspath(__file__))  # the task's folder: data/, prior/, prior_sidechain/
MOLECULES = os.path.join(ROOT, "data", "moses_train_subset.smi.gz")
TRAIN_FILE = os.path.join(ROOT, "data", "sidechains_train.tsv.gz")
HELDOUT_FILE = os.path.join(ROOT, "data", "sidechains_heldout.tsv.gz")
PRIOR, OUT = os.path.join(ROOT, "prior"), os.path.join(ROOT, "prior_sidechain")
N_TRAIN, N_HELDOUT, SEED = 100_000, 10_000, 0  # molecules drawn for each split (disjoint)
MIN_TOKENS, MAX_TOKENS = 2, 10  # the task's L_min / L_max: the fine-tune learns side chains of this window only


# -----------------------------------------------------------------------------
# deriving the corpus


def side_chains(smiles):
    """Every side chain of one molecule (one per acyclic single heavy-atom bond), rooted at its attachment."""
    from rdkit import Chem
    mol = Chem.MolFromSmiles(smiles)
    if mol is None:
        return []
    out = []
    for bond in mol.GetBonds():
        a, b = bond.GetBeginAtom(), bond.GetEndAtom()
        if bond.IsInRing() or bond.GetBondType() != Chem.BondType.SINGLE or min(a.GetAtomicNum(), b.GetAtomicNum()) < 2:
            continue
        cut = Chem.FragmentOnBonds(mol, [bond.GetIdx()], addDummies=True, dummyLabels=[(0, 0)])  # plain '*' dummies
        pieces = Chem.GetMolFrags(cut, asMols=True)
        smallest = min(p.GetNumHeavyAtoms() for p in pieces)  # dummies are not heavy atoms
        texts = [rooted(p) for p in pieces if p.GetNumHeavyAtoms() == smallest]
        out.append(min(texts, key=lambda t: (len(t), t)))  # a tie (both halves equal in size): the shorter string
    return out


def rooted(piece):
    """SMILES of a cut piece starting at its dummy, without the dummy: '*c1ccccc1' -> 'c1ccccc1'."""
    from rdkit import Chem
    dummy = next(a.GetIdx() for a in piece.GetAtoms() if a.GetAtomicNum() == 0)
    text = Chem.MolToSmiles(piece, rootedAtAtom=dummy)
    assert text.startswith("*"), text
    return text[1:]  # no bond symbol follows: RDKit writes '-' only between two aromatic atoms


def derive_corpus(molecules, n_train=N_TRAIN, n_heldout=N_HELDOUT, seed=SEED):
    """Side-chain counts of n_train and of n_heldout other molecules, drawn at random (the file is clustered)."""
    from rdkit import rdBase
    if n_train + n_heldout > len(molecules):
        raise ValueError(f"asked for {n_train} + {n_heldout} molecules, the input has {len(molecules)}")
    rows = np.random.default_rng(seed).choice(len(molecules), size=n_train + n_heldout, replace=False)
    splits = []
    with rdBase.BlockLogs():  # MOSES parses cleanly, but keep RDKit quiet whatever the input
        for part in (rows[:n_train], rows[n_train:]):
            counts = Counter()
            for i in tqdm(part, desc="side chains", mininterval=5, disable=len(part) < 5000):
                counts.update(side_chains(molecules[i]))
            splits.append(counts)
    return splits


def write_counts(path, counts):
    """'count<TAB>side chain' lines, most frequent first; gzip without mtime or file name: bytes depend on content only."""
    lines = [f"{n}\t{text}\n" for text, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
    with open(path, "wb") as raw, gzip.GzipFile(filename="", fileobj=raw, mode="wb", compresslevel=9, mtime=0) as gz:
        gz.write("".join(lines).encode())


def read_counts(path):
    counts = Counter()
    with gzip.open(path, "rt") as f:
        for line in f:
            n, text = line.rstrip("\n").split("\t")
            counts[text] = int(n)
    return counts


def corpus_stats(counts, tokenizer=None):
    """Occurrence- and distinct-string statistics (lengths in atom tokens of the prior's regex)."""
    from tasks.smiles.train_prior import regex_tokens
    lengths = {text: len(regex_tokens(text)) for text in counts}
    total = sum(counts.values())
    stats = {"occurrences": total, "distinct": len(counts),
             "occ_frac_le_10_tokens": sum(n for t, n in counts.items() if lengths[t] <= 10) / total,
             "occ_frac_1_token": sum(n for t, n in counts.items() if lengths[t] == 1) / total,
             "occ_frac_2_to_10_tokens": sum(n for t, n in counts.items() if 2 <= lengths[t] <= 10) / total,
             "distinct_frac_gt_10_tokens": sum(lengths[t] > 10 for t in counts) / len(counts),
             "top": [f"{t} {n}" for t, n in counts.most_common(10)]}
    if tokenizer is not None:
        unk = tokenizer.unk_token_id
        ids = tokenizer(list(counts), add_special_tokens=False).input_ids
        stats["unknown_tokens"] = sum(row.count(unk) for row in ids)
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in stats.items()}


# -----------------------------------------------------------------------------
# fine-tuning


def encode(tokenizer, counts, min_tokens, max_tokens):
    """<bos> side chain <eos> rows (right-padded), kept when min_tokens <= length <= max_tokens, with counts."""
    texts = sorted(counts)
    ids = tokenizer(texts, add_special_tokens=False).input_ids
    keep = [(row, counts[t]) for t, row in zip(texts, ids) if min_tokens <= len(row) <= (max_tokens or len(row))]
    width = max(len(row) for row, _ in keep) + 2
    data = torch.full((len(keep), width), tokenizer.pad_token_id)
    for i, (row, _) in enumerate(keep):
        data[i, :len(row) + 2] = torch.tensor([tokenizer.bos_token_id] + row + [tokenizer.eos_token_id])
    return data, torch.tensor([n for _, n in keep], dtype=torch.float64)


def token_losses(model, data, pad):
    """Per-row summed NLL, number of predicted tokens, and log p(eos | bos x) (padding only follows EOS)."""
    logits = model(input_ids=data[:, :-1]).logits.float()
    targets = data[:, 1:].masked_fill(data[:, 1:] == pad, -100)
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
    n = (targets != -100).sum(1)
    logp = torch.log_softmax(logits, -1)
    log_stop = logp[torch.arange(len(data)), n - 1].gather(-1, data[torch.arange(len(data)), n, None]).squeeze(-1)
    return nll.sum(1), n, log_stop


@torch.no_grad()
def validate(model, data, weights, pad, batch_size=2000):
    """Occurrence-weighted validation loss (nats/token) and mean log P(stop | x) on held-out side chains."""
    was_training = model.training
    model.eval()
    nll, ntok, stop = 0.0, 0.0, 0.0
    for start in range(0, len(data), batch_size):
        rows, w = data[start:start + batch_size], weights[start:start + batch_size]
        s, n, log_stop = token_losses(model, rows, pad)
        nll += float((w * s.double()).sum())
        ntok += float((w * n.double()).sum())
        stop += float((w * log_stop.double()).sum())
    model.train(was_training)
    return nll / ntok, stop / float(weights.sum())


def cosine(step, warmup, total, min_ratio=0.1):
    if step < warmup:
        return (step + 1) / warmup
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))


def fine_tune(args):
    """Maximum likelihood on side chains drawn in proportion to their counts; stops at a validation plateau."""
    from tasks.smiles.train_prior import load_prior
    torch.manual_seed(args.seed)
    model, tokenizer = load_prior(args.prior)
    pad = tokenizer.pad_token_id
    data, weights = encode(tokenizer, read_counts(args.train), args.min_tokens, args.max_tokens)
    val_data, val_weights = encode(tokenizer, read_counts(args.heldout), args.min_tokens, args.max_tokens)
    print(f"{len(data)} distinct training side chains ({int(weights.sum())} occurrences), {len(val_data)} held out")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: cosine(s, args.warmup, args.steps))
    generator = torch.Generator().manual_seed(args.seed)
    val, stop = validate(model, val_data, val_weights, pad)
    history = [{"step": 0, "val_loss": round(val, 4), "val_log_p_stop": round(stop, 3), "seconds": 0.0}]
    print(f"step 0: val {val:.4f} nats/token, mean log P(stop | x) {stop:.2f}")
    best, best_step, best_state, bad, start, step = val, 0, copy.deepcopy(model.state_dict()), 0, time.time(), 0
    model.train()
    progress = tqdm(range(1, args.steps + 1), desc="fine-tune", mininterval=10)
    for step in progress:
        rows = torch.multinomial(weights, args.batch_size, replacement=True, generator=generator)
        batch = data[rows]
        s, n, _ = token_losses(model, batch[:, :int((batch != pad).sum(1).max())], pad)
        loss = s.sum() / n.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every == 0 or step == args.steps:
            val, stop = validate(model, val_data, val_weights, pad)
            history.append({"step": step, "train_loss": round(loss.item(), 4), "val_loss": round(val, 4),
                            "val_log_p_stop": round(stop, 3), "seconds": round(time.time() - start, 1)})
            progress.set_postfix(val=f"{val:.4f}", refresh=False)
            print(f"step {step}: train {loss.item():.4f} val {val:.4f} log P(stop) {stop:.2f} "
                  f"({time.time() - start:.0f} s)", flush=True)
            if val < best - args.min_delta:
                best, best_step, best_state, bad = val, step, copy.deepcopy(model.state_dict()), 0
            else:
                bad += 1
                if bad >= args.patience:
                    print(f"validation plateau: no gain over {args.min_delta} in {args.patience} evaluations")
                    break
        if args.max_minutes and time.time() - start > 60 * args.max_minutes:
            print(f"time budget of {args.max_minutes} min reached at step {step}")
            break
    model.load_state_dict(best_state)  # the weights of the last gain of more than min_delta, not the last ones
    seconds = time.time() - start
    paths = {k: os.path.relpath(v, ROOT) for k, v in vars(args).items() if isinstance(v, str) and os.path.isabs(v)}
    info = {"steps_done": step, "kept_step": best_step, "kept_val_loss": round(best, 4), "wall_seconds": round(seconds, 1),
            "seconds_per_step": round(seconds / max(step, 1), 3), "train_distinct": len(data),
            "train_occurrences": int(weights.sum()), "heldout_distinct": len(val_data),
            "threads": torch.get_num_threads(), "args": {**vars(args), **paths}, "history": history}
    return model.eval(), tokenizer, info


# -----------------------------------------------------------------------------
# measuring a reference under the task's mask


@torch.no_grad()
def measure(model_dir, n=2000, seed=0, min_len=MIN_TOKENS, max_len=MAX_TOKENS):
    """Sample n side chains as train.py's Policy does; validity and QED on the paper's scaffold, attached on the
    graph (SmilesTask's Chem.molzip: any RDKit failure is invalid) and, for comparison, as a string."""
    import model as modellib
    import rewards
    from tasks.smiles.task import SmilesTask
    from rdkit import rdBase
    torch.manual_seed(seed)
    net, tokenizer = modellib.load_model(model_dir)
    allowed = rewards.allowed_token_ids(tokenizer, SmilesTask.charset)
    policy = modellib.Policy(net.eval(), tokenizer, allowed, min_len, max_len)
    texts, lengths, log_stop = [], [], []
    for start in range(0, n, 500):
        tokens, lens, _ = policy.sample(min(500, n - start))
        texts += policy.texts(tokens, lens)
        lengths += lens.tolist()
        k = torch.arange(max_len + 1)[None]
        declined = (k >= min_len) & (k < lens[:, None])  # states where stopping was allowed but not taken
        log_stop.append(policy.log_probs(tokens, lens)[1][declined])
    graph, string = SmilesTask(attach="graph"), SmilesTask(attach="string")
    with rdBase.BlockLogs():
        valid = [graph.is_valid(t) for t in texts]
        qed = [graph.score(t) for t, v in zip(texts, valid) if v]
        string_valid = sum(string.is_valid(t) for t in texts) / n
    return {"model": os.path.basename(os.path.normpath(model_dir)), "samples": n, "seed": seed,
            "valid_on_scaffold": round(sum(valid) / n, 4), "valid_as_string": round(string_valid, 4), "median_length": statistics.median(lengths),
            "mean_length": round(sum(lengths) / n, 2), "frac_at_max_len": round(sum(x == max_len for x in lengths) / n, 4),
            "mean_qed_valid": round(sum(qed) / max(1, len(qed)), 4), "unique_frac": round(len(set(texts)) / n, 4),
            "mean_log_p_stop_declined": round(float(torch.cat(log_stop).mean()), 2),
            "bar": "valid >= 0.95, median length <= 8, at L_max <= 0.30", "examples": texts[:12]}


def passes(m):
    return m["valid_on_scaffold"] >= 0.95 and m["median_length"] <= 8 and m["frac_at_max_len"] <= 0.30


# -----------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("command", choices=["derive", "fine-tune", "measure"])
    p.add_argument("--molecules", default=MOLECULES, help="derive: SMILES to cut, one per line (.gz or plain)")
    p.add_argument("--n-train", type=int, default=N_TRAIN, help="derive: molecules for the training side chains")
    p.add_argument("--n-heldout", type=int, default=N_HELDOUT, help="derive: other molecules for the held-out ones")
    p.add_argument("--train", default=TRAIN_FILE, help="side-chain counts for training")
    p.add_argument("--heldout", default=HELDOUT_FILE, help="side-chain counts for the validation loss")
    p.add_argument("--prior", default=PRIOR, help="fine-tune: the starting model")
    p.add_argument("--out", default=OUT, help="fine-tune: output folder; measure: the model to measure")
    p.add_argument("--min-tokens", type=int, default=MIN_TOKENS, help="fine-tune on side chains this long ...")
    p.add_argument("--max-tokens", type=int, default=MAX_TOKENS, help="... up to this long (0: no limit)")
    p.add_argument("--steps", type=int, default=1500, help="step budget (the cosine schedule's length)")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-4)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--patience", type=int, default=5, help="evaluations without a gain before stopping")
    p.add_argument("--min-delta", type=float, default=1e-3, help="a smaller val-loss gain is no gain")
    p.add_argument("--max-minutes", type=float, default=50, help="stop training after this long (0: no limit)")
    p.add_argument("--samples", type=int, default=2000, help="samples for the quality measurements")
    p.add_argument("--seed", type=int, default=SEED)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(1)  # a small model and a shared machine: one core
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    needed = {"derive": [args.molecules], "fine-tune": [args.train, args.heldout, args.prior], "measure": [args.out, PRIOR]}
    missing = [path for path in needed[args.command] if not os.path.exists(path)]
    if missing:
        print(f"error: {missing[0]} does not exist", file=sys.stderr)
        return 2
    if args.command == "derive":
        from tasks.smiles.train_prior import load_prior, read_smiles
        train, heldout = derive_corpus(read_smiles(args.molecules), args.n_train, args.n_heldout, args.seed)
        write_counts(args.train, train)
        write_counts(args.heldout, heldout)
        tokenizer = load_prior(PRIOR)[1]
        for name, counts in (("train", train), ("heldout", heldout)):
            print(name, json.dumps(corpus_stats(counts, tokenizer)))
        return 0
    if args.command == "fine-tune":
        from tasks.smiles.train_prior import save_prior
        model, tokenizer, info = fine_tune(args)
        info["command"] = "python " + " ".join([os.path.relpath(os.path.abspath(sys.argv[0]), ROOT)] + sys.argv[1:])
        save_prior(model, tokenizer, {"fine_tune": info}, args.out)
        print(f"saved {args.out}")
    report = {"new": measure(args.out, args.samples, args.seed), "old_prior": measure(PRIOR, args.samples, args.seed)}
    for m in report.values():
        print(json.dumps({k: v for k, v in m.items() if k != "examples"}), "PASS" if passes(m) else "MISS")
    path = os.path.join(args.out, "metrics.json")
    metrics = json.load(open(path)) if os.path.exists(path) else {}
    metrics["measure"] = report
    with open(path, "w") as f:
        json.dump(metrics, f, indent=2)
        f.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
