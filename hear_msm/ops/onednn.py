"""oneDNN's Linear (`torch.ops.mkldnn._linear_pointwise`) for float32 inference on CPU.

PyTorch's own `F.linear` runs MKL's GEMM on x86; oneDNN's inner product can also apply the bias,
a residual add or an exact GELU to its accumulator before storing it (SSAST's block), and for
some shapes its GEMM is simply faster (benchmarks/README.md, notes 17 and 23). Whether a Linear may
take it is decided here once, for every family that uses it (`transformer.resolve`, SSAM's
in_proj): float32 CPU tensors, no gradients, no autocast, PyTorch built with oneDNN and oneDNN
switched on, outside torch.compile (which traces the plain ops and fuses them itself).

Accuracy: up to K = in_features = MAX_WIDTH oneDNN's Linear and ATen's gave identical bits; from
K = 256 on, oneDNN measured 1.2-1.4x ATen's RMS error against float64 (as if it summed all K
products in one chain where ATen's GEMM sums blocks of K), so the automatic choice keeps wider
Linears on ATen's.
"""
from __future__ import annotations

import functools

import torch

MAX_WIDTH = 192


@functools.cache
def available() -> bool:
    """PyTorch's oneDNN Linear with fused epilogues exists here."""
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        torch.ops.mkldnn._linear_pointwise.binary
    except (AttributeError, RuntimeError):
        return False
    return True


def why_not(x: torch.Tensor, needs_grad: bool) -> str:
    """Why oneDNN's Linear cannot take input x here, or "" when it can."""
    if needs_grad:
        return "gradients are needed (it is an inference path)"
    if x.device.type != "cpu" or x.dtype != torch.float32:
        return f"the input is {x.dtype} on {x.device.type} (it runs float32 on CPU)"
    if torch.is_autocast_enabled("cpu"):  # autocast does not see the oneDNN op: it would stay float32
        return "CPU autocast is on"
    if not available():
        return "this PyTorch has no oneDNN Linear with fused epilogues"
    if not torch._C._get_mkldnn_enabled():
        return "oneDNN is switched off (torch.backends.mkldnn.flags(enabled=False))"
    return ""


def takes(x: torch.Tensor, in_features: int, needs_grad: bool) -> bool:
    """The automatic choice for one Linear of input x: oneDNN where it runs and rounds as ATen's
    (in_features <= MAX_WIDTH), never while torch.compile traces."""
    return in_features <= MAX_WIDTH and not torch.compiler.is_compiling() and not why_not(x, needs_grad)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, epilogue: str = "none",
           residual: torch.Tensor | None = None) -> torch.Tensor:
    """x @ weight.T (+ bias), then `epilogue` ("none" or "gelu": exact GELU), or + `residual`
    (then no epilogue), all before the result is stored. [..., K] -> [..., N]."""
    if residual is not None:
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    if epilogue == "gelu":
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
