"""notebooks/*.ipynb: each is valid nbformat-4, stored executed (with its figures, under 1 MB, after the real lab
ran), and runs top to bottom in a real Jupyter kernel (nbclient + ipykernel) without raising. The last test is
what keeps the lecture notebooks in step with the code they import."""
import glob
import os
import re
import sys

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "notebooks"))
import execute  # noqa: E402

NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
EXPECTED = ["01_pretraining", "02_sft", "03_reward_model", "04_ppo", "05_dpo", "06_frontier"]


def code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def test_the_six_notebooks_exist():
    assert [os.path.basename(p)[:-6] for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_stored_executed(path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)  # nbformat's own schema: cell ids, output types, ...
    assert nb.nbformat == 4 and nb.nbformat_minor >= 5
    assert os.path.getsize(path) < 1_000_000, "store figures small enough to keep the file under 1 MB"
    cells = code_cells(nb)
    # executed once, top to bottom, by notebooks/execute.py: counts 1, 2, 3, ... and no error outputs
    assert [c.execution_count for c in cells] == list(range(1, len(cells) + 1))
    outputs = [o for c in cells for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any("image/png" in o.get("data", {}) for o in outputs), "a lecture shows at least one figure"
    # stored after the real run: no cell says that a run's metrics.json is missing
    text = "".join(o.get("text", "") for o in outputs)
    assert "not found: run" not in text, "run the default chain before `python notebooks/execute.py`"
    for cell in cells:
        assert not re.search(r"^\s*[%!]", cell.source, re.M), "plain Python only: no magics or shell escapes"
    assert "sys.path.insert" in cells[0].source  # the repository root, wherever the kernel starts


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_ends_with_exercises(path):
    nb = nbformat.read(path, as_version=4)
    headings = [i for i, c in enumerate(nb.cells) if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    assert len(headings) == 1
    exercises = nb.cells[headings[0]].source
    n = len(re.findall(r"^\d+\. ", exercises, re.M))
    assert 2 <= n <= 4, f"two to four numbered exercises, found {n}"
    assert exercises.count("Hint") >= n, "each exercise has a hint"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_in_a_jupyter_kernel(path):
    nb = execute.execute(path, timeout=300)  # raises CellExecutionError, with the cell and its traceback
    assert all(c.execution_count for c in code_cells(nb))
