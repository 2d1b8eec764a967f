"""The encoder shell shared by every family, and the masked-spectrogram model around it.

Every hear_msm encoder reads a spectrogram patch grid (Gong et al.'s SSAST and its descendants);
for the 80-mel families of Yadav et al. (SSAST / SSAM / AxLSTM):

    features [B, 1, T=200, F=80]  --Conv2d(k=s=(4, 16))-->  [B, 50 * 5, D] tokens (token_order)
    + positions (fixed 2-D sin-cos or learned), CLS prepended (cls_token)  -->  [B, 251, D]
    --> depth x pre-norm residual block (attention | Mamba | mLSTM)  --> LayerNorm
    --> forward_features: patch tokens [B, 250, D] in time-major order (index = t * 5 + f)

The config names the front end (feature kind and bins), the patch geometry and token order, CLS and
position kind, so other families are presets of the same shell. Only the residual block differs
between families; it comes from a factory in the family's file. Parameter names follow the
authors' checkpoints exactly, so their `.pth` files load strictly.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import re
import typing
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_FORMAT_VERSION = 1
TOKEN_ORDERS = ("time_major", "freq_major")
POSITION_KINDS = ("sincos", "learned")

# Accepted range (inclusive) of every numeric config field, whatever family declares it; checked
# before a model is built, so that an untrusted config.json cannot ask for an absurd model. The
# presets (embed_dim <= 768, depth 12, 200 x 80 inputs) and the SSAMBA / MW-MAE shapes (depth 24,
# 1024 x 128 inputs, 16 x 16 patches) sit well inside.
FIELD_BOUNDS: dict[str, tuple[float, float]] = {
    # the shared shell
    "embed_dim": (4, 2048), "depth": (1, 48), "num_frames": (1, 65536), "num_mels": (1, 512),
    "patch_frames": (1, 64), "patch_mels": (1, 128), "norm_eps": (1e-12, 0.1),
    # transformer (num_heads also xlstm)
    "num_heads": (1, 64), "mlp_ratio": (0.25, 16.0),
    # mamba
    "d_state": (1, 256), "d_conv": (1, 16), "expand": (1, 8), "dt_rank": (0, 2048),
    # xlstm
    "expansion": (1, 8), "qkv_blocksize": (1, 256), "conv_kernel": (1, 16), "block_norm_eps": (1e-12, 0.1),
    # ssamba (Vim's unused classification head)
    "head_classes": (0, 100_000),
}
# Tokens per input: enough for SSAMBA's 22.5k-token speed benchmark; a position table of that many
# rows stays in the megabytes (the mLSTM's tokens x tokens mask has its own, lower bound).
MAX_PATCHES = 24576
_ARCH_NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_TYPE_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


@dataclass(frozen=True, kw_only=True)
class EncoderConfig:
    """Architecture of one encoder; saved as `config.json` beside the weights.

    Runtime choices (kernel, layout, batch size) are deliberately not part of it.
    """

    arch: str
    embed_dim: int
    depth: int = 12
    num_frames: int = 200  # log-mel frames per input, 10 ms hop -> 2 s
    num_mels: int = 80
    patch_frames: int = 4  # patch height along time -> one token column = 40 ms
    patch_mels: int = 16
    norm_eps: float = 1e-6  # final LayerNorm (and SSAST/SSAM block norms)
    frontend: str = "logmel"  # feature kind, one of hear_msm._frontend.FRONTENDS (bins: num_mels)
    token_order: str = "time_major"  # inside the encoder: t * grid_freq + f, or "freq_major": f * grid_time + t
    cls_token: bool = True  # a CLS token is prepended (forward_features drops its output)
    positions: str = "sincos"  # "sincos": the fixed 2-D table (stored, not trained); "learned": trained

    family = "base"  # class attribute, not a field: each family subclass sets it

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        """Check every field against its declared type and FIELD_BOUNDS, then the patch grid.

        Runs on construction, so no model is ever built from a config that fails it. Raises
        ValueError naming the field, the value and what is accepted.
        """
        hints = _field_types(type(self))
        for spec in dataclasses.fields(self):
            _check_field(spec.name, getattr(self, spec.name), hints[spec.name])
        for name, accepted in (("token_order", TOKEN_ORDERS), ("positions", POSITION_KINDS)):
            if getattr(self, name) not in accepted:
                raise ValueError(f"{self.arch}: {name} must be one of {accepted}, got {getattr(self, name)!r}")
        if self.positions == "sincos" and self.token_order != "time_major":
            raise ValueError(f"{self.arch}: the 2-D sin-cos table is defined for time-major tokens only")
        if self.num_frames % self.patch_frames or self.num_mels % self.patch_mels:
            raise ValueError(
                f"{self.arch}: input {self.num_frames}x{self.num_mels} is not divisible into "
                f"{self.patch_frames}x{self.patch_mels} patches"
            )
        if self.num_patches > MAX_PATCHES:
            raise ValueError(
                f"{self.arch}: {self.num_frames}x{self.num_mels} inputs in {self.patch_frames}x{self.patch_mels} "
                f"patches make {self.num_patches} tokens; at most {MAX_PATCHES} are accepted"
            )

    @property
    def grid_time(self) -> int:
        return self.num_frames // self.patch_frames

    @property
    def grid_freq(self) -> int:
        return self.num_mels // self.patch_mels

    @property
    def num_patches(self) -> int:
        return self.grid_time * self.grid_freq

    @property
    def patch_dim(self) -> int:
        return self.patch_frames * self.patch_mels

    @property
    def frame_embedding_size(self) -> int:
        """Size of one 40 ms timestamp embedding: the `grid_freq` tokens of a column side by side."""
        return self.grid_freq * self.embed_dim

    def to_dict(self) -> dict:
        return {"format_version": CONFIG_FORMAT_VERSION, "family": self.family, **dataclasses.asdict(self)}


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, type]:
    return typing.get_type_hints(cls)


def _shown(value: object) -> str:
    text = repr(value)
    return (text if len(text) <= 60 else text[:57] + "...") + f" ({type(value).__name__})"


def _check_field(name: str, value: object, kind: type) -> None:
    if kind is int or kind is bool:
        valid = type(value) is kind  # JSON 192.0 or true is not an integer here
    elif kind is float:
        valid = type(value) in (int, float) and math.isfinite(value)
    elif kind is str:
        valid = type(value) is str and (name != "arch" or _ARCH_NAME.fullmatch(value) is not None)
    else:
        raise TypeError(f"config field {name!r} has type {kind}, which EncoderConfig.validate cannot check")
    if not valid:
        accepted = "up to 64 letters, digits, '_', '.' or '-'" if name == "arch" else _TYPE_NAMES[kind]
        raise ValueError(f"config field {name!r} must be {accepted}, got {_shown(value)}")
    low, high = FIELD_BOUNDS.get(name, (-math.inf, math.inf))
    if kind in (int, float) and not low <= value <= high:
        raise ValueError(
            f"config field {name!r} = {value!r} is outside the accepted range [{low}, {high}] (every field "
            "is bounded, so that a config cannot ask for an absurd or gigabyte-sized model)"
        )


def config_from_dict(data: dict) -> EncoderConfig:
    """Inverse of `EncoderConfig.to_dict`, strict about version, family, field names and values.

    Raises ValueError (naming the field) for anything `EncoderConfig.validate` refuses.
    """
    from .registry import config_classes  # the families register their config classes

    if not isinstance(data, dict):
        raise ValueError(f"a config must be a JSON object, got {type(data).__name__}")
    data = dict(data)
    version = data.pop("format_version", None)
    if type(version) is not int or version != CONFIG_FORMAT_VERSION:
        raise ValueError(
            f"config format_version {_shown(version)} is not supported (this hear_msm reads version "
            f"{CONFIG_FORMAT_VERSION}); upgrade hear_msm or re-export the weights"
        )
    family = data.pop("family", None)
    classes = config_classes()
    if type(family) is not str or family not in classes:
        raise ValueError(f"config family {_shown(family)} is unknown; expected one of {sorted(classes)}")
    cls = classes[family]
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"config for family {family!r} has unknown fields {unknown[:10]}; accepted: {sorted(names)}")
    required = [f.name for f in fields if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [name for name in required if name not in data]
    if missing:
        raise ValueError(f"config for family {family!r} lacks the fields {missing}")
    # JSON turns tuples into lists; none of our fields are sequences, so values pass through
    return cls(**data)


# beyond a position table: "extend" (sin-cos, exact), "interpolate" (learned tables stretched), "tile"
POSITION_MODES = ("auto", "extend", "interpolate", "tile")


def _sincos_rows(embed_dim: int, time_index: torch.Tensor, freq_index: torch.Tensor) -> torch.Tensor:
    """float64 [len(index), embed_dim]: first half of the channels encodes the frequency index, the
    second half the time index, each as [sin(pos * w_k), cos(pos * w_k)], w_k = 10000^(-k / (D/4))."""
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64, device=time_index.device) / quarter)

    def encode(positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float64)[:, None] * omega[None, :]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(freq_index), encode(time_index)], dim=1)


def sincos_2d_position_table(embed_dim: int, grid_time: int, grid_freq: int) -> torch.Tensor:
    """Fixed 2-D sin-cos positions [1 + grid_time * grid_freq, embed_dim], CLS row zero (MAE convention).

    Rows follow the time-major token order (index = t * grid_freq + f); see `_sincos_rows`.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim must be divisible by 4 for 2-D sin-cos positions, got {embed_dim}")
    time_index = torch.arange(grid_time).repeat_interleave(grid_freq)
    freq_index = torch.arange(grid_freq).repeat(grid_time)
    table = _sincos_rows(embed_dim, time_index, freq_index)
    return torch.cat([torch.zeros(1, embed_dim, dtype=torch.float64), table]).float()


class PatchEmbed(nn.Module):
    """[B, 1, T, F] log-mel -> [B, (T/pt) * (F/pf), D] tokens, time-major."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        patch = (config.patch_frames, config.patch_mels)
        self.proj = nn.Conv2d(1, config.embed_dim, kernel_size=patch, stride=patch)

        self.freq_major = config.token_order == "freq_major"

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        grid = self.proj(spectrogram)  # [B, D, T/pt, F/pf]
        if self.freq_major:
            grid = grid.transpose(2, 3)  # index = f * (T/pt) + t
        return grid.flatten(2).transpose(1, 2)  # index = t * (F/pf) + f


class SpectrogramEncoder(nn.Module):
    """Patch embedding, positions, CLS token, `depth` residual blocks and a final LayerNorm.

    `block_factory(layer_index)` builds one residual block (x -> x + f(x)); the families
    supply it. `forward_features(spectrogram)` gives the token embeddings.
    """

    def __init__(self, config: EncoderConfig, block_factory: Callable[[int], nn.Module]):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.patch_embed = PatchEmbed(config)
        self.num_prefix = int(config.cls_token)  # tokens before the patches
        if config.cls_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        # A sin-cos table is fixed, but a parameter (not a buffer): the official checkpoints store it there.
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix + config.num_patches, dim),
                                      requires_grad=config.positions == "learned")
        self.blocks = nn.ModuleList(block_factory(i) for i in range(config.depth))
        self.encoder_norm = nn.LayerNorm(dim, eps=config.norm_eps)

    def embed_patches(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] -> patch tokens with positions [B, N, D] (no CLS)."""
        expected = (1, self.config.num_frames, self.config.num_mels)
        if spectrogram.ndim != 4 or tuple(spectrogram.shape[1:]) != expected:
            raise ValueError(
                f"{self.config.arch} expects log-mel input of shape [batch, {expected[0]}, "
                f"{expected[1]}, {expected[2]}] (time first), got {tuple(spectrogram.shape)}"
            )
        return self.patch_embed(spectrogram) + self.pos_embed[:, self.num_prefix:]

    def encode_tokens(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, D] (token_order) -> normalised outputs [B, prefix + N, D] (CLS first if any)."""
        x = patch_tokens
        if self.config.cls_token:
            cls = (self.cls_token + self.pos_embed[:, :1]).expand(patch_tokens.shape[0], -1, -1)
            x = torch.cat([cls, patch_tokens], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.encoder_norm(x)

    def forward_features(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] normalised features -> patch token embeddings [B, N, D], time-major
        (index = t * grid_freq + f) whatever the encoder's internal token order."""
        tokens = self.encode_tokens(self.embed_patches(spectrogram))[:, self.num_prefix:]
        return self.to_time_major(tokens)

    def to_time_major(self, tokens: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, N, D] in this encoder's token order -> time-major order."""
        if self.config.token_order == "time_major":
            return tokens
        cfg = self.config
        return tokens.reshape(-1, cfg.grid_freq, cfg.grid_time, tokens.shape[-1]).transpose(1, 2).flatten(1, 2)

    def from_time_major(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_time_major`: [B, N, C] time-major -> this encoder's token order."""
        if self.config.token_order == "time_major":
            return tokens
        cfg = self.config
        return tokens.reshape(-1, cfg.grid_time, cfg.grid_freq, tokens.shape[-1]).transpose(1, 2).flatten(1, 2)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.forward_features(spectrogram)

    # ------------------------------------------------------------------ sequences longer than one input
    def resolve_positions(self, positions: str = "auto") -> str:
        """"extend" (the analytic 2-D sin-cos table for any length) or "tile" (the stored columns
        repeated); "auto" takes "extend" when the stored table is the analytic one."""
        if positions not in POSITION_MODES:
            raise ValueError(f"positions must be one of {POSITION_MODES}, got {positions!r}")
        if positions == "interpolate":
            raise ValueError(f"{self.config.arch}: its positions are extended exactly ('extend') or tiled ('tile'); "
                             "'interpolate' is for learned tables (SSAMBA)")
        if positions != "auto":
            return positions
        cfg = self.config
        stored = self.pos_embed[0].detach()
        analytic = sincos_2d_position_table(cfg.embed_dim, cfg.grid_time, cfg.grid_freq).to(stored)
        return "extend" if torch.allclose(stored, analytic, atol=1e-5, rtol=0) else "tile"

    def position_rows(self, start: int, stop: int, positions: str = "auto") -> torch.Tensor:
        """Rows [start, stop) of the position table of an arbitrarily long sequence (row 0 = CLS),
        float32 [stop - start, D], without building the whole table (an hour is 450k rows)."""
        cfg = self.config
        stored = self.pos_embed[0].detach()
        positions = self.resolve_positions(positions)
        index = torch.arange(max(start, 1) - 1, stop - 1, device=stored.device)  # token index without CLS
        time_index, freq_index = index // cfg.grid_freq, index % cfg.grid_freq
        if positions == "extend":
            rows = _sincos_rows(cfg.embed_dim, time_index, freq_index).float()
            cls = torch.zeros(1, cfg.embed_dim, device=stored.device)
        else:
            rows = stored[1 + (time_index % cfg.grid_time) * cfg.grid_freq + freq_index]
            cls = stored[:1]
        return torch.cat([cls, rows]) if start == 0 else rows

    def position_table(self, grid_time: int, positions: str = "auto") -> torch.Tensor:
        """Positions [1 + grid_time * grid_freq, D] for a sequence of `grid_time` token columns."""
        return self.position_rows(0, 1 + grid_time * self.config.grid_freq, positions)

    @property
    def supports_full_sequence(self) -> bool:
        """Whether `forward_sequence` can run: recurrent blocks that stream, time-major tokens after a CLS."""
        cfg = self.config
        return cfg.token_order == "time_major" and cfg.cls_token and all(
            hasattr(block, "forward_stream") for block in self.blocks)

    @torch.no_grad()
    def forward_sequence(self, spectrogram: torch.Tensor, segment_tokens: int = 8192,
                         positions: str = "auto") -> torch.Tensor:
        """Normalised log-mel [B, 1, T, F], T any multiple of `patch_frames` -> tokens [B, T/pt * F/pf, D].

        One sequence per clip (CLS first), block by block over segments of `segment_tokens` tokens
        with each block's recurrent state carried between segments (reversed blocks walk the
        segments back to front), so time and memory grow linearly with T. Needs blocks with
        `forward_stream` (SSAM, AxLSTM). Memory: the input, two [B, tokens, D] activations and one
        segment's intermediates.
        """
        cfg = self.config
        if not self.supports_full_sequence:
            raise ValueError(f"{cfg.arch} cannot encode a sequence longer than one input (it needs streaming "
                             f"recurrent blocks and time-major tokens after a CLS): use inputs of {cfg.num_frames} frames")
        if spectrogram.ndim != 4 or spectrogram.shape[2] % cfg.patch_frames or spectrogram.shape[3] != cfg.num_mels:
            raise ValueError(f"spectrogram must be [B, 1, {cfg.patch_frames}k frames, {cfg.num_mels}], "
                             f"got {tuple(spectrogram.shape)}")
        positions = self.resolve_positions(positions)
        columns = spectrogram.shape[2] // cfg.patch_frames
        length = 1 + columns * cfg.grid_freq
        x = spectrogram.new_empty(spectrogram.shape[0], length, cfg.embed_dim)
        x[:, 0] = self.cls_token[0, 0] + self.position_rows(0, 1, positions)[0]
        step = max(1, segment_tokens // cfg.grid_freq)  # patch embedding, column-aligned segments
        for first in range(0, columns, step):
            last = min(first + step, columns)
            frames = spectrogram[:, :, first * cfg.patch_frames:last * cfg.patch_frames]
            start, stop = 1 + first * cfg.grid_freq, 1 + last * cfg.grid_freq
            x[:, start:stop] = self.patch_embed(frames) + self.position_rows(start, stop, positions)
        bounds = [(start, min(start + segment_tokens, length)) for start in range(0, length, segment_tokens)]
        for block in self.blocks:
            out = torch.empty_like(x)
            state = None
            for start, stop in reversed(bounds) if getattr(block, "reverse", False) else bounds:
                out[:, start:stop], state = block.forward_stream(x[:, start:stop], state)
            x = out
        for start, stop in bounds:
            x[:, start:stop] = self.encoder_norm(x[:, start:stop])
        return x[:, 1:]

    @torch.no_grad()
    def reset_shared_parameters(self) -> None:
        """Initialise what all families share: sin-cos positions, CLS, patch projection, norm."""
        cfg = self.config
        if cfg.token_order == "time_major":  # learned tables start from the sin-cos one too (MAE)
            table = sincos_2d_position_table(cfg.embed_dim, cfg.grid_time, cfg.grid_freq)
            self.pos_embed.copy_(table[1 - self.num_prefix:][None])
        else:
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if cfg.cls_token:
            nn.init.normal_(self.cls_token, std=0.02)
        nn.init.xavier_uniform_(self.patch_embed.proj.weight.view(cfg.embed_dim, -1))
        nn.init.zeros_(self.patch_embed.proj.bias)
        nn.init.ones_(self.encoder_norm.weight)
        nn.init.zeros_(self.encoder_norm.bias)


MASKING_MODES = ("unstructured", "timestep")


def random_patch_mask(batch: int, ratio: float, mode: str, grid_time: int, grid_freq: int,
                      generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """Boolean mask [batch, grid_time * grid_freq], True = masked, time-major (index t * grid_freq + f).

    `unstructured`: exactly int(N * (1 - ratio)) patches kept, chosen uniformly; `timestep`: whole
    token columns (all frequency patches of a time step), int(grid_time * (1 - ratio)) columns kept.
    """
    if mode not in MASKING_MODES:
        raise ValueError(f"masking mode {mode!r} is unknown; expected one of {MASKING_MODES}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
    units = grid_time * grid_freq if mode == "unstructured" else grid_time
    keep = int(units * (1 - ratio))
    noise = torch.rand(batch, units, generator=generator, device=device)
    ranks = noise.argsort(dim=1).argsort(dim=1)  # rank of each unit's noise
    mask = ranks >= keep
    if mode == "timestep":
        mask = mask.repeat_interleave(grid_freq, dim=1)
    return mask


class MaskedSpectrogramModel(SpectrogramEncoder):
    """Encoder + mask token + prediction head: the full pretraining model.

    Its `state_dict()` has exactly the keys of the authors' checkpoints (flat names such as
    `blocks.3.mixer.A_log`, `mask_token`, `pred.2.weight`), which is why the objective extends
    the encoder class instead of holding it as a submodule.
    """

    masking_modes = MASKING_MODES  # the `mode`s `sample_mask` accepts
    # training-only decoders (`hear-msm pretrain --decoder`): between encoder and head, or MW-MAE's
    # multi-window decoder on the patch tokens in place of the head
    decoders = ("none", "transformer", "mwmha", "mae")

    def __init__(self, config: EncoderConfig, block_factory: Callable[[int], nn.Module]):
        super().__init__(config, block_factory)
        dim = config.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pred = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, config.patch_dim))

    def patchify(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] -> reconstruction targets [B, N, pt * pf], time-major, (time, mel) inside."""
        cfg = self.config
        b = spectrogram.shape[0]
        x = spectrogram.reshape(b, cfg.grid_time, cfg.patch_frames, cfg.grid_freq, cfg.patch_mels)
        return x.permute(0, 1, 3, 2, 4).reshape(b, cfg.num_patches, cfg.patch_dim)

    def sample_mask(self, batch: int, ratio: float, mode: str = "unstructured",
                    generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Boolean mask [batch, N], True = masked, time-major; see `random_patch_mask`."""
        cfg = self.config
        return random_patch_mask(batch, ratio, mode, cfg.grid_time, cfg.grid_freq, generator, device)

    def forward(self, spectrogram: torch.Tensor, mask: torch.Tensor,
                decoder: nn.Module | None = None) -> torch.Tensor:
        """Predict patch values: [B, 1, T, F], mask [B, N] (True = masked) -> [B, N, pt * pf], both time-major.

        `decoder` (training only, not part of the checkpoint): a module [B, prefix + N, D] -> same shape
        run between the encoder and the prediction head (see `hear_msm.transformer.build_training_decoder`),
        or one that `predicts_patches` (`build_decoder`, MW-MAE's decoder): it reads the N patch
        tokens (CLS dropped) in time-major order and predicts the patches in place of `pred`.
        """
        tokens = self.embed_patches(spectrogram)  # the encoder's token order; mask and outputs are time-major
        tokens = torch.where(self.from_time_major(mask[..., None]), self.mask_token.to(tokens.dtype), tokens)
        encoded = self.encode_tokens(tokens)
        if getattr(decoder, "predicts_patches", False):
            return decoder(self.to_time_major(encoded[:, self.num_prefix:]))
        if decoder is not None:
            encoded = decoder(encoded)
        return self.to_time_major(self.pred(encoded[:, self.num_prefix:]))

    def reconstruction_loss(self, spectrogram: torch.Tensor, mask: torch.Tensor,
                            masked_only: bool = False, patch_normalized_targets: bool = False,
                            discriminative_weight: float = 0.0, generative_weight: float = 1.0,
                            decoder: nn.Module | None = None) -> torch.Tensor:
        """generative_weight x MSE between predictions and patch targets, over all patches or the
        masked ones (the official recipe: weight 1, MSE only).

        Options beyond the official (MSE-only) recipe:
        `patch_normalized_targets`: each target patch is standardised by its own mean and std (MAE's
        normalised-pixel targets), so the model predicts the shape of the spectrum inside a patch
        (harmonic pattern, onset) rather than its level.
        `discriminative_weight` w > 0: loss = generative_weight x MSE + w x InfoNCE, SSAST's joint
        objective (Gong et al. use InfoNCE + 10 x MSE, i.e. w = 0.1 at generative_weight 1). Each masked patch's prediction must pick its
        own target out of all masked targets of the same clip (dot-product logits, cross-entropy); this rewards
        predictions that are specific to their patch instead of a blurred average of the clip.
        `decoder`: a training-only module between encoder and head (see `forward`).
        """
        compute = torch.promote_types(spectrogram.dtype, torch.float32)  # float32 under autocast, float64 kept
        prediction = self(spectrogram, mask, decoder).to(compute)
        target = self.patchify(spectrogram).to(compute)
        if patch_normalized_targets:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        error = (prediction - target).pow(2).mean(dim=-1)  # [B, N]
        loss = (error * mask).sum() / mask.sum().clamp_min(1) if masked_only else error.mean()
        loss = generative_weight * loss
        if discriminative_weight > 0:
            loss = loss + discriminative_weight * masked_patch_infonce(prediction, target, mask)
        return loss

    def build_decoder(self, config) -> nn.Module:
        """The training-only decoder of `--decoder mwmha | mae` (a `MultiWindowDecoderConfig`):
        MW-MAE's decoder over the N patch tokens this encoder outputs, predicting their patch values
        (`hear_msm.models.mwmae.MultiWindowDecoder`), initialised."""
        from .mwmae import MultiWindowDecoder

        cfg = self.config
        decoder = MultiWindowDecoder(config, cfg.embed_dim, cfg.num_patches, cfg.patch_dim)
        decoder.reset_parameters()
        return decoder

    def parameters_unused_by(self, decoder: nn.Module | None = None, **_) -> list[nn.Parameter]:
        """The prediction head `pred` when `decoder` predicts the patches itself (the training loop
        freezes it: it stays as initialised in the exported weights); nothing otherwise."""
        return list(self.pred.parameters()) if getattr(decoder, "predicts_patches", False) else []

    @torch.no_grad()
    def reset_shared_parameters(self) -> None:
        super().reset_shared_parameters()
        nn.init.normal_(self.mask_token, std=0.02)
        for layer in (self.pred[0], self.pred[2]):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)


def masked_patch_infonce(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of each masked patch's prediction classifying its own target among the
    masked targets of its clip. prediction, target [B, N, P]; mask [B, N] bool (True = masked)."""
    logits = prediction @ target.transpose(1, 2)  # [B, N (predictions), N (targets)]
    logits = logits.masked_fill(~mask[:, None, :], float("-inf"))  # candidates: masked targets only
    rows = mask.nonzero(as_tuple=True)  # (clip, patch) of every masked prediction
    if rows[0].numel() == 0:
        return prediction.sum() * 0.0
    return nn.functional.cross_entropy(logits[rows], rows[1])


def grad_needed(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether a call of `module` on x must be differentiable: gradients enabled and x or any of the
    module's parameters trainable. The inference-only fast paths (compiled scan, oneDNN Linears)
    detach their inputs, so they may run only when this is False."""
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


def causal_conv1d_stream(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         tail: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv over one segment of a longer sequence (Mamba's and mLSTM's short conv).

    inputs [B, C, L] channels first; weight [C, 1, k]; tail: the previous segment's last k - 1
    inputs [B, C, k - 1], or None at the start (zeros, as the one-shot causal conv pads).
    Returns (outputs [B, C, L], the tail to pass to the next segment).
    """
    pad = weight.shape[-1] - 1
    tail = inputs.new_zeros(*inputs.shape[:2], pad) if tail is None else tail
    inputs = torch.cat([tail, inputs], dim=2)
    return F.conv1d(inputs, weight, bias, groups=inputs.shape[1]), inputs[..., inputs.shape[2] - pad:]
