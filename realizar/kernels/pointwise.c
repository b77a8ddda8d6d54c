/* The per-token operations of a Llama layer, float32, each in one pass over its rows:
 *
 *   rms_norm:  y = w * x / sqrt(mean(x^2) + eps)
 *   silu_mul:  y = silu(gate) * up,  [gate | up] = gate_up    silu(g) = g / (1 + exp(-g))
 *   rope:      each q and k head, halves (a, b) at position p:
 *              (a cos - b sin, b cos + a sin) with cos, sin of p * inv_freq
 *
 * In torch each of them is several ops with a temporary per op. Long batches (prefill) are
 * split into blocks of rows that run on the thread pool.
 */
#include <math.h>
#include <stdint.h>

#include "cpu_kernels.h"

#define BLOCK_ELEMS 32768  /* about this many elements per unit of parallel work */

static int64_t rows_per_unit(int64_t width) {
    const int64_t rows = BLOCK_ELEMS / (width > 0 ? width : 1);
    return rows > 0 ? rows : 1;
}

/* The end of unit `unit`'s rows, which start at unit * rows, of T rows in all. */
static inline int64_t unit_end(int64_t unit, int64_t rows, int64_t T) {
    return (unit + 1) * rows < T ? (unit + 1) * rows : T;
}

struct rms_norm {
    const float *x, *w;
    float *y;
    int64_t ldx, T, D, rows;
    float eps;
};

static void rms_norm_rows(const void *arg, int64_t unit) {
    const struct rms_norm *a = arg;
    const int64_t end = unit_end(unit, a->rows, a->T);
    for (int64_t t = unit * a->rows; t < end; t++) {
        const float *x = a->x + t * a->ldx;
        float *y = a->y + t * a->D;
        float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
        for (int64_t i = 0; i < a->D; i++) sum += x[i] * x[i];
        const float inv = 1.0f / sqrtf(sum / (float)a->D + a->eps);
#pragma omp simd
        for (int64_t i = 0; i < a->D; i++) y[i] = a->w[i] * (x[i] * inv);
    }
}

/* y [T, D] = rms_norm(x) * w, x rows ldx floats apart. */
void realizar_rms_norm(const float *x, int64_t ldx, const float *w, float *y, int64_t T, int64_t D, float eps) {
    const struct rms_norm a = {.x = x, .w = w, .y = y, .ldx = ldx, .T = T, .D = D,
                               .rows = rows_per_unit(D), .eps = eps};
    realizar_parallel(rms_norm_rows, &a, (T + a.rows - 1) / a.rows);
}

struct silu_mul {
    const float *gate_up;
    float *y;
    int64_t ld, I, T, rows;
};

/* silu(g) u from exp(-|g|), which never overflows: silu(g) = g / (1 + e) where g >= 0, g e / (1 + e) where not. The
 * reciprocal of 1 + e (in [1, 2]) is the instruction's estimate refined by one Newton step, r (2 - (1 + e) r), which
 * squares the estimate's error (2^-14 on AVX-512, 2^-12 on AVX) to below a float's rounding: within a rounding or
 * two of a division, in 0.8x the loop's time (BENCHMARKS.md, nineteenth session). */
#if defined(__AVX512F__)
typedef f32x16 vs;
typedef i32x16 vis;
#define SILU_LANES 16
static inline vs reciprocal(vs x) { const vs r = (vs)_mm512_rcp14_ps((__m512)x); return r * (2.0f - x * r); }
#elif defined(__AVX2__)
typedef v8 vs;
typedef vi8 vis;
#define SILU_LANES 8
static inline vs reciprocal(vs x) { const vs r = (vs)_mm256_rcp_ps((__m256)x); return r * (2.0f - x * r); }
#else
typedef v8 vs;
typedef vi8 vis;
#define SILU_LANES 8
static inline vs reciprocal(vs x) { return 1.0f / x; }  /* no estimate to refine: the division */
#endif
EXP_NONPOSITIVE(exps_nonpositive, vs, vis)

static void silu_mul_rows(const void *arg, int64_t unit) {
    const struct silu_mul *a = arg;
    const int64_t end = unit_end(unit, a->rows, a->T);
    for (int64_t t = unit * a->rows; t < end; t++) {
        const int64_t I = a->I;
        const float *g = a->gate_up + t * a->ld, *u = g + I;
        float *y = a->y + t * I;
        int64_t i = 0;
        for (; i + SILU_LANES <= I; i += SILU_LANES) {
            vs x, up;
            memcpy(&x, g + i, sizeof x);
            memcpy(&up, u + i, sizeof up);
            const vis negative = x < 0.0f;
            const vs e = exps_nonpositive((vs)(((vis)x & negative) | ((vis)-x & ~negative)));  /* of -|x| */
            const vs numerator = (vs)(((vis)(x * e) & negative) | ((vis)x & ~negative));
            const vs out = numerator * reciprocal(1.0f + e) * up;
            memcpy(y + i, &out, sizeof out);
        }
        for (; i < I; i++) {
            const float e = exp_nonpositive(-fabsf(g[i]));
            y[i] = g[i] * ((g[i] < 0.0f ? e : 1.0f) / (1.0f + e)) * u[i];
        }
    }
}

/* y [T, I] = silu(gate_up[:, :I]) * gate_up[:, I:], gate_up rows ld floats apart. */
void realizar_silu_mul(const float *gate_up, int64_t ld, float *y, int64_t T, int64_t I) {
    const struct silu_mul a = {.gate_up = gate_up, .y = y, .ld = ld, .I = I, .T = T, .rows = rows_per_unit(2 * I)};
    realizar_parallel(silu_mul_rows, &a, (T + a.rows - 1) / a.rows);
}

struct rope {
    float *x;
    const int64_t *positions;
    const float *cos, *sin;
    int64_t ld, heads, hd, T, rows;
};

static void rope_rows(const void *arg, int64_t unit) {
    const struct rope *a = arg;
    const int64_t half = a->hd / 2;
    const int64_t end = unit_end(unit, a->rows, a->T);
    for (int64_t t = unit * a->rows; t < end; t++) {
        const float *c = a->cos + a->positions[t] * a->hd, *s = a->sin + a->positions[t] * a->hd;
        for (int64_t h = 0; h < a->heads; h++) {
            float *x1 = a->x + t * a->ld + h * a->hd, *x2 = x1 + half;
#pragma omp simd
            for (int64_t i = 0; i < half; i++) {
                const float lo = x1[i], hi = x2[i];
                x1[i] = lo * c[i] - hi * s[i];
                x2[i] = hi * c[i + half] + lo * s[i + half];
            }
        }
    }
}

/* Rotates, in place, the first `heads` heads (hd floats each) of every row of x [T, ld] by
 * its position; cos and sin are [max_position, hd] tables. */
void realizar_rope(float *x, int64_t ld, const int64_t *positions, const float *cos, const float *sin,
                   int64_t T, int64_t heads, int64_t hd) {
    const struct rope a = {.x = x, .positions = positions, .cos = cos, .sin = sin, .ld = ld,
                           .heads = heads, .hd = hd, .T = T, .rows = rows_per_unit(heads * hd)};
    realizar_parallel(rope_rows, &a, (T + a.rows - 1) / a.rows);
}
