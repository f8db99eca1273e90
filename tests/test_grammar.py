"""The SMILES syntax mask (tasks/smiles/grammar.py, METHOD.md §6.1): it keeps every real side chain, cuts what no continuation can
repair, always leaves an action, and the policy reads it the same way when sampling and when teacher-forcing."""
import gzip
import os

import pytest
import torch
from rdkit import Chem, RDLogger
from transformers import AutoTokenizer

import model as modellib
import rewards
from tasks.smiles.task import SmilesTask
from tasks.smiles.grammar import SmilesMask, Syntax, advance, complete, still_needed

SMILES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tasks", "smiles")


@pytest.fixture(scope="module")
def vocab():
    """The side-chain prior's action texts (allowlist + the stop's ""), and its tokenizer."""
    tok = AutoTokenizer.from_pretrained(os.path.join(SMILES, "prior_sidechain"))
    ids = rewards.allowed_token_ids(tok, SmilesTask.charset)
    texts = tok.batch_decode([[i] for i in ids], clean_up_tokenization_spaces=False)
    return tok, texts + [""]


def walk(mask, columns):
    """Is every action of `columns` allowed in turn, and then the stop?"""
    for k in range(len(columns) + 1):
        want = columns[k] if k < len(columns) else len(mask.texts) - 1
        if not mask(torch.tensor([columns[:k]], dtype=torch.long).reshape(1, k), k)[0, want]:
            return False
    return True


def test_every_held_out_side_chain_is_allowed_even_at_its_exact_length(vocab):
    """Completeness: 1,000+ real side chains (MOSES, never seen by the prior) pass token by token and may stop at their
    end, also with L_max equal to their own length, where the budget is tightest."""
    tok, texts = vocab
    column = {t: i for i, t in enumerate(texts)}
    with gzip.open(os.path.join(SMILES, "data", "sidechains_heldout.tsv.gz"), "rt") as f:
        chains = [line.rstrip("\n").split("\t")[1] for line in f]
    checked, masks = 0, {}  # one mask per length: its rows are cached across chains
    for smiles in chains:
        ids = tok(smiles, add_special_tokens=False).input_ids
        if len(ids) > 10:
            continue
        columns = [column[tok.decode([i])] for i in ids]
        assert walk(masks.setdefault(len(ids), SmilesMask(texts, len(ids))), columns), smiles
        checked += 1
    assert checked > 1000


@pytest.mark.parametrize("text, ok, done", [
    ("CC(=O)N", True, True), ("c1ccccc1", True, True), ("C%10CC%10", True, True), ("C1CC(C1)Cl", True, True),
    ("=O", True, True),  # a side chain may start with a bond: it follows the attachment atom
    ("CC(", True, False), ("C1CC", True, False), ("CC=", True, False), ("C(C)", True, True), ("[nH]", True, True),
    ("C1CC1", True, True), ("C(C1)C1", True, True), ("C1.C1", True, True), ("C=1CC1", True, True),
    ("C11", False, None), ("C1C1", False, None), ("C1(C1)", False, None), ("C12CC12", False, None),  # no 1-2 atom ring
    ("C)", False, None), ("C((C))", False, None), ("(C)C", False, None), ("C(=)C", False, None), ("C==C", False, None),
    ("1CC", False, None), ("C(C)1CC1", False, None), ("CH", False, None), ("C.(C)", False, None), ("C%1C", False, None),
])
def test_syntax_by_hand(text, ok, done):
    state = advance(Syntax(), text)
    assert (state is not None) == ok
    if ok:
        assert complete(state) == done
        assert (still_needed(state) == 0) == done


def test_whole_molecules_may_not_start_with_a_bond():
    assert advance(Syntax(), "=O", side_chain=False) is None and advance(Syntax(), "C=O", side_chain=False)


def test_budget_leaves_an_action_and_a_complete_string_at_every_length(vocab):
    """From every state reached by random walks under the mask some action is allowed, and every walk that runs to
    L_max ends on a complete string (the forced stop never cuts a branch or a ring) that RDKit can parse: what is left
    to it is chemistry (valences, aromaticity), not syntax."""
    RDLogger.DisableLog("rdApp.*")
    _, texts = vocab
    g = torch.Generator().manual_seed(0)
    stop = len(texts) - 1
    for max_len in (2, 3, 6, 10):
        mask = SmilesMask(texts, max_len)
        prev = torch.zeros(64, 0, dtype=torch.long)
        for k in range(max_len):
            allowed = mask(prev, k)
            assert allowed.any(1).all()
            prev = torch.cat([prev, torch.multinomial(allowed.float(), 1, generator=g)], 1)  # uniform over allowed
        for row in prev.tolist():
            text = "".join(texts[c] for c in (row[:row.index(stop)] if stop in row else row))
            state = advance(Syntax(), text)
            assert state is not None and complete(state), text
            assert Chem.MolFromSmiles("C" + text, sanitize=False) is not None, text  # after the attachment atom


def test_the_policy_reads_the_mask_alike_when_sampling_and_teacher_forcing(tiny_gpt2):
    """One-pass masked log-probs equal the sampler's step-by-step ones, and no sample breaks the syntax."""
    torch.manual_seed(0)
    net, tokenizer = modellib.load_model(tiny_gpt2)
    task = SmilesTask()
    allowed = rewards.allowed_token_ids(tokenizer, task.charset)
    policy = modellib.Policy(net, tokenizer, allowed, 1, 6, state_mask=task.state_mask)
    tokens, lengths, log_q = policy.sample(64)
    log_pf, log_pterm = policy.log_probs(tokens, lengths)
    one_pass = log_pf.sum(1) + log_pterm.gather(1, lengths[:, None]).squeeze(1)
    torch.testing.assert_close(one_pass, log_q.sum(1), rtol=1e-5, atol=1e-5)
    for text in policy.texts(tokens, lengths):
        state = advance(Syntax(), text)
        assert state is not None and complete(state), text


def test_the_flag_turns_it_off():
    assert SmilesTask(smiles_mask=False).state_mask(["C", ""]) is None
    assert rewards.load_task("smiles", smiles_mask=False).state_mask(["C", ""]) is None
    assert isinstance(rewards.load_task("smiles").state_mask(["C", ""], 10), SmilesMask)
