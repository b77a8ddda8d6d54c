/* What quant_gemm.c (the exact class) and quant_fast.c (the fast class) share: the record
 * formats, the vector types and loads, and the two functions each takes from the other. Two
 * files, so that the two classes compile in parallel (each is most of a build's time). */
#ifndef REALIZAR_QUANT_BLOCKS_H
#define REALIZAR_QUANT_BLOCKS_H

#include <stdint.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#define NR 16             /* output rows per panel, as in packed_gemm.c */
#define QK 32             /* terms per record */
#define PASS_BLOCKS 8     /* records per pass over the sums: 256 terms, 16 KiB of floats per panel */
#define MC 96             /* rows of x per unit, as in packed_gemm.c */

/* Formats; realizar/kernels/__init__.py has the same codes. A format | HALF has float16 scales. */
enum { Q4_OFFSET, Q4_MIN, Q5_OFFSET, Q5_MIN, Q6_OFFSET, Q8, HALF = 8 };
/* The fast class's kinds of records (quant_fast.c; realizar/kernels/__init__.py has the same codes) */
enum { FAST_NIBBLES, FAST_BYTES, FAST_SIGNED_BYTES, FAST_SIXES, FAST_KIND = 3,  /* the integers' kind */
       FAST_HALF = 8, FAST_TWO_D = 16, FAST_MIN = 32, FAST_SUPER = 64 };  /* flags of the scales */

typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

static inline u8x16 bytes16(const uint8_t *p) { u8x16 v; memcpy(&v, p, sizeof v); return v; }
static inline f32x16 floats16(const float *p) { f32x16 v; memcpy(&v, p, sizeof v); return v; }

typedef _Float16 f16x16 __attribute__((vector_size(32)));

/* 16 float16 at p as float32: one vcvtph2ps with AVX-512, two with F16C (GCC 12 converts a
 * _Float16 vector element by element, which made the fast class 2x slower). */
static inline f32x16 halves16(const uint8_t *p) {
    f32x16 r;
#if defined(__AVX512F__)
    const __m512 v = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)p));
    memcpy(&r, &v, sizeof r);
#elif defined(__AVX2__) && defined(__F16C__)
    const __m256 lo = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
    const __m256 hi = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p + 16)));
    memcpy(&r, &lo, sizeof lo);
    memcpy((char *)&r + sizeof lo, &hi, sizeof hi);
#else
    f16x16 v;
    memcpy(&v, p, sizeof v);
    r = __builtin_convertvector(v, f32x16);
#endif
    return r;
}

/* The largest lane of v */
static inline float max_lane(f32x16 v) {
#if defined(__AVX512F__)
    __m512 r;
    memcpy(&r, &v, sizeof r);
    return _mm512_reduce_max_ps(r);
#else
    float m = v[0];
    for (int k = 1; k < 16; k++) m = v[k] > m ? v[k] : m;
    return m;
#endif
}

/* The largest of a panel's first `cols` outputs (1 .. 16), as a ranked product's last pass ranks panels: a NaN ranks
 * last in a part of a panel. */
static inline float panel_largest(f32x16 v, int64_t cols) {
    if (cols == NR) return max_lane(v);
    float m = -INFINITY;
    for (int64_t k = 0; k < cols; k++) m = v[k] > m ? v[k] : m;
    return m;
}

/* The first `cols` (1 .. 16) lanes of v to y */
static inline __attribute__((always_inline)) void store_cols(float *y, f32x16 v, int64_t cols) {
#if defined(__AVX512F__)
    __m512 u;
    memcpy(&u, &v, sizeof u);
    _mm512_mask_storeu_ps(y, (__mmask16)((1u << cols) - 1), u);
#else
    if (cols == NR) {
        memcpy(y, &v, sizeof v);
    } else {
        for (int64_t i = 0; i < cols; i++) y[i] = v[i];
    }
#endif
}

/* store_cols for outputs read again only after the product: where the 16 lanes are whole and aligned, streamed past
 * the caches, so that the store neither reads the line from memory first nor pushes out the weights (an LM head's
 * coarse logits are 12.6 MB at 64 rows of the demo model: its decode steps of 64 sequences took 0.93x the time on an
 * AMX Xeon, BENCHMARKS.md). Each unit that streams ends with a store fence. */
static inline __attribute__((always_inline)) void stream_cols(float *y, f32x16 v, int64_t cols) {
#if defined(__AVX512F__)
    if (cols == NR && !((uintptr_t)y & 63)) {
        __m512 u;
        memcpy(&u, &v, sizeof u);
        _mm512_stream_ps(y, u);
        return;
    }
#endif
    store_cols(y, v, cols);
}

/* panel_largest, or a NaN where one of the `cols` outputs is: the maxima a ranked product's argmax is found from */
static inline float panel_largest_or_nan(f32x16 v, int64_t cols) {
    const i32x16 nan = v != v;
    for (int64_t k = 0; k < cols; k++)
        if (nan[k]) return NAN;
    return panel_largest(v, cols);
}

/* A panel's outputs from a ranked product's coarse pass (quant_fast.c's dot products, quant_tiles.c's int8 tiles):
 * streamed to y, and their largest kept in *largest, by which the last pass ranks the panels, and from which it
 * finds the row's argmax: a NaN where one of them is. */
static inline __attribute__((always_inline)) void put_coarse(float *y, float *largest, f32x16 v, int64_t cols) {
    stream_cols(y, v, cols);
    *largest = panel_largest_or_nan(v, cols);
}

/* v, rounded to float32 here: the compiler may not fuse the product that made it with the
 * addition that follows, which would round once where the reference rounds twice. */
static inline f32x16 rounded(f32x16 v) {
#if defined(__AVX512F__)
    __asm__("" : "+v"(v));
#elif defined(__AVX__)
    v8 lo, hi;
    memcpy(&lo, &v, sizeof lo);
    memcpy(&hi, (char *)&v + sizeof lo, sizeof hi);
    __asm__("" : "+x"(lo), "+x"(hi));
    memcpy(&v, &lo, sizeof lo);
    memcpy((char *)&v + sizeof lo, &hi, sizeof hi);
#elif defined(__aarch64__)
    __asm__("" : "+w"(v));
#endif
    return v;
}

/* The 16 signed bytes of v as 16 int32. GCC scalarizes __builtin_convertvector here, so the
 * x86 sign extensions are named. */
static inline i32x16 widen(i8x16 v) {
    i32x16 r;
#if defined(__AVX512F__)
    const __m512i w = _mm512_cvtepi8_epi32((__m128i)v);
    memcpy(&r, &w, sizeof r);
#elif defined(__AVX2__)
    const __m256i lo = _mm256_cvtepi8_epi32((__m128i)v);
    const __m256i hi = _mm256_cvtepi8_epi32(_mm_unpackhi_epi64((__m128i)v, (__m128i)v));
    memcpy(&r, &lo, sizeof lo);
    memcpy((char *)&r + sizeof lo, &hi, sizeof hi);
#else
    for (int i = 0; i < 16; i++) r[i] = v[i];
#endif
    return r;
}

/* AVX2 without AVX-512 has 16 registers of 8 floats: a 16-row panel is two halves of 8 lanes
 * (rows 0-7, rows 8-15), one register each. The 64-byte vectors above, split by the compiler,
 * went through the stack there (a Q4_1 [3072 x 576] product at one row: 3.1 ms, against 0.12
 * with AVX-512), so these builds have tiles of their own, with accumulators that fit in the
 * registers. Each lane computes the same float32 operations in the same order, so the results
 * are the same floats. Other builds (plain C, NEON) keep the 16-lane code. */
#if defined(__AVX2__) && defined(__F16C__) && !defined(__AVX512F__)
#define YMM 1

/* 8 bytes at p as 8 int32, zero- or sign-extended (one vpmovzxbd / vpmovsxbd from memory). */
static inline vi8 zext8(const uint8_t *p) { return (vi8)_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)); }
static inline vi8 sext8(const uint8_t *p) { return (vi8)_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)); }

/* 8 float16 at p as float32. */
static inline v8 halves8(const uint8_t *p) { return (v8)_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p)); }

/* Hides where *p points from the compiler. Terms k and k + 16 are the two nibbles of the same
 * bytes: without this, GCC loads them once for both and keeps 16 vectors per panel half alive
 * from term k to term k + 16, on the stack. Loading them twice (from L1) is cheaper. */
static inline void forget(const uint8_t **p) { __asm__("" : "+r"(*p)); }
static inline void forget_floats(const float **p) { __asm__("" : "+r"(*p)); }

/* as `rounded`, for one register */
static inline v8 rounded8(v8 v) {
    __asm__("" : "+x"(v));
    return v;
}
#endif

static inline int fmt_base(int f) { return f & (HALF - 1); }
static inline int fmt_bits(int f) {
    f = fmt_base(f);
    return f <= Q4_MIN ? 4 : f <= Q5_MIN ? 5 : f == Q6_OFFSET ? 6 : 8;
}
static inline int fmt_offset(int f) {
    f = fmt_base(f);
    return f == Q4_OFFSET ? 8 : f == Q5_OFFSET ? 16 : f == Q6_OFFSET ? 32 : 0;
}
static inline int fmt_has_min(int f) { return fmt_base(f) == Q4_MIN || fmt_base(f) == Q5_MIN; }
static inline int fmt_two_d(int f) { return fmt_base(f) == Q6_OFFSET; }  /* a d per 16 terms */
static inline int64_t int_bytes(int f) { return fmt_bits(f) == 8 ? 512 : 256 + (fmt_bits(f) - 4) * 64; }
static inline int64_t scale_bytes(int f) { return (f & HALF) ? 2 : 4; }

/* Bytes of a panel's fast records of kind `kind` over `blocks` blocks of 32 terms (quant_fast.c). */
int64_t realizar_fast_panel_bytes(int kind, int64_t blocks);
/* Lay a weight's integers and scales out as the exact class's records (quant_gemm.c). */
void realizar_pack_quantized(const uint8_t *q, const void *scales, int64_t n, int64_t k, int f, uint8_t *out);
/* Lay a weight's integers and factors out as fast records (quant_fast.c). */
void realizar_pack_fast(const uint8_t *q, const void *scales, const uint16_t *factors, int64_t n, int64_t k,
                        int kind, uint8_t *out);
/* The same records straight from GGUF Q4_0, Q4_1, Q8_0, Q4_K or Q6_K blocks (format 0-4; quant_fast.c). */
void realizar_pack_fast_blocks(const uint8_t *blocks, int format, int64_t n, int64_t k, int kind, uint8_t *out);
/* The weights of blocks first .. first + count - 1 of a panel's fast records (kind `kind`, integer
 * offset c), into `out`: the floats the exact class gives (quant_fast.c). */
void realizar_dequantize_fast_records(int kind, int c, const uint8_t *panel, int64_t first, int64_t count, float *out);
/* y = x W^T through a buffer of exactly dequantized weights (quant_gemm.c; `fast`: fast records). */
int realizar_buffered_gemm(const float *x, int64_t ldx, const uint8_t *w, int fmt, int fast, int c, float *y,
                           int64_t ldy, int64_t M, int64_t N, int64_t K);

/* Whether a kind's fast records can be laid out as tiles of their integers (0 no, 1 yes, 2 yes, with a min), and
 * that layout with each block's d and min, for quant_tiles.c (quant_fast.c, which knows the records; builds
 * without AVX512-BF16: never). */
int realizar_fast_tile_integers(int kind);
void realizar_fast_integer_tiles(int kind, int c, const uint8_t *panel, int64_t blocks, uint8_t *tiles, float *scales);
/* y = x W^T over fast records on AMX tiles (quant_tiles.c): 0 done, -1 no memory, 1 declined (too few rows,
 * a build or CPU without the tiles, or turned off by realizar_set_tiles). */
int realizar_tile_products(const float *x, int64_t ldx, const uint8_t *w, int kind, int c, float *y, int64_t ldy,
                           int64_t M, int64_t N, int64_t K);
/* The fewest rows whose products of kind `kind` go on the tiles (0: a build without them). */
int realizar_tile_min_rows(int kind);
/* A ranked product's first pass on AMX's int8 tiles (quant_tiles.c), for kinds whose records hold bytes (signed,
 * or unsigned less an offset c) with one d per block and no min (Q8_0): whether it takes M rows of kind `kind`
 * (tiles on and lent), and the pass, y ~= 256 d_x a W^T, the same floats as quant_fast.c's a-terms pass. `a`
 * holds x's a terms in row tiles, [ceil(M / 16)][K / 32][16][32] (zeros past M), `dx` the rows' d_x and `cs`
 * c times the block's sum of a alike, [ceil(M / 16)][K / 32][16]; `panel_max` [M][ceil(N / 16)] gets each row's
 * panel_largest of each panel. Returns 0, or -1 when a buffer could not be allocated. */
int realizar_tile_ranks(int kind, int64_t M);
int realizar_tile_ranking(const int8_t *a, const float *dx, const int32_t *cs, const uint8_t *w, int kind, float *y,
                          int64_t ldy, int64_t M, int64_t N, int64_t K, float *panel_max);
/* Each block's integers (its address in the panel's records) and d, for quant_tiles.c (quant_fast.c): kinds
 * without FAST_SUPER. */
void realizar_fast_block_d(int kind, const uint8_t *panel, int64_t blocks, const uint8_t **ints, float *d);

#endif
