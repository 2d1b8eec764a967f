"""The papers' ten HEAR 2021 tasks, and checks that a folder is a usable HEAR task at 16 kHz.

A HEAR task folder (as produced by hear-preprocess, or scripts/build_dev_tasks.py) holds
`task_metadata.json`, `labelvocabulary.csv`, one `<split>.json` per split (file -> labels) and
the audio as `16000/<split>/<file>.wav`, every clip exactly `sample_duration` seconds long.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

SAMPLE_RATE = 16000


@dataclass(frozen=True)
class Task:
    folder: str      # the HEAR task folder name
    abbr: str        # column heading in the papers' tables
    metric: str      # heareval evaluation name of the score the papers report


# In the papers' order (SSAM, AxLSTM: Yadav et al. 2024).
PAPER_TASKS: tuple[Task, ...] = (
    Task("beijing_opera-v1.0-hear2021-full", "BO", "top1_acc"),
    Task("tfds_crema_d-1.0.0-full", "CD", "top1_acc"),
    Task("esc50-v2.0.0-full", "E50", "top1_acc"),
    Task("libricount-v1.0.0-hear2021-full", "LC", "top1_acc"),
    Task("mridangam_stroke-v1.5-full", "Mri-S", "top1_acc"),
    Task("mridangam_tonic-v1.5-full", "Mri-T", "top1_acc"),
    Task("nsynth_pitch-v2.2.3-5h", "NS-5h", "pitch_acc"),
    Task("speech_commands-v0.0.2-5h", "SC-5h", "top1_acc"),
    Task("fsd50k-v1.0-full", "F50K", "mAP"),
    Task("vox_lingua_top10-hear2021-full", "VL", "top1_acc"),
)
BY_FOLDER = {task.folder: task for task in PAPER_TASKS}


class TaskError(ValueError):
    """A task folder that heareval cannot run; the message names the task and the problem."""


def task_info(path: Path, metadata: dict | None = None) -> Task:
    """The paper task for a folder name, or a Task for any other HEAR task (first metric)."""
    path = Path(path)
    if path.name in BY_FOLDER:
        return BY_FOLDER[path.name]
    metadata = metadata if metadata is not None else read_metadata(path)
    return Task(path.name, path.name, metadata["evaluation"][0])


def read_metadata(path: Path) -> dict:
    meta_file = Path(path) / "task_metadata.json"
    if not meta_file.is_file():
        raise TaskError(f"task {Path(path).name}: no task_metadata.json in {path} (not a HEAR task folder)")
    try:
        metadata = json.loads(meta_file.read_text())
    except json.JSONDecodeError as err:
        raise TaskError(f"task {Path(path).name}: task_metadata.json is not valid JSON ({err})") from None
    required = ("task_name", "embedding_type", "prediction_type", "split_mode", "splits", "evaluation",
                "sample_duration")
    missing = [key for key in required if key not in metadata]
    if missing:
        raise TaskError(f"task {Path(path).name}: task_metadata.json lacks {missing}")
    return metadata


def validate_task(path: Path, check_audio: bool = True) -> dict:
    """Check a HEAR task folder; return its metadata or raise TaskError naming task and problem.

    Checks: metadata present and complete, label vocabulary and split files present, audio in
    `16000/<split>/` (other rates present is reported as a wrong sample rate), every listed
    file present, and (if check_audio) every clip `sample_duration` long at 16 kHz.
    """
    path = Path(path)
    name = path.name
    if not path.is_dir():
        raise TaskError(f"task {name}: folder {path} does not exist")
    metadata = read_metadata(path)
    if not (path / "labelvocabulary.csv").is_file():
        raise TaskError(f"task {name}: no labelvocabulary.csv")
    audio_root = path / str(SAMPLE_RATE)
    if not audio_root.is_dir():
        rates = sorted(p.name for p in path.iterdir() if p.is_dir() and p.name.isdigit())
        found = f"found sample-rate folder(s) {rates}" if rates else "found no sample-rate folder"
        raise TaskError(f"task {name}: needs audio at {SAMPLE_RATE} Hz in {audio_root}/<split>/, {found}; "
                        f"build the task with hear-preprocess at {SAMPLE_RATE} Hz")
    duration = metadata["sample_duration"]
    for split in metadata["splits"]:
        split_file = path / f"{split}.json"
        if not split_file.is_file():
            raise TaskError(f"task {name}: split {split!r} has no {split_file.name}")
        split_dir = audio_root / split
        if not split_dir.is_dir():
            raise TaskError(f"task {name}: split {split!r} has no audio folder {split_dir}")
        files = list(json.loads(split_file.read_text()))
        absent = [f for f in files if not (split_dir / f).is_file()]
        if absent:
            raise TaskError(f"task {name}: split {split!r} lists {len(absent)} file(s) missing from "
                            f"{split_dir}, e.g. {absent[0]}")
        if check_audio and duration is not None:
            _check_lengths(name, split, split_dir, files, duration)
    return metadata


def _check_lengths(name: str, split: str, split_dir: Path, files: list[str], duration: float) -> None:
    import soundfile as sf

    expected = round(duration * SAMPLE_RATE)
    for file in files:
        info = sf.info(str(split_dir / file))
        if info.samplerate != SAMPLE_RATE:
            raise TaskError(f"task {name}: {split}/{file} is {info.samplerate} Hz in the {SAMPLE_RATE} folder")
        if info.frames != expected:
            raise TaskError(f"task {name}: clips of unequal length: {split}/{file} has {info.frames} samples, "
                            f"sample_duration {duration} s needs {expected} (heareval batches equal-length clips)")


def resolve_tasks(tasks_dir: Path, names: list[str] | None) -> tuple[list[Path], list[str]]:
    """(existing task folders in run order, names that were asked for but are missing).

    names=None means the papers' ten tasks followed by any other task folders in tasks_dir.
    A name may be a paper abbreviation ("E50") or a folder name.
    """
    tasks_dir = Path(tasks_dir)
    if not tasks_dir.is_dir():
        raise FileNotFoundError(f"tasks dir {tasks_dir} does not exist")
    abbr = {task.abbr.lower(): task.folder for task in PAPER_TASKS}
    if names is None:
        others = sorted(p.name for p in tasks_dir.iterdir() if p.is_dir() and p.name not in BY_FOLDER)
        names = [task.folder for task in PAPER_TASKS] + others
    else:
        names = [abbr.get(n.lower(), n) for n in names]
    found = [tasks_dir / n for n in names if (tasks_dir / n).is_dir()]
    missing = [n for n in names if not (tasks_dir / n).is_dir()]
    return found, missing


def order_key(folder: str) -> tuple[int, str]:
    """Sort key: the papers' order first, then other tasks by name."""
    index = [task.folder for task in PAPER_TASKS]
    return (index.index(folder), "") if folder in index else (len(index), folder)
