"""
The SMILES task (METHOD.md §6.1): complete a scaffold's `*` with a generated side chain (or write a whole molecule)
and score it with QED. Its syntax mask is tasks/smiles/grammar.py, its shipped references prior/ and prior_sidechain/ (recipes:
train_prior.py, sidechains.py), its many-scaffold form tasks/smiles/scaffolds.py, and its data data/.
"""
import functools

from rdkit import Chem, RDLogger, rdBase
from rdkit.Chem import QED

from rewards import Task, TaskError

RDLogger.DisableLog("rdApp.*")  # invalid SMILES are the common case while training: keep stderr readable

PAPER_SCAFFOLD = "O=C1Nc2cc(*)ccc2N1"


class SmilesTask(Task):
    """Complete the `*` of a scaffold with the generated side chain and score the molecule with QED; with
    scaffold '' the text is the whole molecule. attach='graph' (default) joins the fragment '[*:1]' + text to the
    scaffold's '*' on the molecular graph (RDKit molzip), so ring labels inside the side chain stay its own;
    attach='string' pastes the text into the scaffold string as the paper does, where a side chain writing
    ring label 1 or 2 silently rewires this scaffold (METHOD.md §6)."""
    name = "smiles"
    max_token_chars = None  # multi-character tokens are fine ("Cl", "[nH]", "CC(=O)" in a BPE vocabulary)
    defaults = dict(model="prior", min_len=2, max_len=10)  # the paper's L_max = 10 (the authors' runs: L_min = 1)
    chemical, similarity = True, "tanimoto"
    # characters of organic-subset SMILES (Cl and Br need l and r; H and @ for bracket atoms like [C@@H]);
    # a vocabulary token is allowed iff its text uses only these. More letters would admit English BPE tokens.
    charset = frozenset("BCNOPSFIHbcnopslr0123456789[]()=#-+/\\.%@")

    def __init__(self, scaffold=PAPER_SCAFFOLD, attach="graph", smiles_mask=True):
        if attach not in ("graph", "string"):
            raise TaskError(f"--attach must be 'graph' or 'string', not {attach!r}")
        if scaffold:
            if scaffold.count("*") != 1:
                raise TaskError(f"scaffold {scaffold!r} must contain exactly one '*' to fill")
            if _parse(scaffold) is None:
                raise TaskError(f"scaffold {scaffold!r} does not parse as SMILES")
        self.scaffold, self.attach, self.grammar = scaffold, attach, smiles_mask
        # a side chain's reference is the prior fine-tuned on side chains: the whole-molecule prior almost never
        # stops within 10 tokens, which makes the target degenerate (all mass at L_max; METHOD.md §6.1)
        self.defaults = dict(self.defaults, model="prior_sidechain" if scaffold else "prior")
        self._scaffold_mol = _parse(scaffold.replace("*", "[*:1]")) if scaffold and attach == "graph" else None

    def state_mask(self, action_texts, max_len=None):
        """SMILES syntax (tasks/smiles/grammar.py): balanced branches, paired ring bonds, no stop inside either or after a bond,
        and what is open always fits before L_max. None with grammar=False (--no-smiles-mask)."""
        if not self.grammar:
            return None
        from tasks.smiles.grammar import SmilesMask
        return SmilesMask(action_texts, max_len if max_len is not None else 1 << 30, side_chain=bool(self.scaffold))

    def full(self, text):
        """The finished object: canonical SMILES of the molecule, or for an invalid text a readable stand-in."""
        return self._analyse(text)[2] or self._pasted(text)

    def _pasted(self, text):
        return self.scaffold.replace("*", text) if self.scaffold else text

    def _molecule(self, text):
        if not text:
            return None
        if self._scaffold_mol is None:
            return _parse(self._pasted(text))
        fragment = _parse("[*:1]" + text)
        if fragment is None or not _one_bond_to_attach(fragment):
            return None  # e.g. "(C)C": the attachment point would get two bonds
        try:
            with rdBase.BlockLogs():
                mol = Chem.molzip(self._scaffold_mol, fragment)
                Chem.SanitizeMol(mol)
            return mol
        except Exception:  # a valence or kekulisation failure: not a molecule
            return None

    @functools.lru_cache(maxsize=1 << 20)
    def _analyse(self, text):
        """(valid, score, canonical SMILES or None): the molecule is built and parsed once per distinct text."""
        mol = self._molecule(text)
        if mol is None:
            return False, 0.0, None
        return True, self._score(mol), Chem.MolToSmiles(mol)

    def _score(self, mol):
        try:
            return float(QED.qed(mol))
        except Exception:  # RDKit raises on a few exotic valences: an unscorable molecule earns nothing
            return 0.0

    def score(self, text):
        return self._analyse(text)[1]

    def is_valid(self, text):
        return self._analyse(text)[0]

    def canonical(self, text):
        """Dedupe key: canonical SMILES of the full molecule (the pasted string when it is not one)."""
        return self.full(text)


def _one_bond_to_attach(fragment):
    dummies = [a for a in fragment.GetAtoms() if a.GetAtomicNum() == 0]
    return len(dummies) == 1 and dummies[0].GetDegree() == 1


def _parse(smiles):
    try:
        with rdBase.BlockLogs():
            return Chem.MolFromSmiles(smiles)
    except Exception:
        return None
