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

/* e^x for x in [-87, 88] (callers clamp): x = k ln2 + r with |r| <= ln2/2 (ln2 split in two so that k * hi is exact),
   e^r by its Taylor series to degree 7 (truncation < 1e-8 relative, below float rounding),
   2^k through the exponent bits. Below -87 the result would be subnormal; it is returned as 0
   (such weights are < 1e-38 of the row's largest and cannot change a float32 sum): see
   `exp_nonpositive`.
   Rounding to the nearest integer by adding and subtracting 1.5 * 2^23 keeps the loop free of
   calls, so that it vectorises. */
static inline float exp_series(float clamped) {
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
    return p * scale;
}

static inline float exp_nonpositive(float x) {
    const float e = exp_series(x < -87.0f ? -87.0f : x);
    return x < -87.0f ? 0.0f : e;
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

/* The fused gate pass of rows [row0, row0 + rows) of the S x S gate matrix: qk [bh, rows, width]
   holds Q K^T / sqrt(d) of those rows against columns 0..width-1 (width >= row0 + rows: every
   causal column; a row block of the matrix, so that the matmuls can skip the zero triangle);
   overwritten with the normalised gate-weighted rows, zero right of the diagonal.
   fcum: [bh, S + 1] (leading 0, then the cumulative log forget gates); igate: [bh, S].
   Heads [h_begin, h_end) only, so that threads can split the heads. */
void hear_msm_mlstm_gates_rows(float *restrict qk, const float *restrict fcum, const float *restrict igate,
                               long S, long row0, long rows, long width, float eps, long h_begin, long h_end) {
    float logd[S + LANES];
    for (long h = h_begin; h < h_end; ++h) {
        const float *restrict f = fcum + h * (S + 1) + 1; /* f[j] = F[j + 1] */
        const float *restrict g = igate + h * S;
        for (long i = row0; i < row0 + rows; ++i) {
            float *restrict row = qk + (h * rows + i - row0) * width;
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
            for (int width_ = LANES / 2; width_ > 0; width_ /= 2)
                for (int l = 0; l < width_; ++l) lane_sum[l] += lane_sum[l + width_];
            /* pass 3: normalise (a true division, as PyTorch does) and zero the future */
            const float floor_ = expf(-m);
            const float total = fabsf(lane_sum[0]);
            const float denominator = (total > floor_ ? total : floor_) + eps;
            for (long j = 0; j < n; ++j) row[j] = row[j] / denominator;
            for (long j = n; j < width; ++j) row[j] = 0.0f;
        }
    }
}

/* qk: [bh, S, S] = Q K^T / sqrt(d) per head, overwritten with the normalised gate-weighted
   matrix (all rows of `hear_msm_mlstm_gates_rows`). */
void hear_msm_mlstm_gates(float *restrict qk, const float *restrict fcum, const float *restrict igate,
                          long S, float eps, long h_begin, long h_end) {
    hear_msm_mlstm_gates_rows(qk, fcum, igate, S, 0, S, S, eps, h_begin, h_end);
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

void hear_msm_mlstm_gates_rows_parallel(float *qk, const float *fcum, const float *igate, long S, long row0,
                                        long rows, long width, float eps, long count, long threads) {
    OVER_HEADS
    for (long t = 0; t < threads; ++t)
        hear_msm_mlstm_gates_rows(qk, fcum, igate, S, row0, rows, width, eps, count * t / threads,
                                  count * (t + 1) / threads);
}

void hear_msm_mlstm_gates_parallel(float *qk, const float *fcum, const float *igate, long S, float eps,
                                   long count, long threads) {
    OVER_HEADS
    for (long t = 0; t < threads; ++t)
        hear_msm_mlstm_gates(qk, fcum, igate, S, eps, count * t / threads, count * (t + 1) / threads);
}

/* ------------------------------------------------------------------------------------------------
   The fused layer (the default for CPU inference): everything of xlstm's mLSTMLayer between its
   two projections that is not the cell's matmuls, in two passes over the tokens (`layer_in`
   before the cell, `layer_out` after it) and one over the gates (`forget_cumsum`). Tokens are
   rows n = clip * L + t. Rounding differs from PyTorch's op-by-op form; its accuracy against a
   float64 run is tested on the whole model (tests/test_speed_paths.py). */

/* e^x for any float x: the range reduction and series of `exp_series`, 0 below -87 and
   +inf above 88.7 (the sigmoid below only needs its limits there). */
static inline float exp_any(float x) {
    const float e = exp_series(x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x));
    return x < -87.0f ? 0.0f : (x > 88.7f ? INFINITY : e);
}

static inline float vsum(vfloat v) {
    for (int width = LANES / 2; width > 0; width /= 2)
        for (int l = 0; l < width; ++l) v[l] += v[l + width];
    return v[0];
}

/* picks[d][l] = (l / bs) * bs + d: the lane of x that lane l of the d-th product of `blockdiag`
   reads (its block's d-th input). Built once per call of the layer: built inside the projection,
   these 16 stores per product cost more than the projection's arithmetic. */
static void blockdiag_picks(vint *picks, long bs) {
    for (long d = 0; d < bs && d < LANES; ++d)
        for (int l = 0; l < LANES; ++l) picks[d][l] = (int32_t)((l / bs) * bs + d);
}

/* out[c] = sum_d x[(c / bs) * bs + d] * w_t[d * D + c]: xlstm's block-diagonal (head-wise) q/k/v
   projection of one token, blocks of bs; w_t [bs, D] holds weight[c / bs, c % bs, d] at [d, c];
   picks from `blockdiag_picks`. */
static void blockdiag(float *restrict out, const float *restrict x, const float *restrict w_t, long D, long bs,
                      const vint *restrict picks) {
#if defined(__GNUC__) && !defined(__clang__)
    if (LANES % bs == 0 && D % LANES == 0) {
        for (long c0 = 0; c0 < D; c0 += LANES) {
            const vfloat xv = vload(x + c0);
            vfloat acc = vsplat(0.0f);
            for (long d = 0; d < bs; ++d)
                acc += vload(w_t + d * D + c0) * __builtin_shuffle(xv, picks[d]);
            memcpy(out + c0, &acc, sizeof acc);
        }
        return;
    }
#endif
    for (long c = 0; c < D; ++c) {
        float acc = 0.0f;
        for (long d = 0; d < bs; ++d) acc += w_t[d * D + c] * x[(c / bs) * bs + d];
        out[c] = acc;
    }
}

/* Before the cell, tokens [n_begin, n_end):
     up [N, 2D]: proj_up's output, x_mlstm = up[:, :D] (z = up[:, D:] is read by layer_out);
     act = silu(causal depthwise conv of x_mlstm over the clip's tokens; conv_w_t [K, D], conv_b [D] or NULL)
     q = blockdiag(act, wq_t), k = blockdiag(act, wk_t), v = blockdiag(x_mlstm, wv_t)      [N, D] each
     gates [N, G] = w_gates [G, 3D] . [q, k, v] + b_gates (xlstm's igate rows, then fgate rows)
   k is stored multiplied by k_scale (1 / sqrt(head dim), as the cell uses it); the gates read it
   unscaled. The gate dot products run in 16 lanes, added up as a tree. */
void hear_msm_mlstm_layer_in(const float *restrict up, const float *restrict conv_w_t, const float *restrict conv_b,
                             const float *restrict wq_t, const float *restrict wk_t, const float *restrict wv_t,
                             const float *restrict w_gates, const float *restrict b_gates,
                             float *restrict act, float *restrict q, float *restrict k, float *restrict v,
                             float *restrict gates, long L, long D, long K, long bs, long G, float k_scale,
                             long n_begin, long n_end) {
    float k_raw[D + LANES];
    vint picks[LANES];
    blockdiag_picks(picks, bs);
    for (long n = n_begin; n < n_end; ++n) {
        const long t = n % L;
        float *restrict a = act + n * D;
        for (long c = 0; c < D; ++c) a[c] = conv_b ? conv_b[c] : 0.0f;
        for (long j = 0; j < K; ++j) {
            const long source = t - (K - 1) + j;
            if (source < 0) continue;
            const float *restrict x = up + (n - (K - 1) + j) * 2 * D;
            const float *restrict w = conv_w_t + j * D;
            for (long c = 0; c < D; ++c) a[c] = MULADD(w[c], x[c], a[c]);
        }
        /* silu with the sum and division in double, rounded once */
        for (long c = 0; c < D; ++c) a[c] = (float)((double)a[c] / (1.0 + (double)exp_any(-a[c])));
        float *restrict qn = q + n * D, *restrict kn = k + n * D, *restrict vn = v + n * D;
        blockdiag(qn, a, wq_t, D, bs, picks);
        blockdiag(k_raw, a, wk_t, D, bs, picks);
        blockdiag(vn, up + n * 2 * D, wv_t, D, bs, picks);
        for (long c = 0; c < D; ++c) kn[c] = k_raw[c] * k_scale;
        for (long g = 0; g < G; ++g) {
            const float *restrict w = w_gates + g * 3 * D;
            float total;
            if (D % LANES == 0) {
                vfloat acc = vsplat(0.0f);
                for (long c = 0; c < D; c += LANES) acc += vload(w + c) * vload(qn + c);
                for (long c = 0; c < D; c += LANES) acc += vload(w + D + c) * vload(k_raw + c);
                for (long c = 0; c < D; c += LANES) acc += vload(w + 2 * D + c) * vload(vn + c);
                total = vsum(acc);
            } else {
                total = 0.0f;
                for (long c = 0; c < D; ++c) total += w[c] * qn[c] + w[D + c] * k_raw[c] + w[2 * D + c] * vn[c];
            }
            gates[n * G + g] = total + b_gates[g];
        }
    }
}

/* gates [B * L, 2 NH] (layer_in's output) -> the cell's inputs, head-major:
     igate [B * NH, L] = the input gate pre-activations,
     fcum [B * NH, L + 1] = 0, then the running sum of log sigmoid(forget gate) (summed in double).
   Heads [h_begin, h_end) of the B * NH. */
void hear_msm_mlstm_forget_cumsum(const float *restrict gates, float *restrict igate, float *restrict fcum,
                                  long L, long NH, long h_begin, long h_end) {
    for (long bh = h_begin; bh < h_end; ++bh) {
        const long clip = bh / NH, head = bh % NH;
        const float *restrict g = gates + clip * L * 2 * NH;
        double total = 0.0;
        fcum[bh * (L + 1)] = 0.0f;
        for (long t = 0; t < L; ++t) {
            igate[bh * L + t] = g[t * 2 * NH + head];
            const double f = g[t * 2 * NH + NH + head];
            total += (f < 0.0 ? f : 0.0) - log1p(exp(-fabs(f)));  /* log sigmoid, stable */
            fcum[bh * (L + 1) + t + 1] = (float)total;
        }
    }
}

/* After the cell, tokens [n_begin, n_end):
     out = (groupnorm(h) * norm_w + skip * act) * silu(z)       [N, D]
   h [N, D] the cell output (time-major, heads of DH = D / NH), group norm per head (two passes in
   16 lanes: mean, then the mean square deviation), norm_w [D] the norm's scale (1 + weight),
   z = up[:, D:]. */
void hear_msm_mlstm_layer_out(const float *restrict h, const float *restrict up, const float *restrict act,
                              const float *restrict norm_w, const float *restrict skip, float *restrict out,
                              long D, long NH, float eps, long n_begin, long n_end) {
    const long DH = D / NH;
    for (long n = n_begin; n < n_end; ++n) {
        const float *restrict z = up + n * 2 * D + D;
        for (long head = 0; head < NH; ++head) {
            const long c0 = head * DH;
            const float *restrict x = h + n * D + c0;
            /* mean and variance in double, in 8 lanes (two passes: no cancellation) */
            double lane[8] = {0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0};
            const long body = DH - DH % 8;
            for (long c = 0; c < body; c += 8)
                for (int l = 0; l < 8; ++l) lane[l] += x[c + l];
            for (long c = body; c < DH; ++c) lane[0] += x[c];
            const double mean64 = (((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]))) / (double)DH;
            for (int l = 0; l < 8; ++l) lane[l] = 0.0;
            for (long c = 0; c < body; c += 8)
                for (int l = 0; l < 8; ++l) lane[l] += (x[c + l] - mean64) * (x[c + l] - mean64);
            for (long c = body; c < DH; ++c) lane[0] += (x[c] - mean64) * (x[c] - mean64);
            const double var64 = (((lane[0] + lane[4]) + (lane[1] + lane[5])) + ((lane[2] + lane[6]) + (lane[3] + lane[7]))) / (double)DH;
            /* the rest in double too, rounded once at the end (the sigmoid's e^-z is float) */
            const double rstd = 1.0 / sqrt(var64 + (double)eps);
            float *restrict o = out + n * D + c0;
            const float *restrict a = act + n * D + c0, *restrict w = norm_w + c0, *restrict s = skip + c0;
            const float *restrict zz = z + c0;
            for (long c = 0; c < DH; ++c) {
                const double normed = ((double)x[c] - mean64) * rstd * (double)w[c] + (double)s[c] * (double)a[c];
                o[c] = (float)(normed * (double)zz[c] / (1.0 + (double)exp_any(-zz[c])));
            }
        }
    }
}

void hear_msm_mlstm_layer_in_parallel(const float *up, const float *conv_w_t, const float *conv_b, const float *wq_t,
                                      const float *wk_t, const float *wv_t, const float *w_gates, const float *b_gates,
                                      float *act, float *q, float *k, float *v, float *gates, long L, long D, long K,
                                      long bs, long G, float k_scale, long count, long threads) {
    OVER_HEADS
    for (long t = 0; t < threads; ++t)
        hear_msm_mlstm_layer_in(up, conv_w_t, conv_b, wq_t, wk_t, wv_t, w_gates, b_gates, act, q, k, v, gates,
                                L, D, K, bs, G, k_scale, count * t / threads, count * (t + 1) / threads);
}

void hear_msm_mlstm_forget_cumsum_parallel(const float *gates, float *igate, float *fcum, long L, long NH,
                                           long count, long threads) {
    OVER_HEADS
    for (long t = 0; t < threads; ++t)
        hear_msm_mlstm_forget_cumsum(gates, igate, fcum, L, NH, count * t / threads, count * (t + 1) / threads);
}

void hear_msm_mlstm_layer_out_parallel(const float *h, const float *up, const float *act, const float *norm_w,
                                       const float *skip, float *out, long D, long NH, float eps,
                                       long count, long threads) {
    OVER_HEADS
    for (long t = 0; t < threads; ++t)
        hear_msm_mlstm_layer_out(h, up, act, norm_w, skip, out, D, NH, eps, count * t / threads,
                                 count * (t + 1) / threads);
}
