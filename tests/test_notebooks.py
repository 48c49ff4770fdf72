"""The read-along notebooks (notebooks/*.ipynb): each runs from a clean state without error (its closing cells
assert what it claims), is committed with its outputs, stays small, and agrees with its source, the percent-format
script next to it (notebooks/NN_*.py, built with notebooks/build_notebooks.py). Needs the test-only extras
nbformat, nbclient, ipykernel and jupytext (requirements-dev.txt).

All notebooks share one fresh cache folder per test session (the synthetic world, the tiny pre-trained model),
as `python notebooks/build_notebooks.py` does; a notebook run alone makes them itself.
"""

import glob
import os
import sys

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("ipykernel")
jupytext = pytest.importorskip("jupytext")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK_DIR = os.path.join(REPO, "notebooks")
sys.path.insert(0, NOTEBOOK_DIR)
import build_notebooks  # noqa: E402

EXPECTED = [
    "01_eq1_visual_encoder", "02_eq2_vq_lookup", "03_eq3_vd_embed", "04_eq4_ema_update",
    "05_eq5_straight_through", "06_eq6_mlm", "07_eq7_mvm_mask_by_index", "08_eq8_itm",
    "09_eq9_pretraining_objective", "10_downstream_end_to_end", "11_visual_dictionary_pictures",
]
PATHS = [os.path.join(NOTEBOOK_DIR, name + ".ipynb") for name in EXPECTED]
SCRIPTS = [os.path.join(NOTEBOOK_DIR, name + ".py") for name in EXPECTED]
ids = [name[:2] for name in EXPECTED]


@pytest.fixture(scope="module")
def notebook_cache(tmp_path_factory):
    """One clean cache folder for the notebooks of this session (see notebooks/helpers.py)."""
    old = os.environ.get("SOHO_NB_CACHE")
    os.environ["SOHO_NB_CACHE"] = str(tmp_path_factory.mktemp("notebook_cache"))
    yield os.environ["SOHO_NB_CACHE"]
    if old is None:
        os.environ.pop("SOHO_NB_CACHE")
    else:
        os.environ["SOHO_NB_CACHE"] = old


def test_one_notebook_per_equation_and_nothing_else():
    found = sorted(os.path.basename(p)[:-len(".ipynb")] for p in glob.glob(os.path.join(NOTEBOOK_DIR, "*.ipynb")))
    assert found == EXPECTED
    scripts = sorted(os.path.basename(p)[:-len(".py")] for p in glob.glob(os.path.join(NOTEBOOK_DIR, "[0-9]*.py")))
    assert scripts == EXPECTED, "one script per notebook, named like it"
    assert list(build_notebooks.NOTEBOOKS) == EXPECTED


@pytest.mark.parametrize("path", PATHS, ids=ids)
def test_notebook_is_committed_with_outputs_and_small(path):
    assert os.path.getsize(path) < build_notebooks.MAX_BYTES, f"{path}: over 1.5 MB"
    nb = nbformat.read(path, as_version=4)
    code_cells = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.execution_count is not None for c in code_cells), "not executed: run build_notebooks.py"
    outputs = [o for c in code_cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"], "committed with an error"
    assert any("image/png" in o.get("data", {}) for o in outputs), "no picture"
    assert "all claims hold" in "".join(o.get("text", "") for o in code_cells[-1].outputs)
    first = nb.cells[0]
    assert first.cell_type == "markdown" and "> \"" in first.source, "the paper's sentence goes at the top"


@pytest.mark.parametrize("path,script", list(zip(PATHS, SCRIPTS)), ids=ids)
def test_notebook_agrees_with_its_script(path, script):
    """The .ipynb is its script (notebooks/NN_*.py) as build_notebooks.py writes it: edit the script, not the
    notebook. Same cells, of the same types, with the same sources."""
    nb = nbformat.read(path, as_version=4)
    expected = jupytext.read(script, fmt="py:percent")
    name = os.path.basename(path)[:-len(".ipynb")]
    assert [(c.cell_type, c.source) for c in nb.cells] == [(c.cell_type, c.source) for c in expected.cells], \
        f"{name}: out of date, run `python notebooks/build_notebooks.py {name[:2]}`"


@pytest.mark.parametrize("path", PATHS, ids=ids)
def test_notebook_runs_from_a_clean_kernel(path, notebook_cache):
    """Executes every cell in a fresh kernel; a failing claim (assert) or any error fails the test (execute
    raises CellExecutionError), and the closing cell must report that its claims held."""
    nb = build_notebooks.execute(path, timeout=300)
    last = [c for c in nb.cells if c.cell_type == "code"][-1]
    assert "all claims hold" in "".join(o.get("text", "") for o in last.outputs)
