#!/usr/bin/env python3
"""Build small HEAR-format development tasks from real General MIDI soundfont recordings.

Two scene tasks, each with soundfont-disjoint splits (train: FluidR3_GM, valid: TimGM6mb,
test: MuseScore_General_Lite), 1 s mono clips at 16 kHz, one note per clip:

  gm_pitch-v1-dev    MIDI note 48..72 (25 classes) played by melodic programs of several
                     families; evaluation pitch_acc, chroma_acc (as NSynth pitch in HEAR).
  gm_family-v1-dev   GM instrument family = program // 8 (14 melodic families, 2 programs each,
                     5 notes); evaluation top1_acc.
  gm_pitch_wide-v1-dev, gm_family_wide-v1-dev   (only with --tasks; the probe tasks of
                     scripts/probe_dev_tasks.py) the same, larger: MIDI 36..84 (49 classes) x 16
                     programs of 8 pitched families; 14 families x all 8 programs x 5 notes.
  gm_onsets-v1-dev   (only with --tasks gm_onsets) an event task: 4 s clips holding three 0.5 s
                     notes of piano / organ / guitar / brass at random onsets; evaluation
                     event_onset_200ms_fms, segment_1s_er (exercises heareval's event path).

Sounds come from Debian packages fetched with `apt-get download` and unpacked with `dpkg -x`
into a cache folder (no root needed): the soundfonts, the `fluidsynth` binary and every shared
library it needs that the machine does not already have (found from `apt-cache depends` and
`dpkg-query`). The notes are written as a Standard MIDI File and rendered offline by fluidsynth
at 16 kHz (reverb and chorus off), then cut into clips and peak-normalised to 0.5.

    python scripts/build_dev_tasks.py --out dev_tasks             # both tasks (about 1 min)
    python scripts/build_dev_tasks.py --out dev_tasks --tasks gm_pitch --max-programs 4
    python scripts/build_dev_tasks.py --out probe_tasks --tasks gm_pitch_wide,gm_family_wide

Needs: Python with numpy + soundfile, a Debian-based system with apt lists (`apt-get update`
once if `apt-get download` cannot find the packages). Downloads ~90 MB once
(cache: $HEAR_MSM_CACHE or ~/.cache/hear_msm, then debian/).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf

SAMPLE_RATE = 16000
CLIP_SECONDS = 1.0
NOTE_SECONDS = 0.8    # note-on to note-off; the release tail stays inside the clip
SLOT_SECONDS = 1.6    # spacing of note onsets in the rendered file (tail has died out by then)
PEAK = 0.5            # every clip is scaled to this peak, so loudness does not identify a soundfont
SILENCE_RMS = 1e-4    # clips quieter than this (a program missing from a soundfont) are dropped

# split -> (Debian package, soundfont path inside the package)
SOUNDFONTS = {
    "train": ("fluid-soundfont-gm", "usr/share/sounds/sf2/FluidR3_GM.sf2"),
    "valid": ("timgm6mb-soundfont", "usr/share/sounds/sf2/TimGM6mb.sf2"),
    "test": ("musescore-general-soundfont-small", "usr/share/sounds/sf3/MuseScore_General_Lite.sf3"),
}
FLUIDSYNTH_PACKAGES = ("fluidsynth", "libfluidsynth3")

FAMILIES = ("piano", "chromatic_percussion", "organ", "guitar", "bass", "strings", "ensemble",
            "brass", "reed", "pipe", "synth_lead", "synth_pad", "synth_effects", "ethnic")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    programs: tuple[int, ...]
    notes: tuple[int, ...]
    label: str           # "note" or "family"
    evaluation: tuple[str, ...]


TASKS = {
    "gm_pitch": TaskSpec(
        name="gm_pitch-v1-dev",
        # piano, vibraphone, church organ, nylon guitar, violin, trumpet, alto sax, flute
        programs=(0, 11, 19, 24, 40, 56, 65, 73),
        notes=tuple(range(48, 73)),
        label="note",
        evaluation=("pitch_acc", "chroma_acc"),
    ),
    "gm_family": TaskSpec(
        name="gm_family-v1-dev",
        programs=tuple(8 * family + offset for family in range(len(FAMILIES)) for offset in (0, 4)),
        notes=(48, 55, 60, 67, 72),
        label="family",
        evaluation=("top1_acc",),
    ),
    # The probe tasks used to judge pretrained weights (scripts/probe_dev_tasks.py): about four
    # times the clips of the two above, so one clip is ~0.1-0.2 points, and a pitch range wide
    # enough (49 classes, as NSynth pitch in HEAR) that no feature set saturates it.
    "gm_pitch_wide": TaskSpec(
        name="gm_pitch_wide-v1-dev",
        # two programs from each of eight pitched families: piano, chromatic percussion, organ,
        # guitar, strings, brass, reed, pipe (no bass/pads/effects: their range or attack blurs pitch)
        programs=(0, 4, 8, 11, 16, 19, 24, 26, 40, 48, 56, 61, 65, 71, 73, 79),
        notes=tuple(range(36, 85)),
        label="note",
        evaluation=("pitch_acc", "chroma_acc"),
    ),
    "gm_family_wide": TaskSpec(
        name="gm_family_wide-v1-dev",
        programs=tuple(range(8 * len(FAMILIES))),   # all eight programs of each melodic family
        notes=(43, 48, 55, 60, 67),
        label="family",
        evaluation=("top1_acc",),
    ),
}
DEFAULT_TASKS = ("gm_pitch", "gm_family")


# ------------------------------------------------------------------------------ Debian packages
def _run(cmd: list[str], cwd: Path | None = None, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    return proc.stdout


def _installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return proc.returncode == 0 and "ok installed" in proc.stdout


def _missing_libraries(packages: tuple[str, ...]) -> list[str]:
    """Library packages in the dependency closure of `packages` that are not installed here."""
    out = _run(["apt-cache", "depends", "--recurse", "--no-recommends", "--no-suggests", "--no-conflicts",
                "--no-breaks", "--no-replaces", "--no-enhances", "--no-pre-depends", *packages])
    names = sorted({line.strip() for line in out.splitlines() if line and not line.startswith((" ", "<"))})
    # libjack0 and libjack-jackd2-0 are alternatives providing the same libjack.so.0
    return [n for n in names if n.startswith("lib") and not n.endswith("-perl") and n != "libjack0" and not _installed(n)]


def fetch_packages(cache: Path) -> Path:
    """Download and unpack the soundfonts and fluidsynth into `cache`; return the unpacked root."""
    debs, root = cache / "debs", cache / "root"
    stamp = cache / "unpacked.json"
    if stamp.exists():
        return root
    for tool in ("apt-get", "apt-cache", "dpkg", "dpkg-query"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} not found: building the dev tasks needs a Debian-based system")
    wanted = [pkg for pkg, _ in SOUNDFONTS.values()] + list(FLUIDSYNTH_PACKAGES)
    wanted += [lib for lib in _missing_libraries(FLUIDSYNTH_PACKAGES) if lib not in wanted]
    debs.mkdir(parents=True, exist_ok=True)
    have = {p.name.split("_")[0] for p in debs.glob("*.deb")}
    todo = [p for p in wanted if p not in have]
    if todo:
        print(f"apt-get download {' '.join(todo)}", flush=True)
        try:
            _run(["apt-get", "download", *todo], cwd=debs)
        except RuntimeError as err:
            raise RuntimeError(f"{err}\n(if packages were not found, run `apt-get update` once and retry)") from None
    if root.exists():
        shutil.rmtree(root)
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg", "-x", str(deb), str(root)])
    stamp.write_text(json.dumps(sorted(p.name for p in debs.glob("*.deb")), indent=1))
    return root


def fluidsynth_command(root: Path) -> tuple[list[str], dict[str, str]]:
    """The unpacked fluidsynth binary and an environment whose LD_LIBRARY_PATH finds its libraries."""
    binary = root / "usr/bin/fluidsynth"
    libdirs = sorted({str(p.parent) for p in root.glob("usr/lib/**/*.so*")})
    env = dict(os.environ)
    env["LD_LIBRARY_PATH"] = os.pathsep.join(libdirs + [env.get("LD_LIBRARY_PATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([str(binary), "--version"], env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        missing = subprocess.run(["ldd", str(binary)], env=env, capture_output=True, text=True).stdout
        missing = [line.strip() for line in missing.splitlines() if "not found" in line]
        raise RuntimeError(f"the unpacked fluidsynth does not run: {proc.stderr.strip()[-500:]}\n"
                           f"missing libraries: {missing}")
    return [str(binary)], env


# ------------------------------------------------------------------------------ MIDI + rendering
def _varlen(value: int) -> bytes:
    out = [value & 0x7F]
    value >>= 7
    while value:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    return bytes(reversed(out))


def write_midi(path: Path, notes: list[tuple[float, float, int, int]]) -> None:
    """One-track MIDI file of notes (start s, end s, GM program, MIDI pitch), each on its own channel
    in turn (never 9, the drum channel), so that overlapping notes keep their programs."""
    ticks_per_second = 960  # 480 ticks per quarter at the default 120 bpm
    channels = [c for c in range(16) if c != 9]
    events = []
    for i, (start, end, program, pitch) in enumerate(notes):
        channel = channels[i % len(channels)]
        on, off = round(start * ticks_per_second), round(end * ticks_per_second)
        events.append((on, 0, bytes([0xC0 | channel, program])))
        events.append((on, 1, bytes([0x90 | channel, pitch, 100])))
        events.append((off, 2, bytes([0x80 | channel, pitch, 0])))
    track, last = b"", 0
    for tick, _, message in sorted(events):
        track += _varlen(tick - last) + message
        last = tick
    track += _varlen(0) + b"\xff\x2f\x00"
    path.write_bytes(b"MThd" + struct.pack(">IHHH", 6, 0, 1, 480) + b"MTrk" + struct.pack(">I", len(track)) + track)


def render(fluidsynth: tuple[list[str], dict[str, str]], soundfont: Path,
           notes: list[tuple[float, float, int, int]], workdir: Path) -> np.ndarray:
    """Render notes (start s, end s, program, pitch) with `soundfont`: mono float32 at 16 kHz."""
    cmd, env = fluidsynth
    midi, wav = workdir / "notes.mid", workdir / "notes.wav"
    write_midi(midi, notes)
    _run([*cmd, "-ni", "-q", "-R", "0", "-C", "0", "-g", "1.0", "-r", str(SAMPLE_RATE), "-T", "wav",
          "-O", "s16", "-F", str(wav), str(soundfont), str(midi)], env=env)
    audio, rate = sf.read(str(wav), dtype="float32", always_2d=True)
    if rate != SAMPLE_RATE:
        raise RuntimeError(f"fluidsynth wrote {rate} Hz, expected {SAMPLE_RATE}")
    return audio.mean(axis=1)


def cut(audio: np.ndarray, start: float, seconds: float) -> np.ndarray | None:
    """`seconds` of audio from `start` (zero-padded), peak-normalised; None if silent."""
    length = round(seconds * SAMPLE_RATE)
    clip = np.zeros(length, dtype=np.float32)
    piece = audio[round(start * SAMPLE_RATE):round(start * SAMPLE_RATE) + length]
    clip[:len(piece)] = piece
    if np.sqrt(np.mean(clip ** 2)) < SILENCE_RMS:
        return None
    return (clip * (PEAK / np.abs(clip).max())).astype(np.float32)


# ------------------------------------------------------------------------------ HEAR task folders
def build_task(spec: TaskSpec, out: Path, root: Path, fluidsynth, max_programs: int | None) -> Path:
    programs = spec.programs if not max_programs else spec.programs[:: max(1, len(spec.programs) // max_programs)][:max_programs]
    notes = [(program, pitch) for program in programs for pitch in spec.notes]
    if spec.label == "note":
        vocabulary = [str(pitch) for pitch in spec.notes]
    else:
        vocabulary = sorted({FAMILIES[program // 8] for program in programs}, key=FAMILIES.index)
    task_dir = out / spec.name
    if task_dir.exists():
        shutil.rmtree(task_dir)
    (task_dir / str(SAMPLE_RATE)).mkdir(parents=True)
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, (package, sf_path) in SOUNDFONTS.items():
            audio = render(fluidsynth, root / sf_path, [(i * SLOT_SECONDS, i * SLOT_SECONDS + NOTE_SECONDS, program, pitch)
                                                          for i, (program, pitch) in enumerate(notes)], Path(tmp))
            clips = [cut(audio, i * SLOT_SECONDS, CLIP_SECONDS) for i in range(len(notes))]
            split_dir = task_dir / str(SAMPLE_RATE) / split
            split_dir.mkdir()
            labels = {}
            for (program, pitch), clip in zip(notes, clips):
                if clip is None:
                    continue
                name = f"{package}-p{program:03d}-n{pitch:03d}.wav"
                sf.write(str(split_dir / name), clip, SAMPLE_RATE, subtype="PCM_16")
                labels[name] = [str(pitch) if spec.label == "note" else FAMILIES[program // 8]]
            (task_dir / f"{split}.json").write_text(json.dumps(labels, indent=1))
            counts[split] = len(labels)
    with open(task_dir / "labelvocabulary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["idx", "label"])
        writer.writerows(enumerate(vocabulary))
    metadata = {
        "task_name": spec.name.split("-")[0],
        "version": "v1-dev",
        "embedding_type": "scene",
        "prediction_type": "multiclass",
        "split_mode": "trainvaltest",
        "splits": list(SOUNDFONTS),
        "sample_duration": CLIP_SECONDS,
        "evaluation": list(spec.evaluation),
        "default_mode": "dev",
        "mode": "dev",
        "sources": {split: package for split, (package, _) in SOUNDFONTS.items()},
        "programs": list(programs),
    }
    if spec.label == "note":
        metadata.update(pitch_range_min=min(spec.notes), pitch_range_max=max(spec.notes))
    (task_dir / "task_metadata.json").write_text(json.dumps(metadata, indent=1))
    print(f"{spec.name}: {counts} clips, {len(vocabulary)} classes -> {task_dir}", flush=True)
    return task_dir


# event task: 4 s clips with three 0.5 s notes of four instrument families at random onsets
EVENT_TASK = "gm_onsets-v1-dev"
EVENT_PROGRAMS = {0: "piano", 19: "organ", 24: "guitar", 56: "brass"}
EVENT_CLIP_SECONDS, EVENT_SLOT_SECONDS, EVENT_NOTE_SECONDS, EVENT_NOTES = 4.0, 5.0, 0.5, 3


def build_event_task(out: Path, root: Path, fluidsynth, clips_per_split: int) -> Path:
    """Sound event detection: onsets of the four families' notes (HEAR event task, multilabel)."""
    task_dir = out / EVENT_TASK
    if task_dir.exists():
        shutil.rmtree(task_dir)
    (task_dir / str(SAMPLE_RATE)).mkdir(parents=True)
    rng = np.random.default_rng(0)
    programs = list(EVENT_PROGRAMS)
    counts = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, (package, sf_path) in SOUNDFONTS.items():
            plan = []  # per clip: [(onset s, program, pitch)]
            for _ in range(clips_per_split):
                onsets = np.sort(rng.uniform(0.1, EVENT_CLIP_SECONDS - EVENT_NOTE_SECONDS - 0.1, EVENT_NOTES))
                plan.append([(float(t), int(rng.choice(programs)), int(rng.integers(55, 73))) for t in onsets])
            notes = [(c * EVENT_SLOT_SECONDS + t, c * EVENT_SLOT_SECONDS + t + EVENT_NOTE_SECONDS, program, pitch)
                     for c, clip_notes in enumerate(plan) for t, program, pitch in clip_notes]
            audio = render(fluidsynth, root / sf_path, notes, Path(tmp))
            split_dir = task_dir / str(SAMPLE_RATE) / split
            split_dir.mkdir()
            labels = {}
            for c, clip_notes in enumerate(plan):
                clip = cut(audio, c * EVENT_SLOT_SECONDS, EVENT_CLIP_SECONDS)
                if clip is None:
                    continue
                name = f"{package}-clip{c:03d}.wav"
                sf.write(str(split_dir / name), clip, SAMPLE_RATE, subtype="PCM_16")
                labels[name] = [{"label": EVENT_PROGRAMS[program], "start": round(1000 * t, 1),
                                 "end": round(1000 * (t + EVENT_NOTE_SECONDS), 1)} for t, program, _ in clip_notes]
            (task_dir / f"{split}.json").write_text(json.dumps(labels, indent=1))
            counts[split] = len(labels)
    with open(task_dir / "labelvocabulary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["idx", "label"])
        writer.writerows(enumerate(EVENT_PROGRAMS.values()))
    metadata = {
        "task_name": EVENT_TASK.split("-")[0], "version": "v1-dev", "embedding_type": "event",
        "prediction_type": "multilabel", "split_mode": "trainvaltest", "splits": list(SOUNDFONTS),
        "sample_duration": EVENT_CLIP_SECONDS, "evaluation": ["event_onset_200ms_fms", "segment_1s_er"],
        "default_mode": "dev", "mode": "dev",
        "sources": {split: package for split, (package, _) in SOUNDFONTS.items()},
    }
    (task_dir / "task_metadata.json").write_text(json.dumps(metadata, indent=1))
    print(f"{EVENT_TASK}: {counts} clips, {len(EVENT_PROGRAMS)} classes -> {task_dir}", flush=True)
    return task_dir


def default_cache() -> Path:
    base = os.environ.get("HEAR_MSM_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hear_msm")
    return Path(base) / "debian"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="tasks folder to write into")
    parser.add_argument("--tasks", default=",".join(DEFAULT_TASKS),
                        help=f"comma-separated subset of {list(TASKS) + ['gm_onsets']} (default: "
                             f"{','.join(DEFAULT_TASKS)}; the *_wide probe tasks and gm_onsets on request)")
    parser.add_argument("--event-clips", type=int, default=40, help="clips per split of gm_onsets")
    parser.add_argument("--max-programs", type=int, default=None,
                        help="use at most this many GM programs per task (smaller, faster tasks)")
    parser.add_argument("--cache", type=Path, default=default_cache(), help="where the .deb files are kept")
    args = parser.parse_args(argv)
    names = [t for t in args.tasks.split(",") if t]
    unknown = [t for t in names if t not in TASKS and t != "gm_onsets"]
    if unknown:
        parser.error(f"unknown task(s) {unknown}; choose from {list(TASKS) + ['gm_onsets']}")
    start = time.time()
    root = fetch_packages(args.cache)
    fluidsynth = fluidsynth_command(root)
    for name in names:
        if name == "gm_onsets":
            build_event_task(args.out, root, fluidsynth, args.event_clips)
        else:
            build_task(TASKS[name], args.out, root, fluidsynth, args.max_programs)
    print(f"built {len(names)} task(s) in {time.time() - start:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
