"""Pretraining data: audio folders and tar shards -> random crops of a model's normalised features.

Two sources, one interface (`num_items`, `groups`, `load(index, rng)`):

  AudioFolder   every wav/flac/ogg file under a folder, any rate and channel count, decoded with
                soundfile, mixed to mono and resampled to 16 kHz. Unreadable files and files shorter
                than `min_seconds` are skipped at start-up and counted. Files longer than
                `max_clip_seconds` are read as one random segment of that length (the AudioSet
                clips of the official recipe are 10 s), so an hour-long file costs no more than a clip.
  TarShards     webdataset-style tar files (`shard-000000.tar`, ...): members `<key>.logmel.npy`
                (float16 [frames, 80], the 80-bin log-mel of `LogMelFrontend`, already per-clip
                normalised) or `<key>.flac` (16 kHz mono), written by `write_shards` / `hear-msm
                prepare-shards`. Members are indexed once at start-up and read by offset, so any clip
                can be fetched directly. Log-mel shards serve only models of that front end and bin
                count; flac shards serve any model.

Every clip becomes the features of the model's front end (`Features`: `_frontend.build_frontend`
of the model config; the per-clip normalised log-mel of Yadav et al., normalised over the whole
clip as the official recipe, or SSAMBA's Kaldi fbank), from which a random `num_frames` crop is
taken; clips shorter than the crop are padded with the front end's padding value (the clip mean for
log-mel, an all-zero fbank frame for Kaldi fbank, as SSAMBA's loader pads), as the HEAR runtime pads.

Randomness is explicit: a clip's segment and crop come from `numpy.random.default_rng((seed,
epoch, index))` and the order from `EpochSampler`, so a batch is a pure function of (seed, step):
DataLoader workers, restarts and `--resume` all reproduce it exactly.
"""
from __future__ import annotations

import io
import itertools
import logging
import math
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np
import soundfile as sf
import torch

from .._frontend import SAMPLE_RATE, build_frontend, to_16k_mono

log = logging.getLogger("hear_msm.data")

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".opus")  # .opus: Ogg Opus, read by libsndfile >= 1.0.29
SHARD_PATTERN = "shard-{:06d}.tar"


# ------------------------------------------------------------------------------------ audio
def read_segment(path: str | os.PathLike, max_seconds: float | None, rng: np.random.Generator) -> torch.Tensor:
    """Read a file (a random `max_seconds` segment if longer) as 16 kHz mono float32 [samples]."""
    with sf.SoundFile(str(path)) as handle:
        rate, frames = handle.samplerate, handle.frames
        length = frames if max_seconds is None else min(frames, int(round(max_seconds * rate)))
        start = int(rng.integers(0, frames - length + 1))
        handle.seek(start)
        data = handle.read(length, dtype="float32", always_2d=True)
    return to_16k_mono(data, rate)


@dataclass(frozen=True)
class _FrontendSpec:
    """What `build_frontend` reads of a model config."""

    arch: str = "logmel shards"
    frontend: str = "logmel"
    num_mels: int = 80


class Features:
    """Waveform [samples] at 16 kHz -> the normalised features [frames, bins] a model reads, from
    the front end its config names (`frontend`, `num_mels`). The front end is built lazily, once
    per process (DataLoader workers pickle this object without it)."""

    def __init__(self, config=_FrontendSpec()):
        self.kind, self.num_mels = config.frontend, config.num_mels
        self._spec = _FrontendSpec(config.arch, config.frontend, config.num_mels)
        self._frontend = None

    def _module(self):
        if self._frontend is None:
            self._frontend = build_frontend(self._spec)
        return self._frontend

    def __call__(self, audio: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self._module()(audio[None])[0].float()

    @property
    def padding_value(self) -> float:
        """What crops longer than a clip are padded with (in normalised feature space)."""
        return float(self._module().padding_value())

    def describe(self) -> str:
        return f"{self.kind} features ({self.num_mels} bins)"

    def __getstate__(self):
        return {**self.__dict__, "_frontend": None}


class _Features:
    """The log-mel that `write_shards` stores (kind "logmel": 80 bins)."""

    _features = Features()

    @classmethod
    def logmel(cls, audio: torch.Tensor) -> torch.Tensor:
        """[samples] 16 kHz -> normalised log-mel [frames, 80] float32."""
        return cls._features(audio)


def random_crop(features: torch.Tensor, num_frames: int, rng: np.random.Generator,
                padding_value: float = 0.0) -> torch.Tensor:
    """[frames, bins] -> [num_frames, bins]: a random window, padded at the end with `padding_value` if short."""
    frames = features.shape[0]
    if frames < num_frames:
        return torch.nn.functional.pad(features, (0, 0, 0, num_frames - frames), value=padding_value)
    start = int(rng.integers(0, frames - num_frames + 1))
    return features[start:start + num_frames]


# ------------------------------------------------------------------------------------ sources
def find_audio_files(root: str | os.PathLike) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"audio folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in AUDIO_SUFFIXES and p.is_file())


class AudioFolder:
    """Audio files under `root` (recursively); see the module docstring."""

    def __init__(self, root: str | os.PathLike, min_seconds: float = 0.5, max_clip_seconds: float | None = 10.0,
                 features: Features | None = None):
        self.root = Path(root)
        self.max_clip_seconds = max_clip_seconds
        self.features = features or Features()
        self.files: list[Path] = []
        self.seconds: list[float] = []
        self.skipped = {"unreadable": 0, "too_short": 0}
        for path in find_audio_files(self.root):
            try:
                info = sf.info(str(path))
                duration = info.frames / info.samplerate
            except (RuntimeError, sf.LibsndfileError, ZeroDivisionError):
                self.skipped["unreadable"] += 1
                continue
            if duration < min_seconds:
                self.skipped["too_short"] += 1
                continue
            self.files.append(path)
            self.seconds.append(duration)
        if not self.files:
            raise ValueError(f"{self.root}: no usable audio files (wav/flac/ogg of at least {min_seconds} s); "
                             f"skipped {self.skipped}")

    @property
    def num_items(self) -> int:
        return len(self.files)

    @property
    def groups(self) -> list[range]:
        """Each file is its own group (see `EpochSampler`)."""
        return [range(i, i + 1) for i in range(len(self.files))]

    @property
    def hours(self) -> float:
        return sum(self.seconds) / 3600

    def describe(self) -> str:
        return (f"{self.num_items} audio files ({self.hours:.2f} h) under {self.root} as "
                f"{self.features.describe()}; skipped {self.skipped['unreadable']} unreadable and "
                f"{self.skipped['too_short']} too short")

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        """Normalised features [frames, bins] of file `index` (a random segment if long)."""
        try:
            audio = read_segment(self.files[index], self.max_clip_seconds, rng)
        except (RuntimeError, sf.LibsndfileError) as error:
            # a file that passed the start-up check but fails now (changed on disk): a silent clip
            log.warning("cannot read %s (%s); using silence", self.files[index], error)
            audio = torch.zeros(SAMPLE_RATE)
        return self.features(audio)


@dataclass
class _Member:
    shard: int
    offset: int
    size: int
    kind: str  # "logmel" | "flac"


class TarShards:
    """Tar shards written by `write_shards`; see the module docstring."""

    def __init__(self, root_or_files: str | os.PathLike | Sequence[str | os.PathLike], max_clip_seconds: float | None = 10.0,
                 features: Features | None = None):
        if isinstance(root_or_files, (str, os.PathLike)) and Path(root_or_files).is_dir():
            self.shards = sorted(Path(root_or_files).glob("*.tar"))
        elif isinstance(root_or_files, (str, os.PathLike)):
            self.shards = [Path(root_or_files)]
        else:
            self.shards = [Path(p) for p in root_or_files]
        if not self.shards:
            raise FileNotFoundError(f"no .tar shards in {root_or_files}")
        self.max_clip_seconds = max_clip_seconds
        self.features = features or Features()
        self.members: list[_Member] = []
        self._groups: list[range] = []
        for number, shard in enumerate(self.shards):
            start = len(self.members)
            with tarfile.open(shard, "r:") as archive:
                for info in archive:
                    if not info.isfile():
                        continue
                    kind = "logmel" if info.name.endswith(".logmel.npy") else "flac" if info.name.endswith(".flac") else None
                    if kind:
                        self.members.append(_Member(number, info.offset_data, info.size, kind))
            self._groups.append(range(start, len(self.members)))
        if not self.members:
            raise ValueError(f"{self.shards[0].parent}: shards hold no .logmel.npy or .flac members")
        self._handles: dict[int, object] = {}
        self._check_stored_features()

    def _check_stored_features(self) -> None:
        """Log-mel members hold features already: refuse them for a model of another front end or bin count."""
        stored = next((m for m in self.members if m.kind == "logmel"), None)
        if stored is None:
            return
        bins = np.load(io.BytesIO(self._read(stored))).shape[-1]
        if (self.features.kind, self.features.num_mels) != ("logmel", bins):
            raise ValueError(
                f"{self.shards[stored.shard]} stores logmel features ({bins} bins), but the model reads "
                f"{self.features.describe()}: write audio shards for it (hear-msm prepare-shards --kind flac) "
                "or train on the audio folder")

    @property
    def num_items(self) -> int:
        return len(self.members)

    @property
    def groups(self) -> list[range]:
        """One group per shard: `EpochSampler` hands whole shards to each rank."""
        return self._groups

    def describe(self) -> str:
        return (f"{self.num_items} clips in {len(self.shards)} tar shards under {self.shards[0].parent} as "
                f"{self.features.describe()}")

    def _read(self, member: _Member) -> bytes:
        # one open handle per shard and process (DataLoader workers each get their own copy)
        handle = self._handles.get(member.shard)
        if handle is None:
            handle = self._handles[member.shard] = open(self.shards[member.shard], "rb")
        handle.seek(member.offset)
        return handle.read(member.size)

    def __getstate__(self):
        return {**self.__dict__, "_handles": {}}

    def load(self, index: int, rng: np.random.Generator) -> torch.Tensor:
        member = self.members[index]
        payload = self._read(member)
        if member.kind == "logmel":
            return torch.from_numpy(np.load(io.BytesIO(payload)).astype(np.float32))
        data, rate = sf.read(io.BytesIO(payload), dtype="float32", always_2d=True)
        if self.max_clip_seconds is not None and len(data) > self.max_clip_seconds * rate:
            length = int(self.max_clip_seconds * rate)
            start = int(rng.integers(0, len(data) - length + 1))
            data = data[start:start + length]
        return self.features(to_16k_mono(data, rate))


def open_source(path: str | os.PathLike, min_seconds: float = 0.5, max_clip_seconds: float | None = 10.0,
                features: Features | None = None):
    """A folder of .tar shards -> TarShards; any other folder -> AudioFolder; both giving `features`
    (default: the 80-bin log-mel)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".tar":
        return TarShards(path, max_clip_seconds, features)
    if not path.is_dir():
        raise FileNotFoundError(f"training data not found: {path} (expected a folder of audio files or of .tar shards)")
    if any(path.glob("*.tar")):
        return TarShards(path, max_clip_seconds, features)
    return AudioFolder(path, min_seconds, max_clip_seconds, features)


# ------------------------------------------------------------------------------------ sampling
class EpochSampler:
    """Deterministic, shard-aware order of clip indices for one rank.

    Epoch e: the groups (shards, or single files for a folder) are shuffled with seed (seed, e)
    and dealt round-robin to the ranks, so each rank reads only its own shards; each rank then
    shuffles its clips. Every rank's epoch is cut to the same length (the smallest share, whole
    batches) so DDP ranks step in lockstep. `batches(epoch)` lists that rank's batches.
    """

    def __init__(self, groups: list[range], batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        if len(groups) < world_size:
            raise ValueError(f"{len(groups)} shard(s)/file(s) cannot be split across {world_size} ranks; "
                             "write more shards (hear-msm prepare-shards --clips-per-shard)")
        self.groups, self.batch_size, self.seed = groups, batch_size, seed
        self.rank, self.world_size = rank, world_size
        # the smallest share over all epochs is not known in advance; bound it by the worst deal
        sizes = sorted(len(g) for g in groups)
        per_rank = len(groups) // world_size
        smallest_share = sum(sizes[:per_rank])
        self.batches_per_epoch = smallest_share // batch_size
        if self.batches_per_epoch == 0:
            raise ValueError(f"the data holds too few clips per rank ({smallest_share}) for a batch of {batch_size}")

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng((self.seed, epoch, 0x5A3))
        order = rng.permutation(len(self.groups))[: len(self.groups) // self.world_size * self.world_size]
        mine = [i for g in order[self.rank::self.world_size] for i in self.groups[g]]
        rng = np.random.default_rng((self.seed, epoch, 0x5A3, self.rank))
        mine = [mine[i] for i in rng.permutation(len(mine))]
        n = self.batches_per_epoch * self.batch_size
        return [mine[i:i + self.batch_size] for i in range(0, n, self.batch_size)]


class CropDataset(torch.utils.data.Dataset):
    """Map-style view for a DataLoader: item (epoch, index) -> crop [1, num_frames, bins]."""

    def __init__(self, source, num_frames: int, seed: int):
        self.source, self.num_frames, self.seed = source, num_frames, seed

    def __len__(self) -> int:
        return self.source.num_items

    def __getitem__(self, key: tuple[int, int]) -> torch.Tensor:
        epoch, index = key
        rng = np.random.default_rng((self.seed, epoch, index))
        return random_crop(self.source.load(index, rng), self.num_frames, rng, self.source.features.padding_value)[None]


class _ResumableBatchSampler(torch.utils.data.Sampler):
    """Yields [(epoch, index), ...] batches forever, starting at a given (epoch, batch)."""

    def __init__(self, sampler: EpochSampler, start_epoch: int, start_batch: int):
        self.sampler, self.start_epoch, self.start_batch = sampler, start_epoch, start_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, first = self.start_epoch, self.start_batch
        while True:
            for batch in self.sampler.batches(epoch)[first:]:
                yield [(epoch, i) for i in batch]
            epoch, first = epoch + 1, 0


def make_loader(source, batch_size: int, num_frames: int, seed: int, rank: int, world_size: int,
                start_step: int = 0, num_workers: int = 0) -> tuple[torch.utils.data.DataLoader, EpochSampler]:
    """An endless DataLoader of [batch, 1, num_frames, bins] crops starting at global step `start_step`."""
    sampler = EpochSampler(source.groups, batch_size, seed, rank, world_size)
    epoch, batch = divmod(start_step, sampler.batches_per_epoch)
    loader = torch.utils.data.DataLoader(
        CropDataset(source, num_frames, seed), batch_sampler=_ResumableBatchSampler(sampler, epoch, batch),
        num_workers=num_workers, persistent_workers=num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None,
    )
    return loader, sampler


# ------------------------------------------------------------------------------------ writing shards
def _add_member(archive: tarfile.TarFile, name: str, payload: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mtime = 0  # reproducible shards
    archive.addfile(info, io.BytesIO(payload))


def _check_shard_settings(folder: Path, kind: str, clips_per_shard: int, min_seconds: float,
                          segment_seconds: float | None) -> None:
    def finite(value) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)

    if kind not in ("logmel", "flac"):
        raise ValueError(f"kind must be 'logmel' or 'flac', got {kind!r}")
    if isinstance(clips_per_shard, bool) or not isinstance(clips_per_shard, int) or clips_per_shard < 1:
        raise ValueError(f"clips_per_shard must be an integer >= 1, got {clips_per_shard!r}")
    if not finite(min_seconds) or min_seconds < 0:
        raise ValueError(f"min_seconds must be a finite number >= 0, got {min_seconds!r}")
    if segment_seconds is not None:
        if not finite(segment_seconds) or segment_seconds <= 0:
            raise ValueError(f"segment_seconds must be a finite number > 0 (or None to keep files whole, "
                             f"--whole-files), got {segment_seconds!r}")
        if segment_seconds < min_seconds:
            raise ValueError(f"segment_seconds {segment_seconds:g} is shorter than min_seconds {min_seconds:g}: "
                             "every clip would be dropped")
    if folder.is_file():
        raise ValueError(f"{folder} is a file; prepare-shards reads a folder of audio files: "
                         "put it in a folder of its own")


def _clips(files: Iterable[Path], root: Path, min_seconds: float, segment_seconds: float | None,
           skipped: dict) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, 16 kHz mono audio) of every clip: each file cut into `segment_seconds` pieces."""
    for path in files:
        try:
            data, rate = sf.read(str(path), dtype="float32", always_2d=True)
        except (RuntimeError, sf.LibsndfileError):
            skipped["unreadable"] += 1
            continue
        audio = to_16k_mono(data, rate)
        step = len(audio) if segment_seconds is None else int(segment_seconds * SAMPLE_RATE)
        pieces = [audio[i:i + step] for i in range(0, len(audio), step)]
        pieces = [p for p in pieces if len(p) >= min_seconds * SAMPLE_RATE]
        key_base = str(path.relative_to(root).with_suffix("")).replace(os.sep, "__").replace(".", "_")
        for number, piece in enumerate(pieces):
            yield f"{key_base}__{number:04d}", piece


def _add_clip(archive: tarfile.TarFile, key: str, piece: torch.Tensor, kind: str) -> None:
    buffer = io.BytesIO()
    if kind == "logmel":
        np.save(buffer, _Features.logmel(piece).numpy().astype(np.float16))
        _add_member(archive, f"{key}.logmel.npy", buffer.getvalue())
    else:
        sf.write(buffer, piece.numpy(), SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        _add_member(archive, f"{key}.flac", buffer.getvalue())


def write_shards(folder: str | os.PathLike, out_dir: str | os.PathLike, kind: str = "logmel",
                 clips_per_shard: int = 1000, min_seconds: float = 0.5, segment_seconds: float | None = 10.0,
                 progress: bool = True) -> dict:
    """Write an audio folder as tar shards of log-mels (`logmel`) or 16 kHz mono FLAC (`flac`).

    Files longer than `segment_seconds` are split into consecutive segments of that length (a last
    piece shorter than `min_seconds` is dropped; None keeps files whole); each segment is one clip,
    normalised on its own, as the 10 s AudioSet clips are. Each shard is written through
    `atomic_write`, so a killed run leaves only whole shards (and a temporary file the next run
    removes). Returns a summary (clips, shards, hours, skipped counts).
    """
    from tqdm import tqdm

    from .._files import atomic_write, remove_stale_temporaries

    root, out = Path(folder), Path(out_dir)
    _check_shard_settings(root, kind, clips_per_shard, min_seconds, segment_seconds)
    out.mkdir(parents=True, exist_ok=True)
    if any(out.glob("*.tar")):
        raise FileExistsError(f"{out} already holds .tar shards; choose an empty folder")
    remove_stale_temporaries(out)
    source = AudioFolder(root, min_seconds=min_seconds, max_clip_seconds=None)
    log.info(source.describe())
    clips, shards, seconds = 0, 0, 0.0
    files = tqdm(source.files, desc="prepare-shards", unit="file", disable=not progress)
    pending = _clips(files, root, min_seconds, segment_seconds, source.skipped)
    first = next(pending, None)
    while first is not None:
        with atomic_write(out / SHARD_PATTERN.format(shards)) as handle, \
                tarfile.open(fileobj=handle, mode="w", format=tarfile.PAX_FORMAT) as archive:
            for key, piece in itertools.chain([first], itertools.islice(pending, clips_per_shard - 1)):
                _add_clip(archive, key, piece, kind)
                clips += 1
                seconds += len(piece) / SAMPLE_RATE
        shards += 1
        first = next(pending, None)
    files.close()
    return {"clips": clips, "shards": shards, "hours": round(seconds / 3600, 3),
            "skipped": dict(source.skipped), "kind": kind}
