#include <math.h>
#include <stdint.h>
#include <string.h>

/* 16 independent lanes for the row reductions, as GCC/clang vector extensions (gcc does not
   vectorise a max reduction without -ffast-math; the lanes keep it exact: max is order-free) */
#define LANES 16
/* The 64-byte vectors are passed by value only between static inline helpers, never across a
   library boundary, so gcc's note that their calling convention differs without AVX-512 is moot. */
#pragma GCC diagnostic ignored "-Wpsabi"
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
