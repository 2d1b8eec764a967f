"""AxLSTM: Audio xLSTM, a masked spectrogram model built from mLSTM blocks.

Yadav, Theodoridis & Tan, "Audio xLSTMs: Learning Self-Supervised Audio Representations with
xLSTMs" (2024); xLSTM from Beck et al. (NeurIPS 2024), arranged as in Vision-LSTM (Alkin et al.,
2024): every block is a pre-norm mLSTM layer, even blocks read the token sequence forward and odd
blocks read it reversed, so stacking gives both directions. No sLSTM blocks.

The mLSTM layer itself is the `xlstm` package's `mLSTMLayer` (expansion 2, block-diagonal 4x4
q/k/v projections, 4 heads, causal conv of width 4, learnable skip), whose parameter names are
the authors' checkpoint names. This file adds the block around it: a weight-only LayerNorm that
scales by (1 + weight) and the direction flip.
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

from ._encoder import EncoderConfig, MaskedSpectrogramModel
from ._registry import register_family, register_model


@dataclass(frozen=True, kw_only=True)
class XLSTMConfig(EncoderConfig):
    expansion: int = 2
    qkv_blocksize: int = 4
    num_heads: int = 4
    conv_kernel: int = 4
    block_norm_eps: float = 1e-5

    family = "xlstm"


class ResidualGainLayerNorm(nn.Module):
    """LayerNorm without bias whose stored weight is the offset from unit gain (scale = 1 + w)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), weight=1.0 + self.weight, eps=self.eps)


class XLSTMBlock(nn.Module):
    """x + mLSTM(norm(x)), read forward (`reverse=False`) or back to front."""

    def __init__(self, config: XLSTMConfig, reverse: bool):
        super().__init__()
        self.reverse = reverse
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if self.reverse:
            return x + self.layer(h.flip(1)).flip(1)
        return x + self.layer(h)


def build_xlstm(config: XLSTMConfig, **runtime_options) -> MaskedSpectrogramModel:
    """The mLSTM layers initialise themselves (xlstm's small-init / Wang init)."""
    model = MaskedSpectrogramModel(config, lambda index: XLSTMBlock(config, reverse=index % 2 == 1))
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
