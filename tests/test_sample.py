"""Tests for the evaluation metrics in sample.py. Expected values are derived by hand (see the
comments) or by a separate, straightforward computation (explicit loops, RDKit's pairwise
TanimotoSimilarity, a numpy bit-matrix version of MOSES's formula)."""

import csv
import math

import numpy as np
import pytest
from rdkit import Chem, DataStructs

import metrics
import sample

# any warning (numpy "mean of empty slice", division by zero, ...) fails a test
pytestmark = pytest.mark.filterwarnings("error")

SCAFFOLD = "O=C1Nc2cc(*)ccc2N1"
FRAGMENTS = ["C", "CC", "CCO", "N", "c1ccccc1", "CCCl", "OC", "C(=O)O", "CN(C)C"]


def molecule(fragment):
    return SCAFFOLD.replace("*", fragment)


def mols_of(fragments):
    return [Chem.MolFromSmiles(molecule(f)) for f in fragments]


def make_sample(tokens, valid=True, score=0.5, mol=None):
    generated = "".join(tokens)
    return {"tokens": list(tokens), "length": len(tokens), "generated": generated,
            "molecule": mol if mol is not None else molecule(generated), "valid": valid,
            "score": score if valid else 0.0, "log_prob": -1.5}


def loop_similarity_matrix(fps):
    n = len(fps)
    return np.array([[DataStructs.TanimotoSimilarity(fps[i], fps[j]) for j in range(n)]
                     for i in range(n)])

# -----------------------------------------------------------------------------
# helpers


def test_entropy_nats():
    assert metrics.entropy_nats([5]) == 0.0
    assert metrics.entropy_nats([3, 3]) == pytest.approx(math.log(2))
    assert metrics.entropy_nats({"a": 1, "b": 1, "c": 1, "d": 1}) == pytest.approx(math.log(4))
    # p = (1/4, 3/4)
    assert metrics.entropy_nats([1, 3]) == pytest.approx(-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))
    assert metrics.entropy_nats([]) is None

# -----------------------------------------------------------------------------
# token-level metrics


def test_token_entropy_hand_cases():
    assert metrics.token_entropy([["C"], ["C"]]) == 0.0
    assert metrics.token_entropy([["C"], ["N"]]) == pytest.approx(math.log(2))
    # position 0: {C, N} -> ln 2; position 1: only "C" is alive -> 0; average ln(2) / 2
    assert metrics.token_entropy([["C", "C"], ["N"]]) == pytest.approx(math.log(2) / 2)
    # position 0: {C, C, N, O} -> p = (1/2, 1/4, 1/4); position 1: {O, O} -> 0
    h0 = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))
    assert metrics.token_entropy([["C", "O"], ["C", "O"], ["N"], ["O"]]) == pytest.approx(h0 / 2)
    # token ids work like strings
    assert metrics.token_entropy([[7, 1], [8, 1]]) == pytest.approx(math.log(2) / 2)


def test_token_entropy_edge_cases():
    assert metrics.token_entropy([]) is None
    assert metrics.token_entropy([[], []]) is None  # no position has a live sequence


def test_length_stats():
    stats = metrics.length_stats([1, 2, 3, 4])
    assert stats["mean"] == 2.5 and stats["median"] == 2.5
    # linear interpolation: rank 0.9 * 3 = 2.7 -> 3 + 0.7 * (4 - 3)
    assert stats["p90"] == pytest.approx(3.7)
    assert stats["hist"] == {1: 1, 2: 1, 3: 1, 4: 1}
    same = metrics.length_stats([5, 5, 5])
    assert (same["mean"], same["median"], same["p90"], same["hist"]) == (5.0, 5.0, 5.0, {5: 3})
    assert metrics.length_stats([]) == {"mean": None, "median": None, "p90": None, "hist": {}}


def test_prefix_diagnostics_hand_cases():
    seqs = [["C", "C", "O"], ["C", "C"], ["C", "N"], ["N"]]
    d = metrics.prefix_diagnostics(seqs, max_depth=4)
    # lengths 3, 2, 2, 1
    assert d["surv@1"] == 0.75 and d["surv@2"] == 0.25 and d["surv@3"] == 0.0 and d["surv@4"] == 0.0
    # depth 1: prefixes C, C, C, N -> top1 3/4
    assert d["top1@1"] == 0.75
    assert d["pef_ent@1"] == pytest.approx(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25)))
    # depth 2 (tau >= 2: three sequences): CC, CC, CN -> top1 2/3
    assert d["top1@2"] == pytest.approx(2 / 3)
    assert d["pef_ent@2"] == pytest.approx(-(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3)))
    # depth 3: only CCO -> a point mass
    assert d["top1@3"] == 1.0 and d["pef_ent@3"] == 0.0
    # depth 4: nobody is that long
    assert d["top1@4"] is None and d["pef_ent@4"] is None


def test_prefix_entropy_counts_whole_prefixes_not_last_tokens():
    # last tokens agree (O) but the depth-2 prefixes differ: CO vs NO
    seqs = [["C", "O"], ["N", "O"]]
    assert metrics.prefix_entropy(seqs, 2) == pytest.approx(math.log(2))
    assert metrics.top1_prefix_mass(seqs, 2) == 0.5

# -----------------------------------------------------------------------------
# fingerprints and pairwise Tanimoto


def test_fingerprints_are_morgan_r2():
    fps = metrics.fingerprints(mols_of(["CCO"]))
    assert fps[0].GetNumBits() == 2048
    assert metrics.fingerprints(mols_of(["CCO"]), n_bits=1024)[0].GetNumBits() == 1024
    from rdkit.Chem import rdFingerprintGenerator
    ref = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048).GetFingerprint(mols_of(["CCO"])[0])
    assert fps[0] == ref


def test_tanimoto_row_sums_match_rdkit_pairwise():
    fps = metrics.fingerprints(mols_of(FRAGMENTS))
    sim = loop_similarity_matrix(fps)
    np.fill_diagonal(sim, 0.0)
    np.testing.assert_allclose(metrics.tanimoto_row_sums(fps), sim.sum(1), rtol=1e-12)
    np.testing.assert_allclose(metrics.tanimoto_row_sums(fps, p=2), (sim ** 2).sum(1), rtol=1e-12)

# -----------------------------------------------------------------------------
# chemistry metrics


def test_fp_diversity_identical_molecules_is_zero():
    fps = metrics.fingerprints(mols_of(["CCO"] * 5))
    assert metrics.fp_diversity(fps) == 0.0


def test_fp_diversity_matches_loop_over_pairs():
    fragments = FRAGMENTS + ["CCO", "CCO"]  # duplicates are kept
    fps = metrics.fingerprints(mols_of(fragments))
    n = len(fps)
    pair_sims = [DataStructs.TanimotoSimilarity(fps[i], fps[j]) for i in range(n) for j in range(i + 1, n)]
    assert metrics.fp_diversity(fps) == pytest.approx(1 - np.mean(pair_sims), rel=1e-12)


def test_fp_diversity_edge_cases():
    assert metrics.fp_diversity([]) is None
    assert metrics.fp_diversity(metrics.fingerprints(mols_of(["C"]))) is None


def test_macro_fp_two_bins():
    fps = metrics.fingerprints(mols_of(["CC", "CC", "CCO", "c1ccccc1", "N"]))
    lengths = [2, 2, 3, 3, 1]  # bin 2: identical pair; bin 3: one distinct pair; bin 1: ignored
    t = DataStructs.TanimotoSimilarity(fps[2], fps[3])
    assert 0 < t < 1
    assert metrics.macro_fp_diversity(fps, lengths) == pytest.approx((0.0 + (1 - t)) / 2)
    # and it differs from the pooled FPDiv
    assert metrics.macro_fp_diversity(fps, lengths) != pytest.approx(metrics.fp_diversity(fps))


def test_macro_fp_edge_cases():
    fps = metrics.fingerprints(mols_of(["CC", "CCO"]))
    assert metrics.macro_fp_diversity(fps, [1, 2]) is None  # every bin has one sample
    assert metrics.macro_fp_diversity([], []) is None
    # all samples in one bin: MacroFP == FPDiv
    assert metrics.macro_fp_diversity(fps, [4, 4]) == pytest.approx(metrics.fp_diversity(fps))


def moses_int_div_numpy(fps, p):
    """MOSES's formula written independently on a dense 0/1 matrix: Tanimoto of every ordered pair
    (diagonal included) from bit counts, then 1 - mean_i (mean_j T^p)^(1/p)."""
    bits = np.array([list(fp) for fp in fps], dtype=float)
    inter = bits @ bits.T
    union = bits.sum(1)[:, None] + bits.sum(1)[None, :] - inter
    sim = inter / union
    return 1 - np.mean(np.mean(sim ** p, axis=1) ** (1 / p))


def test_internal_diversity_matches_moses_formula():
    fps = metrics.fingerprints(mols_of(FRAGMENTS + ["CC"]), n_bits=1024)
    for p in (1, 2):
        assert metrics.internal_diversity(fps, p) == pytest.approx(moses_int_div_numpy(fps, p), rel=1e-12)


def test_internal_diversity_hand_cases():
    fps = metrics.fingerprints(mols_of(["CCO"] * 3), n_bits=1024)
    assert metrics.internal_diversity(fps) == pytest.approx(0.0)
    # two molecules: matrix [[1, t], [t, 1]] -> 1 - (2 + 2t) / 4 = (1 - t) / 2
    fps = metrics.fingerprints(mols_of(["CCO", "c1ccccc1"]), n_bits=1024)
    t = DataStructs.TanimotoSimilarity(fps[0], fps[1])
    assert metrics.internal_diversity(fps) == pytest.approx((1 - t) / 2)
    assert metrics.internal_diversity(fps[:1]) == 0.0
    assert metrics.internal_diversity([]) is None


def test_uniqueness_and_novelty():
    # "OCC" and "CCO" are the same molecule once canonicalised
    canonical = [metrics.canonical_smiles(s) for s in ["CCO", "OCC", "CCN", "c1ccccc1"]]
    assert metrics.uniqueness(canonical) == 0.75
    train = {metrics.canonical_smiles("CCO")}
    # distinct: ethanol, ethylamine, benzene; ethanol is in the training set
    assert metrics.novelty(canonical, train) == pytest.approx(2 / 3)
    assert metrics.novelty(canonical, None) is None
    assert metrics.novelty(canonical, set()) == 1.0
    assert metrics.uniqueness([]) is None and metrics.novelty([], train) is None


def test_murcko_scaffold_count():
    mols = [Chem.MolFromSmiles(s) for s in ["c1ccccc1CC", "c1ccccc1O", "C1CCCCC1", "CCO"]]
    # benzene (twice), cyclohexane; ethanol is acyclic and has no scaffold
    assert metrics.murcko_scaffold_count(mols) == 2
    # every substituted-scaffold molecule keeps the bicyclic core; a phenyl adds a new scaffold
    assert metrics.murcko_scaffold_count(mols_of(["C", "CC", "CCO"])) == 1
    assert metrics.murcko_scaffold_count(mols_of(["C", "c1ccccc1"])) == 2
    assert metrics.murcko_scaffold_count([]) == 0


def test_canonical_smiles_invalid_is_none():
    assert metrics.canonical_smiles("C1CC") is None

# -----------------------------------------------------------------------------
# entry point


def test_smiles_metrics_small_set():
    samples = [make_sample(["C", "C"], score=0.6), make_sample(["C", "C"], score=0.6),
               make_sample(["C", "O"], score=0.8), make_sample(["N"], score=0.4),
               make_sample(["C", "("], valid=False)]
    m = metrics.smiles_metrics(samples, train_smiles={metrics.canonical_smiles(molecule("N"))})
    assert m["n"] == 5 and m["n_valid"] == 4
    assert m["acc"] == 0.8
    assert m["score"] == pytest.approx((0.6 + 0.6 + 0.8 + 0.4) / 4)
    assert m["score_all"] == pytest.approx((0.6 + 0.6 + 0.8 + 0.4) / 5)
    # valid tokens: CC, CC, CO, N -> position 0: C,C,C,N; position 1: C,C,O
    h0 = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    h1 = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert m["tok_ent"] == pytest.approx((h0 + h1) / 2)
    assert m["len_mean"] == 1.75 and m["len_median"] == 2.0 and m["len_hist"] == {1: 1, 2: 3}
    assert m["len_all_mean"] == pytest.approx(9 / 5) and m["len_all_hist"] == {1: 1, 2: 4}
    assert m["surv@1"] == 0.75 and m["surv@2"] == 0.0 and "surv@3" not in m
    assert m["top1@2"] == pytest.approx(2 / 3)
    assert m["n_unique"] == 3 and m["uniqueness"] == 0.75
    assert m["novelty"] == pytest.approx(2 / 3)
    assert m["scaffolds"] == 1
    fps = metrics.fingerprints(mols_of(["CC", "CC", "CO", "N"]))
    assert m["fp_div"] == pytest.approx(metrics.fp_diversity(fps))
    # length bins: {2: CC, CC, CO}, {1: N} -> MacroFP is the FPDiv of the length-2 bin
    assert m["macro_fp"] == pytest.approx(metrics.fp_diversity(fps[:3]))
    fps1024 = metrics.fingerprints(mols_of(["CC", "CC", "CO", "N"]), n_bits=1024)
    assert m["int_div"] == pytest.approx(moses_int_div_numpy(fps1024, 1))
    assert "int_div" in m and all(not isinstance(v, float) or math.isfinite(v) for v in m.values())


def test_smiles_metrics_max_depth_fixes_the_table_size():
    m = metrics.smiles_metrics([make_sample(["C"])], max_depth=10)
    assert m["surv@10"] == 0.0 and m["top1@10"] is None


def test_smiles_metrics_no_valid_samples():
    samples = [make_sample(["C", "("], valid=False), make_sample(["("], valid=False)]
    m = metrics.smiles_metrics(samples, train_smiles={"CCO"})
    assert m["acc"] == 0.0 and m["score_all"] == 0.0 and m["n_valid"] == 0
    for key in ["score", "tok_ent", "fp_div", "macro_fp", "len_mean", "len_median", "len_p90",
                "uniqueness", "novelty", "int_div", "surv@1", "pef_ent@1", "top1@1"]:
        assert m[key] is None, key
    assert m["scaffolds"] == 0 and m["n_unique"] == 0 and m["len_hist"] == {}
    assert m["len_all_mean"] == 1.5
    sample.format_report(m)


def test_smiles_metrics_empty_input():
    m = metrics.smiles_metrics([])
    assert m["n"] == 0 and m["acc"] is None and m["fp_div"] is None
    sample.format_report(m)


def test_smiles_metrics_one_sample_and_equal_lengths():
    m = metrics.smiles_metrics([make_sample(["C", "C"])])
    assert m["acc"] == 1.0 and m["tok_ent"] == 0.0 and m["fp_div"] is None and m["macro_fp"] is None
    assert m["uniqueness"] == 1.0 and m["int_div"] == 0.0 and m["len_p90"] == 2.0
    m = metrics.smiles_metrics([make_sample(["C", "C"]), make_sample(["C", "O"]), make_sample(["C", "N"])])
    assert m["macro_fp"] == pytest.approx(m["fp_div"])  # a single length bin
    assert m["len_mean"] == m["len_median"] == m["len_p90"] == 2.0


def test_valid_flag_that_rdkit_rejects_is_skipped_by_chemistry_metrics():
    samples = [make_sample(["C"]), make_sample(["C"], mol="C1CC")]  # wrongly marked valid
    m = metrics.smiles_metrics(samples)
    assert m["acc"] == 1.0 and m["n_unique"] == 1 and m["fp_div"] is None


def test_inconsistent_length_raises():
    bad = make_sample(["C", "C"])
    bad["length"] = 3
    with pytest.raises(ValueError):
        metrics.smiles_metrics([bad])

# -----------------------------------------------------------------------------
# output


def test_write_csv_round_trip(tmp_path):
    rows = [make_sample(["C", "C"], score=0.25), make_sample(["("], valid=False)]
    del rows[1]["log_prob"]  # missing columns are written empty; extra keys (tokens) are dropped
    path = tmp_path / "samples.csv"
    sample.write_csv(path, rows)
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert list(read[0].keys()) == sample.CSV_COLUMNS
    assert read[0] == {"generated": "CC", "molecule": molecule("CC"), "valid": "True",
                       "score": "0.25", "length": "2", "log_prob": "-1.5"}
    assert read[1]["valid"] == "False" and read[1]["log_prob"] == ""


def test_format_report_lists_headline_metrics_and_depth_table():
    samples = [make_sample(["C", "C"]), make_sample(["C", "O"]), make_sample(["N"])]
    report = sample.format_report(metrics.smiles_metrics(samples, max_depth=3))
    order = ["Acc", "Score", "TokEnt", "FPDiv", "MacroFP", "Len mean", "median", "p90",
             "uniqueness", "novelty", "scaffolds", "IntDiv", "Surv", "PefEnt", "Top1"]
    positions = [report.index(word) for word in order]
    assert positions == sorted(positions)
    table = report.splitlines()[-3:]
    assert [line.split()[0] for line in table] == ["1", "2", "3"]
    assert table[2].split()[1:] == ["0.000", "-", "-"]  # nobody is longer than 2 tokens
