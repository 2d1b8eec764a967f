"""Opt-in compiled encoders (`compile=True`) for long evaluations: torch.compile of `forward_features`.

`compile_encoder(encoder)` replaces the encoder's `forward_features` with `CompiledForward`, which
runs torch.compile (inductor; on CPU it generates and builds C++ with the system compiler) for
inference, i.e. under `torch.no_grad()`, as the HEAR runtime calls it; with gradients enabled it runs
the eager forward. Only the 2 s chunk encoder is compiled: `sequence="full"` (`forward_sequence`)
runs eagerly.

Cost and cache: the first call of each input shape compiles (tens of seconds for a tiny model).
Inductor's on-disk caches (FX graph cache, AOTAutograd cache, the built C++ libraries) are kept in
`<hear_msm cache>/inductor` (`$HEAR_MSM_CACHE`, default ~/.cache/hear_msm; `$TORCHINDUCTOR_CACHE_DIR`
wins when set, by the user or by an earlier torch.compile in the process), so a later process with the same model and torch re-traces the
graph but builds nothing: compile cost is paid once per machine and model, not per process.
The graph depends on the architecture, not on the weights (they stay inputs of the graph), so
every checkpoint of an architecture shares it.

Shapes: HEAR chunk batches have `max_batch_chunks` chunks, the last batch of a call fewer. The batch
dimension is marked dynamic for batches of two or more, so they share one graph; a batch of one
gets its own (torch specialises sizes 0 and 1). Inputs are made contiguous first, so that the
caller's memory layout does not matter. So a process compiles each model at most twice (for SSAM /
AxLSTM each time one graph per piece between C kernel calls).

The C kernels of SSAM (selective scan) and AxLSTM (mLSTM cell) stay eager, outside the graph
(`hear_msm.ops.compiled.c_entry_point`): the graph is broken around each call and the PyTorch
work between them is compiled.

Fallback: if compilation fails (no C++ compiler, an unsupported operation, a torch bug), the
forward runs eagerly from then on, with exactly one RuntimeWarning that says why. An error that the
eager forward raises too (bad input) is raised as it is, without a warning.
"""
from __future__ import annotations

import os
import warnings
from typing import Callable

import torch
from torch import nn

from .ops.compiled import cache_dir, hide_c_entry_points_from_compiler


def inductor_cache_dir() -> str:
    """Where inductor keeps its caches: `$TORCHINDUCTOR_CACHE_DIR` if set, else `<hear_msm cache>/inductor`."""
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or str(cache_dir() / "inductor")


class CompiledForward:
    """Stands in for `encoder.forward_features`: [B, 1, T, F] -> [B, N, D], compiled under no_grad.

    eager: the encoder's own bound `forward_features`; backend: torch.compile's backend ("inductor",
    or a callable, e.g. one that raises, to test the fallback); label: the model's name in the warning.
    """

    def __init__(self, eager: Callable, backend: str | Callable = "inductor", label: str = "encoder",
                 dynamic_batch: bool = True):
        self.eager = eager
        self.label = label
        self.dynamic_batch = dynamic_batch  # False: one graph per batch size (benchmarks compare the two)
        self.failure: str | None = None  # why compilation failed; set once, then eager for good
        # inductor reads the variable whenever it touches its cache, so it must be set before the first compile
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache_dir()
        hide_c_entry_points_from_compiler()
        self.compiled = torch.compile(eager, backend=backend, dynamic=False)

    def __call__(self, spectrogram: torch.Tensor) -> torch.Tensor:
        if self.failure is not None or torch.is_grad_enabled():
            return self.eager(spectrogram)
        # one memory layout for every caller (the HEAR runtime passes a transposed view): a graph
        # is specialised to its input strides, and the copy is 64 kB per chunk
        spectrogram = spectrogram.contiguous()
        if self.dynamic_batch and spectrogram.ndim and spectrogram.shape[0] >= 2:
            # one graph for every batch of >= 2 chunks (sizes 0 and 1 are always specialised)
            torch._dynamo.mark_dynamic(spectrogram, 0)
        try:
            return self.compiled(spectrogram)
        except Exception as error:  # noqa: BLE001 - any compiler failure means: run eagerly
            result = self.eager(spectrogram)  # an error of the input itself is raised here, unwarned
            self.failure = _reason(error)
            warnings.warn(f"hear_msm: compile=True could not compile {self.label} ({self.failure}); "
                          "running it eagerly (same results, no speed-up)", RuntimeWarning, stacklevel=2)
            return result


def _reason(error: BaseException) -> str:
    """The root cause of a compiler error in one line: dynamo wraps the backend's exception."""
    root = getattr(error, "inner_exception", None) or error.__cause__ or error
    lines = [line for line in str(root).splitlines() if line.strip()]
    return f"{type(root).__name__}: {lines[0].strip()[:300] if lines else ''}"


def compile_encoder(encoder: nn.Module, backend: str | Callable = "inductor", dynamic_batch: bool = True) -> nn.Module:
    """Compile `encoder.forward_features` in place (see the module docstring) and return the encoder.

    Idempotent: an encoder compiled already is returned as it is."""
    if isinstance(encoder.__dict__.get("forward_features"), CompiledForward):
        return encoder
    label = getattr(getattr(encoder, "config", None), "arch", type(encoder).__name__)
    encoder.forward_features = CompiledForward(encoder.forward_features, backend=backend, label=label,
                                               dynamic_batch=dynamic_batch)
    return encoder


def is_compiled(encoder: nn.Module) -> bool:
    return isinstance(encoder.__dict__.get("forward_features"), CompiledForward)


def check_compile(compile: object, precision: str = "fp32") -> bool:
    """`compile` must be a bool (True or False), and True only with float32 models; ValueError otherwise.

    Why not with precision="bf16": that mode keeps bfloat16 copies of the weights in Python state
    that torch.compile guards on, so it re-traces until it hits its recompile limit (seen with
    ssast_tiny and ssam_tiny) and then runs those parts eagerly: compile cost without the gain."""
    if type(compile) is not bool:
        raise ValueError(f"compile must be True or False, got {compile!r} ({type(compile).__name__})")
    if compile and precision != "fp32":
        raise ValueError(f"compile=True compiles float32 models only, not precision={precision!r}; "
                         "use one of the two (both speed up CPU extraction: benchmarks/README.md)")
    return compile
