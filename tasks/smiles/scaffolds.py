"""
Many scaffolds (METHOD.md §11.5): the side-chain task over a file of scaffolds (train.py --scaffolds FILE), the
scaffold set shipped in tasks/smiles/data/scaffolds.tsv (derived from MOSES), and what the side-chain reference does when a
scaffold stands in its prompt.

    python -m tasks.smiles.scaffolds derive     # tasks/smiles/data/scaffolds.tsv from MOSES molecules (about a minute)
    python -m tasks.smiles.scaffolds measure    # prior_sidechain/ under each scaffold's prompt, against BOS only

A scaffold file has one SMILES with one '*' per line; a line may end in a tab and `heldout`. Each scaffold is a
condition whose prompt is its SMILES and SEPARATOR; its task is SmilesTask on it. A file of one training
scaffold is that single-scaffold task itself, with the BOS-only prompt the side-chain prior was trained with.
"""
import argparse
import functools
import gzip
import json
import os
import statistics
import sys
from collections import Counter

import numpy as np

import rewards
from tasks.smiles.task import SmilesTask

HERE = os.path.dirname(os.path.abspath(__file__))
SCAFFOLDS = os.path.join(HERE, "data", "scaffolds.tsv")
MOLECULES = os.path.join(HERE, "data", "moses_train_subset.smi.gz")
SEPARATOR = "."  # 'scaffold.' + side chain: in SMILES a dot starts another fragment, the closest the prior can read
N_MOLECULES, N_SCAFFOLDS, HELDOUT_EVERY, SEED = 20_000, 50, 5, 0
HEAVY_ATOMS, SIDE_CHAIN_TOKENS = (8, 14), (2, 10)  # core-sized scaffolds (the paper's: 11 heavy atoms)


class ScaffoldsTask(rewards.Task):
    """The side-chain task of every scaffold of a file: a condition per scaffold (METHOD.md §11.5)."""
    name, chemical, similarity = "smiles", True, "tanimoto"
    charset, max_token_chars = SmilesTask.charset, SmilesTask.max_token_chars

    def __init__(self, train, heldout=(), attach="graph"):
        self.attach = attach
        self.conditions = dict(train=[s + SEPARATOR for s in train], heldout=[s + SEPARATOR for s in heldout])
        self.defaults = SmilesTask(train[0], attach).defaults
        for prompt in self.conditions["train"] + self.conditions["heldout"]:
            self.given(prompt)  # a scaffold that does not parse fails here, as --scaffold does

    @functools.lru_cache(maxsize=None)
    def given(self, prompt):
        if not prompt.endswith(SEPARATOR):
            raise rewards.TaskError(f"a scaffold prompt is the scaffold's SMILES and {SEPARATOR!r} (got {prompt!r})")
        return SmilesTask(prompt[:-len(SEPARATOR)], self.attach)


def read_scaffolds(path):
    """(train, heldout) scaffolds of a file: one SMILES per line, a tab and `heldout` marking the held-out ones."""
    for base in (os.path.dirname(os.path.dirname(HERE)), HERE):  # wherever the scripts are run from; HERE: the
        if not os.path.exists(path) and os.path.isfile(os.path.join(base, path)):  # data/scaffolds.tsv of old runs
            path = os.path.join(base, path)
    try:
        with open(path, encoding="utf-8") as f:
            lines = [line.rstrip("\r\n").split("\t") for line in f if line.strip() and not line.startswith("#")]
    except OSError as e:
        raise rewards.TaskError(f"cannot read scaffolds file {path!r}: {e.strerror}") from None
    except UnicodeDecodeError as e:
        raise rewards.TaskError(f"scaffolds file {path!r} is not UTF-8 text (offset {e.start})") from None
    bad = [cols for cols in lines if len(cols) > 2 or (len(cols) == 2 and cols[1] not in ("train", "heldout"))]
    if bad:
        raise rewards.TaskError(f"scaffolds file {path!r}: a line is 'SMILES' or 'SMILES<TAB>heldout' (got {bad[0]})")
    train = [c[0] for c in lines if len(c) == 1 or c[1] == "train"]
    heldout = [c[0] for c in lines if len(c) == 2 and c[1] == "heldout"]
    if not train:
        raise rewards.TaskError(f"scaffolds file {path!r} has no training scaffold")
    return list(dict.fromkeys(train)), list(dict.fromkeys(heldout))


def scaffold_task(path, attach="graph"):
    train, heldout = read_scaffolds(path)
    if len(train) == 1 and not heldout:  # one condition carries no information: the task of --scaffold itself
        return SmilesTask(train[0], attach)
    return ScaffoldsTask(train, heldout, attach)


# ----------------------------------------------------------------------------- deriving the set from MOSES

def cuts(smiles):
    """(scaffold, side chain) of every acyclic single bond between heavy atoms of a molecule: the larger piece
    (by heavy atoms) with '*' at the cut, canonical; the smaller one as sidechains.side_chains writes it."""
    from rdkit import Chem
    from tasks.smiles.sidechains import rooted
    mol = Chem.MolFromSmiles(smiles)
    out = []
    for bond in mol.GetBonds() if mol is not None else ():
        a, b = bond.GetBeginAtom(), bond.GetEndAtom()
        if bond.IsInRing() or bond.GetBondType() != Chem.BondType.SINGLE or min(a.GetAtomicNum(), b.GetAtomicNum()) < 2:
            continue
        cut = Chem.FragmentOnBonds(mol, [bond.GetIdx()], addDummies=True, dummyLabels=[(0, 0)])
        pieces = sorted(Chem.GetMolFrags(cut, asMols=True), key=lambda p: p.GetNumHeavyAtoms())
        if len(pieces) == 2 and pieces[0].GetNumHeavyAtoms() < pieces[1].GetNumHeavyAtoms():
            out.append((Chem.MolToSmiles(pieces[1]), rooted(pieces[0]), pieces[1]))
    return out


def suits(scaffold_mol, side_chain, tokenizer):
    """A scaffold the side-chain setting suits: ring-bearing, 8-14 heavy atoms, '*' on an aromatic carbon (as the
    paper's scaffold), and the side chain cut from it 2-10 prior tokens long (the task's window)."""
    from rdkit.Chem import rdMolDescriptors
    dummy = next(a for a in scaffold_mol.GetAtoms() if a.GetAtomicNum() == 0)
    anchor = dummy.GetNeighbors()[0]
    n_tokens = len(tokenizer(side_chain, add_special_tokens=False).input_ids)
    return (rdMolDescriptors.CalcNumRings(scaffold_mol) >= 1 and anchor.GetIsAromatic() and anchor.GetSymbol() == "C"
            and HEAVY_ATOMS[0] <= scaffold_mol.GetNumHeavyAtoms() <= HEAVY_ATOMS[1]
            and SIDE_CHAIN_TOKENS[0] <= n_tokens <= SIDE_CHAIN_TOKENS[1])


def derive(molecules=MOLECULES, out=SCAFFOLDS, n_molecules=N_MOLECULES, n_scaffolds=N_SCAFFOLDS, seed=SEED):
    """n_scaffolds suitable scaffolds, drawn at random among those that n_molecules random MOSES molecules share
    (two at least: single ones are mostly a whole molecule less one group), by frequency then alphabetically; every
    HELDOUT_EVERY-th of them is held out."""
    from rdkit import rdBase
    from tqdm import tqdm
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(HERE, "prior_sidechain"))
    with gzip.open(molecules, "rt") as f:
        smiles = [line.split()[0] for line in f if line.strip()]
    picks = np.random.default_rng(seed).choice(len(smiles), size=n_molecules, replace=False)
    counts = Counter()
    with rdBase.BlockLogs():
        for i in tqdm(picks, desc="cutting molecules", mininterval=2):
            counts.update({s for s, chain, mol in cuts(smiles[i]) if suits(mol, chain, tokenizer)})  # once per molecule
    recurring = sorted(s for s, c in counts.items() if c >= 2)  # a substructure of two molecules at least
    picks = np.random.default_rng(seed).choice(len(recurring), size=min(n_scaffolds, len(recurring)), replace=False)
    ranked = sorted(((recurring[i], counts[recurring[i]]) for i in picks), key=lambda kv: (-kv[1], kv[0]))
    with open(out, "w") as f:
        f.write(f"# tasks/smiles/scaffolds.py derive: {len(ranked)} of the {len(recurring)} suitable scaffolds found in at least two "
                f"of {n_molecules} MOSES molecules (seed {seed}); molecules holding each: "
                + " ".join(str(c) for _, c in ranked) + "\n")
        for rank, (s, _) in enumerate(ranked, 1):
            f.write(s + ("\theldout" if rank % HELDOUT_EVERY == 0 else "") + "\n")
    return ranked


# ----------------------------------------------------------------------------- the reference under scaffold prompts

def measure(path=SCAFFOLDS, n=200, seed=0, separators=("", SEPARATOR), limit=10):
    """prior_sidechain/ sampled as train.py's Policy does, with each of the first `limit` scaffolds' SMILES (and
    each separator) as the prompt, against the BOS-only prompt it was trained with: validity on that scaffold,
    length, and log p(stop) where the stop was allowed but not taken."""
    import torch
    import model as modellib
    net, tokenizer = modellib.load_model("prior_sidechain")
    allowed = rewards.allowed_token_ids(tokenizer, SmilesTask.charset)
    lo, hi = SmilesTask.defaults["min_len"], SmilesTask.defaults["max_len"]
    train, heldout = read_scaffolds(path)
    report = {}
    for prompt_kind in ("bos",) + tuple(f"scaffold{s}" for s in separators):
        rows = []
        for scaffold in (train + heldout)[:limit]:
            prompt = "" if prompt_kind == "bos" else scaffold + prompt_kind[len("scaffold"):]
            policy = modellib.Policy(net.eval(), tokenizer, allowed, lo, hi, prompt)
            torch.manual_seed(seed)
            with torch.no_grad():
                tokens, lengths, _ = policy.sample(n)
                k = torch.arange(hi + 1)[None]
                declined = (k >= lo) & (k < lengths[:, None])
                log_stop = policy.log_probs(tokens, lengths)[1][declined]
            task = SmilesTask(scaffold)
            texts = policy.texts(tokens, lengths)
            rows.append(dict(valid=np.mean([task.is_valid(t) for t in texts]), median_length=statistics.median(
                lengths.tolist()), at_max_len=float((lengths == hi).float().mean()),
                log_p_stop_declined=float(log_stop.mean()) if len(log_stop) else None,
                qed_valid=np.mean([task.score(t) for t in texts if task.is_valid(t)] or [0.0])))
        report[prompt_kind] = {key: round(float(np.mean([r[key] for r in rows if r[key] is not None])), 3)
                               for key in rows[0]}
    return dict(samples_per_scaffold=n, scaffolds=min(limit, len(train + heldout)), report=report)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=["derive", "measure"])
    p.add_argument("--out", default=SCAFFOLDS)
    args = p.parse_args(argv)
    import torch
    torch.set_num_threads(1)
    if args.command == "derive":
        for s, c in derive(out=args.out):
            print(c, s)
    else:
        print(json.dumps(measure(args.out), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
