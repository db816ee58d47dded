"""Puts the repository root on sys.path, so tests import model, data and sft as the scripts do."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# The test models are tiny: one thread is faster than several, and far faster than several on busy cores.
torch.set_num_threads(1)
