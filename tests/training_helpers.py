"""Shared pieces of the pretraining tests: synthetic-but-real audio files, the CLI as a subprocess,
and a run killed right after its first checkpoint."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def tone(seconds: float, rate: int, seed: int, channels: int = 1) -> np.ndarray:
    """An amplitude-modulated tone with a little noise, [samples] (mono) or [samples, channels]."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * rate)) / rate
    pitch = 110 * 2 ** rng.uniform(0, 4)
    wave = 0.3 * np.sin(2 * np.pi * pitch * t) * (1 + 0.5 * np.sin(2 * np.pi * rng.uniform(1, 4) * t))
    wave = (wave + 0.02 * rng.standard_normal(len(t))).astype(np.float32)
    return wave if channels == 1 else np.repeat(wave[:, None], channels, axis=1)


def pretrain_cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "hear_msm.cli", "pretrain", *args]


def cli_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def kill_after_first_checkpoint(args: list[str], out: Path, timeout: float = 120) -> None:
    """Start `hear-msm pretrain *args --out out` and SIGKILL it once checkpoint.pt exists."""
    process = subprocess.Popen(pretrain_cli(*args, "--out", str(out)), env=cli_env(),
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    while not (out / "checkpoint.pt").exists():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
