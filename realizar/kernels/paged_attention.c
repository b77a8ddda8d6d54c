/* Paged-KV kernels for the CPU engine, float32.
 *
 * The KV cache of one layer is a [num_slots, num_kv_heads, head_dim] array; slot
 * s = block * block_size + offset. A sequence's tokens live in the blocks of its block table.
 *
 * paged_attention: query rows, each attending over the first context_lens[r] tokens of a
 * sequence's cache (one row per sequence when decoding; one row per prompt token, with
 * growing lengths, for a short prompt chunk)
 *   out[r, h, :] = sum_t softmax_t(scale * q[r, h] . K[slot(r, t), h / group]) V[slot(r, t), h / group]
 * A row's keys and values are read once, row by row in block order, for all its query
 * heads, and nothing but the live slots is touched: no gather, no padding, no mask. Rows
 * run in parallel on the thread pool.
 * It is float32 softmax attention in two passes (scores, then values); its exp is within a
 * few ulp of libm's, and the results match torch's SDPA to rounding (tests/unit/test_kernels.py).
 *
 * write_kv: K[slots[t]] = k[t], V[slots[t]] = v[t].
 */
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

struct attention {
    const float *q_all, *key_cache, *value_cache;
    const int64_t *block_tables, *row_tables, *context_lens;
    float *out_all;
    int64_t q_stride, max_blocks, bs, heads, group, hd, row;
    float scale;
    _Atomic int failed;
};

/* One query row: the scores of every query head against every key (one pass over the keys),
 * a softmax per head, then the weighted sum of the value rows. Scores take four keys at a
 * time and the value sum eight 8-wide column groups at a time, so independent multiply-adds
 * run side by side instead of waiting on each other. */
static void attend_row(const void *arg, int64_t b) {
    const struct attention *A = arg;
    const int64_t heads = A->heads, group = A->group, hd = A->hd, bs = A->bs, row = A->row;
    const float *key_cache = A->key_cache, *value_cache = A->value_cache;
    const float scale = A->scale;
    const int vector = hd % 8 == 0;
    const int64_t len = A->context_lens[b];
    static __thread float *scores;    /* [h, t], kept between calls of each thread */
    static __thread int64_t *offsets; /* [t] cache offset of token t */
    static __thread int64_t capacity; /* tokens */
    static __thread int64_t score_capacity;
    if (len > capacity || heads * len > score_capacity) {
        free(scores);
        free(offsets);
        scores = malloc(sizeof(float) * (size_t)(heads * len));
        offsets = malloc(sizeof(int64_t) * (size_t)len);
        const int ok = scores && offsets;
        capacity = ok ? len : 0;
        score_capacity = ok ? heads * len : 0;
        if (!ok) {
            atomic_store(&((struct attention *)A)->failed, 1);
            return;
        }
    }
    const int64_t *table = A->block_tables + (A->row_tables ? A->row_tables[b] : b) * A->max_blocks;
    const float *q = A->q_all + b * A->q_stride;
    float *out = A->out_all + b * heads * hd;
    for (int64_t t = 0; t < len; t++) offsets[t] = (table[t / bs] * bs + t % bs) * row;

    /* scores[h, t] = scale * q_h . k_t[h / group]; four keys at a time when vectorized */
    for (int64_t h = 0; h < heads; h++) {
        const float *qh = q + h * hd, *kh = key_cache + (h / group) * hd;
        float *s = scores + h * len;
        int64_t t = 0;
        if (vector) {
            for (; t + 4 <= len; t += 4) {
                const float *k0 = kh + offsets[t], *k1 = kh + offsets[t + 1];
                const float *k2 = kh + offsets[t + 2], *k3 = kh + offsets[t + 3];
                v8 a0 = {0}, a1 = {0}, a2 = {0}, a3 = {0};
                for (int64_t i = 0; i < hd; i += 8) {
                    const v8 x = load8(qh + i);
                    a0 += x * load8(k0 + i);
                    a1 += x * load8(k1 + i);
                    a2 += x * load8(k2 + i);
                    a3 += x * load8(k3 + i);
                }
                s[t] = scale * sum8(a0);
                s[t + 1] = scale * sum8(a1);
                s[t + 2] = scale * sum8(a2);
                s[t + 3] = scale * sum8(a3);
            }
        }
        for (; t < len; t++) {
            const float *k = kh + offsets[t];
            float dot = 0.0f;
            for (int64_t i = 0; i < hd; i++) dot += qh[i] * k[i];
            s[t] = scale * dot;
        }
    }
    /* softmax over t, per query head */
    for (int64_t h = 0; h < heads; h++) {
        float *s = scores + h * len;
        float m = -INFINITY, sum = 0.0f;
        for (int64_t t = 0; t < len; t++) m = s[t] > m ? s[t] : m;
#pragma omp simd reduction(+ : sum)
        for (int64_t t = 0; t < len; t++) {
            s[t] = exp_nonpositive(s[t] - m);
            sum += s[t];
        }
        const float inv = 1.0f / sum;
#pragma omp simd
        for (int64_t t = 0; t < len; t++) s[t] *= inv;
    }
    /* out_h = sum_t p[h, t] v_t[h / group], 64 columns at a time in eight accumulators */
    for (int64_t h = 0; h < heads; h++) {
        const float *p = scores + h * len, *vh = value_cache + (h / group) * hd;
        float *y = out + h * hd;
        int64_t c = 0;
        if (vector) {
            for (; c + 64 <= hd; c += 64) {
                v8 a[8] = {{0}};
                for (int64_t t = 0; t < len; t++) {
                    const float *v = vh + offsets[t] + c;
                    const float pt = p[t];
                    for (int j = 0; j < 8; j++) a[j] += pt * load8(v + 8 * j);
                }
                for (int j = 0; j < 8; j++) store8(y + c + 8 * j, a[j]);
            }
        }
        for (; c < hd; c++) {
            float acc = 0.0f;
            for (int64_t t = 0; t < len; t++) acc += p[t] * vh[offsets[t] + c];
            y[c] = acc;
        }
    }
    }

/* Returns 0, or -1 when a buffer could not be allocated. row_tables[r] is the row of
 * block_tables that query row r reads (NULL: row r). */
int realizar_paged_attention(
    const float *q_all,          /* [R, H, hd], rows q_stride floats apart */
    int64_t q_stride,
    const float *key_cache,      /* [slots, KV, hd] */
    const float *value_cache,    /* [slots, KV, hd] */
    const int64_t *block_tables, /* [S, max_blocks] */
    const int64_t *row_tables,   /* [R] or NULL */
    const int64_t *context_lens, /* [R] tokens each query attends to, itself included */
    float *out_all,              /* [R, H, hd] */
    int64_t num_rows, int64_t max_blocks, int64_t block_size,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale)
{
    struct attention A = {
        .q_all = q_all, .q_stride = q_stride, .key_cache = key_cache, .value_cache = value_cache,
        .block_tables = block_tables, .row_tables = row_tables, .context_lens = context_lens,
        .out_all = out_all, .max_blocks = max_blocks, .bs = block_size, .heads = num_heads,
        .group = num_heads / num_kv_heads, .hd = head_dim, .row = num_kv_heads * head_dim,
        .scale = scale, .failed = 0};
    realizar_parallel(attend_row, &A, num_rows);
    return atomic_load(&A.failed) ? -1 : 0;
}


void realizar_write_kv(
    float *key_cache, float *value_cache,  /* [slots, KV, hd] */
    const float *k, const float *v,        /* [T, KV, hd] (rows may be strided) */
    int64_t k_row_stride, int64_t v_row_stride,
    const int64_t *slots, int64_t num_tokens, int64_t row_elems)
{
    for (int64_t t = 0; t < num_tokens; t++) {
        memcpy(key_cache + slots[t] * row_elems, k + t * k_row_stride, sizeof(float) * (size_t)row_elems);
        memcpy(value_cache + slots[t] * row_elems, v + t * v_row_stride, sizeof(float) * (size_t)row_elems);
    }
}
