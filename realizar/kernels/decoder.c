/* All decoder layers of one engine step in one call: the same kernels, in the same order, as the
 * model's per-operation forward pass (realizar/model/llama.py), so the results are the same bit
 * for bit; only the Python between them is gone. At one sequence that Python was about 2 ms of a
 * 10 ms decode step (some 450 calls and tensor allocations): a fifth of the single-stream time.
 *
 * Per layer, for the packed tokens x [T, D] (updated in place, the residual stream):
 *
 *   h = rms_norm(x) * attn_norm;  qkv = h Wqkv^T (+ b);  rope(q, k);  cache[slots] = k, v
 *   x += attention(q, cache) Wo^T
 *   h = rms_norm(x) * mlp_norm;   x += (silu(h Wgate^T) * (h Wup^T)) Wdown^T
 */
#include <stdint.h>
#include <string.h>

#include "cpu_kernels.h"

/* One linear layer's weight as the kernels hold it: a float32 panel-packed weight (packed_gemm.c),
 * or up to 4 quantized parts stacked along the outputs (quant_gemm.c), each exact or fast. */
enum { LINEAR_PACKED, LINEAR_QUANT, LINEAR_FAST };

struct realizar_linear {
    int64_t parts, in_features, out_features;
    const uint8_t *weights[4];  /* packed floats, or each part's records */
    int64_t rows[4];            /* each part's outputs */
    int32_t kind[4];            /* LINEAR_*, per part */
    int32_t format[4];          /* quant_gemm.c's format code, or the fast kind */
    int32_t offset[4];          /* the fast class's integer offset */
    const float *bias;          /* [out] or NULL */
};

struct realizar_layer {
    const float *attn_norm, *mlp_norm;
    struct realizar_linear qkv, o, gate_up, down;
    void *key_cache, *value_cache;  /* [blocks, KV, bs, hd] of the step's kind kv */
    float *key_scales, *value_scales;  /* [blocks, KV, bs] when kv is KV_INT8, else NULL */
};

struct realizar_step {
    const int64_t *positions, *slots;  /* [T] */
    const int64_t *tables;             /* [S, max_blocks] block tables */
    const int64_t *rows;               /* [T] the table of each query */
    const int64_t *lens;               /* [T] tokens each query attends to */
    const float *cos, *sin;            /* [max_position, hd] */
    int64_t max_blocks, block_size, heads, kv_heads, head_dim, hidden, intermediate;
    float eps, scale;
    int64_t kv;                        /* what the caches hold: KV_FLOAT32, KV_FLOAT16, KV_INT8 (cpu_kernels.h) */
};

/* y [T, out] = x [T, in] W^T (+ b). Returns 0, or -1 when a kernel could not allocate. */
static int linear(const struct realizar_linear *L, const float *x, int64_t T, float *y) {
    int64_t start = 0;
    for (int64_t i = 0; i < L->parts; i++) {
        int status;
        if (L->kind[i] == LINEAR_PACKED)
            status = realizar_gemm(x, L->in_features, (const float *)L->weights[i], y, T, L->out_features,
                                   L->in_features);
        else if (L->kind[i] == LINEAR_QUANT)
            status = realizar_quant_gemm(x, L->in_features, L->weights[i], L->format[i], y + start,
                                         L->out_features, T, L->rows[i], L->in_features);
        else
            status = realizar_quant_gemm_fast(x, L->in_features, L->weights[i], L->format[i], L->offset[i],
                                              y + start, L->out_features, T, L->rows[i], L->in_features);
        if (status != 0) return -1;
        start += L->rows[i];
    }
    if (L->bias)
        for (int64_t t = 0; t < T; t++)
            for (int64_t n = 0; n < L->out_features; n++) y[t * L->out_features + n] += L->bias[n];
    return 0;
}

static void add(float *x, const float *d, int64_t count) {
    for (int64_t i = 0; i < count; i++) x[i] += d[i];
}

/* Floats of the workspace realizar_decoder_layers needs for T tokens. */
int64_t realizar_decoder_workspace(const struct realizar_step *s, int64_t T) {
    const int64_t width = (s->heads + 2 * s->kv_heads) * s->head_dim;
    return T * (2 * s->hidden + width + s->heads * s->head_dim + 3 * s->intermediate);
}

/* x [T, D] through layers [0, count). Returns 0, or -1 when a kernel could not allocate. */
int realizar_decoder_layers(float *x, int64_t T, const struct realizar_layer *layers, int64_t count,
                            const struct realizar_step *s, float *workspace) {
    const int64_t D = s->hidden, hd = s->head_dim, q_width = s->heads * hd;
    const int64_t width = (s->heads + 2 * s->kv_heads) * hd, I = s->intermediate;
    float *h = workspace, *qkv = h + T * D, *attn = qkv + T * width, *out = attn + T * q_width;
    float *gate_up = out + T * D, *act = gate_up + T * 2 * I;
    for (int64_t l = 0; l < count; l++) {
        const struct realizar_layer *L = &layers[l];
        realizar_rms_norm(x, D, L->attn_norm, h, T, D, s->eps);
        if (linear(&L->qkv, h, T, qkv)) return -1;
        realizar_rope(qkv, width, s->positions, s->cos, s->sin, T, s->heads + s->kv_heads, hd);
        realizar_write_kv(L->key_cache, L->value_cache, L->key_scales, L->value_scales, qkv + q_width,
                          qkv + q_width + s->kv_heads * hd, width, width, s->slots, T, s->kv_heads, s->block_size, hd,
                          (int)s->kv);
        if (realizar_paged_attention(qkv, width, L->key_cache, L->value_cache, L->key_scales, L->value_scales,
                                     s->tables, s->rows, s->lens, attn, T, s->max_blocks, s->block_size, s->heads,
                                     s->kv_heads, hd, s->scale, (int)s->kv))
            return -1;
        if (linear(&L->o, attn, T, out)) return -1;
        add(x, out, T * D);
        realizar_rms_norm(x, D, L->mlp_norm, h, T, D, s->eps);
        if (linear(&L->gate_up, h, T, gate_up)) return -1;
        realizar_silu_mul(gate_up, 2 * I, act, T, I);
        if (linear(&L->down, act, T, out)) return -1;
        add(x, out, T * D);
    }
    return 0;
}
