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

Pretraining (`SSAMBAPretrainingModel`): SSAST's joint objective as SSAMBA runs it, InfoNCE + 10 x
MSE over 400 of 512 patches masked in clusters, each term in its own masked pass, with Vim's drop
path; the recipe's optimiser settings are in `hear_msm.training.config.RECIPES`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import selective_scan as scan_ops
from ..ops.selective_scan import KERNELS
from .encoder import MASKING_MODES, grad_needed, random_patch_mask
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
        path = scan_ops.resolve(self.kernel, hidden.is_cuda)
        x, gate = self.project_in(hidden, path, grad_needed(self, hidden)).chunk(2, dim=-1)  # [B, L, E] each
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
        needs_grad = grad_needed(self, x)
        args = (u.to(compute), delta, A, B.to(compute), C.to(compute), D.to(compute))
        if path == "reference":
            y = scan_ops.selective_scan_reference(*args)
        elif needs_grad or compute == torch.float64:  # the inference entry point is float32 only
            y = scan_ops.selective_scan_cpu_autograd(*args)
        else:  # inference: the output gate y * silu(z) computed in the scan's loop
            return scan_ops.selective_scan_cpu(*args, gate=gate)[0].to(x.dtype)
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


def drop_path(branch: torch.Tensor, rate: float, training: bool) -> torch.Tensor:
    """Stochastic depth as timm's DropPath (Vim's blocks use it): in training, each clip's branch
    [B, ...] is zeroed with probability `rate` and otherwise scaled by 1 / (1 - rate). Draws from
    torch's global generator (the training loop seeds it per step)."""
    if rate == 0.0 or not training:
        return branch
    keep = 1.0 - rate
    kept = branch.new_empty(branch.shape[0], *(1,) * (branch.ndim - 1)).bernoulli_(keep).div_(keep)
    return branch * kept


class VimBlock(nn.Module):
    """Vim's "Add -> LayerNorm -> Mixer" block on (hidden, residual) pairs (no fused add-norm).

    residual' = hidden (first block) or residual + drop_path(hidden); returns
    (mixer(LayerNorm(residual')), residual'). `drop_path_rate` is a training setting (0 unless
    `SSAMBAEncoder.set_drop_path` sets it), not part of the architecture.
    """

    def __init__(self, config: SSAMBAConfig, kernel: str = "auto"):
        super().__init__()
        self.mixer = BiMambaMixer(config, kernel)
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.drop_path_rate = 0.0

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        residual = hidden if residual is None else residual + drop_path(hidden, self.drop_path_rate, self.training)
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
        self.drop_path_rate = 0.0  # stochastic depth of the last residual add (see set_drop_path)

    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth for training, as Vim spreads `drop_path_rate` (SSAMBA's script: 0.1): layer i
        drops its incoming branch with probability ([0] + linspace(0, rate, depth))[i], the final
        residual add with `rate`. Active in training mode only."""
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"drop path rate must be in [0, 1), got {rate}")
        rates = [0.0] + [value.item() for value in torch.linspace(0, rate, self.config.depth)]
        for layer, layer_rate in zip(self.layers, rates):
            layer.drop_path_rate = layer_rate
        self.drop_path_rate = rate

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

    def positions(self, columns: int, beyond: str = "interpolate") -> torch.Tensor:
        """Learned positions [1, 1 + grid_freq * columns, D]: the CLS row and, per frequency row,
        the first `columns` time columns of the table (the columns that hold audio in pretraining).

        More columns than the table's 64 (whole-clip encoding): `beyond` = "interpolate" stretches
        each frequency row of the table linearly over the columns (what the authors' fine-tuning
        does for longer inputs; a column then sits at its relative place in the clip), "tile"
        repeats the 64 columns every 10.24 s (what windowed encoding sees)."""
        cfg = self.config
        grid = self.pos_embed[:, 1:].view(1, cfg.grid_freq, cfg.grid_time, cfg.embed_dim)
        if columns <= cfg.grid_time:
            grid = grid[:, :, :columns]
        elif beyond == "interpolate":
            grid = F.interpolate(grid.permute(0, 3, 1, 2), size=(cfg.grid_freq, columns), mode="bilinear",
                                 align_corners=False).permute(0, 2, 3, 1)
        elif beyond == "tile":
            grid = grid[:, :, torch.arange(columns, device=grid.device) % cfg.grid_time]
        else:
            raise ValueError(f"positions beyond the table must be 'interpolate' or 'tile', got {beyond!r}")
        return torch.cat([self.pos_embed[:, :1], grid.reshape(1, -1, cfg.embed_dim)], dim=1)

    def residual_stream(self, patch_tokens: torch.Tensor, beyond: str = "interpolate") -> torch.Tensor:
        """Frequency-major tokens [B, N, D] -> the residual stream after the last pair, [B, 1 + N, D]."""
        columns = patch_tokens.shape[1] // self.config.grid_freq
        cls = self.cls_token.expand(patch_tokens.shape[0], -1, -1)
        hidden = torch.cat([cls, patch_tokens], dim=1) + self.positions(columns, beyond)
        residual = None
        for forward_layer, backward_layer in zip(self.layers[0::2], self.layers[1::2]):
            hidden_f, residual_f = forward_layer(hidden, residual)
            hidden_b, residual_b = backward_layer(hidden.flip(1), None if residual is None else residual.flip(1))
            hidden = hidden_f + hidden_b.flip(1)
            residual = residual_f + residual_b.flip(1)  # = 2 * residual_f (without drop path): the authors' sum, kept
        return residual + drop_path(hidden, self.drop_path_rate, self.training)

    def encode(self, patch_tokens: torch.Tensor, beyond: str = "interpolate") -> torch.Tensor:
        """Frequency-major tokens [B, N, D] -> outputs [B, 1 + N, D] as the heads read them (CLS first):
        norm_f applied twice, as both the authors' pretraining and fine-tuning paths apply it."""
        return self.norm_f(self.norm_f(self.residual_stream(patch_tokens, beyond)))

    supports_full_sequence = True  # the whole clip as one sequence (both scan directions need all of it)

    @torch.no_grad()
    def forward_sequence(self, spectrogram: torch.Tensor, segment_tokens: int = 8192,
                         positions: str = "auto") -> torch.Tensor:
        """A whole clip as ONE sequence: [B, 1, T, 128], T any multiple of 16 -> time-major tokens
        [B, T/16 * 8, D]. Time and memory grow linearly with T (Mamba), but the bidirectional scan
        needs the whole sequence at once, so `segment_tokens` (the streaming unit of the causal
        families) does not apply. positions: "auto" | "interpolate" (the authors' choice for longer
        inputs) or "tile"; see `positions`."""
        del segment_tokens
        if positions not in ("auto", "interpolate", "tile"):
            raise ValueError(f"SSAMBA positions beyond its 64-column table: 'auto' (= 'interpolate'), 'interpolate' "
                             f"or 'tile', got {positions!r}")
        cfg = self.config
        if spectrogram.ndim != 4 or spectrogram.shape[2] % cfg.patch_frames or spectrogram.shape[3] != cfg.num_mels:
            raise ValueError(f"{cfg.arch}: fbank input must be [batch, 1, 16k frames, {cfg.num_mels}], "
                             f"got {tuple(spectrogram.shape)}")
        beyond = "interpolate" if positions == "auto" else positions
        return self.freq_major_to_time_major(self.encode(self.patch_embed(spectrogram), beyond)[:, 1:])

    def forward_features(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, 128] normalised fbank (T a multiple of 16, <= 1024) -> patch tokens
        [B, (T/16) * 8, D] in TIME-major order (index t * 8 + f); the CLS output is dropped."""
        self.check_input(spectrogram)
        return self.freq_major_to_time_major(self.encode(self.patch_embed(spectrogram))[:, 1:])

    def freq_major_to_time_major(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, C] in the encoder's order (index f * columns + t) -> time-major (index t * 8 + f)."""
        batch, length, channels = tokens.shape
        grid = tokens.reshape(batch, self.config.grid_freq, length // self.config.grid_freq, channels)
        return grid.transpose(1, 2).reshape(batch, length, channels)

    def time_major_to_freq_major(self, tokens: torch.Tensor) -> torch.Tensor:
        """The inverse of `freq_major_to_time_major`."""
        batch, length, channels = tokens.shape
        grid = tokens.reshape(batch, length // self.config.grid_freq, self.config.grid_freq, channels)
        return grid.transpose(1, 2).reshape(batch, length, channels)

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
    Hub keys without `module.`; `p_input_fdim` / `p_input_tdim` (int64) record the input size.

    The training interface the loop calls on every model (`sample_mask`, `reconstruction_loss`,
    `patchify`) computes SSAMBA's joint objective, SSAST's `pretrain_joint` as SSAMBA's
    `traintest_mask.py` runs it: two masked passes over each batch, each with its own mask,

        loss = discriminative_weight x InfoNCE(cpredlayer, pass 1) + generative_weight x MSE(gpredlayer, pass 2)

    (their weights 1 and 10). In each pass the patch tokens of the masked patches are replaced by
    `mask_embed` before CLS and positions are added, the encoder runs on frequency-major tokens,
    and the heads read its outputs after the double `norm_f`. The targets are the normalised fbank
    values of each patch, 16 mel bins x 16 frames, mel-major inside (their `nn.Unfold` on [B, 1, F, T]).
    Masks and targets seen from outside are time-major, as for every model.
    """

    takes_shorter_inputs = True
    masking_modes = ("cluster",) + MASKING_MODES  # "cluster": SSAST's patch masking, SSAMBA's

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

    supports_full_sequence = True

    def forward_sequence(self, spectrogram: torch.Tensor, segment_tokens: int = 8192,
                         positions: str = "auto") -> torch.Tensor:
        return self.v.forward_sequence(spectrogram, segment_tokens, positions)

    def forward(self, spectrogram: torch.Tensor) -> torch.Tensor:
        return self.forward_features(spectrogram)

    # ------------------------------------------------------------------ pretraining
    def set_drop_path(self, rate: float) -> None:
        """Stochastic depth of the encoder in training (`SSAMBAEncoder.set_drop_path`)."""
        self.v.set_drop_path(rate)

    def parameters_unused_by(self, discriminative_weight: float, generative_weight: float, **_) -> list[nn.Parameter]:
        """Parameters the objective with these weights never reaches: Vim's classification head (in
        the Hub files, never trained by SSAMBA) and the head of an objective weighted 0. The training
        loop freezes them, so that the optimizer and DDP skip them as SSAMBA's optimizer did (no gradient)."""
        unused = list(self.v.head.parameters()) if hasattr(self.v, "head") else []
        if discriminative_weight == 0:
            unused += list(self.cpredlayer.parameters())
        if generative_weight == 0:
            unused += list(self.gpredlayer.parameters())
        return unused

    def sample_mask(self, batch: int, ratio: float, mode: str = "cluster",
                    generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Boolean masks [batch, 2, N], True = masked, time-major: [:, 0] for the discriminative pass,
        [:, 1] for the generative one, drawn independently.

        "cluster" (SSAMBA's): N - int(N * (1 - ratio)) patches (400 of 512 at ratio 400/512) in
        square clusters, see `cluster_mask`; "unstructured" / "timestep": as for every model
        (`random_patch_mask`; SSAST's frame masking is "unstructured").
        """
        cfg = self.config
        if mode not in self.masking_modes:
            raise ValueError(f"masking mode {mode!r} is unknown; expected one of {self.masking_modes}")
        if mode != "cluster":
            masks = random_patch_mask(2 * batch, ratio, mode, cfg.grid_time, cfg.grid_freq, generator, device)
            return masks.view(batch, 2, cfg.num_patches)
        if not 0.0 <= ratio < 1.0:
            raise ValueError(f"mask ratio must be in [0, 1), got {ratio}")
        count = cfg.num_patches - int(cfg.num_patches * (1 - ratio))
        masks = torch.stack([cluster_mask(count, cfg.grid_freq, cfg.grid_time, generator) for _ in range(2 * batch)])
        return self.v.freq_major_to_time_major(masks[..., None])[..., 0].view(batch, 2, cfg.num_patches).to(device)

    def patchify(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] -> targets [B, N, 256], time-major (index t * 8 + f); inside a patch the 16 x 16
        values are mel-major (index mel * 16 + frame), as SSAMBA's `nn.Unfold` over [B, 1, F, T] orders them."""
        return self.v.freq_major_to_time_major(self._patches(spectrogram))

    def _patches(self, spectrogram: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, F] -> patch values [B, N, 256] in the encoder's frequency-major order."""
        cfg = self.config
        columns = self.v.check_input(spectrogram)
        grid = spectrogram[:, 0].transpose(1, 2).reshape(  # [B, F/16, 16, T/16, 16]
            spectrogram.shape[0], cfg.grid_freq, cfg.patch_mels, columns, cfg.patch_frames)
        return grid.permute(0, 1, 3, 2, 4).reshape(spectrogram.shape[0], cfg.grid_freq * columns, cfg.patch_dim)

    def encode_masked(self, spectrogram: torch.Tensor, mask: torch.Tensor,
                      decoder: nn.Module | None = None) -> torch.Tensor:
        """[B, 1, T, F], mask [B, N] frequency-major (True = masked) -> outputs [B, 1 + N, D] (CLS first,
        frequency-major) after the double norm_f: masked patch tokens replaced by `mask_embed`
        before CLS and positions are added, as SSAST's `mpc` / `mpg` do."""
        tokens = self.v.patch_tokens(spectrogram)
        tokens = torch.where(mask[..., None], self.mask_embed.to(tokens.dtype), tokens)
        encoded = self.v.encode(tokens)
        return decoder(encoded) if decoder is not None else encoded

    def reconstruction_loss(self, spectrogram: torch.Tensor, mask: torch.Tensor, masked_only: bool = True,
                            patch_normalized_targets: bool = False, discriminative_weight: float = 1.0,
                            generative_weight: float = 10.0, decoder: nn.Module | None = None) -> torch.Tensor:
        """SSAMBA's joint objective (see the class docstring) on [B, 1, T, F] with masks [B, 2, N] from
        `sample_mask` (time-major; [:, 0] discriminative pass, [:, 1] generative pass).

        InfoNCE: for each masked patch of a clip, the log-softmax over that clip's masked predictions
        of (target . prediction), taken at its own prediction, averaged over clips and patches
        (SSAST's `mpc`, which normalises over predictions, not over targets). MSE: over the masked
        patches (`masked_only`, theirs) or over all. A pass whose weight is 0 is skipped.
        `patch_normalized_targets` standardises each target patch (not SSAMBA's recipe).
        `decoder`: a training-only module between the encoder and the heads.
        """
        if discriminative_weight <= 0 and generative_weight <= 0:
            raise ValueError("SSAMBA's objective needs discriminative_weight or generative_weight above 0")
        masks = self._check_masks(spectrogram, mask)
        compute = torch.promote_types(spectrogram.dtype, torch.float32)  # float32 under autocast, float64 kept
        target = self._patches(spectrogram).to(compute)
        if patch_normalized_targets:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        loss = spectrogram.new_zeros((), dtype=compute)
        if discriminative_weight > 0:
            index = masked_indices(masks[:, 0])
            encoded = self.encode_masked(spectrogram, masks[:, 0], decoder)[:, 1:]
            prediction = self.cpredlayer(gather_tokens(encoded, index)).to(compute)
            loss = loss + discriminative_weight * ssast_infonce(prediction, gather_tokens(target, index))
        if generative_weight > 0:
            encoded = self.encode_masked(spectrogram, masks[:, 1], decoder)[:, 1:]
            if masked_only:
                index = masked_indices(masks[:, 1])
                encoded, generative_target = gather_tokens(encoded, index), gather_tokens(target, index)
            else:
                generative_target = target
            loss = loss + generative_weight * (self.gpredlayer(encoded).to(compute) - generative_target).pow(2).mean()
        return loss

    def _check_masks(self, spectrogram: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Time-major masks [B, 2, N] -> frequency-major, after checking shape and dtype."""
        columns = self.v.check_input(spectrogram)
        expected = (spectrogram.shape[0], 2, columns * self.config.grid_freq)
        if mask.dtype != torch.bool or tuple(mask.shape) != expected:
            raise ValueError(f"SSAMBA's objective takes boolean masks [batch, 2, patches] = {list(expected)} "
                             f"(one per pass, from sample_mask); got {mask.dtype} {list(mask.shape)}")
        return self.v.time_major_to_freq_major(mask.flatten(0, 1)[..., None])[..., 0].view(expected)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        self.v.reset_parameters()
        nn.init.xavier_normal_(self.mask_embed)
        for head in (self.cpredlayer, self.gpredlayer):
            head[0].reset_parameters()
            head[2].reset_parameters()


def cluster_mask(count: int, grid_freq: int, grid_time: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """SSAST's cluster masking (`gen_maskid_patch`, which SSAMBA's pretraining uses): boolean
    [grid_freq * grid_time], frequency-major (index f * grid_time + t), exactly `count` True.

    A cluster side s is drawn once per mask from {3, 4, 5}; clusters are added at uniform random
    starts, each covering the indices start + grid_time * i + j (i, j < s: s frequency rows by s
    time columns, wrapping into the next row at the right edge, as theirs), except index 0 and
    indices past the end, until more than `count` distinct patches are covered; the `count` lowest
    indices are kept (their set of Python ints iterates in ascending order at these sizes). So patch 0
    is never masked, as in their code. `count` must be at most N - 2 (index 0 is never masked).
    """
    total = grid_freq * grid_time
    if not 1 <= count <= total - 2:
        raise ValueError(f"cluster masking covers 1 to {total - 2} of {total} patches, asked for {count}; "
                         "lower the mask ratio")
    side = 3 + int(torch.randint(3, (1,), generator=generator))
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    offsets = (rows * grid_time + columns).flatten()
    first_cover = torch.full((total,), torch.iinfo(torch.int64).max)  # index of the first cluster covering each patch
    drawn = 0
    while True:  # clusters in batches; the union after cluster k is {patches whose first_cover <= k}
        starts = torch.randint(total, (total,), generator=generator)
        candidates = starts[:, None] + offsets[None, :]
        number = (drawn + torch.arange(total))[:, None].expand_as(candidates)
        inside = (candidates > 0) & (candidates < total)
        first_cover.scatter_reduce_(0, candidates[inside], number[inside], "amin")
        drawn += total
        # the loop of theirs stops at the first cluster after which more than `count` are covered
        last = first_cover.sort().values[count]
        if last < drawn:
            break
    mask = first_cover <= last
    mask[mask.nonzero()[count:, 0]] = False  # keep the `count` lowest indices
    return mask


def masked_indices(mask: torch.Tensor) -> torch.Tensor:
    """Boolean [B, N] with the same number M >= 1 of True per row -> their indices [B, M], ascending."""
    counts = mask.sum(dim=1)
    if counts.numel() == 0 or int(counts.min()) == 0 or bool((counts != counts[0]).any()):
        raise ValueError(f"SSAMBA's objective needs the same number (>= 1) of masked patches in every clip, "
                         f"got {counts.tolist()}")
    return mask.nonzero()[:, 1].view(mask.shape[0], int(counts[0]))


def gather_tokens(tokens: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """tokens [B, N, C], index [B, M] -> tokens[b, index[b]] [B, M, C]."""
    return tokens.gather(1, index[..., None].expand(-1, -1, tokens.shape[-1]))


def ssast_infonce(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """SSAST's masked patch InfoNCE: prediction, target [B, M, P] of the M masked patches of each clip
    -> -mean over clips and patches j of log_softmax_k(target_j . prediction_k) at k = j."""
    logits = target @ prediction.transpose(1, 2)  # [B, M targets, M predictions]
    return -logits.log_softmax(dim=-1).diagonal(dim1=1, dim2=2).mean()


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
