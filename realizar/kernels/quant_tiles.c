/* The fast class's products of many rows on AMX tiles (Intel's AMX-BF16: tdpbf16ps), in builds for a
 * CPU that has them; elsewhere realizar_tile_products declines and quant_fast.c's integer dot products
 * take every row.
 *
 * bfloat16 keeps 8 bits of a float's mantissa, too few on its own for the activations (rounding weights and
 * activations to bfloat16 failed or barely passed the quality gate: BENCHMARKS.md). So x is split into two
 * bfloat16 terms, x = x_hi + x_lo with x_hi = bf16(x) and x_lo = bf16(x - x_hi), 16 bits of mantissa together
 * (split_rows). The weights stay in the fast class's records; a unit of work is up to 16 panels (16 outputs
 * each), which its thread lays out as tiles once, then multiplies every row by. So the weights are read once per
 * product whatever the rows, and the rows cost only tile products, 512 multiply-adds an instruction. Two ways:
 *
 * Integer tiles, for kinds with one d (and min) per 32-term block (every format but Q6_K): the block's integers
 * u - c are exact in bfloat16, and a block is exactly one tile product's depth, so the tiles sum
 * x . (u - c) over one block of one output tile, in two tile products (x_hi, x_lo), and the vector unit scales
 * those sums by the block's d and adds its min times x's block sums:
 *
 *   y = sum over blocks of  d (x_hi + x_lo) . (u - c) + min sum(x)
 *
 * The weights are exact: only x's split (2^-16) and float32 sums round.
 *
 * Split tiles, for Q6_K (a d per 16 terms): each weight dequantized (realizar_dequantize_fast_records) and split
 * as x is, and three tile products per block,
 *
 *   x . w ~= x_hi . w_hi + x_hi . w_lo + x_lo . w_hi      (x_lo . w_lo, about 2^-16 of it, is left out)
 *
 * summed in the tiles over all of K. The integer tiles took 0.60-0.69 ms where the split tiles took 0.87 for a
 * layer of the demo model at 64 rows (BENCHMARKS.md): a third fewer tile products and a fifth of the work to lay
 * the weights out, against a store and a scaling of the sums per block. (AMX's int8 tiles, which scaled per
 * block too, lost to the dot products: their products covered 8 rows, the two int8 terms of each filling the
 * other 8; BENCHMARKS.md. They do take a ranked product's first pass, the coarse term alone: the end of this
 * file.)
 *
 * Linux lends a process the tiles' state only when asked (arch_prctl); where it refuses, the products
 * decline too. Off until realizar_set_tiles turns them on: REALIZAR_TILES=on, or auto's timing at a server's
 * first start (realizar.engine.engine.choose_tiles), since on the shared VM where they were measured their
 * speed swung with the moment (BENCHMARKS.md, "AMX Xeon ... second session"). */
#include "quant_blocks.h"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__) && defined(__linux__)
#define TILES_BUILD 1
#else
#define TILES_BUILD 0
#endif

#if TILES_BUILD
#include <stdatomic.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE_ROWS 16            /* rows of a tile: rows of x, or pairs of terms of the weights */
#define TILE_MIN_ROWS 64        /* split tiles from this many rows (at 32 rows they took 1.2-1.4x as long as the integer dot products) */
#define INTEGER_MIN_ROWS 16     /* integer tiles from this many rows (16 decodes: the 1B model's step 106 ms against 124, the demo's even; 12: demo 10 % slower) */

struct tile_config {
    uint8_t palette, start_row, reserved[14];
    uint16_t bytes_per_row[16];
    uint8_t rows[16];
};

/* Whether Linux lends this process the tiles' state: asked once. */
static int tiles_lent(void) {
    static atomic_int lent = 0;  /* 0: not asked yet, 1: lent, -1: refused */
    int state = atomic_load(&lent);
    if (state == 0) {
        state = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : -1;
        atomic_store(&lent, state);
    }
    return state == 1;
}

static void load_tile_config(const struct tile_config *config) {
    /* ldtilecfg reads all 64 bytes, but GCC's intrinsic declares only 8 of them read: without this barrier the
     * compiler may drop the stores that filled them (an out-of-line copy of configure_tiles did, and the
     * configuration faulted) */
    __asm__ volatile("" : : "r"(config) : "memory");
    _tile_loadconfig(config);
}

static void configure_tiles(void) {
    struct tile_config config = {.palette = 1};
    for (int t = 0; t < 8; t++) {
        config.bytes_per_row[t] = 64;
        config.rows[t] = TILE_ROWS;
    }
    load_tile_config(&config);
}


/* x as two bfloat16 terms per value, hi = bf16(x) and lo = bf16(x - hi), [Mg, K] each in tiles (rows past M:
 * zeros): row tile t's block b (16 rows by 32 terms, 1 KB) at (t * K / 32 + b) * 512; and, for the integer tiles
 * of kinds with a min, each row's sum over each block. 16 rows a unit. */
struct split_job {
    const float *x;
    int64_t ldx, M, K;
    uint16_t *hi, *lo;
    float *sums;  /* [Mg, K / 32] each row's sum over each block of 32 terms, or NULL: not wanted */
};

static void split_rows(const void *arg, int64_t unit) {
    const struct split_job *s = (const struct split_job *)arg;
    uint16_t *const hi = s->hi + unit * TILE_ROWS * s->K, *const lo = s->lo + unit * TILE_ROWS * s->K;
    const int64_t blocks = s->K / QK;  /* K is a multiple of 32 */
    for (int64_t m = unit * TILE_ROWS; m < (unit + 1) * TILE_ROWS; m++) {
        const int64_t at = (m % TILE_ROWS) * QK;  /* row m's terms of block b: 64 bytes at b * 512 + at */
        if (m >= s->M) {
            for (int64_t b = 0; b < blocks; b++) {
                memset(hi + b * 512 + at, 0, QK * 2);
                memset(lo + b * 512 + at, 0, QK * 2);
            }
            if (s->sums) memset(s->sums + m * blocks, 0, (size_t)blocks * 4);
            continue;
        }
        const float *const x = s->x + m * s->ldx;
        for (int64_t b = 0; b < blocks; b++) {
            const __m512 v0 = _mm512_loadu_ps(x + b * QK), v1 = _mm512_loadu_ps(x + b * QK + 16);
            if (s->sums) s->sums[m * blocks + b] = _mm512_reduce_add_ps(_mm512_add_ps(v0, v1));
            /* a block's 32 terms in one conversion (v0's in the low half), and its hi back as floats */
            const __m512i h = (__m512i)_mm512_cvtne2ps_pbh(v1, v0);
            const __m512 h0 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(h)), 16));
            const __m512 h1 = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(h, 1)), 16));
            _mm512_storeu_si512(hi + b * 512 + at, h);
            _mm512_storeu_si512(lo + b * 512 + at, (__m512i)_mm512_cvtne2ps_pbh(_mm512_sub_ps(v1, h1), _mm512_sub_ps(v0, h0)));
        }
    }
}

struct tile_job {
    const uint16_t *hi, *lo;  /* x's two terms, [Mg, K] */
    atomic_int *failed;       /* set where a unit could not allocate its buffer */
    const uint8_t *w;
    float *y;
    int64_t M, Mg, N, K, ldy, chunk;
    int kind, c;
};

/* A panel's weights as tiles, hi then lo (blocks KB each): in block b's tile, pair r of terms (2r, 2r + 1)
 * of output j at 32-bit lane j of row r, the even term in the low half. `w` holds the panel's weights
 * dequantized, w[(32 b + k) * 16 + j]. */
static void weight_tiles(const float *w, int64_t blocks, uint8_t *hi, uint8_t *lo) {
    /* word i of a vcvtne2ps2bf16 (b: the even terms, a: the odd) is even term i (i < 16), odd term i - 16 */
    static const uint16_t pairs[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                       8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};
    const __m512i order = _mm512_loadu_si512(pairs), high = _mm512_set1_epi32((int)0xffff0000);
    for (int64_t r = 0; r < blocks * QK / 2; r++) {
        const __m512 even = _mm512_loadu_ps(w + 2 * r * NR), odd = _mm512_loadu_ps(w + (2 * r + 1) * NR);
        const __m512i h = _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(odd, even));
        const __m512 even_lo = _mm512_sub_ps(even, _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)));
        const __m512 odd_lo = _mm512_sub_ps(odd, _mm512_castsi512_ps(_mm512_and_si512(h, high)));
        const __m512i l = _mm512_permutexvar_epi16(order, (__m512i)_mm512_cvtne2ps_pbh(odd_lo, even_lo));
        _mm512_store_si512(hi + 64 * r, h);
        _mm512_store_si512(lo + 64 * r, l);
    }
}

/* Sums of row tile i and panel q of a unit, 16 x 16 floats each, at sums + (i * panels + q) * 256. R row tiles
 * (rows m0 ..) by P panels (q0 ..; their tiles at w + q * 2 * panel_tiles, hi then lo) over blocks b0 .. b1 - 1,
 * as a product over three times the terms (x_hi w_hi, x_hi w_lo, x_lo w_hi), added to the sums (first: from
 * zero). Tiles 0-3 the sums (row tile i, panel q in tile 2i + q), 4-5 rows, 6-7 weights. */
static inline __attribute__((always_inline)) void tile_sums(const int R, const int P, const struct tile_job *j,
                                                            int64_t m0, int64_t q0, int64_t panels, int64_t b0,
                                                            int64_t b1, int first, const uint8_t *w, float *sums) {
    const int64_t xstride = 64, panel_tiles = j->K / QK * 1024, row_tiles = panels * 256;
    float *const c = sums + (m0 / TILE_ROWS) * row_tiles + q0 * 256;
    if (first) {
        _tile_zero(0);
        if (P > 1) _tile_zero(1);
        if (R > 1) _tile_zero(2);
        if (R > 1 && P > 1) _tile_zero(3);
    } else {
        _tile_loadd(0, c, 64);
        if (P > 1) _tile_loadd(1, c + 256, 64);
        if (R > 1) _tile_loadd(2, c + row_tiles, 64);
        if (R > 1 && P > 1) _tile_loadd(3, c + row_tiles + 256, 64);
    }
    const uint8_t *const w0 = w + q0 * 2 * panel_tiles, *const w1 = w0 + 2 * panel_tiles;
    for (int64_t b = b0; b < b1; b++) {
        for (int term = 0; term < 3; term++) {
            const uint16_t *const x = (term == 2 ? j->lo : j->hi) + m0 * j->K + b * 512;
            const int64_t at = (term == 1) * panel_tiles + b * 1024;  /* the weights' lo with the rows' hi */
            /* each tile loaded just before its first use: all four loads first, then the products, took 4.7 times
             * as long (tiles are not renamed: a load waits for the products still reading the tile) */
            _tile_loadd(4, x, xstride);
            _tile_loadd(6, w0 + at, 64);
            _tile_dpbf16ps(0, 4, 6);
            if (P > 1) {
                _tile_loadd(7, w1 + at, 64);
                _tile_dpbf16ps(1, 4, 7);
            }
            if (R > 1) {
                _tile_loadd(5, x + TILE_ROWS * j->K, xstride);
                _tile_dpbf16ps(2, 5, 6);
                if (P > 1) _tile_dpbf16ps(3, 5, 7);
            }
        }
    }
    _tile_stored(0, c, 64);
    if (P > 1) _tile_stored(1, c + 256, 64);
    if (R > 1) _tile_stored(2, c + row_tiles, 64);
    if (R > 1 && P > 1) _tile_stored(3, c + row_tiles + 256, 64);
}

/* Blocks of terms per pass: the rows' tiles of a pass (32 rows: 16 KB) stay in L1 while every panel of the
 * unit multiplies them, the panels' weights (16 KB a pair and pass) come from L2. */
#define PASS_TILE_BLOCKS 4
#define UNIT_PANELS 16  /* panels per unit: their weights' tiles (36 KB each at 576 terms) stay in L2 */

/* A unit's panels (at most UNIT_PANELS): all dequantized into tiles first, then multiplied pass by pass. */
static void run_tile_unit(const void *arg, int64_t unit) {
    const struct tile_job *j = (const struct tile_job *)arg;
    const int64_t blocks = j->K / QK, panels = (j->N + NR - 1) / NR, full = j->N / NR;
    const int64_t p0 = unit * j->chunk, p1 = p0 + j->chunk < panels ? p0 + j->chunk : panels, n = p1 - p0;
    const int64_t pbytes = realizar_fast_panel_bytes(j->kind, blocks);
    static __thread void *scratch;
    static __thread int64_t capacity;
    const int64_t tiles = n * 2 * blocks * 1024, floats = blocks * QK * NR * 4, sums = j->Mg * n * NR * 4;
    uint8_t *const buffer = thread_scratch(&scratch, &capacity, tiles + floats + sums);
    if (!buffer) {
        atomic_store(j->failed, 1);
        return;
    }
    uint8_t *const w = buffer;
    float *const dequantized = (float *)(void *)(buffer + tiles), *const c = (float *)(void *)(buffer + tiles + floats);
    for (int64_t q = 0; q < n; q++) {
        realizar_dequantize_fast_records(j->kind, j->c, j->w + (p0 + q) * pbytes, 0, blocks, dequantized);
        weight_tiles(dequantized, blocks, w + q * 2 * blocks * 1024, w + (q * 2 + 1) * blocks * 1024);
    }
    configure_tiles();
    for (int64_t b0 = 0; b0 < blocks; b0 += PASS_TILE_BLOCKS) {
        const int64_t b1 = b0 + PASS_TILE_BLOCKS < blocks ? b0 + PASS_TILE_BLOCKS : blocks;
        for (int64_t m0 = 0; m0 < j->Mg; m0 += 2 * TILE_ROWS) {
            const int R = j->Mg - m0 >= 2 * TILE_ROWS ? 2 : 1;
            for (int64_t q = 0; q < n; q += 2) {
                const int P = q + 1 < n ? 2 : 1;
                if (R == 2 && P == 2) tile_sums(2, 2, j, m0, q, n, b0, b1, b0 == 0, w, c);
                else if (R == 2) tile_sums(2, 1, j, m0, q, n, b0, b1, b0 == 0, w, c);
                else if (P == 2) tile_sums(1, 2, j, m0, q, n, b0, b1, b0 == 0, w, c);
                else tile_sums(1, 1, j, m0, q, n, b0, b1, b0 == 0, w, c);
            }
        }
    }
    _tile_release();
    for (int64_t m = 0; m < j->M; m++)
        for (int64_t q = 0; q < n; q++) {
            const int64_t p = p0 + q, cols = p < full ? NR : j->N - p * NR;
            memcpy(j->y + m * j->ldy + p * NR, c + ((m / TILE_ROWS) * n + q) * 256 + (m % TILE_ROWS) * NR,
                   (size_t)cols * 4);
        }
}

/* The integer tiles (see the top of the file) */
struct integer_job {
    const uint16_t *hi, *lo;  /* x's two terms, [Mg, K] */
    const float *sums;        /* [Mg, K / 32] x's block sums (kinds with a min), or NULL */
    atomic_int *failed;
    const uint8_t *w;
    float *y;
    int64_t M, Mg, N, K, ldy, chunk;
    int kind, c;
};

/* The sums of row tile m0 and panel p of a unit after block b: acc = (b ? acc : 0) + d s + min * x's block sums
 * (the sums s of one step, out of the tiles), kept for the next block, or into y after the last (rows below M,
 * columns below N). */
static inline __attribute__((always_inline)) void scale_sums(const int MIN, const struct integer_job *j, float *acc,
                                                             const float *s, const float *scales, const float *xsums,
                                                             int64_t b, int64_t blocks, int64_t m0, int64_t p) {
    const __m512 d = _mm512_load_ps(scales);
    const __m512 min = MIN ? _mm512_load_ps(scales + 16) : _mm512_setzero_ps();
    const int last = b == blocks - 1;
    const __mmask16 cols = !last || p < j->N / NR ? 0xffff : (__mmask16)((1u << (j->N - p * NR)) - 1);
#pragma GCC unroll 16
    for (int r = 0; r < 16; r++) {
        __m512 a = b ? _mm512_load_ps(acc + 16 * r) : _mm512_setzero_ps();
        a = _mm512_fmadd_ps(_mm512_load_ps(s + 16 * r), d, a);
        if (MIN) a = _mm512_fmadd_ps(_mm512_set1_ps(xsums[r * blocks + b]), min, a);
        if (!last) _mm512_store_ps(acc + 16 * r, a);
        else if (m0 + r < j->M) _mm512_mask_storeu_ps(j->y + (m0 + r) * j->ldy + p * NR, cols, a);
    }
}

/* A unit's panels (at most UNIT_PANELS) as tiles of their integers, then for each row tile, block by block, every
 * panel: a step of two tile products, the rows' terms loaded once a block. (Panels outermost, with the sums in
 * registers but the rows' terms loaded every step, took as long; groups of 3 panels whose products interleave,
 * 20 % longer; two row tiles a step, 15 % longer.) */
#define LAG 4  /* steps from a step's products to the scaling of its sums */
static inline __attribute__((always_inline)) void integer_unit(const int MIN, const struct integer_job *j,
                                                               int64_t unit) {
    const int64_t blocks = j->K / QK, panels = (j->N + NR - 1) / NR;
    const int64_t p0 = unit * j->chunk, p1 = p0 + j->chunk < panels ? p0 + j->chunk : panels, n = p1 - p0;
    const int64_t pbytes = realizar_fast_panel_bytes(j->kind, blocks);
    static __thread void *scratch;
    static __thread int64_t capacity;
    const int64_t tile_bytes = n * blocks * 1024, scale_bytes = n * blocks * 32 * 4, partial_bytes = n * 256 * 4;
    uint8_t *const buffer = thread_scratch(&scratch, &capacity, tile_bytes + scale_bytes + partial_bytes + LAG * 1024);
    if (!buffer) {
        atomic_store(j->failed, 1);
        return;
    }
    uint8_t *const tiles = buffer;
    float *const scales = (float *)(void *)(buffer + tile_bytes);
    float *const partial = scales + n * blocks * 32, *const s = partial + n * 256;  /* s: LAG steps' sums */
    for (int64_t q = 0; q < n; q++)
        realizar_fast_integer_tiles(j->kind, j->c, j->w + (p0 + q) * pbytes, blocks, tiles + q * blocks * 1024,
                                    scales + q * blocks * 32);
    configure_tiles();
    for (int64_t m0 = 0; m0 < j->Mg; m0 += TILE_ROWS) {
        const uint16_t *const xh = j->hi + m0 * j->K, *const xl = j->lo + m0 * j->K;
        const float *const xsums = MIN ? j->sums + m0 * blocks : NULL;
        int64_t rq = 0, rb = 0;  /* the panel and block of the next step to scale */
        /* step k (block k / n, panel k % n): its products issued, step k - 1's sums stored, step k - LAG's scaled
         * (a tile's store reaches memory only once it retires, after the products issued before it). Tiles: the
         * rows' terms of even blocks 2-3, odd blocks 5-6; the weights and sums of even steps 4 and 0, odd steps 7
         * and 1. */
#define PRODUCTS(AH, AL, BT, CT, q, b)                                   \
    do {                                                                 \
        _tile_loadd(BT, tiles + ((q) * blocks + (b)) * 1024, 64);        \
        _tile_zero(CT);                                                  \
        _tile_dpbf16ps(CT, AH, BT);                                      \
        _tile_dpbf16ps(CT, AL, BT);                                      \
    } while (0)
#define STORE(CT, k) _tile_stored(CT, s + 256 * ((k) % LAG), 64)
#define TAKE(k)                                                                                                  \
    do {                                                                                                         \
        scale_sums(MIN, j, partial + rq * 256, s + 256 * ((k) % LAG), scales + (rq * blocks + rb) * 32, xsums, rb, \
                   blocks, m0, p0 + rq);                                                                         \
        if (++rq == n) rq = 0, rb++;                                                                             \
    } while (0)
        int64_t k = 0;
        for (int64_t b = 0; b < blocks; b++) {
            if (b & 1) {
                _tile_loadd(5, xh + b * 512, 64);
                _tile_loadd(6, xl + b * 512, 64);
            } else {
                _tile_loadd(2, xh + b * 512, 64);
                _tile_loadd(3, xl + b * 512, 64);
            }
            for (int64_t q = 0; q < n; q++, k++) {
                if (k & 1) {
                    if (b & 1) PRODUCTS(5, 6, 7, 1, q, b);
                    else PRODUCTS(2, 3, 7, 1, q, b);
                    STORE(0, k - 1);
                } else {
                    if (b & 1) PRODUCTS(5, 6, 4, 0, q, b);
                    else PRODUCTS(2, 3, 4, 0, q, b);
                    if (k >= 1) STORE(1, k - 1);
                }
                if (k >= LAG) TAKE(k - LAG);
            }
        }
        if ((k - 1) & 1) STORE(1, k - 1);
        else STORE(0, k - 1);
        for (int64_t t = k > LAG ? k - LAG : 0; t < k; t++) TAKE(t);
#undef PRODUCTS
#undef STORE
#undef TAKE
    }
    _tile_release();
}

static void run_integer_unit(const void *arg, int64_t unit) { integer_unit(0, (const struct integer_job *)arg, unit); }
static void run_integer_unit_min(const void *arg, int64_t unit) {
    integer_unit(1, (const struct integer_job *)arg, unit);
}

static atomic_int tiles_on = 0;  /* off until turned on (REALIZAR_TILES, or auto's timing) */

int realizar_set_tiles(int on) {
    atomic_store(&tiles_on, on);
    return on && tiles_lent();
}

int realizar_tile_products(const float *x, int64_t ldx, const uint8_t *w, int kind, int c, float *y, int64_t ldy,
                           int64_t M, int64_t N, int64_t K) {
    if (!atomic_load(&tiles_on) || M < realizar_tile_min_rows(kind) || !tiles_lent()) return 1;
    static __thread void *scratch;
    static __thread int64_t capacity;
    const int64_t Mg = (M + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    const int integers = realizar_fast_tile_integers(kind);  /* 0: split tiles, 1: integer tiles, 2: with a min */
    uint16_t *const buffer = thread_scratch(&scratch, &capacity, 2 * Mg * K * 2 + (integers == 2) * Mg * (K / QK) * 4);
    if (!buffer) return -1;
    const struct split_job s = {.x = x, .ldx = ldx, .M = M, .K = K, .hi = buffer, .lo = buffer + Mg * K,
                                .sums = integers == 2 ? (float *)(void *)(buffer + 2 * Mg * K) : NULL};
    realizar_parallel(split_rows, &s, Mg / TILE_ROWS);
    const int64_t panels = (N + NR - 1) / NR, units = 4 * realizar_threads();
    int64_t chunk = ((panels + units - 1) / units + 1) / 2 * 2;  /* panels in pairs */
    chunk = chunk < UNIT_PANELS ? chunk : UNIT_PANELS;
    atomic_int failed = 0;
    if (integers) {
        const struct integer_job i = {.hi = s.hi, .lo = s.lo, .sums = s.sums, .failed = &failed, .w = w, .y = y, .M = M,
                                      .Mg = Mg, .N = N, .K = K, .ldy = ldy, .chunk = chunk, .kind = kind, .c = c};
        realizar_parallel(integers == 2 ? run_integer_unit_min : run_integer_unit, &i, (panels + chunk - 1) / chunk);
        return atomic_load(&failed) ? -1 : 0;
    }
    const struct tile_job j = {.hi = s.hi, .lo = s.lo, .failed = &failed, .w = w, .y = y, .M = M, .Mg = Mg, .N = N,
                               .K = K, .ldy = ldy, .chunk = chunk, .kind = kind, .c = c};
    realizar_parallel(run_tile_unit, &j, (panels + chunk - 1) / chunk);
    return atomic_load(&failed) ? -1 : 0;
}

int realizar_tile_min_rows(int kind) { return realizar_fast_tile_integers(kind) ? INTEGER_MIN_ROWS : TILE_MIN_ROWS; }

#else

int realizar_tile_min_rows(int kind) {
    (void)kind;
    return 0;
}

int realizar_set_tiles(int on) {
    (void)on;
    return 0;
}

int realizar_tile_products(const float *x, int64_t ldx, const uint8_t *w, int kind, int c, float *y, int64_t ldy,
                           int64_t M, int64_t N, int64_t K) {
    (void)x, (void)ldx, (void)w, (void)kind, (void)c, (void)y, (void)ldy, (void)M, (void)N, (void)K;
    return 1;
}

#endif

#if TILES_BUILD && defined(__AMX_INT8__)
/* A ranked product's a-terms pass (quant_fast.c) on int8 tiles: a Q8_0 record's block is, as it is stored, the
 * weights of a tile product over 32 terms (row r of the tile: terms 4r .. 4r + 3 of each of the 16 outputs, the
 * layout of the dot products), and x's a terms are int8 too, so the tiles sum a block's integers exactly
 * (tdpbssd for signed bytes, tdpbsud for bytes offset by c), with no layout at all; the vector unit scales those
 * sums as the dot products' pass does, acc += (d_x 256 d) (sum - c sum(a)), in the same order, so the outputs
 * are the same floats. */
/* Steps from a block's product to the scaling of its sums, whose tile is stored after the scaling of an earlier
 * step: stored right after its product, with the scaling one step behind, a thread waited on each store (the demo
 * model's LM head at 64 rows took about 0.9x the dot products' time, against about 0.84x so) */
#define RANK_LAG 2

int realizar_tile_ranks(int kind, int64_t M) {
    const int bytes = (kind & FAST_KIND) == FAST_BYTES || (kind & FAST_KIND) == FAST_SIGNED_BYTES;
    return atomic_load(&tiles_on) && M >= INTEGER_MIN_ROWS && bytes && !(kind & (FAST_TWO_D | FAST_MIN | FAST_SUPER))
           && tiles_lent();
}

static void configure_int8_tiles(void) {
    struct tile_config config = {.palette = 1};
    for (int t = 0; t < 2; t++) config.bytes_per_row[t] = 64, config.rows[t] = TILE_ROWS;   /* sums: 16 x 16 int32 */
    for (int t = 2; t < 4; t++) config.bytes_per_row[t] = QK, config.rows[t] = TILE_ROWS;   /* rows: 16 x 32 terms */
    for (int t = 4; t < 6; t++) config.bytes_per_row[t] = 64, config.rows[t] = QK / 4;      /* weights: 32 terms */
    load_tile_config(&config);
}

struct ranking_job {
    atomic_int *failed;  /* set where a unit could not allocate its buffer */
    const int8_t *a;
    const float *dx;
    const int32_t *cs;
    const uint8_t *w;
    float *y;
    float *panel_max;  /* [M, panels]: each row's largest output of each panel */
    int64_t M, N, K, ldy, chunk;
    int kind;
};

static void run_ranking_unit(const void *arg, int64_t unit) {
    const struct ranking_job *j = (const struct ranking_job *)arg;
    const int64_t blocks = j->K / QK, panels = (j->N + NR - 1) / NR, full = j->N / NR, tiles = (j->M + 15) / 16;
    const int64_t p0 = unit * j->chunk, p1 = p0 + j->chunk < panels ? p0 + j->chunk : panels;
    const int64_t pbytes = realizar_fast_panel_bytes(j->kind, blocks);
    const int signed_bytes = (j->kind & FAST_KIND) == FAST_SIGNED_BYTES;
    const int64_t lines = pbytes / 64, ahead = (lines + tiles * blocks - 1) / (tiles * blocks);  /* lines a step */
    static __thread void *scratch;
    static __thread int64_t capacity;
    /* RANK_LAG + 1 steps' sums, each block's d times 256 and its integers */
    uint8_t *const buffer = thread_scratch(&scratch, &capacity, (RANK_LAG + 1) * 1024 + blocks * (64 + 8));
    if (!buffer) {
        atomic_store(j->failed, 1);
        return;
    }
    int32_t *const sums = (int32_t *)(void *)buffer;
    float *const d = (float *)(void *)(buffer + (RANK_LAG + 1) * 1024);
    const uint8_t **const ints = (const uint8_t **)(void *)(buffer + (RANK_LAG + 1) * 1024 + blocks * 64);
    configure_int8_tiles();
    for (int64_t p = p0; p < p1; p++) {
        realizar_fast_block_d(j->kind, j->w + p * pbytes, blocks, ints, d);
        for (int64_t b = 0; b < blocks; b++) _mm512_store_ps(d + 16 * b, _mm512_mul_ps(_mm512_load_ps(d + 16 * b),
                                                                                       _mm512_set1_ps(256.0f)));
        const int64_t outputs = p < full ? NR : j->N - p * NR;
        for (int64_t t = 0; t < tiles; t++) {
            const int8_t *const a = j->a + t * blocks * 16 * QK;
            const float *const dx = j->dx + t * blocks * 16;
            const int32_t *const cs = j->cs + t * blocks * 16;
            __m512 acc[16];
            for (int r = 0; r < 16; r++) acc[r] = _mm512_setzero_ps();
#define RANK_PRODUCT(AT, BT, CT, b)                                  \
    do {                                                             \
        _tile_loadd(AT, a + (b) * 16 * QK, QK);                      \
        _tile_loadd(BT, ints[b], 64);                                \
        _tile_zero(CT);                                              \
        if (signed_bytes) _tile_dpbssd(CT, AT, BT);                  \
        else _tile_dpbsud(CT, AT, BT);                               \
    } while (0)
#define RANK_SCALE(b)                                                                                        \
    do {                                                                                                     \
        const __m512 db = _mm512_load_ps(d + 16 * (b));                                                      \
        const int32_t *const s = sums + 256 * ((b) % (RANK_LAG + 1));                                        \
        for (int r = 0; r < 16; r++)                                                                         \
            acc[r] = _mm512_fmadd_ps(                                                                        \
                _mm512_mul_ps(_mm512_set1_ps(dx[16 * (b) + r]), db),                                         \
                _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_load_si512(s + 16 * r),                            \
                                                    _mm512_set1_epi32(cs[16 * (b) + r]))),                   \
                acc[r]);                                                                                     \
    } while (0)
            /* step b: its product, the scaling of step b - RANK_LAG's sums, then its own sums' store; and a few
             * lines of the next panel's records asked for (the weights stream from memory once: without, the head
             * above took 5.8-7.3 ms where it took 5.1-5.5, alternated in one process on a slow VM) */
            for (int64_t b = 0; b < blocks; b++) {
                if (p + 1 < p1)
                    for (int64_t l = (t * blocks + b) * ahead; l < (t * blocks + b + 1) * ahead && l < lines; l++)
                        _mm_prefetch((const char *)(j->w + (p + 1) * pbytes + 64 * l), _MM_HINT_T0);
                if (b & 1) RANK_PRODUCT(3, 5, 1, b);
                else RANK_PRODUCT(2, 4, 0, b);
                if (b >= RANK_LAG) RANK_SCALE(b - RANK_LAG);
                if (b & 1) _tile_stored(1, sums + 256 * (b % (RANK_LAG + 1)), 64);
                else _tile_stored(0, sums + 256 * (b % (RANK_LAG + 1)), 64);
            }
            for (int64_t b = blocks - RANK_LAG > 0 ? blocks - RANK_LAG : 0; b < blocks; b++) RANK_SCALE(b);
#undef RANK_PRODUCT
#undef RANK_SCALE
            for (int64_t r = 0; r < 16 && 16 * t + r < j->M; r++) {
                f32x16 v;
                memcpy(&v, &acc[r], sizeof v);
                put_coarse(j->y + (16 * t + r) * j->ldy + p * NR, j->panel_max + (16 * t + r) * panels + p, v, outputs);
            }
        }
    }
    _mm_sfence();  /* the streamed outputs before the unit counts as done */
    _tile_release();
}

int realizar_tile_ranking(const int8_t *a, const float *dx, const int32_t *cs, const uint8_t *w, int kind, float *y,
                          int64_t ldy, int64_t M, int64_t N, int64_t K, float *panel_max) {
    const int64_t panels = (N + NR - 1) / NR, units = 8 * realizar_threads();
    atomic_int failed = 0;
    const struct ranking_job j = {.failed = &failed, .a = a, .dx = dx, .cs = cs, .w = w, .y = y, .panel_max = panel_max,
                                  .M = M, .N = N, .K = K, .ldy = ldy, .chunk = (panels + units - 1) / units,
                                  .kind = kind};
    realizar_parallel(run_ranking_unit, &j, (panels + j.chunk - 1) / j.chunk);
    return atomic_load(&failed) ? -1 : 0;
}
#else
int realizar_tile_ranks(int kind, int64_t M) {
    (void)kind, (void)M;
    return 0;
}

int realizar_tile_ranking(const int8_t *a, const float *dx, const int32_t *cs, const uint8_t *w, int kind, float *y,
                          int64_t ldy, int64_t M, int64_t N, int64_t K, float *panel_max) {
    (void)a, (void)dx, (void)cs, (void)w, (void)kind, (void)y, (void)ldy, (void)M, (void)N, (void)K, (void)panel_max;
    return 1;
}
#endif
