"""Test setup: one thread (2 shared cores), repo-relative paths, offline hub unless a test opts in."""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

TESTS_DIR = Path(__file__).parent
FIXTURES = TESTS_DIR / "fixtures"
sys.path.insert(0, str(TESTS_DIR))  # random_checkpoint, hub_server
pytest_plugins = ["hub_server"]
