#include <math.h>
#include <stdint.h>
#include <string.h>

/* e^x for x in [-87, 88] (callers clamp): x = k ln2 + r, |r| <= ln2 / 2, Cephes expf polynomial
   for e^r, 2^k by bits. */
static inline float exp_in_range(float x) {
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

/* exp(x) for x <= 0. Arguments below -87 are clamped (e^-87 ~ 1.6e-38, below anything the state
   can resolve). */
static inline float exp_nonpositive(float x) {
    return exp_in_range(x < -87.0f ? -87.0f : x);
}

/* e^x for any x, clamped to [-87, 88]. */
static inline float exp_clamped(float x) {
    return exp_in_range(x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x));
}

/* u, delta, y: [batch, length, inner]; A: [inner, nstate]; B, C: [batch, length, nstate];
   D: [inner]; state: [batch, inner, nstate], read as h_0 and overwritten with h_length.
   Channels [e_begin, e_end) only, so that threads can split the channels. NS > 0 fixes the
   state size at compile time (the inner loop then vectorises without a remainder). T and EXP
   are the float type and its exp: float32 is the model's path; the float64 copy exists only
   so that torch.autograd.gradcheck can test the backward below against finite differences. */
#define KERNEL(NAME, T, EXP, NS)                                                                \
static void NAME(const T *restrict u, const T *restrict delta, const T *restrict A,             \
                 const T *restrict B, const T *restrict C, const T *restrict D,                 \
                 T *restrict y, T *restrict state, long batch, long length, long inner,         \
                 long nstate_, long e_begin, long e_end) {                                       \
    const long nstate = NS ? NS : nstate_;                                                       \
    for (long b = 0; b < batch; ++b) {                                                           \
        T *restrict h0 = state + b * inner * nstate;                                             \
        for (long t = 0; t < length; ++t) {                                                      \
            const long row = b * length + t;                                                     \
            const T *restrict ut = u + row * inner, *restrict dt = delta + row * inner;          \
            const T *restrict Bt = B + row * nstate, *restrict Ct = C + row * nstate;            \
            T *restrict yt = y + row * inner;                                                    \
            for (long e = e_begin; e < e_end; ++e) {                                             \
                const T d = dt[e], x = d * ut[e];                                                \
                const T *restrict Ae = A + e * nstate;                                           \
                T *restrict h = h0 + e * nstate;                                                 \
                T acc = 0;                                                                       \
                for (long n = 0; n < nstate; ++n) {                                              \
                    const T hn = EXP(d * Ae[n]) * h[n] + x * Bt[n];                              \
                    h[n] = hn;                                                                   \
                    acc += hn * Ct[n];                                                           \
                }                                                                                \
                yt[e] = acc + D[e] * ut[e];                                                      \
            }                                                                                    \
        }                                                                                        \
    }                                                                                            \
}
KERNEL(scan_n16, float, exp_nonpositive, 16)
KERNEL(scan_n24, float, exp_nonpositive, 24)
KERNEL(scan_any, float, exp_nonpositive, 0)
KERNEL(scan_f64, double, exp, 0)

/* Backward of the scan above. Given dy = dL/dy, with a_t = exp(delta_t A) and x_t = delta_t u_t,
   the adjoint g_t = dL/dh_t runs backwards in time:
       g_t = dy_t C_t + a_{t+1} g_{t+1}                       (g after the last step: 0)
       dC_t += dy_t h_t                 dB_t += g_t x_t        (summed over channels)
       dx_t = g_t . B_t                 s_t = g_t a_t h_{t-1}  (per state element)
       du_t = dx_t delta_t + dy_t D     ddelta_t = dx_t u_t + s_t . A
       dA += s_t delta_t                dD += dy_t u_t         dh_0 = a_1 g_1.
   It needs h_{t-1} and a_t in reverse order. They are RECOMPUTED here, one channel of one clip
   at a time, into `work` ([length + 1, nstate] states + [length, nstate] decays, 48 KB for
   251 x 24 floats, so it stays in L1/L2), instead of being saved by the forward: saving them
   would hold batch * inner * nstate * length floats per block until backward (1.3 GB for
   ssam_tiny at batch 8, 12 blocks), whereas the recomputation costs one more forward's worth of
   exp per step and no memory that grows with the batch or the depth. (Running the recursion
   backwards, h_{t-1} = (h_t - x_t B_t) / a_t, is not an option: a_t underflows to 0.)
   Recomputing per channel makes u, delta, dy, du, ddelta strided reads and writes (stride
   inner), but each cache line is reused by the next 15 channels, so that costs little.
   Threads own channels [e_begin, e_end): du, ddelta, dA, dD and dh0 rows are theirs alone; dB
   and dC sum over channels, so each thread gets its own [batch, length, nstate] pair, summed
   by the caller. h0 and dh0 may be NULL (zero initial state; its gradient not wanted). */
#define BACKWARD(NAME, T, EXP, NS)                                                              \
static void NAME(const T *restrict u, const T *restrict delta, const T *restrict A,             \
                 const T *restrict B, const T *restrict C, const T *restrict D,                 \
                 const T *restrict h0, const T *restrict dy, T *restrict du,                    \
                 T *restrict ddelta, T *restrict dA, T *restrict dB, T *restrict dC,            \
                 T *restrict dD, T *restrict dh0, T *restrict work, long batch, long length,    \
                 long inner, long nstate_, long e_begin, long e_end) {                           \
    const long nstate = NS ? NS : nstate_;                                                       \
    T *restrict hs = work;                                   /* h_0 .. h_length */               \
    T *restrict decay = work + (length + 1) * nstate;        /* a_1 .. a_length */               \
    T *restrict g = decay + length * nstate;                 /* the adjoint, [nstate] */         \
    for (long b = 0; b < batch; ++b) {                                                           \
        const T *restrict Bb = B + b * length * nstate, *restrict Cb = C + b * length * nstate;  \
        T *restrict dBb = dB + b * length * nstate, *restrict dCb = dC + b * length * nstate;    \
        for (long e = e_begin; e < e_end; ++e) {                                                 \
            const T *restrict Ae = A + e * nstate;                                               \
            T *restrict dAe = dA + e * nstate;                                                   \
            for (long n = 0; n < nstate; ++n)                                                    \
                hs[n] = h0 ? h0[(b * inner + e) * nstate + n] : 0;                               \
            for (long t = 0; t < length; ++t) {                                                  \
                const long i = (b * length + t) * inner + e;                                     \
                const T d = delta[i], x = d * u[i];                                              \
                const T *restrict prev = hs + t * nstate, *restrict Bt = Bb + t * nstate;        \
                T *restrict next = hs + (t + 1) * nstate, *restrict a = decay + t * nstate;      \
                for (long n = 0; n < nstate; ++n) {                                              \
                    const T an = EXP(d * Ae[n]);                                                 \
                    a[n] = an;                                                                   \
                    next[n] = an * prev[n] + x * Bt[n];                                          \
                }                                                                                \
            }                                                                                    \
            for (long n = 0; n < nstate; ++n)                                                    \
                g[n] = 0;                                                                        \
            T dDe = 0;                                                                           \
            for (long t = length - 1; t >= 0; --t) {                                             \
                const long i = (b * length + t) * inner + e;                                     \
                const T d = delta[i], ut = u[i], x = d * ut, gy = dy[i];                         \
                const T *restrict prev = hs + t * nstate, *restrict now = hs + (t + 1) * nstate; \
                const T *restrict a = decay + t * nstate;                                        \
                const T *restrict Bt = Bb + t * nstate, *restrict Ct = Cb + t * nstate;          \
                T *restrict dBt = dBb + t * nstate, *restrict dCt = dCb + t * nstate;            \
                T dx = 0, ds = 0;                                                                \
                for (long n = 0; n < nstate; ++n) {                                              \
                    const T gn = g[n] + gy * Ct[n];                                              \
                    const T s = gn * a[n] * prev[n];                                             \
                    dCt[n] += gy * now[n];                                                       \
                    dBt[n] += gn * x;                                                            \
                    dx += gn * Bt[n];                                                            \
                    ds += s * Ae[n];                                                             \
                    dAe[n] += s * d;                                                             \
                    g[n] = gn * a[n];                                                            \
                }                                                                                \
                du[i] = dx * d + gy * D[e];                                                      \
                ddelta[i] = dx * ut + ds;                                                        \
                dDe += gy * ut;                                                                  \
            }                                                                                    \
            dD[e] += dDe;                                                                        \
            if (dh0)                                                                             \
                for (long n = 0; n < nstate; ++n)                                                \
                    dh0[(b * inner + e) * nstate + n] = g[n];                                    \
        }                                                                                        \
    }                                                                                            \
}
BACKWARD(backward_n16, float, exp_nonpositive, 16)
BACKWARD(backward_n24, float, exp_nonpositive, 24)
BACKWARD(backward_any, float, exp_nonpositive, 0)
BACKWARD(backward_f64, double, exp, 0)

/* SiLU-gated output y * silu(z) = y z / (1 + e^-z), the division in double and rounded once
   (PyTorch's `y * F.silu(z)` rounds twice). */
static inline float gated(float y, float z) {
    return (float)((double)y * (double)z / (1.0 + (double)exp_clamped(-z)));
}

/* The scan of KERNEL above for CHANNELS channels at once, vectorised across channels instead of
   across the state: every state row h[n][0..CHANNELS) is one vector (one zmm register with
   AVX-512), the product with C_t is summed per channel in registers, so no horizontal sum is
   needed per channel and time step as in KERNEL. Same arithmetic per state element; y's sum over
   n runs in four interleaved partial sums (n mod 4), added pairwise: four short dependency
   chains instead of one of N additions, and a smaller rounding error than one running sum
   (tests/test_fused_defaults.py). A_t is A transposed, [nstate, inner]. With z
   (rows of z_stride floats, e.g. in_proj's gate half) the output is gated: y * silu(z).
   Channels [e_begin, e_begin + CHANNELS) of every clip; state as in KERNEL, [batch, inner, nstate]. */
#define CHANNELS 16
/* state row n of the block at one time step, its product with C_t added to `acc` */
#define STATE_STEP(n, acc)                                                                       \
    for (long j = 0; j < CHANNELS; ++j) {                                                        \
        const float hn = exp_nonpositive(dt[j] * a[n][j]) * h[n][j] + x[j] * Bt[n];              \
        h[n][j] = hn;                                                                            \
        acc[j] += hn * Ct[n];                                                                    \
    }
/* NS: the state size, a multiple of 4 */
#define BLOCKED(NAME, NS)                                                                        \
static void NAME(const float *restrict u, const float *restrict delta, const float *restrict A_t,\
                 const float *restrict B, const float *restrict C, const float *restrict D,     \
                 const float *restrict z, long z_stride, float *restrict y,                     \
                 float *restrict state, long batch, long length, long inner, long e_begin) {    \
    float h[NS][CHANNELS], a[NS][CHANNELS];                                                       \
    for (long b = 0; b < batch; ++b) {                                                           \
        float *restrict h0 = state + (b * inner + e_begin) * NS;                                 \
        for (long j = 0; j < CHANNELS; ++j)                                                      \
            for (long n = 0; n < NS; ++n) h[n][j] = h0[j * NS + n];                              \
        for (long n = 0; n < NS; ++n)                                                            \
            for (long j = 0; j < CHANNELS; ++j) a[n][j] = A_t[n * inner + e_begin + j];          \
        for (long t = 0; t < length; ++t) {                                                      \
            const long row = b * length + t;                                                     \
            const float *restrict ut = u + row * inner + e_begin;                                \
            const float *restrict dt = delta + row * inner + e_begin;                            \
            const float *restrict Bt = B + row * NS, *restrict Ct = C + row * NS;                \
            float x[CHANNELS], acc0[CHANNELS], acc1[CHANNELS], acc2[CHANNELS], acc3[CHANNELS];   \
            for (long j = 0; j < CHANNELS; ++j) {                                                \
                x[j] = dt[j] * ut[j];                                                            \
                acc0[j] = acc1[j] = acc2[j] = acc3[j] = 0.0f;                                    \
            }                                                                                    \
            for (long n = 0; n < NS; n += 4) {                                                   \
                STATE_STEP(n, acc0) STATE_STEP(n + 1, acc1)                                      \
                STATE_STEP(n + 2, acc2) STATE_STEP(n + 3, acc3)                                  \
            }                                                                                    \
            float *restrict yt = y + row * inner + e_begin;                                      \
            for (long j = 0; j < CHANNELS; ++j)                                                  \
                yt[j] = ((acc0[j] + acc1[j]) + (acc2[j] + acc3[j])) + D[e_begin + j] * ut[j];    \
            if (z) {                                                                             \
                const float *restrict zt = z + row * z_stride + e_begin;                         \
                for (long j = 0; j < CHANNELS; ++j) yt[j] = gated(yt[j], zt[j]);                 \
            }                                                                                    \
        }                                                                                        \
        for (long j = 0; j < CHANNELS; ++j)                                                      \
            for (long n = 0; n < NS; ++n) h0[j * NS + n] = h[n][j];                              \
    }                                                                                            \
}
BLOCKED(blocked_n16, 16)
BLOCKED(blocked_n24, 24)

/* The float32 scan of channels [e_begin, e_end), gated by silu(z) when z is not NULL. For 16 or
   24 states, the whole blocks of CHANNELS channels counted from channel 0 take the blocked form
   and the remaining channels KERNEL's, so that which code computes a channel (and so its bits)
   depends only on the channel, never on how threads split the range (callers split at multiples
   of CHANNELS). A_t: A transposed, [nstate, inner], read by the blocked form only; NULL runs
   every channel in KERNEL's form (the form the blocked one replaced, kept for its parity test). */
void hear_msm_selective_scan(const float *u, const float *delta, const float *A, const float *A_t,
                             const float *B, const float *C, const float *D, const float *z, long z_stride,
                             float *y, float *state, long batch, long length, long inner, long nstate,
                             long e_begin, long e_end) {
    long e = e_begin;
    if (A_t && (nstate == 16 || nstate == 24) && e_begin % CHANNELS == 0) {
        const long whole_blocks_end = inner / CHANNELS * CHANNELS < e_end ? inner / CHANNELS * CHANNELS : e_end;
        for (; e + CHANNELS <= whole_blocks_end; e += CHANNELS) {
            if (nstate == 16)
                blocked_n16(u, delta, A_t, B, C, D, z, z_stride, y, state, batch, length, inner, e);
            else
                blocked_n24(u, delta, A_t, B, C, D, z, z_stride, y, state, batch, length, inner, e);
        }
    }
    if (e >= e_end)
        return;
    if (nstate == 16)
        scan_n16(u, delta, A, B, C, D, y, state, batch, length, inner, nstate, e, e_end);
    else if (nstate == 24)
        scan_n24(u, delta, A, B, C, D, y, state, batch, length, inner, nstate, e, e_end);
    else
        scan_any(u, delta, A, B, C, D, y, state, batch, length, inner, nstate, e, e_end);
    if (z)
        for (long row = 0; row < batch * length; ++row)
            for (long c = e; c < e_end; ++c)
                y[row * inner + c] = gated(y[row * inner + c], z[row * z_stride + c]);
}

/* All channels, split over `threads` OpenMP threads at multiples of CHANNELS. Built with -fopenmp this .so resolves
   libgomp.so.1 to the copy PyTorch has already loaded, so these threads are PyTorch's own
   intra-op team: they are still spinning from the op before and start at once, where a
   separate pool competes with them for the cores (benchmarks/README.md, note 15). */
void hear_msm_selective_scan_parallel(const float *u, const float *delta, const float *A, const float *A_t,
                                      const float *B, const float *C, const float *D, const float *z,
                                      long z_stride, float *y, float *state, long batch, long length,
                                      long inner, long nstate, long threads) {
    const long blocks = (inner + CHANNELS - 1) / CHANNELS;
#ifdef _OPENMP
    #pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (long i = 0; i < threads; ++i) {
        const long lo = blocks * i / threads * CHANNELS, hi = blocks * (i + 1) / threads * CHANNELS;
        hear_msm_selective_scan(u, delta, A, A_t, B, C, D, z, z_stride, y, state, batch, length, inner, nstate,
                                lo, hi < inner ? hi : inner);
    }
}

void hear_msm_selective_scan_f64(const double *u, const double *delta, const double *A, const double *B,
                                 const double *C, const double *D, double *y, double *state, long batch,
                                 long length, long inner, long nstate, long e_begin, long e_end) {
    scan_f64(u, delta, A, B, C, D, y, state, batch, length, inner, nstate, e_begin, e_end);
}

#define BACKWARD_ARGS u, delta, A, B, C, D, h0, dy, du, ddelta, dA, dB, dC, dD, dh0, work, batch, length, \
                      inner, nstate, e_begin, e_end
void hear_msm_selective_scan_backward(const float *u, const float *delta, const float *A, const float *B,
                                      const float *C, const float *D, const float *h0, const float *dy,
                                      float *du, float *ddelta, float *dA, float *dB, float *dC, float *dD,
                                      float *dh0, float *work, long batch, long length, long inner,
                                      long nstate, long e_begin, long e_end) {
    if (nstate == 16)
        backward_n16(BACKWARD_ARGS);
    else if (nstate == 24)
        backward_n24(BACKWARD_ARGS);
    else
        backward_any(BACKWARD_ARGS);
}

void hear_msm_selective_scan_backward_f64(const double *u, const double *delta, const double *A,
                                          const double *B, const double *C, const double *D,
                                          const double *h0, const double *dy, double *du, double *ddelta,
                                          double *dA, double *dB, double *dC, double *dD, double *dh0,
                                          double *work, long batch, long length, long inner, long nstate,
                                          long e_begin, long e_end) {
    backward_f64(BACKWARD_ARGS);
}

/* The mixer's depthwise causal conv and SiLU before the scan, for inference, tokens
   n = clip * L + t in [n_begin, n_end):
       out[n, c] = silu(bias[c] + sum_j w_t[j, c] x[n - (K - 1) + j, c])   (taps before t = 0 are 0)
   x: rows of `x_stride` floats (in_proj's output: u is its first E columns); w_t [K, E]; bias [E]
   or NULL; out [N, E]. The SiLU's division runs in double, rounded once (x / (1 + e^-x); at
   x < -88 e^-x is clamped, giving x / 1.6e38 ~ 0). */
void hear_msm_causal_conv_silu(const float *restrict x, long x_stride, const float *restrict w_t,
                               const float *restrict bias, float *restrict out, long L, long E, long K,
                               long n_begin, long n_end) {
    for (long n = n_begin; n < n_end; ++n) {
        const long t = n % L;
        float *restrict o = out + n * E;
        for (long c = 0; c < E; ++c) o[c] = bias ? bias[c] : 0.0f;
        for (long j = 0; j < K; ++j) {
            if (t - (K - 1) + j < 0) continue;
            const float *restrict row = x + (n - (K - 1) + j) * x_stride;
            const float *restrict w = w_t + j * E;
            for (long c = 0; c < E; ++c) o[c] = w[c] * row[c] + o[c];
        }
        for (long c = 0; c < E; ++c) o[c] = (float)((double)o[c] / (1.0 + (double)exp_clamped(-o[c])));
    }
}

void hear_msm_causal_conv_silu_parallel(const float *x, long x_stride, const float *w_t, const float *bias,
                                        float *out, long L, long E, long K, long count, long threads) {
#ifdef _OPENMP
    #pragma omp parallel for num_threads(threads) schedule(static)
#endif
    for (long i = 0; i < threads; ++i)
        hear_msm_causal_conv_silu(x, x_stride, w_t, bias, out, L, E, K, count * i / threads, count * (i + 1) / threads);
}
