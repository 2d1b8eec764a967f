"""A compiled selective scan for CPU inference, built on first use with the system C compiler.

Why: the PyTorch reference scan spends most of SSAM's CPU time materialising [B, L, E, N]
decay and drive tensors and launching two small ops per time step (benchmarks/README.md). This
kernel fuses the whole recurrence into one loop that keeps the state [E, N] of one clip in cache:

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * u_t * B_t,    y_t = h_t . C_t + D * u_t

It is ~60 lines of C with no Python or torch headers, so it compiles in well under a second
with any `cc`; the shared library is cached under `$HEAR_MSM_CACHE` (default
`~/.cache/hear_msm`), keyed by a hash of source and flags. `exp` is a Cephes-style polynomial
(relative error ~1e-7 for the non-positive arguments the scan produces) so that the inner loop
vectorises. Forward only: gradients use the PyTorch reference. Parity: tests/test_speed_paths.py.

The library is linked without -ffast-math: gcc would otherwise link crtfastmath.o, which turns
on flush-to-zero for the whole process when the library is loaded.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* exp(x) for x <= 0: x = k ln2 + r, |r| <= ln2 / 2, Cephes expf polynomial for e^r, 2^k by bits.
   Arguments below -87 are clamped (e^-87 ~ 1.6e-38, below anything the state can resolve). */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float k = __builtin_rintf(x * 1.44269504088896341f);
    float r = x - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

/* u, delta, y: [batch, length, inner]; A: [inner, nstate]; B, C: [batch, length, nstate];
   D: [inner]; state: [batch, inner, nstate], read as h_0 and overwritten with h_length.
   Channels [e_begin, e_end) only, so that threads can split the channels. NS > 0 fixes the
   state size at compile time (the inner loop then vectorises without a remainder). */
#define KERNEL(NAME, NS)                                                                        \
static void NAME(const float *restrict u, const float *restrict delta, const float *restrict A, \
                 const float *restrict B, const float *restrict C, const float *restrict D,     \
                 float *restrict y, float *restrict state, long batch, long length, long inner, \
                 long nstate_, long e_begin, long e_end) {                                       \
    const long nstate = NS ? NS : nstate_;                                                       \
    for (long b = 0; b < batch; ++b) {                                                           \
        float *restrict h0 = state + b * inner * nstate;                                         \
        for (long t = 0; t < length; ++t) {                                                      \
            const long row = b * length + t;                                                     \
            const float *restrict ut = u + row * inner, *restrict dt = delta + row * inner;      \
            const float *restrict Bt = B + row * nstate, *restrict Ct = C + row * nstate;        \
            float *restrict yt = y + row * inner;                                                \
            for (long e = e_begin; e < e_end; ++e) {                                             \
                const float d = dt[e], x = d * ut[e];                                            \
                const float *restrict Ae = A + e * nstate;                                       \
                float *restrict h = h0 + e * nstate;                                             \
                float acc = 0.0f;                                                                \
                for (long n = 0; n < nstate; ++n) {                                              \
                    const float hn = exp_nonpositive(d * Ae[n]) * h[n] + x * Bt[n];              \
                    h[n] = hn;                                                                   \
                    acc += hn * Ct[n];                                                           \
                }                                                                                \
                yt[e] = acc + D[e] * ut[e];                                                      \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}
KERNEL(scan_n16, 16)
KERNEL(scan_n24, 24)
KERNEL(scan_any, 0)

void hear_msm_selective_scan(const float *u, const float *delta, const float *A, const float *B,
                             const float *C, const float *D, float *y, float *state, long batch,
                             long length, long inner, long nstate, long e_begin, long e_end) {
    if (nstate == 16)
        scan_n16(u, delta, A, B, C, D, y, state, batch, length, inner, nstate, e_begin, e_end);
    else if (nstate == 24)
        scan_n24(u, delta, A, B, C, D, y, state, batch, length, inner, nstate, e_begin, e_end);
    else
        scan_any(u, delta, A, B, C, D, y, state, batch, length, inner, nstate, e_begin, e_end);
}
"""

_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False
_pool: ThreadPoolExecutor | None = None


def _compile_flags() -> list[str]:
    flags = ["-O3", "-ffast-math", "-fPIC", "-std=c99"]
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    return flags


def _cache_dir() -> Path:
    return Path(os.environ.get("HEAR_MSM_CACHE", Path.home() / ".cache" / "hear_msm"))


def _build() -> ctypes.CDLL:
    compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (set CC or install gcc)")
    flags = _compile_flags()
    key = hashlib.sha256((_SOURCE + " ".join(flags) + sys.platform).encode()).hexdigest()[:16]
    target = _cache_dir() / f"selective_scan_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source, obj, lib = Path(tmp, "scan.c"), Path(tmp, "scan.o"), Path(tmp, "scan.so")
            source.write_text(_SOURCE)
            subprocess.run([compiler, *flags, "-c", str(source), "-o", str(obj)], check=True, capture_output=True)
            subprocess.run([compiler, "-shared", str(obj), "-o", str(lib)], check=True, capture_output=True)
            os.replace(lib, target)  # atomic: concurrent builders never see a half-written file
    library = ctypes.CDLL(str(target))
    library.hear_msm_selective_scan.argtypes = [ctypes.c_void_p] * 8 + [ctypes.c_long] * 6
    library.hear_msm_selective_scan.restype = None
    return library


def load_library() -> ctypes.CDLL | None:
    """The compiled scan, building it on first call; None (with one warning) if it cannot be built."""
    global _library, _tried
    with _lock:
        if not _tried:
            _tried = True
            if os.environ.get("HEAR_MSM_NO_CPU_KERNEL"):
                return None
            try:
                _library = _build()
            except (OSError, RuntimeError, subprocess.CalledProcessError) as err:
                detail = getattr(err, "stderr", b"") or b""
                warnings.warn(
                    f"hear_msm: could not build the compiled CPU selective scan ({err} "
                    f"{detail.decode(errors='replace')[:500]}); using the slower PyTorch reference scan",
                    RuntimeWarning, stacklevel=3,
                )
        return _library


def selective_scan_cpu(u, delta, A, B, C, D, state: torch.Tensor | None = None):
    """Compiled selective scan; same contract as `selective_scan_reference(..., return_state=True)`.

    u, delta: [batch, L, E]; A: [E, N]; B, C: [batch, L, N]; D: [E]; state: [batch, E, N] or
    None (zeros). Returns (y [batch, L, E] float32, final state [batch, E, N] float32). No autograd.
    """
    library = load_library()
    if library is None:
        raise RuntimeError("the compiled CPU selective scan is not available")
    tensors = [t.detach().to(torch.float32).contiguous() for t in (u, delta, A, B, C, D)]
    batch, length, inner = tensors[0].shape
    nstate = tensors[2].shape[1]
    if state is None:
        state = torch.zeros(batch, inner, nstate)
    else:
        state = state.detach().to(torch.float32).contiguous().clone()
    y = torch.empty(batch, length, inner)
    pointers = [t.data_ptr() for t in (*tensors, y, state)]
    # ctypes releases the GIL: threads split the channels (each owns a slice of y and state)
    threads = max(1, min(torch.get_num_threads(), inner // 64))
    if threads == 1 or batch * length * inner < 1 << 16:
        library.hear_msm_selective_scan(*pointers, batch, length, inner, nstate, 0, inner)
    else:
        bounds = [inner * i // threads for i in range(threads + 1)]
        pool = _thread_pool(threads)
        jobs = [pool.submit(library.hear_msm_selective_scan, *pointers, batch, length, inner, nstate, lo, hi)
                for lo, hi in zip(bounds[:-1], bounds[1:])]
        for job in jobs:
            job.result()
    return y, state


def _thread_pool(threads: int) -> ThreadPoolExecutor:
    global _pool
    with _lock:
        if _pool is None or _pool._max_workers < threads:
            _pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hear_msm_scan")
        return _pool
