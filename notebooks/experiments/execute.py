"""
Runs the lecture notebooks in a Jupyter kernel (nbclient starts an ipykernel, as Jupyter does when a student opens
one), top to bottom, and stores each one with its outputs, figures included. A cell that raises stops the run with
the notebook's name and the cell's traceback. tests/test_notebooks.py runs the same `execute` without storing.

The stored outputs are the ones a student sees before running anything, so run the lab first: the last cell of
each notebook reads the real run's out/<stage>/metrics.json (and says which command writes it when it is missing).

Run:  python ppo.py && python dpo.py && python reward.py --stage=rejection    the default chain, out/
      python reward.py --stage=best_of_n                                    best-of-N's curve, out/best_of_n/
      python notebooks/experiments/execute.py                                           every notebook, stored in place
      python notebooks/experiments/execute.py 06_frontier.ipynb                         one of them
"""
import glob
import os
import sys
import time

import nbformat
from nbclient import NotebookClient

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # notebooks/, where the lectures are
NOTEBOOKS = sorted(glob.glob(os.path.join(HERE, "*.ipynb")))


def execute(path, timeout=600):
    """The notebook at path, executed in a fresh python3 kernel started in notebooks/ (as `jupyter notebook` does).
    Raises nbclient's CellExecutionError, with the cell's source and traceback, when a cell raises."""
    nb = nbformat.read(path, as_version=4)
    # no per-cell timestamps, so that a notebook stored twice differs only where its outputs do
    client = NotebookClient(nb, timeout=timeout, kernel_name="python3", record_timing=False,
                            resources={"metadata": {"path": HERE}})
    client.execute(env={**os.environ, "OMP_NUM_THREADS": "1"})
    return nb


def main():
    paths = [os.path.join(HERE, os.path.basename(a)) for a in sys.argv[1:]] or NOTEBOOKS
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        sys.exit(f"error: no notebook {missing[0]} (the notebooks: {', '.join(map(os.path.basename, NOTEBOOKS))})")
    for path in paths:
        t0 = time.time()
        nb = execute(path)
        nbformat.write(nb, path)
        print(f"{os.path.basename(path)}: executed and stored in {time.time() - t0:.0f}s, "
              f"{os.path.getsize(path) / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
