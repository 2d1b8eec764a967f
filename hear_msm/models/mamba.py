"""SSAM: Audio Mamba, a masked spectrogram model built from Mamba selective state-space blocks.

Yadav & Tan, "Audio Mamba: Selective State Spaces for Self-Supervised Audio Representations"
(Interspeech 2024); Mamba from Gu & Dao, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces" (2023). One causal direction per block, d_state 24, d_conv 4, expand 3.

The mixer is plain PyTorch with mamba-ssm's parameter names (`A_log`, `D`, `in_proj`, `conv1d`,
`x_proj`, `dt_proj`, `out_proj`). On CUDA, when mamba-ssm is installed (`hear_msm[cuda]`), the
selective scan runs in its fused kernel instead; both paths take the same inputs. mamba-ssm is
never imported on a machine without CUDA (its import needs Triton and the CUDA extension).
On CPU, inference and training use a small compiled C scan with its own backward
(`hear_msm.ops.selective_scan`, built on first use with the system compiler; its speed against the
PyTorch reference is measured in benchmarks/); for inference the causal conv + SiLU before it and
the output gate after it run in C too, and in_proj takes oneDNN's Linear where that gives the same
bits (`hear_msm.ops.onednn`). Which scan runs is decided in one place,
`hear_msm.ops.selective_scan.resolve`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import onednn
from ..ops import selective_scan as scan_ops
from ..ops.selective_scan import KERNELS
from .encoder import EncoderConfig, MaskedSpectrogramModel, causal_conv1d_stream, grad_needed
from .registry import register_family, register_model


def check_kernel(kernel: str) -> str:
    """The one check of a kernel value for SSAM: every builder, mixer and `set_kernel` calls it."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} for SSAM (Mamba) models, got {kernel!r}")
    return kernel


@dataclass(frozen=True, kw_only=True)
class MambaConfig(EncoderConfig):
    d_state: int = 24
    d_conv: int = 4
    expand: int = 3
    dt_rank: int = 0  # 0 = mamba-ssm's "auto": ceil(embed_dim / 16)

    family = "mamba"

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank or math.ceil(self.embed_dim / 16)


class MambaMixer(nn.Module):
    """Mamba selective SSM mixer: [B, L, D] -> [B, L, D], causal in L."""

    def __init__(self, config: MambaConfig, kernel: str = "auto"):
        super().__init__()
        dim, inner, rank, n = config.embed_dim, config.d_inner, config.resolved_dt_rank, config.d_state
        self.config = config
        self.kernel = check_kernel(kernel)  # runtime choice, not saved
        self.in_proj = nn.Linear(dim, 2 * inner, bias=False)
        self.conv1d = nn.Conv1d(inner, inner, config.d_conv, groups=inner, padding=config.d_conv - 1)
        self.x_proj = nn.Linear(inner, rank + 2 * n, bias=False)
        self.dt_proj = nn.Linear(rank, inner)
        self.A_log = nn.Parameter(torch.empty(inner, n))
        self.D = nn.Parameter(torch.empty(inner))
        self.out_proj = nn.Linear(inner, dim, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self._mix(hidden, None)[0]

    def forward_stream(self, hidden: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """One segment of a longer sequence: [B, L, D] and the state left by the previous segment
        (None at the start) -> ([B, L, D], state). Segments chained this way give the same output
        as one forward over their concatenation. state = (conv inputs [B, E, d_conv - 1], ssm [B, E, N])."""
        with torch.no_grad():
            return self._mix(hidden, state if state is not None else ())

    def project_in(self, hidden: torch.Tensor, path: str, needs_grad: bool) -> torch.Tensor:
        """in_proj: [B, L, D] -> [B, L, 2 E]. On the compiled CPU path, oneDNN's Linear where it gives
        ATen's bits (`ops.onednn.takes`: D <= 192, the tiny models), faster for this shape."""
        if path == "cpu" and onednn.takes(hidden, self.in_proj.in_features, needs_grad):
            return onednn.linear(hidden, self.in_proj.weight, self.in_proj.bias)
        return self.in_proj(hidden)

    def _mix(self, hidden: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple | None]:
        length = hidden.shape[1]
        rank, n = self.config.resolved_dt_rank, self.config.d_state
        ssm_state = new_state = None
        needs_grad = grad_needed(self, hidden)
        path = scan_ops.resolve(self.kernel, hidden.is_cuda)
        u, gate = self.project_in(hidden, path, needs_grad).chunk(2, dim=-1)  # [B, L, E] each
        if state is None and path == "cpu" and not needs_grad and u.dtype == torch.float32:
            u = scan_ops.causal_conv_silu_cpu(u, self.conv1d.weight, self.conv1d.bias)  # contiguous
        elif state is None:
            # depthwise causal conv: pad both sides by d_conv - 1, keep the first L outputs
            u = F.silu(self.conv1d(u.transpose(1, 2))[..., :length]).transpose(1, 2)
            if not hidden.is_cuda:
                u = u.contiguous()  # one copy here instead of one in x_proj and one in the CPU scan
        else:
            # continue from the previous segment's last d_conv - 1 inputs
            u, new_tail = causal_conv1d_stream(u.transpose(1, 2), self.conv1d.weight, self.conv1d.bias,
                                               state[0] if state else None)
            u = F.silu(u).transpose(1, 2).contiguous()
            ssm_state = state[1] if state else None
        dt, B, C = self.x_proj(u).split([rank, n, n], dim=-1)
        A = -torch.exp(self.A_log.float())
        if path == "cuda" and state is None:
            return self.out_proj(fused_cuda_scan(u, dt, A, B, C, gate, self.dt_proj, self.D)), None
        delta = F.softplus(self.dt_proj(dt).float())
        if path == "cpu" and state is None and needs_grad:
            # training: compiled forward and backward; the conv, dt_proj + softplus, A = -exp(A_log)
            # and the z gate below stay in PyTorch, so autograd differentiates them as before
            y = scan_ops.selective_scan_cpu_autograd(u, delta, A, B, C, self.D)
        elif path == "cpu":  # inference: the output gate y * silu(z) computed in the scan's loop
            y, ssm_state = scan_ops.selective_scan_cpu(u, delta, A, B, C, self.D, ssm_state, gate=gate)
            gate = None
        else:  # the reference, also for a carried state on CUDA (the fused kernel starts from zero)
            y, ssm_state = scan_ops.selective_scan_reference(u.float(), delta, A, B.float(), C.float(), self.D.float(),
                                                     ssm_state, return_state=True)
        y = (y if gate is None else y * F.silu(gate.float())).to(hidden.dtype)
        if state is not None:
            new_state = (new_tail, ssm_state)
        return self.out_proj(y), new_state

    @torch.no_grad()
    def reset_parameters(self, depth: int) -> None:
        """mamba-ssm's initialisation (S4D-real A, log-uniform steps in [1e-3, 0.1])."""
        cfg = self.config
        rank = cfg.resolved_dt_rank
        for linear in (self.in_proj, self.x_proj):
            nn.init.kaiming_uniform_(linear.weight, a=math.sqrt(5))
        self.conv1d.reset_parameters()
        nn.init.uniform_(self.dt_proj.weight, -(rank**-0.5), rank**-0.5)
        dt = torch.exp(torch.rand(cfg.d_inner) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp_min(1e-4)
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        self.A_log.copy_(torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.float32)).repeat(cfg.d_inner, 1))
        self.D.fill_(1.0)
        # GPT-2 style: residual output projections scaled by 1/sqrt(depth)
        nn.init.kaiming_uniform_(self.out_proj.weight, a=math.sqrt(5))
        self.out_proj.weight /= math.sqrt(depth)


def fused_cuda_scan(u, dt, A, B, C, gate, dt_proj: nn.Linear, D: torch.Tensor) -> torch.Tensor:
    """mamba-ssm's fused `selective_scan_fn` on [B, L, E] inputs: it wants channels first, adds the
    dt bias and softplus itself, and gates by SiLU(z)."""
    scan = scan_ops.load_cuda_scan()
    delta = F.linear(dt, dt_proj.weight)
    y = scan(
        u.transpose(1, 2).contiguous(), delta.transpose(1, 2).contiguous(), A,
        B.transpose(1, 2).contiguous(), C.transpose(1, 2).contiguous(), D.float(),
        z=gate.transpose(1, 2).contiguous(), delta_bias=dt_proj.bias.float(), delta_softplus=True,
    )
    return y.transpose(1, 2)


class MambaBlock(nn.Module):
    """x + mixer(LayerNorm(x)); the same function as mamba-ssm's "Add -> LN -> Mixer" block
    (which only carries the residual separately to fuse the add into its norm kernel)."""

    def __init__(self, config: MambaConfig, kernel: str = "auto"):
        super().__init__()
        self.norm = nn.LayerNorm(config.embed_dim, eps=config.norm_eps)
        self.mixer = MambaMixer(config, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mixer(self.norm(x))

    def forward_stream(self, x: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """One segment with the mixer's carried state (see `MambaMixer.forward_stream`)."""
        out, state = self.mixer.forward_stream(self.norm(x), state)
        return x + out, state


def build_mamba(config: MambaConfig, kernel: str = "auto") -> MaskedSpectrogramModel:
    check_kernel(kernel)  # before any block is built
    model = MaskedSpectrogramModel(config, lambda index: MambaBlock(config, kernel))
    model.reset_shared_parameters()
    for block in model.blocks:
        block.mixer.reset_parameters(config.depth)
    return model


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Switch every Mamba mixer in `model` to another scan implementation (runtime setting)."""
    check_kernel(kernel)
    for module in model.modules():
        if isinstance(module, MambaMixer):
            module.kernel = kernel


register_family(MambaConfig, build_mamba)


def _create_ssam(arch: str, kernel: str = "auto", **fields) -> MaskedSpectrogramModel:
    return build_mamba(MambaConfig(arch=arch, **fields), kernel=kernel)


@register_model
def ssam_tiny(**overrides) -> MaskedSpectrogramModel:
    return _create_ssam("ssam_tiny", **{"embed_dim": 192, **overrides})


@register_model
def ssam_small(**overrides) -> MaskedSpectrogramModel:
    return _create_ssam("ssam_small", **{"embed_dim": 384, **overrides})


@register_model
def ssam_base(**overrides) -> MaskedSpectrogramModel:
    return _create_ssam("ssam_base", **{"embed_dim": 768, **overrides})
