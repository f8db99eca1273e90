"""
SMILES syntax as a state mask (METHOD.md §6.1): at every state only the tokens that keep the text a possible SMILES
prefix, and the stop only where the text is a complete SMILES string. RDKit stays the judge of validity (valences,
aromaticity, ring sizes); the mask removes what no continuation could repair:

- branches balance: ')' only inside an open branch and after an atom, a ring bond or another ')';
  '(' only after an atom, a ring bond or ')';
- ring bonds pair: a label opens a ring or closes the open one of that label, right after an atom, a ring bond or a
  bond symbol; '%nn' for two-digit labels;
- a bond symbol (- = # / \\) only after an atom, a ring bond, '(' or ')' (and at the start of a side chain, which
  follows the attachment atom); '.' only outside branches, after an atom, a ring bond or ')';
- the stop only with no open branch, ring or bracket atom and not right after a bond symbol, '(' or '.';
- a budget: whatever is left open must still fit in the tokens that remain before L_max (still_needed), so the stop
  forced at L_max always falls on a complete string.

Tokens are read character by character, so multi-character BPE tokens ("C(=O)", "c1ccccc1") work too; the budget then
counts a token per open item, which only errs on the cautious side.
"""
from typing import NamedTuple

import torch

ORGANIC = set("BCNOPSFIbcnops")
BONDS = set("-=#/\\")
ATOMISH = ("atom", "C", "B", "ring", "close")  # after these a branch, a bond, ')' or the stop may follow


class Syntax(NamedTuple):
    depth: int = 0             # open branches
    rings: frozenset = frozenset()  # open ring-bond labels
    last: str = "start"        # start, atom, C / B (an atom that 'l' / 'r' may extend), bond, open, close, ring, dot
    pending: str = ""          # inside a bracket atom ('['), or reading a '%nn' label ('%', '%d': within one token)


def advance(state, text, side_chain=True):
    """The syntax state after appending `text`, or None when no continuation can make it a SMILES string."""
    depth, rings, last, pending = state
    for c in text:
        if pending == "[":
            if c == "]":
                last, pending = "atom", ""
            continue
        if pending:  # '%' or '%d': two digits make one ring-bond label
            if not c.isdigit():
                return None
            if len(pending) == 1:
                pending = pending + c
                continue
            rings, last, pending = rings ^ {pending[1] + c}, "ring", ""
            continue
        if c in ORGANIC or c == "[":
            last, pending = (c if c in "CB" else "atom"), ("[" if c == "[" else "")
        elif (c == "l" and last == "C") or (c == "r" and last == "B"):  # Cl, Br
            last = "atom"
        elif c in BONDS:
            if last not in ATOMISH + ("open",) and not (last == "start" and side_chain):
                return None
            last = "bond"
        elif c == "(":
            if last not in ATOMISH:
                return None
            depth, last = depth + 1, "open"
        elif c == ")":
            if depth == 0 or last not in ATOMISH:
                return None
            depth, last = depth - 1, "close"
        elif c.isdigit() or c == "%":
            if last not in ("atom", "C", "B", "ring", "bond"):
                return None
            if c == "%":
                pending = "%"
            else:
                rings, last = rings ^ {c}, "ring"
        elif c == ".":
            if depth or last not in ATOMISH:
                return None
            last = "dot"
        else:  # H, @, + outside a bracket; anything else
            return None
    if pending.startswith("%"):  # a two-digit label is one token ('%10'); split over tokens it would escape the budget
        return None
    return Syntax(depth, rings, last, pending)


def complete(state):
    """A finished SMILES string: nothing open, not ending on a bond, '(' or '.'."""
    return state.depth == 0 and not state.rings and not state.pending and state.last in ATOMISH


def still_needed(state):
    """The fewest single-lexeme tokens that complete the string: a ')' per branch, a label per ring, an atom after
    '(' or '.' or a bond (a ring label may follow a bond and serves for both), and one more atom when rings are open
    right after ')' (a ring bond cannot follow a branch). From every incomplete state some action lowers it by
    exactly one, so a state within budget can always be completed, and no complete string within budget is cut."""
    return (state.depth + len(state.rings) + bool(state.pending)
            + (state.last in ("start", "open", "dot") or (state.last == "bond" and not state.rings))
            + (bool(state.rings) and state.last == "close"))


class SmilesMask:
    """The task mask of Policy (METHOD.md §1): called with the action columns chosen so far, prev [B, k], and k, it
    returns the allowed actions [B, A] (the last column is the stop). States are cached by prefix, and each state's
    allowed row is computed once, so a batch costs a few dictionary look-ups per row."""

    def __init__(self, action_texts, max_len, side_chain=True):
        self.texts, self.max_len, self.side_chain = list(action_texts), max_len, side_chain
        self._state = {(): Syntax()}  # prefix (tuple of action columns) -> syntax state
        self._rows = {}  # (state, tokens left after this one) -> (allowed row, next states)

    def __call__(self, prev, k):
        everything = torch.ones(len(self.texts), dtype=torch.bool)  # past a row's end (a stop among prev): ignored
        rows = [everything if s is None else self._entry(s, k)[0] for s in map(self._state_of, map(tuple, prev.tolist()))]
        return (torch.stack(rows) if rows else torch.zeros(0, len(self.texts), dtype=torch.bool)).to(prev.device)

    def _state_of(self, prefix):
        """The syntax state after a prefix of action columns; None past a stop (or an action the mask forbids)."""
        if prefix in self._state:
            return self._state[prefix]
        parent = self._state_of(prefix[:-1])
        state = None if parent is None else self._entry(parent, len(prefix) - 1)[1][prefix[-1]]
        if len(self._state) > 1 << 20:  # a long run sees many prefixes: keep the cache bounded
            self._state = {(): Syntax()}
        self._state[prefix] = state
        return state

    def _entry(self, state, k):
        """For a state with k tokens: which actions are allowed, and the state each action leads to (None: stop)."""
        key = (state, self.max_len - k - 1)
        entry = self._rows.get(key)
        if entry is None:
            nxt = [advance(state, t, self.side_chain) for t in self.texts[:-1]] + [None]
            row = torch.tensor([s is not None and still_needed(s) <= key[1] for s in nxt[:-1]] + [complete(state)])
            entry = self._rows[key] = (row, nxt)
        return entry
