"""AxLSTM: Audio xLSTM, a masked spectrogram model built from mLSTM blocks.

Yadav, Theodoridis & Tan, "Audio xLSTMs: Learning Self-Supervised Audio Representations with
xLSTMs" (2024); xLSTM from Beck et al. (NeurIPS 2024), arranged as in Vision-LSTM (Alkin et al.,
2024): every block is a pre-norm mLSTM layer, even blocks read the token sequence forward and odd
blocks read it reversed, so stacking gives both directions. No sLSTM blocks.

The mLSTM layer itself is the `xlstm` package's `mLSTMLayer` (expansion 2, block-diagonal 4x4
q/k/v projections, 4 heads, causal conv of width 4, learnable skip), whose parameter names are
the authors' checkpoint names. This file adds the block around it: a weight-only LayerNorm that
scales by (1 + weight) and the direction flip.

xlstm's mLSTM runs in its parallel form: an S x S gate matrix, quadratic in length, fine for the
251 tokens of a 2 s chunk. For long sequences (HEAR full-sequence mode) `mlstm_blockwise` gives
the same function in time and memory linear in S: exact attention inside blocks of 64 tokens, a
carried matrix memory (C, n, m) between them. Its stabiliser m equals the parallel form's
row-wise maximum, so the two agree to float rounding (tests/test_speed_paths.py).

On CPU without gradients (`kernel="auto"`, see `set_mlstm_kernel`) each layer runs fused instead:
xlstm's two projections as PyTorch matmuls, everything between them in compiled C passes around
the cell's matmuls (`hear_msm.ops.mlstm.mlstm_layer_cpu`). It rounds differently from xlstm's
op-by-op form but is at least as close to a float64 run of it, on the whole model
(tests/test_fused_defaults.py); `kernel="reference"` keeps xlstm's own forward, and training always
uses it. Its speed is measured in benchmarks/.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def _import_mlstm_layer():
    # xlstm's package __init__ also loads its sLSTM CUDA helpers, whose import of
    # torch.utils.cpp_extension logs "No CUDA runtime is found" on CPU machines; we use mLSTM only.
    cpp_extension_log = logging.getLogger("torch.utils.cpp_extension")
    level = cpp_extension_log.level
    cpp_extension_log.setLevel(logging.ERROR)
    try:
        from xlstm.blocks.mlstm.layer import mLSTMLayer, mLSTMLayerConfig
    finally:
        cpp_extension_log.setLevel(level)
    return mLSTMLayer, mLSTMLayerConfig


mLSTMLayer, mLSTMLayerConfig = _import_mlstm_layer()
from xlstm.components.linear_headwise import LinearHeadwiseExpand  # noqa: E402  (after the quiet import)
from xlstm.blocks.mlstm.backends import parallel_stabilized_simple  # noqa: E402  (after the quiet import)

from ..ops import mlstm as mlstm_ops
from ..ops.mlstm import KERNELS as MLSTM_KERNELS
from .encoder import EncoderConfig, MaskedSpectrogramModel, causal_conv1d_stream
from .registry import register_family, register_model


MAX_MLSTM_PATCHES = 4096


@dataclass(frozen=True, kw_only=True)
class XLSTMConfig(EncoderConfig):
    expansion: int = 2
    qkv_blocksize: int = 4
    num_heads: int = 4
    conv_kernel: int = 4
    block_norm_eps: float = 1e-5

    family = "xlstm"

    def validate(self) -> None:
        super().validate()
        # xlstm's mLSTM layer allocates a (1 + tokens)^2 causal mask when it is built
        if self.num_patches > MAX_MLSTM_PATCHES:
            raise ValueError(f"{self.arch}: {self.num_patches} tokens per input; the mLSTM's parallel form "
                             f"accepts at most {MAX_MLSTM_PATCHES} (longer audio: sequence='full')")


class ResidualGainLayerNorm(nn.Module):
    """LayerNorm without bias whose stored weight is the offset from unit gain (scale = 1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight=1.0 + self.weight, eps=self.eps)


def mlstm_layer_forward(layer: nn.Module, x: torch.Tensor, state: tuple | None = None,
                        carry: bool = False) -> torch.Tensor | tuple[torch.Tensor, tuple]:
    """xlstm's `mLSTMLayer.forward` [B, L, D] -> [B, L, D], computed faster on CPU.

    The same function as the layer's own forward with the blockwise cell (linear in L, and
    1.4-2x faster than the parallel form even at L = 251) and both gate projections in one
    matmul. With `carry=True` it continues from `state` (None at the start: the
    previous segment's last conv inputs and the mLSTM memory) and returns (output, state).
    """
    cfg = layer.config
    x_mlstm, z = torch.split(layer.proj_up(x), cfg._inner_embedding_dim, dim=-1)
    if carry:
        conv_state, cell_state = state if state is not None else (None, ())
        x_conv, conv_state = causal_conv1d_stream(x_mlstm.transpose(1, 2), layer.conv1d.conv.weight,
                                                  layer.conv1d.conv.bias, conv_state)
        x_conv = x_conv.transpose(1, 2)
    else:
        x_conv, cell_state = layer.conv1d(x_mlstm), None
    x_conv = layer.conv_act_fn(x_conv)
    q, k, v = layer.q_proj(x_conv), layer.k_proj(x_conv), layer.v_proj(x_mlstm)
    cell = layer.mlstm_cell
    b, length, _ = q.shape
    gate_input = torch.cat([q, k, v], dim=-1)
    gates = F.linear(gate_input, torch.cat([cell.igate.weight, cell.fgate.weight]),
                     torch.cat([cell.igate.bias, cell.fgate.bias]))  # [B, L, 2 * NH]
    igate, fgate = (g.transpose(-1, -2).unsqueeze(-1) for g in gates.chunk(2, dim=-1))
    heads = cell.config.num_heads
    q, k, v = (t.view(b, length, heads, -1).transpose(1, 2) for t in (q, k, v))
    if carry:
        h, cell_state = mlstm_ops.mlstm_blockwise(q, k, v, igate, fgate, state=cell_state)
    else:
        h = mlstm_ops.mlstm_blockwise(q, k, v, igate, fgate)
    h = cell.outnorm(h).transpose(1, 2).reshape(b, length, -1)
    h = (h + layer.learnable_skip * x_conv) * layer.ogate_act_fn(z)
    out = layer.proj_down(h)
    return (out, (conv_state, cell_state)) if carry else out


def fused_layer_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """xlstm's `mLSTMLayer.forward` [B, L, D] -> [B, L, D] for CPU inference (float32, no autograd):
    its two projections as PyTorch matmuls, everything between them in `mlstm_ops.mlstm_layer_cpu`.
    Under `precision="bf16"` (CPU autocast) the projections run in bfloat16 and the C passes in
    float32 (`.float()`: the cell is one of that mode's float32 islands)."""
    cell = layer.mlstm_cell
    h = mlstm_ops.mlstm_layer_cpu(
        layer.proj_up(x).float(), layer.conv1d.conv.weight, layer.conv1d.conv.bias,
        layer.q_proj.weight, layer.k_proj.weight, layer.v_proj.weight,
        torch.cat([cell.igate.weight, cell.fgate.weight]), torch.cat([cell.igate.bias, cell.fgate.bias]),
        cell.outnorm.weight_proxy, layer.learnable_skip, cell.config.num_heads, cell.outnorm.eps)
    return layer.proj_down(h)


def check_kernel(kernel: str) -> str:
    """The one check of a kernel value for AxLSTM: the builder and `set_mlstm_kernel` call it."""
    if kernel not in MLSTM_KERNELS:
        raise ValueError(f"kernel must be one of {MLSTM_KERNELS} for AxLSTM (mLSTM) models, got {kernel!r}")
    return kernel


class ParallelCellBackend:
    """Stands in for `mLSTMCell.backend_fn` (xlstm's `parallel_stabilized_simple`), so that xlstm's
    own layer and cell forward run unchanged around it; `kernel` is a runtime choice, not saved."""

    def __init__(self, kernel: str = "auto"):
        self.kernel = kernel

    def __call__(self, queries, keys, values, igate_preact, fgate_preact, **kwargs):
        needs_grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in (queries, keys, values, igate_preact, fgate_preact))
        path = mlstm_ops.resolve(self.kernel, queries.is_cuda, needs_grad)
        # the C cell reads float32 only (under plain CPU autocast the gates can be bfloat16)
        if path != "reference" and all(t.dtype == torch.float32
                                       for t in (queries, keys, values, igate_preact, fgate_preact)):
            return mlstm_ops.mlstm_parallel_cpu(queries, keys, values, igate_preact, fgate_preact, exact=path == "cpu")
        return parallel_stabilized_simple(queries, keys, values, igate_preact, fgate_preact, **kwargs)


class HeadwiseProjection(LinearHeadwiseExpand):
    """xlstm's q/k/v projection (same parameters and init), computed by `headwise_projection`
    for inference on CPU: the same `bmm` without the two layout copies around it (same bits).
    `kernel` follows `set_mlstm_kernel`: "reference" keeps xlstm's einsum."""

    kernel = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)
        if self.kernel not in ("auto", "cpu", "fused") or x.is_cuda or needs_grad or x.dtype != self.weight.dtype:
            return super().forward(x)
        return mlstm_ops.headwise_projection(x, self.weight, self.bias)


class XLSTMBlock(nn.Module):
    """x + mLSTM(norm(x)), read forward (`reverse=False`) or back to front."""

    def __init__(self, config: XLSTMConfig, reverse: bool, kernel: str = "auto"):
        super().__init__()
        self.reverse = reverse
        self.form = "parallel"  # runtime choice, not saved: see `set_mlstm_form`
        self.norm = ResidualGainLayerNorm(config.embed_dim, config.block_norm_eps)
        self.layer = mLSTMLayer(
            mLSTMLayerConfig(
                embedding_dim=config.embed_dim,
                proj_factor=float(config.expansion),
                qkv_proj_blocksize=config.qkv_blocksize,
                num_heads=config.num_heads,
                conv1d_kernel_size=config.conv_kernel,
                bias=False,
                # the parallel mLSTM form materialises an L x L causal mask of this size
                context_length=1 + config.num_patches,
            )
        )
        self.layer.mlstm_cell.backend_fn = ParallelCellBackend(kernel)
        for projection in (self.layer.q_proj, self.layer.k_proj, self.layer.v_proj):
            # a class swap, not a new module: a fresh one would draw its init again and so change
            # every random initialisation that follows (seeded models must stay as they were)
            projection.__class__ = HeadwiseProjection
            projection.kernel = kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        fits = x.shape[1] <= self.layer.mlstm_cell.causal_mask.shape[0]  # xlstm's parallel form needs that
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or self.layer.proj_up.weight.requires_grad)
        path = mlstm_ops.resolve(self.layer.mlstm_cell.backend_fn.kernel, x.is_cuda, needs_grad)
        if path == "fused" and self.form == "parallel" and fits and x.dtype == torch.float32:
            layer = lambda t: fused_layer_forward(self.layer, t)  # noqa: E731
        elif self.form == "parallel" and fits:
            layer = self.layer
        else:
            layer = lambda t: mlstm_layer_forward(self.layer, t)  # noqa: E731
        if self.reverse:
            return x + layer(h.flip(1)).flip(1)
        return x + layer(h)

    @torch.no_grad()
    def forward_stream(self, x: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, tuple]:
        """One segment in this block's reading order: for a reversed block the caller passes the
        segments last to first (each still in time order), carrying `state` (None at the start)."""
        h = self.norm(x)
        if self.reverse:
            out, state = mlstm_layer_forward(self.layer, h.flip(1), state, carry=True)
            return x + out.flip(1), state
        out, state = mlstm_layer_forward(self.layer, h, state, carry=True)
        return x + out, state


MLSTM_FORMS = ("parallel", "blockwise")


def set_mlstm_form(model: nn.Module, form: str) -> None:
    """Runtime choice for sequences of up to 251 tokens (longer ones always run blockwise).

    "parallel" (default): the parallel form, run by the fused layer (`fused_layer_forward`) for CPU
        inference and by xlstm's own layer forward otherwise (see `set_mlstm_kernel`).
    "blockwise": `mlstm_layer_forward` (PyTorch ops, blockwise cell); the same function, as close
        to a float64 run, slower than the fused layer on CPU.
    """
    if form not in MLSTM_FORMS:
        raise ValueError(f"form must be one of {MLSTM_FORMS}, got {form!r}")
    for module in model.modules():
        if isinstance(module, XLSTMBlock):
            module.form = form


def set_mlstm_kernel(model: nn.Module, kernel: str) -> None:
    """Runtime choice for the mLSTM layers (2 s chunks; longer sequences run `mlstm_blockwise`):

    "auto" (default): the fused layer (`fused_layer_forward`) for float32 inference on CPU, at least
        as close to a float64 run as xlstm's float32 form on the whole model (tests/test_fused_defaults.py);
        xlstm's PyTorch form otherwise (with gradients, on GPU, or without a C compiler);
    "fused": demand the fused layer (error with gradients or when it cannot be built);
    "cpu": xlstm's layer forward around the exact compiled cell, bit-identical to xlstm's float32
        form on most CPUs (the default before the fused layer; refused with gradients, like "fused");
    "reference": always xlstm's PyTorch form.
    """
    check_kernel(kernel)
    for module in model.modules():
        if isinstance(module, XLSTMBlock):
            module.layer.mlstm_cell.backend_fn.kernel = kernel
        if isinstance(module, HeadwiseProjection):
            module.kernel = kernel


def build_xlstm(config: XLSTMConfig, kernel: str = "auto") -> MaskedSpectrogramModel:
    """The mLSTM layers initialise themselves (xlstm's small-init / Wang init). `kernel` as in
    `set_mlstm_kernel` (one of MLSTM_KERNELS; there is no CUDA mLSTM kernel here, so "cuda" is refused)."""
    check_kernel(kernel)  # before any block is built
    model = MaskedSpectrogramModel(config, lambda index: XLSTMBlock(config, reverse=index % 2 == 1, kernel=kernel))
    model.reset_shared_parameters()
    return model


register_family(XLSTMConfig, build_xlstm)


def _create_axlstm(arch: str, kernel: str = "auto", **fields) -> MaskedSpectrogramModel:
    return build_xlstm(XLSTMConfig(arch=arch, **fields), kernel=kernel)


@register_model
def axlstm_tiny(**overrides) -> MaskedSpectrogramModel:
    return _create_axlstm("axlstm_tiny", **{"embed_dim": 192, **overrides})


@register_model
def axlstm_small(**overrides) -> MaskedSpectrogramModel:
    return _create_axlstm("axlstm_small", **{"embed_dim": 384, **overrides})


@register_model
def axlstm_base(**overrides) -> MaskedSpectrogramModel:
    return _create_axlstm("axlstm_base", **{"embed_dim": 768, **overrides})
