"""SSAST: the Transformer baseline of the masked spectrogram model family.

Gong et al., "SSAST: Self-Supervised Audio Spectrogram Transformer" (AAAI 2022), in the
configuration Yadav, Theodoridis & Tan use as the baseline for Audio Mamba (SSAM) and Audio
xLSTM (AxLSTM): a pre-norm ViT over 4x16 log-mel patches, MLP ratio 4, exact GELU, qkv bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import onednn
from .encoder import EncoderConfig, MaskedSpectrogramModel, grad_needed
from .registry import register_family, register_model


@dataclass(frozen=True, kw_only=True)
class TransformerConfig(EncoderConfig):
    num_heads: int
    mlp_ratio: float = 4.0

    family = "transformer"

    def __post_init__(self):
        super().__post_init__()
        if self.embed_dim % self.num_heads:
            raise ValueError(f"{self.arch}: embed_dim {self.embed_dim} not divisible by {self.num_heads} heads")


class Attention(nn.Module):
    """Multi-head self-attention: [B, L, D] -> [B, L, D]."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv_layer = nn.Linear(dim, 3 * dim)
        self.proj_layer = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_layer(self.attend(self.qkv_layer(x)))

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Projected [B, L, 3D] (q, k, v, each heads x head_dim) -> attention output [B, L, D] before proj."""
        b, length, three_dim = qkv.shape
        dim = three_dim // 3
        q, k, v = qkv.view(b, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        # q, k, v are strided views [B, heads, L, head_dim] of qkv: the CPU flash kernel reads them
        # without a copy, and its output [B, heads, L, head_dim] is laid out [B, L, heads, head_dim], so
        # the head merge below is a view. It computes softmax(q k^T / sqrt(head_dim)) v, as the
        # authors' explicit form.
        out = F.scaled_dot_product_attention(q, k, v)
        return out.transpose(1, 2).reshape(b, length, dim)


class Mlp(nn.Module):
    """Linear -> GELU -> Linear; `gelu_approximate` "none" (exact erf) or "tanh" (Flax's `nn.gelu`)."""

    def __init__(self, dim: int, hidden: int, gelu_approximate: str = "none"):
        super().__init__()
        self.layer1 = nn.Linear(dim, hidden)
        self.layer2 = nn.Linear(hidden, dim)
        self.gelu_approximate = gelu_approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer2(F.gelu(self.layer1(x), approximate=self.gelu_approximate))


class TransformerBlock(nn.Module):
    """Pre-norm ViT block: x + attn(norm1(x)), then + mlp(norm2(.))."""

    def __init__(self, config: TransformerConfig, gelu_approximate: str = "none", kernel: str = "auto"):
        super().__init__()
        dim = config.embed_dim
        self.norm1 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.attn = Attention(dim, config.num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=config.norm_eps)
        self.mlp = Mlp(dim, int(dim * config.mlp_ratio), gelu_approximate)
        self.kernel = check_kernel(kernel)  # runtime choice, not saved

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if resolve(self.kernel, x, needs_grad=grad_needed(self, x)) == "onednn":
            return self.forward_onednn(x)
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))

    def forward_onednn(self, x: torch.Tensor) -> torch.Tensor:
        """The same block with oneDNN epilogues (inference on CPU, float32): [B, L, D] -> [B, L, D].

        The qkv, proj and first MLP Linear run as oneDNN inner products whose bias add, residual add
        (proj) and exact GELU (layer1) are applied to the accumulator before it is stored, instead of
        ATen's bias broadcast copy, a separate add pass and a separate GELU pass. layer2 (K = 4D)
        stays ATen's (see `ops.onednn.MAX_WIDTH`), with the residual added in place. At D <= 192 every
        result rounded as the reference's on the AMD EPYC measured; tests/test_transformer_fused.py holds
        it to the float64-anchored bound on any CPU.
        """
        attn, mlp = self.attn, self.mlp
        qkv = onednn.linear(self.norm1(x), attn.qkv_layer.weight, attn.qkv_layer.bias)
        x = onednn.linear(attn.attend(qkv), attn.proj_layer.weight, attn.proj_layer.bias, residual=x)
        hidden = self.norm2(x)
        if mlp.gelu_approximate == "none":
            hidden = onednn.linear(hidden, mlp.layer1.weight, mlp.layer1.bias, "gelu")
        else:  # oneDNN's tanh form rounds differently from ATen's (measured), so ATen's runs after it
            hidden = F.gelu(onednn.linear(hidden, mlp.layer1.weight, mlp.layer1.bias), approximate=mlp.gelu_approximate)
        return mlp.layer2(hidden).add_(x)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for linear in (self.attn.qkv_layer, self.attn.proj_layer, self.mlp.layer1, self.mlp.layer2):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)
        for norm in (self.norm1, self.norm2):
            nn.init.ones_(norm.weight)
            nn.init.zeros_(norm.bias)


# "reference": the plain PyTorch block (nn.Linear, F.gelu, adds), also every path with gradients;
# "onednn": `TransformerBlock.forward_onednn`, inference only; "auto": onednn where it can run
# (CPU, float32, no gradients, PyTorch built with oneDNN) and is as accurate, else the reference.
KERNELS = ("auto", "onednn", "reference")

def check_kernel(kernel: str) -> str:
    """The one check of a kernel value for SSAST, called by the builder, blocks and `set_kernel`."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS} for SSAST (Transformer) models, got {kernel!r}")
    return kernel


def resolve(kernel: str, x: torch.Tensor, needs_grad: bool) -> str:
    """The one dispatch decision of the block for input x [B, L, D]: "onednn" or "reference".

    `auto` takes onednn where `ops.onednn.takes` does (float32 CPU tensors without gradients or
    autocast, PyTorch with oneDNN, D <= its MAX_WIDTH, outside torch.compile, whose traced plain
    block inductor fuses itself); `onednn` demands it at any width (ValueError saying why it cannot
    run); `reference` never takes it.
    """
    check_kernel(kernel)
    if kernel == "reference":
        return "reference"
    if kernel == "auto":
        return "onednn" if onednn.takes(x, x.shape[-1], needs_grad) else "reference"
    why_not = onednn.why_not(x, needs_grad)
    if why_not:
        raise ValueError(f"kernel='onednn' cannot run: {why_not}; use kernel='auto' or 'reference'")
    return "onednn"


def set_kernel(model: nn.Module, kernel: str) -> None:
    """Switch every Transformer block in `model` to another implementation (runtime setting)."""
    check_kernel(kernel)
    for module in model.modules():
        if isinstance(module, TransformerBlock) and type(module.attn) is Attention:  # not MW-MAE's windowed
            module.kernel = kernel


def build_transformer(config: TransformerConfig, kernel: str = "auto") -> MaskedSpectrogramModel:
    """`kernel`: one of KERNELS (the same function, see `resolve`)."""
    check_kernel(kernel)
    model = MaskedSpectrogramModel(config, lambda index: TransformerBlock(config, kernel=kernel))
    model.reset_shared_parameters()
    for block in model.blocks:
        block.reset_parameters()
    return model


register_family(TransformerConfig, build_transformer)


def build_training_decoder(embed_dim: int, depth: int, norm_eps: float = 1e-6) -> nn.Sequential:
    """`depth` pre-norm Transformer blocks + LayerNorm, [B, L, D] -> [B, L, D], for pretraining only.

    Placed between any encoder and its prediction head (MAE's light decoder, He et al. 2022), it takes
    over the last steps of pixel reconstruction, so the encoder's final blocks -- the ones the HEAR
    embeddings come from -- need not specialise to it. Heads of 64 channels, as SSAST's. It is saved in
    training checkpoints but never exported: the weights keep the authors' checkpoint format.
    """
    if depth < 1:
        raise ValueError(f"decoder depth must be >= 1, got {depth}")
    config = TransformerConfig(arch="training_decoder", embed_dim=embed_dim, depth=depth,
                               num_heads=max(1, embed_dim // 64), norm_eps=norm_eps)
    blocks = [TransformerBlock(config) for _ in range(depth)]
    for block in blocks:
        block.reset_parameters()
    return nn.Sequential(*blocks, nn.LayerNorm(embed_dim, eps=norm_eps))


def _create_ssast(arch: str, kernel: str = "auto", **fields) -> MaskedSpectrogramModel:
    return build_transformer(TransformerConfig(arch=arch, **fields), kernel=kernel)


@register_model
def ssast_tiny(**overrides) -> MaskedSpectrogramModel:
    return _create_ssast("ssast_tiny", **{"embed_dim": 192, "num_heads": 3, **overrides})


@register_model
def ssast_small(**overrides) -> MaskedSpectrogramModel:
    return _create_ssast("ssast_small", **{"embed_dim": 384, "num_heads": 6, **overrides})


@register_model
def ssast_base(**overrides) -> MaskedSpectrogramModel:
    return _create_ssast("ssast_base", **{"embed_dim": 768, "num_heads": 12, **overrides})
