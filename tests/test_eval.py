"""eval/: the whole driver on a real-audio dev task (GM notes rendered by fluidsynth), its resume
logic, the report, and the errors for folders that are not HEAR tasks.

The end-to-end test builds gm_pitch-v1-dev with scripts/build_dev_tasks.py (4 programs: 100 clips
per split; downloads ~90 MB of Debian packages once into the cache), then runs
`python -m eval.run` for ssast_tiny and axlstm_tiny (random-init weights) with
`--grid faster --grid-points 1` and 2 seeds, reruns it (nothing may be recomputed), and runs a
12-clip event task (gm_onsets) for one model and the peer row hearbaseline.torchcrepe on 75
clips. --workers 2 must reproduce the one-worker run's files and scores exactly; --shard, the merge
run, a failing job beside a good one and SIGTERM run with a toy HEAR module (four audio statistics)
on noise tasks, so they cost process start-ups only.
"""
import csv
import importlib.util
import json
import math
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

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


@pytest.fixture(scope="module")
def one_worker_run(dev_tasks, weights, tmp_path_factory):
    """OUT of the driver with one worker: 2 models x gm_pitch x 2 seeds."""
    out = tmp_path_factory.mktemp("one_worker") / "out"
    _run_eval(dev_tasks, out, weights, "--tasks", "gm_pitch-v1-dev")
    return out


@needs_heareval
def test_driver_end_to_end_and_rerun_is_noop(one_worker_run, dev_tasks, weights):
    out = one_worker_run

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
    with pytest.raises(ValueError, match="--models names ssam_tiny more than once"):
        parse_models("ssam_tiny,axlstm_tiny,ssam_tiny", [], "time")  # two workers would share its folders


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


def _tiny_task(root: Path, name: str = "tiny_scene", clips: int = 2, seconds: float = 1.0) -> Path:
    """A valid HEAR scene task `<name>-v1-dev` of `clips` noise clips per split, labels a and b
    alternating, each `seconds` long (no heareval needed to build it); returns `root`."""
    task = root / f"{name}-v1-dev"
    rng = np.random.default_rng(0)
    splits = ["train", "valid", "test"]
    (task / "16000").mkdir(parents=True)
    metadata = {"task_name": name, "embedding_type": "scene", "prediction_type": "multiclass",
                "split_mode": "trainvaltest", "splits": splits, "evaluation": ["top1_acc"],
                "sample_duration": seconds}
    (task / "task_metadata.json").write_text(json.dumps(metadata))
    (task / "labelvocabulary.csv").write_text("idx,label\n0,a\n1,b\n")
    samples = int(16000 * seconds)
    for split in splits:
        (task / "16000" / split).mkdir()
        labels = {f"{split}{i}.wav": ["b" if i % 2 else "a"] for i in range(clips)}
        for file, (label,) in labels.items():
            audio = (0.1 if label == "a" else 0.3) * rng.standard_normal(samples)
            sf.write(str(task / "16000" / split / file), audio.astype(np.float32), 16000)
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


# --workers and --shard: job order, thread split, arguments, and real parallel and sharded runs

def test_job_order_is_task_major_and_shards_take_every_nth_job():
    from eval.run import ModelSpec, job_order, parse_shard

    specs = [ModelSpec(m, f"hear_msm.{m}") for m in ("ssast_tiny", "ssam_tiny", "axlstm_tiny")]
    tasks = [Path("t") / "gm_pitch-v1-dev", Path("t") / "gm_family-v1-dev", Path("t") / "gm_pitch-v1-dev"]
    names = [job.name for job in job_order(specs, tasks)]
    assert names == [f"{m} / {t}" for t in ("gm_pitch-v1-dev", "gm_family-v1-dev")
                     for m in ("ssast_tiny", "ssam_tiny", "axlstm_tiny")]  # a repeated task is one job
    for count in (1, 2, 4, 7):
        shards = [names[parse_shard(f"{i}/{count}", {})[0]::count] for i in range(count)]
        assert sorted(sum(shards, [])) == sorted(names)  # every job in exactly one shard
        assert all(shard == names[i::count] for i, shard in enumerate(shards))
    assert names[6::7] == []  # more shards than jobs: the last ones have nothing to do


def test_shard_from_text_and_from_launchers():
    from eval.run import parse_shard

    assert parse_shard("0/1", {}) == (0, 1) and parse_shard("3/4", {}) == (3, 4)
    assert parse_shard("auto", {"RANK": "2", "WORLD_SIZE": "3", "LOCAL_RANK": "0"}) == (2, 3)  # torchrun
    assert parse_shard("auto", {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "8"}) == (5, 8)
    slurm_1_to_7_step_2 = {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_COUNT": "4", "SLURM_ARRAY_TASK_MIN": "1",
                           "SLURM_ARRAY_TASK_STEP": "2"}  # sbatch --array=1-7:2: ids 1, 3, 5, 7
    assert parse_shard("auto", slurm_1_to_7_step_2) == (2, 4)
    bad = [("2/2", {}, r"--shard 2/2: needs N >= 1 and I from 0 to N-1"),
           ("0/0", {}, r"--shard 0/0: needs N >= 1"),
           ("1", {}, r"--shard takes I/N .* got '1'"),
           ("-1/2", {}, r"--shard takes I/N .* got '-1/2'"),
           ("a/b", {}, r"--shard takes I/N"),
           ("auto", {"PATH": "/bin"}, r"--shard auto needs RANK and WORLD_SIZE \(torchrun\) or SLURM_ARRAY_TASK_ID "
                                      r"and SLURM_ARRAY_TASK_COUNT \(a Slurm job array\).*give --shard I/N"),
           ("auto", {"RANK": "1"}, r"torchrun sets RANK and WORLD_SIZE, but only RANK is set"),
           ("auto", {"RANK": "0", "WORLD_SIZE": "2", "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_TASK_COUNT": "2"},
            r"found both RANK \(torchrun\) and SLURM_ARRAY_TASK_ID"),
           ("auto", {"RANK": "x", "WORLD_SIZE": "2"}, r"RANK must be an integer, got 'x'"),
           ("auto", {"RANK": "2", "WORLD_SIZE": "2"}, r"--shard 2/2 \(from RANK=2, WORLD_SIZE=2\): needs"),
           ("auto", dict(slurm_1_to_7_step_2, SLURM_ARRAY_TASK_ID="4"), r"array task 4 is not on the range from 1 "
                                                                         r"in steps of 2")]
    for text, environ, message in bad:
        with pytest.raises(ValueError, match=message):
            parse_shard(text, environ)


def test_thread_split_between_workers():
    from eval.run import _python_env, available_cores, job_threads, thread_shares

    assert thread_shares(2, 1) == [2] and thread_shares(2, 2) == [1, 1] and thread_shares(3, 2) == [2, 1]
    assert thread_shares(16, 3) == [6, 5, 5] and thread_shares(2, 3) == [1, 1, 1]  # more workers than cores
    cores = available_cores()
    assert cores == len(os.sched_getaffinity(0))
    assert job_threads(1, {}) == [str(cores)]
    assert [int(n) for n in job_threads(2, {})] == thread_shares(cores, 2)
    assert job_threads(2, {"OMP_NUM_THREADS": "3"}) == ["3", "3"]  # the caller's choice, per job
    # the subprocess a worker starts runs torch with its share
    for share in ("1", "2"):
        proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
                              env=_python_env(share), capture_output=True, text=True, timeout=120)
        assert proc.stdout.strip() == share, proc.stderr[-2000:]


def test_bad_workers_and_shard_arguments(tmp_path, capsys, monkeypatch):
    from eval.run import main

    for variable in ("RANK", "WORLD_SIZE", "SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT"):
        monkeypatch.delenv(variable, raising=False)
    tasks = _tiny_task(tmp_path / "tasks")
    out = tmp_path / "out"
    cases = [(["--workers", "0"], "--workers must be at least 1, got 0"),
             (["--workers", "-2"], "--workers must be at least 1, got -2"),
             (["--workers", "two"], "argument --workers: invalid int value: 'two'"),
             (["--shard", "4/4"], "--shard 4/4: needs N >= 1 and I from 0 to N-1"),
             (["--shard", "1:4"], "--shard takes I/N (shard I of N, I from 0 to N-1, e.g. 0/4) or auto, got '1:4'"),
             (["--shard", "auto"], "--shard auto needs RANK and WORLD_SIZE (torchrun)")]
    for extra, message in cases:
        with pytest.raises(SystemExit) as stop:
            main(["--models", "ssast_tiny", "--tasks-dir", str(tasks), "--out", str(out), *extra])
        assert stop.value.code == 2
        assert message in capsys.readouterr().err, extra
        assert not out.exists()


def _same_bytes(a: Path, b: Path, pattern: str) -> list[str]:
    files = sorted(str(p.relative_to(a)) for p in a.rglob(pattern))
    assert files, pattern
    return [f for f in files if (a / f).read_bytes() != (b / f).read_bytes()]


@needs_heareval
def test_two_workers_give_the_files_and_scores_of_one(one_worker_run, dev_tasks, weights, tmp_path):
    out = tmp_path / "out"
    proc = _run_eval(dev_tasks, out, weights, "--tasks", "gm_pitch-v1-dev", "--workers", "2")
    assert "--workers 2: OMP_NUM_THREADS 1/1 (" in proc.stderr
    assert "6 step(s) computed, 0 already done, 0 failed" in proc.stdout
    assert set(_snapshot(out)) == set(_snapshot(one_worker_run))
    assert _same_bytes(out, one_worker_run, "*.npy") == []  # every embedding, bit for bit
    for scores in one_worker_run.rglob("test.predicted-scores.json"):  # 2 models x 2 seeds
        ours = json.loads((out / scores.relative_to(one_worker_run)).read_text())["test"]
        theirs = json.loads(scores.read_text())["test"]
        assert ours.pop("time_in_min") > 0 and theirs.pop("time_in_min") > 0
        assert ours == theirs, scores  # every test metric, exactly
        predictions = scores.with_name("test.predictions.pkl")
        with open(predictions, "rb") as a, open(out / predictions.relative_to(one_worker_run), "rb") as b:
            theirs, ours = pickle.load(a), pickle.load(b)
        assert sorted(ours) == ["prediction", "prediction_logit", "target"]
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), predictions
    assert (out / "results.csv").read_text() == (one_worker_run / "results.csv").read_text()
    log = (out / "logs" / "axlstm_tiny" / "gm_pitch-v1-dev.embeddings.log").read_text()
    assert "$ OMP_NUM_THREADS=1 " in log


TOY_MODULE = '''
"""A HEAR module of four audio statistics, which refuses clips longer than 1.5 s (and with
TOY_SLEEP=S set, first sleeps S seconds)."""
import os
import time

import torch


class Toy(torch.nn.Module):
    sample_rate = 16000
    scene_embedding_size = 4
    timestamp_embedding_size = 4


def load_model(model_file_path=""):
    return Toy()


def get_scene_embeddings(audio, model):
    time.sleep(float(os.environ.get("TOY_SLEEP", "0")))
    if audio.shape[1] > 1.5 * model.sample_rate:
        raise ValueError("toy_hear refuses clips longer than 1.5 s")
    return torch.stack([audio.mean(1), audio.std(1), audio.abs().amax(1), audio.pow(2).mean(1)], 1)


def get_timestamp_embeddings(audio, model):
    raise NotImplementedError
'''


def _toy_env(tmp_path):
    (tmp_path / "toy").mkdir()
    (tmp_path / "toy" / "toy_hear.py").write_text(TOY_MODULE)
    env = _env()
    env["PYTHONPATH"] += os.pathsep + str(tmp_path / "toy")
    return env


@needs_heareval
def test_sigterm_ends_the_running_subprocesses(tmp_path):
    """torchrun and Slurm end a rank with SIGTERM: its heareval subprocess must not outlive it."""
    tasks = _tiny_task(tmp_path / "tasks", "a_ok", clips=8)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "eval.run", "--models", "toy_hear", "--tasks-dir", str(tasks),
                             "--out", str(out), "--seeds", "1", "--grid", "faster", "--grid-points", "1"],
                            cwd=REPO, env=dict(_toy_env(tmp_path), TOY_SLEEP="600"), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    children = []
    for _ in range(240):
        children = [int(pid) for task in Path(f"/proc/{proc.pid}/task").iterdir()
                    for pid in (task / "children").read_text().split()]
        if children:
            break
        time.sleep(0.5)
    assert children, "eval.run started no subprocess within 2 min"
    proc.send_signal(signal.SIGTERM)  # to eval.run alone, not to its process group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stdout[-2000:] + stderr[-2000:]
    assert "stopped by signal 15 after 0 step(s); a rerun resumes" in stderr
    assert not any(Path(f"/proc/{pid}").exists() for pid in children)
    assert not list(out.rglob(".done.embeddings"))


@needs_heareval
def test_failed_job_spares_the_others_and_shards_merge(tmp_path):
    """Three jobs of a toy model: shard 0/2 runs jobs a and c on two workers (c fails, a finishes); the
    merge run without --shard computes what shard 1/2 would have (b), skips a and writes the tables."""
    env = _toy_env(tmp_path)
    tasks = tmp_path / "tasks"
    for name, seconds in (("a_ok", 1.0), ("b_ok", 1.0), ("c_long", 2.0)):
        _tiny_task(tasks, name, clips=8, seconds=seconds)
    out = tmp_path / "out"

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "eval.run", "--models", "toy_hear", "--tasks-dir", str(tasks),
                               "--out", str(out), "--seeds", "1", "--grid", "faster", "--grid-points", "1", *extra],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=600)

    shard0 = run("--shard", "0/2", "--workers", "2")
    assert shard0.returncode == 1, shard0.stdout[-3000:] + shard0.stderr[-3000:]
    assert "shard 0/2: 2 of 3 (model, task) jobs" in shard0.stderr
    assert "FAILED toy_hear / c_long-v1-dev: heareval.embeddings.runner failed" in shard0.stderr
    assert "toy_hear refuses clips longer than 1.5 s" in shard0.stderr
    assert "shard 0/2: 2 step(s) computed, 0 already done, 1 failed" in shard0.stdout
    assert (out / "predictions" / "toy_hear" / "a_ok-v1-dev" / "seed42" / "prediction-done.json").is_file()
    assert not (out / "predictions" / "toy_hear" / "b_ok-v1-dev").exists()
    assert not (out / "results.csv").exists()  # shards leave the tables to the merge run

    merge = run("--tasks", "a_ok-v1-dev,b_ok-v1-dev")
    assert merge.returncode == 0, merge.stdout[-3000:] + merge.stderr[-3000:]
    assert "2 step(s) computed, 2 already done, 0 failed" in merge.stdout
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["task"] for r in rows) == ["a_ok-v1-dev", "b_ok-v1-dev"]
    assert all(math.isfinite(float(r["score"])) for r in rows)
