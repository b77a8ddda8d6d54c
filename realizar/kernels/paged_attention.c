/* Paged-KV kernels for the CPU engine, float32.
 *
 * The KV cache of one layer is a [num_slots, num_kv_heads, head_dim] array; slot
 * s = block * block_size + offset. A sequence's tokens live in the blocks of its block table.
 *
 * decode_attention: one query token per sequence, attending over its whole context
 *   out[b, h, :] = sum_t softmax_t(scale * q[b, h] . K[slot(b, t), h / group]) V[slot(b, t), h / group]
 * Each sequence's keys and values are read once, row by row in block order, for all its
 * query heads, and nothing but the live slots is touched: no gather, no padding, no mask.
 * It is float32 softmax attention in two passes (scores, then values); its exp is within a
 * few ulp of libm's, and the results match torch's SDPA to rounding (tests/unit/test_kernels.py).
 *
 * write_kv: K[slots[t]] = k[t], V[slots[t]] = v[t].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* exp(x) for x <= 0 to about 1 ulp, in plain arithmetic so loops over it vectorize:
 * x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor-like polynomial
 * (Cephes' expf coefficients), scaled by 2^n through the exponent bits. */
static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;  /* below this exp underflows float anyway */
    const float shift = 12582912.0f; /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const float n = (x * 1.44269504088896341f + shift) - shift;
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { float f; int32_t i; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

typedef float v8 __attribute__((vector_size(32)));  /* 8 floats: one AVX register, two SSE/NEON */

static inline v8 load8(const float *p) { v8 x; memcpy(&x, p, sizeof x); return x; }
static inline void store8(float *p, v8 x) { memcpy(p, &x, sizeof x); }
static inline float sum8(v8 x) { return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7])); }

/* Returns 0, or -1 when a buffer could not be allocated. For each sequence: the scores of
 * every query head against every key row (one pass over the keys), a softmax per head, then
 * the weighted sum of the value rows. Scores take four keys at a time and the value sum eight
 * 8-wide column groups at a time, so independent multiply-adds run side by side instead of
 * waiting on each other. */
int realizar_decode_attention(
    const float *q_all,          /* [B, H, hd] */
    const float *key_cache,      /* [slots, KV, hd] */
    const float *value_cache,    /* [slots, KV, hd] */
    const int64_t *block_tables, /* [B, max_blocks] */
    const int64_t *context_lens, /* [B] tokens each query attends to, itself included */
    float *out_all,              /* [B, H, hd] */
    int64_t num_seqs, int64_t max_blocks, int64_t block_size,
    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, float scale)
{
    const int64_t heads = num_heads, group = num_heads / num_kv_heads;
    const int64_t hd = head_dim, bs = block_size;
    const int64_t row = num_kv_heads * hd; /* floats per cache slot */
    const int vector = hd % 8 == 0;
    int64_t longest = 1;
    for (int64_t b = 0; b < num_seqs; b++)
        if (context_lens[b] > longest) longest = context_lens[b];
    float *scores = malloc(sizeof(float) * (size_t)(heads * longest)); /* [h, t] */
    int64_t *offsets = malloc(sizeof(int64_t) * (size_t)longest);      /* [t] cache offset of token t */
    if (!scores || !offsets) { free(scores); free(offsets); return -1; }

    for (int64_t b = 0; b < num_seqs; b++) {
        const int64_t len = context_lens[b];
        const int64_t *table = block_tables + b * max_blocks;
        const float *q = q_all + b * heads * hd;
        float *out = out_all + b * heads * hd;
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
    free(scores);
    free(offsets);
    return 0;
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
