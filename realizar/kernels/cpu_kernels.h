/* What the CPU kernels share: 8-wide float vectors, an exp that vectorizes, a thread's scratch buffers, and
 * the pool of threads that runs their work in parallel (thread_pool.c). */
#ifndef REALIZAR_CPU_KERNELS_H
#define REALIZAR_CPU_KERNELS_H

#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* *buffer, grown to at least `bytes` (64-byte aligned, its contents lost) where *capacity is short: a kernel's
 * scratch, kept in its own thread-local buffer and capacity between calls. Never NULL but when memory runs
 * out (then nothing is kept), even for 0 bytes. */
static inline void *thread_scratch(void **buffer, int64_t *capacity, int64_t bytes) {
    if (bytes > *capacity || !*buffer) {
        free(*buffer);
        *buffer = aligned_alloc(64, (size_t)(((bytes > 0 ? bytes : 1) + 63) / 64 * 64));
        *capacity = *buffer ? bytes : 0;
    }
    return *buffer;
}

typedef float v8 __attribute__((vector_size(32)));  /* 8 floats: one AVX register, two SSE/NEON */

static inline v8 load8(const float *p) { v8 x; memcpy(&x, p, sizeof x); return x; }
static inline void store8(float *p, v8 x) { memcpy(p, &x, sizeof x); }
/* A 16-column panel of one output row, its two 8-lane halves: stored, or added to what is there
 * (`accumulate`); only the first `cols` columns where the panel is the last, partial one of N. */
static inline void store_panel(float *dst, v8 lo, v8 hi, int64_t cols, int accumulate) {
    if (cols == 16) {
        if (accumulate) {
            lo += load8(dst);
            hi += load8(dst + 8);
        }
        store8(dst, lo);
        store8(dst + 8, hi);
    } else {
        float out[16] = {0};
        if (accumulate) memcpy(out, dst, (size_t)cols * sizeof(float));
        store8(out, lo + load8(out));
        store8(out + 8, hi + load8(out + 8));
        memcpy(dst, out, (size_t)cols * sizeof(float));
    }
}
static inline float sum8(v8 x) { return ((x[0] + x[4]) + (x[1] + x[5])) + ((x[2] + x[6]) + (x[3] + x[7])); }

/* exp(x) for x <= 0 to about 1 ulp, in plain arithmetic so loops over it vectorize:
 * x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor-like polynomial
 * (Cephes' expf coefficients), scaled by 2^n through the exponent bits. The steps are
 * written once, for x (already clamped to [-87, 0]) of type float or v8 alike; below -87
 * exp underflows float anyway. */
#define EXP_STEPS(x, n, p)                                                             \
    do {                                                                               \
        const float shift_ = 12582912.0f; /* 1.5 * 2^23: + and - it round to an integer */ \
        n = ((x) * 1.44269504088896341f + shift_) - shift_;                            \
        const __typeof__(n) r_ = ((x) - n * 0.693359375f) + n * 2.12194440e-4f;       \
        p = r_ * 1.9875691500e-4f + 1.3981999507e-3f;                                  \
        p = p * r_ + 8.3334519073e-3f;                                                 \
        p = p * r_ + 4.1665795894e-2f;                                                 \
        p = p * r_ + 1.6666665459e-1f;                                                 \
        p = p * r_ + 5.0000001201e-1f;                                                 \
        p = p * r_ * r_ + r_ + 1.0f;                                                   \
    } while (0)

static inline float exp_nonpositive(float x) {
    x = x < -87.0f ? -87.0f : x;
    float n, p;
    EXP_STEPS(x, n, p);
    union { float f; int32_t i; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

typedef int32_t vi8 __attribute__((vector_size(32)));
/* 16 floats and 16 ints: one AVX-512 register, two AVX ones (every file's 16-lane loops use these) */
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

/* float16 K/V (--kv-cache-dtype float16): stored as IEEE binary16 (rounded to nearest even, as
 * torch's .half() rounds), read into float32 registers, computed in float32. F16C's
 * vcvtph2ps/vcvtps2ph where the build has them (AVX2 and AVX-512 CPUs); elsewhere the compiler's
 * _Float16 conversions, which round the same way. */
typedef _Float16 h8 __attribute__((vector_size(16)));
#if defined(__F16C__) || defined(__AVX2__)
#include <immintrin.h>
#endif

static inline v8 load8h(const _Float16 *p) {
#if defined(__F16C__)
    const __m256 x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    v8 r;
    memcpy(&r, &x, sizeof r);
    return r;
#else
    h8 x;
    memcpy(&x, p, sizeof x);
    return __builtin_convertvector(x, v8);
#endif
}

static inline void store8h(_Float16 *p, v8 x) {
#if defined(__F16C__)
    __m256 f;
    memcpy(&f, &x, sizeof f);
    _mm_storeu_si128((__m128i *)p, _mm256_cvtps_ph(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#else
    const h8 h = __builtin_convertvector(x, h8);
    memcpy(p, &h, sizeof h);
#endif
}

/* What a KV cache holds (--kv-cache-dtype): float32; float16; or int8, each token's row of each KV head
 * (head_dim values) scaled by its own float32 (kv_cache.py: x ~= scale * q, scale = max |x| / 127). The
 * int8 loads below give the integers q as floats: the attention kernels apply a key's scale to its scores and
 * a value's to its softmax weights, once a token rather than once an element. */
enum { KV_FLOAT32 = 0, KV_FLOAT16 = 1, KV_INT8 = 2 };

/* Eight int8 values as floats: vpmovsxbd and vcvtdq2ps with AVX2 (GCC 12 sign-extends a vector of int8
 * converted with __builtin_convertvector one byte at a time in scalar registers: 5x slower attention). */
static inline v8 load8q(const int8_t *p) {
#if defined(__AVX2__)
    const __m256 x = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(const void *)p)));
    v8 r;
    memcpy(&r, &x, sizeof r);
    return r;
#else
    v8 r;
    for (int i = 0; i < 8; i++) r[i] = (float)p[i];
    return r;
#endif
}

/* Bytes of one element of a cache of `kind`. */
static inline __attribute__((always_inline)) int64_t kv_bytes(const int kind) { return 4 >> kind; }

/* Eight K/V values at element `at` of a cache of `kind`; called with a constant kind, so each caller
 * compiles to one kind of load. */
static inline __attribute__((always_inline)) v8 load8kv(const int kind, const void *cache, int64_t at) {
    if (kind == KV_INT8) return load8q((const int8_t *)cache + at);
    return kind == KV_FLOAT16 ? load8h((const _Float16 *)cache + at) : load8((const float *)cache + at);
}

static inline __attribute__((always_inline)) float loadkv(const int kind, const void *cache, int64_t at) {
    if (kind == KV_INT8) return (float)((const int8_t *)cache)[at];
    return kind == KV_FLOAT16 ? (float)((const _Float16 *)cache)[at] : ((const float *)cache)[at];
}

/* The address of element `at` of such a cache, for prefetches. */
static inline __attribute__((always_inline)) const char *kv_at(const int kind, const void *cache, int64_t at) {
    return (const char *)cache + at * kv_bytes(kind);
}

/* exp_nonpositive of 8 values at once, in vector arithmetic the compiler cannot fail to
 * vectorize (the scalar version above vectorizes only inside some loops). */
#define EXP_NONPOSITIVE(NAME, V, VI)                                   \
    static inline V NAME(V x) {                                         \
        const VI low = x < -87.0f;                                      \
        x = (V)(((VI)x & ~low) | ((VI)((V){0} - 87.0f) & low));         \
        V n, p;                                                         \
        EXP_STEPS(x, n, p);                                             \
        return p * (V)((__builtin_convertvector(n, VI) + 127) << 23);   \
    }
EXP_NONPOSITIVE(exp8_nonpositive, v8, vi8)  /* (and for other widths of float and int32 vectors) */

/* Prompt rows first .. first + rows - 1 (rows <= TILE) that share a block table, and their shortest and longest
 * contexts. */
struct attention_tile { int64_t first, rows, shortest, longest; };

/* A unit of a paged-attention call's work: tile `item` over KV head g, or single row `item` (tile = 0), over the
 * tokens [begin, end) of its context. A context split into parts leaves each part's result at `partial`, for
 * paged_attention.c to merge (NULL: the whole context, straight into out_all). */
struct attention_unit {
    int64_t item, g, begin, end;
    int tile;
    float *partial;
};

/* A paged-attention call (paged_attention.c), shared with the prompt tiles of
 * prefill_attention.c. */
struct paged_attention {
    const float *q_all;
    const void *key_cache, *value_cache;  /* of `kv`: [blocks, KV, bs, hd] */
    const float *key_scales, *value_scales;  /* [blocks, KV, bs] when kv is KV_INT8, else NULL */
    const int64_t *block_tables, *row_tables, *context_lens;
    float *out_all;
    int64_t q_stride, max_blocks, bs, heads, kv_heads, group, hd, row;
    float scale;
    int kv;  /* what the caches hold: KV_FLOAT32, KV_FLOAT16 or KV_INT8 */
    _Atomic int failed;
    /* how the call's work is split: tiles of prompt rows and single rows, in units */
    const struct attention_tile *tiles;  /* [num_tiles] */
    const int64_t *singles; /* [num_singles] rows attended one at a time */
    int64_t num_tiles, num_singles;
    const struct attention_unit *units;  /* [num_units] */
    int64_t num_units;
};

/* prompt rows attended together (prefill_attention.c): one vector lane each, 16 with AVX-512 (a 512-token prompt
 * chunk took 29 % of its step in tiles of 8) */
#if defined(__AVX512F__)
#define TILE 16
#else
#define TILE 8
#endif

/* The query heads of a KV group and the rows of a prompt tile, (head j, row u) pair j * rows + u, are the lanes of
 * nv = ceil(group * rows / TILE) vectors: a 4-row tile of SmolLM2's groups of 3 heads fills one vector, not three.
 * A tile's per-lane arrays are [nv][hd][TILE], lane `lane` of element i at tile_lane(lane, i, hd). */
static inline int64_t tile_lane(int64_t lane, int64_t i, int64_t hd) { return (lane / TILE * hd + i) * TILE + lane % TILE; }
static inline int64_t tile_vectors(int64_t group, int64_t rows) { return (group * rows + TILE - 1) / TILE; }

/* A unit of prompt rows (rows <= TILE, one block table) over KV head g: its part's partial result is o [nv][hd][TILE]
 * (not yet divided by l), then m and l [nv][TILE] each, the running max and sum of the online softmax. */
void realizar_attend_tile(const struct paged_attention *A, const struct attention_unit *unit);

/* Runs task(arg, u) for every u in [0, units) on the calling thread and the pool's workers,
 * and returns when all are done. Units are handed out one at a time, so a thread that the OS
 * deschedules for a while simply takes fewer. Calls from several threads take turns. */
typedef void (*realizar_task)(const void *arg, int64_t unit);
void realizar_parallel(realizar_task task, const void *arg, int64_t units);

/* Threads taking part in realizar_parallel, the caller included. */
int realizar_threads(void);

/* packed_gemm.c's tiles, for quant_gemm.c (see there). */
int64_t realizar_packed_x_floats(int64_t M, int64_t K);
void realizar_pack_x(const float *x, int64_t ldx, int64_t M, int64_t K, float *a);
void realizar_gemm_panels(const float *a, int64_t rows, int64_t K, int64_t k0, int64_t kc, const float *panels,
                          int64_t pstride, int group, int64_t cols, float *y, int64_t ldy, int accumulate);

/* The kernels decoder.c runs a step's layers through (defined in their own files). */
int realizar_gemm(const float *x, int64_t ldx, const float *packed, float *y, int64_t M, int64_t N, int64_t K);
int realizar_quant_gemm(const float *x, int64_t ldx, const uint8_t *w, int fmt, float *y, int64_t ldy,
                        int64_t M, int64_t N, int64_t K);
int realizar_fast_wide_bytes(void);
int realizar_fast_max_rows(void);
int realizar_fast_activation_bits(void);
int realizar_quant_gemm_fast(const float *x, int64_t ldx, const uint8_t *w, int kind, int c, float *y, int64_t ldy,
                             int64_t M, int64_t N, int64_t K);
void realizar_rms_norm(const float *x, int64_t ldx, const float *w, float *y, int64_t T, int64_t D, float eps);
void realizar_silu_mul(const float *gate_up, int64_t ld, float *y, int64_t T, int64_t I);
void realizar_rope(float *x, int64_t ld, const int64_t *positions, const float *cos, const float *sin,
                   int64_t T, int64_t heads, int64_t hd);
void realizar_write_kv(void *key_cache, void *value_cache, float *key_scales, float *value_scales, const float *k,
                       const float *v, int64_t k_row_stride, int64_t v_row_stride, const int64_t *slots,
                       int64_t num_tokens, int64_t kv_heads, int64_t block_size, int64_t head_dim, int kv);
int realizar_paged_attention(const float *q_all, int64_t q_stride, const void *key_cache, const void *value_cache,
                             const float *key_scales, const float *value_scales, const int64_t *block_tables,
                             const int64_t *row_tables, const int64_t *context_lens, float *out_all,
                             int64_t num_rows, int64_t max_blocks, int64_t block_size, int64_t num_heads,
                             int64_t num_kv_heads, int64_t head_dim, float scale, int kv);

#endif
