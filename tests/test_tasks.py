"""The SMILES task's attachment of a side chain to the scaffold (METHOD.md §6.1) and the task protocol's defaults."""
import os

import pytest
from rdkit import Chem

from rewards import TaskError, load_task
from tasks.smiles.task import PAPER_SCAFFOLD, SmilesTask


def canonical(smiles):
    return Chem.MolToSmiles(Chem.MolFromSmiles(smiles))


@pytest.mark.parametrize("side_chain, intended", [
    ("c1ccccc1", "O=c1[nH]c2ccc(-c3ccccc3)cc2[nH]1"),  # phenyl: ring label 1 is the scaffold's open label too
    ("C1CC1", "O=c1[nH]c2ccc(C3CC3)cc2[nH]1"),  # cyclopropyl
    ("C2CCOCC2", "O=c1[nH]c2ccc(C3CCOCC3)cc2[nH]1"),  # label 2 is open at the '*' as well
])
def test_graph_attachment_is_the_intended_molecule_where_string_substitution_is_not(side_chain, intended):
    graph, string = SmilesTask(attach="graph"), SmilesTask(attach="string")
    assert graph.is_valid(side_chain) and graph.full(side_chain) == canonical(intended)
    pasted = PAPER_SCAFFOLD.replace("*", side_chain)
    if Chem.MolFromSmiles(pasted) is None:  # broken
        assert not string.is_valid(side_chain)
    else:  # rewired: a valid molecule, but not the intended one
        assert string.full(side_chain) == canonical(pasted) != canonical(intended)
    assert graph.score(side_chain) > 0 and graph.canonical(side_chain) == canonical(intended)


@pytest.mark.parametrize("side_chain", ["CC", "C(=O)O", "Cl", "N(C)C", "OC"])
def test_both_attachments_agree_on_acyclic_side_chains(side_chain):
    graph, string = SmilesTask(attach="graph"), SmilesTask(attach="string")
    assert graph.is_valid(side_chain) and string.is_valid(side_chain)
    assert graph.canonical(side_chain) == canonical(string.full(side_chain))
    assert graph.score(side_chain) == pytest.approx(string.score(side_chain))


@pytest.mark.parametrize("side_chain", ["", "(C)C", "=O", ")", "c1ccc", "C(", "[", "1", "CC1", "#N#", "C=1"])
def test_invalid_fragments_score_zero_and_never_raise(side_chain, capfd):
    task = SmilesTask()
    assert not task.is_valid(side_chain) and task.score(side_chain) == 0.0
    assert isinstance(task.full(side_chain), str)
    assert capfd.readouterr().err == ""  # RDKit's own C++ messages are kept quiet too


def test_whole_molecules_and_defaults():
    whole = SmilesTask(scaffold="")
    assert whole.full("c1ccccc1") == "c1ccccc1" and whole.is_valid("CCO") and not whole.is_valid("C(")
    assert whole.defaults["model"] == "prior" and SmilesTask().defaults["model"] == "prior_sidechain"
    assert SmilesTask().defaults["max_len"] == 10 and SmilesTask.defaults["model"] == "prior"  # per instance
    with pytest.raises(TaskError, match="attach"):
        SmilesTask(attach="glue")
    assert load_task("smiles", attach="string").attach == "string"


def test_built_in_tasks_load_by_the_users_path_and_rewards_imports_none():
    """A built-in task is a `module:Class` spec like a user's (rewards.BUILTIN), so rewards.py imports no task."""
    import subprocess
    import sys
    from rewards import BUILTIN
    for name, spec in BUILTIN.items():
        assert type(load_task(name)).__name__ == spec.split(":")[1]
        assert type(load_task(spec)).__name__ == spec.split(":")[1]
    code = "import rewards, sys; print(sorted(m for m in sys.modules if m.split('.')[0] == 'tasks'))"
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True).stdout.strip() == "[]"


@pytest.mark.parametrize("name", ["prior", "prior_sidechain", "prior_game24"])
def test_old_checkpoints_naming_an_embedded_model_still_find_it(name):
    """Checkpoints store --model as given: the names of the embedded models from before they moved into tasks/."""
    from model import resolve
    assert os.path.isfile(os.path.join(resolve(name), "model.safetensors"))
