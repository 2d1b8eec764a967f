"""bfloat16 inference on CPU (`precision="bf16"`): matmuls in bfloat16, float32 where numerics need it.

How: the model's inference entry points (`forward_features`, `forward_sequence`, `forward`) run
under `torch.autocast("cpu", dtype=torch.bfloat16)` and return float32. Autocast runs linear,
convolution, matmul and attention in bfloat16 (oneDNN's AVX512-BF16 / AMX kernels) and leaves
every other op in the dtype of its input. What that gives each family, and the float32 islands
added where it is not enough (a module whose class is swapped for a subclass that turns autocast
off and casts bfloat16 inputs to float32; parameters, buffers and state_dict are untouched):

  all        The residual stream stays float32: the patch embedding's bfloat16 output is added to
             the float32 position table, and every block adds its bfloat16 output to the float32
             stream. So the pre-norm LayerNorms read float32 and compute in float32, and so does the
             final norm; the embeddings come back as float32. The log-mel / fbank front end runs
             before the encoder, in float32.
  SSAST,     q, k, v in bfloat16 into the fused attention kernel, whose softmax and row sums
  MW-MAE     accumulate in float32 (ATen's CPU flash attention); GELU on bfloat16 values.
  SSAM,      in_proj, conv, x_proj and out_proj in bfloat16. Island: `dt_proj` (rank -> inner, a
  SSAMBA     tiny matmul), since the step delta sets the state's decay exp(delta A) over hundreds
             of steps. The selective scan (compiled CPU kernel or the reference) takes float32
             inputs, so its state is float32.
  AxLSTM     proj_up, conv, q/k/v and proj_down in bfloat16. Island: the whole mLSTM cell (the
             gate projections, log-sigmoid cumsum, stabiliser, normaliser, the gate-weighted
             matmuls and the head GroupNorm): under plain autocast all of it would run in
             bfloat16, including a cumulative sum over 251 log forget gates. The layer's other
             paths (`mlstm_layer_forward`: `set_mlstm_form("blockwise")` and the full-sequence
             mode) compute the cell inline rather than through the cell module, so a block that
             takes them runs wholly in float32.

Only where the CPU has native bfloat16 arithmetic: AVX512-BF16 or AMX-BF16 on x86, the BF16
extension on Arm (`cpu_has_native_bf16`). Elsewhere PyTorch still runs bfloat16, emulated through
float32 conversions around every matmul, slower than float32 (benchmarks/README.md). Asking for
it there is a ValueError rather than a warning and a silent fall back to float32: the caller asked
for a specific numeric format, and embeddings quietly computed in another one (or quietly slower)
would be worse than an error that names the choice ("fp32"). Also refused: any device but the
CPU (this module implements CPU autocast only; a model moved to a GPU after loading is refused at
its first call). `HEAR_MSM_CPU_BF16=0` makes the detection report "no native bfloat16" (to try the
refusal on any machine), `=1` reports "native" (to run the numerics on any CPU, slowly).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

PRECISIONS = ("fp32", "bf16")
ENV_OVERRIDE = "HEAR_MSM_CPU_BF16"
_NATIVE_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}  # x86 (AVX512-BF16, AMX) and Arm (FEAT_BF16)
_LOW_PRECISION = (torch.bfloat16, torch.float16)


def cpu_flags() -> set[str]:
    """The CPU's feature flags from /proc/cpuinfo ("flags" on x86, "Features" on Arm); empty elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 dot products natively (AVX512-BF16, AMX-BF16 or Arm BF16),
    as PyTorch's own CPU probe or /proc/cpuinfo says; `HEAR_MSM_CPU_BF16=0|1` overrides it."""
    override = os.environ.get(ENV_OVERRIDE, "")
    if override:
        if override not in ("0", "1"):
            raise ValueError(f"{ENV_OVERRIDE} must be 0 (no native bfloat16) or 1 (native), got {override!r}")
        return override == "1"
    probe = getattr(torch._C, "_cpu", None)
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        if probe is not None and hasattr(probe, name) and getattr(probe, name)():
            return True
    return bool(cpu_flags() & _NATIVE_FLAGS)


def check_precision(precision: str, device: str | torch.device | None = None,
                    native_bf16: bool | None = None) -> str:
    """`precision` if it can run on `device` (None: the CPU); ValueError saying why not otherwise.

    native_bf16: what `cpu_has_native_bf16()` would say, injectable for tests (None: ask it).
    """
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS} ('fp32': float32, the default; 'bf16': bfloat16 "
                         f"matmuls on CPUs with native bfloat16), got {precision!r}")
    if precision == "fp32":
        return precision
    device = torch.device("cpu" if device is None else device)
    if device.type != "cpu":
        raise ValueError(f"precision='bf16' is implemented for CPU inference only, not on device {str(device)!r}; "
                         "use precision='fp32' there")
    native = cpu_has_native_bf16() if native_bf16 is None else native_bf16
    if not native:
        raise ValueError("precision='bf16' needs a CPU with native bfloat16 arithmetic (x86 AVX512-BF16 or "
                         "AMX-BF16, Arm BF16); this CPU has none, so bfloat16 would be emulated and slower than "
                         "float32: use precision='fp32'")
    return precision


def _float32(value):
    """bfloat16 / float16 tensors (also inside tuples, lists, dicts) as float32; everything else as is."""
    if isinstance(value, torch.Tensor):
        return value.float() if value.dtype in _LOW_PRECISION else value
    if isinstance(value, (tuple, list)):
        return type(value)(_float32(v) for v in value)
    if isinstance(value, dict):
        return {k: _float32(v) for k, v in value.items()}
    return value


_ISLANDS: dict[type, type] = {}  # module class -> its float32 island subclass


def _island_class(cls: type) -> type:
    """A subclass of `cls` whose forward runs in float32 with autocast off."""
    if cls not in _ISLANDS:
        def forward(self, *args, **kwargs):
            with torch.autocast("cpu", enabled=False):
                return cls.forward(self, *_float32(args), **_float32(kwargs))

        _ISLANDS[cls] = type(cls.__name__, (cls,), {
            "forward": forward, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
            "__doc__": f"{cls.__name__} as a float32 island of bfloat16 inference (hear_msm._precision)."})
        _ISLANDS[_ISLANDS[cls]] = _ISLANDS[cls]
    return _ISLANDS[cls]


def _xlstm_block_forward(self, x: torch.Tensor) -> torch.Tensor:
    # the parallel form goes through the mLSTM cell module (an island); the other paths compute the
    # cell inline (hear_msm.models.xlstm.mlstm_layer_forward), so the whole block runs in float32
    cls = type(self).__mro__[1]
    parallel = self.form == "parallel" and x.shape[1] <= self.layer.mlstm_cell.causal_mask.shape[0]
    if parallel:
        return cls.forward(self, x)
    with torch.autocast("cpu", enabled=False):
        return cls.forward(self, x.float())


def _xlstm_block_stream(self, x: torch.Tensor, state):
    with torch.autocast("cpu", enabled=False):
        return type(self).__mro__[1].forward_stream(self, x.float(), state)


_XLSTM_BLOCKS: dict[type, type] = {}


def _xlstm_block_class(cls: type) -> type:
    if cls not in _XLSTM_BLOCKS:
        _XLSTM_BLOCKS[cls] = type(cls.__name__, (cls,), {
            "forward": _xlstm_block_forward, "forward_stream": _xlstm_block_stream, "__module__": cls.__module__,
            "__qualname__": cls.__qualname__, "__doc__": cls.__doc__})
        _XLSTM_BLOCKS[_XLSTM_BLOCKS[cls]] = _XLSTM_BLOCKS[cls]
    return _XLSTM_BLOCKS[cls]


def float32_islands(model: nn.Module) -> list[tuple[nn.Module, type]]:
    """(module, class to give it) for every module of `model` that bfloat16 inference keeps in float32."""
    from .models.mamba import MambaMixer
    from .models.xlstm import XLSTMBlock

    swaps = []
    for module in model.modules():
        if isinstance(module, MambaMixer):  # SSAM and SSAMBA (both directions)
            for name in ("dt_proj", "dt_proj_b"):
                if isinstance(getattr(module, name, None), nn.Module):
                    swaps.append((getattr(module, name), _island_class(type(getattr(module, name)))))
        elif isinstance(module, XLSTMBlock):
            swaps.append((module, _xlstm_block_class(type(module))))
            cell = module.layer.mlstm_cell
            swaps.append((cell, _island_class(type(cell))))
    return swaps


def _base_class(cls: type) -> type:
    return cls.__mro__[1] if _ISLANDS.get(cls) is cls or _XLSTM_BLOCKS.get(cls) is cls else cls


ENTRY_POINTS = ("forward", "forward_features", "forward_sequence")


def _bf16_entry(function):
    @functools.wraps(function)
    def run(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                raise ValueError(f"this model was loaded with precision='bf16', which runs on the CPU only; got an "
                                 f"input on {value.device}: load it with precision='fp32' for that device")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _float32(function(*args, **kwargs))
    run.bf16_entry = True
    return run


_ENTRY_CLASSES: dict[type, type] = {}


def _entry_class(cls: type) -> type:
    """A subclass of the model's class whose inference entry points run under bfloat16 autocast."""
    if cls not in _ENTRY_CLASSES:
        methods = {name: _bf16_entry(getattr(cls, name)) for name in ENTRY_POINTS if hasattr(cls, name)}
        _ENTRY_CLASSES[cls] = type(cls.__name__, (cls,), {
            **methods, "__module__": cls.__module__, "__qualname__": cls.__qualname__, "__doc__": cls.__doc__,
            "precision": "bf16"})
        _ENTRY_CLASSES[_ENTRY_CLASSES[cls]] = _ENTRY_CLASSES[cls]
    return _ENTRY_CLASSES[cls]


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """Switch a hear_msm encoder between "fp32" and "bf16" inference, in place; returns `model`.

    bf16 (see the module docstring): `forward_features`, `forward_sequence` and `forward` run under
    CPU bfloat16 autocast with the float32 islands, inputs float32 [B, 1, frames, bins] as before,
    outputs float32 of the same shapes. Weights stay float32 (autocast rounds them to bfloat16 for
    each matmul), so `state_dict`, saving and switching back to fp32 are unaffected. For inference;
    checks the CPU first (`check_precision`).
    """
    check_precision(precision)
    entry = _ENTRY_CLASSES.get(type(model))
    base = type(model).__mro__[1] if entry is type(model) else type(model)
    if precision == "bf16":
        model.__class__ = _entry_class(base)
        for module, island in float32_islands(model):
            module.__class__ = island
    else:
        model.__class__ = base
        for module in model.modules():
            module.__class__ = _base_class(type(module))
    return model


def model_precision(model: nn.Module) -> str:
    """"bf16" for a model switched by `set_precision`, else "fp32"."""
    return getattr(model, "precision", "fp32")
