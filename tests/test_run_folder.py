"""Run folders of `hear-msm pretrain`: marked, never mixed with unrelated files, locked against a
second run (tested with a real second process), stale temporaries of killed runs cleared.

Each training run is 2 steps of a depth-1 ssast_tiny on four short tones: a few seconds in all.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from hear_msm import training
from hear_msm.training import config as run_config
from hear_msm.training import run_folder
from hear_msm.training import TrainConfig

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def audio_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("audio")
    rng = np.random.default_rng(0)
    for i in range(4):
        sf.write(root / f"tone{i}.wav", (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
    return root


def _config(data) -> TrainConfig:
    return TrainConfig(model="ssast_tiny", model_overrides={"depth": 1}, data=str(data), batch_size=2, steps=2,
                       warmup_steps=0, base_lr=0.01, checkpoint_every=1, log_every=1, progress=False)


def _contents(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_folder_with_unrelated_files_is_refused_untouched(audio_dir, tmp_path):
    folder = tmp_path / "my_project"
    (folder / "final").mkdir(parents=True)
    (folder / "log.csv").write_text("date,amount\n2024-01-01,3\n")
    (folder / "final" / "README.md").write_text("my notes\n")
    (folder / "train_config.json").write_text("{}")
    before = _contents(folder)
    with pytest.raises(FileExistsError, match=rf"--out {folder} is not empty and not a run of hear-msm pretrain "
                                              r"\(no \.hear_msm_run\.json\): it holds 3 entries \(final/, log.csv, "
                                              r"train_config.json\)"):
        training.train(_config(audio_dir), folder)
    with pytest.raises(ValueError, match=rf"refusing to resume {folder}: it is not a run of hear-msm pretrain"):
        training.train(_config(audio_dir), folder, resume=True)
    assert _contents(folder) == before and not (folder / run_folder.LOCK).exists()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(FileExistsError, match="is a file, not a run folder"):
        training.train(_config(audio_dir), tmp_path / "a_file")
    with pytest.raises(FileNotFoundError, match="no run to resume"):
        training.train(_config(audio_dir), tmp_path / "missing", resume=True)


def test_empty_folder_becomes_a_marked_run_that_can_be_resumed(audio_dir, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    training.train(_config(audio_dir), folder)
    marker = json.loads((folder / run_folder.MARKER).read_text())
    assert marker["format"] == run_folder.FORMAT and marker["version"] == run_folder.VERSION
    (folder / "notes.txt").write_text("a user's note in a marked run is left alone")
    training.train(_config(audio_dir), folder, resume=True)
    assert (folder / "notes.txt").read_text().startswith("a user's note")
    marker = json.loads((folder / run_folder.MARKER).read_text())
    assert marker["resumes"] == [{"step": 2, "time": marker["resumes"][0]["time"], "changed": {}}]
    (folder / run_folder.MARKER).write_text('{"format": "something else", "version": 1}')
    with pytest.raises(ValueError, match="is not a hear_msm run marker"):
        training.train(_config(audio_dir), folder, resume=True)


def _hold_lock(folder: Path) -> subprocess.Popen:
    """A second process that claims `folder` and waits; returns once it holds the lock."""
    code = ("import sys; from hear_msm.training import run_folder\n"
            f"with run_folder.claim({str(folder)!r}, resume=False):\n"
            "    print('locked', flush=True); sys.stdin.read()\n")
    process = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               env={**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}, text=True)
    assert process.stdout.readline().strip() == "locked"
    return process


def test_second_run_on_a_locked_folder_is_refused_and_a_dead_holder_is_taken_over(audio_dir, tmp_path, capsys):
    from hear_msm.cli import main

    folder = tmp_path / "run"
    holder = _hold_lock(folder)
    try:
        with pytest.raises(run_folder.RunFolderInUse, match=rf"{folder} is in use by another run "
                                                             rf"\(process {holder.pid}\)"):
            training.train(_config(audio_dir), folder)
        assert main(["pretrain", "--out", str(folder), "--resume"]) == 2  # before it reads any checkpoint
        assert f"is in use by another run (process {holder.pid})" in capsys.readouterr().err
        assert not (folder / run_config.LOG_NAME).exists()
    finally:
        holder.kill()  # SIGKILL: the process cannot clean up; the OS drops its lock
        holder.wait()
    assert (folder / run_folder.LOCK).read_text().strip() == str(holder.pid)  # the stale lock file stays
    result = training.train(_config(audio_dir), folder)
    assert result.step == 2 and (folder / "final" / "model.safetensors").is_file()
    assert (folder / run_folder.LOCK).read_text().strip() == str(os.getpid())


def test_two_claims_in_one_process_exclude_each_other(tmp_path):
    with run_folder.claim(tmp_path / "run", resume=False):
        with pytest.raises(run_folder.RunFolderInUse, match=rf"process {os.getpid()}"):
            with run_folder.claim(tmp_path / "run", resume=False):
                pass
    with run_folder.claim(tmp_path / "run", resume=False):  # released on exit
        pass


def test_stale_temporaries_of_killed_runs_are_removed_on_start(audio_dir, tmp_path):
    folder = tmp_path / "run"
    training.train(_config(audio_dir), folder)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    stale = [folder / f".checkpoint.pt.tmp-{dead_pid}", folder / "final" / f".model.safetensors.tmp-{dead_pid}"]
    live = folder / f".notes.txt.tmp-{os.getpid()}"  # a live writer's temporary is not touched
    for path in stale + [live]:
        path.write_bytes(b"partial")
    training.train(_config(audio_dir), folder, resume=True)
    assert not any(path.exists() for path in stale) and live.exists()
