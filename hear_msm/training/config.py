"""The configuration of a pretraining run: fields, defaults (the official recipe), validation, schedule."""
from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

CONFIG_NAME = "train_config.json"

LOG_NAME = "log.csv"

FINAL_DIR = "final"

PRECISIONS = ("auto", "fp32", "bf16", "fp16")

# fields that may differ when resuming: how the run is executed, and where the (same) data now lives
RUNTIME_FIELDS = ("data", "device", "num_workers", "checkpoint_every", "log_every", "progress", "kernel", "export_dtype")

# fields that may also change when resuming, to recover from a divergence (each change is recorded)
ADJUSTABLE_FIELDS = ("base_lr", "min_lr", "warmup_epochs", "warmup_steps", "grad_clip", "precision")


@dataclass
class TrainConfig:
    """One pretraining run. Defaults reproduce the official recipe (AudioSet, 4 GPUs x 256)."""

    model: str = "ssast_tiny"
    model_overrides: dict = field(default_factory=dict)  # builder kwargs, e.g. {"depth": 2}
    data: str = ""  # audio folder or folder of .tar shards
    # schedule: `steps` (optimizer steps) wins over `epochs` when given; likewise for warm-up
    batch_size: int = 1024  # global, split evenly over ranks
    epochs: float = 100.0
    steps: int | None = None  # None: epochs x steps per epoch
    warmup_epochs: float = 10.0
    warmup_steps: int | None = None  # None: warmup_epochs x steps per epoch; must end before the run does
    base_lr: float = 1.5e-4  # lr = base_lr * batch_size / 256
    min_lr: float = 0.0
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 0.0  # max grad norm; 0 = off (official: off)
    # objective
    mask_ratio: float = 0.5
    mask_mode: str = "unstructured"
    masked_only_loss: bool = False
    patch_normalized_targets: bool = False  # not official: targets standardised per patch (MAE)
    discriminative_weight: float = 0.0  # not official: + w * InfoNCE over masked patches (SSAST joint)
    decoder_depth: int = 0  # not official: Transformer blocks between encoder and head, training only (MAE)
    # data
    num_frames: int = 200
    min_seconds: float = 0.5
    max_clip_seconds: float = 10.0
    seed: int = 0
    # execution (may change on --resume)
    precision: str = "auto"  # auto: fp16 on CUDA, fp32 on CPU; bf16 autocast on request
    device: str = "auto"
    num_workers: int = 0
    checkpoint_every: int = 1000
    log_every: int = 10
    progress: bool = True
    kernel: str = "auto"
    export_dtype: str = "float32"

    def __post_init__(self):
        from ..models.encoder import MASKING_MODES

        _check_numbers(self)
        if self.mask_mode not in MASKING_MODES:
            raise ValueError(f"mask_mode must be one of {MASKING_MODES}, got {self.mask_mode!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.export_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"export_dtype must be float32, float16 or bfloat16, got {self.export_dtype!r}")
        _check_architecture(self.model, self.model_overrides)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr:g} is above the peak learning rate {self.lr:g} (= base_lr "
                             f"{self.base_lr:g} x batch_size {self.batch_size} / 256): the cosine decay would rise; "
                             f"set --min-lr at most {self.lr:g}")
        if self.steps is not None and self.warmup_steps is not None:
            _check_warmup(self.warmup_steps, self.steps)

    @property
    def lr(self) -> float:
        return self.base_lr * self.batch_size / 256

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training config fields {unknown}; accepted: {sorted(names)}")
        return cls(**data)


# numeric fields and the smallest accepted value; `True` = that value itself is excluded
_INT_BOUNDS = {"batch_size": (1, False), "steps": (1, False), "warmup_steps": (0, False), "seed": (0, False),
               "num_frames": (1, False), "decoder_depth": (0, False), "num_workers": (0, False),
               "checkpoint_every": (1, False), "log_every": (1, False)}


_FLOAT_BOUNDS = {"epochs": (0.0, True), "warmup_epochs": (0.0, False), "base_lr": (0.0, True), "min_lr": (0.0, False),
                 "weight_decay": (0.0, False), "beta1": (0.0, False), "beta2": (0.0, False), "grad_clip": (0.0, False),
                 "mask_ratio": (0.0, True), "discriminative_weight": (0.0, False), "min_seconds": (0.0, False),
                 "max_clip_seconds": (0.0, True)}


_BELOW_ONE = ("beta1", "beta2", "mask_ratio")


def _check_numbers(config: TrainConfig) -> None:
    """Types and ranges of the numeric fields (None is accepted where the field allows it)."""
    for name, (low, exclusive) in {**_INT_BOUNDS, **_FLOAT_BOUNDS}.items():
        value = getattr(config, name)
        if value is None and name in ("steps", "warmup_steps"):
            continue
        kinds = int if name in _INT_BOUNDS else (int, float)
        if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value):
            kind = "an integer" if name in _INT_BOUNDS else "a finite number"
            raise ValueError(f"{name} must be {kind}, got {value!r}")
        if value < low or exclusive and value == low:
            raise ValueError(f"{name} must be {'>' if exclusive else '>='} {low:g}, got {value!r}")
        if name in _BELOW_ONE and value >= 1:
            raise ValueError(f"{name} must be below 1, got {value!r}")


@functools.lru_cache(maxsize=None)
def _preset_fields(model: str) -> dict[str, object]:
    """{field: preset value} of an architecture's config, but `arch` (built on the meta device: no memory)."""
    from ..models.registry import model_builder

    with torch.device("meta"):
        config = model_builder(model)().config  # ValueError naming the known models
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "arch"}


def _check_architecture(model: str, overrides: dict) -> None:
    """`model` is registered and `overrides` are fields of its config with values of the field's type
    (ranges are the config's to check when the model is built)."""
    if not isinstance(model, str):
        raise ValueError(f"model must be an architecture name, got {model!r}")
    preset = _preset_fields(model)
    if not isinstance(overrides, dict):
        raise ValueError(f"model_overrides must be a dict of {model} config fields, got {overrides!r}")
    unknown = sorted(set(overrides) - set(preset))
    if unknown:
        raise ValueError(f"--override {', '.join(unknown)}: not a field of {model}'s config; accepted: "
                         f"{', '.join(preset)}")
    for name, value in overrides.items():
        kinds = (int, float) if isinstance(preset[name], float) else type(preset[name])
        if isinstance(value, bool) is not isinstance(preset[name], bool) or not isinstance(value, kinds):
            kind = {bool: "true or false", int: "an integer", float: "a number"}.get(type(preset[name]), "a string")
            raise ValueError(f"--override {name}={value!r}: {model}'s {name} is {kind} (preset {preset[name]!r})")


def _check_warmup(warmup: int, total: int, derived: str = "") -> None:
    if warmup >= total:
        raise ValueError(f"the warm-up ({warmup} steps{derived}) must be shorter than the run ({total} steps), or the "
                         f"learning rate never reaches its peak nor decays: set --warmup-steps below {total} "
                         "(0: no warm-up)")


def schedule_steps(config: TrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """(total optimizer steps, warm-up steps) of `config` on data of `steps_per_epoch` batches."""
    total = config.steps if config.steps is not None else max(1, round(config.epochs * steps_per_epoch))
    if config.warmup_steps is not None:
        _check_warmup(config.warmup_steps, total)
        return total, config.warmup_steps
    warmup = round(config.warmup_epochs * steps_per_epoch)
    _check_warmup(warmup, total, f" = warmup_epochs {config.warmup_epochs:g} x {steps_per_epoch} steps per epoch")
    return total, warmup


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def resume_changes(saved: TrainConfig, config: TrainConfig) -> dict[str, tuple]:
    """{field: (run's value, new value)} of the fields a resume may change; ValueError for any other."""
    fixed = [f.name for f in dataclasses.fields(TrainConfig) if f.name not in RUNTIME_FIELDS + ADJUSTABLE_FIELDS
             and getattr(saved, f.name) != getattr(config, f.name)]
    if fixed:
        raise ValueError(
            f"--resume: {', '.join(f'{n}={getattr(config, n)!r} (run has {getattr(saved, n)!r})' for n in fixed)} "
            f"differ from the run being resumed; only the schedule ({', '.join(ADJUSTABLE_FIELDS)}) and "
            f"execution settings ({', '.join(RUNTIME_FIELDS)}) may change"
        )
    return {f.name: (getattr(saved, f.name), getattr(config, f.name)) for f in dataclasses.fields(TrainConfig)
            if getattr(saved, f.name) != getattr(config, f.name)}


# ------------------------------------------------------------------------------------ the loop
def check_data_path(data: str) -> None:
    """Refuse a single audio file early: batches need many clips (a folder, or .tar shards)."""
    from .data import AUDIO_SUFFIXES

    path = Path(data)
    if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES:
        raise ValueError(
            f"--data {path} is a single audio file; pretraining draws batches of different clips from a folder of "
            "audio files or of .tar shards (a single .tar shard is accepted). To train on one long recording, put "
            "it in a folder and cut it into 10 s clips: hear-msm prepare-shards FOLDER SHARDS, then --data SHARDS"
        )
