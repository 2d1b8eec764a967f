"""The configuration of a pretraining run: fields, recipes (defaults per family), validation, schedule."""
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
ADJUSTABLE_FIELDS = ("base_lr", "min_lr", "warmup_epochs", "warmup_steps", "lr_schedule", "grad_clip", "precision")

LR_SCHEDULES = ("cosine", "constant")

# training-only decoders (`--decoder`): "transformer" = `decoder_depth` Transformer blocks of the encoder's
# width before its head; "mwmha" / "mae" = MW-MAE's decoder (384-d, 8 heads, depth 4 unless
# decoder_embed_dim / decoder_depth say otherwise) with its multi-window heads or all-global ones.
# "auto" (the default) is "transformer" when decoder_depth > 0, else "none", as decoder_depth alone meant.
DECODERS = ("none", "transformer", "mwmha", "mae")

# the fields a `--decoder` brings with it when a run does not set them (`TrainConfig.for_model`):
# MW-MAE's loss is over the masked patches
DECODER_RECIPES: dict[str, dict[str, object]] = {"mwmha": {"masked_only_loss": True}, "mae": {"masked_only_loss": True}}

# Each family's pretraining recipe: the value of every field a run does not set (`TrainConfig.for_model`,
# `hear-msm pretrain`). Fields a recipe does not name keep the dataclass defaults, the recipe of Yadav
# et al. (SSAST / SSAM / AxLSTM). Every run's crops are `num_frames` = the model's input length.
RECIPES: dict[str, dict[str, object]] = {
    # SSAMBA (Shams et al.), as SiavashShams/ssamba runs it: src/pretrain/run_mask_patch_amba.sh (batch 64,
    # lr 1e-4, 10 epochs, drop path 0.1), src/run_amba.py (400 masked patches by default, the Hub
    # files' "_400"; cluster masking since 128 mel bins != 16), src/traintest_mask.py (pretrain_joint:
    # InfoNCE + 10 x MSE in two masked passes; AdamW wd 5e-8, betas (0.95, 0.999); lr warmed up over
    # 1000 steps, then constant: their halving on a validation plateau has no counterpart here; fp32).
    "ssamba": {
        "mask_ratio": 400 / 512, "mask_mode": "cluster", "masked_only_loss": True,
        "discriminative_weight": 1.0, "generative_weight": 10.0, "drop_path_rate": 0.1,
        "batch_size": 64, "base_lr": 4e-4, "epochs": 10.0, "warmup_steps": 1000, "lr_schedule": "constant",
        "weight_decay": 5e-8, "beta1": 0.95, "beta2": 0.999, "precision": "fp32",
    },
    # MW-MAE (Yadav et al., ICLR 2024), as SarthakYadav/mwmae-jax-official trains it:
    # configs/pretraining/mwmae_base_200_4x16_precomputed.py (mask_ratio 0.8; decoder 384-d, 8 heads, depth 4,
    # windows [2, 5, 10, 25, 50, 125, 0, 0]; AdamW lr 1.5e-5 x batch / 256, weight decay 0.05, 10 warm-up
    # epochs then cosine, 100 epochs, batch 8 x 128, norm_pix_loss False), src/loss.py (`mae_loss`: MSE over
    # the masked patches), src/helpers/optimization.py (`optax.adamw`: betas (0.9, 0.999), decay on every
    # parameter, positions and tokens included). The encoder sees the visible patches only (MAE).
    "mwmae": {
        "mask_ratio": 0.8, "masked_only_loss": True, "decoder": "mwmha", "base_lr": 1.5e-5, "beta2": 0.999,
        "decay_all_parameters": True,
    },
    # the MAE baseline (the mae_* presets of the same family, with a CLS token;
    # configs/pretraining/mae_base_200_4x16_precomputed.py): the mwmae recipe with an all-global decoder
    "mae": {"decoder": "mae"},
}


@dataclass
class TrainConfig:
    """One pretraining run. The dataclass defaults are Yadav et al.'s recipe (AudioSet, 4 GPUs x 256);
    `TrainConfig.for_model(model, **given)` takes the model family's recipe (RECIPES) instead."""

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
    lr_schedule: str = "cosine"  # after the linear warm-up: cosine decay to min_lr, or constant
    weight_decay: float = 0.05
    decay_all_parameters: bool = False  # True: decay every parameter (MW-MAE's optax.adamw), not matrices only
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 0.0  # max grad norm; 0 = off (official: off)
    # objective
    mask_ratio: float = 0.5
    mask_mode: str = "unstructured"
    masked_only_loss: bool = False
    patch_normalized_targets: bool = False  # not official: targets standardised per patch (MAE)
    discriminative_weight: float = 0.0  # not official: + w * InfoNCE over masked patches (SSAST joint)
    generative_weight: float = 1.0  # weight of the MSE term
    decoder: str = "auto"  # training-only decoder, one of DECODERS (or "auto", see there)
    decoder_depth: int = 0  # blocks of the decoder; mwmha / mae: 0 = MW-MAE's 4
    decoder_embed_dim: int = 0  # width of the mwmha / mae decoder; 0 = MW-MAE's 384
    drop_path_rate: float = 0.0  # stochastic depth in training (families with `set_drop_path`: SSAMBA)
    # data
    num_frames: int = 200  # crop length in frames: the model's input length
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
        _check_numbers(self)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.export_dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"export_dtype must be float32, float16 or bfloat16, got {self.export_dtype!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.discriminative_weight == 0 and self.generative_weight == 0:
            raise ValueError("discriminative_weight and generative_weight are both 0: nothing to train on")
        _check_architecture(self.model, self.model_overrides)
        _check_model_options(self)
        _resolve_decoder(self)
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr {self.min_lr:g} is above the peak learning rate {self.lr:g} (= base_lr "
                             f"{self.base_lr:g} x batch_size {self.batch_size} / 256): the cosine decay would rise; "
                             f"set --min-lr at most {self.lr:g}")
        if self.steps is not None and self.warmup_steps is not None:
            _check_warmup(self.warmup_steps, self.steps)

    @classmethod
    def for_model(cls, model: str, **given) -> "TrainConfig":
        """A run of `model` with its family's recipe (RECIPES) for every field not in `given`, and
        crops of the model's input length (its num_frames, after `model_overrides`)."""
        facts = _model_facts(model)
        overrides = given.get("model_overrides") or {}
        frames = overrides.get("num_frames", facts.fields["num_frames"])
        if type(frames) is not int:  # a bad override: _check_architecture names it
            frames = facts.fields["num_frames"]
        recipe = recipe_for(model)
        recipe = {**DECODER_RECIPES.get(given.get("decoder", recipe.get("decoder")), {}), **recipe}
        return cls(**{**recipe, "num_frames": frames, **given, "model": model})

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


def recipe_for(model: str) -> dict[str, object]:
    """The defaults of a run of `model`: its family's recipe, refined by the recipe named by the
    preset's prefix when that differs from the family (mae_* in the mwmae family)."""
    family, prefix = _model_facts(model).family, model.split("_", 1)[0]
    return {**RECIPES.get(family, {}), **(RECIPES.get(prefix, {}) if prefix != family else {})}


# numeric fields and the smallest accepted value; `True` = that value itself is excluded
_INT_BOUNDS = {"batch_size": (1, False), "steps": (1, False), "warmup_steps": (0, False), "seed": (0, False),
               "num_frames": (1, False), "decoder_depth": (0, False), "decoder_embed_dim": (0, False),
               "num_workers": (0, False), "checkpoint_every": (1, False), "log_every": (1, False)}


_FLOAT_BOUNDS = {"epochs": (0.0, True), "warmup_epochs": (0.0, False), "base_lr": (0.0, True), "min_lr": (0.0, False),
                 "weight_decay": (0.0, False), "beta1": (0.0, False), "beta2": (0.0, False), "grad_clip": (0.0, False),
                 "mask_ratio": (0.0, True), "discriminative_weight": (0.0, False), "generative_weight": (0.0, False),
                 "drop_path_rate": (0.0, False), "min_seconds": (0.0, False), "max_clip_seconds": (0.0, True)}


_BELOW_ONE = ("beta1", "beta2", "mask_ratio", "drop_path_rate")


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


@dataclass(frozen=True)
class _ModelFacts:
    family: str
    fields: dict  # {field: preset value} of the architecture's config, but `arch`
    masking_modes: tuple[str, ...]  # what its `sample_mask` accepts
    drop_path: bool  # has `set_drop_path`
    decoders: tuple[str, ...]  # the training-only decoders it trains with (DECODERS)


def _model_facts(model: str) -> _ModelFacts:
    """What a run needs to know of an architecture; ValueError for anything but a registered name."""
    if not isinstance(model, str):
        raise ValueError(f"model must be an architecture name, got {model!r}")
    return _registered_model_facts(model)


@functools.lru_cache(maxsize=None)
def _registered_model_facts(model: str) -> _ModelFacts:
    """`_model_facts` of a name (the model is built on the meta device: no memory)."""
    from ..models.encoder import MASKING_MODES
    from ..models.registry import model_builder

    with torch.device("meta"):
        instance = model_builder(model)()  # ValueError naming the known models
    config = instance.config
    fields = {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name != "arch"}
    return _ModelFacts(config.family, fields, tuple(getattr(instance, "masking_modes", MASKING_MODES)),
                       hasattr(instance, "set_drop_path"),
                       tuple(getattr(instance, "decoders", ("none", "transformer"))))


def _check_model_options(config: TrainConfig) -> None:
    """Masking mode, crop length and drop path against what the (overridden) architecture accepts."""
    facts = _model_facts(config.model)
    if config.mask_mode not in facts.masking_modes:
        raise ValueError(f"mask_mode must be one of {facts.masking_modes} for {config.model}, got {config.mask_mode!r}")
    frames = config.model_overrides.get("num_frames", facts.fields["num_frames"])
    if config.num_frames != frames:
        raise ValueError(f"num_frames {config.num_frames} is not {config.model}'s input length ({frames} frames): "
                         "training crops fill the model's input; change both with --override num_frames=N "
                         "(TrainConfig.for_model sets num_frames from the model)")
    if config.drop_path_rate > 0 and not facts.drop_path:
        raise ValueError(f"drop_path_rate {config.drop_path_rate:g}: {config.model} has no stochastic depth; use 0")


# accepted size of the mwmha / mae decoder (as the encoders' FIELD_BOUNDS: no absurd model from a config)
_DECODER_BOUNDS = {"decoder_depth": (1, 48), "decoder_embed_dim": (8, 2048)}


def _resolve_decoder(config: TrainConfig) -> None:
    """Settle `decoder` ("auto" -> "transformer" | "none") and the mwmha / mae decoder's size (0 -> MW-MAE's
    depth 4, width 384), and check them against the model: ValueError naming what is accepted."""
    if config.decoder == "auto":
        config.decoder = "transformer" if config.decoder_depth > 0 else "none"
    if config.decoder not in DECODERS:
        raise ValueError(f"decoder must be one of {('auto',) + DECODERS}, got {config.decoder!r}")
    accepted = _model_facts(config.model).decoders
    if config.decoder not in accepted:
        raise ValueError(f"decoder {config.decoder!r}: {config.model} trains with the decoders {accepted}")
    if config.decoder in ("none", "transformer"):
        if config.decoder_embed_dim:
            raise ValueError(f"decoder_embed_dim {config.decoder_embed_dim} sizes the mwmha / mae decoders; the "
                             f"{config.decoder} decoder has none (leave it 0)")
        if config.decoder == "none" and config.decoder_depth:
            raise ValueError(f"decoder 'none' with decoder_depth {config.decoder_depth}: choose --decoder transformer "
                             "(or mwmha / mae) for a decoder, or leave decoder_depth 0")
        if config.decoder == "transformer" and not config.decoder_depth:
            raise ValueError("decoder 'transformer' needs its number of blocks: --decoder-depth N (N >= 1)")
        return
    from ..models.mwmae import MWMAE_DECODER, decoder_config

    config.decoder_depth = config.decoder_depth or MWMAE_DECODER.depth
    config.decoder_embed_dim = config.decoder_embed_dim or MWMAE_DECODER.embed_dim
    for name, (low, high) in _DECODER_BOUNDS.items():
        if not low <= getattr(config, name) <= high:
            raise ValueError(f"{name} {getattr(config, name)} is outside [{low}, {high}] for the {config.decoder} "
                             "decoder (0: MW-MAE's)")
    settings = decoder_config(config.decoder, config.decoder_embed_dim, config.decoder_depth)  # width vs 8 heads
    _check_decoder_fits(config, settings)


def _check_decoder_fits(config: TrainConfig, settings) -> None:
    """Build the (overridden) model and its decoder on the meta device, so that a decoder whose windows
    do not divide the model's tokens is refused before training starts. An architecture that does not
    build is left for `setup` to report, with its own message."""
    from ..models.registry import model_builder

    with torch.device("meta"):
        try:
            model = model_builder(config.model)(**config.model_overrides)
        except (TypeError, ValueError):
            return
        model.build_decoder(settings)


def _check_architecture(model: str, overrides: dict) -> None:
    """`model` is registered and `overrides` are fields of its config with values of the field's type
    (ranges are the config's to check when the model is built)."""
    preset = _model_facts(model).fields
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


def lr_factor(step: int, warmup: int, total: int, min_ratio: float, schedule: str = "cosine") -> float:
    """Linear warm-up over `warmup` steps, then cosine from 1 to `min_ratio` at `total` (or constant 1)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
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
