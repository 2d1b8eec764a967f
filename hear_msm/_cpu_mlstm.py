"""A compiled mLSTM cell (parallel form) for CPU inference, built on first use with the system C compiler.

Why: xlstm's `parallel_stabilized_simple` builds the S x S gate matrix of every head in ~10
separate PyTorch passes (repeat, subtract a transposed copy, mask, add the input gates, row max,
subtract, exp, multiply by QK^T, row sum, divide), each writing a 4 x 251 x 251 tensor per clip:
more than half of AxLSTM-tiny's CPU time (benchmarks/README.md, note 12). The function, per head:

    logD[i, j] = (F[i+1] - F[j+1]) + ig[j]          j <= i, F = [0, cumsum(log sigmoid(fg))]
    m_i        = max_j logD[i, j]
    C[i, j]    = QK[i, j] * exp(logD[i, j] - m_i)    (0 above the diagonal)
    out[i, j]  = C[i, j] / (max(|sum_j C[i, j]|, exp(-m_i)) + eps),   h = out @ V

QK^T and out @ V stay PyTorch matmuls (oneDNN/MKL beat anything this small C file could do),
made by exactly xlstm's calls, and F by the same torch ops.

Default (exact) path, bit-identical to xlstm's float32 result: C writes the stabilised log
weights of the causal triangle, packed, and weighs QK^T in place; exp, the row sum, normaliser
and division stay PyTorch ops on xlstm's shapes. Why not fuse those too: the official fixtures'
random checkpoint amplifies any rounding change ~200x (a correctly rounded exp alone moves its
outputs by 1.6e-4 > the 1e-4 test limit), so only exact rewrites are safe as the default.
Opt-in fused path (`exact=False`): everything between the matmuls in three passes over a row
that stays in L1 (our exp polynomial, a 16-lane row sum): ~1e-7 relative per cell, ~10% faster.
The C is compiled WITHOUT -ffast-math and with -ffp-contract=off: its subtractions, adds,
products and divisions must round exactly as PyTorch's elementwise ops do; the reductions are
vectorised by hand (16 independent lanes; max is order-free, so still exact).

Same build scheme as `_cpu_scan` (cached under `$HEAR_MSM_CACHE`, default ~/.cache/hear_msm,
keyed by a hash of source and flags; no compiler -> one warning and xlstm's PyTorch form).
Forward only.
"""
from __future__ import annotations

import ctypes
import math

import torch
import torch.nn.functional as F

from ._ckernel import CompiledKernel

_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

/* 16 independent lanes for the row reductions, as GCC/clang vector extensions (gcc does not
   vectorise a max reduction without -ffast-math; the lanes keep it exact: max is order-free) */
#define LANES 16
typedef float vfloat __attribute__((vector_size(4 * LANES)));
typedef int32_t vint __attribute__((vector_size(4 * LANES)));

static inline vfloat vload(const float *p) {
    vfloat v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline vfloat vsplat(float x) {
    vfloat v;
    for (int l = 0; l < LANES; ++l) v[l] = x;
    return v;
}

static inline vfloat vmax(vfloat a, vfloat b) {
    const vint a_wins = a > b;
    return (vfloat)(((vint)a & a_wins) | ((vint)b & ~a_wins));
}

#ifdef __FMA__
#define MULADD(a, b, c) __builtin_fmaf((a), (b), (c))
#else
#define MULADD(a, b, c) ((a) * (b) + (c))
#endif

/* e^x for x <= 0. x = k ln2 + r with |r| <= ln2/2 (ln2 split in two so that k * hi is exact),
   e^r by its Taylor series to degree 7 (truncation < 1e-8 relative, below float rounding),
   2^k through the exponent bits. Below -87 the result would be subnormal; it is returned as 0
   (such weights are < 1e-38 of the row's largest and cannot change a float32 sum).
   Rounding to the nearest integer by adding and subtracting 1.5 * 2^23 keeps the loop free of
   calls, so that it vectorises. */
static inline float exp_nonpositive(float x) {
    const float clamped = x < -87.0f ? -87.0f : x;
    const float k = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
    float r = clamped - k * 0.693359375f;
    r = r + k * 2.12194440e-4f;
    float p = 1.98412698e-4f;           /* 1/7! */
    p = MULADD(p, r, 1.38888889e-3f);   /* 1/6! */
    p = MULADD(p, r, 8.33333333e-3f);   /* 1/5! */
    p = MULADD(p, r, 4.16666667e-2f);   /* 1/4! */
    p = MULADD(p, r, 1.66666667e-1f);   /* 1/3! */
    p = MULADD(p, r, 0.5f);
    p = MULADD(p, r, 1.0f);
    p = MULADD(p, r, 1.0f);
    const int32_t bits = ((int32_t)k + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return x < -87.0f ? 0.0f : p * scale;
}

/* Exact path, step 1: the stabilised log weights of the causal (lower) triangle, packed row
   after row (row i holds columns 0..i at offset i (i + 1) / 2; head stride S (S + 1) / 2):
       out[i, j] = ((F[i+1] - F[j+1]) + ig[j]) - m_i,   m_i = max_j (F[i+1] - F[j+1]) + ig[j]
   and row_max [bh, S] = m. The same operations in the same order as xlstm's torch code, so the
   same bits. Packing leaves out the -inf above the diagonal: PyTorch's exp of -inf is ~10x
   slower than of a finite number on this CPU (benchmarks/README.md, note 12). */
void hear_msm_mlstm_log_weights(float *restrict out, float *restrict row_max, const float *restrict fcum,
                                const float *restrict igate, long S, long h_begin, long h_end) {
    const long packed = S * (S + 1) / 2;
    for (long h = h_begin; h < h_end; ++h) {
        const float *restrict f = fcum + h * (S + 1) + 1; /* f[j] = F[j + 1] */
        const float *restrict g = igate + h * S;
        for (long i = 0; i < S; ++i) {
            float *restrict row = out + h * packed + i * (i + 1) / 2;
            const float fi = f[i];
            const long n = i + 1, body = n - n % LANES;
            for (long j = 0; j < n; ++j) row[j] = (fi - f[j]) + g[j];
            vfloat lane_max = vsplat(-INFINITY);
            for (long j = 0; j < body; j += LANES) lane_max = vmax(lane_max, vload(row + j));
            float m = lane_max[0];
            for (int l = 1; l < LANES; ++l) m = lane_max[l] > m ? lane_max[l] : m;
            for (long j = body; j < n; ++j) m = row[j] > m ? row[j] : m;
            for (long j = 0; j < n; ++j) row[j] = row[j] - m;
            row_max[h * S + i] = m;
        }
    }
}

/* Exact path, step 3 (after PyTorch's exp of step 1's output): qk [bh, S, S] *= the decay
   weights, in place; above the diagonal qk * 0, as xlstm's qk * exp(-inf) gives. */
void hear_msm_mlstm_weigh(float *restrict qk, const float *restrict weights, long S, long h_begin, long h_end) {
    const long packed = S * (S + 1) / 2;
    for (long h = h_begin; h < h_end; ++h)
        for (long i = 0; i < S; ++i) {
            float *restrict row = qk + (h * S + i) * S;
            const float *restrict w = weights + h * packed + i * (i + 1) / 2;
            for (long j = 0; j <= i; ++j) row[j] = row[j] * w[j];
            for (long j = i + 1; j < S; ++j) row[j] = row[j] * 0.0f;
        }
}

/* qk: [bh, S, S] = Q K^T / sqrt(d) per head, overwritten with the normalised gate-weighted
   matrix; fcum: [bh, S + 1] (leading 0, then the cumulative log forget gates); igate: [bh, S].
   Heads [h_begin, h_end) only, so that threads can split the heads. */
void hear_msm_mlstm_gates(float *restrict qk, const float *restrict fcum, const float *restrict igate,
                          long S, float eps, long h_begin, long h_end) {
    float logd[S + LANES];
    for (long h = h_begin; h < h_end; ++h) {
        const float *restrict f = fcum + h * (S + 1) + 1; /* f[j] = F[j + 1] */
        const float *restrict g = igate + h * S;
        for (long i = 0; i < S; ++i) {
            float *restrict row = qk + (h * S + i) * S;
            const float fi = f[i];
            const long n = i + 1; /* causal: columns 0..i */
            const long body = n - n % LANES;
            /* pass 1: log weights and their row maximum (the stabiliser) */
            for (long j = 0; j < n; ++j) logd[j] = (fi - f[j]) + g[j];
            vfloat lane_max = vsplat(-INFINITY);
            for (long j = 0; j < body; j += LANES) lane_max = vmax(lane_max, vload(logd + j));
            float m = lane_max[0];
            for (int l = 1; l < LANES; ++l) m = lane_max[l] > m ? lane_max[l] : m;
            for (long j = body; j < n; ++j) m = logd[j] > m ? logd[j] : m;
            /* pass 2: weighted scores and their row sum */
            float lane_sum[LANES];
            for (int l = 0; l < LANES; ++l) lane_sum[l] = 0.0f;
            for (long j = 0; j < body; j += LANES)
                for (int l = 0; l < LANES; ++l) {
                    const float c = row[j + l] * exp_nonpositive(logd[j + l] - m);
                    row[j + l] = c;
                    lane_sum[l] += c;
                }
            for (long j = body; j < n; ++j) {
                const float c = row[j] * exp_nonpositive(logd[j] - m);
                row[j] = c;
                lane_sum[0] += c;
            }
            for (int width = LANES / 2; width > 0; width /= 2)
                for (int l = 0; l < width; ++l) lane_sum[l] += lane_sum[l + width];
            /* pass 3: normalise (a true division, as PyTorch does) and zero the future */
            const float floor_ = expf(-m);
            const float total = fabsf(lane_sum[0]);
            const float denominator = (total > floor_ ? total : floor_) + eps;
            for (long j = 0; j < n; ++j) row[j] = row[j] / denominator;
            for (long j = n; j < S; ++j) row[j] = 0.0f;
        }
    }
}

/* The three entry points over all heads [0, count), split over `threads` OpenMP threads (PyTorch's
   own team when built with -fopenmp; sequential otherwise), as `_cpu_scan` does. */
#ifdef _OPENMP
#define OVER_HEADS _Pragma("omp parallel for num_threads(threads) schedule(static)")
#else
#define OVER_HEADS
#endif

void hear_msm_mlstm_log_weights_parallel(float *out, float *row_max, const float *fcum, const float *igate,
                                         long S, long count, long threads) {
    OVER_HEADS
    for (long t = 0; t < threads; ++t)
        hear_msm_mlstm_log_weights(out, row_max, fcum, igate, S, count * t / threads, count * (t + 1) / threads);
}

void hear_msm_mlstm_weigh_parallel(float *qk, const float *weights, long S, long count, long threads) {
    OVER_HEADS
    for (long t = 0; t < threads; ++t)
        hear_msm_mlstm_weigh(qk, weights, S, count * t / threads, count * (t + 1) / threads);
}

void hear_msm_mlstm_gates_parallel(float *qk, const float *fcum, const float *igate, long S, float eps,
                                   long count, long threads) {
    OVER_HEADS
    for (long t = 0; t < threads; ++t)
        hear_msm_mlstm_gates(qk, fcum, igate, S, eps, count * t / threads, count * (t + 1) / threads);
}
"""

def _compile_flags() -> list[str]:
    # no -ffast-math: the elementwise arithmetic must round like PyTorch's (module docstring);
    # -fno-math-errno / -fno-trapping-math only let gcc vectorise, they do not change results
    flags = ["-O3", "-fPIC", "-std=c99", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"]
    capability = torch.backends.cpu.get_cpu_capability()  # "DEFAULT", "AVX2", "AVX512", ...
    if capability in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma"]
    if capability == "AVX512":
        flags += ["-mavx512f", "-mprefer-vector-width=512"]
    return flags


def _declare(library: ctypes.CDLL) -> None:
    library.hear_msm_mlstm_gates.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_float] + [ctypes.c_long] * 2
    library.hear_msm_mlstm_log_weights.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    library.hear_msm_mlstm_weigh.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 3
    library.hear_msm_mlstm_gates_parallel.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_long, ctypes.c_float] + \
        [ctypes.c_long] * 2
    library.hear_msm_mlstm_log_weights_parallel.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_long] * 3
    library.hear_msm_mlstm_weigh_parallel.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_long] * 3
    for name in ("gates", "log_weights", "weigh"):
        getattr(library, f"hear_msm_mlstm_{name}").restype = None
        getattr(library, f"hear_msm_mlstm_{name}_parallel").restype = None


_KERNEL = CompiledKernel("mlstm_gates", _SOURCE, _compile_flags, _declare,
                         what="CPU mLSTM kernel", fallback="xlstm's PyTorch parallel form", openmp=True)
load_library = _KERNEL.load
_thread_pool = _KERNEL.thread_pool


def mlstm_parallel_cpu(queries, keys, values, igate_preact, fgate_preact, eps: float = 1e-6,
                       exact: bool = True, **unused):
    """mLSTM cell in parallel form, the function of xlstm's `parallel_stabilized_simple`; no autograd.

    queries, keys, values: [B, NH, S, DH], any strides (xlstm passes head views of [B, S, NH * DH]
    tensors); igate_preact, fgate_preact: [B, NH, S, 1] (float32, CPU). Returns h [B, NH, S, DH]
    as a view of a time-major [B, S, NH, DH] tensor, the layout xlstm's head norm reads next.

    exact=True: bit-identical to xlstm's float32 result. C builds the packed log weights and
    weighs QK^T; exp, the row sum, the normaliser and the division stay PyTorch ops on tensors
    of xlstm's shapes (their rounding, and the sum's order, are PyTorch's).
    exact=False: everything between the two matmuls in one C pass per row (faster; our exp and
    sum order: ~1e-7 relative per cell, but the whole model can amplify that to ~2e-5:
    benchmarks/README.md, note 12).
    The two matmuls are xlstm's `bmm`s, one per clip on strided head views instead of on packed
    copies (same bits, see tests; with `headwise_projection` the whole forward is ~1.2x faster,
    benchmarks/README.md note 13).
    """
    library = load_library()
    if library is None:
        raise RuntimeError("the compiled CPU mLSTM kernel is not available")
    batch, heads, length, dim = queries.shape
    count = batch * heads
    with torch.no_grad():
        # the same torch calls as xlstm for everything outside the gate matrix: same bits
        log_fgates = F.logsigmoid(fgate_preact)
        fcum = torch.cat([log_fgates.new_zeros(batch, heads, 1, 1), torch.cumsum(log_fgates, dim=-2)], dim=-2)
        fcum = fcum.reshape(count, length + 1).contiguous()
        igate = igate_preact.reshape(count, length).contiguous()
        keys = keys / math.sqrt(dim)
        scores = queries.new_empty(batch, heads, length, length)
        for clip in range(batch):
            torch.bmm(queries[clip], keys[clip].transpose(-2, -1), out=scores[clip])
        if exact:
            weights = queries.new_empty(count, length * (length + 1) // 2)
            row_max = queries.new_empty(batch, heads, length, 1)
            _run(library.hear_msm_mlstm_log_weights, count, length,
                 weights.data_ptr(), row_max.data_ptr(), fcum.data_ptr(), igate.data_ptr(), length)
            weights.exp_()  # PyTorch's exp: its rounding is the reference's (elementwise, position-free)
            _run(library.hear_msm_mlstm_weigh, count, length, scores.data_ptr(), weights.data_ptr(), length)
            normaliser = torch.maximum(scores.sum(dim=-1, keepdim=True).abs(), torch.exp(-row_max))
            scores.div_(normaliser + eps)
        else:
            _run(library.hear_msm_mlstm_gates, count, length,
                 scores.data_ptr(), fcum.data_ptr(), igate.data_ptr(), length, eps)
        hidden = queries.new_empty(batch, length, heads, dim)
        for clip in range(batch):
            torch.bmm(scores[clip], values[clip], out=hidden[clip].transpose(0, 1))
        return hidden.transpose(1, 2)


def headwise_projection(inputs: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """xlstm's `LinearHeadwiseExpand` (block-diagonal projection) without its layout copies; no autograd.

    inputs [..., NH * d]; weight [NH, o, d]: out[..., h, o] = sum_d inputs[..., h, d] weight[h, o, d].
    xlstm's einsum runs this as one `bmm` over heads on a head-major copy of the inputs and then
    copies the result back to token-major order; here the same `bmm` reads the inputs in place and
    writes its result straight into token-major order (same bits; 0.72 vs 1.14 ms at [5, 251, 384]).
    """
    heads, out_per_head, in_per_head = weight.shape
    lead = inputs.shape[:-1]
    by_head = inputs.reshape(-1, heads, in_per_head).transpose(0, 1)  # [NH, N, d], a view when possible
    out = inputs.new_empty(lead.numel(), heads, out_per_head)
    torch.bmm(by_head, weight.transpose(1, 2), out=out.transpose(0, 1))
    out = out.view(*lead, heads * out_per_head)
    return out if bias is None else out + bias


def _run(function, count: int, length: int, *args) -> None:
    """function(*args, begin, end) over heads [0, count), split over threads (each owns its rows):
    on PyTorch's OpenMP team through the `_parallel` entry point when the library has OpenMP,
    else on a pool (ctypes releases the GIL)."""
    threads = max(1, min(torch.get_num_threads(), count))
    if threads == 1 or length < 32:
        function(*args, 0, count)
        return
    if _KERNEL.uses_openmp:
        getattr(load_library(), function.__name__ + "_parallel")(*args, count, threads)
        return
    bounds = [count * t // threads for t in range(threads + 1)]
    pool = _thread_pool(threads)
    for job in [pool.submit(function, *args, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]:
        job.result()
