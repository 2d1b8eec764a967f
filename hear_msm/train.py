"""Masked spectrogram pretraining, on one CPU or under `torchrun` on many GPUs.

    hear-msm pretrain --model ssam_tiny --data AUDIO_OR_SHARDS --out RUN [--steps N --batch-size B]
    torchrun --nproc-per-node=4 -m hear_msm.cli pretrain --model ssam_tiny --data SHARDS --out RUN
    hear-msm pretrain --out RUN --resume          # continue a stopped or killed run
    hear-msm plot-loss RUN                        # RUN/loss.png from RUN/log.csv

The recipe (defaults = the official one, Yadav et al. after SSAST): random 2 s crops of per-clip
normalised log-mel; 50% of the 250 patches masked (`unstructured`, or whole 40 ms columns with
`timestep`) and replaced by the mask token, the encoder sees all tokens; MSE against the
normalised patch values over all patches (`masked_only_loss` for the masked ones); AdamW
betas (0.9, 0.95), weight decay 0.05 except biases, norms, positions and the cls/mask tokens;
lr = base_lr * batch / 256, linear warm-up then cosine decay; fp16 autocast + GradScaler on CUDA.

DDP is detected from the torchrun environment (WORLD_SIZE > 1): nccl on GPU, gloo on CPU; each
rank reads its own shards (`_data.EpochSampler`); only rank 0 logs and writes. A run folder holds
`.hear_msm_run.json` (the marker: `--out` must be new, empty or marked; see `_run_folder`),
`.hear_msm_run.lock` (held by the running process), `train_config.json`, `checkpoint.pt` (every
`checkpoint_every` steps and at the end: model, optimizer, scheduler, scaler, step, RNG states,
sampler position), `log.csv` and, when finished, `final/` (config.json + model.safetensors,
loadable with `hear_msm.load_model`). Every file is replaced atomically (`_files.atomic_write`).
Every random draw (init, crops, order, masks) is a function of (seed, step, rank), so a resumed run
ends with the same weights as an uninterrupted one on a deterministic device.

All arguments are checked before training starts (`TrainConfig.__post_init__`, `schedule_steps`):
steps, epochs and batch positive, warm-up non-negative and shorter than the run, min_lr at most
the peak lr, model overrides fields of the architecture's config. A NaN/Inf loss, or non-finite
weights when a checkpoint is due, stops the run with the last (finite) checkpoint untouched and a
`--resume` command to continue it; a resume may change the schedule (`ADJUSTABLE_FIELDS`: lr,
min_lr, warm-up, clipping, precision) and execution settings, nothing else, and each change is
logged, recorded in the marker and named in the model card.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import io
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from . import _run_folder
from ._files import atomic_write, write_bytes_atomic, write_text_atomic

CHECKPOINT_NAME = "checkpoint.pt"
_CHECKPOINT_KEYS = ("model", "optimizer", "scheduler", "scaler", "step", "config", "rng")
CONFIG_NAME = "train_config.json"
LOG_NAME = "log.csv"
FINAL_DIR = "final"
LOG_FIELDS = ["step", "epoch", "loss", "lr", "clips_per_s", "elapsed_s"]
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
        from .models.encoder import MASKING_MODES

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
    from .models.registry import model_builder

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


class TrainingDiverged(RuntimeError):
    """The loss became NaN or Inf; the last good checkpoint is left as it was."""


@dataclass
class TrainResult:
    model: nn.Module  # the trained (unwrapped) model, on every rank
    step: int
    loss: float
    export_dir: Path | None  # RUN/final on rank 0, None elsewhere


# ------------------------------------------------------------------------------------ pieces
def build_model(config: TrainConfig):
    from .models.registry import model_builder

    return model_builder(config.model)(kernel=config.kernel, **config.model_overrides)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay matrices only: biases, norm scales, 1-D params (Mamba's D, xLSTM gates/skips),
    positions, cls/mask tokens and Mamba's A_log (mamba-ssm's `_no_weight_decay`) are exempt."""
    exempt_names = ("pos_embed", "cls_token", "mask_token", "A_log")
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        exempt = param.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in exempt_names \
            or getattr(param, "_no_weight_decay", False)
        (no_decay if exempt else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_factor(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class _Objective(nn.Module):
    """Model plus the training-only decoder (if any), so that DDP's forward, its gradient hooks and
    the optimizer cover both; only `model` is exported."""

    def __init__(self, model, config: "TrainConfig"):
        super().__init__()
        from .models.transformer import build_training_decoder

        self.model = model
        self.decoder = build_training_decoder(model.config.embed_dim, config.decoder_depth, model.config.norm_eps) \
            if config.decoder_depth > 0 else None
        self.options = dict(masked_only=config.masked_only_loss,
                            patch_normalized_targets=config.patch_normalized_targets,
                            discriminative_weight=config.discriminative_weight)

    def forward(self, spectrogram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.model.reconstruction_loss(spectrogram, mask, decoder=self.decoder, **self.options)


@dataclass
class _Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def _init_distributed(device_name: str) -> tuple[_Dist, torch.device]:
    """Rank and device from the torchrun environment; process group nccl (GPU) or gloo (CPU)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    info = _Dist(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))
    if device_name == "auto":
        device_name = f"cuda:{info.local_rank}" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(device_name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu or cuda[:index], got {device_name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device_name!r}: no CUDA GPU is available here; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", info.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return info, device


def _rng_state() -> dict:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                       "has_gauss": int(has_gauss), "cached": float(cached)}}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: Path, payload: dict) -> None:
    """torch.save through `atomic_write`: a failed save leaves the previous checkpoint as it was."""
    with atomic_write(path) as handle:
        torch.save(payload, handle)


def load_checkpoint(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path}")
    from ._checkpoint import load_torch_file

    # untrusted like any .pth: no pickle code runs and every tensor record is checked against its
    # zip entry before a tensor is built on it (torch.load trusts the sizes a file declares)
    return load_torch_file(path)


def _mask_generator(seed: int, step: int, rank: int) -> torch.Generator:
    generator = torch.Generator()
    # SeedSequence, not hash(): Python's string hashing differs between processes
    generator.manual_seed(int(np.random.SeedSequence((seed, step, rank, 0x3A5C)).generate_state(1, np.uint64)[0] >> 1))
    return generator


def _autocast(device: torch.device, precision: str):
    if precision == "fp16":
        return torch.autocast(device.type, dtype=torch.float16)
    if precision == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _start_log(path: Path, keep_until: int | None) -> None:
    """Rewrite the log (atomically) keeping the rows up to step `keep_until`: on resume the rows after
    the checkpoint (the killed tail) go; a new run (None) starts an empty log, whatever an earlier
    run that stopped before its first checkpoint left."""
    rows, damaged = [], 0
    if keep_until is not None and path.is_file():
        with open(path, newline="") as handle:
            for row in csv.DictReader(handle):
                try:
                    keep = int(row["step"]) <= keep_until
                except (KeyError, TypeError, ValueError):
                    damaged += 1
                    continue
                if keep:
                    rows.append({name: row.get(name, "") for name in LOG_FIELDS})
    if damaged:
        _log(f"{path}: dropped {damaged} unreadable row(s)")
    text = io.StringIO()
    writer = csv.DictWriter(text, LOG_FIELDS)
    writer.writeheader()
    writer.writerows(rows)
    write_bytes_atomic(path, text.getvalue().encode("utf-8"))


def read_run_checkpoint(path: Path) -> dict:
    """`load_checkpoint`, with errors a user can act on, and a check that it is a checkpoint of this trainer."""
    try:
        state = load_checkpoint(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no checkpoint to resume from: {path} (a run that stopped before its first "
                                "checkpoint starts again without --resume)") from None
    except Exception as error:  # noqa: BLE001 - any reader failure means the same to the user
        # torch's own messages suggest weights_only=False, which would run the file's pickle code: never pass that on
        detail = str(error).strip().splitlines()[0] if str(error).strip() else ""
        detail = type(error).__name__ if not detail or "weights_only" in str(error) else detail
        raise ValueError(f"{path} is not a readable hear-msm pretrain checkpoint ({detail}); it is damaged or was "
                         "written by another program. Restore it from a copy, or start a new run in another --out"
                         ) from None
    missing = [key for key in _CHECKPOINT_KEYS if not isinstance(state, dict) or key not in state]
    if missing:
        raise ValueError(f"{path} is not a hear-msm pretrain checkpoint: it has no {', '.join(missing)}")
    if not isinstance(state["step"], int) or state["step"] < 0 or not isinstance(state["config"], dict):
        raise ValueError(f"{path} is not a hear-msm pretrain checkpoint: its step or config is invalid")
    if not all(isinstance(state.get(key, 0.0), (int, float)) for key in ("loss", "elapsed_s")):
        raise ValueError(f"{path} is not a hear-msm pretrain checkpoint: loss or elapsed_s is not a number")
    try:
        TrainConfig.from_dict(state["config"])
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: the training config saved in it is invalid: {error}") from None
    return state


def _non_finite(modules: list[nn.Module], optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of parameters, buffers or optimizer moments holding NaN or Inf."""
    bad = [name for module in modules for name, value in module.state_dict().items()
           if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    for index, moments in enumerate(optimizer.state.values()):
        bad += [f"optimizer state {index}.{key}" for key, value in moments.items()
                if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())]
    return bad


def _log(message: str) -> None:
    print(f"[hear-msm pretrain] {message}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------ the loop
def _check_data_path(data: str) -> None:
    """Refuse a single audio file early: batches need many clips (a folder, or .tar shards)."""
    from ._data import AUDIO_SUFFIXES

    path = Path(data)
    if path.is_file() and path.suffix.lower() in AUDIO_SUFFIXES:
        raise ValueError(
            f"--data {path} is a single audio file; pretraining draws batches of different clips from a folder of "
            "audio files or of .tar shards (a single .tar shard is accepted). To train on one long recording, put "
            "it in a folder and cut it into 10 s clips: hear-msm prepare-shards FOLDER SHARDS, then --data SHARDS"
        )


def _resume_changes(saved: TrainConfig, config: TrainConfig) -> dict[str, tuple]:
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


def _divergence_advice(config: TrainConfig, out: Path, checkpoint_step: int | None, precision: str) -> str:
    """What to do after a divergence, as flags that --resume (or a new run) accepts."""
    import shlex

    flags = f"--base-lr {config.base_lr / 2:g} --grad-clip {config.grad_clip / 2 if config.grad_clip else 1.0:g}"
    also = "; a longer --warmup-steps" + (" or --precision fp32" if precision != "fp32" else "") + " also help"
    if checkpoint_step is None:
        return f"No checkpoint was written yet: run the same command again (same --out) with {flags}{also}."
    return (f"Last good checkpoint: {out / CHECKPOINT_NAME} (step {checkpoint_step}, finite). Continue from it with: "
            f"hear-msm pretrain --out {shlex.quote(str(out))} --resume {flags}{also}.")


def train(config: TrainConfig, out: str | os.PathLike, resume: bool = False) -> TrainResult:
    """Run (or resume) pretraining into the run folder `out` (written by rank 0 only).

    `out` must be new, empty or a run folder of this trainer (`_run_folder`); rank 0 holds its lock
    until it returns. On resume the schedule (ADJUSTABLE_FIELDS) may differ from the run's; the
    changes are logged, recorded in the run's marker and named in the model card.
    Raises TrainingDiverged on a NaN/Inf loss, or on non-finite weights when a checkpoint is due;
    the last checkpoint stays as it was, and it is finite.
    """
    out = Path(out)
    _check_data_path(config.data)
    info, device = _init_distributed(config.device)
    if not info.main:
        return _train(config, out, resume, info, device, None)
    with _run_folder.claim(out, resume) as folder:
        return _train(config, out, resume, info, device, folder)


def _train(config: TrainConfig, out: Path, resume: bool, info: _Dist, device: torch.device,
           folder: _run_folder.RunFolder | None) -> TrainResult:
    from ._data import make_loader, open_source

    checkpoint_path = out / CHECKPOINT_NAME
    state, changes = None, {}
    if resume:
        state = read_run_checkpoint(checkpoint_path)
        changes = _resume_changes(TrainConfig.from_dict(state["config"]), config)
    elif checkpoint_path.exists():
        raise FileExistsError(f"{out} already holds a run ({CHECKPOINT_NAME}); pass --resume to continue it "
                              "or choose another --out")

    precision = config.precision
    if precision == "auto":
        precision = "fp16" if device.type == "cuda" else "fp32"
    if config.batch_size % info.world_size:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {info.world_size} ranks")
    local_batch = config.batch_size // info.world_size

    source = open_source(config.data, config.min_seconds, config.max_clip_seconds)
    torch.manual_seed(config.seed)  # identical init on every rank (DDP also broadcasts rank 0's)
    try:
        model = build_model(config)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{config.model} with overrides {config.model_overrides}: {error}") from None
    objective = _Objective(model, config).to(device)  # the decoder (if any) is drawn after the model
    objective.train()
    decoder = objective.decoder
    loss_module = objective
    if info.world_size > 1:
        loss_module = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)

    start_step = int(state["step"]) if state else 0
    loader, sampler = make_loader(source, local_batch, config.num_frames, config.seed, info.rank,
                                  info.world_size, start_step, config.num_workers)
    steps_per_epoch = sampler.batches_per_epoch
    total, warmup = schedule_steps(config, steps_per_epoch)

    optimizer = torch.optim.AdamW(parameter_groups(objective, config.weight_decay), lr=config.lr,
                                  betas=(config.beta1, config.beta2))
    min_ratio = config.min_lr / config.lr
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, warmup, total, min_ratio))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    elapsed_before, last_loss = 0.0, float("nan")
    if state:
        _restore(state, checkpoint_path, model, decoder, optimizer, scheduler, scaler)
        if changes.keys() & set(ADJUSTABLE_FIELDS):
            # the restored optimizer and scheduler carry the run's old peak lr; the new schedule takes over here
            scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
            for group in optimizer.param_groups:
                group["initial_lr"] = config.lr
                group["lr"] = config.lr * lr_factor(start_step, warmup, total, min_ratio)
        elapsed_before = float(state.get("elapsed_s", 0.0))
        last_loss = float(state.get("loss", float("nan")))  # a finished run resumed takes no step
        del state

    if info.main:
        write_text_atomic(out / CONFIG_NAME, json.dumps(config.to_dict(), indent=2) + "\n")
        _start_log(out / LOG_NAME, start_step if resume else None)
        if resume:
            folder.record_resume(start_step, changes)
        else:
            folder.start_new_run()  # no resume history of an earlier run that never checkpointed
        _log(source.describe())
        _log(f"{config.model} on {device} x{info.world_size} ({precision}); batch {config.batch_size} "
             f"({local_batch}/rank), {steps_per_epoch} steps/epoch, {total} steps ({total / steps_per_epoch:.2f} "
             f"epochs), warm-up {warmup}, lr {config.lr:.3g}" + (f"; resuming at step {start_step}" if resume else ""))
        if changes:
            _log("changed on resume: " + ", ".join(f"{name} {old!r} -> {new!r}"
                                                   for name, (old, new) in changes.items()))

    last_checkpoint = start_step if resume else None

    def checkpoint(step: int, elapsed: float, last_loss: float) -> None:
        nonlocal last_checkpoint
        bad = _non_finite([model] + ([decoder] if decoder is not None else []), optimizer)
        if bad:  # the weights are identical on every rank, so every rank stops here
            raise TrainingDiverged(
                f"weights became non-finite by step {step} ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}; "
                f"loss {last_loss:.4g}): training stopped without saving them. "
                + _divergence_advice(config, out, last_checkpoint, precision))
        if not info.main:
            return
        epoch, batch = divmod(step, steps_per_epoch)
        save_checkpoint(checkpoint_path, {
            "model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "scaler": scaler.state_dict(), "step": step, "total_steps": total, "config": config.to_dict(),
            "rng": _rng_state(), "sampler": {"epoch": epoch, "batch": batch, "steps_per_epoch": steps_per_epoch},
            "world_size": info.world_size, "elapsed_s": elapsed, "loss": last_loss,
            # kept apart from "model" so that "model" stays in the export (authors') format
            **({"decoder": decoder.state_dict()} if decoder is not None else {}),
        })
        last_checkpoint = step

    log_file = None
    progress = None
    if info.main:
        log_file = open(out / LOG_NAME, "a", newline="")  # rows are appended; _start_log wrote the header
        writer = csv.DictWriter(log_file, LOG_FIELDS)
        if config.progress:
            from tqdm import tqdm

            progress = tqdm(total=total, initial=start_step, desc=f"pretrain {config.model}", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    step = start_step
    window_start, window_clips = time.perf_counter(), 0
    run_start = time.perf_counter()
    batches = iter(loader)
    try:
        while step < total:
            spectrogram = next(batches).to(device, non_blocking=True)
            mask = model.sample_mask(spectrogram.shape[0], config.mask_ratio, config.mask_mode,
                                     generator=_mask_generator(config.seed, step, info.rank)).to(device)
            with _autocast(device, precision):
                loss = loss_module(spectrogram, mask)
            value = loss.detach().float().clone()
            if info.world_size > 1:
                dist.all_reduce(value)
                value /= info.world_size
            value = value.item()
            if not math.isfinite(value):
                raise TrainingDiverged(f"loss is {value} at step {step}: training stopped. "
                                       + _divergence_advice(config, out, last_checkpoint, precision))
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if config.grad_clip > 0:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(objective.parameters(), config.grad_clip)
            lr_used = optimizer.param_groups[0]["lr"]
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            last_loss = value
            window_clips += config.batch_size
            elapsed = elapsed_before + time.perf_counter() - run_start
            if info.main and (step % config.log_every == 0 or step == total):
                now = time.perf_counter()
                rate = window_clips / max(now - window_start, 1e-9)
                writer.writerow({"step": step, "epoch": f"{step / steps_per_epoch:.4f}", "loss": f"{value:.6f}",
                                 "lr": f"{lr_used:.6g}", "clips_per_s": f"{rate:.2f}",
                                 "elapsed_s": f"{elapsed:.1f}"})
                log_file.flush()
                window_start, window_clips = now, 0
                if progress is not None:
                    progress.set_postfix(loss=f"{value:.4f}", clips_s=f"{rate:.1f}", refresh=False)
            if progress is not None:
                progress.update(1)
            if step % config.checkpoint_every == 0 or step == total:
                checkpoint(step, elapsed, value)
    finally:
        if progress is not None:
            progress.close()
        if log_file is not None:
            log_file.close()
        if info.world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    if not info.main:
        return TrainResult(model, step, last_loss, None)
    final = export(model, out, config, total, last_loss, elapsed_before + time.perf_counter() - run_start, source,
                   folder.marker.get("resumes", []))
    _log(f"done: {total} steps, final loss {last_loss:.4f}, "
         f"{(elapsed_before + time.perf_counter() - run_start) / 60:.1f} min; weights in {final}")
    return TrainResult(model, step, last_loss, final)

def _restore(state: dict, path: Path, model, decoder, optimizer, scheduler, scaler) -> None:
    """Load a checkpoint's states; ValueError if its tensors do not fit the run's model."""
    try:
        model.load_state_dict(state["model"])
        if decoder is not None:
            decoder.load_state_dict(state["decoder"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # empty when the run used no GradScaler (any precision but fp16)
            scaler.load_state_dict(state["scaler"])
        _set_rng_state(state["rng"])
    except (KeyError, RuntimeError, TypeError, ValueError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"{path}: cannot restore the run from it ({first})") from None


def _schedule_changes(resumes: list[dict]) -> str:
    """'Resumed at step 3 with base_lr 0.01 -> 0.005.' for each resume that changed the schedule."""
    lines = []
    for entry in resumes:
        changed = {k: v for k, v in entry.get("changed", {}).items() if k in ADJUSTABLE_FIELDS}
        if changed:
            lines.append(f"Resumed at step {entry['step']} with "
                         + ", ".join(f"{name} {old} -> {new}" for name, (old, new) in changed.items()) + ".")
    return "".join(line + "\n\n" for line in lines)


def export(model, out: Path, config: TrainConfig, steps: int, loss: float, seconds: float, source=None,
           resumes: list[dict] = ()) -> Path:
    """Write RUN/final in the hear_msm weights format (config.json + model.safetensors + card).

    resumes: the run marker's resume history; schedule changes made on resume are named in the card.
    """
    from ._weights import EXPORT_DTYPES, save_pretrained

    dtype = EXPORT_DTYPES[config.export_dtype]
    card = (
        f"---\nlibrary_name: hear_msm\ntags: [audio, hear, self-supervised, {model.config.family}]\n---\n\n"
        f"# {model.config.arch} pretrained with hear-msm pretrain\n\n"
        f"Data: {source.describe() if source is not None else config.data}.\n\n"
        f"Budget: {steps} steps x batch {config.batch_size} = {steps * config.batch_size} clips of "
        f"{config.num_frames / 100:.0f} s; wall time {seconds / 60:.1f} min; final training loss {loss:.4f}.\n\n"
        f"Recipe: mask {config.mask_mode} {config.mask_ratio}, loss over "
        f"{'masked' if config.masked_only_loss else 'all'} patches"
        f"{' (targets standardised per patch)' if config.patch_normalized_targets else ''}"
        f"{f' + {config.discriminative_weight:g} x InfoNCE' if config.discriminative_weight else ''}"
        f"{f', through a {config.decoder_depth}-block training-only decoder' if config.decoder_depth else ''}, AdamW lr {config.lr:.3g} "
        f"(base {config.base_lr:g} x {config.batch_size}/256), wd {config.weight_decay}, seed {config.seed}.\n\n"
        f"{_schedule_changes(list(resumes))}"
        "```python\nimport hear_msm\nmodel = hear_msm.load_model(\"path/to/this/folder\")\n```\n"
    )
    target = out / FINAL_DIR
    save_pretrained(model, target, dtype=dtype, overwrite=True, model_card=card)
    write_text_atomic(target / "README.md", card)  # save_pretrained keeps an existing card: a rerun replaces its own
    return target


# ------------------------------------------------------------------------------------ plotting
def plot_loss(run: str | os.PathLike, output: str | os.PathLike | None = None, title: str | None = None) -> Path:
    """RUN/log.csv -> PNG of the training loss (raw and smoothed) against step."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("plot-loss needs matplotlib: pip install 'hear_msm[plot]'") from None
    run = Path(run)
    log_path = run / LOG_NAME if run.is_dir() else run
    if not log_path.is_file():
        raise FileNotFoundError(f"no training log at {log_path}")
    with open(log_path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise ValueError(f"{log_path} has no logged steps yet")
    steps = np.array([int(r["step"]) for r in rows])
    loss = np.array([float(r["loss"]) for r in rows])
    window = max(1, len(loss) // 20)
    smooth = np.convolve(loss, np.ones(window) / window, mode="valid")
    figure, axis = plt.subplots(figsize=(6, 3.5), dpi=100)
    axis.plot(steps, loss, color="0.75", linewidth=0.8, label="loss")
    if window > 1:
        axis.plot(steps[window - 1:], smooth, color="C0", linewidth=1.5, label=f"mean of {window} logs")
    axis.set_xlabel("step")
    axis.set_ylabel("reconstruction MSE")
    axis.set_title(title or run.name)
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    output = Path(output) if output else (run if run.is_dir() else run.parent) / "loss.png"
    try:
        with atomic_write(output) as handle:
            figure.savefig(handle, format=output.suffix[1:].lower() or "png")
    finally:
        plt.close(figure)
    return output


# ------------------------------------------------------------------------------------ CLI
def _parse_override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep:
        raise ValueError(f"--override expects KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


# CLI flag -> TrainConfig field; every flag defaults to None so --resume can tell what was given
_FLAGS = {
    "model": str, "data": str, "batch_size": int, "epochs": float, "steps": int, "warmup_epochs": float,
    "warmup_steps": int, "base_lr": float, "min_lr": float, "weight_decay": float, "grad_clip": float,
    "mask_ratio": float, "mask_mode": str, "seed": int, "precision": str, "device": str,
    "num_workers": int, "checkpoint_every": int, "log_every": int, "kernel": str, "export_dtype": str,
    "min_seconds": float, "max_clip_seconds": float, "discriminative_weight": float, "decoder_depth": int,
}


def _cmd_pretrain(args) -> int:
    given = {name: getattr(args, name) for name in _FLAGS if getattr(args, name) is not None}
    if args.masked_only_loss:
        given["masked_only_loss"] = True
    if args.patch_normalized_targets:
        given["patch_normalized_targets"] = True
    if args.no_progress:
        given["progress"] = False
    if args.override:
        given["model_overrides"] = dict(_parse_override(o) for o in args.override)
    out = Path(args.out)
    if args.resume:
        _run_folder.check(out, resume=True)
        saved = read_run_checkpoint(out / CHECKPOINT_NAME)["config"]
        config = TrainConfig.from_dict({**saved, **given})
    else:
        missing = [flag for flag in ("model", "data") if flag not in given]
        if missing:
            raise ValueError(f"a new run needs {' and '.join('--' + m for m in missing)} (or --resume)")
        config = TrainConfig.from_dict(given)
    try:
        train(config, out, resume=args.resume)
    except TrainingDiverged as error:
        print(f"hear-msm pretrain: stopped: {error}", file=sys.stderr)
        return 3
    return 0


def _cmd_prepare_shards(args) -> int:
    from ._data import write_shards

    if args.whole_files and args.segment_seconds is not None:
        raise ValueError("--whole-files keeps files unsplit; it cannot be combined with --segment-seconds")
    segment_seconds = None if args.whole_files else 10.0 if args.segment_seconds is None else args.segment_seconds
    summary = write_shards(args.audio_dir, args.out_dir, kind=args.kind, clips_per_shard=args.clips_per_shard,
                           min_seconds=args.min_seconds, segment_seconds=segment_seconds)
    write_text_atomic(Path(args.out_dir) / "shards.json", json.dumps(summary, indent=2) + "\n")
    print(f"wrote {summary['shards']} shard(s) of {summary['kind']} to {args.out_dir}: {summary['clips']} clips, "
          f"{summary['hours']} h; skipped {summary['skipped']['unreadable']} unreadable, "
          f"{summary['skipped']['too_short']} too short", file=sys.stderr)
    return 0


def _cmd_plot_loss(args) -> int:
    print(plot_loss(args.run_dir, args.out, args.title))
    return 0


def register_commands(subparsers) -> None:
    """Add `pretrain`, `prepare-shards` and `plot-loss` to the `hear-msm` parser."""
    import hear_msm

    p = subparsers.add_parser("pretrain", help="masked spectrogram pretraining (one CPU, or torchrun for DDP)",
                              description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, log.csv, final/)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--model", choices=hear_msm.list_models())
    p.add_argument("--data", help="folder of audio files (wav/flac/ogg) or of .tar shards, or one .tar shard "
                                  "(not a single audio file: cut a long recording into clips with prepare-shards)")
    defaults = TrainConfig()
    helps = {
        "batch_size": "global batch (split over ranks)", "steps": "optimizer steps (wins over --epochs)",
        "epochs": "epochs over the data",
        "warmup_steps": "warm-up steps (wins over --warmup-epochs; fewer than the run's)",
        "min_lr": "end of the cosine decay (at most the peak lr)",
        "base_lr": "lr = base_lr * batch / 256", "mask_mode": "unstructured | timestep",
        "precision": "auto (fp16 on CUDA, fp32 on CPU) | fp32 | bf16 | fp16", "device": "auto | cpu | cuda[:i]",
        "kernel": "per family: SSAST auto|reference; SSAM, SSAMBA auto|cuda|cpu|reference; AxLSTM auto|cpu|fused|reference",
        "export_dtype": "dtype of final/model.safetensors",
        "min_seconds": "skip shorter files", "max_clip_seconds": "read longer files as a random segment this long",
        "discriminative_weight": "add w x InfoNCE over masked patches (SSAST's joint objective; not the official recipe)",
        "decoder_depth": "Transformer blocks between encoder and prediction head, used in training and dropped at "
                         "export (MAE's decoder; not the official recipe)",
    }
    for name, kind in _FLAGS.items():
        if name in ("model", "data"):
            continue
        default = getattr(defaults, name)
        if default is None:  # steps, warmup_steps: derived from the epoch counts
            default = "from --" + name.replace("steps", "epochs").replace("_", "-")
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None,
                       help=f"{helps.get(name, '')} (default {default})".strip())
    p.add_argument("--masked-only-loss", action="store_true", help="MSE over masked patches only")
    p.add_argument("--patch-normalized-targets", action="store_true",
                   help="standardise each target patch by its own mean and std (MAE-style; not the official recipe)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log.csv is still written)")
    p.add_argument("--override", action="append", metavar="KEY=VALUE",
                   help="architecture field for the model builder, e.g. depth=2 (repeatable)")
    p.set_defaults(run=_cmd_pretrain)

    p = subparsers.add_parser("prepare-shards", help="audio folder -> webdataset-style tar shards")
    p.add_argument("audio_dir")
    p.add_argument("out_dir")
    p.add_argument("--kind", default="logmel", choices=["logmel", "flac"],
                   help="logmel: normalised float16 log-mels (fast to train on); flac: 16 kHz mono audio")
    p.add_argument("--clips-per-shard", type=int, default=1000)
    p.add_argument("--min-seconds", type=float, default=0.5, help="skip clips shorter than this")
    p.add_argument("--segment-seconds", type=float, default=None,
                   help="split longer files into clips this long (default 10; must be > 0)")
    p.add_argument("--whole-files", action="store_true", help="never split files: one clip per file")
    p.set_defaults(run=_cmd_prepare_shards)

    p = subparsers.add_parser("plot-loss", help="draw RUN/log.csv to a PNG (needs hear_msm[plot])")
    p.add_argument("run_dir", metavar="RUN", help="run folder or its log.csv")
    p.add_argument("--out", help="PNG path (default RUN/loss.png)")
    p.add_argument("--title")
    p.set_defaults(run=_cmd_plot_loss)
