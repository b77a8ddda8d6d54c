/* Matrix products over quantized weights, the fast class (quant_gemm.c holds the exact one): x
 * quantized per row and 32-term block to two int8 terms, x ~= d_x (256 a + b) (see quantize_rows), times the weights' integers with integer dot products, the scales applied
 * per block in float32. Not exact, but within about 1e-5 of the block's largest |x|: a quality
 * gate (benchmarks/quality.py) measures it against float32 before `auto` may time and choose it.
 *
 * Records of 16 rows by 32 terms again, in a layout for 4-byte dot products: 32-bit lane j of
 * a 64-byte vector holds 4 consecutive terms of row j,
 *
 *   nibbles (4 bits)   4 vectors; vector t, byte 4j + i = u[j][4t + i] | u[j][16 + 4t + i] << 4
 *   bytes (5-8 bits)   8 vectors; vector t, byte 4j + i = u[j][4t + i]
 *   sixes (6 bits)     the bytes' 8 vectors in 6: 4 of their low nibbles as `nibbles` lays out 4 bits,
 *                      then 2 of their top 2 bits: byte 4j + i of vector 4 + v holds bits 4-5 of
 *                      byte 4j + i of bytes vector 4v + s in its bits 2s, 2s + 1 (s < 4)
 *   then [16] d (of terms 0-15 with FAST_TWO_D), [16] d of terms 16-31 (FAST_TWO_D only),
 *   [16] min (FAST_MIN only: the formats with a min have no integer offset, c = 0), as float32,
 *   or float16 with FAST_HALF (where that is exact),
 *   then zeros to a multiple of 64 bytes;
 *   or, with FAST_SUPER (the k-quants: small integer scales under a float16 factor of their 256-term
 *   super-block, multiplied out here, in float32, exactly as the file's floats), the records of a
 *   super-block's 8 blocks in one group: the super-block's float16 factors of its 16 rows (64 bytes), then
 *   for each pair of blocks their scales (64 bytes: 32 for each block) and their two blocks' integers:
 *     FAST_MIN (Q4_K, Q5_K):  factors [16] float16 d, [16] float16 -dmin; per block [16] u8 scale,
 *                             [16] u8 min: the block's d = d scale and min = -dmin min;
 *     FAST_TWO_D (Q6_K):      factors [16] float16 d, then 32 bytes of zeros; per block [16] s8 scale of
 *                             terms 0-15, [16] s8 scale of terms 16-31: d0 = d scale_0, d1 = d scale_1.
 *   Q4_K's records are then 296 bytes (2,368 a group) where float32 scales and mins took 384 (4.6 bits
 *   a weight; the file's 4.5), Q5_K's 552 and Q6_K's (as sixes) 424 where they took 640 (Q6_K: 6.6 bits
 *   a weight; the file's 6.56). The bytes lie in the order a product reads them, each block's integers on
 *   whole cache lines. (With the 8 blocks' scales together at the group's start, a product of 8 rows took
 *   40 % longer at 8,192 terms.)
 *
 * with u the stored integers (5/6-bit: unsigned; Q8_0: signed) and the weight
 * (u - c) * d (+ min). Per block, with x_q = 256 a + b, I_h = sum over half h of u * x_q and S_h
 * that of x_q,
 *
 *   y += d_x * (d_0 (I_0 - c S_0) + d_1 (I_1 - c S_1)) + min * d_x * (S_0 + S_1)
 */
#include "quant_blocks.h"

typedef uint8_t u8x64 __attribute__((vector_size(64)));
typedef int8_t i8x64 __attribute__((vector_size(64)));

static inline u8x64 bytes64(const uint8_t *p) { u8x64 v; memcpy(&v, p, sizeof v); return v; }
static inline i32x16 ints16(int32_t v) { return (i32x16){0} + v; }
typedef uint16_t u16x32 __attribute__((vector_size(64)));

/* Bits 4-5 of each byte of a 6-bit integers' vector: bits 2s, 2s + 1 of each byte of `top` (word shifts:
 * the mask drops what crosses a byte) */
static inline __attribute__((always_inline)) u8x64 top_bits(u8x64 top, int s) {
    const u16x32 t = (u16x32)top;
    return (u8x64)(s < 2 ? t << (4 - 2 * s) : s == 2 ? t : t >> 2) & 0x30;
}

/* Vector t of a 6-bit record's integers as bytes */
static inline __attribute__((always_inline)) u8x64 sixes_vector(const uint8_t *q, int t) {
    const u8x64 v = bytes64(q + 64 * (t & 3));
    return ((t < 4 ? v : v >> 4) & 15) | top_bits(bytes64(q + 256 + 64 * (t >> 2)), t & 3);
}

/* The 8 vectors of a record's integers as bytes (nibbles: the low and high nibbles of 4 vectors; signed
 * bytes keep their sign) */
static inline __attribute__((always_inline)) void fast_weights(const int KIND, const uint8_t *q, u8x64 w[8]) {
    for (int t = 0; t < 4; t++) {
        if ((KIND & FAST_KIND) == FAST_NIBBLES) {
            const u8x64 v = bytes64(q + 64 * t);
            w[t] = v & 15;
            w[4 + t] = v >> 4;
        } else if ((KIND & FAST_KIND) == FAST_SIXES) {
            w[t] = sixes_vector(q, t);
            w[4 + t] = sixes_vector(q, 4 + t);
        } else {
            w[t] = bytes64(q + 64 * t);
            w[4 + t] = bytes64(q + 64 * (4 + t));
        }
    }
}

/* Bytes of a record's integers: 4 vectors of nibbles, 6 of 6-bit integers or 8 of bytes */
static inline __attribute__((always_inline)) int64_t fast_int_bytes(int kind) {
    return (kind & FAST_KIND) == FAST_NIBBLES ? 256 : (kind & FAST_KIND) == FAST_SIXES ? 384 : 512;
}

/* Records are padded to whole cache lines: a 64-byte load that straddles two lines made the
 * Q8_0 LM head 2.7x slower with 544-byte records than with 576. (Not FAST_SUPER: see fast_group_bytes.) */
static inline __attribute__((always_inline)) int64_t fast_record_bytes(int kind) {
    const int64_t vectors = 1 + !!(kind & FAST_TWO_D) + !!(kind & FAST_MIN);
    const int64_t bytes = fast_int_bytes(kind) + vectors * 16 * ((kind & FAST_HALF) ? 2 : 4);
    return (bytes + 63) / 64 * 64;
}

/* FAST_SUPER: a group of a super-block's 8 records, the factors first, then each pair of blocks' scales
 * before their integers */
enum { FAST_GROUP_BLOCKS = 8, FAST_GROUP_FACTORS = 64, FAST_PAIR_SCALES = 64 };
static inline __attribute__((always_inline)) int64_t fast_pair_bytes(int kind) {
    return FAST_PAIR_SCALES + 2 * fast_int_bytes(kind);
}
static inline __attribute__((always_inline)) int64_t fast_group_bytes(int kind) {
    return FAST_GROUP_FACTORS + FAST_GROUP_BLOCKS / 2 * fast_pair_bytes(kind);
}

/* Bytes of a panel's records (16 rows by K terms, blocks = K / 32; FAST_SUPER: blocks a multiple of 8) */
static inline __attribute__((always_inline)) int64_t fast_panel_bytes(int kind, int64_t blocks) {
    return (kind & FAST_SUPER) ? blocks / FAST_GROUP_BLOCKS * fast_group_bytes(kind) : blocks * fast_record_bytes(kind);
}

int64_t realizar_fast_panel_bytes(int kind, int64_t blocks) { return fast_panel_bytes(kind, blocks); }

/* FAST_SUPER: the pair of records of block b (b >= 0), its scales first */
static inline __attribute__((always_inline)) const uint8_t *fast_pair_at(int kind, const uint8_t *panel, int64_t b) {
    const uint64_t u = (uint64_t)b;
    return panel + u / FAST_GROUP_BLOCKS * fast_group_bytes(kind) + FAST_GROUP_FACTORS
           + u % FAST_GROUP_BLOCKS / 2 * fast_pair_bytes(kind);
}

/* Where block b's integers and its scales begin, in a panel's records */
static inline __attribute__((always_inline)) const uint8_t *fast_ints_at(int kind, const uint8_t *panel, int64_t b) {
    if (kind & FAST_SUPER) return fast_pair_at(kind, panel, b) + FAST_PAIR_SCALES + (b & 1) * fast_int_bytes(kind);
    return panel + b * fast_record_bytes(kind);
}
static inline __attribute__((always_inline)) const uint8_t *fast_scales_at(int kind, const uint8_t *panel, int64_t b) {
    if (kind & FAST_SUPER) return fast_pair_at(kind, panel, b) + (b & 1) * 32;
    return panel + b * fast_record_bytes(kind) + fast_int_bytes(kind);
}
/* FAST_SUPER: the float16 factors of block b's super-block, d then (FAST_MIN) -dmin, 16 rows each */
static inline __attribute__((always_inline)) const uint8_t *fast_factors_at(int kind, const uint8_t *panel, int64_t b) {
    return panel + (uint64_t)b / FAST_GROUP_BLOCKS * fast_group_bytes(kind);
}

/* 16 unsigned (signed) bytes at p as floats. GCC's __builtin_convertvector from a 16-byte vector
 * converts lane by lane: a Q4_K product at one row took 1.7x as long with it. */
static inline f32x16 ubytes16(const uint8_t *p) {
#if defined(__AVX512F__)
    return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p)));
#else
    i32x16 v;
    for (int i = 0; i < 16; i++) v[i] = p[i];
    return __builtin_convertvector(v, f32x16);
#endif
}
static inline f32x16 sbytes16(const uint8_t *p) {
#if defined(__AVX512F__)
    return (f32x16)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
#else
    i32x16 v;
    for (int i = 0; i < 16; i++) v[i] = (int8_t)p[i];
    return __builtin_convertvector(v, f32x16);
#endif
}

/* Block b's scales in a panel's records, laid out as the flags in `kind` say */
static inline __attribute__((always_inline)) void fast_scales(const int kind, const uint8_t *panel, const int64_t b,
                                                              f32x16 *d0, f32x16 *d1, f32x16 *min) {
    const uint8_t *p = fast_scales_at(kind, panel, b);
    if (kind & FAST_SUPER) {
        const uint8_t *f = fast_factors_at(kind, panel, b);
        if (kind & FAST_TWO_D) {
            const f32x16 d = halves16(f);
            *d0 = d * sbytes16(p);
            *d1 = d * sbytes16(p + 16);
            *min = (f32x16){0};
        } else {
            *d0 = *d1 = halves16(f) * ubytes16(p);
            *min = halves16(f + 32) * ubytes16(p + 16);
        }
        return;
    }
    const int64_t step = (kind & FAST_HALF) ? 32 : 64;
#define FAST_SCALE(q) ((kind & FAST_HALF) ? halves16(q) : floats16((const float *)(q)))
    *d0 = FAST_SCALE(p);
    if (kind & FAST_TWO_D) p += step;
    *d1 = FAST_SCALE(p);
    *min = (kind & FAST_MIN) ? FAST_SCALE(p + step) : (f32x16){0};
#undef FAST_SCALE
}

void realizar_fast_block_d(int kind, const uint8_t *panel, int64_t blocks, const uint8_t **ints, float *d) {
    for (int64_t b = 0; b < blocks; b++) {
        f32x16 d0, d1, min;
        fast_scales(kind, panel, b, &d0, &d1, &min);
        memcpy(d + 16 * b, &d0, sizeof d0);
        ints[b] = fast_ints_at(kind, panel, b);
    }
}

/* acc[j] + sum over i < 4 of w[4j + i] * x[i], w unsigned (< 128 on AVX2, whose maddubs would
 * saturate beyond), x the 4 signed bytes of x4. */
/* dot4 with x4 read from memory: with VNNI, the broadcast folds into the dot product's operand
 * (GCC keeps a separate broadcast for each _mm512_set1_epi32) */
static inline i32x16 dot4(i32x16 acc, u8x64 w, int32_t x4);
static inline __attribute__((always_inline)) i32x16 dot4_at(i32x16 acc, u8x64 w, const int32_t *x4) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    __asm__("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(w), "m"(*x4));
    return acc;
#else
    return dot4(acc, w, *x4);
#endif
}

static inline i32x16 dot4(i32x16 acc, u8x64 w, int32_t x4) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    __m512i r = _mm512_dpbusd_epi32((__m512i)acc, (__m512i)w, _mm512_set1_epi32(x4));
    return (i32x16)r;
#elif defined(__AVX2__)
    __m256i halves[2], sums[2];
    memcpy(halves, &w, sizeof halves);
    const __m256i xs = _mm256_set1_epi32(x4), ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++)
        sums[h] = _mm256_madd_epi16(_mm256_maddubs_epi16(halves[h], xs), ones);
    i32x16 r;
    memcpy(&r, sums, sizeof r);
    return acc + r;
#else
    int8_t x[4];
    memcpy(x, &x4, 4);
    for (int j = 0; j < 16; j++)
        for (int i = 0; i < 4; i++) acc[j] += (int32_t)w[4 * j + i] * x[i];
    return acc;
#endif
}

/* Whether dot4 takes unsigned bytes up to 255 (AVX2's maddubs pairs would saturate): realizar's
 * packing then stores Q8_0's signed bytes plus 128, with an offset of 128, for dot4 rather than
 * dot4_signed and its four extra operations per product. */
int realizar_fast_wide_bytes(void) {
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    return 1;
#elif defined(__AVX2__)
    return 0;
#else
    return 1;
#endif
}

/* The same for signed weights (Q8_0): |w| times x with w's sign, so the unsigned operand stays
 * below 129 (maddubs pairs cannot saturate). */
static inline i32x16 dot4_signed(i32x16 acc, u8x64 w, int32_t x4) {
    const i8x64 s = (i8x64)w;
    const i8x64 x = (i8x64)(ints16(x4));
    const i8x64 neg = s < 0;  /* -1 where w is negative */
    const i8x64 magnitude = (s ^ neg) - neg;  /* |w|; -128 stays 0x80, read unsigned as 128 */
    const i8x64 signed_x = (x ^ neg) - neg;
    /* each lane's 4 bytes of signed_x differ from x4 only in signs, so dot each lane on its own */
#if defined(__AVX512VNNI__) && defined(__AVX512F__)
    __m512i r = _mm512_dpbusd_epi32((__m512i)acc, (__m512i)magnitude, (__m512i)signed_x);
    return (i32x16)r;
#elif defined(__AVX2__)
    __m256i m[2], sx[2], sums[2];
    memcpy(m, &magnitude, sizeof m);
    memcpy(sx, &signed_x, sizeof sx);
    const __m256i ones = _mm256_set1_epi16(1);
    for (int h = 0; h < 2; h++) sums[h] = _mm256_madd_epi16(_mm256_maddubs_epi16(m[h], sx[h]), ones);
    i32x16 r;
    memcpy(&r, sums, sizeof r);
    return acc + r;
#else
    for (int j = 0; j < 16; j++)  /* as the dot products above: |w| (unsigned) times x with w's sign */
        for (int i = 0; i < 4; i++) acc[j] += (int32_t)(uint8_t)magnitude[4 * j + i] * signed_x[4 * j + i];
    return acc;
#endif
}

#if defined(YMM)
static inline v8 ubytes8(const uint8_t *p) {
    return (v8)_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}
static inline v8 sbytes8(const uint8_t *p) {
    return (v8)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline __attribute__((always_inline)) void fast_scales8(const int kind, const uint8_t *panel, const int64_t b,
                                                               const int h, v8 *d0, v8 *d1, v8 *min) {
    const uint8_t *p = fast_scales_at(kind, panel, b);
    if (kind & FAST_SUPER) {  /* as fast_scales, rows 8h .. 8h + 7 */
        const uint8_t *f = fast_factors_at(kind, panel, b) + 16 * h;
        if (kind & FAST_TWO_D) {
            const v8 d = halves8(f);
            *d0 = d * sbytes8(p + 8 * h);
            *d1 = d * sbytes8(p + 16 + 8 * h);
            *min = (v8){0};
        } else {
            *d0 = *d1 = halves8(f) * ubytes8(p + 8 * h);
            *min = halves8(f + 32) * ubytes8(p + 16 + 8 * h);
        }
        return;
    }
    const int64_t step = (kind & FAST_HALF) ? 32 : 64;
    p += h * step / 2;
#define FAST_SCALE8(q) ((kind & FAST_HALF) ? halves8(q) : load8((const float *)(q)))
    *d0 = FAST_SCALE8(p);
    if (kind & FAST_TWO_D) p += step;
    *d1 = FAST_SCALE8(p);
    *min = (kind & FAST_MIN) ? FAST_SCALE8(p + step) : (v8){0};
#undef FAST_SCALE8
}

/* dequantize_fast in halves of 8 rows: 8-lane vectors, as AVX2's 16 registers want (the 16-lane
 * form spills there: a 16-row step of the demo model took 92 ms against the exact class's 31) */
static inline __attribute__((always_inline)) void dequantize_fast8(const int KIND, int c, const uint8_t *panel,
                                                                   const int64_t b, float *out) {
    const int nibbles = (KIND & FAST_KIND) == FAST_NIBBLES;
    for (int h = 0; h < 2; h++) {
        v8 d0, d1, min;
        fast_scales8(KIND, panel, b, h, &d0, &d1, &min);
#pragma GCC unroll 8
        for (int t = 0; t < (nibbles ? 4 : 8); t++) {
            vi8 v;
            if ((KIND & FAST_KIND) == FAST_SIXES) {
                const u8x64 bytes = sixes_vector(fast_ints_at(KIND, panel, b), t);
                memcpy(&v, (const uint8_t *)&bytes + 32 * h, sizeof v);
            } else {
                memcpy(&v, fast_ints_at(KIND, panel, b) + 64 * t + 32 * h, sizeof v);
            }
            for (int i = 0; i < 4; i++) {
                for (int s = 0; s < (nibbles ? 2 : 1); s++) {
                    const int k = nibbles ? 16 * s + 4 * t + i : 4 * t + i;
                    vi8 u;
                    if (nibbles) u = (v >> (8 * i + 4 * s)) & 15;
                    else if ((KIND & FAST_KIND) == FAST_SIGNED_BYTES) u = (v << (24 - 8 * i)) >> 24;
                    else u = (v >> (8 * i)) & 255;
                    v8 w = __builtin_convertvector(u - c, v8) * (k < 16 ? d0 : d1);
                    if (KIND & FAST_MIN) w = rounded8(w) + min;
                    store8(out + 16 * k + 8 * h, w);
                }
            }
        }
    }
}
#endif

/* The 32 x 16 weights of block b of a panel's fast records, k-major (out[k * 16 + j] = W[row j][term k]), as the
 * exact class dequantizes them: (u - c) * d, rounded, then + min. The integers of term 4t + i sit
 * in byte i of every 32-bit lane of vector t (nibbles: terms 4t + i and 16 + 4t + i), so a lane
 * shift gives a term for all 16 rows. */
static inline __attribute__((always_inline)) void dequantize_fast(const int KIND, int c, const uint8_t *panel,
                                                                  const int64_t b, float *out) {
#if defined(YMM)
    dequantize_fast8(KIND, c, panel, b, out);
#else
    const int nibbles = (KIND & FAST_KIND) == FAST_NIBBLES;
    f32x16 d0, d1, min;
    fast_scales(KIND, panel, b, &d0, &d1, &min);
#pragma GCC unroll 8
    for (int t = 0; t < (nibbles ? 4 : 8); t++) {
        i32x16 v;
        if ((KIND & FAST_KIND) == FAST_SIXES)
            v = (i32x16)sixes_vector(fast_ints_at(KIND, panel, b), t);
        else
            memcpy(&v, fast_ints_at(KIND, panel, b) + 64 * t, sizeof v);
        for (int i = 0; i < 4; i++) {
            for (int h = 0; h < (nibbles ? 2 : 1); h++) {
                const int k = nibbles ? 16 * h + 4 * t + i : 4 * t + i;
                i32x16 u;
                if (nibbles) u = (v >> (8 * i + 4 * h)) & 15;
                else if ((KIND & FAST_KIND) == FAST_SIGNED_BYTES) u = (v << (24 - 8 * i)) >> 24;
                else u = (v >> (8 * i)) & 255;
                f32x16 w = __builtin_convertvector(u - c, f32x16) * (k < 16 ? d0 : d1);
                if (KIND & FAST_MIN) w = rounded(w) + min;
                memcpy(out + 16 * k, &w, sizeof w);
            }
        }
    }
#endif
}

/* The kinds of fast records that realizar's packing makes with one d (and min) per block, each as CASE(kind);
 * the kinds with a d per 16 terms are FAST_TWO_D_KINDS. A switch over them compiles each kind's loops apart. */
#define FAST_ONE_D_KINDS(CASE)                    \
    CASE(FAST_NIBBLES | FAST_HALF);               \
    CASE(FAST_NIBBLES | FAST_HALF | FAST_MIN);    \
    CASE(FAST_BYTES | FAST_HALF);                 \
    CASE(FAST_BYTES | FAST_HALF | FAST_MIN);      \
    CASE(FAST_SIGNED_BYTES | FAST_HALF);          \
    CASE(FAST_SIGNED_BYTES);                      \
    CASE(FAST_NIBBLES | FAST_MIN | FAST_SUPER);   \
    CASE(FAST_BYTES | FAST_MIN | FAST_SUPER)
#define FAST_TWO_D_KINDS(CASE)                    \
    CASE(FAST_BYTES | FAST_TWO_D | FAST_SUPER);   \
    CASE(FAST_SIXES | FAST_TWO_D | FAST_SUPER)

#define FAST_DEQUANTIZE_CASE(K_) \
    case K_: dequantize_fast(K_, c, panel, b, out); break

/* The weights of `count` blocks of a panel's fast records, from block `first` on */
void realizar_dequantize_fast_records(int kind, int c, const uint8_t *panel, int64_t first, int64_t count, float *out) {
    for (int64_t b = first; b < first + count; b++, out += QK * NR) {
        switch (kind) {
            FAST_ONE_D_KINDS(FAST_DEQUANTIZE_CASE);
            FAST_TWO_D_KINDS(FAST_DEQUANTIZE_CASE);
            default: dequantize_fast(kind, c, panel, b, out); break;
        }
    }
}

#if defined(__AVX512BF16__) && defined(__AVX512VBMI__)
/* Whether realizar_fast_integer_tiles takes records of this kind, one d (and min) per 32-term block of integers of
 * at most 8 bits (not Q6_K's d per 16 terms): 0 no, 1 yes, 2 yes and the kind has a min. */
int realizar_fast_tile_integers(int kind) {
    if ((kind & FAST_TWO_D) || (kind & FAST_KIND) == FAST_SIXES) return 0;
    return (kind & FAST_MIN) ? 2 : 1;
}

/* Two terms of each output of a record's 64-byte vector v as 32 words, zero-extended: the bytes that idx picks */
static inline __attribute__((always_inline)) __m512i pair_words(__m512i v, __m512i idx) {
    return _mm512_maskz_permutexvar_epi8(0x5555555555555555ull, idx, v);
}

/* 32 words of small integers (|u| < 256, exact in bfloat16) as bfloat16 */
static inline __attribute__((always_inline)) __m512i bf16_words(__m512i w) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_castsi512_si256(w)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(_mm512_extracti64x4_epi64(w, 1)));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo);
}

static inline __attribute__((always_inline)) void integer_tile(const int KIND, int c, const uint8_t *panel, int64_t b,
                                                               __m512i even, __m512i odd, __m512i table,
                                                               uint8_t *tile, float *scales) {
    const uint8_t *const q = fast_ints_at(KIND, panel, b);
    if ((KIND & FAST_KIND) == FAST_NIBBLES) {  /* vector t: terms 4t + i (low nibbles), 16 + 4t + i (high) */
        const __m512i low = _mm512_set1_epi8(15);
        for (int t = 0; t < 4; t++) {
            const __m512i v = _mm512_loadu_si512(q + 64 * t);
            const __m512i nib[2] = {_mm512_and_si512(v, low), _mm512_and_si512(_mm512_srli_epi16(v, 4), low)};
            for (int h = 0; h < 2; h++) {
                _mm512_store_si512(tile + 64 * (8 * h + 2 * t), _mm512_permutexvar_epi16(pair_words(nib[h], even), table));
                _mm512_store_si512(tile + 64 * (8 * h + 2 * t + 1), _mm512_permutexvar_epi16(pair_words(nib[h], odd), table));
            }
        }
    } else {  /* vector t: terms 4t + i */
        const __m512i offset = _mm512_set1_epi16((short)c), sign = _mm512_set1_epi16(0x80);
        for (int t = 0; t < 8; t++) {
            const __m512i v = _mm512_loadu_si512(q + 64 * t);
            for (int r = 0; r < 2; r++) {
                __m512i w = pair_words(v, r ? odd : even);
                if ((KIND & FAST_KIND) == FAST_SIGNED_BYTES) w = _mm512_sub_epi16(_mm512_xor_si512(w, sign), sign);
                _mm512_store_si512(tile + 64 * (2 * t + r), bf16_words(_mm512_sub_epi16(w, offset)));
            }
        }
    }
    f32x16 d0, d1, min;
    fast_scales(KIND, panel, b, &d0, &d1, &min);
    memcpy(scales, &d0, sizeof d0);
    memcpy(scales + 16, &min, sizeof min);
}

#define INTEGER_TILE_CASE(K_) \
    case K_: integer_tile(K_, c, panel, b, even, odd, table, tiles + 1024 * b, scales + 32 * b); break

/* A panel's `blocks` blocks of fast records as bfloat16 tiles of their integers less the offset c, u - c, for
 * tdpbf16ps (quant_tiles.c): tile b (1,024 bytes at tiles + 1024 b) holds in row r, 32-bit lane j, terms 2r and
 * 2r + 1 of output j, the even one in the low half; and each block's scales, scales[32 b:32 b + 16] its d and
 * scales[32 b + 16:32 b + 32] its min (0 without one): W[j][32 b + k] = d[j] (u - c) + min[j], as the exact class
 * has it up to the order of roundings. Kinds that realizar_fast_tile_integers takes. */
void realizar_fast_integer_tiles(int kind, int c, const uint8_t *panel, int64_t blocks, uint8_t *tiles, float *scales) {
    uint8_t pick[2][64] = {{0}};  /* word 2j + e (e < 2) of a row: term 2r + e of output j, byte 4j + e (+ 2: odd rows) */
    int16_t values[32];           /* nibble u as bfloat16 (u - c): its bits are float32's top half, exactly */
    for (int w = 0; w < 32; w++) {
        pick[0][2 * w] = (uint8_t)(4 * (w / 2) + w % 2);
        pick[1][2 * w] = (uint8_t)(4 * (w / 2) + w % 2 + 2);
        const float f = (float)(w - c);
        uint32_t bits;
        memcpy(&bits, &f, sizeof bits);
        values[w] = (int16_t)(bits >> 16);
    }
    const __m512i even = _mm512_loadu_si512(pick[0]), odd = _mm512_loadu_si512(pick[1]);
    const __m512i table = _mm512_loadu_si512(values);
    for (int64_t b = 0; b < blocks; b++) {
        switch (kind) {
            FAST_ONE_D_KINDS(INTEGER_TILE_CASE);
            default: integer_tile(kind, c, panel, b, even, odd, table, tiles + 1024 * b, scales + 32 * b); break;
        }
    }
}
#else
int realizar_fast_tile_integers(int kind) {
    (void)kind;
    return 0;
}

void realizar_fast_integer_tiles(int kind, int c, const uint8_t *panel, int64_t blocks, uint8_t *tiles, float *scales) {
    (void)kind, (void)c, (void)panel, (void)blocks, (void)tiles, (void)scales;
}
#endif

/* A record's byte order: byte 4t + i of row j's `vectors` x 4 bytes of a block goes to byte 4j + i of the record's
 * 64-byte vector t (XORed with flip). */
static void place_bytes(uint8_t *v, int64_t j, const uint8_t *bytes, int vectors, uint8_t flip) {
    for (int t = 0; t < vectors; t++)
        for (int i = 0; i < 4; i++) v[64 * t + 4 * j + i] = bytes[4 * t + i] ^ flip;
}

/* Row j's 32 integers u of a block into its record's integers v (kind `ints`). */
static void put_record_ints(int ints, uint8_t *v, int64_t j, const uint8_t *u) {
    if (ints != FAST_NIBBLES && ints != FAST_SIXES) {
        place_bytes(v, j, u, 8, 0);
        return;
    }
    uint8_t packed[16], top[8];
    for (int b = 0; b < 16; b++) packed[b] = (uint8_t)((u[b] & 15) | (u[16 + b] & 15) << 4);  /* 16 + b high */
    place_bytes(v, j, packed, 4, 0);
    if (ints == FAST_SIXES) {  /* bits 4-5 of bytes vector 4 h + s in bits 2s, 2s + 1 of vector 4 + h */
        for (int h = 0; h < 2; h++)
            for (int i = 0; i < 4; i++) {
                top[4 * h + i] = 0;
                for (int s = 0; s < 4; s++) top[4 * h + i] |= (uint8_t)(((u[4 * (4 * h + s) + i] >> 4) & 3) << (2 * s));
            }
        place_bytes(v + 256, j, top, 2, 0);
    }
}

struct pack_job {
    const uint8_t *q;
    const void *scales;
    const uint16_t *factors;
    uint8_t *out;
    int64_t n, k;
    int kind;
};

static void pack_panel(const void *arg, int64_t p) {
    const struct pack_job *job = (const struct pack_job *)arg;
    const uint8_t *const q = job->q;
    const void *const scales = job->scales;
    const uint16_t *const factors = job->factors;
    const int64_t n = job->n, k = job->k;
    const int kind = job->kind;
    const int64_t blocks = k / QK, pbytes = fast_panel_bytes(kind, blocks);
    const int ints = kind & FAST_KIND;
    const int vectors = 1 + !!(kind & FAST_TWO_D) + !!(kind & FAST_MIN), lane = (kind & FAST_HALF) ? 2 : 4;
    uint8_t *const panel = job->out + p * pbytes;
    memset(panel, 0, (size_t)pbytes);
    for (int64_t b = 0; b < blocks; b++) {
        uint8_t *const v = (uint8_t *)fast_ints_at(kind, panel, b);
        uint8_t *const sc = (uint8_t *)fast_scales_at(kind, panel, b);
        for (int64_t j = 0; j < NR && p * NR + j < n; j++) {
            const int64_t row = p * NR + j;
            put_record_ints(ints, v, j, q + row * k + b * QK);
            if (kind & FAST_SUPER) {
                const uint8_t *const s2 = (const uint8_t *)scales + (row * blocks + b) * 2;
                sc[j] = s2[0];
                sc[16 + j] = s2[1];
                if (b % FAST_GROUP_BLOCKS == 0) {
                    uint16_t *const f = (uint16_t *)(void *)fast_factors_at(kind, panel, b);
                    f[j] = factors[(row * (blocks / FAST_GROUP_BLOCKS) + b / FAST_GROUP_BLOCKS) * 2];
                    f[16 + j] = factors[(row * (blocks / FAST_GROUP_BLOCKS) + b / FAST_GROUP_BLOCKS) * 2 + 1];
                }
            } else {
                const uint8_t *const f = (const uint8_t *)scales + (row * blocks + b) * vectors * lane;
                for (int x = 0; x < vectors; x++) memcpy(sc + (16 * x + j) * lane, f + x * lane, (size_t)lane);
            }
        }
    }
}

/* Lays a weight out as fast records of kind `kind`: q [n, k] its stored integers (bytes), rows past n in the
 * last panel zeros. `scales` holds each block's factors as the kind's records store them:
 *   FAST_SUPER: [n, k / 32, 2] bytes (scale and min, or the scales of the block's two halves), and
 *   `factors` [n, k / 256, 2] float16 bits (d, then -dmin or 0);
 *   otherwise: [n, k / 32, V] float32, or float16 bits with FAST_HALF, V = 1 + TWO_D + MIN (d0, d1, min),
 *   and `factors` NULL.
 * `out` holds realizar_fast_panel_bytes(kind, k / 32) for each panel of 16 rows. */
void realizar_pack_fast(const uint8_t *q, const void *scales, const uint16_t *factors, int64_t n, int64_t k,
                        int kind, uint8_t *out) {
    const struct pack_job job = {.q = q, .scales = scales, .factors = factors, .out = out, .n = n, .k = k, .kind = kind};
    realizar_parallel(pack_panel, &job, (n + NR - 1) / NR);  /* panels on every thread */
}

/* realizar_pack_fast's records straight from a GGUF file's Q4_0, Q4_1 or Q8_0 blocks (format 0, 1, 2), for the
 * kinds the Python side gives those (kernels.pack_fast_blocks): a block's bytes are already a record's. A 4-bit
 * block's byte 4t + i holds term 4t + i in its low nibble and 16 + 4t + i in its high one, as the record's byte
 * does; a Q8_0 block's byte 4t + i is term 4t + i (plus 128, as an unsigned byte, where kind is FAST_BYTES); the
 * float16 d (and Q4_1's min) are the record's scales as they are. So a load copies bytes instead of unpacking
 * every integer and packing it again (the demo model's weights in about 0.06 s, where that took about 0.4 under a
 * profiler). Q4_K, Q6_K and Q5_K blocks are unpacked in C instead (formats 3, 4 and 7: pack_k_rows), and Q5_0 and
 * Q5_1 blocks (formats 5 and 6: a term's fifth bit is bit t of the block's 32-bit qh, above its nibble) into
 * records of bytes. Panels on every thread. */
struct block_pack_job {
    const uint8_t *blocks;
    uint8_t *out;
    int64_t n, k;
    int format, kind;
};

/* A Q4_K super-block's 6-bit scale and min of its 32-term block `sub` (0-7), from its 12 bytes of them. */
static void k4_scale_min(const uint8_t *q, int sub, uint8_t *scale, uint8_t *min) {
    if (sub < 4) {
        *scale = q[sub] & 63;
        *min = q[sub + 4] & 63;
    } else {
        *scale = (uint8_t)((q[sub + 4] & 15) | (q[sub - 4] >> 6) << 4);
        *min = (uint8_t)((q[sub + 4] >> 4) | (q[sub] >> 6) << 4);
    }
}

/* A panel's rows from Q4_K (format 3), Q6_K (format 4) or Q5_K (format 7) super-blocks of 256 terms, each block of
 * 32 terms unpacked into its integers in the file's order (as quants.py's unpackers give them) and put into its
 * record, with its two small integers (Q4_K, Q5_K: its 6-bit scale and min; Q6_K: the int8 scales of its halves),
 * and the super-block's float16 factors once for its 8 records (Q4_K, Q5_K: d and -dmin; Q6_K: d and 0).
 *   Q4_K, 144 bytes: d, dmin, 12 bytes of scales and mins, then 4 x 32 bytes whose low nibbles are one block and
 *   high nibbles the next.
 *   Q5_K, 176 bytes: Q4_K's first 16, then 32 bytes of fifth bits (bit s of byte t: term t of block s), then Q4_K's
 *   4 x 32 bytes of nibbles.
 *   Q6_K, 210 bytes: 128 bytes of low nibbles (for each 128 terms, 64 bytes: low nibbles then high nibbles), 64 of
 *   2-bit high parts (for each 128 terms, 32 bytes: bits 0-1, 2-3, 4-5, 6-7 in turn), 16 int8 scales, d. */
static void pack_k_rows(const struct block_pack_job *job, int64_t p, uint8_t *panel) {
    const int q6 = job->format == 4, q5 = job->format == 7, bytes = q6 ? 210 : q5 ? 176 : 144;
    const int64_t blocks = job->k / QK;
    for (int64_t j = 0; j < NR && p * NR + j < job->n; j++) {
        const uint8_t *const row = job->blocks + (p * NR + j) * (blocks / FAST_GROUP_BLOCKS) * bytes;
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *const super = row + (b / FAST_GROUP_BLOCKS) * bytes;
            const int sub = (int)(b % FAST_GROUP_BLOCKS);
            uint8_t u[QK];
            uint8_t *const sc = (uint8_t *)fast_scales_at(job->kind, panel, b);
            uint16_t d, second = 0;
            if (q6) {
                /* the block's terms r0 .. r0 + 31 of its 128: low nibbles or high ones of 32 bytes, and one pair of
                 * bits of each of the 32 bytes of high parts */
                const int half = sub / 4, r0 = 32 * (sub % 4);
                const uint8_t *const low = super + 64 * half + r0 % 64, *const top = super + 128 + 32 * half;
                const int low_shift = 4 * (r0 / 64), top_shift = 2 * (r0 / 32);
                for (int t = 0; t < QK; t++) u[t] = (uint8_t)((low[t] >> low_shift & 15) | (top[t] >> top_shift & 3) << 4);
                sc[j] = super[192 + 2 * sub];
                sc[16 + j] = super[192 + 2 * sub + 1];
                memcpy(&d, super + 208, 2);
            } else {
                const uint8_t *const qs = super + (q5 ? 48 : 16) + 32 * (sub / 2);
                for (int t = 0; t < QK; t++) u[t] = qs[t] >> (4 * (sub & 1)) & 15;
                if (q5)
                    for (int t = 0; t < QK; t++) u[t] |= (uint8_t)((super[16 + t] >> sub & 1) << 4);
                k4_scale_min(super + 4, sub, &sc[j], &sc[16 + j]);
                memcpy(&d, super, 2);
                memcpy(&second, super + 2, 2);
                second ^= 0x8000;  /* -dmin: the records' factor of the mins */
            }
            put_record_ints(job->kind & FAST_KIND, (uint8_t *)fast_ints_at(job->kind, panel, b), j, u);
            if (sub == 0) {
                uint16_t *const f = (uint16_t *)(void *)fast_factors_at(job->kind, panel, b);
                f[j] = d;
                f[16 + j] = second;
            }
        }
    }
}

/* Bits 0-7 of `bits` as the 8 bytes of a word, each 0 or 1 (bit i in byte i; x86 is little-endian) */
static inline uint64_t byte_bits(uint32_t bits) {
    const uint64_t x = (bits & 0xffu) * 0x0101010101010101ull & 0x8040201008040201ull;  /* byte i: bit i in place */
    return (x + 0x7f7f7f7f7f7f7f7full) >> 7 & 0x0101010101010101ull;
}

static void pack_block_panel(const void *arg, int64_t p) {
    const struct block_pack_job *job = (const struct block_pack_job *)arg;
    /* formats 0-2 and 5-6 (Q5_0, Q5_1), by format: a block's bytes, where its integers start, its float16 scales */
    static const int block_bytes[7] = {18, 20, 34, 0, 0, 22, 24}, ints_at[7] = {2, 4, 2, 0, 0, 6, 8};
    static const int scale_count[7] = {1, 2, 1, 0, 0, 1, 2};
    const int f = job->format, ints = job->kind & FAST_KIND;
    const int64_t blocks = job->k / QK, pbytes = fast_panel_bytes(job->kind, blocks);
    const uint8_t flip = ints == FAST_BYTES ? 0x80 : 0;
    uint8_t *const panel = job->out + p * pbytes;
    memset(panel, 0, (size_t)pbytes);
    if (f == 3 || f == 4 || f == 7) {
        pack_k_rows(job, p, panel);
        return;
    }
    for (int64_t j = 0; j < NR && p * NR + j < job->n; j++) {
        const uint8_t *const row = job->blocks + (p * NR + j) * blocks * block_bytes[f];
        for (int64_t b = 0; b < blocks; b++) {
            const uint8_t *const block = row + b * block_bytes[f], *const u = block + ints_at[f];
            uint8_t *const v = (uint8_t *)fast_ints_at(job->kind, panel, b);
            uint8_t *const sc = (uint8_t *)fast_scales_at(job->kind, panel, b);
            if (f >= 5) {  /* Q5_0, Q5_1: each term's nibble (low: t < 16) and bit t of qh, just before them */
                uint8_t five[QK];
                uint32_t qh;
                memcpy(&qh, u - 4, 4);
                for (int g = 0; g < 2; g++) {  /* 8 terms at a time, a byte each (a loop over the terms took 2.5x as long) */
                    uint64_t w, lo, hi;
                    memcpy(&w, u + 8 * g, 8);
                    lo = (w & 0x0f0f0f0f0f0f0f0full) | byte_bits(qh >> (8 * g)) << 4;
                    hi = (w >> 4 & 0x0f0f0f0f0f0f0f0full) | byte_bits(qh >> (16 + 8 * g)) << 4;
                    memcpy(five + 8 * g, &lo, 8);
                    memcpy(five + 16 + 8 * g, &hi, 8);
                }
                put_record_ints(ints, v, j, five);
            } else {
                place_bytes(v, j, u, f == 2 ? 8 : 4, flip);
            }
            for (int x = 0; x < scale_count[f]; x++) memcpy(sc + (16 * x + j) * 2, block + 2 * x, 2);
        }
    }
}

void realizar_pack_fast_blocks(const uint8_t *blocks, int format, int64_t n, int64_t k, int kind, uint8_t *out) {
    const struct block_pack_job job = {.blocks = blocks, .out = out, .n = n, .k = k, .format = format, .kind = kind};
    realizar_parallel(pack_block_panel, &job, (n + NR - 1) / NR);
}

/* The quantized activations in groups of XG rows, so that a tile reads its rows' terms at fixed
 * offsets from one pointer (8 rows' pointers had spilled the general registers): for each group and
 * block, the a terms of its XG rows (32 bytes each), then their b terms. The per-block factors (dx,
 * dxs, cs) likewise, XG rows of a block together. Tiles never cross a group. */
#define XG 8
static inline int64_t x_at(int64_t m, int64_t b, int64_t blocks) { return ((m / XG) * blocks + b) * (2 * XG * QK) + (m % XG) * QK; }
static inline int64_t f_at(int64_t m, int64_t b, int64_t blocks) { return ((m / XG) * blocks + b) * XG + m % XG; }

struct fjob {
    const int8_t *xq;         /* two int8 terms per row and 32-term block, laid out by x_at */
    const float *dx;          /* [M, K / 32], laid out by f_at, as dxs and cs */
    const int32_t *sx;        /* [M, K / 16]: sums of x_q over each half block */
    const float *dxs;         /* [M, K / 32]: d_x times the block's sum of x_q (the min's factor) */
    const int32_t *cs;        /* [M, K / 32]: c times the block's sum of x_q */
    const int32_t *cs1;       /* [M, K / 32]: c times the block's sum of the a terms (terms = 1) */
    const uint8_t *w;
    float *y;
    int64_t M, N, K, ldy;
    int kind, c;
    int terms;                /* 2, or 1 where the 8-row tiles take the a terms alone (ranked products) */
    float *panel_max;         /* terms = 1: [M, ceil(N / 16)], each row's largest output of each panel */
    int64_t chunk;            /* panels per unit */
};

/* Rows per tile: 8 sums and 8 float accumulators beside the block's 8 weight vectors (one thread, 64
 * rows of the demo model's gate_up: 4-row tiles with two sums per row took 8 % longer); the kinds with a
 * d for each 16 terms keep two sums per term and row, so 4 rows there. AVX2 (fast_tile16) takes 8 rows
 * too, for the kinds with one d per 32 terms. */
#define FAST_ROWS 8
/* How far ahead a one-row product of 6-bit records asks for them: unpacking them, it keeps fewer
 * reads in flight than the hardware's prefetcher needs (the 1B model's one-sequence step, median of 8:
 * 24.96 ms without, 23.15-23.91 with 512 bytes, 25.07-25.55 for the same records in 8-bit bytes).
 * The other kinds streamed best without it (512 bytes ahead: a Q4_K step took 1.5 ms longer, Zen 4 EPYC); every
 * kind now asks 4 KB ahead (records_ahead). */
#define SIXES_PREFETCH 512
/* How far ahead of its records a tile asks for the ones it or the next tile will read (records_ahead). */
#define STREAM_AHEAD 4096
#define FAST_NARROW_ROWS 4  /* the switch in run_fast_unit takes 1 .. 4 */
/* One panel (16 outputs) per tile: one stream of records, which the hardware prefetches best. Two panels at a
 * time (two streams 5.8 KB apart) read 30 layers' Q4_1 gate_up records at one row from memory at
 * 8.5 GB/s where one reads them at 17.8 (AVX-512; the Q8_0 LM head at one row: 3.0 -> 1.75 ms), at
 * the cost of 4 us (10 %) when the records are in cache. */
/* More rows go through the exact, buffered path (see realizar_quant_gemm_fast). With VNNI every row
 * takes the integer products: after one-panel tiles they beat dequantizing even at a 512-token
 * prompt (demo model, one thread: a 16-sequence decode step 43.6 against 55.3 ms, a 512-token prefill
 * 1041 against 1222 ms). So do AVX2's int16 products (fast_tile16), now that quantize_rows keeps its
 * vectors in registers there (rint16): the demo model's decode step, two threads, medians of 3 runs
 * each, 48 rows 77-89 against 87-90 ms, 64 rows 101-104 against 112-117; its layers' products at 256
 * rows 5 % faster (gate_up 11 %, down the same) and gate_up's at 512 rows 11 %. Builds with neither keep
 * their byte multiply-adds for decode steps of a few sequences. */
#if (defined(__AVX512VNNI__) && defined(__AVX512F__)) || defined(YMM)
#define FAST_MAX_ROWS (1 << 30)  /* every row; kernels.FAST_EVERY_ROW says the same */
#else
#define FAST_MAX_ROWS 8
#endif

/* Where the tile of rows m .. m + R - 1 of panel p asks for records ahead of its own, or NULL. A panel's
 * records are one stream, and the panels follow one another, but the hardware's prefetchers did not keep
 * ahead of it: one-tile products (up to 8 rows) waited on memory at the start of each block, and in a
 * panel of several tiles the first did (Zen 5 EPYC: the demo model's 8-sequence decode steps 7.7-10.3 ms
 * against 4.5-6.4 with the requests, the 1B Q4_K_M model's 57 against 32; BENCHMARKS.md). So the tile
 * that reads the panel last asks, block by block, for the records STREAM_AHEAD bytes on, or, where it
 * follows other tiles of the same panel (it reads the panel from the cache), for the next panel's. */
static inline __attribute__((always_inline)) const uint8_t *records_ahead(const struct fjob *j, const uint8_t *base,
                                                                          int64_t panel_bytes, int64_t m, int R,
                                                                          int64_t p) {
    if (m + R < j->M || (p + 1) * NR >= j->N) return NULL;  /* another tile reads this panel after, or none follows */
    return base + (m > 0 ? panel_bytes : STREAM_AHEAD);
}

/* Asks for the part of the records at `ahead` that matches block b's part of its own panel (into L2). */
static inline __attribute__((always_inline)) void ask_ahead(const uint8_t *ahead, int64_t b, int64_t blocks,
                                                            int64_t panel_bytes) {
    if (ahead)
        for (int64_t at = b * panel_bytes / blocks & ~(int64_t)63; at < (b + 1) * panel_bytes / blocks; at += 64)
            __builtin_prefetch(ahead + at, 0, 2);
}

static inline __attribute__((always_inline)) void fast_tile(const int KIND, const int R, const int TERMS,
                                                            const struct fjob *j, int64_t m, int64_t p,
                                                            int64_t cols) {
    const int64_t K = j->K, blocks = K / QK;
    f32x16 acc[FAST_ROWS];
    for (int r = 0; r < R; r++) acc[r] = (f32x16){0};
    const int64_t panel_bytes = fast_panel_bytes(KIND, blocks);
    const uint8_t *const base = j->w + p * panel_bytes;
    const uint8_t *const ahead = records_ahead(j, base, panel_bytes, m, R, p);
    for (int64_t b = 0; b < blocks; b++) {
        ask_ahead(ahead, b, blocks, panel_bytes);  /* and 6-bit integers at one row SIXES_PREFETCH ahead */
        f32x16 d0, d1, min;
        fast_scales(KIND, base, b, &d0, &d1, &min);
        const uint8_t *const q = fast_ints_at(KIND, base, b);
        if (R == 1 && (KIND & FAST_KIND) == FAST_SIXES)
            for (int l = 0; l < fast_int_bytes(KIND) / 64 + 1; l++) __builtin_prefetch(q + SIXES_PREFETCH + 64 * l);
        /* the block's weights, unpacked once for all rows: w[t] terms 4t .. 4t + 3, w[4 + t] terms
         * 16 + 4t .. (nibbles: the low and high nibbles of the same bytes) */
        u8x64 w[8];
        fast_weights(KIND, q, w);
        /* the coarse (a) and fine (b) int8 terms of x, each dotted with the same weights; the rows'
         * sums interleaved, so that R independent chains of dot products keep the unit busy (one
         * row's chain alone waits on the dot product's latency) */
        if (KIND & FAST_TWO_D) {  /* a d for each 16 terms: sums of the halves apart */
            i32x16 lo_a[FAST_ROWS], hi_a[FAST_ROWS], lo_b[FAST_ROWS], hi_b[FAST_ROWS];  /* R <= FAST_NARROW_ROWS */
            for (int r = 0; r < R; r++) lo_a[r] = hi_a[r] = lo_b[r] = hi_b[r] = (i32x16){0};
            const int8_t *const xg = j->xq + x_at(m, b, blocks);
            /* the sums named, never pointed at: a pointer to one kept all four arrays in memory */
#define FAST_DOT(S_, X_) \
    ((KIND & FAST_KIND) == FAST_SIGNED_BYTES ? dot4_signed(S_, w[t], (X_)[t]) : dot4_at(S_, w[t], (X_) + t))
            for (int t = 0; t < 8; t++) {
                for (int r = 0; r < R; r++) {
                    const int32_t *xa = (const int32_t *)(xg + r * QK), *xb = (const int32_t *)(xg + (XG + r) * QK);
                    if (t < 4) {
                        lo_a[r] = FAST_DOT(lo_a[r], xa);
                        lo_b[r] = FAST_DOT(lo_b[r], xb);
                    } else {
                        hi_a[r] = FAST_DOT(hi_a[r], xa);
                        hi_b[r] = FAST_DOT(hi_b[r], xb);
                    }
                }
            }
#undef FAST_DOT
            /* x = d_x (256 a + b): |sums| < 2^20 per block (32 terms of |u| <= 255 by |a| <= 127),
             * so 256 a + b and c S stay well inside int32 */
            for (int r = 0; r < R; r++) {
                const float dx = j->dx[f_at(m, b, blocks) + r];
                const int32_t s0 = j->sx[(m + r) * (K / 16) + 2 * b], s1 = j->sx[(m + r) * (K / 16) + 2 * b + 1];
                const f32x16 i0 = __builtin_convertvector((lo_a[r] << 8) + lo_b[r] - j->c * s0, f32x16);
                const f32x16 i1 = __builtin_convertvector((hi_a[r] << 8) + hi_b[r] - j->c * s1, f32x16);
                acc[r] += dx * (d0 * i0 + d1 * i1) + min * (dx * (float)(s0 + s1));
            }
        } else {
            /* one d for all 32 terms: one integer sum per row, the a terms' dot products, times 256
             * (exact, as above), then the b terms' (with TERMS = 1, the a terms' alone: x ~= 256 d_x a) */
            i32x16 sum[FAST_ROWS];
            for (int r = 0; r < R; r++) sum[r] = (i32x16){0};
            const int8_t *const xg = j->xq + x_at(m, b, blocks);
            for (int half = 0; half < TERMS; half++) {
                for (int t = 0; t < 8; t++) {
                    for (int r = 0; r < R; r++) {
                        const int32_t *x4 = (const int32_t *)(xg + (half * XG + r) * QK);
                        sum[r] = (KIND & FAST_KIND) == FAST_SIGNED_BYTES ? dot4_signed(sum[r], w[t], x4[t])
                                                                         : dot4_at(sum[r], w[t], x4 + t);
                    }
                }
                if (!half && TERMS == 2)
                    for (int r = 0; r < R; r++) sum[r] <<= 8;
            }
            const int64_t at0 = f_at(m, b, blocks);
            const f32x16 d = TERMS == 2 ? d0 : d0 * 256.0f;  /* the a terms alone: x ~= 256 d_x a */
            const int32_t *const cs = TERMS == 2 ? j->cs : j->cs1;
            for (int r = 0; r < R; r++) {  /* the row's per-block factors, computed once for all panels */
                const int64_t at = at0 + r;
                /* c S is 0 where the format has a min (c = 0), and the min's term 0 where it has none: one
                 * operation less per row and block either way */
                const f32x16 i = __builtin_convertvector(KIND & FAST_MIN ? sum[r] : sum[r] - cs[at], f32x16);
                acc[r] += (j->dx[at] * d) * i;
                if (KIND & FAST_MIN) acc[r] += min * j->dxs[at];
            }
        }
    }
    /* a store of a fixed size: a memcpy of `cols` floats is a call, which left this loop rolled when GCC decides
     * what to keep in registers, so acc[] stayed in memory and every block's sums were added to it there */
    for (int r = 0; r < R; r++) {
        if (TERMS == 1) {
            put_coarse(j->y + (m + r) * j->ldy + p * NR, j->panel_max + (m + r) * ((j->N + NR - 1) / NR) + p, acc[r],
                       cols);
        } else {
            store_cols(j->y + (m + r) * j->ldy + p * NR, acc[r], cols);
        }
    }
}

#if defined(YMM)
/* 32 bytes at p */
static inline __m256i ints32(const uint8_t *p) { return _mm256_loadu_si256((const __m256i *)p); }
/* top_bits for 32 bytes */
static inline __attribute__((always_inline)) __m256i top_bits8(__m256i top, int s) {
    const __m256i shifted = s < 2 ? _mm256_slli_epi16(top, 4 - 2 * s) : s == 2 ? top : _mm256_srli_epi16(top, 2);
    return _mm256_and_si256(shifted, _mm256_set1_epi8(0x30));
}

/* Vector T (terms 4T .. 4T + 3; nibbles: T < 4 the low nibbles of vector T, else the high ones of vector
 * T - 4) of a record's integers, rows 8h .. 8h + 7, as bytes */
static inline __attribute__((always_inline)) __m256i weights8(const int KIND, const uint8_t *q, int T, int h) {
    const __m256i low = _mm256_set1_epi8(15);
    if ((KIND & FAST_KIND) == FAST_NIBBLES || (KIND & FAST_KIND) == FAST_SIXES) {
        const __m256i v = ints32(q + 64 * (T & 3) + 32 * h);
        const __m256i nibble = _mm256_and_si256(T < 4 ? v : _mm256_srli_epi16(v, 4), low);
        if ((KIND & FAST_KIND) == FAST_NIBBLES) return nibble;
        return _mm256_or_si256(nibble, top_bits8(ints32(q + 256 + 64 * (T >> 2) + 32 * h), T & 3));
    }
    return ints32(q + 64 * T + 32 * h);
}

/* The activations as one int16 term, 256 a + b (the same integer as the two int8 terms), for madd: row
 * m's 32 terms of block b at x16_at (bytes, in the slot of its a and b terms), each group of 4 terms
 * as x0, x2, x1, x3, so that one 32-bit broadcast pairs the even terms and the next the odd ones. */
static inline int64_t x16_at(int64_t m, int64_t b, int64_t blocks) {
    return ((m / XG) * blocks + b) * (2 * XG * QK) + (m % XG) * 2 * QK;
}

/* Vector T's weights of rows 8h .. 8h + 7 as int16 pairs for madd: `even` terms 4T and 4T + 2 of each
 * row, `odd` terms 4T + 1 and 4T + 3 */
static inline __attribute__((always_inline)) void weights16(const int KIND, const uint8_t *q, int T, int h,
                                                            __m256i *even, __m256i *odd) {
    const int ints = KIND & FAST_KIND;
    if (ints == FAST_NIBBLES) {  /* T < 4: the low nibbles of vector T; else the high ones of T - 4 */
        const __m256i v = ints32(q + 64 * (T & 3) + 32 * h), mask = _mm256_set1_epi16(15);
        *even = _mm256_and_si256(T < 4 ? v : _mm256_srli_epi16(v, 4), mask);
        *odd = T < 4 ? _mm256_and_si256(_mm256_srli_epi16(v, 8), mask) : _mm256_srli_epi16(v, 12);
        return;
    }
    const __m256i w = weights8(KIND, q, T, h);
    if (ints == FAST_SIGNED_BYTES) {
        *even = _mm256_srai_epi16(_mm256_slli_epi16(w, 8), 8);
        *odd = _mm256_srai_epi16(w, 8);
    } else {
        *even = _mm256_and_si256(w, _mm256_set1_epi16(255));
        *odd = _mm256_srli_epi16(w, 8);
    }
}

/* fast_tile for AVX2: the activations' single int16 term (x16_at) times the weights as int16 with madd,
 * 16 multiply-adds an instruction, where the two int8 terms took two maddubs and two madds for 32: the
 * same integer sums, in half the multiplies. AVX2's 16 registers: the 8 outputs of each half of the
 * panel (h) in turn over all the blocks, the rows' integer sums in registers. 8 rows share each
 * unpacked weight vector (R = 8, the one-d kinds: 5-7 % less time than 4-row tiles over the demo model's
 * layers at 16 and 64 rows, one process with both builds), their float sums spilling to the stack. */
static inline __attribute__((always_inline)) void fast_tile16(const int KIND, const int R, const struct fjob *j,
                                                              int64_t m, int64_t p, int64_t cols) {
    const int64_t K = j->K, blocks = K / QK;
    const int64_t panel_bytes = fast_panel_bytes(KIND, blocks);
    const uint8_t *const base = j->w + p * panel_bytes;
    /* the narrow tiles only: in 8-row tiles, with 16 registers, the requests cost 7 % of the products at 64 rows and
     * gained nothing at 8-16 (AVX2 build on the Zen 5 EPYC) */
    const uint8_t *const ahead = R < FAST_ROWS ? records_ahead(j, base, panel_bytes, m, R, p) : NULL;
    float out[FAST_ROWS][NR];
    for (int h = 0; h < 2; h++) {
        v8 acc[FAST_ROWS];
        for (int r = 0; r < R; r++) acc[r] = (v8){0};
        for (int64_t b = 0; b < blocks; b++) {
            if (h == 0) ask_ahead(ahead, b, blocks, panel_bytes);  /* the second half reads the panel from the cache */
            /* the scales are read after the products: the rows' sums, the weights and the activations
             * fill the 16 registers, and the scales live only for the sums' last step */
            const uint8_t *const q = fast_ints_at(KIND, base, b);
            const int64_t at = f_at(m, b, blocks);
            __m256i sum[FAST_ROWS];
            for (int r = 0; r < R; r++) sum[r] = _mm256_setzero_si256();
#pragma GCC unroll 8
            for (int T = 0; T < 8; T++) {
                __m256i even, odd;
                weights16(KIND, q, T, h, &even, &odd);
                for (int r = 0; r < R; r++) {
                    const int32_t *x = (const int32_t *)(j->xq + x16_at(m + r, b, blocks)) + 2 * T;
                    const __m256i pairs = _mm256_add_epi32(_mm256_madd_epi16(even, _mm256_set1_epi32(x[0])),
                                                           _mm256_madd_epi16(odd, _mm256_set1_epi32(x[1])));
                    sum[r] = _mm256_add_epi32(sum[r], pairs);
                    /* in order: GCC otherwise reassociates the sums and keeps every product of the block
                     * alive at once, through the stack */
                    __asm__("" : "+x"(sum[r]));
                }
                if ((KIND & FAST_TWO_D) && T == 3) {  /* terms 0-15 have a d of their own */
                    v8 d0, d1, min;
                    fast_scales8(KIND, base, b, h, &d0, &d1, &min);
                    for (int r = 0; r < R; r++) {
                        const vi8 i = (vi8)sum[r] - j->c * j->sx[(m + r) * (K / 16) + 2 * b];
                        acc[r] += (j->dx[at + r] * d0) * __builtin_convertvector(i, v8);
                        sum[r] = _mm256_setzero_si256();
                    }
                }
            }
            v8 d0, d1, min;
            fast_scales8(KIND, base, b, h, &d0, &d1, &min);
            for (int r = 0; r < R; r++) {
                if (KIND & FAST_TWO_D) {
                    const vi8 i = (vi8)sum[r] - j->c * j->sx[(m + r) * (K / 16) + 2 * b + 1];
                    acc[r] += (j->dx[at + r] * d1) * __builtin_convertvector(i, v8);
                } else {
                    /* as fast_tile's one-d kinds: c S is 0 where there is a min, the min's term 0 where not */
                    const v8 i = __builtin_convertvector(KIND & FAST_MIN ? (vi8)sum[r] : (vi8)sum[r] - j->cs[at + r], v8);
                    acc[r] += (j->dx[at + r] * d0) * i;
                    if (KIND & FAST_MIN) acc[r] += min * j->dxs[at + r];
                }
            }
        }
        for (int r = 0; r < R; r++) store8(out[r] + 8 * h, acc[r]);
    }
    for (int r = 0; r < R; r++) memcpy(j->y + (m + r) * j->ldy + p * NR, out[r], (size_t)cols * sizeof(float));
}
#define FAST_TILE(K_, R_) fast_tile16(K_, R_, j, m, p, cols)
#else
#define FAST_TILE(K_, R_) fast_tile(K_, R_, 2, j, m, p, cols)
#define FAST_TILE_A(K_, R_) fast_tile(K_, R_, 1, j, m, p, cols)  /* the a terms alone */
#endif

/* Each layout of the GGUF types, compiled with its scales' layout known (Q4_0, Q4_1, Q4_K;
 * Q5_0, Q5_1, Q5_K, Q6_K; Q8_0; the k-quants as realizar packs them, FAST_SUPER); any other combination
 * of flags takes the generic case. */
#define FAST_CASE(TILE_, K_, R_) case K_: TILE_(K_, R_); break
#define FAST_ONE_D_CASES(TILE_, R_)                                                 \
        FAST_CASE(TILE_, FAST_NIBBLES | FAST_HALF, R_);                             \
        FAST_CASE(TILE_, FAST_NIBBLES | FAST_HALF | FAST_MIN, R_);                  \
        FAST_CASE(TILE_, FAST_BYTES | FAST_HALF, R_);                               \
        FAST_CASE(TILE_, FAST_BYTES | FAST_HALF | FAST_MIN, R_);                    \
        FAST_CASE(TILE_, FAST_SIGNED_BYTES | FAST_HALF, R_);                        \
        FAST_CASE(TILE_, FAST_SIGNED_BYTES, R_);                                    \
        FAST_CASE(TILE_, FAST_NIBBLES | FAST_MIN | FAST_SUPER, R_);                 \
        FAST_CASE(TILE_, FAST_BYTES | FAST_MIN | FAST_SUPER, R_);

#define FAST_KINDS(R_)                                                              \
    switch (j->kind) {                                                              \
        FAST_ONE_D_CASES(FAST_TILE, R_)                                             \
        FAST_CASE(FAST_TILE, FAST_BYTES | FAST_TWO_D | FAST_SUPER, R_);             \
        FAST_CASE(FAST_TILE, FAST_SIXES | FAST_TWO_D | FAST_SUPER, R_);             \
        default: FAST_TILE(j->kind, R_); break;                                     \
    }

/* FAST_KINDS for the kinds with one d per 32 terms, which take 8-row tiles (TILE_: FAST_TILE, or
 * FAST_TILE_A for the a terms alone) */
#define FAST_KINDS_ONE_D(TILE_, R_)                                                 \
    switch (j->kind) {                                                              \
        FAST_ONE_D_CASES(TILE_, R_)                                                 \
        default: TILE_(j->kind, R_); break;                                         \
    }

static void run_fast_unit(const void *arg, int64_t unit) {
    const struct fjob *j = (const struct fjob *)arg;
    const int64_t panels = (j->N + NR - 1) / NR, full = j->N / NR;
    const int64_t p0 = unit * j->chunk, p1 = panels - p0 < j->chunk ? panels : p0 + j->chunk;
    const int wide = !(j->kind & FAST_TWO_D);  /* FAST_ROWS-row tiles for the kinds with one d per 32 terms */
    for (int64_t p = p0; p < p1; p++) {
        const int64_t cols = p < full ? NR : j->N - p * NR;
        for (int64_t m = 0; m < j->M;) {
            if (wide && j->M - m >= FAST_ROWS) {
#if defined(YMM)
                FAST_KINDS_ONE_D(FAST_TILE, FAST_ROWS);  /* AVX2 never ranks: both terms always */
#else
                if (j->terms == 1) {
                    FAST_KINDS_ONE_D(FAST_TILE_A, FAST_ROWS);
                } else {
                    FAST_KINDS_ONE_D(FAST_TILE, FAST_ROWS);
                }
#endif
                m += FAST_ROWS;
                continue;
            }
            const int64_t R = j->M - m < FAST_NARROW_ROWS ? j->M - m : FAST_NARROW_ROWS;
            switch (R) {
                case 1: FAST_KINDS(1); break;
                case 2: FAST_KINDS(2); break;
                case 3: FAST_KINDS(3); break;
                default: FAST_KINDS(4); break;
            }
            m += R;
        }
    }
#if defined(__AVX512F__)
    if (j->terms == 1) _mm_sfence();  /* stream_cols' stores before the unit counts as done */
#endif
}

/* rintf of each lane, for |v| < 2^22: adding and taking away 1.5 * 2^23 leaves the integer part, rounded
 * to nearest, even (the default rounding mode), as rintf does. The barrier keeps the compiler from fusing
 * the product that made v into the addition, which would round it once less. */
static inline f32x16 rint16(f32x16 v) {
    const f32x16 magic = (f32x16){0} + 12582912.0f;
#if defined(__AVX512F__)
    __asm__("" : "+v"(v));
#elif defined(__AVX__)
    /* v in two 32-byte registers: as four 16-byte ones, GCC stored the parts and loaded them back whole,
     * a store the load could not take its bytes from (43 % of AVX2's quantize_rows waited on it) */
    typedef float f32x8 __attribute__((vector_size(32)));
    f32x8 part[2];
    memcpy(part, &v, sizeof part);
    __asm__("" : "+x"(part[0]), "+x"(part[1]));
    memcpy(&v, part, sizeof part);
#elif defined(__x86_64__)
    typedef float f32x4 __attribute__((vector_size(16)));  /* v in four 16-byte registers */
    f32x4 part[4];
    memcpy(part, &v, sizeof part);
    __asm__("" : "+x"(part[0]), "+x"(part[1]), "+x"(part[2]), "+x"(part[3]));
    memcpy(&v, part, sizeof part);
#endif
    return (v + magic) - magic;
}

/* v clamped to [-127, 127] lane by lane, as max(min(v, 127), -127) with C's ?: (vminps and vmaxps: NaNs
 * give the second operand; C has no ?: on vectors, and GCC compares and blends without them) */
static inline f32x16 clamp127(f32x16 v) {
    const f32x16 top = (f32x16){0} + 127.0f, bottom = (f32x16){0} - 127.0f;
#if defined(__AVX512F__)
    __m512 x, t, u;
    memcpy(&x, &v, sizeof x);
    memcpy(&t, &top, sizeof t);
    memcpy(&u, &bottom, sizeof u);
    x = _mm512_max_ps(_mm512_min_ps(x, t), u);
    memcpy(&v, &x, sizeof v);
    return v;
#else
    const i32x16 below = v < top;
    v = (f32x16)(((i32x16)v & below) | ((i32x16)top & ~below));
    const i32x16 above = v > bottom;
    return (f32x16)(((i32x16)v & above) | ((i32x16)bottom & ~above));
#endif
}

#define QUANTIZE_ROWS 8

struct quantize_job {
    const float *x;
    int64_t ldx, M, K;
    int c;
    int8_t *xq;
    float *dx, *dxs;
    int32_t *sx, *cs;
    int32_t *cs1;  /* c times the block's sum of the a terms, for the a terms alone; NULL: not wanted */
};

/* Lane i: the sum (MAX: the largest) of v[i]'s 16 lanes, for 16 vectors at once: 15 vector operations and 30
 * two-vector shuffles, halving the vectors and their partial results at each of 4 levels. (One vector's
 * lanes reduced at a time took 4 shuffles and 4 operations each, and the maxima left through scalar
 * stores that the next vector load waited on: with AVX-512, 64 rows of 1,536 terms took 68 us to
 * quantize, now 57 with clamp127.) MAX compares as int32, which orders non-negative floats' bits as the
 * floats. */
#define SHUFFLE16(a, b, ...) __builtin_shuffle(a, b, (i32x16){__VA_ARGS__})
static inline __attribute__((always_inline)) i32x16 reduce_pair(const int MAX, i32x16 x, i32x16 y) {
    return MAX ? (i32x16)(((x > y) & x) | (~(x > y) & y)) : x + y;
}
static inline __attribute__((always_inline)) i32x16 transposed16(const int MAX, const i32x16 v[16]) {
    i32x16 c[8], d[4], e[2];
    for (int i = 0; i < 8; i++)  /* c[i]: 8 partials of v[2i], then 8 of v[2i + 1] */
        c[i] = reduce_pair(MAX, SHUFFLE16(v[2 * i], v[2 * i + 1], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23),
                           SHUFFLE16(v[2 * i], v[2 * i + 1], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31));
    for (int i = 0; i < 4; i++)  /* d[i]: 4 partials of each of v[4i] .. v[4i + 3] */
        d[i] = reduce_pair(MAX, SHUFFLE16(c[2 * i], c[2 * i + 1], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27),
                           SHUFFLE16(c[2 * i], c[2 * i + 1], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31));
    for (int i = 0; i < 2; i++)  /* e[i]: 2 partials of each of v[8i] .. v[8i + 7] */
        e[i] = reduce_pair(MAX, SHUFFLE16(d[2 * i], d[2 * i + 1], 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29),
                           SHUFFLE16(d[2 * i], d[2 * i + 1], 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31));
    return reduce_pair(MAX, SHUFFLE16(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30),
                       SHUFFLE16(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31));
}

/* Rows m0 .. m0 + rows of the job's x [M, K] to two int8 terms per 32-term block, x ~= d (256 a + b):
 * a = round(x / (256 d)) with 256 d = max |x| / 127, as llama.cpp's Q8_1, and b = round(the remainder / d),
 * |b| <= 128 clamped to 127. The error is at most d / 2 = max |x| / 65024 per term, about 256
 * times less than a alone (which failed the quality gate: 95.7 % argmax agreement), for twice the
 * integer dot products and no more weight reads. xq, dx and the per-block factors (dxs: d times
 * the block's sum of 256 a + b, the min's factor; cs: c times that sum) are laid out by x_at and
 * f_at; sx [M, K / 16] holds the sums over each 16 terms. A single int8 term fails the gate in
 * every kind of layer alone, too (by emulation: down projections 98.05 %, the LM head 97.22 %).
 * AVX2 builds store 256 a + b as one int16 instead (x16_at), for fast_tile16's madd. 16 blocks at a
 * time, their maxima and sums reduced together (transposed16). */
static void quantize_rows(const struct quantize_job *q, int64_t m0, int64_t rows) {
    const int64_t K = q->K, blocks = K / QK;
    const i32x16 magnitude = (i32x16){0} + 0x7fffffff;
    for (int64_t m = m0; m < m0 + rows; m++) {
        const float *row = q->x + m * q->ldx;
#if !defined(YMM)
        int8_t *const xa0 = q->xq + x_at(m, 0, blocks);  /* block b's a terms at xa0 + b * 2 XG QK */
#endif
        const int64_t f0 = f_at(m, 0, blocks);           /* block b's factors at f0 + b * XG */
        for (int64_t b0 = 0; b0 < blocks; b0 += 16) {
            const int n = blocks - b0 < 16 ? (int)(blocks - b0) : 16;
            i32x16 v[32], a_terms[16];  /* v: each block's two halves, first |x|, then 256 a + b */
            for (int i = 0; i < 16; i++) {
                f32x16 v0 = {0}, v1 = {0};
                if (i < n) {
                    memcpy(&v0, row + (b0 + i) * QK, sizeof v0);
                    memcpy(&v1, row + (b0 + i) * QK + 16, sizeof v1);
                }
                v[i] = reduce_pair(1, (i32x16)v0 & magnitude, (i32x16)v1 & magnitude);
            }
            /* the scales of 16 blocks at once: their divisions are one vector division each */
            const f32x16 amax = (f32x16)transposed16(1, v);
            const f32x16 coarse = amax / 127.0f, d = coarse / 256.0f;
            const i32x16 zero_c = coarse > 0.0f, zero_d = d > 0.0f;  /* -1 where the scale is not 0 */
            const f32x16 id_coarse = (f32x16)((i32x16)(1.0f / coarse) & zero_c), id = (f32x16)((i32x16)(1.0f / d) & zero_d);
            for (int i = 0; i < 16; i++) {
                const int64_t b = b0 + i;
                a_terms[i] = (i32x16){0};
                if (i >= n) {  /* no block: nothing to add into the sums */
                    v[2 * i] = v[2 * i + 1] = (i32x16){0};
                    continue;
                }
                const float *const x = row + b * QK;
                /* 16 lanes at a time; rint16 rounds as rintf (to nearest, even) */
                for (int h = 0; h < 2; h++) {
                    f32x16 u;
                    memcpy(&u, x + 16 * h, sizeof u);
                    const f32x16 a = rint16(u * id_coarse[i]);
                    f32x16 fine = rint16((u - a * coarse[i]) * id[i]);
                    fine = clamp127(fine);
                    const i32x16 ia = __builtin_convertvector(a, i32x16), ib = __builtin_convertvector(fine, i32x16);
                    const i32x16 x_q = (ia << 8) + ib;
#if defined(YMM)
                    /* one int16 term, 256 a + b (|256 a + b| < 2^15), each group of 4 terms as x0, x2, x1, x3 (x16_at) */
                    typedef int16_t i16x16 __attribute__((vector_size(32)));
                    const i16x16 words = __builtin_shuffle(__builtin_convertvector(x_q, i16x16),
                                                           (i16x16){0, 2, 1, 3, 4, 6, 5, 7, 8, 10, 9, 11, 12, 14, 13, 15});
                    memcpy(q->xq + x16_at(m, b, blocks) + 32 * h, &words, sizeof words);
#else
                    int8_t *const xa = xa0 + b * (2 * XG * QK), *const xb = xa + XG * QK;
                    const i8x16 na = __builtin_convertvector(ia, i8x16), nb = __builtin_convertvector(ib, i8x16);
                    memcpy(xa + 16 * h, &na, sizeof na);
                    memcpy(xb + 16 * h, &nb, sizeof nb);
#endif
                    v[2 * i + h] = x_q;
                    if (q->cs1) a_terms[i] += ia;  /* only the ranked products read these sums */
                }
            }
            /* lane 2i + h: the sum of block b0 + i's half h (blocks 8 .. 15 in the second), then each
             * block's sum */
            const i32x16 halves0 = transposed16(0, v), halves1 = transposed16(0, v + 16);
            const i32x16 sums = SHUFFLE16(halves0, halves1, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30)
                                + SHUFFLE16(halves0, halves1, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
            int32_t *const sx = q->sx + m * (K / 16) + 2 * b0;
            memcpy(sx, &halves0, sizeof(int32_t) * (size_t)(n < 8 ? 2 * n : 16));
            if (n > 8) memcpy(sx + 16, &halves1, sizeof(int32_t) * (size_t)(2 * n - 16));
            const f32x16 dxs = d * __builtin_convertvector(sums, f32x16);  /* the min's factor */
            const i32x16 cs = q->c * sums, cs1 = q->cs1 ? q->c * transposed16(0, a_terms) : (i32x16){0};
            for (int i = 0; i < n; i++) {
                const int64_t at = f0 + (b0 + i) * XG;
                q->dx[at] = d[i];
                q->dxs[at] = dxs[i];
                q->cs[at] = cs[i];
                if (q->cs1) q->cs1[at] = cs1[i];
            }
        }
    }
}

/* Rows [8u, 8u + 8) of the activations (see quantize_rows). */
static void run_quantize_unit(const void *arg, int64_t unit) {
    const struct quantize_job *q = (const struct quantize_job *)arg;
    const int64_t m0 = unit * QUANTIZE_ROWS;
    quantize_rows(q, m0, q->M - m0 < QUANTIZE_ROWS ? q->M - m0 : QUANTIZE_ROWS);
}

/* The most rows realizar_quant_gemm_fast multiplies with integer dot products: the quality gate
 * runs the fast class in steps of this many rows, so that it measures those products on every row. */
int realizar_fast_max_rows(void) { return FAST_MAX_ROWS; }

/* Bits of the activations' integer terms in the products: 16 (one int16 term, AVX2's madd) or 8 (two int8
 * terms, 256 a + b, for 8-bit dot products): the same integers either way. */
int realizar_fast_activation_bits(void) {
#if defined(YMM)
    return 16;
#else
    return 8;
#endif
}

/* Row tile t of x's a terms, d_x and c sum(a), as realizar_tile_ranking takes them (zeros past M) */
struct tile_rows_job {
    const struct fjob *j;
    int8_t *a;
    float *dx;
    int32_t *cs;
};

static void run_tile_rows(const void *arg, int64_t t) {
    const struct tile_rows_job *g = (const struct tile_rows_job *)arg;
    const struct fjob *const j = g->j;
    const int64_t blocks = j->K / QK;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t r = 0; r < 16; r++) {
            const int64_t m = 16 * t + r, at = (t * blocks + b) * 16 + r;
            if (m < j->M) {
                memcpy(g->a + at * QK, j->xq + x_at(m, b, blocks), QK);
                g->dx[at] = j->dx[f_at(m, b, blocks)];
                g->cs[at] = j->cs1[f_at(m, b, blocks)];
            } else {
                memset(g->a + at * QK, 0, QK);
                g->dx[at] = 0;
                g->cs[at] = 0;
            }
        }
}

struct ranked_job {
    const struct fjob *j;  /* the products, with terms = 2 */
    int64_t top;           /* panels per row, at most MOST_RANKED */
    int64_t *argmax;       /* [M] each ranked row's argmax (ranked_argmax), or NULL: not wanted */
};

#define MOST_RANKED 16

/* The index of the largest of a row's N outputs y, the first of them where several are (numpy's argmax), from
 * `largest`, the largest of each panel of 16 outputs as they stand; -1 where one is a NaN. One read of the
 * panels' maxima and one panel, instead of every output. */
static int64_t ranked_argmax(const float *y, const float *largest, int64_t N) {
    const int64_t panels = (N + NR - 1) / NR;
    int64_t at = 0;
    for (int64_t q = 0; q < panels; q++) {
        if (largest[q] != largest[q]) return -1;
        if (largest[q] > largest[at]) at = q;
    }
    for (int64_t k = at * NR; k < N && k < (at + 1) * NR; k++)
        if (y[k] == largest[at]) return k;
    return -1;  /* not reached: the panel holds its largest */
}

/* Row m of a ranked product: the `top` panels with the largest outputs of the row from the a terms
 * alone, multiplied again with both terms; and where asked, the row's argmax, once those panels' largest
 * are their new outputs'. */
static void run_ranked_row(const void *arg, int64_t row) {
    const struct ranked_job *r = (const struct ranked_job *)arg;
    const struct fjob *const j = r->j;
    const int64_t m = row, panels = (j->N + NR - 1) / NR, full = j->N / NR;
    const float *const largest = j->panel_max + m * panels;
    int64_t best[MOST_RANKED];
    float best_max[MOST_RANKED];
    int64_t kept = 0;
    for (int64_t q = 0; q < panels; q++) {
        const float top = largest[q];
        if (kept == r->top && !(top > best_max[kept - 1])) continue;  /* NaN ranks last */
        int64_t at = kept < r->top ? kept++ : kept - 1;
        for (; at > 0 && top > best_max[at - 1]; at--) {
            best_max[at] = best_max[at - 1];
            best[at] = best[at - 1];
        }
        best_max[at] = top;
        best[at] = q;
    }
    for (int64_t i = 0; i < kept; i++) {
        const int64_t p = best[i], cols = p < full ? NR : j->N - p * NR;
        FAST_KINDS(1);
    }
    if (!r->argmax) return;
    float *const maxima = j->panel_max + m * panels;  /* `largest`, which the refined panels' maxima replace */
    const float *const y = j->y + m * j->ldy;
    for (int64_t i = 0; i < kept; i++) {
        const int64_t p = best[i], cols = p < full ? NR : j->N - p * NR;
        f32x16 v = {0};
        memcpy(&v, y + p * NR, (size_t)cols * 4);
        maxima[p] = panel_largest_or_nan(v, cols);
    }
    r->argmax[m] = ranked_argmax(y, maxima, j->N);
}

/* The fewest rows realizar_quant_gemm_fast_ranked ranks: those of a FAST_ROWS-row tile (0 on AVX2, whose
 * tiles have no a-terms-alone pass, and which never ranks). */
int realizar_fast_ranked_rows(void) {
#if defined(YMM)
    return 0;
#else
    return FAST_ROWS;
#endif
}

/* realizar_quant_gemm_fast, whose outputs are exact to its own class only where they rank among the
 * largest of their row, with `top` = 0 as realizar_quant_gemm_fast itself. See
 * realizar_quant_gemm_fast_ranked. */
static int fast_products(const float *x, int64_t ldx, const uint8_t *w, int kind, int c, float *y, int64_t ldy,
                         int64_t M, int64_t N, int64_t K, int64_t top, int64_t *argmax) {
    if (argmax)
        for (int64_t m = 0; m < M; m++) argmax[m] = -1;
    const int64_t fewest = realizar_fast_ranked_rows();
    const int ranked = fewest && top > 0 && !(kind & FAST_TWO_D) && M >= fewest;
    /* the a terms' pass on AMX's int8 tiles, where they take it (quant_tiles.c): the same floats, the demo model's
     * LM head at 64 rows in 0.80x the time (BENCHMARKS.md); every row is then ranked, the last M % 8 too */
    const int tile_ranked = ranked && realizar_tile_ranks(kind, M);
    const int64_t row_tiles = (M + 15) / 16;
    /* AMX tiles where they are on (quant_tiles.c), but not for a ranked product: on tiles the demo model's LM head
     * took as long as with both terms throughout, 0.92-1.24x as long as ranked from 64 to 512 rows (longer at
     * 3 of 4 sizes) */
    const int tiles = ranked ? 1 : realizar_tile_products(x, ldx, w, kind, c, y, ldy, M, N, K);
    if (tiles <= 0) return tiles;
    if (M > FAST_MAX_ROWS) return realizar_buffered_gemm(x, ldx, w, kind, 1, c, y, ldy, M, N, K);
    static __thread void *scratch;
    static __thread int64_t capacity;
    const int64_t Mg = (M + XG - 1) / XG * XG;  /* rows in whole groups of the layout */
    const int64_t factors = Mg * (K / QK) * 4;  /* bytes of one array of per-block factors */
    const int64_t tile_bytes = tile_ranked ? row_tiles * 16 * (K + 2 * (K / QK) * 4) + 64 : 0;
    const int64_t panels = (N + NR - 1) / NR, ahead = 2 * Mg * K + 4 * factors + M * (K / 16) * 4 + 64 + tile_bytes;
    uint8_t *const buffer = thread_scratch(&scratch, &capacity, ahead + (ranked ? M * panels * 4 + 64 : 0));
    if (!buffer) return -1;
    float *const panel_max = ranked ? (float *)(void *)(((uintptr_t)(buffer + ahead) + 63) & ~(uintptr_t)63) : NULL;
    float *dx = (float *)buffer;
    int32_t *sx = (int32_t *)(buffer + factors);
    float *dxs = (float *)(buffer + factors + M * (K / 16) * 4);
    int32_t *cs = (int32_t *)(buffer + 2 * factors + M * (K / 16) * 4);
    int32_t *cs1 = (int32_t *)(buffer + 3 * factors + M * (K / 16) * 4);
    int8_t *xq = (int8_t *)(buffer + 4 * factors + M * (K / 16) * 4);
    const struct quantize_job q = {.x = x, .ldx = ldx, .M = M, .K = K, .c = c, .xq = xq, .dx = dx, .sx = sx,
                                   .dxs = dxs, .cs = cs, .cs1 = ranked ? cs1 : NULL};
    /* in units of QUANTIZE_ROWS rows, on every thread: one thread alone kept the others waiting for 6 %
     * of a 64-sequence decode step */
    realizar_parallel(run_quantize_unit, &q, (M + QUANTIZE_ROWS - 1) / QUANTIZE_ROWS);
    const int64_t threads = realizar_threads(), units_per_thread = 8;
    int64_t chunk = (panels + units_per_thread * threads - 1) / (units_per_thread * threads);
    struct fjob j = {.xq = xq, .dx = dx, .sx = sx, .dxs = dxs, .cs = cs, .cs1 = cs1, .w = w, .y = y, .M = M, .N = N,
                     .K = K, .ldy = ldy, .kind = kind, .c = c, .terms = ranked ? 1 : 2, .panel_max = panel_max,
                     .chunk = chunk};
    if (tile_ranked) {
        /* after xq's 2 Mg K bytes and the slack beyond them, on a cache line */
        float *const tile_dx = (float *)(void *)(((uintptr_t)(xq + 2 * Mg * K + 64) + 63) & ~(uintptr_t)63);
        int32_t *const tile_cs = (int32_t *)(void *)(tile_dx + row_tiles * 16 * (K / QK));
        const struct tile_rows_job g = {.j = &j, .a = (int8_t *)(void *)(tile_cs + row_tiles * 16 * (K / QK)),
                                        .dx = tile_dx, .cs = tile_cs};
        realizar_parallel(run_tile_rows, &g, row_tiles);
        if (realizar_tile_ranking(g.a, g.dx, g.cs, w, kind, y, ldy, M, N, K, panel_max)) return -1;
    } else {
        realizar_parallel(run_fast_unit, &j, (panels + chunk - 1) / chunk);
    }
    if (ranked) {
        j.terms = 2;
        const struct ranked_job r = {.j = &j, .top = top < MOST_RANKED ? top : MOST_RANKED, .argmax = argmax};
        /* the rows of 8-row tiles: the last M % 8 took both terms throughout (run_fast_unit), unless the tiles
         * took every row */
        realizar_parallel(run_ranked_row, &r, tile_ranked ? M : M - M % FAST_ROWS);
    }
    return 0;
}

/* y [M, N] (row stride ldy) ~= x [M, K] times the fast records `w` of kind `kind` with integer
 * offset c. Returns 0, or -1 when a buffer could not be allocated.
 *
 * Integer dot products for up to FAST_MAX_ROWS rows (every row with VNNI or AVX2; a decode step of a
 * few sequences elsewhere), where they cost less than dequantizing: each row pays for its own integer
 * products, while the exact path dequantizes a weight once for all its rows (into the buffer, as
 * realizar_quant_gemm does beyond DIRECT_MAX_ROWS), which byte multiply-adds without VNNI cannot beat
 * from about 16 rows. A row's result then depends on how many rows come with it, but each is either the
 * exact product or the fast one, and the quality gate measures the fast one on every row. */
int realizar_quant_gemm_fast(const float *x, int64_t ldx, const uint8_t *w, int kind, int c, float *y, int64_t ldy,
                             int64_t M, int64_t N, int64_t K) {
    return fast_products(x, ldx, w, kind, c, y, ldy, M, N, K, 0, NULL);
}

/* realizar_quant_gemm_fast for a product whose largest outputs per row are what matters (an LM head's
 * logits, of which sampling keeps the top and the argmax is the greedy token): from 8 rows, where the
 * products are bound by the dot products rather than by reading the weights, every output first from
 * x's a terms alone (x ~= 256 d_x a, half the dot products), then the `top` panels (16 outputs each,
 * at most 16 panels) with the largest such outputs of each row again with both terms, the same floats as
 * realizar_quant_gemm_fast gives them. The other outputs of the row keep the a terms' error, about 256
 * times the fast class's. Kinds with a d per 16 terms, builds without 8-row tiles and fewer rows: as
 * realizar_quant_gemm_fast. `argmax`, unless NULL: [M], each row's argmax over its outputs as they are returned (the
 * first of several largest, as numpy's), found from the panels' maxima that ranking keeps in the rows it ranks (a
 * greedy token without reading 49,152 logits a row back from memory); -1 in the others, and where a NaN is. Returns
 * 0, or -1 when a buffer could not be allocated. */
int realizar_quant_gemm_fast_ranked(const float *x, int64_t ldx, const uint8_t *w, int kind, int c, float *y,
                                    int64_t ldy, int64_t M, int64_t N, int64_t K, int64_t top, int64_t *argmax) {
    return fast_products(x, ldx, w, kind, c, y, ldy, M, N, K, top, argmax);
}
