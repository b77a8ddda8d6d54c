/* Matrix products over block-quantized weights (GGUF's Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K,
 * Q5_K, Q6_K), kept quantized in memory:
 *
 *   y[M, N] = x[M, K] W^T        x float32, W [N, K] dequantized on the fly, y float32
 *
 * A decode step is bound by reading the weights: float32 weights are 4 bytes each, these
 * 0.6-1.1. The weights are repacked once, at load time, into records of 16 output rows
 * (one panel, as in packed_gemm.c) by 32 terms of the sums (one quant block):
 *
 *   record[p][b] = the integers of W[16p : 16p + 16, 32b : 32b + 32], then their scales
 *
 * with each 16-byte vector of integers holding one byte per row of the panel, so one load
 * unpacks into 16 lanes, one per output column, with no shuffles:
 *
 *   nibbles (4, 5, 6 bits)  16 vectors; vector i, byte j = q[j][i] & 15 | (q[j][i + 16] & 15) << 4
 *   5th bits (5 bits)       4 vectors; vector h, byte j, bit 2i + s = bit 4 of q[j][h + 4i + 16s]
 *   bits 5-6 (6 bits)       8 vectors; vector h, byte j, bits 2s, 2s + 1 = bits 4-5 of q[j][h + 8s]
 *   bytes (8 bits)          32 vectors; vector k, byte j = q[j][k] (int8)
 *   scales                  float32 [16] d, then [16] min (Q4_1, Q5_1, K-quants' -dmin * m) or
 *                           [16] d of terms 16-31 (Q6_K's 16-term sub-blocks); float16 in the
 *                           HALF formats
 *
 * Scales are stored already multiplied out as the reference dequantization does (Q4_K's
 * d * scale and dmin * min), as float32, or as float16 where every scale of the weight is a
 * float16 exactly (GGUF's Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 store them so): a Q4_1 record is
 * then 320 bytes for 512 weights, as few as the GGUF blocks, where float32 scales took 384,
 * a fifth more to read in a decode step. Either way a weight dequantizes to exactly the float
 * the reference gives: (q - offset) * d, then + min, each product rounded before the sum (no fused
 * multiply-add, see `rounded`). The product is then exactly x times the dequantized weight,
 * in float32.
 *
 * Each unit of work dequantizes a slice of 256 terms of a group of panels into a buffer in
 * packed_gemm.c's panel layout and multiplies every row of its row block by it with
 * packed_gemm.c's tiles, so the dequantization is paid once per 96 rows: at one row it
 * costs about as much as the multiply-adds, at 64 rows almost nothing. As there, every
 * output is one chain of multiply-adds in k order (passes of a fixed size added to y), so a
 * row's result does not depend on the rows that come with it.
 */
#include "quant_blocks.h"

/* Bytes of one record: the integers, then 16 or 32 scales. */
int64_t realizar_quant_record_bytes(int f) {
    return int_bytes(f) + (fmt_has_min(f) || fmt_two_d(f) ? 32 : 16) * scale_bytes(f);
}

/* Lays a weight out as records of format f (the layout above): q [n, k] its stored integers (bytes, int8
 * bits for 8-bit formats), `scales` [n, k / 32, V] float32, or float16 bits with HALF: d (terms 0-15 with
 * a d per 16 terms), then the min or the d of terms 16-31 where the format has one (V = 2). Rows past n in
 * the last panel are zeros. `out` holds panels * (k / 32) records. */
void realizar_pack_quantized(const uint8_t *q, const void *scales, int64_t n, int64_t k, int f, uint8_t *out) {
    const int64_t blocks = k / QK, panels = (n + NR - 1) / NR, size = realizar_quant_record_bytes(f);
    const int bits = fmt_bits(f), vectors = 1 + (fmt_has_min(f) || fmt_two_d(f));
    const int64_t lane = scale_bytes(f);
    memset(out, 0, (size_t)(panels * blocks * size));
    for (int64_t p = 0; p < panels; p++)
        for (int64_t b = 0; b < blocks; b++) {
            uint8_t *const rec = out + (p * blocks + b) * size;
            for (int64_t j = 0; j < NR && p * NR + j < n; j++) {
                const int64_t row = p * NR + j;
                const uint8_t *const u = q + row * k + b * QK;  /* the block's 32 integers of this row */
                if (bits == 8) {
                    for (int i = 0; i < QK; i++) rec[16 * i + j] = u[i];
                } else {
                    for (int i = 0; i < 16; i++) rec[16 * i + j] = (uint8_t)((u[i] & 15) | (u[i + 16] & 15) << 4);
                    if (bits == 5)  /* vector h, bit 2i + s: bit 4 of term h + 4i + 16s */
                        for (int h = 0; h < 4; h++) {
                            uint8_t v = 0;
                            for (int i = 0; i < 4; i++)
                                for (int s = 0; s < 2; s++) v |= (uint8_t)(((u[h + 4 * i + 16 * s] >> 4) & 1) << (2 * i + s));
                            rec[256 + 16 * h + j] = v;
                        }
                    if (bits == 6)  /* vector h, bits 2s, 2s + 1: bits 4-5 of term h + 8s */
                        for (int h = 0; h < 8; h++) {
                            uint8_t v = 0;
                            for (int s = 0; s < 4; s++) v |= (uint8_t)(((u[h + 8 * s] >> 4) & 3) << (2 * s));
                            rec[256 + 16 * h + j] = v;
                        }
                }
                const uint8_t *const src = (const uint8_t *)scales + (row * blocks + b) * vectors * lane;
                for (int v = 0; v < vectors; v++)
                    memcpy(rec + int_bytes(f) + (16 * v + j) * lane, src + v * lane, (size_t)lane);
            }
        }
}

/* The weights of term k (0-31) of one record for its 16 rows, from the record's integers and
 * its scales (d0: terms 0-15, d1: terms 16-31, min). */
static inline __attribute__((always_inline)) f32x16 term(const int F, const uint8_t *rec, const int k, f32x16 d0,
                                                         f32x16 d1, f32x16 min) {
    const int bits = fmt_bits(F);
    u8x16 q;
    if (bits == 8) {
        q = bytes16(rec + 16 * k);
    } else {
        const u8x16 nib = bytes16(rec + 16 * (k & 15));
        q = k < 16 ? nib & 15 : nib >> 4;
        if (bits == 5) q |= ((bytes16(rec + 256 + 16 * (k & 3)) >> (2 * ((k & 15) >> 2) + (k >> 4))) & 1) << 4;
        if (bits == 6) q |= ((bytes16(rec + 256 + 16 * (k & 7)) >> (2 * (k >> 3))) & 3) << 4;
    }
    /* q - offset fits int8 for every format (Q8_0 has no offset and is int8 already) */
    const i8x16 s = (i8x16)(q - (uint8_t)fmt_offset(F));
    f32x16 w = __builtin_convertvector(widen(s), f32x16) * (k < 16 ? d0 : d1);
    if (fmt_has_min(F)) w = rounded(w) + min;
    return w;
}

/* A record's scales: d of terms 0-15 and 16-31, and the min (zero where the format has none). */
static inline f32x16 scale16(const int F, const uint8_t *p) {
    return (F & HALF) ? halves16(p) : floats16((const float *)p);
}

#define SCALES(F, rec, d0, d1, min)                                                           \
    const uint8_t *scales_ = (rec) + int_bytes(F);                                            \
    const f32x16 d0 = scale16(F, scales_);                                                    \
    const f32x16 d1 = fmt_two_d(F) ? scale16(F, scales_ + 16 * scale_bytes(F)) : d0;          \
    const f32x16 min = fmt_has_min(F) ? scale16(F, scales_ + 16 * scale_bytes(F)) : (f32x16){0}

#if defined(YMM)
/* `term` for rows 8h .. 8h + 7 of the record (h = 0 or 1): the same operations on 8 lanes, the
 * integers widened to int32 straight from memory and their nibbles and bits picked there. */
static inline __attribute__((always_inline)) v8 term8(const int F, const uint8_t *rec, const int k, const int h,
                                                      v8 d0, v8 d1, v8 min) {
    const int bits = fmt_bits(F);
    vi8 q;
    if (bits == 8) {
        q = sext8(rec + 16 * k + 8 * h);
    } else {
        const vi8 nib = zext8(rec + 16 * (k & 15) + 8 * h);
        q = k < 16 ? nib & 15 : nib >> 4;
        if (bits == 5) q |= ((zext8(rec + 256 + 16 * (k & 3) + 8 * h) >> (2 * ((k & 15) >> 2) + (k >> 4))) & 1) << 4;
        if (bits == 6) q |= ((zext8(rec + 256 + 16 * (k & 7) + 8 * h) >> (2 * (k >> 3))) & 3) << 4;
    }
    v8 w = __builtin_convertvector(q - fmt_offset(F), v8) * (k < 16 ? d0 : d1);
    if (fmt_has_min(F)) w = rounded8(w) + min;
    return w;
}

static inline v8 scale8(const int F, const uint8_t *p) { return (F & HALF) ? halves8(p) : load8((const float *)p); }

/* SCALES for rows 8h .. 8h + 7 */
#define SCALES8(F, rec, h, d0, d1, min)                                                          \
    const uint8_t *scales_ = (rec) + int_bytes(F) + 8 * (h) * scale_bytes(F);                    \
    const v8 d0 = scale8(F, scales_);                                                            \
    const v8 d1 = fmt_two_d(F) ? scale8(F, scales_ + 16 * scale_bytes(F)) : d0;                  \
    const v8 min = fmt_has_min(F) ? scale8(F, scales_ + 16 * scale_bytes(F)) : (v8){0}
#endif

/* The 32 x 16 weights of one record, k-major (out[k * 16 + j] = W[row j][term k]). */
static inline __attribute__((always_inline)) void dequantize(const int F, const uint8_t *rec, float *out) {
#if defined(YMM)
    for (int h = 0; h < 2; h++) {
        SCALES8(F, rec, h, d0, d1, min);
        const uint8_t *ints = rec;
#pragma GCC unroll 32
        for (int k = 0; k < QK; k++) {
            if (k == 16) forget(&ints);
            store8(out + 16 * k + 8 * h, term8(F, ints, k, h, d0, d1, min));
        }
    }
#else
    SCALES(F, rec, d0, d1, min);
#pragma GCC unroll 8
    for (int k = 0; k < QK; k++) {
        const f32x16 w = term(F, rec, k, d0, d1, min);
        memcpy(out + 16 * k, &w, sizeof w);
    }
#endif
}

/* Records [0, count) of one panel into `out` (count * 32 terms, k-major, 16 per term), while
 * the `ahead` bytes after them are prefetched: the next pass of the same panel. */
static void dequantize_records(int f, const uint8_t *rec, int64_t count, float *out, int64_t ahead) {
    const int64_t size = realizar_quant_record_bytes(f);
    const int64_t lines = (ahead + 63) / 64, per_record = (lines + count - 1) / count;
    for (int64_t b = 0; b < count; b++, rec += size, out += QK * NR) {
        for (int64_t l = b * per_record; l < (b + 1) * per_record && l < lines; l++)
            __builtin_prefetch(rec + (count - b) * size + l * 64);
        switch (f) {
            case Q4_OFFSET: dequantize(Q4_OFFSET, rec, out); break;
            case Q4_MIN: dequantize(Q4_MIN, rec, out); break;
            case Q5_OFFSET: dequantize(Q5_OFFSET, rec, out); break;
            case Q5_MIN: dequantize(Q5_MIN, rec, out); break;
            case Q6_OFFSET: dequantize(Q6_OFFSET, rec, out); break;
            case Q8: dequantize(Q8, rec, out); break;
            case Q4_OFFSET | HALF: dequantize(Q4_OFFSET | HALF, rec, out); break;
            case Q4_MIN | HALF: dequantize(Q4_MIN | HALF, rec, out); break;
            case Q5_OFFSET | HALF: dequantize(Q5_OFFSET | HALF, rec, out); break;
            case Q5_MIN | HALF: dequantize(Q5_MIN | HALF, rec, out); break;
            case Q6_OFFSET | HALF: dequantize(Q6_OFFSET | HALF, rec, out); break;
            default: dequantize(Q8 | HALF, rec, out); break;
        }
    }
}

/* A buffer of this thread's, of at least `floats` floats (kept for later calls), or NULL. */
static float *scratch(int64_t floats) {
    static __thread void *buffer;
    static __thread int64_t capacity;
    return thread_scratch(&buffer, &capacity, floats * (int64_t)sizeof(float));
}

struct qjob {
    const float *a;           /* x packed by realizar_pack_x */
    const uint8_t *w;         /* the records, panel-major */
    float *y;
    int64_t M, N, K, ldy;
    int fmt, group;           /* group: panels per tile, as in packed_gemm.c */
    int fast, c;              /* fast records (fmt is then their kind) with integer offset c */
    int64_t chunk;            /* panels per unit, a multiple of group */
    int64_t pass;             /* records per pass over the sums */
    _Atomic int failed;       /* a thread could not allocate its buffer */
};

/* One unit: the panels of one chunk for the rows of one MC-row block, a pass of the sums at
 * a time. The passes are the same for every M. */
static void run_unit(const void *arg, int64_t unit) {
    struct qjob *j = (struct qjob *)arg;
    const int64_t K = j->K, blocks = K / QK, panels = (j->N + NR - 1) / NR, full = j->N / NR;
    const int64_t chunks = (panels + j->chunk - 1) / j->chunk;
    const int64_t m0 = unit / chunks * MC, p0 = unit % chunks * j->chunk;
    const int64_t m1 = j->M - m0 < MC ? j->M : m0 + MC, p1 = panels - p0 < j->chunk ? panels : p0 + j->chunk;
    const int64_t size = j->fast ? 0 : realizar_quant_record_bytes(j->fmt);  /* the exact records' */
    const int64_t pbytes = j->fast ? realizar_fast_panel_bytes(j->fmt, blocks) : blocks * size;
    float *buffer = scratch(j->group * j->pass * QK * NR);
    if (!buffer) {
        j->failed = 1;
        return;
    }
    /* A group of panels through all its passes, then the next group: each panel's records are
     * read in memory order, G streams at a time. Every output still sums its passes in order. */
    for (int64_t p = p0; p < p1;) {
        const int G = p + j->group <= (p1 < full ? p1 : full) ? j->group : 1;
        const int64_t cols = p < full ? NR : j->N - p * NR;
        for (int64_t b0 = 0; b0 < blocks; b0 += j->pass) {
            const int64_t count = blocks - b0 < j->pass ? blocks - b0 : j->pass, kc = count * QK;
            const int64_t next = blocks - b0 - count < j->pass ? blocks - b0 - count : j->pass;
            for (int g = 0; g < G; g++) {
                const uint8_t *panel = j->w + (p + g) * pbytes;
                if (j->fast)
                    realizar_dequantize_fast_records(j->fmt, j->c, panel, b0, count, buffer + g * kc * NR);
                else
                    dequantize_records(j->fmt, panel + b0 * size, count, buffer + g * kc * NR, next * size);
            }
            realizar_gemm_panels(j->a + m0 * K, m1 - m0, K, b0 * QK, kc, buffer, kc * NR, G, cols,
                                 j->y + m0 * j->ldy + p * NR, j->ldy, b0 > 0);
        }
        p += G;
    }
}

/* Few rows (a decode step of a few sequences): the weights are dequantized in registers and
 * multiplied straight away, R rows by G panels, without the buffer. Each output is the same
 * chain of multiply-adds as through the buffer and packed_gemm.c's tiles (from zero, in k
 * order, a pass of the sums at a time added to y), so results do not depend on the path. */
#if defined(__AVX512F__)
#define DIRECT_ROWS 4     /* 32 vector registers: 16 accumulators, 8 scales */
#define DIRECT_PANELS 4
#define DIRECT_WIDE(R) DIRECT_PANELS
#elif defined(YMM)
/* 16 registers of 8 floats: 8 accumulators (R rows by G panels by 2 halves), the scales read
 * from memory by the multiplies; one row takes 4 panels (4 memory streams), 2 rows 2, more 1 */
#define DIRECT_ROWS 4
#define DIRECT_PANELS 4
#define DIRECT_WIDE(R) ((R) == 1 ? 4 : (R) == 2 ? 2 : 1)
#else
#define DIRECT_ROWS 2     /* 16 registers of 8 floats: 8 accumulators */
#define DIRECT_PANELS 2
#define DIRECT_WIDE(R) DIRECT_PANELS
#endif

#if defined(YMM)
/* direct_tile in halves of 8 lanes: acc[(r * G + g) * 2 + h] holds rows 8h .. 8h + 7 of panel g
 * for row r of x. */
static inline __attribute__((always_inline)) void direct_tile8(const int F, const int R, const int G, const float *x,
                                                               int64_t ldx, const uint8_t *rec, int64_t pstride,
                                                               int64_t count, float *y, int64_t ldy, int64_t cols,
                                                               int accumulate, int64_t ahead, int64_t next) {
    const int64_t size = realizar_quant_record_bytes(F);
    v8 acc[DIRECT_ROWS * DIRECT_PANELS * 2];
    for (int i = 0; i < R * G * 2; i++) acc[i] = (v8){0};
    /* the next pass's lines, a share per record (two divisions per record cost 10 % at one row) */
    const int64_t lines = (ahead + 63) / 64, per_record = (lines + count - 1) / count;
    for (int64_t b = 0; b < count; b++, rec += size, x += QK) {
        for (int g = 0; g < G; g++)
            for (int64_t l = b * per_record; l < (b + 1) * per_record && l < lines; l++)
                __builtin_prefetch(rec + g * pstride + next - b * size + l * 64);
        /* The scales as float32 on the stack, [g][h][d0, d1, min][8], read from there by every
         * term: kept in registers (up to 24 of them), they pushed the accumulators to the stack. */
        float scales[DIRECT_PANELS * 2 * 3 * 8] __attribute__((aligned(32)));
        for (int g = 0; g < G; g++) {
            for (int h = 0; h < 2; h++) {
                SCALES8(F, rec + g * pstride, h, d0, d1, min);
                store8(scales + (g * 2 + h) * 24, d0);
                if (fmt_two_d(F)) store8(scales + (g * 2 + h) * 24 + 8, d1);
                if (fmt_has_min(F)) store8(scales + (g * 2 + h) * 24 + 16, min);
            }
        }
        /* this record's terms of x at fixed stack addresses: R row pointers (x + r * ldx) took
         * general registers the tile did not have (reloaded for every term) */
        float copy[QK * DIRECT_ROWS] __attribute__((aligned(32)));
        for (int r = 1; r < R; r++) memcpy(copy + r * QK, x + r * ldx, QK * sizeof(float));
        const float *xs[DIRECT_ROWS];
        for (int r = 0; r < R; r++) xs[r] = r ? copy + r * QK : x;
        const float *sc = scales;
        const uint8_t *ints = rec;
#pragma GCC unroll 32
        for (int k = 0; k < QK; k++) {
            if (k == 16) forget(&ints);
            forget_floats(&sc);
            for (int g = 0; g < G; g++) {
                for (int h = 0; h < 2; h++) {
                    const v8 d0 = load8(sc + (g * 2 + h) * 24);
                    const v8 d1 = fmt_two_d(F) ? load8(sc + (g * 2 + h) * 24 + 8) : d0;
                    const v8 min = fmt_has_min(F) ? load8(sc + (g * 2 + h) * 24 + 16) : (v8){0};
                    const v8 w = term8(F, ints + g * pstride, k, h, d0, d1, min);
                    for (int r = 0; r < R; r++) acc[(r * G + g) * 2 + h] += xs[r][k] * w;
                }
            }
        }
    }
    for (int r = 0; r < R; r++) {
        for (int g = 0; g < G; g++) {
            float *dst = y + r * ldy + g * NR;
            store_panel(dst, acc[(r * G + g) * 2], acc[(r * G + g) * 2 + 1], cols, accumulate);
        }
    }
}
#define DIRECT_TILE direct_tile8
#else
#define DIRECT_TILE direct_tile
#endif
/* Up to this many rows take the direct tiles, DIRECT_ROWS at a time over each pass's records (from
 * cache after the first): below it, dequantizing every weight into the buffer costs more than
 * dequantizing it again in registers for each group of rows (a decode step of 8 sequences
 * of the demo model, one thread: 38.6 -> 34.3 ms). */
#define DIRECT_MAX_ROWS 8

static inline __attribute__((always_inline)) void direct_tile(const int F, const int R, const int G, const float *x,
                                                              int64_t ldx, const uint8_t *rec, int64_t pstride,
                                                              int64_t count, float *y, int64_t ldy, int64_t cols,
                                                              int accumulate, int64_t ahead, int64_t next) {
    const int64_t size = realizar_quant_record_bytes(F);
    f32x16 acc[DIRECT_ROWS * DIRECT_PANELS];
    for (int i = 0; i < R * G; i++) acc[i] = (f32x16){0};
    for (int64_t b = 0; b < count; b++, rec += size, x += QK) {
        /* the next pass's records of these panels, spread over this pass */
        for (int g = 0; g < G; g++)
            for (int64_t l = b * ahead / count; l < (b + 1) * ahead / count; l += 64)
                __builtin_prefetch(rec + g * pstride + next - b * size + l);
        f32x16 d0[DIRECT_PANELS], d1[DIRECT_PANELS], min[DIRECT_PANELS];
        for (int g = 0; g < G; g++) {
            SCALES(F, rec + g * pstride, d0_, d1_, min_);
            d0[g] = d0_;
            d1[g] = d1_;
            min[g] = min_;
        }
#pragma GCC unroll 8
        for (int k = 0; k < QK; k++) {
            for (int g = 0; g < G; g++) {
                const f32x16 w = term(F, rec + g * pstride, k, d0[g], d1[g], min[g]);
                for (int r = 0; r < R; r++) acc[r * G + g] += x[r * ldx + k] * w;
            }
        }
    }
    for (int r = 0; r < R; r++) {
        for (int g = 0; g < G; g++) {
            float *dst = y + r * ldy + g * NR;
            f32x16 v = acc[r * G + g];
            if (cols == NR) {
                if (accumulate) v += floats16(dst);
                memcpy(dst, &v, sizeof v);
            } else {  /* the last panel of an N that is not a multiple of 16 (G is 1) */
                float out[NR] = {0};
                if (accumulate) memcpy(out, dst, (size_t)cols * sizeof(float));
                v += floats16(out);
                memcpy(dst, &v, (size_t)cols * sizeof(float));
            }
        }
    }
}

struct djob {
    const float *x;
    int64_t ldx;
    const uint8_t *w;
    float *y;
    int64_t M, N, K, ldy;
    int fmt;
    int64_t chunk;            /* panels per unit, a multiple of DIRECT_PANELS */
    int64_t pass;
};

#define DIRECT_CASE(F_, R_, G_) \
    case F_: DIRECT_TILE(F_, R_, G_, x, j->ldx, rec, pstride, count, y, j->ldy, cols, acc, ahead, next); break

#define DIRECT_FORMATS(R_, G_)                 \
    switch (j->fmt) {                          \
        DIRECT_CASE(Q4_OFFSET, R_, G_);        \
        DIRECT_CASE(Q4_MIN, R_, G_);           \
        DIRECT_CASE(Q5_OFFSET, R_, G_);        \
        DIRECT_CASE(Q5_MIN, R_, G_);           \
        DIRECT_CASE(Q6_OFFSET, R_, G_);        \
        DIRECT_CASE(Q8, R_, G_);               \
        DIRECT_CASE(Q4_OFFSET | HALF, R_, G_); \
        DIRECT_CASE(Q4_MIN | HALF, R_, G_);    \
        DIRECT_CASE(Q5_OFFSET | HALF, R_, G_); \
        DIRECT_CASE(Q5_MIN | HALF, R_, G_);    \
        DIRECT_CASE(Q6_OFFSET | HALF, R_, G_); \
        DIRECT_CASE(Q8 | HALF, R_, G_);        \
        default: break;                        \
    }

static void run_direct_unit(const void *arg, int64_t unit) {
    const struct djob *j = (const struct djob *)arg;
    const int64_t K = j->K, blocks = K / QK, panels = (j->N + NR - 1) / NR, full = j->N / NR;
    const int64_t p0 = unit * j->chunk, p1 = panels - p0 < j->chunk ? panels : p0 + j->chunk;
    const int64_t size = realizar_quant_record_bytes(j->fmt), pstride = blocks * size;
    for (int64_t p = p0; p < p1;) {
        /* the tiles' panels: M <= DIRECT_ROWS, so every tile of this call has M rows */
        const int wide = DIRECT_WIDE(j->M);
        const int G = p + wide <= (p1 < full ? p1 : full) ? wide : 1;
        const int64_t cols = p < full ? NR : j->N - p * NR;
        for (int64_t b0 = 0; b0 < blocks; b0 += j->pass) {
            const int64_t count = blocks - b0 < j->pass ? blocks - b0 : j->pass;
            int64_t ahead = (blocks - b0 - count < j->pass ? blocks - b0 - count : j->pass) * size;
            /* where the bytes to prefetch start, from this pass's records: the next pass of these
             * panels; after their last pass, the first pass of the next panels (30 layers' Q4_1
             * gate_up products at one row, weights from memory: AVX2 7.2 -> 4.9 ms, AVX-512 5.2 -> 4.2) */
            int64_t next = count * size;
            if (!ahead && p + G < panels) {
                ahead = (blocks < j->pass ? blocks : j->pass) * size;
                next = G * pstride - b0 * size;
            }
            const uint8_t *rec = j->w + p * pstride + b0 * size;
            const float *x = j->x + b0 * QK;
            float *y = j->y + p * NR;
            const int acc = b0 > 0;
            for (int64_t m = 0; m < j->M; m += DIRECT_ROWS, x += DIRECT_ROWS * j->ldx, y += DIRECT_ROWS * j->ldy) {
                const int64_t R = j->M - m < DIRECT_ROWS ? j->M - m : DIRECT_ROWS;
                if (G > 1) {  /* (the shapes that have more than one panel) */
                    switch (R) {
                        case 1: DIRECT_FORMATS(1, DIRECT_WIDE(1)); break;
#if DIRECT_ROWS > 2 && DIRECT_WIDE(3) > 1
                        case 3: DIRECT_FORMATS(3, DIRECT_WIDE(3)); break;
                        case 4: DIRECT_FORMATS(4, DIRECT_WIDE(4)); break;
#endif
                        default: DIRECT_FORMATS(2, DIRECT_WIDE(2)); break;
                    }
                } else {
                    switch (R) {
                        case 1: DIRECT_FORMATS(1, 1); break;
#if DIRECT_ROWS > 2
                        case 3: DIRECT_FORMATS(3, 1); break;
                        case 4: DIRECT_FORMATS(4, 1); break;
#endif
                        default: DIRECT_FORMATS(2, 1); break;
                    }
                }
            }
        }
        p += G;
    }
}

/* y = x W^T through the buffer: the weights of each pass dequantized exactly (from the exact
 * records of format `fmt`, or with `fast` from the fast records of kind `fmt` and offset c, to the
 * same floats), then packed_gemm.c's tiles. Returns 0, or -1 when a buffer could not be allocated. */
int realizar_buffered_gemm(const float *x, int64_t ldx, const uint8_t *w, int fmt, int fast, int c, float *y,
                         int64_t ldy, int64_t M, int64_t N, int64_t K) {
    const int64_t blocks = K / QK, panels = (N + NR - 1) / NR;
    const int64_t passes = (blocks + PASS_BLOCKS - 1) / PASS_BLOCKS, pass = (blocks + passes - 1) / passes;
    const int64_t threads = realizar_threads(), units_per_thread = 4;
    static __thread void *scratch_x;
    static __thread int64_t capacity;
    float *const packed_x = thread_scratch(&scratch_x, &capacity, realizar_packed_x_floats(M, K) * (int64_t)sizeof(float));
    if (!packed_x) return -1;
    realizar_pack_x(x, ldx, M, K, packed_x);
    /* as in packed_gemm.c: up to 8 rows, three panels at a time; more, one */
    const int group = M <= 8 ? 3 : 1;
    int64_t chunk = (panels + units_per_thread * threads - 1) / (units_per_thread * threads);
    chunk = (chunk + group - 1) / group * group;
    struct qjob j = {.a = packed_x, .w = w, .y = y, .M = M, .N = N, .K = K, .ldy = ldy, .fmt = fmt,
                     .group = group, .fast = fast, .c = c, .chunk = chunk, .pass = pass, .failed = 0};
    realizar_parallel(run_unit, &j, (M + MC - 1) / MC * ((panels + chunk - 1) / chunk));
    return j.failed ? -1 : 0;
}

/* y [M, N] (row stride ldy) = x [M, K] (row stride ldx) times the records `w` of a weight
 * [N, K] in format `fmt`. Returns 0, or -1 when a buffer could not be allocated. */
int realizar_quant_gemm(const float *x, int64_t ldx, const uint8_t *w, int fmt, float *y, int64_t ldy,
                        int64_t M, int64_t N, int64_t K) {
    const int64_t blocks = K / QK, panels = (N + NR - 1) / NR;
    const int64_t passes = (blocks + PASS_BLOCKS - 1) / PASS_BLOCKS, pass = (blocks + passes - 1) / passes;
    const int64_t threads = realizar_threads(), units_per_thread = 4;
    if (M <= DIRECT_MAX_ROWS) {
        int64_t chunk = (panels + units_per_thread * threads - 1) / (units_per_thread * threads);
        chunk = (chunk + DIRECT_PANELS - 1) / DIRECT_PANELS * DIRECT_PANELS;
        const struct djob d = {.x = x, .ldx = ldx, .w = w, .y = y, .M = M, .N = N, .K = K, .ldy = ldy,
                               .fmt = fmt, .chunk = chunk, .pass = pass};
        realizar_parallel(run_direct_unit, &d, (panels + chunk - 1) / chunk);
        return 0;
    }
    return realizar_buffered_gemm(x, ldx, w, fmt, 0, 0, y, ldy, M, N, K);
}

struct rows_job {
    const uint8_t *w;
    const int64_t *ids;
    float *out;
    int64_t K;
    int fmt, fast, c;  /* fast: fmt is a fast record's kind, c its integer offset */
    _Atomic int failed;
};

static void run_row(const void *arg, int64_t i) {
    struct rows_job *j = (struct rows_job *)arg;
    float *buffer = scratch(QK * NR);
    if (!buffer) {
        j->failed = 1;
        return;
    }
    const int64_t blocks = j->K / QK;
    const int64_t size = j->fast ? 0 : realizar_quant_record_bytes(j->fmt);  /* the exact records' */
    const int64_t p = j->ids[i] / NR, r = j->ids[i] % NR;
    const uint8_t *panel = j->w + p * (j->fast ? realizar_fast_panel_bytes(j->fmt, blocks) : blocks * size);
    for (int64_t b = 0; b < blocks; b++) {
        if (j->fast)
            realizar_dequantize_fast_records(j->fmt, j->c, panel, b, 1, buffer);
        else
            dequantize_records(j->fmt, panel + b * size, 1, buffer, 0);
        for (int k = 0; k < QK; k++) j->out[i * j->K + b * QK + k] = buffer[k * NR + r];
    }
}

static int rows(const uint8_t *w, int fmt, int fast, int c, const int64_t *ids, int64_t n, int64_t N, int64_t K,
                float *out) {
    for (int64_t i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= N) return -2;
    struct rows_job j = {.w = w, .ids = ids, .out = out, .K = K, .fmt = fmt, .fast = fast, .c = c, .failed = 0};
    realizar_parallel(run_row, &j, n);
    return j.failed ? -1 : 0;
}

/* out [n, K] = rows ids[0 .. n) of the weight (the embedding lookup of a tied LM head), dequantized
 * exactly. Returns 0, -1 when a buffer could not be allocated, -2 when an id is outside [0, N). */
int realizar_quant_rows(const uint8_t *w, int fmt, const int64_t *ids, int64_t n, int64_t N, int64_t K,
                        float *out) {
    return rows(w, fmt, 0, 0, ids, n, N, K, out);
}

/* realizar_quant_rows for fast records of kind `kind` with integer offset c: the same floats, as the
 * exact class dequantizes them. */
int realizar_fast_rows(const uint8_t *w, int kind, int c, const int64_t *ids, int64_t n, int64_t N, int64_t K,
                       float *out) {
    return rows(w, kind, 1, c, ids, n, N, K, out);
}
