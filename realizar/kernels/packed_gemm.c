/* Matrix products over weights packed once, for the CPU engine's linear layers, float32.
 *
 *   y[M, N] = x[M, K] W^T        W [N, K], as in torch's Linear
 *
 * A general BLAS sgemm repacks the weight into cache-sized panels on every call. At the
 * row counts a decode step produces (one row per running sequence, 1 to 64) that repacking
 * costs about as much as the arithmetic. Here the weight is packed once, at load time, into
 * panels of 16 output columns: panel p holds W[16p : 16p + 16, :] transposed, k-major,
 *
 *   packed[p][k][j] = W[16p + j, k]        (zero where 16p + j >= N)
 *
 * so a panel is one contiguous stream of K * 16 floats. x is packed too, per call, into
 * tiles of 6 rows stored k-major. The micro-kernel keeps twelve 8-wide accumulators of y
 * (6 rows by 1 panel, 2 by 3 or 1 by 6) and, for each k, multiplies slices of the panels by
 * broadcast x values. Each panel is read from memory once per block of MC rows of x, while
 * the tiles prefetch the next panels, and from cache for every further tile.
 *
 * The work is split into units (a block of rows times a chunk of panels) that the thread
 * pool hands out (thread_pool.c).
 */
#include <stdint.h>
#include <stdlib.h>

#include "cpu_kernels.h"

#define NR 16          /* output columns per panel */
#define MR 6           /* rows of x per micro-tile */
#define MC 96          /* rows of x per block: the block stays in L2 */
#define KC_MAX 768     /* longer sums are split into equal passes of at most this many terms */

/* y[r, 16g : 16g + 16] (+)= sum_k a[k * MR + r] * panel_g[k, 0:16], for r < R rows and
 * g < G panels (both constants after inlining, R * G <= 6: twelve 8-wide accumulators).
 * Panel g starts at panel + g * pstride; `a` holds the rows of x k-major, MR values per k.
 * Several panels at once are several memory streams, which a core fetches faster than one.
 * Every y value is one chain of multiply-adds in k order, whatever R and G are. */
static inline __attribute__((always_inline)) void tile(const int R, const int G, const int spread, int64_t K,
                                                       const float *a, const float *panel,
                                                       int64_t pstride, float *y, int64_t ldy,
                                                       int64_t cols, int accumulate,
                                                       const float *prefetch, int64_t prefetch_lines) {
    v8 acc[12];
    for (int i = 0; i < R * G * 2; i++) acc[i] = (v8){0};
    /* one line every 2^shift terms: spread over the whole sum, or all at once at its start */
    const int shift = !spread ? 0 : K >= 8 * prefetch_lines ? 3 : K >= 4 * prefetch_lines ? 2 : K >= 2 * prefetch_lines;
    const int64_t every = ((int64_t)1 << shift) - 1;
#pragma GCC unroll 4
    for (int64_t k = 0; k < K; k++) {
        v8 b[12];
        if (!(k & every) && (k >> shift) < prefetch_lines) __builtin_prefetch(prefetch + (k >> shift) * NR);
        for (int g = 0; g < G; g++) {
            b[2 * g] = load8(panel + g * pstride + k * NR);
            b[2 * g + 1] = load8(panel + g * pstride + k * NR + 8);
        }
        for (int r = 0; r < R; r++) {
            const float x = a[k * MR + r];
            for (int i = 0; i < 2 * G; i++) acc[r * 2 * G + i] += x * b[i];
        }
    }
    for (int r = 0; r < R; r++) {
        for (int g = 0; g < G; g++) {
            float *dst = y + r * ldy + g * NR;
            store_panel(dst, acc[r * 2 * G + 2 * g], acc[r * 2 * G + 2 * g + 1], cols, accumulate);
        }
    }
}

/* Where the tiles of one panel group prefetch the next group's weights: `lines` cache lines
 * from `next`, `per_row` of them for each row of x a tile covers, so that the next group
 * arrives from memory while this one is multiplied, at a pace the core can fetch. With few
 * tiles per group (`spread`: tiles of one panel, 16 rows or fewer) each tile spreads its lines over its whole
 * sum; a burst at its start would ask for more lines at once than the core can have in
 * flight (16 rows: 11 % faster). With many tiles, bursts measure faster (64 rows: 10 %). */
struct prefetch {
    const float *next;
    int64_t lines, per_row, done;
    int spread;
};

/* Rows [0, rows) of one packed tile of x (rows <= MR) against G panels: the widest tiles
 * that fit, then the rest. */
static void strip(int64_t rows, int G, int64_t K, const float *a, const float *panel, int64_t pstride,
                  float *y, int64_t ldy, int64_t cols, int acc, struct prefetch *pf) {
#define T_(R, G_, S)                                                                            \
    do {                                                                                        \
        const int64_t n = pf->lines - pf->done < (R) * pf->per_row ? pf->lines - pf->done : (R) * pf->per_row; \
        tile(R, G_, S, K, a + r, panel, pstride, y + r * ldy, ldy, cols, acc, pf->next + pf->done * NR, n); \
        pf->done += n;                                                                          \
    } while (0)
#define T(R, G_) T_(R, G_, 0)
#define T1(R)                           \
    do {                                \
        if (pf->spread) T_(R, 1, 1);    \
        else T_(R, 1, 0);               \
    } while (0)
    int64_t r = 0;
    switch (G) {
        case 6:
            for (; r < rows; r++) T(1, 6);
            break;
        case 3:
            for (; r + 2 <= rows; r += 2) T(2, 3);
            if (r < rows) T(1, 3);
            break;
        default:
            switch (rows) {
                case 6: T1(6); break;
                case 5: T1(5); break;
                case 4: T1(4); break;
                case 3: T1(3); break;
                case 2: T1(2); break;
                case 1: T1(1); break;
                default: break;
            }
    }
#undef T1
#undef T
#undef T_
}

struct job {
    const float *a, *packed;  /* x packed in MR-row tiles; the packed weight */
    float *y;
    int64_t M, N, K;
    int group;                /* panels per tile */
    int64_t chunk;            /* panels per unit of work, a multiple of group */
};

/* One unit of work: the panels of one chunk for the rows of one MC-row block, KC terms of
 * the sums at a time. K is blocked the same way for every M, so a row's result does not
 * depend on how many rows come with it. */
static void run_unit(const void *arg, int64_t unit) {
    const struct job *j = arg;
    const int64_t K = j->K, panels = (j->N + NR - 1) / NR, full = j->N / NR;
    const int64_t chunks = (panels + j->chunk - 1) / j->chunk;
    const int64_t m0 = unit / chunks * MC, p0 = unit % chunks * j->chunk;
    const int64_t m1 = j->M - m0 < MC ? j->M : m0 + MC, p1 = panels - p0 < j->chunk ? panels : p0 + j->chunk;
    const int64_t kc_max = K <= KC_MAX ? K : (K + (K + KC_MAX - 1) / KC_MAX - 1) / ((K + KC_MAX - 1) / KC_MAX);
    for (int64_t k0 = 0; k0 < K; k0 += kc_max) {
        const int64_t kc = K - k0 < kc_max ? K - k0 : kc_max;
        for (int64_t p = p0; p < p1;) {
            const int G = p + j->group <= (p1 < full ? p1 : full) ? j->group : 1;
            const int64_t cols = p < full ? NR : j->N - p * NR;
            const float *panel = j->packed + p * K * NR + k0 * NR;
            /* the next group's panels (contiguous when the sums are not split); after the
             * chunk's last group, the first panel of the next pass over the sums, or after the
             * last pass, the first panel of the chunk this thread most likely takes next: units
             * are claimed in order, so about `threads` units on (16 rows: 3-13 % faster) */
            struct prefetch pf = {.next = panel + G * K * NR, .lines = G * kc, .spread = G == 1 && m1 - m0 <= 16};
            if (p + G >= p1 && k0 + kc < K) {
                pf.next = j->packed + p0 * K * NR + (k0 + kc) * NR;
                pf.lines = K - k0 - kc < kc_max ? K - k0 - kc : kc_max;
            } else if (p + G >= p1) {
                const int64_t ahead = unit % chunks + realizar_threads();
                pf.lines = 0;
                if (ahead < chunks) {
                    pf.next = j->packed + ahead * j->chunk * K * NR;
                    pf.lines = kc_max;
                }
            }
            pf.per_row = (pf.lines + (m1 - m0) - 1) / (m1 - m0);
            for (int64_t t = m0; t < m1; t += MR)
                strip(m1 - t < MR ? m1 - t : MR, G, kc, j->a + (t / MR) * K * MR + k0 * MR, panel, K * NR,
                      j->y + t * j->N + p * NR, j->N, cols, k0 > 0, &pf);
            p += G;
        }
    }
}

/* x [M, K] (row stride ldx) into MR-row tiles, k-major: a[t][k][r] = x[t * MR + r, k], zero past M. */
static void pack_x(const float *x, int64_t ldx, int64_t M, int64_t K, float *a) {
    for (int64_t t = 0; t * MR < M; t++, a += K * MR) {
        const int64_t rows = M - t * MR < MR ? M - t * MR : MR;
        for (int64_t r = 0; r < rows; r++) {
            const float *row = x + (t * MR + r) * ldx;
            for (int64_t k = 0; k < K; k++) a[k * MR + r] = row[k];
        }
        for (int64_t r = rows; r < MR; r++)
            for (int64_t k = 0; k < K; k++) a[k * MR + r] = 0.0f;
    }
}

/* y [M, N] = x [M, K] (row stride ldx) times the packed weight. Returns 0, or -1 when the
 * buffer for x could not be allocated. */
int realizar_gemm(const float *x, int64_t ldx, const float *packed, float *y, int64_t M, int64_t N, int64_t K) {
    static __thread void *scratch;  /* x packed, kept between calls of the calling thread */
    static __thread int64_t capacity;
    const int64_t panels = (N + NR - 1) / NR;
    float *const buffer = thread_scratch(&scratch, &capacity, (M + MR - 1) / MR * MR * K * (int64_t)sizeof(float));
    if (!buffer) return -1;
    pack_x(x, ldx, M, K, buffer);
    /* One row: six panels at a time (six memory streams). Up to 8 rows: tiles of 2 rows by 3
     * panels. More: 6 rows by 1 panel, which reuses each load of the weight the most. */
    const int group = M == 1 ? 6 : M <= 8 ? 3 : 1;
    const int64_t units_per_thread = 8;
    const int64_t threads = realizar_threads();
    int64_t chunk = (panels + units_per_thread * threads - 1) / (units_per_thread * threads);
    chunk = (chunk + group - 1) / group * group;
    const struct job j = {.a = buffer, .packed = packed, .y = y, .M = M, .N = N, .K = K,
                          .group = group, .chunk = chunk};
    realizar_parallel(run_unit, &j, (M + MC - 1) / MC * ((panels + chunk - 1) / chunk));
    return 0;
}

/* For quant_gemm.c, which multiplies by weights it dequantizes into panels of this layout
 * slice by slice: x packed as realizar_gemm packs it, and the rows of packed x times `group`
 * panels (1, 3 or 6; the panels full when more than one) holding terms k0 .. k0 + kc of the
 * sums, added to y when `accumulate`. The same tiles as realizar_gemm, without prefetching:
 * the panels were just written and are in cache. */
int64_t realizar_packed_x_floats(int64_t M, int64_t K) { return (M + MR - 1) / MR * MR * K; }

void realizar_pack_x(const float *x, int64_t ldx, int64_t M, int64_t K, float *a) { pack_x(x, ldx, M, K, a); }

void realizar_gemm_panels(const float *a, int64_t rows, int64_t K, int64_t k0, int64_t kc, const float *panels,
                          int64_t pstride, int group, int64_t cols, float *y, int64_t ldy, int accumulate) {
    struct prefetch pf = {.next = panels, .lines = 0, .per_row = 0, .done = 0, .spread = 0};
    for (int64_t t = 0; t < rows; t += MR)
        strip(rows - t < MR ? rows - t : MR, group, kc, a + (t / MR) * K * MR + k0 * MR, panels, pstride,
              y + t * ldy, ldy, cols, accumulate, &pf);
}
