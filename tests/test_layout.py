"""The layout a reader relies on: the card's files at the top level and nothing else (two helper modules and
dotfiles aside), the six lectures in notebooks/ beside one helper module, the lab's research in
notebooks/experiments/, each module within its length, and the imports in floors a reader can climb bottom-up
(runs.py; then model.py and data.py; then stages.py; then the stages, each importing only from floors below it)."""
import ast
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CARD = {"README.md", "requirements.txt", "model.py", "data.py", "sft.py", "reward.py", "ppo.py", "dpo.py", "tests",
        "notebooks"}
HELPERS = {"runs.py", "stages.py"}
# the most lines each module may have: the stage modules hold the science, the helpers the rest
LIMITS = {"model.py": 350, "dpo.py": 350, "sft.py": 400, "data.py": 450, "reward.py": 450, "ppo.py": 450,
          "runs.py": 400, "stages.py": 400}
# each module's floor: a module imports only modules of lower floors
FLOORS = {"runs": 0, "model": 1, "data": 1, "stages": 2, "sft": 3, "reward": 4, "ppo": 5, "dpo": 5}


def files_in_checkout():
    """The files git tracks, and the new ones it does not ignore: what a commit of this tree would hold."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip("not a git checkout")
    return [p for p in out.stdout.splitlines() if os.path.exists(os.path.join(ROOT, p))]


def top_level_beyond_the_card(paths):
    top = {p.split("/")[0] for p in paths}
    return sorted(t for t in top if not t.startswith(".") and t not in CARD | HELPERS)


def loose_python_in_notebooks(paths):
    return sorted(p for p in paths if p.startswith("notebooks/") and p.count("/") == 1 and p.endswith(".py"))


def test_the_top_level_holds_the_card_and_two_helpers():
    assert top_level_beyond_the_card(files_in_checkout()) == []


def test_notebooks_hold_the_lectures_and_one_helper_module():
    paths = files_in_checkout()
    assert loose_python_in_notebooks(paths) == ["notebooks/lecture.py"]
    assert sorted(p for p in paths if p.startswith("notebooks/") and p.endswith(".ipynb")) == [
        f"notebooks/{n}.ipynb" for n in ("01_pretraining", "02_sft", "03_reward_model", "04_ppo", "05_dpo",
                                         "06_frontier")]


def test_the_layout_checks_can_fail():
    """The two rules above, on made-up trees that break them."""
    assert top_level_beyond_the_card(["model.py", "ppovar.log", ".ci/run", "out2/x.json"]) == ["out2", "ppovar.log"]
    assert loose_python_in_notebooks(["notebooks/lecture.py", "notebooks/seeds.py",
                                      "notebooks/experiments/seeds.py"]) == ["notebooks/lecture.py",
                                                                             "notebooks/seeds.py"]


@pytest.mark.parametrize("module", sorted(LIMITS))
def test_each_module_within_its_length(module):
    with open(os.path.join(ROOT, module)) as f:
        n = len(f.read().splitlines())
    assert n <= LIMITS[module], f"{module} has {n} lines, more than {LIMITS[module]}: it is doing two jobs"


def imported_modules(module):
    """The project's modules that module imports, at any depth of its code (importlib's names are not imports)."""
    with open(os.path.join(ROOT, f"{module}.py")) as f:
        tree = ast.parse(f.read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names & set(FLOORS)


@pytest.mark.parametrize("module", sorted(FLOORS))
def test_imports_only_from_floors_below(module):
    above = {m for m in imported_modules(module) if FLOORS[m] >= FLOORS[module]}
    assert not above, f"{module}.py imports {sorted(above)}, on its own floor or above it"


def test_every_module_of_the_top_level_has_a_floor():
    modules = {p[:-3] for p in os.listdir(ROOT) if p.endswith(".py")}
    assert modules == set(FLOORS)
