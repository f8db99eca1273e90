"""
Every measurement of a set of samples, as pure functions (lists and arrays in, numbers out; no model):
sample.py, train.py's periodic evaluation and research/reproduce.py all call these.

Acc, Score, TokEnt, lengths, prefix diagnostics, chemistry (FPDiv, MacroFP, uniqueness, novelty, scaffolds,
IntDiv) and Expr24 coverage (METHOD.md §7). The distance to the target (METHOD.md §8) is in fidelity.py.

A sample is a dict with keys
    tokens     generated tokens (strings or ids), EOS excluded, len(tokens) == length
    length     tau, the number of generated tokens
    generated  the generated string
    molecule   the full object (for SMILES: the molecule after attaching the side chain)
    valid      bool
    score      task score in [0, 1]; 0 if invalid
    log_prob   (optional, only written to the CSV)

Conventions used throughout:
- "On valid samples unless noted": every metric except Acc, `score_all` and the `*_all` length statistics
  looks only at valid samples.
- Entropies are in nats.
- A metric that is undefined for the input (no valid samples, fewer than two molecules for a pairwise metric,
  ...) is None, never NaN, and nothing raises or warns.
"""

import math
from collections import Counter, defaultdict
from functools import lru_cache

import numpy as np
from rdkit import Chem, DataStructs, RDLogger
from rdkit.Chem import rdFingerprintGenerator
from rdkit.Chem.Scaffolds import MurckoScaffold

FP_RADIUS = 2
FP_BITS = 2048       # FPDiv / MacroFP, as in the paper (and SubM replay)
MOSES_FP_BITS = 1024  # IntDiv follows MOSES, which uses Morgan radius 2 with 1024 bits

# -----------------------------------------------------------------------------
# small helpers

def mean_or_none(values):
    return float(np.mean(values)) if len(values) > 0 else None


def entropy_nats(counts):
    """Shannon entropy (nats) of the empirical distribution given by a Counter / list of counts."""
    counts = list(counts.values()) if isinstance(counts, dict) else list(counts)
    total = sum(counts)
    if total == 0:
        return None
    return -sum(c / total * math.log(c / total) for c in counts if c > 0)


def parse_molecule(smiles):
    RDLogger.DisableLog("rdApp.*")  # the parser prints an error for every invalid string
    try:
        return Chem.MolFromSmiles(smiles)
    finally:
        RDLogger.EnableLog("rdApp.*")


def canonical_smiles(smiles):
    mol = parse_molecule(smiles)
    return None if mol is None else Chem.MolToSmiles(mol)

# -----------------------------------------------------------------------------
# fingerprints and Tanimoto (the one place both are computed)

@lru_cache(maxsize=None)
def morgan_generator(n_bits):
    return rdFingerprintGenerator.GetMorganGenerator(radius=FP_RADIUS, fpSize=n_bits)


def fingerprints(mols, n_bits=FP_BITS):
    """Morgan bit-vector fingerprints (radius 2) of RDKit molecules."""
    generator = morgan_generator(n_bits)
    return [generator.GetFingerprint(mol) for mol in mols]


def tanimoto_row_sums(fps, p=1):
    """row_sums[i] = sum_{j != i} T(i, j)^p, in O(n^2) time and O(n) memory.
    Row by row with BulkTanimotoSimilarity over j > i (~1 s for n = 3200 on one core); each
    similarity is added to both of its rows, so the full symmetric matrix is never stored."""
    n = len(fps)
    row_sums = np.zeros(n)
    for i in range(n - 1):
        sims = np.asarray(DataStructs.BulkTanimotoSimilarity(fps[i], fps[i + 1:])) ** p
        row_sums[i] += sims.sum()
        row_sums[i + 1:] += sims
    return row_sums

# -----------------------------------------------------------------------------
# task metrics

def accuracy(valid):
    """Acc: fraction of ALL samples that are valid."""
    return mean_or_none([float(v) for v in valid])


def mean_score(scores, valid=None):
    """Mean task score over the valid samples (or over all samples when valid is None)."""
    if valid is not None:
        scores = [s for s, v in zip(scores, valid) if v]
    return mean_or_none(scores)

# -----------------------------------------------------------------------------
# token-level metrics (task-agnostic; callers pass the valid samples' tokens)

def token_entropy(token_seqs):
    """TokEnt (nats): at each position k, the entropy of the token distribution over the sequences
    still alive there (len > k); averaged (unweighted) over the positions where at least one
    sequence is alive. A position with a single live sequence counts, with entropy 0."""
    max_len = max((len(seq) for seq in token_seqs), default=0)
    per_position = [entropy_nats(Counter(seq[k] for seq in token_seqs if len(seq) > k))
                    for k in range(max_len)]
    return mean_or_none(per_position)


def length_stats(lengths):
    """Len: mean, median and 90th percentile (numpy's linear interpolation) of tau, plus the
    histogram {length: count} sorted by length."""
    if len(lengths) == 0:
        return {"mean": None, "median": None, "p90": None, "hist": {}}
    lengths = np.asarray(lengths, dtype=float)
    return {
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p90": float(np.percentile(lengths, 90)),
        "hist": dict(sorted(Counter(int(t) for t in lengths).items())),
    }


def survival(lengths, k):
    """Surv(k): fraction of sequences longer than k tokens (tau > k)."""
    return mean_or_none([float(t > k) for t in lengths])


def prefix_counts(token_seqs, k):
    """How often each depth-k prefix occurs, over the sequences with at least k tokens."""
    return Counter(tuple(seq[:k]) for seq in token_seqs if len(seq) >= k)


def prefix_entropy(token_seqs, k):
    """PefEnt(k) (nats): entropy of the distribution of depth-k prefixes (sequences with tau >= k)."""
    return entropy_nats(prefix_counts(token_seqs, k))


def top1_prefix_mass(token_seqs, k):
    """Top1(k): probability mass of the most common depth-k prefix (sequences with tau >= k)."""
    counts = prefix_counts(token_seqs, k)
    total = sum(counts.values())
    return max(counts.values()) / total if total > 0 else None


def prefix_diagnostics(token_seqs, max_depth):
    """Surv / PefEnt / Top1 for depths k = 1..max_depth, as flat keys 'surv@k' etc."""
    lengths = [len(seq) for seq in token_seqs]
    out = {}
    for k in range(1, max_depth + 1):
        out[f"surv@{k}"] = survival(lengths, k)
        out[f"pef_ent@{k}"] = prefix_entropy(token_seqs, k)
        out[f"top1@{k}"] = top1_prefix_mass(token_seqs, k)
    return out

# -----------------------------------------------------------------------------
# chemistry metrics (callers pass the valid samples' molecules)

def fp_diversity(fps):
    """FPDiv: 1 - mean Tanimoto over the pairs i < j of the samples given. Duplicated molecules
    are kept (each pair of identical samples contributes similarity 1), so a collapsed sampler
    scores low. None for fewer than two samples."""
    n = len(fps)
    if n < 2:
        return None
    return 1.0 - tanimoto_row_sums(fps).sum() / (n * (n - 1))


def macro_fp_diversity(fps, lengths):
    """MacroFP: FPDiv within each length bin (bin = tau) holding at least two samples, averaged
    with equal weight per bin. None if no bin has two samples."""
    bins = defaultdict(list)
    for fp, tau in zip(fps, lengths):
        bins[tau].append(fp)
    per_bin = [fp_diversity(bin_fps) for bin_fps in bins.values() if len(bin_fps) >= 2]
    return mean_or_none(per_bin)


def internal_diversity(fps, p=1):
    """IntDiv_p as MOSES computes it (moses.metrics.internal_diversity):
        IntDiv_p = 1 - mean_i ( (1/n) sum_j T(i, j)^p )^(1/p)
    over the FULL n x n matrix, diagonal included (T(i, i) = 1), on the valid generated molecules
    with duplicates kept (MOSES's get_all_metrics drops invalid SMILES but does not deduplicate).
    For p = 1 this is 1 - mean of all n^2 entries. Callers pass MOSES's fingerprint, Morgan radius 2
    with 1024 bits. (MOSES scores two empty fingerprints as similarity 1, RDKit as 0; only
    atom-less molecules hit that, and a substituted scaffold always has atoms.)"""
    n = len(fps)
    if n == 0:
        return None
    row_means = (tanimoto_row_sums(fps, p) + 1.0) / n
    return float(1.0 - np.mean(row_means ** (1.0 / p)))


def uniqueness(canonical):
    """Distinct canonical SMILES / number of valid samples."""
    return len(set(canonical)) / len(canonical) if canonical else None


def novelty(canonical, train_smiles):
    """Fraction of the distinct valid canonical SMILES that are not in train_smiles (a set of
    canonical SMILES, canonicalised with the same RDKit). None without a training set."""
    if train_smiles is None or not canonical:
        return None
    distinct = set(canonical)
    return len(distinct - set(train_smiles)) / len(distinct)


def murcko_scaffold_count(mols):
    """Number of distinct Bemis-Murcko scaffolds (RDKit MurckoScaffoldSmiles). Acyclic molecules
    have the empty scaffold '', which is not counted."""
    scaffolds = {MurckoScaffold.MurckoScaffoldSmiles(mol=mol) for mol in mols}
    scaffolds.discard("")
    return len(scaffolds)

# -----------------------------------------------------------------------------
# entry points

def sequence_metrics(samples, max_depth=None):
    """Task-agnostic metrics (SMILES and Expr24): Acc, Score, TokEnt, Len, prefix diagnostics.
    max_depth defaults to the longest sample (pass L_max to get a fixed-size table)."""
    for s in samples:
        if len(s["tokens"]) != s["length"]:
            raise ValueError(f"len(tokens) = {len(s['tokens'])} but length = {s['length']}")
    valid = [bool(s["valid"]) for s in samples]
    valid_tokens = [list(s["tokens"]) for s in samples if s["valid"]]
    scores = [float(s["score"]) for s in samples]
    if max_depth is None:
        max_depth = max((s["length"] for s in samples), default=0)

    len_valid = length_stats([len(seq) for seq in valid_tokens])
    len_all = length_stats([s["length"] for s in samples])
    out = {
        "n": len(samples),
        "n_valid": sum(valid),
        "acc": accuracy(valid),
        "score": mean_score(scores, valid),
        "score_all": mean_score(scores),
        "tok_ent": token_entropy(valid_tokens),
    }
    for name, stats in [("len", len_valid), ("len_all", len_all)]:
        out[f"{name}_mean"] = stats["mean"]
        out[f"{name}_median"] = stats["median"]
        out[f"{name}_p90"] = stats["p90"]
        out[f"{name}_hist"] = stats["hist"]
    out.update(prefix_diagnostics(valid_tokens, max_depth))
    return out


def chemistry_metrics(molecules, lengths, train_smiles=None):
    """FPDiv, MacroFP, uniqueness, novelty, scaffold count, IntDiv of valid molecule strings.
    A string that RDKit cannot parse is skipped (it should not have been marked valid)."""
    parsed = [(mol, tau) for mol, tau in zip(map(parse_molecule, molecules), lengths)
              if mol is not None]
    mols = [mol for mol, _ in parsed]
    fps = fingerprints(mols)
    canonical = [Chem.MolToSmiles(mol) for mol in mols]
    return {
        "fp_div": fp_diversity(fps),
        "macro_fp": macro_fp_diversity(fps, [tau for _, tau in parsed]),
        "n_unique": len(set(canonical)),
        "uniqueness": uniqueness(canonical),
        "novelty": novelty(canonical, train_smiles),
        "scaffolds": murcko_scaffold_count(mols),
        "int_div": internal_diversity(fingerprints(mols, MOSES_FP_BITS)),
    }


def smiles_metrics(samples, train_smiles=None, max_depth=None):
    """All METHOD.md §7 metrics of a list of sample dicts (see the module docstring), as one flat dict.
    Per-depth diagnostics are keys 'surv@k', 'pef_ent@k', 'top1@k'; length histograms are dicts
    under 'len_hist' (valid) and 'len_hist_all'."""
    out = sequence_metrics(samples, max_depth)
    valid = [s for s in samples if s["valid"]]
    out.update(chemistry_metrics([s["molecule"] for s in valid], [s["length"] for s in valid],
                                 train_smiles))
    return out

# -----------------------------------------------------------------------------
# Expr24 (the whole solution set is known, so coverage and divergences are exact)
#
# "Correct" = task score 1 (value exactly 24). The target is uniform over the solution set: the task's own
# goal, R ∝ exp(lambda * S) restricted to correct expressions. (The trainer's target also carries
# P_ref(x)^kappa, which sample.py does not know and which, for a random scratch model, favours short
# expressions; these divergences therefore measure coverage of the task, not convergence of training.)

END = "$"  # the per-position symbol of an expression that has already stopped


def kl_divergence(p, q):
    """KL(p || q) in nats for dicts symbol -> probability; q must be > 0 wherever p is."""
    return sum(pv * math.log(pv / q[a]) for a, pv in p.items() if pv > 0)


def js_divergence(p, q):
    """Jensen-Shannon divergence in nats (between 0 and log 2)."""
    m = {a: 0.5 * (p.get(a, 0.0) + q.get(a, 0.0)) for a in set(p) | set(q)}
    return 0.5 * kl_divergence(p, m) + 0.5 * kl_divergence(q, m)


def position_counts(expressions, n_positions):
    """For k = 0..n_positions-1, a Counter of the symbol at position k over ALL expressions: the character,
    or END once the expression has stopped (so the length distribution is part of every later position)."""
    return [Counter(e[k] if k < len(e) else END for e in expressions) for k in range(n_positions)]


def smoothed(counts, support, alpha):
    """Additive (Lidstone) smoothing over `support`: (c + alpha) / (C + alpha * |support|)."""
    total = sum(counts[a] for a in support) + alpha * len(support)
    return {a: (counts[a] + alpha) / total for a in support}


def position_divergences(correct, solutions, alpha=0.5):
    """Per position k, KL(sampler || target), KL(target || sampler) and JS between the symbol distribution
    of the correct samples (with multiplicity) and that of the solution set (each solution once: uniform).
    The sampler's counts get additive smoothing alpha over the target's support at k (alpha = 0.5,
    Krichevsky-Trofimov), which keeps both KLs finite: correct samples are solutions, so they never put
    a symbol outside that support. Returns three lists, one value per position."""
    n_positions = max(len(s) for s in solutions)
    fwd, rev, js = [], [], []
    for sample_k, target_k in zip(position_counts(correct, n_positions), position_counts(solutions, n_positions)):
        q = {a: c / len(solutions) for a, c in target_k.items()}
        if set(sample_k) - set(q):
            raise ValueError(f"correct samples use symbols {sorted(set(sample_k) - set(q))} that no solution has")
        p = smoothed(sample_k, q, alpha)
        fwd.append(kl_divergence(p, q))
        rev.append(kl_divergence(q, p))
        js.append(js_divergence(p, q))
    return fwd, rev, js


def sequence_divergences(correct, n_solutions):
    """KL(sampler || uniform) = log|S| - H(sampler) and JS(sampler, uniform) over whole expressions, with the
    sampler's empirical distribution unsmoothed (both are finite since it lives on the solution set).
    With N correct samples KL >= log(|S| / N): at N << |S| it mostly measures N. KL(uniform || sampler)
    is infinite until every solution is seen, and any smoothing over |S| pseudo-counts would swamp N
    samples, so it is only reported per position."""
    counts = Counter(correct)
    n = len(correct)
    kl = math.log(n_solutions) - entropy_nats(counts)
    u = 1.0 / n_solutions
    js = 0.5 * (n_solutions - len(counts)) * u * math.log(2)  # solutions never sampled: m = u / 2
    for c in counts.values():
        p = c / n
        m = 0.5 * (p + u)
        js += 0.5 * (p * math.log(p / m) + u * math.log(u / m))
    return kl, js


def blockwise_coverage(samples, correct_flags, block=6400, repeats=3):
    """The authors' protocol: up to `repeats` independent sampling runs of `block` samples each, NormCov = distinct
    correct / block in each, averaged. Returns (mean, distinct correct per block), (None, []) below one block."""
    counts = [len({s["generated"] for s, ok in zip(samples[i:i + block], correct_flags[i:i + block]) if ok})
              for i in range(0, block * repeats, block) if i + block <= len(samples)]
    return (sum(counts) / len(counts) / block if counts else None), counts


def expr24_metrics(samples, solutions, max_depth=None, alpha=0.5):
    """METHOD.md §7's Expr24 metrics of a list of sample dicts against the solution set (strings). On top of
    sequence_metrics computed over the CORRECT samples (TokEnt, Len, prefix diagnostics):
      acc            fraction of all samples that are correct (value == 24)
      valid_frac     fraction of all samples that are syntactically valid expressions (and defined)
      unique_correct distinct correct expressions;  norm_cov = unique_correct / min(N, |solutions|)
      norm_cov_at_3200  norm_cov of the first 3,200 samples (the paper's N), when there are more
      norm_cov_authors  the authors' NormCov (METHOD.md §10): the mean over consecutive blocks of 6,400 samples
                     (at most 3) of distinct correct in the block / 6,400; None below 6,400 samples
      cov_by_len     {length: distinct correct of that length / solutions of that length}
      kl_fwd, kl_rev, js   KL(sampler || target), KL(target || sampler), JS of the per-position symbol
                     distributions (position_divergences), averaged over positions (lists in pos_*)
      seq_kl, seq_js the same divergences over whole expressions (sequence_divergences)
    The divergences are None without a correct sample."""
    solutions = list(solutions)
    correct_flags = [float(s["score"]) == 1.0 for s in samples]
    out = sequence_metrics([dict(s, valid=ok) for s, ok in zip(samples, correct_flags)], max_depth)
    out["n_correct"] = out.pop("n_valid")
    out.pop("score")  # 1 by definition over the correct samples; score_all == acc
    correct = [s["generated"] for s, ok in zip(samples, correct_flags) if ok]
    if set(correct) - set(solutions):
        raise ValueError(f"{len(set(correct) - set(solutions))} correct samples are not in the solution set "
                         f"(e.g. {sorted(set(correct) - set(solutions))[0]!r}): wrong solution set?")
    distinct = set(correct)
    out["n_syntax_valid"] = sum(bool(s["valid"]) for s in samples)
    out["valid_frac"] = accuracy([bool(s["valid"]) for s in samples])
    out["n_solutions"] = len(solutions)
    out["unique_correct"] = len(distinct)
    out["norm_cov"] = len(distinct) / min(len(samples), len(solutions)) if samples and solutions else None
    first = {e for e, ok in zip([s["generated"] for s in samples[:3200]], correct_flags) if ok}
    out["norm_cov_at_3200"] = len(first) / min(3200, len(solutions)) if len(samples) > 3200 and solutions \
        else out["norm_cov"]
    out["norm_cov_authors"], out["unique_correct_authors"] = blockwise_coverage(samples, correct_flags)
    per_len = Counter(len(s) for s in solutions)
    found = Counter(len(e) for e in distinct)
    out["cov_by_len"] = {n: found[n] / per_len[n] for n in sorted(per_len)}
    out.update(kl_fwd=None, kl_rev=None, js=None, seq_kl=None, seq_js=None)
    if correct and solutions:
        fwd, rev, js = position_divergences(correct, solutions, alpha)
        out.update(pos_kl_fwd=fwd, pos_kl_rev=rev, pos_js=js,
                   kl_fwd=float(np.mean(fwd)), kl_rev=float(np.mean(rev)), js=float(np.mean(js)))
        out["seq_kl"], out["seq_js"] = sequence_divergences(correct, len(solutions))
    return out
