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
    rings, last, pending, atom, near, roots = state
    openers = {opener for _, opener in rings}
    near = [a for a in near if a == atom or a in openers]  # the rest: moot
    number = {a: i for i, a in enumerate(sorted({atom, *near, *roots, *openers} - {-1}))}
    number[-1] = -1
    return Syntax(frozenset((label, number[a]) for label, a in rings), last, pending, number[atom],
                  frozenset(number[a] for a in near), tuple(number[a] for a in roots))


def complete(state):
    """A finished SMILES string: nothing open, not ending on a bond, '(' or '.'."""
    return state.depth == 0 and not state.rings and not state.pending and state.last in ATOMISH


def still_needed(state):
    """The fewest single-lexeme tokens that complete the string, by breadth-first search over the only tokens a
    shortest completion uses: an atom, ')', ']' in a bracket atom, and a label that closes an open ring. So from every
    incomplete state some action lowers it by exactly one, a state within budget can always be completed, and no
    complete string within budget is cut."""
    return _fewest_tokens(_completion_class(state))


def _completion_class(state):
    """A state with the same fewest completing tokens, shared by many: the search treats every atom-like `last` alike
    (each allows ')', a label and the stop, and is overwritten by the next token) and ring labels only as names."""
    openers = sorted(opener for _, opener in state.rings)
    return state._replace(last="atom" if state.last in ("C", "B", "ring") else state.last,
                          rings=frozenset((str(i + 1), opener) for i, opener in enumerate(openers)))


@functools.lru_cache(maxsize=1 << 16)
def _fewest_tokens(state):
    """still_needed's search from this very state (the tests' reference calls it on unclassed states)."""
    frontier, seen = [state], {state}
    for tokens in range(1 << 10):
        if any(map(complete, frontier)):
            return tokens
        steps = [advance(s, t) for s in frontier
                 for t in ("C", ")", "]", *(label if len(label) == 1 else "%" + label for label, _ in s.rings))]
        frontier = [s for s in set(steps) - seen - {None}]
        seen.update(frontier)
    return 1 << 10


NEVER, ALWAYS = 2 ** 31 - 1, -2 ** 31  # entries of SmilesMask's table: above / below every budget
# characters that `advance` treats alike in every state: the organic atoms other than C and B (no 'l' / 'r' may
# follow them), the bond symbols, and H @ + (only a bracket atom may hold them); a text read with these merged
# leads where the text itself does
ALIKE = str.maketrans({**dict.fromkeys(ORGANIC - set("CB"), "N"), **dict.fromkeys(BONDS, "-"),
                       **dict.fromkeys("H@+", "H")})


class SmilesMask:
    """The task mask of Policy (METHOD.md §1): called with the action columns chosen so far, prev [B, k], and k, it
    returns the allowed actions [B, A] (the last column is the stop).

    Every syntax state a walk reaches is expanded once into a row of two tables: `_needs` holds, per action, the
    tokens still needed after it (NEVER where it breaks the syntax; for the stop ALWAYS where the state is complete,
    else NEVER), and `_successor` the row of the state it leads to, or -1 - its id while that state is only interned
    (met as a successor, not reached yet). An action is allowed when its need fits the tokens left, so a row serves
    every k, and a step over the batch is one look-up. Row 0 is the dead state (past a stop or a forbidden action):
    everything allowed, and it stays dead. The rows of the last call's prefixes are kept, so the next call, one
    column longer (sampling, or Policy.allowed_actions over k = 0..depth), takes one step."""

    DEAD = 0

    def __init__(self, action_texts, max_len, side_chain=True):
        self.texts, self.max_len, self.side_chain = list(action_texts), max_len, side_chain
        self._states, self._ids, self._row = [None], {}, {0: self.DEAD}  # id -> state -> id; id -> row, once expanded
        self._still_needed = [0]  # id -> still_needed(state)
        alike = [t.translate(ALIKE) for t in self.texts[:-1]]
        self._kinds = list(dict.fromkeys(alike))  # the texts read when expanding: one of each kind
        self._kind_of = [self._kinds.index(t) for t in alike]
        self._needs = torch.full((64, len(self.texts)), ALWAYS, dtype=torch.int32)
        self._successor = torch.zeros(64, len(self.texts), dtype=torch.int32)
        self._filled = 1  # rows in use
        self._start = self._expand(self._intern(Syntax()))
        self._last = (torch.zeros(0, 0, dtype=torch.long), torch.zeros(0, dtype=torch.int32))  # (prev, their rows)

    def __call__(self, prev, k):
        rows = self._walk(prev if prev.device.type == "cpu" else prev.cpu())
        budget = min(max(self.max_len - k - 1, -1), 1 << 30)  # tokens left after the next one
        allowed = self._needs.index_select(0, rows) <= budget
        return allowed if prev.device.type == "cpu" else allowed.to(prev.device)

    def _walk(self, prev):
        """The table row of each row's state after its prefix of action columns, from the last call's rows when that
        call's prefix starts this one."""
        done, rows = self._last
        j = done.shape[1]
        if not (done.shape[0] == len(prev) and j <= prev.shape[1] and torch.equal(prev[:, :j], done)):
            j, rows = 0, torch.full((len(prev),), self._start, dtype=torch.int32)
        for column in range(j, prev.shape[1]):
            entries = prev[:, column].add(rows, alpha=len(self.texts))
            rows = torch.take(self._successor, entries)
            if len(rows) and int(rows.min()) < 0:
                rows = self._reach(rows, entries)
        self._last = (prev.clone(), rows)
        return rows

    def _reach(self, rows, entries):
        """Expand the states first reached (negative entries), and point their table entries at their rows."""
        new = rows < 0
        ids = (-1 - rows[new]).tolist()
        rows[new] = torch.tensor([self._row[i] if i in self._row else self._expand(i) for i in ids], dtype=torch.int32)
        self._successor.view(-1)[entries[new]] = rows[new]
        return rows

    def _expand(self, i):
        """Fill a table row for state i; returns the row."""
        state = self._states[i]
        kinds = [None if s is None else self._intern(s) for s in (advance(state, t, self.side_chain)
                                                                   for t in self._kinds)]
        after = [kinds[j] for j in self._kind_of]
        row = self._filled
        if row == len(self._needs):  # full: double the tables
            self._needs = torch.cat([self._needs, torch.full_like(self._needs, ALWAYS)])
            self._successor = torch.cat([self._successor, torch.zeros_like(self._successor)])
        self._needs[row] = torch.tensor([NEVER if j is None else self._still_needed[j] for j in after]
                                        + [ALWAYS if complete(state) else NEVER], dtype=torch.int32)
        self._successor[row] = torch.tensor([self.DEAD if j is None else self._row.get(j, -1 - j) for j in after]
                                            + [self.DEAD], dtype=torch.int32)
        self._row[i], self._filled = row, row + 1
        return row

    def _intern(self, state):
        """The id of a syntax state, new ones appended with the tokens they still need."""
        i = self._ids.get(state)
        if i is None:
            i = self._ids[state] = len(self._states)
            self._states.append(state)
            self._still_needed.append(still_needed(state))
        return i
