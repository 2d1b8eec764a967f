"""A compiled selective scan (forward and backward) for CPU, built on first use with the system C compiler.

Why: the PyTorch reference scan spends most of SSAM's CPU time materialising [B, L, E, N]
decay and drive tensors and launching two small ops per time step (benchmarks/README.md). This
kernel fuses the whole recurrence into one loop that keeps the state [E, N] of one clip in cache:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t,    y_t = h_t . C_t + D * u_t

The C has no Python or torch headers, so it compiles in about a second with any `cc`; the shared
library is cached under `$HEAR_MSM_CACHE` (default `~/.cache/hear_msm`), keyed by a hash of source
and flags. `exp` is a Cephes-style polynomial (relative error ~1e-7 for the non-positive arguments
the scan produces) so that the inner loop vectorises. For the state sizes of the models (16, 24) the
inference forward runs 16 channels at a time, vectorised across channels (one state row per
vector), and can multiply by the mixer's output gate silu(z) in the same loop; other sizes and the
last E mod 16 channels take the per-channel loop. Training: a compiled backward (the adjoint
recursion run backwards in time, with the states recomputed per channel rather than stored; see
the comment at BACKWARD) wrapped in a torch.autograd.Function (`selective_scan_cpu_autograd`),
which replaces the reference scan's autograd graph of ~5 [batch, E, N] tensors per time step
(14 GB for ssam_tiny at batch 8).
Parity: tests/test_speed_paths.py, tests/test_scan_backward.py.

The library is linked without -ffast-math: gcc would otherwise link crtfastmath.o, which turns
on flush-to-zero for the whole process when the library is loaded.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Callable

import torch

from .compiled import CompiledKernel, c_entry_point, require_float32

_SOURCE = Path(__file__).with_name("csrc") / "selective_scan.c"

def _compile_flags() -> list[str]:
    flags = ["-O3", "-ffast-math", "-fPIC", "-std=c99"]
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512":
        # the channel-blocked scan keeps one 16-channel state row per 512-bit register
        flags += ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-mprefer-vector-width=512"]
    return flags


def _declare(library: ctypes.CDLL) -> None:
    # u, delta, A, A_t, B, C, D, z, z_stride, y, state, then the sizes
    scan_float32 = [ctypes.c_void_p] * 8 + [ctypes.c_long] + [ctypes.c_void_p] * 2 + [ctypes.c_long] * 4
    library.hear_msm_selective_scan.argtypes = scan_float32 + [ctypes.c_long] * 2  # e_begin, e_end
    library.hear_msm_selective_scan_parallel.argtypes = scan_float32 + [ctypes.c_long]  # threads
    library.hear_msm_selective_scan_f64.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_long] * 6
    for name in ("hear_msm_selective_scan", "hear_msm_selective_scan_parallel", "hear_msm_selective_scan_f64"):
        getattr(library, name).restype = None
    for name in ("hear_msm_selective_scan_backward", "hear_msm_selective_scan_backward_f64"):
        getattr(library, name).argtypes = [ctypes.c_void_p] * 16 + [ctypes.c_long] * 6
        getattr(library, name).restype = None
    for name in ("hear_msm_causal_conv_silu", "hear_msm_causal_conv_silu_parallel"):
        getattr(library, name).argtypes = [ctypes.c_void_p, ctypes.c_long] + [ctypes.c_void_p] * 3 + [ctypes.c_long] * 5
        getattr(library, name).restype = None


KERNELS = ("auto", "cuda", "cpu", "reference")

_KERNEL = CompiledKernel("selective_scan", _SOURCE, _compile_flags, _declare,
                         what="CPU selective scan", fallback="the slower PyTorch reference scan", openmp=True)
load_library = _KERNEL.load
_thread_pool = _KERNEL.thread_pool


def selective_scan_reference(u, delta, A, B, C, D, state=None, return_state=False):
    """Selective scan, sequential in time (pure PyTorch).

    u, delta: [batch, L, E] (delta already softplus-ed and biased); A: [E, N];
    B, C: [batch, L, N]; D: [E]; state: [batch, E, N] carried in from a previous segment
    (zeros when None). Returns y: [batch, L, E] (and the final state with `return_state`) with
        h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,   y_t = h_t . C_t + D * u_t.
    Each step builds only its own [batch, E, N] terms, so memory does not grow with L beyond the
    outputs; iterating over `unbind` views keeps autograd's backward linear in L.
    """
    state = u.new_zeros(u.shape[0], u.shape[2], A.shape[1]) if state is None else state
    outputs = []
    for delta_t, u_t, b_t, c_t in zip(delta.unbind(1), u.unbind(1), B.unbind(1), C.unbind(1)):
        state = torch.exp(delta_t.unsqueeze(-1) * A) * state + (delta_t * u_t).unsqueeze(-1) * b_t.unsqueeze(1)
        outputs.append(torch.bmm(state, c_t.unsqueeze(-1)).squeeze(-1))  # [b, E]
    y = torch.stack(outputs, dim=1) + u * D
    return (y, state) if return_state else y


def load_cuda_scan() -> Callable | None:
    """mamba-ssm's fused `selective_scan_fn`, or None where it cannot run."""
    if not torch.cuda.is_available():
        return None
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except ImportError:
        return None
    return selective_scan_fn


def use_cuda_kernel(kernel: str, tensor_is_cuda: bool, kernel_loader: Callable = load_cuda_scan) -> bool:
    """The dispatch decision: fused CUDA scan or not (then `use_cpu_kernel` decides).

    `auto` takes the kernel when the tensor is on CUDA and mamba-ssm imports; `cuda` demands it
    (clear error otherwise); `cpu` and `reference` never use it.
    """
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if kernel in ("reference", "cpu") or (kernel == "auto" and not tensor_is_cuda):
        return False
    available = kernel_loader() is not None
    if kernel == "cuda" and not (tensor_is_cuda and available):
        raise ValueError(
            "kernel='cuda' needs the input on a CUDA device and mamba-ssm installed "
            "(pip install 'hear_msm[cuda]'); use kernel='auto' or 'reference' on CPU"
        )
    return available


def use_cpu_kernel(kernel: str, tensor_is_cuda: bool, kernel_loader: Callable | None = None) -> bool:
    """Compiled CPU scan or the PyTorch reference, for tensors not on CUDA.

    `auto` takes it for CPU tensors when it builds (one warning and the reference otherwise);
    `cpu` demands it (clear error when on CUDA or when it cannot be built). With or without
    gradients: the compiled scan has a compiled backward.
    """
    if kernel not in ("auto", "cpu") or tensor_is_cuda:
        if kernel == "cpu" and tensor_is_cuda:
            raise ValueError("kernel='cpu' needs CPU tensors; use kernel='auto' or 'cuda' on a GPU")
        return False
    kernel_loader = load_library if kernel_loader is None else kernel_loader
    available = kernel_loader() is not None
    if kernel == "cpu" and not available:
        raise ValueError("kernel='cpu' needs a C compiler (cc/gcc) to build the CPU scan on first use; "
                         "use kernel='auto' or 'reference'")
    return available


def resolve(kernel: str, tensor_is_cuda: bool) -> str:
    """The one dispatch decision of the scan: "cuda" (mamba-ssm's fused kernel), "cpu" (the compiled
    scan, forward and backward) or "reference" (PyTorch). Raises ValueError for a kernel name that
    is not one of `KERNELS` or a demanded kernel that cannot run here (see the two steps above)."""
    if use_cuda_kernel(kernel, tensor_is_cuda):
        return "cuda"
    return "cpu" if use_cpu_kernel(kernel, tensor_is_cuda) else "reference"


@c_entry_point
def selective_scan_cpu(u, delta, A, B, C, D, state: torch.Tensor | None = None, gate: torch.Tensor | None = None):
    """Compiled selective scan; same contract as `selective_scan_reference(..., return_state=True)`.

    u, delta: [batch, L, E]; A: [E, N]; B, C: [batch, L, N]; D: [E]; state: [batch, E, N] or
    None (zeros); gate: [batch, L, E] or None. Returns (y [batch, L, E] float32, final state
    [batch, E, N] float32), with y multiplied by silu(gate) when a gate is given (the mixer's
    output gate, computed in the scan's loop instead of two more passes). No autograd (see
    `selective_scan_cpu_autograd` for training).
    """
    return _forward(_library_or_raise(), (u, delta, A, B, C, D), state, torch.float32, gate=gate)


@c_entry_point
def causal_conv_silu_cpu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """silu(depthwise causal conv of x over time), the mixer's step before the scan; no autograd.

    x [B, L, E] float32 (any row stride with unit column stride: in_proj's output split in two);
    weight [E, 1, K]; bias [E] or None. Returns [B, L, E] contiguous: the scan's input layout.
    One pass over the tokens in C instead of oneDNN's conv on a channel-first copy, its output
    copy, and PyTorch's SiLU; as accurate against float64 (tests/test_fused_defaults.py).
    """
    library = _library_or_raise()
    require_float32("the compiled causal conv", x=x, weight=weight, bias=bias)
    batch, length, inner = x.shape
    kernel_size = weight.shape[-1]
    with torch.no_grad():
        if x.stride(-1) != 1 or (batch > 1 and x.stride(0) != length * x.stride(1)):
            x = x.contiguous()
        taps = weight.reshape(inner, kernel_size).t().contiguous()  # [K, E]
        bias = None if bias is None else bias.contiguous()
        out = x.new_empty(batch, length, inner)
        args = (x.data_ptr(), x.stride(1), taps.data_ptr(), None if bias is None else bias.data_ptr(), out.data_ptr(),
                length, inner, kernel_size)
        tokens = batch * length
        threads = max(1, min(torch.get_num_threads(), tokens // 64))
        if threads > 1 and _KERNEL.uses_openmp:
            library.hear_msm_causal_conv_silu_parallel(*args, tokens, threads)
        else:
            library.hear_msm_causal_conv_silu(*args, 0, tokens)
        return out


@c_entry_point
def selective_scan_cpu_autograd(u, delta, A, B, C, D):
    """Compiled selective scan with a compiled backward: y [batch, L, E] from a zero initial state,
    differentiable in u, delta, A, B, C and D. Computes in float64 when u is float64 (for
    gradcheck), else in float32 like `selective_scan_cpu`; gradients come back in each input's dtype."""
    return _SelectiveScan.apply(u, delta, A, B, C, D)


def _library_or_raise() -> ctypes.CDLL:
    library = load_library()
    if library is None:
        raise RuntimeError("the compiled CPU selective scan is not available")
    return library


# the C scan's channel block (CHANNELS in csrc/selective_scan.c): thread splits fall on its multiples
CHANNEL_BLOCK = 16


def _split_channels(inner: int, work: int) -> list[tuple[int, int]]:
    """Channel ranges, one per thread, split at multiples of CHANNEL_BLOCK (so a channel's bits do
    not depend on the split). ctypes releases the GIL, so threads can run the C loops at once;
    small problems stay on the calling thread (the pool round-trip would dominate)."""
    threads = max(1, min(torch.get_num_threads(), inner // 64))
    if threads == 1 or work < 1 << 16:
        return [(0, inner)]
    blocks = -(-inner // CHANNEL_BLOCK)
    bounds = [min(inner, blocks * i // threads * CHANNEL_BLOCK) for i in range(threads + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _run(function, ranges: list[tuple[int, int]], per_range) -> None:
    """function(*per_range(index, lo, hi)) for each channel range, on the pool if more than one."""
    if len(ranges) == 1:
        function(*per_range(0, *ranges[0]))
        return
    pool = _thread_pool(len(ranges))
    jobs = [pool.submit(function, *per_range(i, lo, hi)) for i, (lo, hi) in enumerate(ranges)]
    for job in jobs:
        job.result()


def _forward(library, inputs, state, dtype, gate: torch.Tensor | None = None, channel_blocks: bool = True):
    """The C scan; `gate` (float32 only) multiplies y by silu(gate). `channel_blocks=False` runs
    every channel in the per-channel form that the channel-blocked one replaced (for its parity test)."""
    tensors = [t.detach().to(dtype).contiguous() for t in inputs]
    batch, length, inner = tensors[0].shape
    nstate = tensors[2].shape[1]
    if state is None:
        state = torch.zeros(batch, inner, nstate, dtype=dtype)
    else:
        state = state.detach().to(dtype).contiguous().clone()
    y = torch.empty(batch, length, inner, dtype=dtype)
    ranges = _split_channels(inner, batch * length * inner)
    if dtype == torch.float64:
        if gate is not None:
            raise ValueError("the float64 scan (for gradcheck) takes no gate")
        pointers = [t.data_ptr() for t in (*tensors, y, state)]
        _run(library.hear_msm_selective_scan_f64, ranges,
             lambda i, lo, hi: (*pointers, batch, length, inner, nstate, lo, hi))
        return y, state
    u, delta, A, B, C, D = tensors
    A_t = A.t().contiguous() if channel_blocks else None  # [N, E]: the blocked form reads a state row per vector
    z_stride = 0
    if gate is not None:
        if tuple(gate.shape) != (batch, length, inner):  # the C reads every element of these rows
            raise ValueError(f"the scan's gate must have u's shape {(batch, length, inner)}, got {tuple(gate.shape)}")
        gate = gate.detach().to(dtype)
        if gate.stride(-1) != 1 or (batch > 1 and gate.stride(0) != length * gate.stride(1)):
            gate = gate.contiguous()  # rows of any stride (in_proj's output split in two) are read in place
        z_stride = gate.stride(1)
    pointers = [u.data_ptr(), delta.data_ptr(), A.data_ptr(), None if A_t is None else A_t.data_ptr(),
                B.data_ptr(), C.data_ptr(), D.data_ptr(), None if gate is None else gate.data_ptr(), z_stride,
                y.data_ptr(), state.data_ptr()]
    # each thread owns a slice of the channels of y and state
    if len(ranges) > 1 and _KERNEL.uses_openmp:
        library.hear_msm_selective_scan_parallel(*pointers, batch, length, inner, nstate, len(ranges))
    else:
        _run(library.hear_msm_selective_scan, ranges,
             lambda i, lo, hi: (*pointers, batch, length, inner, nstate, lo, hi))
    return y, state


def _backward(library, inputs, dy, dtype):
    """Gradients (du, ddelta, dA, dB, dC, dD) of sum(dy * y) for a zero initial state."""
    u, delta, A, B, C, D = inputs
    batch, length, inner = u.shape
    nstate = A.shape[1]
    dy = dy.to(dtype).contiguous()
    du, ddelta = torch.empty_like(u), torch.empty_like(u)
    dA, dD = torch.zeros_like(A), torch.zeros_like(D)
    ranges = _split_channels(inner, batch * length * inner)
    # dB and dC sum over channels: one zeroed pair per thread, added up below
    dB = torch.zeros(len(ranges), batch, length, nstate, dtype=dtype)
    dC = torch.zeros_like(dB)
    work = torch.empty(len(ranges), (2 * length + 2) * nstate, dtype=dtype)  # see BACKWARD in the C
    shared = [t.data_ptr() for t in (u, delta, A, B, C, D)]
    function = (library.hear_msm_selective_scan_backward_f64 if dtype == torch.float64
                else library.hear_msm_selective_scan_backward)
    _run(function, ranges, lambda i, lo, hi: (
        *shared, None, dy.data_ptr(), du.data_ptr(), ddelta.data_ptr(), dA.data_ptr(), dB[i].data_ptr(),
        dC[i].data_ptr(), dD.data_ptr(), None, work[i].data_ptr(), batch, length, inner, nstate, lo, hi))
    return du, ddelta, dA, dB.sum(0), dC.sum(0), dD


class _SelectiveScan(torch.autograd.Function):
    """The compiled forward (the same C loop as inference) and the compiled backward.

    Saves only the six inputs (delta, B and C are [batch, L, E or N], small next to the
    [batch, L, E, N] states); the backward recomputes the states one channel at a time."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D):
        dtype = torch.float64 if u.dtype == torch.float64 else torch.float32
        library = _library_or_raise()
        inputs = [t.detach().to(dtype).contiguous() for t in (u, delta, A, B, C, D)]
        y, _ = _forward(library, inputs, None, dtype)
        ctx.save_for_backward(*inputs)
        ctx.dtypes = [t.dtype for t in (u, delta, A, B, C, D)]
        ctx.library, ctx.dtype = library, dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        grads = _backward(ctx.library, ctx.saved_tensors, dy, ctx.dtype)
        return tuple(g.to(dtype) if needed else None
                     for g, dtype, needed in zip(grads, ctx.dtypes, ctx.needs_input_grad))
