"""
SMILES syntax as a state mask (METHOD.md §6.1): at every state only the tokens that keep the text a possible SMILES
prefix, and the stop only where the text is a complete SMILES string. RDKit stays the judge of validity (valences,
aromaticity); the mask removes what no continuation could repair:

- branches balance: ')' only inside an open branch and after an atom, a ring bond or another ')';
  '(' only after an atom, a ring bond or ')';
- ring bonds pair: a label opens a ring or closes the open one of that label, right after an atom, a ring bond or a
  bond symbol; '%nn' for two-digit labels;
- a ring bond joins two atoms not yet bonded: it may not close on the atom that opened it (`C11`), on an atom bonded
  to it (`C1C1`, `C1(C1)`) or on one it already closes a ring with (`C12CC12`), so every ring has three atoms or more;
  RDKit cannot even parse these, and they were 10 of the 25 invalid outputs of trained policies before (RESULTS.md);
- a bond symbol (- = # / \\) only after an atom, a ring bond, '(' or ')' (and at the start of a side chain, which
  follows the attachment atom); '.' only outside branches, after an atom, a ring bond or ')';
- the stop only with no open branch, ring or bracket atom and not right after a bond symbol, '(' or '.';
- a budget: whatever is left open must still fit in the tokens that remain before L_max (still_needed), so the stop
  forced at L_max always falls on a complete string.

Tokens are read character by character, so multi-character BPE tokens ("C(=O)", "c1ccccc1") work too; the budget then
counts a token per open item, which only errs on the cautious side.
"""
import functools
from typing import NamedTuple

import torch

ORGANIC = set("BCNOPSFIbcnops")
BONDS = set("-=#/\\")
ATOMISH = ("atom", "C", "B", "ring", "close")  # after these a branch, a bond, ')' or the stop may follow


class Syntax(NamedTuple):
    """Atoms are numbers, renumbered after every token to the few still referred to (so that prefixes alike in what
    can follow share a state, and its cached row)."""
    rings: frozenset = frozenset()  # open ring bonds: (label, the atom that opened it)
    last: str = "start"        # start, atom, C / B (an atom that 'l' / 'r' may extend), bond, open, close, ring, dot
    pending: str = ""          # inside a bracket atom ('['), or reading a '%nn' label ('%', '%d': within one token)
    atom: int = -1             # the atom a new atom bonds to, and a ring bond's end (-1: none yet, or after '.')
    near: frozenset = frozenset()  # the atoms a ring bond at `atom` may not reach: itself and those bonded to it
    roots: tuple = ()          # the atom before each open '(', the attachment point again after its ')'

    @property
    def depth(self):
        """Open branches."""
        return len(self.roots)


def advance(state, text, side_chain=True):
    """The syntax state after appending `text`, or None when no continuation can make it a SMILES string."""
    rings, last, pending, atom, near, roots = state
    new = 1 + max(_atoms(state), default=-1)
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
            rings, near = _ring_bond(rings, near, atom, pending[1] + c)
            if rings is None:
                return None
            last, pending = "ring", ""
            continue
        if c in ORGANIC or c == "[":
            last, pending = (c if c in "CB" else "atom"), ("[" if c == "[" else "")
            atom, near, new = new, frozenset({new, atom} - {-1}), new + 1
        elif (c == "l" and last == "C") or (c == "r" and last == "B"):  # Cl, Br
            last = "atom"
        elif c in BONDS:
            if last not in ATOMISH + ("open",) and not (last == "start" and side_chain):
                return None
            last = "bond"
        elif c == "(":
            if last not in ATOMISH:
                return None
            roots, last = roots + (atom,), "open"
        elif c == ")":
            if not roots or last not in ATOMISH:
                return None
            atom, near, roots, last = roots[-1], frozenset(), roots[:-1], "close"
        elif c.isdigit() or c == "%":
            if last not in ("atom", "C", "B", "ring", "bond") or atom < 0:
                return None
            if c == "%":
                pending = "%"
            else:
                rings, near = _ring_bond(rings, near, atom, c)
                if rings is None:
                    return None
                last = "ring"
        elif c == ".":
            if roots or last not in ATOMISH:
                return None
            atom, near, last = -1, frozenset(), "dot"
        else:  # H, @, + outside a bracket; anything else
            return None
    if pending.startswith("%"):  # a two-digit label is one token ('%10'); split over tokens it would escape the budget
        return None
    return _renumbered(Syntax(rings, last, pending, atom, near, roots))


def _ring_bond(rings, near, atom, label):
    """A ring-bond label at `atom`: it opens a ring there, or closes the open one unless that would bond `atom` to
    itself or to an atom it is bonded to already ((None, None) then)."""
    opener = dict(rings).get(label)
    if opener is None:
        return rings | {(label, atom)}, near
    if opener in near:
        return None, None
    return rings - {(label, opener)}, near | {opener}


def _atoms(state):
    return {state.atom, *state.near, *state.roots, *(opener for _, opener in state.rings)} - {-1}


def _renumbered(state):
    openers = {opener for _, opener in state.rings}
    state = state._replace(near=frozenset(a for a in state.near if a == state.atom or a in openers))  # the rest: moot
    number = {a: i for i, a in enumerate(sorted(_atoms(state)))}
    number[-1] = -1
    return state._replace(rings=frozenset((label, number[a]) for label, a in state.rings), atom=number[state.atom],
                          near=frozenset(number[a] for a in state.near), roots=tuple(number[a] for a in state.roots))


def complete(state):
    """A finished SMILES string: nothing open, not ending on a bond, '(' or '.'."""
    return state.depth == 0 and not state.rings and not state.pending and state.last in ATOMISH


@functools.lru_cache(maxsize=1 << 16)
def still_needed(state):
    """The fewest single-lexeme tokens that complete the string, by breadth-first search over the only tokens a
    shortest completion uses: an atom, ')', ']' in a bracket atom, and a label that closes an open ring. So from every
    incomplete state some action lowers it by exactly one, a state within budget can always be completed, and no
    complete string within budget is cut."""
    frontier, seen = [state], {state}
    for tokens in range(1 << 10):
        if any(map(complete, frontier)):
            return tokens
        steps = [advance(s, t) for s in frontier
                 for t in ("C", ")", "]", *(label if len(label) == 1 else "%" + label for label, _ in s.rings))]
        frontier = [s for s in set(steps) - seen - {None}]
        seen.update(frontier)
    return 1 << 10


class SmilesMask:
    """The task mask of Policy (METHOD.md §1): called with the action columns chosen so far, prev [B, k], and k, it
    returns the allowed actions [B, A] (the last column is the stop). States are cached by prefix, and each state's
    allowed row is computed once, so a batch costs a few dictionary look-ups per row."""

    def __init__(self, action_texts, max_len, side_chain=True):
        self.texts, self.max_len, self.side_chain = list(action_texts), max_len, side_chain
        self._state = {(): Syntax()}  # prefix (tuple of action columns) -> syntax state
        self._rows = {}  # (state, tokens left after this one) -> (allowed row, next states)
        self._next = {}  # state -> the state each action leads to, and the tokens each then still needs

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
            if state not in self._next:
                nxt = [advance(state, t, self.side_chain) for t in self.texts[:-1]]
                self._next[state] = (nxt + [None], torch.tensor([1 << 30 if s is None else still_needed(s) for s in nxt]))
            nxt, needs = self._next[state]
            entry = self._rows[key] = (torch.cat([needs <= key[1], torch.tensor([complete(state)])]), nxt)
        return entry
