"""notebooks/*.ipynb: each is valid nbformat-4 JSON, and its code cells, run in order in a fresh interpreter with
the working directory notebooks/ (where Jupyter starts a kernel), raise nothing. The second test is what keeps the
lecture notebooks in step with the code they import."""
import glob
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))
EXPECTED = ["01_pretraining", "02_sft", "03_reward_model", "04_ppo", "05_dpo"]

# Runs one notebook: every code cell exec'd in order in one namespace, as a kernel would. On an error it names the
# cell and prints its source, so a failure reads like the notebook's own traceback.
RUNNER = r"""
import json, sys, traceback
nb = json.load(open(sys.argv[1]))
namespace = {"__name__": "__main__"}
for i, cell in enumerate(nb["cells"]):
    if cell["cell_type"] != "code":
        continue
    source = "".join(cell["source"])
    try:
        exec(compile(source, f"<cell {i} ({cell['id']})>", "exec"), namespace)
    except Exception:
        traceback.print_exc()
        sys.exit(f"cell {i} ({cell['id']}) raised; its source:\n{source}")
"""


def test_the_five_notebooks_exist():
    assert [os.path.basename(p)[:-6] for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_is_valid_nbformat4(path):
    with open(path, encoding="utf-8") as f:
        nb = json.load(f)
    assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5  # cell ids are required from 4.5 on
    assert isinstance(nb["metadata"], dict) and isinstance(nb["cells"], list) and nb["cells"]
    ids = [c["id"] for c in nb["cells"]]
    assert len(set(ids)) == len(ids), "cell ids must be unique"
    for cell in nb["cells"]:
        assert re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", cell["id"]), cell["id"]
        assert cell["cell_type"] in ("markdown", "code"), cell["cell_type"]
        assert isinstance(cell["metadata"], dict)
        assert isinstance(cell["source"], list) and all(isinstance(s, str) for s in cell["source"])
        if cell["cell_type"] == "code":
            assert set(cell) == {"id", "cell_type", "metadata", "source", "outputs", "execution_count"}
            assert cell["outputs"] == [] and cell["execution_count"] is None  # committed without outputs
            source = "".join(cell["source"])
            assert not re.search(r"^\s*[%!]", source, re.M), "plain Python only: no magics or shell escapes"
        else:
            assert set(cell) <= {"id", "cell_type", "metadata", "source", "attachments"}
    first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
    assert "sys.path.insert" in "".join(first_code["source"])  # the repository root, wherever the kernel starts


@pytest.mark.parametrize("path", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_top_to_bottom(path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", RUNNER, path], cwd=os.path.join(ROOT, "notebooks"), env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{os.path.basename(path)}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
