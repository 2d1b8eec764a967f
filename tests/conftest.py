"""Test setup: one thread (2 shared cores), repo-relative paths, and no test reaches the network.

Default weights are now downloaded on first use (Google Drive, the Hub), so a test that loads them by
mistake must fail at once instead of going out: all HTTP(S) traffic except to loopback goes to a
proxy address where nothing listens (tests that serve Drive or the Hub on loopback set their own),
and the Hugging Face cache is a fresh folder of this session (a user's cache changes nothing).
"""
import atexit
import os
import shutil
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
_NOWHERE = "http://127.0.0.1:9"  # the discard port: connections are refused, nothing leaves the machine
for _name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
    os.environ[_name] = _NOWHERE
os.environ["NO_PROXY"] = os.environ["no_proxy"] = "127.0.0.1,localhost"
_HUB_CACHE = tempfile.mkdtemp(prefix="hear_msm-test-hub-cache-")
atexit.register(shutil.rmtree, _HUB_CACHE, ignore_errors=True)
os.environ["HF_HUB_CACHE"] = _HUB_CACHE
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_ENDPOINT"):
    os.environ.pop(_name, None)

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(1)

TESTS_DIR = Path(__file__).parent
FIXTURES = TESTS_DIR / "fixtures"
sys.path.insert(0, str(TESTS_DIR))  # random_checkpoint, hub_server, drive_server
pytest_plugins = ["hub_server", "drive_server"]
