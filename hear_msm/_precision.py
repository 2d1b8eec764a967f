"""bfloat16 inference on CPU (`precision="bf16"`): matmuls in bfloat16, float32 where numerics need it.

How: the model's inference entry points (`forward_features`, `forward_sequence`, `forward`) run
under `torch.autocast("cpu", dtype=torch.bfloat16)` and return float32. Autocast runs linear,
convolution, matmul and attention in bfloat16 (oneDNN's AVX512-BF16 / AMX kernels) and leaves
every other op in the dtype of its input. What that gives each family, and the float32 islands
added where it is not enough (a module whose class is swapped for a subclass that turns autocast
off and casts bfloat16 inputs to float32; parameters, buffers and state_dict are untouched; the
linear and conv layers outside the islands keep bfloat16 copies of their weights, see `set_precision`):

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
             inputs, so its state is float32. SSAMBA averages its two scan directions and sums
             the two blocks of a pair in bfloat16 (one rounding each) before the float32 stream.
  AxLSTM     proj_up, conv, q/k/v and proj_down in bfloat16. Island: the whole mLSTM cell (the
             gate projections, log-sigmoid cumsum, stabiliser, normaliser, the gate-weighted
             matmuls and the head GroupNorm): under plain autocast all of it would run in
             bfloat16, including a cumulative sum over 251 log forget gates. The layer's other
             paths (`mlstm_layer_forward`: `set_mlstm_form("blockwise")` and the full-sequence
             mode) compute the cell inline rather than through the cell module, so a block that
             takes them runs wholly in float32.

Only where the CPU has native bfloat16 arithmetic: AVX512-BF16 or AMX-BF16 on x86, the BF16
extension on Arm (`cpu_has_native_bf16`). Elsewhere PyTorch still runs bfloat16, emulated through
float32 conversions around every matmul, slower than float32 (benchmarks/README.md, note 19). Asking for
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
ENTRY_POINTS = ("forward", "forward_features", "forward_sequence")  # run under autocast, return float32


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


_BASES: dict[type, type] = {}  # every class made here -> the class it was made from
_MADE: dict[tuple[str, type], type] = {}


def _derived(kind: str, cls: type, methods: dict, doc: str | None = None) -> type:
    """One subclass of `cls` per kind, with `methods` overridden; same name and module as `cls`, so
    that reprs, error messages and isinstance checks read as before."""
    if (kind, cls) not in _MADE:
        made = type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__, "__qualname__": cls.__qualname__,
                                           "__doc__": doc or cls.__doc__})
        _MADE[kind, cls] = made
        _BASES[made] = cls
    return _MADE[kind, cls]


def _base_class(cls: type) -> type:
    return _BASES.get(cls, cls)


def _island_class(cls: type) -> type:
    """A subclass of `cls` whose forward runs in float32 with autocast off."""
    def forward(self, *args, **kwargs):
        with torch.autocast("cpu", enabled=False):
            return cls.forward(self, *_float32(args), **_float32(kwargs))

    return _derived("island", cls, {"forward": forward},
                    f"{cls.__name__} as a float32 island of bfloat16 inference (hear_msm._precision).")


def _xlstm_block_class(cls: type) -> type:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the parallel form goes through the mLSTM cell module (an island); the other paths compute
        # the cell inline (hear_msm.models.xlstm.mlstm_layer_forward), so the whole block runs in float32
        if self.form == "parallel" and x.shape[1] <= self.layer.mlstm_cell.causal_mask.shape[0]:
            return cls.forward(self, x)
        with torch.autocast("cpu", enabled=False):
            return cls.forward(self, x.float())

    def forward_stream(self, x: torch.Tensor, state):
        with torch.autocast("cpu", enabled=False):
            return cls.forward_stream(self, x.float(), state)

    return _derived("xlstm_block", cls, {"forward": forward, "forward_stream": forward_stream})


def _bf16_autocast() -> bool:
    return torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


def _cached_bf16(module: nn.Module, name: str) -> torch.Tensor | None:
    """`module.<name>` rounded to bfloat16 once, and again only after the parameter changes in place
    (its version counter moves: load_state_dict, an optimiser step)."""
    tensor = getattr(module, name)
    if tensor is None:
        return None
    cache = module.__dict__.setdefault("_bf16_cache", {})
    key = (tensor.data_ptr(), tensor._version)
    if name not in cache or cache[name][0] != key:
        with torch.no_grad():
            cache[name] = (key, tensor.detach().to(torch.bfloat16))
    return cache[name][1]


def _cached_weight_class(cls: type) -> type:
    """Linear / Conv whose bfloat16 weights are kept between calls. Autocast would otherwise round
    every weight again at each encoder call (its own cache lives only as long as the outermost
    autocast region): for a base model 30-40% of a one-chunk call. Outside bfloat16 autocast (a
    float32 island, a float32 path) the float32 weights are used as before."""
    if issubclass(cls, nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not _bf16_autocast() or torch.is_grad_enabled():
                return cls.forward(self, x)
            return nn.functional.linear(x.to(torch.bfloat16), _cached_bf16(self, "weight"), _cached_bf16(self, "bias"))
    else:
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if not _bf16_autocast() or torch.is_grad_enabled():
                return cls.forward(self, x)
            return self._conv_forward(x.to(torch.bfloat16), _cached_bf16(self, "weight"), _cached_bf16(self, "bias"))

    return _derived("cached_bf16_weights", cls, {"forward": forward})


def precision_swaps(model: nn.Module) -> list[tuple[nn.Module, type]]:
    """(module, class to give it) for bf16 inference: the float32 islands, and the matmul layers
    outside them that keep bfloat16 copies of their weights."""
    from .models.mamba import MambaMixer
    from .models.xlstm import XLSTMBlock

    swaps, in_islands = [], set()
    for module in model.modules():
        if isinstance(module, MambaMixer):  # SSAM and SSAMBA (both directions)
            for name in ("dt_proj", "dt_proj_b"):
                if isinstance(getattr(module, name, None), nn.Module):
                    swaps.append((getattr(module, name), _island_class(type(getattr(module, name)))))
        elif isinstance(module, XLSTMBlock):
            swaps.append((module, _xlstm_block_class(type(module))))
            cell = module.layer.mlstm_cell
            swaps.append((cell, _island_class(type(cell))))
    for module, made in swaps:
        if _MADE.get(("island", _base_class(made))) is made:
            in_islands.update(module.modules())
    for module in model.modules():
        if type(module) in (nn.Linear, nn.Conv1d, nn.Conv2d) and module not in in_islands:
            swaps.append((module, _cached_weight_class(type(module))))
    return swaps


def _bf16_entry(function):
    @functools.wraps(function)
    def run(*args, **kwargs):
        for value in (*args, *kwargs.values()):
            if isinstance(value, torch.Tensor) and value.device.type != "cpu":
                raise ValueError(f"this model was loaded with precision='bf16', which runs on the CPU only; got an "
                                 f"input on {value.device}: load it with precision='fp32' for that device")
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return _float32(function(*args, **kwargs))
    return run


def _entry_class(cls: type) -> type:
    """A subclass of the model's class whose inference entry points run under bfloat16 autocast."""
    methods = {name: _bf16_entry(getattr(cls, name)) for name in ENTRY_POINTS if hasattr(cls, name)}
    return _derived("entry", cls, {**methods, "precision": "bf16"})


def set_precision(model: nn.Module, precision: str) -> nn.Module:
    """Switch a hear_msm encoder between "fp32" and "bf16" inference, in place; returns `model`.

    bf16 (see the module docstring): `forward_features`, `forward_sequence` and `forward` run under
    CPU bfloat16 autocast with the float32 islands, inputs float32 [B, 1, frames, bins] as before,
    outputs float32 of the same shapes. The parameters stay float32, so `state_dict`, saving and
    switching back to fp32 are unaffected; the linear and conv layers outside the islands keep a
    bfloat16 copy of their weights beside them (half the float32 weights' memory again), made at
    the first call and again whenever a parameter changes in place. For inference (with gradients
    enabled, plain autocast runs instead of the copies); checks the CPU first (`check_precision`).
    """
    check_precision(precision)
    for module in model.modules():
        module.__class__ = _base_class(type(module))
        module.__dict__.pop("_bf16_cache", None)
    if precision == "bf16":
        for module, made in precision_swaps(model):
            module.__class__ = made
        model.__class__ = _entry_class(type(model))
    return model


def model_precision(model: nn.Module) -> str:
    """"bf16" for a model switched by `set_precision`, else "fp32"."""
    return getattr(model, "precision", "fp32")
