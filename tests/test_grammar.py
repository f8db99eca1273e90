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
from tasks.smiles.grammar import SmilesMask, Syntax, _fewest_tokens, advance, complete, still_needed

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


class ReferenceMask:
    """The mask the straightforward way, row by row: fold the texts into a syntax state (none past a stop or a
    forbidden action: everything allowed there), then allow each action whose state exists and whose fewest
    completing tokens (the plain search on that very state) fit the tokens left, and the stop where complete."""

    def __init__(self, texts, max_len, side_chain=True):
        self.texts, self.max_len, self.side_chain = texts, max_len, side_chain
        self._after = {}  # state -> [(state after each token, its fewest completing tokens)]: speed only

    def __call__(self, prev, k):
        return torch.tensor([self._row(row, k) for row in prev.tolist()], dtype=torch.bool).reshape(len(prev), -1)

    def _row(self, columns, k):
        state, stop = Syntax(), len(self.texts) - 1
        for c in columns:
            state = None if state is None or c == stop else advance(state, self.texts[c], self.side_chain)
        if state is None:
            return [True] * len(self.texts)
        if state not in self._after:
            after = [advance(state, t, self.side_chain) for t in self.texts[:-1]]
            self._after[state] = [(s, None if s is None else _fewest_tokens(s)) for s in after]
        left = self.max_len - k - 1
        return [s is not None and need <= left for s, need in self._after[state]] + [complete(state)]


def random_walks(mask, n, max_len, generator):
    """n walks of max_len + 1 steps that mostly take allowed actions (uniformly) and now and then any action (a stop
    or a forbidden one), and the mask's rows at each step."""
    prev, rows = torch.zeros(n, 0, dtype=torch.long), []
    for k in range(max_len + 1):
        rows.append(mask(prev, k))
        prev = torch.cat([prev, torch.multinomial(rows[-1].float() + 0.02, 1, generator=generator)], 1)
    return prev, rows


@pytest.mark.parametrize("max_len, side_chain", [(3, True), (6, False), (8, True)])
def test_the_table_mask_gives_the_reference_rows_on_random_walks(vocab, max_len, side_chain):
    """Bit-identical allowed rows: the same walks through both masks (the table mask then also answers, in a shuffled
    order, prefixes that do not extend its previous call, and a reused mask answers like a fresh one)."""
    _, texts = vocab
    g = torch.Generator().manual_seed(max_len)
    mask, reference = SmilesMask(texts, max_len, side_chain), ReferenceMask(texts, max_len, side_chain)
    for _ in range(2):
        prev, rows = random_walks(mask, 32, max_len, g)
        for k in torch.randperm(max_len + 1, generator=g).tolist() + list(range(max_len + 1)):
            assert torch.equal(mask(prev[:, :k], k), reference(prev[:, :k], k)), k
        for k, row in enumerate(rows):
            assert torch.equal(row, reference(prev[:, :k], k)), k


def test_an_empty_batch_has_no_rows(vocab):
    _, texts = vocab
    assert SmilesMask(texts, 5)(torch.zeros(0, 2, dtype=torch.long), 2).shape == (0, len(texts))


def test_the_table_mask_gives_the_reference_rows_on_real_side_chains(vocab):
    """Held-out side chains, padded with the stop, at every step and with L_max at their length and above."""
    tok, texts = vocab
    column = {t: i for i, t in enumerate(texts)}
    with gzip.open(os.path.join(SMILES, "data", "sidechains_heldout.tsv.gz"), "rt") as f:
        chains = [line.rstrip("\n").split("\t")[1] for line, _ in zip(f, range(300))]
    rows = [[column[tok.decode([i])] for i in tok(s, add_special_tokens=False).input_ids] for s in chains]
    rows = [r for r in rows if len(r) <= 10]
    prev = torch.tensor([r + [len(texts) - 1] * (11 - len(r)) for r in rows])
    for max_len in (6, 10, 14):
        mask, reference = SmilesMask(texts, max_len), ReferenceMask(texts, max_len)
        for k in range(11):
            assert torch.equal(mask(prev[:, :k], k), reference(prev[:, :k], k)), (max_len, k)


def test_the_sampler_draws_the_same_with_the_table_and_the_reference_mask(tiny_gpt2):
    """The same seed, the same samples and log-probs, bit for bit, and the same teacher-forced log-probs."""
    net, tokenizer = modellib.load_model(tiny_gpt2)
    allowed = rewards.allowed_token_ids(tokenizer, SmilesTask.charset)
    runs = []
    for mask in (SmilesMask, ReferenceMask):
        policy = modellib.Policy(net, tokenizer, allowed, 1, 8, state_mask=lambda texts, max_len: mask(texts, max_len))
        torch.manual_seed(1)
        tokens, lengths, log_q = policy.sample(64, temperature=1.5)
        runs.append((tokens, lengths, log_q, *policy.log_probs(tokens, lengths)))
    for new, old in zip(*runs):
        assert torch.equal(new, old)


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
