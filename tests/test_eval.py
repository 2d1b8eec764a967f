"""eval/: the whole driver on a real-audio dev task (GM notes rendered by fluidsynth), its resume
logic, the report, and the errors for folders that are not HEAR tasks.

The end-to-end test builds gm_pitch-v1-dev with scripts/build_dev_tasks.py (4 programs: 100 clips
per split; downloads ~90 MB of Debian packages once into the cache), then runs
`python -m eval.run` for ssast_tiny and axlstm_tiny (random-init weights) with
`--grid faster --grid-points 1` and 2 seeds, reruns it (nothing may be recomputed), and runs a
12-clip event task (gm_onsets) for one model and the peer row hearbaseline.torchcrepe on 75
clips: about 3 min on one thread.
"""
import csv
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from eval import report  # noqa: E402
from eval.tasks import PAPER_TASKS, TaskError, resolve_tasks, validate_task  # noqa: E402

HAVE_HEAREVAL = all(importlib.util.find_spec(m) is not None for m in ("heareval", "tensorflow", "pytorch_lightning"))
needs_heareval = pytest.mark.skipif(
    not HAVE_HEAREVAL, reason="heareval stack not installed (scripts/install.sh installs it; HEAR_TOOLS=0 skips it)")
MODELS = ("ssast_tiny", "axlstm_tiny")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TF_CPP_MIN_LOG_LEVEL="2")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def _run_eval(tasks_dir, out, weights, *extra):
    cmd = [sys.executable, "-m", "eval.run", "--models", ",".join(MODELS), "--tasks-dir", str(tasks_dir),
           "--out", str(out), "--seeds", "2", "--grid", "faster", "--grid-points", "1", *extra]
    for arch, path in weights.items():
        cmd += ["--weights", f"{arch}={path}"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def _snapshot(folder):
    """{relative path: mtime_ns} of every file and symlink under folder."""
    return {str(p.relative_to(folder)): p.lstat().st_mtime_ns for p in Path(folder).rglob("*")
            if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def dev_tasks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dev_tasks")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_dev_tasks.py"), "--out", str(out),
                           "--tasks", "gm_pitch", "--max-programs", "4"],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import hear_msm
    from hear_msm._weights import save_pretrained

    root = tmp_path_factory.mktemp("weights")
    for arch in MODELS:
        save_pretrained(hear_msm.create_model(arch), root / arch)
    return {arch: root / arch for arch in MODELS}


def test_dev_task_is_a_valid_hear_task(dev_tasks):
    task = dev_tasks / "gm_pitch-v1-dev"
    metadata = validate_task(task)
    assert metadata["splits"] == ["train", "valid", "test"]
    assert metadata["evaluation"][0] == "pitch_acc"
    for split in metadata["splits"]:
        labels = json.loads((task / f"{split}.json").read_text())
        assert len(labels) >= 80, (split, len(labels))
        audio, rate = sf.read(str(task / "16000" / split / next(iter(labels))))
        assert rate == 16000 and audio.shape == (16000,) and 0.1 < np.abs(audio).max() <= 0.51
    # soundfont-disjoint splits
    sources = {split: {name.split("-p")[0] for name in json.loads((task / f"{split}.json").read_text())}
               for split in metadata["splits"]}
    assert all(len(s) == 1 for s in sources.values()) and len(set.union(*sources.values())) == 3


@needs_heareval
def test_driver_end_to_end_and_rerun_is_noop(dev_tasks, weights, tmp_path):
    out = tmp_path / "out"
    _run_eval(dev_tasks, out, weights, "--tasks", "gm_pitch-v1-dev")

    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["model"], r["task"], int(r["seed"])) for r in rows} == {
        (m, "gm_pitch-v1-dev", s) for m in MODELS for s in (42, 43)}
    assert all(r["metric"] == "pitch_acc" and math.isfinite(float(r["score"])) and 0 <= float(r["score"]) <= 1
               for r in rows)
    table = (out / "results.md").read_text()
    for model in MODELS:
        line = next(line for line in table.splitlines() if line.startswith(f"| {model} |"))
        cells = [c.strip() for c in line.strip("|").split("|")][1:]
        mean, half = cells[0].split(" ± ")
        assert math.isfinite(float(mean)) and math.isfinite(float(half)), line
    assert (out / "results.png").stat().st_size > 1000

    before = _snapshot(out)
    proc = _run_eval(dev_tasks, out, weights, "--tasks", "gm_pitch-v1-dev")
    assert "0 step(s) computed, 6 already done" in proc.stdout
    after = _snapshot(out)
    changed = {p for p in before if after.get(p) != before[p]} | (set(after) - set(before))
    assert changed <= {"results.csv", "results.md", "results.png"}, sorted(changed)


@needs_heareval
def test_driver_skips_missing_and_bad_tasks(dev_tasks, weights, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "not_a_task").mkdir()
    proc = subprocess.run([sys.executable, "-m", "eval.run", "--models", "ssast_tiny", "--tasks-dir", str(tasks),
                           "--out", str(tmp_path / "out"), "--weights", f"ssast_tiny={weights['ssast_tiny']}"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "skipping 10 task(s) with no folder" in proc.stderr and "esc50-v2.0.0-full" in proc.stderr
    assert "task not_a_task: no task_metadata.json" in proc.stderr
    assert "no runnable HEAR task" in proc.stderr


def _copy_task(dev_tasks, tmp_path):
    task = tmp_path / "gm_pitch-v1-dev"
    shutil.copytree(dev_tasks / "gm_pitch-v1-dev", task)
    return task


def test_missing_metadata_is_named(dev_tasks, tmp_path):
    task = _copy_task(dev_tasks, tmp_path)
    (task / "task_metadata.json").unlink()
    with pytest.raises(TaskError, match=r"task gm_pitch-v1-dev: no task_metadata.json"):
        validate_task(task)


def test_wrong_sample_rate_folder_is_named(dev_tasks, tmp_path):
    task = _copy_task(dev_tasks, tmp_path)
    (task / "16000").rename(task / "48000")
    with pytest.raises(TaskError, match=r"task gm_pitch-v1-dev: needs audio at 16000 Hz .*\['48000'\]"):
        validate_task(task)


def test_unequal_clip_lengths_are_named(dev_tasks, tmp_path):
    task = _copy_task(dev_tasks, tmp_path)
    clip = next((task / "16000" / "valid").iterdir())
    sf.write(str(clip), np.zeros(12000, dtype=np.float32), 16000)
    with pytest.raises(TaskError, match=rf"task gm_pitch-v1-dev: clips of unequal length: valid/{clip.name} "
                                        r"has 12000 samples"):
        validate_task(task)


def test_resolve_tasks_accepts_abbreviations_and_reports_missing(tmp_path):
    (tmp_path / "esc50-v2.0.0-full").mkdir()
    found, missing = resolve_tasks(tmp_path, ["E50", "NS-5h"])
    assert [p.name for p in found] == ["esc50-v2.0.0-full"] and missing == ["nsynth_pitch-v2.2.3-5h"]
    assert [t.abbr for t in PAPER_TASKS] == ["BO", "CD", "E50", "LC", "Mri-S", "Mri-T", "NS-5h", "SC-5h",
                                             "F50K", "VL"]


def test_report_interval_and_order(tmp_path):
    rows = [{"model": m, "task": t, "seed": s, "metric": "top1_acc", "score": v}
            for m, base in (("a", 0.5), ("b", 0.7))
            for t in ("esc50-v2.0.0-full", "beijing_opera-v1.0-hear2021-full")
            for s, v in zip((42, 43, 44), (base - 0.01, base, base + 0.01))]
    summary = report.write(tmp_path, rows, ["a", "b"])
    mean, half = summary["cells"][("a", "esc50-v2.0.0-full")]
    assert mean == pytest.approx(0.5) and half == pytest.approx(4.302653 * 0.01 / math.sqrt(3), rel=1e-5)
    header = (tmp_path / "results.md").read_text().splitlines()[0]
    assert header == "| Model | BO | E50 | Overall | s(m) |"
    assert summary["normalised"] == {"a": 0.0, "b": 100.0}


@needs_heareval
def test_event_task_runs_through_the_driver(weights, tmp_path):
    """heareval's event path (timestamp embeddings, sed_eval, the FitLoop.current_epoch fix)."""
    tasks = tmp_path / "tasks"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_dev_tasks.py"), "--out", str(tasks),
                           "--tasks", "gm_onsets", "--event-clips", "12"],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "eval.run", "--models", "ssast_tiny", "--tasks-dir", str(tasks),
                           "--out", str(out), "--seeds", "1", "--grid", "faster", "--grid-points", "1",
                           "--weights", f"ssast_tiny={weights['ssast_tiny']}", "--tasks", "gm_onsets-v1-dev"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["metric"] == "event_onset_200ms_fms" and math.isfinite(float(row["score"]))


def test_model_names_weights_and_layout():
    from eval.run import parse_models

    (spec,) = parse_models("ssam_tiny", ["ssam_tiny=hf://org/repo@v1"], "official")
    assert spec.label == "ssam_tiny+official" and spec.module == "hear_msm.ssam_tiny" and spec.weights == ""
    assert spec.options == {"model_file_path": "hf://org/repo@v1", "layout": "official"}
    (spec,) = parse_models("axlstm_tiny", [f"axlstm_tiny={REPO}"], "time")
    assert spec.weights == str(REPO) and spec.options == {}
    (spec,) = parse_models("json", [], "official")  # any importable module; layout is hear_msm's only
    assert spec.module == "json" and spec.options == {}
    with pytest.raises(ValueError, match="neither a hear_msm architecture"):
        parse_models("no_such_module.x", [], "time")
    with pytest.raises(ValueError, match="not in --models"):
        parse_models("ssam_tiny", ["axlstm_tiny=x"], "time")


@needs_heareval
@pytest.mark.skipif(importlib.util.find_spec("hearbaseline") is None or importlib.util.find_spec("torchcrepe") is None,
                    reason="peer row not installed (pip install --no-deps torchcrepe==0.0.24 hearbaseline==2021.1.1)")
def test_peer_row_torchcrepe_runs_through_the_driver(tmp_path):
    tasks = tmp_path / "tasks"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "build_dev_tasks.py"), "--out", str(tasks),
                           "--tasks", "gm_pitch", "--max-programs", "1"],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "eval.run", "--models", "hearbaseline.torchcrepe", "--tasks-dir",
                           str(tasks), "--out", str(out), "--seeds", "1", "--grid", "faster", "--grid-points", "1"],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.csv") as f:
        (row,) = list(csv.DictReader(f))
    assert row["model"] == "hearbaseline.torchcrepe" and math.isfinite(float(row["score"]))
    assert "| hearbaseline.torchcrepe |" in (out / "results.md").read_text()


def _tiny_task(root: Path) -> Path:
    """A valid two-clip-per-split HEAR scene task of 1 s noise clips (no heareval needed to build it)."""
    task = root / "tiny_scene-v1-dev"
    rng = np.random.default_rng(0)
    splits = ["train", "valid", "test"]
    (task / "16000").mkdir(parents=True)
    metadata = {"task_name": "tiny_scene", "embedding_type": "scene", "prediction_type": "multiclass",
                "split_mode": "trainvaltest", "splits": splits, "evaluation": ["top1_acc"], "sample_duration": 1.0}
    (task / "task_metadata.json").write_text(json.dumps(metadata))
    (task / "labelvocabulary.csv").write_text("idx,label\n0,a\n1,b\n")
    for split in splits:
        (task / "16000" / split).mkdir()
        labels = {f"{split}{i}.wav": ["a" if i else "b"] for i in range(2)}
        for name in labels:
            sf.write(str(task / "16000" / split / name), (0.1 * rng.standard_normal(16000)).astype(np.float32), 16000)
        (task / f"{split}.json").write_text(json.dumps(labels))
    validate_task(task)
    return root


def test_weights_are_checked_before_any_task_starts(weights, tmp_path, capsys):
    from eval.run import main

    tasks = _tiny_task(tmp_path / "tasks")
    out = tmp_path / "out"
    cases = [(f"ssast_tiny={tmp_path / 'no_such_weights'}", "model ssast_tiny: cannot load it with "
                                                           f"'{tmp_path / 'no_such_weights'}': weights not found"),
             (f"ssast_tiny={weights['axlstm_tiny']}", "these weights are for axlstm_tiny"),
             ("ssast_tiny=ssast_tiny.no_such_tag", "ssast_tiny has no weight tag 'no_such_tag'")]
    for weight, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(["--models", "ssast_tiny", "--tasks-dir", str(tasks), "--out", str(out), "--weights", weight])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err, weight
        assert not out.exists()  # nothing started, no record pinned


def test_a_failed_runs_record_does_not_block_a_corrected_rerun(tmp_path):
    from eval.run import ModelSpec, check_model_record

    out = tmp_path / "out"
    wrong = ModelSpec("ssast_tiny", "hear_msm.ssast_tiny", "/old/weights")
    fixed = ModelSpec("ssast_tiny", "hear_msm.ssast_tiny", "/new/weights")
    check_model_record(out, wrong)
    partial = out / "embeddings" / "ssast_tiny" / "hear_msm.ssast_tiny" / "tiny_scene-v1-dev"
    partial.mkdir(parents=True)
    (partial / "train.embeddings.npy").write_bytes(b"unfinished")
    check_model_record(out, fixed)  # nothing finished under the old record: replaced, leftovers gone
    assert json.loads((out / "embeddings" / "ssast_tiny" / "model.json").read_text()) == fixed.record()
    assert not partial.parent.exists()
    partial.mkdir(parents=True)
    (partial / ".done.embeddings").write_text("")
    with pytest.raises(ValueError, match="holds embeddings of .*/new/weights"):
        check_model_record(out, wrong)  # finished embeddings of other weights are never mixed in


def test_results_tables_are_replaced_atomically(tmp_path, monkeypatch):
    import matplotlib.figure

    rows = [{"model": "a", "task": "esc50-v2.0.0-full", "seed": s, "metric": "top1_acc", "score": v}
            for s, v in ((42, 0.5), (43, 0.6))]
    report.write(tmp_path, rows, ["a"])
    before = {name: (tmp_path / name).read_bytes() for name in ("results.csv", "results.md", "results.png")}

    def savefig_then_disk_full(self, target, **kwargs):
        (target if hasattr(target, "write") else open(target, "wb")).write(b"partial png")
        raise OSError("disk full")

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig_then_disk_full)
    with pytest.raises(OSError, match="disk full"):
        report.write(tmp_path, rows[:1], ["a"])
    assert (tmp_path / "results.png").read_bytes() == before["results.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.csv", "results.md", "results.png"]
    assert (tmp_path / "results.csv").read_text().count("\n") == 2  # header + the one row now written
