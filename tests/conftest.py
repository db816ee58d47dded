"""Puts the repository root, notebooks/ and notebooks/experiments/ on sys.path, so tests import the stage modules
as the scripts do, and the lectures' helper and the experiments by name."""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the stage modules (the root), lecture.py (notebooks/) and the lab's own research (notebooks/experiments/)
sys.path[:0] = [ROOT, os.path.join(ROOT, "notebooks"), os.path.join(ROOT, "notebooks", "experiments")]

# The test models are tiny: one thread is faster than several, and far faster than several on busy cores.
torch.set_num_threads(1)
