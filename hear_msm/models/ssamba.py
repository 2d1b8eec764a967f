"""SSAMBA: self-supervised audio representations with bidirectional Mamba (Vision Mamba) blocks.

Shams, Dindar, Jiang & Mesgarani, "SSAMBA: Self-Supervised Audio Representation Learning with Mamba
State Space Model" (SLT 2024, arXiv:2405.11831); the blocks are Zhu et al.'s Vision Mamba
(hustvl/Vim, "bimamba v2"), configured as SSAMBA's pretraining script configures them. Weights:
Hugging Face Hub `attentionisallyouneed369/ssamba` (`ssamba_{tiny,small,base}_400.pth`).

    Kaldi fbank [B, 1, T, 128] (time first; T a multiple of 16, at most 1024)
      -> transposed to [B, 1, 128, T], Conv2d 16x16 stride 16 -> [B, 8 * T/16, D] tokens in the
         authors' FREQUENCY-major order (index f * T/16 + t)
      -> CLS prepended, learned positions of the first T/16 time columns added -> [B, 1 + N, D]
      -> 12 pairs of Vim blocks: layer 2i reads the sequence, layer 2i+1 the reversed sequence
      -> norm_f applied twice -> patch tokens reordered TIME-major [B, T/16 * 8, D] (index t * 8 + f)

Quirks of the authors' code, reproduced exactly because the weights were trained with them:
each pair SUMS the two residual streams (so the residual doubles every pair; the LayerNorm in
front of every mixer hides it), and the final `norm_f` is applied twice before any head.
Each mixer scans in both directions with separate weights (`conv1d_b`, `x_proj_b`, `dt_proj_b`,
`A_b_log`, `D_b` for the reversed scan) and averages them. Parameter names are those of the Hub
files without DataParallel's `module.` prefix; `load_hub_state_dict` loads those files strictly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import selective_scan as scan_ops
from ..ops.selective_scan import KERNELS
from .mamba import MambaConfig, MambaMixer, fused_cuda_scan
from .registry import register_family, register_model

# pretraining-only entries of a Hub file, by name (after `module.`): SSAST's two prediction heads,
# the mask embedding, the pretraining input size, and Vim's classification head (saved, never used)
PRETRAINING_KEYS = ("mask_embed", "p_input_fdim", "p_input_tdim")
PRETRAINING_PREFIXES = ("cpredlayer.", "gpredlayer.", "v.head.")
HUB_PREFIX = "module."


@dataclass(frozen=True, kw_only=True)
class SSAMBAConfig(MambaConfig):
    """SSAMBA's architecture (the flags of its pretraining script). Saved as `config.json`."""

    depth: int = 24  # 12 forward / backward pairs
    num_frames: int = 1024  # pretraining input: 10.24 s of 10 ms fbank frames
    num_mels: int = 128
    patch_frames: int = 16  # one token column = 16 frames = 160 ms
    patch_mels: int = 16
    norm_eps: float = 1e-5  # block LayerNorms and norm_f
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2
    token_order: str = "freq_major"
    positions: str = "learned"
    frontend: str = "kaldi_fbank"
    head_classes: int = 1000  # Vim's classification head, saved in the Hub files but unused

    family = "ssamba"

    def __post_init__(self):
        super().__post_init__()
        fixed = {"token_order": "freq_major", "positions": "learned", "frontend": "kaldi_fbank"}
        for name, value in fixed.items():
            if getattr(self, name) != value:
                raise ValueError(f"{self.arch}: SSAMBA supports only {name}={value!r}, got {getattr(self, name)!r}")
        if self.depth % 2:
            raise ValueError(f"{self.arch}: depth must be even (forward / backward layer pairs), got {self.depth}")


class BiMambaMixer(MambaMixer):
    """Vim's "bimamba v2" mixer: [B, L, D] -> [B, L, D], the mean of two selective scans.

    One `in_proj` gives x and the gate z; the forward scan runs on them with `conv1d`, `x_proj`,
    `dt_proj`, `A_log`, `D`; the backward scan runs on x and z reversed in time with the `_b`
    weights, and its output is reversed back; out_proj((y_forward + y_backward) / 2).
    Kernels as for SSAM's mixer (`kernel`): on CUDA two calls of mamba-ssm's fused scan, on CPU
    the compiled scan (inference and training), else the PyTorch reference.
    """

    def __init__(self, config: SSAMBAConfig, kernel: str = "auto"):
        super().__init__(config, kernel)
        inner, rank, n = config.d_inner, config.resolved_dt_rank, config.d_state
        self.A_b_log = nn.Parameter(torch.empty(inner, n))
        self.D_b = nn.Parameter(torch.empty(inner))
        self.conv1d_b = nn.Conv1d(inner, inner, config.d_conv, groups=inner, padding=config.d_conv - 1)
        self.x_proj_b = nn.Linear(inner, rank + 2 * n, bias=False)
        self.dt_proj_b = nn.Linear(rank, inner)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x, gate = self.in_proj(hidden).chunk(2, dim=-1)  # [B, L, E] each
        forward = self.scan_direction(x, gate, reverse=False)
        backward = self.scan_direction(x.flip(1), gate.flip(1), reverse=True).flip(1)
        return self.out_proj((forward + backward) / 2)

    def forward_stream(self, hidden, state):
        """Not available: each output depends on the whole sequence (the backward scan)."""
        raise ValueError("the bidirectional SSAMBA mixer needs the whole sequence at once; it cannot stream")

    def direction_weights(self, reverse: bool) -> tuple:
        """(conv1d, x_proj, dt_proj, A_log, D) of the forward scan, or of the reversed one."""
        if reverse:
            return self.conv1d_b, self.x_proj_b, self.dt_proj_b, self.A_b_log, self.D_b
        return self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D

    def scan_direction(self, x: torch.Tensor, gate: torch.Tensor, reverse: bool) -> torch.Tensor:
        """One causal scan over x, gate [B, L, E] (already reversed for the backward scan) -> [B, L, E].

        Causal depthwise conv + SiLU, x_proj -> (dt, B, C), selective scan with D skip, gated by
        SiLU(z). Computes in float32 (float64 when the input is float64).
        """
        conv1d, x_proj, dt_proj, A_log, D = self.direction_weights(reverse)
        length, rank, n = x.shape[1], self.config.resolved_dt_rank, self.config.d_state
        u = F.silu(conv1d(x.transpose(1, 2))[..., :length]).transpose(1, 2)
        if not x.is_cuda:
            u = u.contiguous()  # one copy here instead of one in x_proj and one in the CPU scan
        dt, B, C = x_proj(u).split([rank, n, n], dim=-1)
        compute = torch.float64 if x.dtype == torch.float64 else torch.float32
        A = -torch.exp(A_log.to(compute))
        path = scan_ops.resolve(self.kernel, x.is_cuda)
        if path == "cuda":
            return fused_cuda_scan(u, dt, A, B, C, gate, dt_proj, D).to(x.dtype)
        delta = F.softplus(dt_proj(dt).to(compute))
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        args = (u.to(compute), delta, A, B.to(compute), C.to(compute), D.to(compute))
        if path == "reference":
            y = scan_ops.selective_scan_reference(*args)
        elif needs_grad or compute == torch.float64:  # the inference entry point is float32 only
            y = scan_ops.selective_scan_cpu_autograd(*args)
        else:
            y = scan_ops.selective_scan_cpu(*args)[0]
        return (y * F.silu(gate.to(compute))).to(x.dtype)

    @torch.no_grad()
    def reset_parameters(self, depth: int) -> None:
        """Vim's initialisation: mamba-ssm's for the forward scan (out_proj scaled by 1/sqrt(depth));
        the backward scan's layers keep PyTorch's defaults, except that Vim's `_init_weights`
        zeroes the `dt_proj_b` bias (only the forward dt bias is marked `_no_reinit`)."""
        super().reset_parameters(depth)
        self.conv1d_b.reset_parameters()
        self.x_proj_b.reset_parameters()
        self.dt_proj_b.reset_parameters()
        nn.init.zeros_(self.dt_proj_b.bias)
        self.A_b_log.copy_(self.A_log)  # S4D-real: log(1..d_state) in every channel, as the forward scan
        self.D_b.fill_(1.0)


class VimBlock(nn.Module):
    """Vim's "Add -> LayerNorm -> Mixer" block on (hidden, residual) pairs (no fused add-norm).

    residual' = hidden (first block) or residual + hidden; returns (mixer(LayerNorm(residual')), residual').
    """

    def __init__(self, config: SSAMBAConfig, kernel: str = "auto"):
        super().__init__()
        self.mixer = BiMambaMixer(config, kernel)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else residual + hidden
        return self.mixer(self.norm(residual)), residual


class FrequencyMajorPatchEmbed(nn.Module):
    """[B, 1, T, F] time-first spectrogram -> [B, (F/16) * (T/16), D] tokens, frequency-major."""

    def __init__(self, config: SSAMBAConfig):
        super().__init__()
        patch = (config.patch_mels, config.patch_frames)  # the authors' conv reads [B, 1, F, T]
        self.proj = nn.Conv2d(1, config.embed_dim, kernel_size=patch, stride=patch)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        grid = self.proj(spectrogram.transpose(2, 3))  # [B, D, F/16, T/16]
        return grid.flatten(2).transpose(1, 2)  # index = f * (T/16) + t


class SSAMBAEncoder(nn.Module):
    """The encoder (`v` in the Hub files): patch embedding, CLS, learned positions, Vim blocks, norm_f.

    `head_classes` > 0 adds Vim's classification head `head` (the Hub files carry a 1000-class one
    that SSAMBA never uses); the embedding encoder has none.
    """

    takes_shorter_inputs = True  # any whole number of columns up to num_frames (see check_input)

    def __init__(self, config: SSAMBAConfig, kernel: str = "auto", head_classes: int = 0):
        super().__init__()
        self.config = config
        dim = config.embed_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + config.num_patches, dim))  # CLS row + freq-major grid
        self.patch_embed = FrequencyMajorPatchEmbed(config)
        if head_classes:
            self.head = nn.Linear(dim, head_classes)
        self.layers = nn.ModuleList(VimBlock(config, kernel) for _ in range(config.depth))
        self.norm_f = nn.LayerNorm(dim, eps=config.norm_eps)

    def check_input(self, spectrogram: torch.Tensor) -> int:
        """Validates [B, 1, T, num_mels], T a positive multiple of 16 up to num_frames; returns T/16."""
        cfg = self.config
        shape = tuple(spectrogram.shape)
        if (spectrogram.ndim != 4 or shape[1] != 1 or shape[3] != cfg.num_mels or shape[2] == 0
                or shape[2] % cfg.patch_frames or shape[2] > cfg.num_frames):
            raise ValueError(
                f"{cfg.arch} expects Kaldi fbank input [batch, 1, frames, {cfg.num_mels}] (time first) with "
                f"frames a positive multiple of {cfg.patch_frames} and at most {cfg.num_frames}; got {shape}"
            )
        return shape[2] // cfg.patch_frames

    def patch_tokens(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] -> frequency-major patch tokens [B, N, D], before CLS and positions."""
        self.check_input(spectrogram)
        return self.patch_embed(spectrogram)

    def positions(self, columns: int) -> torch.Tensor:
        """Learned positions [1, 1 + grid_freq * columns, D]: the CLS row and, per frequency row,
        the first `columns` time columns of the table (the columns that hold audio in pretraining)."""
        cfg = self.config
        grid = self.pos_embed[:, 1:].view(1, cfg.grid_freq, cfg.grid_time, cfg.embed_dim)[:, :, :columns]
        return torch.cat([self.pos_embed[:, :1], grid.reshape(1, -1, cfg.embed_dim)], dim=1)

    def residual_stream(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Frequency-major tokens [B, N, D] -> the residual stream after the last pair, [B, 1 + N, D]."""
        columns = patch_tokens.shape[1] // self.config.grid_freq
        cls = self.cls_token.expand(patch_tokens.shape[0], -1, -1)
        hidden = torch.cat([cls, patch_tokens], dim=1) + self.positions(columns)
        residual = None
        for forward_layer, backward_layer in zip(self.layers[0::2], self.layers[1::2]):
            hidden_f, residual_f = forward_layer(hidden, residual)
            hidden_b, residual_b = backward_layer(hidden.flip(1), None if residual is None else residual.flip(1))
            hidden = hidden_f + hidden_b.flip(1)
            residual = residual_f + residual_b.flip(1)  # = 2 * residual_f: the authors' sum, kept
        return residual + hidden

    def encode(self, patch_tokens: torch.Tensor) -> torch.Tensor:
        """Frequency-major tokens [B, N, D] -> outputs [B, 1 + N, D] as the heads read them (CLS first):
        norm_f applied twice, as both the authors' pretraining and fine-tuning paths apply it."""
        return self.norm_f(self.norm_f(self.residual_stream(patch_tokens)))

    def forward_features(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, 128] normalised fbank (T a multiple of 16, <= 1024) -> patch tokens
        [B, (T/16) * 8, D] in TIME-major order (index t * 8 + f); the CLS output is dropped."""
        columns = self.check_input(spectrogram)
        tokens = self.encode(self.patch_embed(spectrogram))[:, 1:]
        batch, dim = tokens.shape[0], tokens.shape[2]
        return tokens.view(batch, self.config.grid_freq, columns, dim).transpose(1, 2).reshape(batch, -1, dim)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.forward_features(spectrogram)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Vim's and SSAMBA's initialisation (truncated-normal CLS and positions, mamba-ssm mixers)."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.patch_embed.proj.reset_parameters()
        if hasattr(self, "head"):
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)
        for layer in self.layers:
            layer.mixer.reset_parameters(self.config.depth)
            layer.norm.reset_parameters()
        self.norm_f.reset_parameters()


class SSAMBAPretrainingModel(nn.Module):
    """Everything a Hub file holds: the encoder `v` (with Vim's unused head) and SSAST's pretraining
    parts, `mask_embed` and the discriminative / generative heads `cpredlayer` / `gpredlayer`
    (Linear -> ReLU -> Linear to the 256 values of a 16x16 patch). Its `state_dict()` keys are the
    Hub keys without `module.`; `p_input_fdim` / `p_input_tdim` (int64) record the input size."""

    takes_shorter_inputs = True

    def __init__(self, config: SSAMBAConfig, kernel: str = "auto"):
        super().__init__()
        dim = config.embed_dim
        self.register_buffer("p_input_fdim", torch.tensor(config.num_mels, dtype=torch.int64))
        self.register_buffer("p_input_tdim", torch.tensor(config.num_frames, dtype=torch.int64))
        self.mask_embed = nn.Parameter(torch.zeros(1, 1, dim))
        self.v = SSAMBAEncoder(config, kernel, head_classes=config.head_classes)
        self.cpredlayer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, config.patch_dim))
        self.gpredlayer = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, config.patch_dim))

    @property
    def config(self) -> SSAMBAConfig:
        return self.v.config

    def forward_features(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.v.forward_features(spectrogram)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.forward_features(spectrogram)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.v.reset_parameters()
        nn.init.xavier_normal_(self.mask_embed)
        for head in (self.cpredlayer, self.gpredlayer):
            head[0].reset_parameters()
            head[2].reset_parameters()


# ------------------------------------------------------------------------------------ Hub files
def is_pretraining_key(name: str) -> bool:
    """True for the Hub entries (without `module.`) that only pretraining uses."""
    return name in PRETRAINING_KEYS or name.startswith(PRETRAINING_PREFIXES)


def strip_hub_prefix(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Remove DataParallel's `module.` (all keys have it, or none)."""
    prefixed = [key.startswith(HUB_PREFIX) for key in state_dict]
    if all(prefixed):
        return {key[len(HUB_PREFIX):]: value for key, value in state_dict.items()}
    if any(prefixed):
        raise ValueError(f"SSAMBA state dict mixes keys with and without {HUB_PREFIX!r}; expected all or none")
    return dict(state_dict)


def load_hub_state_dict(model: SSAMBAPretrainingModel | SSAMBAEncoder, state_dict: dict[str, torch.Tensor]) -> None:
    """Load a Hub state dict (`ssamba_*_400.pth`, with or without `module.`) strictly.

    A `SSAMBAPretrainingModel` takes every entry. A `SSAMBAEncoder` (for embedding) takes the
    `v.*` entries; the pretraining entries are recognised by name (`is_pretraining_key`) and
    dropped; anything else that does not fit is an error naming the keys.
    """
    state = strip_hub_prefix(state_dict)
    config = model.config
    for name, expected in (("p_input_fdim", config.num_mels), ("p_input_tdim", config.num_frames)):
        if name in state and int(state[name]) != expected:
            raise ValueError(f"this checkpoint was pretrained on {name} = {int(state[name])}, "
                             f"but {config.arch} expects {expected}")
    what = f"{config.arch} (Hub keys without {HUB_PREFIX!r})"
    if isinstance(model, SSAMBAEncoder):
        state = _encoder_entries(state, keep_head=hasattr(model, "head"))
        what = f"the {config.arch} encoder (Hub keys without {HUB_PREFIX + 'v.'!r})"
    load_strict(model, state, what=what)


def _encoder_entries(state: dict[str, torch.Tensor], keep_head: bool) -> dict[str, torch.Tensor]:
    """The `v.*` entries without `v.`, pretraining entries dropped by name; other keys pass through
    unchanged so that the strict load names them."""
    entries = {}
    for key, value in state.items():
        if is_pretraining_key(key) and not (keep_head and key.startswith("v.head.")):
            continue
        entries[key[2:] if key.startswith("v.") else key] = value
    return entries


def load_strict(module: nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    """`load_state_dict(strict=True)` with a ValueError that names missing, unexpected and mis-shaped keys."""
    expected = {key: tuple(value.shape) for key, value in module.state_dict().items()}
    found = {key: tuple(value.shape) for key, value in state.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))
        unexpected = sorted(set(found) - set(expected))
        wrong = sorted(k for k in set(expected) & set(found) if expected[k] != found[k])
        mismatches = ", ".join(f"{k}: {found[k]} vs {expected[k]}" for k in wrong[:5])
        details = [f"missing keys {missing[:5]}" if missing else "",
                   f"unexpected keys {unexpected[:5]}" if unexpected else "",
                   f"shape mismatches {mismatches}" if wrong else ""]
        raise ValueError(f"weights do not fit {what}: " + "; ".join(d for d in details if d))
    module.load_state_dict(state, strict=True)


# ------------------------------------------------------------------------------------ presets
def build_ssamba(config: SSAMBAConfig, kernel: str = "auto") -> SSAMBAPretrainingModel:
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    model = SSAMBAPretrainingModel(config, kernel)
    model.reset_parameters()
    return model


register_family(SSAMBAConfig, build_ssamba)


def _create_ssamba(arch: str, kernel: str = "auto", **fields) -> SSAMBAPretrainingModel:
    return build_ssamba(SSAMBAConfig(arch=arch, **fields), kernel=kernel)


@register_model
def ssamba_tiny(**overrides) -> SSAMBAPretrainingModel:
    return _create_ssamba("ssamba_tiny", **{"embed_dim": 192, **overrides})


@register_model
def ssamba_small(**overrides) -> SSAMBAPretrainingModel:
    return _create_ssamba("ssamba_small", **{"embed_dim": 384, **overrides})


@register_model
def ssamba_base(**overrides) -> SSAMBAPretrainingModel:
    return _create_ssamba("ssamba_base", **{"embed_dim": 768, **overrides})
