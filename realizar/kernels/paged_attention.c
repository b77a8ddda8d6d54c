/* Paged-KV kernels for the CPU engine, float32 arithmetic over a float32, float16 or int8 cache.
 *
 * The KV cache of one layer is a [num_blocks, num_kv_heads, block_size, head_dim] array: one
 * KV head's tokens of a block are one contiguous run. A sequence's tokens live in the blocks of
 * its block table; slot s = block * block_size + offset names a token.
 *
 * paged_attention: query rows, each attending over the first context_lens[r] tokens of a
 * sequence's cache (one row per sequence when decoding; one row per prompt token, with
 * growing lengths, for a prompt chunk)
 *   out[r, h, :] = sum_t softmax_t(scale * q[r, h] . K[slot(r, t), h / group]) V[slot(r, t), h / group]
 * A row's keys and values are read in block order, once for each chunk of query heads that
 * share them, and nothing but the live slots is touched: no gather, no padding, no mask.
 * That is the path of decode rows: one row alone is one unit of work on the thread pool. A call with
 * fewer units than the threads can share at long contexts (one stream decoding at 8k tokens) splits
 * each context into parts, merged at the end from each part's max score and sum of exps
 * (flash-decoding); one row at 8,000 tokens then took 8.3-8.6 ms a step instead of 14.0-14.4
 * (BENCHMARKS.md).
 * It is float32 softmax attention in two passes (scores, then values); its exp is within a
 * few ulp of libm's, and the results match torch's SDPA to rounding (tests/unit/test_kernels.py).
 * The rows of a prompt chunk (runs of rows that share a block table, with lengths growing by
 * one) go instead in tiles of TILE rows, each tile and KV head one unit, to
 * prefill_attention.c, which reads the context once per tile rather than once per row.
 *
 * write_kv: the keys and values of new tokens into their slots.
 *
 * A float16 cache (kv = KV_FLOAT16) holds half the bytes; its values are converted to float32 in registers
 * as they are loaded (cpu_kernels.h's load8h), and everything after the load is the float32 code:
 * attention over a float16 cache is float32 attention over the rounded values, to within the order
 * of roundings (the compiler fuses a multiply and an add into one FMA in some loops of one kind of
 * cache and not of the other: a few ulp).
 *
 * An int8 cache (kv = KV_INT8) holds a quarter of float32's bytes and one float32 scale per token and KV
 * head: k_t ~= ks_t q_t. The loops multiply the integers as floats, and the scales go outside them, once a
 * token: scale q . k_t = ks_t (scale q . q_t) for the scores, and sum_t p_t v_t = sum_t (p_t vs_t) q_t for
 * the values. It reads half float16's bytes, but its loop converts more per value: over the demo model's cache
 * it took 8-14 % less time than float16's (BENCHMARKS.md, "eighth session").
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#define HEADS_AT_ONCE 3  /* query heads of one KV group handled together */
/* Keys and values are prefetched this many tokens ahead: two blocks of 16 at the default block
 * size, so the next blocks' runs arrive while this one is used (a row's blocks are scattered,
 * which the hardware prefetchers cannot follow: 16 rows x 96 tokens, 2 threads: -27 %). Two blocks
 * rather than one (Zen 5 EPYC, whole decode steps): 0.86 of the time for 16 sequences at 2,000 tokens,
 * 0.95 for 64 at 400 and 0.98 at 200, the same at 96; four blocks were no better. */
#define AHEAD 32

/* out[u] = scale * (the sum of the 8 lanes of a[u]), u < 4, by a transposing add tree
 * instead of four separate horizontal sums. */
static inline void sum4x8(const v8 a[4], float scale, float *out) {
#if defined(__clang__) || __GNUC__ >= 12
#define EVENS(x, y) __builtin_shufflevector(x, y, 0, 2, 8, 10, 4, 6, 12, 14)
#define ODDS(x, y) __builtin_shufflevector(x, y, 1, 3, 9, 11, 5, 7, 13, 15)
    const v8 h01 = EVENS(a[0], a[1]) + ODDS(a[0], a[1]);  /* pairs of a0, a1 in each 4-lane half */
    const v8 h23 = EVENS(a[2], a[3]) + ODDS(a[2], a[3]);
    const v8 h = EVENS(h01, h23) + ODDS(h01, h23);        /* a0..a3 per half */
#undef EVENS
#undef ODDS
    for (int u = 0; u < 4; u++) out[u] = scale * (h[u] + h[u + 4]);
#else
    for (int u = 0; u < 4; u++) out[u] = scale * sum8(a[u]);
#endif
}

/* scores[j, t] = scale * q_j . k_t for the NH query heads j that share one KV head (q_j at
 * q + j * hd, scores at s + j * len), four keys at a time: each key row is loaded once for
 * all NH heads, and the 4 x NH sums are independent multiply-add chains. hd % 8 == 0. The
 * keys are float32, or float16 when H. */
static inline __attribute__((always_inline)) void group_scores(const int NH, const int H, const float *q,
                                                               const void *kh, const int64_t *offsets, int64_t len,
                                                               int64_t hd, float scale, float *s) {
    const int64_t line = 64 / kv_bytes(H);  /* elements per 64-byte line */
    int64_t t = 0;
    for (; t + 4 <= len; t += 4) {
        const int64_t k0 = offsets[t], k1 = offsets[t + 1], k2 = offsets[t + 2], k3 = offsets[t + 3];
        if (t + AHEAD + 4 <= len)
            for (int u = 0; u < 4; u++)
                for (int64_t i = 0; i < hd; i += line) __builtin_prefetch(kv_at(H, kh, offsets[t + AHEAD + u] + i));
        v8 acc[HEADS_AT_ONCE][4] = {{{0}}};
        for (int64_t i = 0; i < hd; i += 8) {
            const v8 x0 = load8kv(H, kh, k0 + i), x1 = load8kv(H, kh, k1 + i);
            const v8 x2 = load8kv(H, kh, k2 + i), x3 = load8kv(H, kh, k3 + i);
            for (int j = 0; j < NH; j++) {
                const v8 qj = load8(q + j * hd + i);
                acc[j][0] += qj * x0;
                acc[j][1] += qj * x1;
                acc[j][2] += qj * x2;
                acc[j][3] += qj * x3;
            }
        }
        for (int j = 0; j < NH; j++) sum4x8(acc[j], scale, s + j * len + t);
    }
    for (; t < len; t++) {
        const int64_t k = offsets[t];
        for (int j = 0; j < NH; j++) {
            v8 acc = {0};
            for (int64_t i = 0; i < hd; i += 8) acc += load8(q + j * hd + i) * load8kv(H, kh, k + i);
            s[j * len + t] = scale * sum8(acc);
        }
    }
}

/* acc[j] += p[j, t] v[0:16] for the NH query heads j of one KV group; v is element `at` of vh. */
static inline __attribute__((always_inline)) void add_value(const int NH, const int H, const float *p, int64_t len,
                                                            int64_t t, const void *vh, int64_t at, v8 acc[][2]) {
    const v8 x0 = load8kv(H, vh, at), x1 = load8kv(H, vh, at + 8);
    for (int j = 0; j < NH; j++) {
        const float w = p[j * len + t];
        acc[j][0] += w * x0;
        acc[j][1] += w * x1;
    }
}

#if defined(__AVX512F__)
/* group_values for 64 columns c0 .. c0 + 63 in one pass over the tokens, 16 lanes at a time: each value
 * row's 64 columns are read once (the 16-column passes read each row four times; 64 sequences of ~100
 * tokens spent 9 % of a decode step in attention, most of it waiting on these loads). Every lane
 * computes what group_values computes for its column, in the same order (even and odd t apart), so
 * the results are the same floats. */
static inline __attribute__((always_inline)) f32x16 load16kv(const int H, const void *cache, int64_t at) {
    f32x16 r;
    if (H == KV_INT8) {
        const __m512 x = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)((const int8_t *)cache + at))));
        memcpy(&r, &x, sizeof r);
    } else if (H == KV_FLOAT16) {
        const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const _Float16 *)cache + at)));
        memcpy(&r, &x, sizeof r);
    } else {
        memcpy(&r, (const float *)cache + at, sizeof r);
    }
    return r;
}

static inline __attribute__((always_inline)) void add_value64(const int NH, const int H, const float *p, int64_t len,
                                                              int64_t t, const void *vh, int64_t at, f32x16 acc[][4]) {
    f32x16 x[4];
    for (int u = 0; u < 4; u++) x[u] = load16kv(H, vh, at + 16 * u);
    for (int j = 0; j < NH; j++) {
        const float w = p[j * len + t];
        for (int u = 0; u < 4; u++) acc[j][u] += w * x[u];
    }
}

static inline __attribute__((always_inline)) void group_values64(const int NH, const int H, const float *p,
                                                                 const void *vh, const int64_t *offsets, int64_t len,
                                                                 int64_t hd, int64_t c0, float *y) {
    f32x16 even[HEADS_AT_ONCE][4] = {{{0}}}, odd[HEADS_AT_ONCE][4] = {{{0}}};
    int64_t t = 0;
    for (; t + 2 <= len; t += 2) {
        if (t + AHEAD + 2 <= len)
            for (int u = 0; u < 2; u++)
                for (int64_t i = 0; i < 64; i += 64 / kv_bytes(H)) __builtin_prefetch(kv_at(H, vh, offsets[t + AHEAD + u] + c0 + i));
        add_value64(NH, H, p, len, t, vh, offsets[t] + c0, even);
        add_value64(NH, H, p, len, t + 1, vh, offsets[t + 1] + c0, odd);
    }
    if (t < len) add_value64(NH, H, p, len, t, vh, offsets[t] + c0, even);
    for (int j = 0; j < NH; j++)
        for (int u = 0; u < 4; u++) {
            const f32x16 sum = even[j][u] + odd[j][u];
            memcpy(y + j * hd + c0 + 16 * u, &sum, sizeof sum);
        }
}
#endif

/* y_j = sum_t p[j, t] v_t for the NH query heads of one KV group (p_j at p + j * len, y_j at
 * y + j * hd): each value row is loaded once for all NH heads, 16 columns at a time, then 8
 * at a time. The even and odd t go to separate sums, so that twelve independent chains of
 * multiply-adds are in flight and the sums, weights and values fit in the 16 AVX registers.
 * hd % 8 == 0. The values are float32, or float16 when H. */
static inline __attribute__((always_inline)) void group_values(const int NH, const int H, const float *p,
                                                               const void *vh, const int64_t *offsets, int64_t len,
                                                               int64_t hd, float *y) {
    int64_t c = 0;
#if defined(__AVX512F__)
    for (; c + 64 <= hd; c += 64) group_values64(NH, H, p, vh, offsets, len, hd, c, y);
#endif
    for (; c + 16 <= hd; c += 16) {
        v8 even[HEADS_AT_ONCE][2] = {{{0}}}, odd[HEADS_AT_ONCE][2] = {{{0}}};
        int64_t t = 0;
        for (; t + 2 <= len; t += 2) {
            if (t + AHEAD + 2 <= len) {
                __builtin_prefetch(kv_at(H, vh, offsets[t + AHEAD] + c));
                __builtin_prefetch(kv_at(H, vh, offsets[t + AHEAD + 1] + c));
            }
            add_value(NH, H, p, len, t, vh, offsets[t] + c, even);
            add_value(NH, H, p, len, t + 1, vh, offsets[t + 1] + c, odd);
        }
        if (t < len) add_value(NH, H, p, len, t, vh, offsets[t] + c, even);
        for (int j = 0; j < NH; j++)
            for (int u = 0; u < 2; u++) store8(y + j * hd + c + 8 * u, even[j][u] + odd[j][u]);
    }
    for (; c < hd; c += 8) {
        v8 acc[HEADS_AT_ONCE] = {{0}};
        for (int64_t t = 0; t < len; t++) {
            const v8 x = load8kv(H, vh, offsets[t] + c);
            for (int j = 0; j < NH; j++) acc[j] += p[j * len + t] * x;
        }
        for (int j = 0; j < NH; j++) store8(y + j * hd + c, acc[j]);
    }
}

/* Query heads h0, h0 + 1, ... that attend together: up to HEADS_AT_ONCE of h0's KV group. */
static inline int64_t heads_from(int64_t h0, int64_t group) {
    const int64_t left = group - h0 % group;
    return left < HEADS_AT_ONCE ? left : HEADS_AT_ONCE;
}

/* The same two products for any head size, one head at a time, in plain loops. */
static void head_scores_scalar(const int H, const float *q, const void *kh, const int64_t *offsets, int64_t len,
                               int64_t hd, float scale, float *s) {
    for (int64_t t = 0; t < len; t++) {
        float dot = 0.0f;
        for (int64_t i = 0; i < hd; i++) dot += q[i] * loadkv(H, kh, offsets[t] + i);
        s[t] = scale * dot;
    }
}

static void head_values_scalar(const int H, const float *p, const void *vh, const int64_t *offsets, int64_t len,
                               int64_t hd, float *y) {
    for (int64_t c = 0; c < hd; c++) {
        float acc = 0.0f;
        for (int64_t t = 0; t < len; t++) acc += p[t] * loadkv(H, vh, offsets[t] + c);
        y[c] = acc;
    }
}

/* Scores, then values, of the n query heads of one KV group that attend together, for a cache
 * of kind H (KV_FLOAT32, KV_FLOAT16 or KV_INT8): each (n, H) compiles to its own loops. */
static inline __attribute__((always_inline)) void heads_scores(const int H, int64_t n, int vector, const float *qh,
                                                               const void *kh, const int64_t *slots, int64_t len,
                                                               int64_t hd, float scale, float *s) {
    if (!vector) {
        for (int64_t j = 0; j < n; j++) head_scores_scalar(H, qh + j * hd, kh, slots, len, hd, scale, s + j * len);
    } else if (n == 3) {
        group_scores(3, H, qh, kh, slots, len, hd, scale, s);
    } else if (n == 2) {
        group_scores(2, H, qh, kh, slots, len, hd, scale, s);
    } else {
        group_scores(1, H, qh, kh, slots, len, hd, scale, s);
    }
}

static inline __attribute__((always_inline)) void heads_values(const int H, int64_t n, int vector, const float *p,
                                                               const void *vh, const int64_t *slots, int64_t len,
                                                               int64_t hd, float *y) {
    if (!vector) {
        for (int64_t j = 0; j < n; j++) head_values_scalar(H, p + j * len, vh, slots, len, hd, y + j * hd);
    } else if (n == 3) {
        group_values(3, H, p, vh, slots, len, hd, y);
    } else if (n == 2) {
        group_values(2, H, p, vh, slots, len, hd, y);
    } else {
        group_values(1, H, p, vh, slots, len, hd, y);
    }
}

/* s[0:len] = softmax(s[0:len]), 8 lanes at a time (the compiler keeps a plain max or exp
 * loop scalar: a float max is not associative for it, and the exp is too long to inline); and
 * the max of the scores and the sum of their exps, at *top_out and *sum_out. */
static void softmax(float *s, int64_t len, float *top_out, float *sum_out) {
    v8 top = {-INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY, -INFINITY};
    int64_t t = 0;
    for (; t + 8 <= len; t += 8) {
        const v8 x = load8(s + t);
        const vi8 above = x > top;
        top = (v8)(((vi8)x & above) | ((vi8)top & ~above));
    }
    float m = -INFINITY;
    for (int u = 0; u < 8; u++) m = top[u] > m ? top[u] : m;
    for (; t < len; t++) m = s[t] > m ? s[t] : m;
    v8 total = {0};
    for (t = 0; t + 8 <= len; t += 8) {
        const v8 e = exp8_nonpositive(load8(s + t) - m);
        store8(s + t, e);
        total += e;
    }
    float sum = sum8(total);
    for (; t < len; t++) sum += s[t] = exp_nonpositive(s[t] - m);
    *top_out = m;
    *sum_out = sum;
    const float inv = 1.0f / sum;
    for (t = 0; t + 8 <= len; t += 8) store8(s + t, load8(s + t) * inv);
    for (; t < len; t++) s[t] *= inv;
}

/* rows[j, t] *= the scale of token t's row of KV head g in an int8 cache, for the n rows [n][len] of the tokens
 * [begin, begin + len) of a block table (begin a multiple of the block size): the scales are gathered into
 * token_scales [len] first, a block's being one run. */
static void scale_by_tokens(const struct paged_attention *A, const int64_t *table, int64_t begin, int64_t len,
                            int64_t g, const float *scales, float *token_scales, float *rows, int64_t n) {
    const int64_t bs = A->bs;
    for (int64_t t0 = 0, blk = begin / bs; t0 < len; t0 += bs, blk++)
        memcpy(token_scales + t0, scales + (table[blk] * A->kv_heads + g) * bs,
               sizeof(float) * (size_t)(len - t0 < bs ? len - t0 : bs));
    for (int64_t j = 0; j < n; j++)
        for (int64_t t = 0; t < len; t++) rows[j * len + t] *= token_scales[t];
}

/* One query row over the tokens [begin, end) of its context (begin a multiple of the block size): the
 * scores of every query head against every key, a softmax per head, then the weighted sums of the
 * value rows. The query heads that share a KV head go through its keys and values together, up to
 * HEADS_AT_ONCE at a time, so each row of the cache is read once per pass rather than once per query
 * head. A part of a split context leaves out [heads][hd] at `partial`, then each head's max score and
 * sum of exps [heads] each. */
static void attend_row(const struct paged_attention *A, const struct attention_unit *unit) {
    const int64_t heads = A->heads, group = A->group, hd = A->hd, bs = A->bs, row = A->row;
    const float scale = A->scale;
    const int vector = hd % 8 == 0;
    const int64_t b = A->singles[unit->item], begin = unit->begin, len = unit->end - unit->begin;
    const int kv = A->kv;
    /* [h, t] scores, then (an int8 cache) [t] one KV head's scales of the tokens; [t] cache offset of token t:
     * kept between calls */
    static __thread void *scores, *offsets;
    static __thread int64_t score_bytes, offset_bytes;
    /* plain locals from here: no thread-local lookups in the loops */
    float *const buffer = thread_scratch(&scores, &score_bytes, (heads + 1) * len * (int64_t)sizeof(float));
    int64_t *const slots = thread_scratch(&offsets, &offset_bytes, len * (int64_t)sizeof(int64_t));
    if (!buffer || !slots) {
        atomic_store(&((struct paged_attention *)A)->failed, 1);
        return;
    }
    const int64_t *table = A->block_tables + (A->row_tables ? A->row_tables[b] : b) * A->max_blocks;
    const float *q = A->q_all + b * A->q_stride;
    float *out = unit->partial ? unit->partial : A->out_all + b * heads * hd;
    for (int64_t t0 = 0, blk = begin / bs; t0 < len; t0 += bs, blk++)  /* block by block: no divisions */
        for (int64_t t = t0, at = table[blk] * bs * row; t < len && t < t0 + bs; t++, at += hd) slots[t] = at;
    float *const token_scales = buffer + heads * len;

    /* scores[h, t] = scale * q_h . k_t[h / group] */
    for (int64_t h0 = 0, n; h0 < heads; h0 += n) {
        n = heads_from(h0, group);
        const float *qh = q + h0 * hd;
        const int64_t at = h0 / group * bs * hd;
        float *s = buffer + h0 * len;
        if (kv == KV_INT8) {
            heads_scores(KV_INT8, n, vector, qh, (const int8_t *)A->key_cache + at, slots, len, hd, scale, s);
            scale_by_tokens(A, table, begin, len, h0 / group, A->key_scales, token_scales, s, n);
        } else if (kv == KV_FLOAT16) {
            heads_scores(KV_FLOAT16, n, vector, qh, (const _Float16 *)A->key_cache + at, slots, len, hd, scale, s);
        } else {
            heads_scores(KV_FLOAT32, n, vector, qh, (const float *)A->key_cache + at, slots, len, hd, scale, s);
        }
    }
    /* softmax over t, per query head */
    float top, sum;
    for (int64_t h = 0; h < heads; h++) {
        softmax(buffer + h * len, len, &top, &sum);
        if (unit->partial) {
            unit->partial[heads * hd + h] = top;
            unit->partial[heads * hd + heads + h] = sum;
        }
    }
    /* out_h = sum_t p[h, t] v_t[h / group] */
    for (int64_t h0 = 0, n; h0 < heads; h0 += n) {
        n = heads_from(h0, group);
        float *const p = buffer + h0 * len;
        const int64_t at = h0 / group * bs * hd;
        float *y = out + h0 * hd;
        if (kv == KV_INT8) {
            scale_by_tokens(A, table, begin, len, h0 / group, A->value_scales, token_scales, p, n);  /* in place */
            heads_values(KV_INT8, n, vector, p, (const int8_t *)A->value_cache + at, slots, len, hd, y);
        } else if (kv == KV_FLOAT16) {
            heads_values(KV_FLOAT16, n, vector, p, (const _Float16 *)A->value_cache + at, slots, len, hd, y);
        } else {
            heads_values(KV_FLOAT32, n, vector, p, (const float *)A->value_cache + at, slots, len, hd, y);
        }
    }
}

static void attend_unit(const void *arg, int64_t u) {
    const struct paged_attention *A = arg;
    const struct attention_unit *unit = A->units + u;
    if (unit->tile)
        realizar_attend_tile(A, unit);
    else
        attend_row(A, unit);
}

/* Longest context first, so that the last units handed out are short ones. */
static int longest_first(const void *a, const void *b) {
    const int64_t x = ((const struct attention_tile *)a)->longest, y = ((const struct attention_tile *)b)->longest;
    return (x < y) - (x > y);
}

/* Splits the rows into tiles and single rows. A run of at least MIN_RUN rows that read the
 * same block table (row_tables) with lengths growing by one, the tokens of a prompt chunk,
 * goes in tiles of up to TILE rows; any other row (a decode row, a short chunk) alone. */
#define MIN_RUN 3  /* 7,936 tokens deep, beside 2 decodes: 3 rows in a tile 20.5-22.0 ms a step, alone 24.4-26.3; 2 rows alone 17.8-18.5, in a tile 19.9-20.1 */
static void plan(const int64_t *row_tables, const int64_t *context_lens, int64_t num_rows,
                 struct attention_tile *tiles, int64_t *num_tiles, int64_t *singles, int64_t *num_singles) {
    *num_tiles = *num_singles = 0;
    for (int64_t r = 0, end; r < num_rows; r = end) {
        end = r + 1;
        if (row_tables)
            while (end < num_rows && row_tables[end] == row_tables[r] && context_lens[end] == context_lens[end - 1] + 1)
                end++;
        if (end - r < MIN_RUN) {
            for (int64_t i = r; i < end; i++) singles[(*num_singles)++] = i;
            continue;
        }
        for (int64_t first = r; first < end; first += TILE) {
            const int64_t rows = end - first < TILE ? end - first : TILE;
            tiles[(*num_tiles)++] = (struct attention_tile){first, rows, context_lens[first], context_lens[first + rows - 1]};
        }
    }
    qsort(tiles, (size_t)*num_tiles, sizeof *tiles, longest_first);
}

/* A call with fewer units of work than UNITS_PER_THREAD per thread (a few decode rows, a short chunk, at long
 * contexts) splits their contexts into parts of at least MIN_PART tokens, each a unit, whose results are merged
 * once all are done (flash-decoding): one row alone would otherwise leave all threads but one idle. */
#define UNITS_PER_THREAD 4
#define MIN_PART 256  /* against 512: one row at 512-1,024 tokens 3.4-3.6 ms a step against 3.5-3.9; even beyond */

/* The parts of a context of `shortest` (a tile: its shortest row) to `longest` tokens: at most `parts`, each
 * boundary a multiple of the block size below `shortest`, at least MIN_PART tokens and a block apart. Writes the
 * units (partials from *partial on, `floats` each, when split) and returns how many. */
static int64_t split(struct attention_unit *units, int64_t item, int64_t g, int tile, int64_t shortest,
                     int64_t longest, int64_t parts, int64_t bs, int64_t floats, float **partial) {
    const int64_t most = shortest / (bs > MIN_PART ? bs : MIN_PART);
    parts = parts < most ? parts : most;
    if (parts <= 1) {
        units[0] = (struct attention_unit){item, g, 0, longest, tile, NULL};
        return 1;
    }
    for (int64_t p = 0; p < parts; p++) {
        const int64_t begin = shortest * p / parts / bs * bs;
        const int64_t end = p + 1 < parts ? shortest * (p + 1) / parts / bs * bs : longest;
        units[p] = (struct attention_unit){item, g, begin, end, tile, *partial};
        *partial += floats;
    }
    return parts;
}

/* The weights w[p] of n parts' results in their merge, from each part's max score m[p] and sum of exps l[p]:
 * exp(m[p] - the largest m), times l[p] where the parts' results are already divided by their sums
 * (`normalized`). Returns what the weighted sum of the results is divided by. */
static float part_weights(int64_t n, const float *m, const float *l, int normalized, float *w) {
    float top = -INFINITY, total = 0.0f;
    for (int64_t p = 0; p < n; p++) top = m[p] > top ? m[p] : top;
    for (int64_t p = 0; p < n; p++) {
        w[p] = expf(m[p] - top) * (normalized ? l[p] : 1.0f);
        total += normalized ? w[p] : w[p] * l[p];
    }
    return total;
}

/* The whole result of a split unit's parts (units[0 .. n - 1], which share its item), from their partials:
 * a tile's o [nv][hd][TILE] not yet divided by l, then m and l [nv][TILE] (lanes: cpu_kernels.h's tile_lane);
 * a row's o [heads][hd] divided by l, then m and l [heads]. */
static void merge(const struct paged_attention *A, const struct attention_unit *units, int64_t n) {
    const int64_t heads = A->heads, group = A->group, hd = A->hd;
    const int tile = units[0].tile;
    const int64_t rows = tile ? A->tiles[units[0].item].rows : 1, pairs = tile ? group * rows : heads;
    const int64_t lanes = tile ? tile_vectors(group, rows) * TILE : heads;  /* each with an m and l */
    const int64_t first = tile ? A->tiles[units[0].item].first : A->singles[units[0].item];
    float m[n], l[n], w[n];
    for (int64_t pair = 0; pair < pairs; pair++) {  /* a tile's pair: head j * rows + row u; a row's: head */
        for (int64_t p = 0; p < n; p++) {
            m[p] = units[p].partial[hd * lanes + pair];
            l[p] = units[p].partial[hd * lanes + lanes + pair];
        }
        const float total = part_weights(n, m, l, !tile, w);
        const int64_t h = tile ? units[0].g * group + pair / rows : pair, u = tile ? pair % rows : 0;
        float *y = A->out_all + (first + u) * heads * hd + h * hd;
        for (int64_t c = 0; c < hd; c++) {
            float acc = 0.0f;
            for (int64_t p = 0; p < n; p++) acc += w[p] * units[p].partial[tile ? tile_lane(pair, c, hd) : pair * hd + c];
            y[c] = acc / total;
        }
    }
}

/* Returns 0, or -1 when a buffer could not be allocated. row_tables[r] is the row of
 * block_tables that query row r reads (NULL: row r). */
int realizar_paged_attention(
    const float *q_all,          /* [R, H, hd], rows q_stride floats apart */
    int64_t q_stride,
    const void *key_cache,       /* [blocks, KV, bs, hd] of kind kv (KV_FLOAT32, KV_FLOAT16, KV_INT8) */
    const void *value_cache,     /* [blocks, KV, bs, hd] */
    const float *key_scales,     /* [blocks, KV, bs] for KV_INT8, else NULL */
    const float *value_scales,
    const int64_t *block_tables, /* [S, max_blocks] */
    const int64_t *row_tables,   /* [R] or NULL */
    const int64_t *context_lens, /* [R] tokens each query attends to, itself included */
    float *out_all,              /* [R, H, hd] */
    int64_t num_rows, int64_t max_blocks, int64_t block_size,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale, int kv)
{
    if (num_rows <= 0) return 0;
    struct attention_tile *tiles = malloc(sizeof *tiles * (size_t)num_rows);
    int64_t *singles = malloc(sizeof *singles * (size_t)num_rows);
    if (!tiles || !singles) {
        free(tiles);
        free(singles);
        return -1;
    }
    struct paged_attention A = {
        .q_all = q_all, .q_stride = q_stride, .key_cache = key_cache, .value_cache = value_cache,
        .key_scales = key_scales, .value_scales = value_scales,
        .block_tables = block_tables, .row_tables = row_tables, .context_lens = context_lens,
        .out_all = out_all, .max_blocks = max_blocks, .bs = block_size, .heads = num_heads,
        .kv_heads = num_kv_heads, .group = num_heads / num_kv_heads, .hd = head_dim,
        .row = num_kv_heads * head_dim, .scale = scale, .kv = kv, .failed = 0, .tiles = tiles,
        .singles = singles};
    plan(row_tables, context_lens, num_rows, tiles, &A.num_tiles, singles, &A.num_singles);
    const int64_t whole = A.num_tiles * num_kv_heads + A.num_singles, wanted = UNITS_PER_THREAD * realizar_threads();
    const int64_t parts = whole < wanted ? (wanted + whole - 1) / whole : 1;
    const int64_t tile_floats = A.group * TILE * (head_dim + 2), row_floats = num_heads * (head_dim + 2);
    struct attention_unit *units = malloc(sizeof *units * (size_t)(whole * parts));
    float *partials = parts > 1 ? malloc(sizeof(float) * (size_t)((A.num_tiles * num_kv_heads * tile_floats +
                                                                    A.num_singles * row_floats) * parts))
                                : NULL;
    if (!units || (parts > 1 && !partials)) {
        free(tiles);
        free(singles);
        free(units);
        free(partials);
        return -1;
    }
    float *next = partials;
    for (int64_t t = 0; t < A.num_tiles; t++)
        for (int64_t g = 0; g < num_kv_heads; g++)
            A.num_units += split(units + A.num_units, t, g, 1, tiles[t].shortest, tiles[t].longest, parts, block_size,
                                 tile_floats, &next);
    for (int64_t i = 0; i < A.num_singles; i++) {
        const int64_t len = context_lens[singles[i]];
        A.num_units += split(units + A.num_units, i, 0, 0, len, len, parts, block_size, row_floats, &next);
    }
    A.units = units;
    realizar_parallel(attend_unit, &A, A.num_units);
    for (int64_t u = 0, n; u < A.num_units; u += n) {  /* the parts of a split context: consecutive units */
        n = 1;
        if (!units[u].partial) continue;
        while (u + n < A.num_units && units[u + n].partial && units[u + n].item == units[u].item &&
               units[u + n].g == units[u].g && units[u + n].tile == units[u].tile)
            n++;
        if (!atomic_load(&A.failed)) merge(&A, units + u, n);
    }
    free(tiles);
    free(singles);
    free(units);
    free(partials);
    return atomic_load(&A.failed) ? -1 : 0;
}

/* hd floats at x as float16 at y, rounded to nearest even. */
static void to_half(_Float16 *y, const float *x, int64_t hd) {
    int64_t i = 0;
    for (; i + 8 <= hd; i += 8) store8h(y + i, load8(x + i));
    for (; i < hd; i++) y[i] = (_Float16)x[i];
}

/* hd floats at x as int8 at y with their scale: y = round(x * 127 / max |x|), *scale = max |x| / 127 (0 and
 * zeros for a row of zeros). kv_cache.py's torch path computes the same, in the same float32 steps. */
static void to_int8(int8_t *y, float *scale, const float *x, int64_t hd) {
    float top = 0.0f;
    for (int64_t i = 0; i < hd; i++) top = fabsf(x[i]) > top ? fabsf(x[i]) : top;
    const float inverse = top > 0.0f ? 127.0f / top : 0.0f;
    *scale = top / 127.0f;
    for (int64_t i = 0; i < hd; i++) y[i] = (int8_t)nearbyintf(x[i] * inverse);
}

void realizar_write_kv(
    void *key_cache, void *value_cache,  /* [blocks, KV, bs, hd] of kind kv */
    float *key_scales, float *value_scales,  /* [blocks, KV, bs] for KV_INT8, else NULL */
    const float *k, const float *v,      /* [T, KV, hd] (rows may be strided) */
    int64_t k_row_stride, int64_t v_row_stride,
    const int64_t *slots, int64_t num_tokens, int64_t kv_heads, int64_t block_size, int64_t head_dim, int kv)
{
    const size_t bytes = sizeof(float) * (size_t)head_dim;
    for (int64_t t = 0; t < num_tokens; t++) {
        const int64_t block = slots[t] / block_size, offset = slots[t] % block_size;
        for (int64_t g = 0; g < kv_heads; g++) {
            const int64_t row = (block * kv_heads + g) * block_size + offset, at = row * head_dim;
            const float *kt = k + t * k_row_stride + g * head_dim, *vt = v + t * v_row_stride + g * head_dim;
            if (kv == KV_INT8) {
                to_int8((int8_t *)key_cache + at, key_scales + row, kt, head_dim);
                to_int8((int8_t *)value_cache + at, value_scales + row, vt, head_dim);
            } else if (kv == KV_FLOAT16) {
                to_half((_Float16 *)key_cache + at, kt, head_dim);
                to_half((_Float16 *)value_cache + at, vt, head_dim);
            } else {
                memcpy((float *)key_cache + at, kt, bytes);
                memcpy((float *)value_cache + at, vt, bytes);
            }
        }
    }
}
