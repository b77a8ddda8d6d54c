/* Prompt attention in tiles of query rows, float32 (called by paged_attention.c).
 *
 * The rows of a prefill chunk are consecutive tokens of one sequence: they share a block
 * table and attend to prefixes of it that grow by one token a row. Attending to them one row
 * at a time (paged_attention.c's decode path) reads the whole context once per row. Here a
 * tile of TILE such rows (16 with AVX-512, 8 elsewhere) and the query heads of one KV head go through the context's
 * keys and values once, flash-attention style:
 *
 *   for each run of up to STEP tokens of one cache block:
 *     s[t]   = scale q . k_t
 *     m'     = max(m, max_t s[t])       per (row, head)
 *     p[t]   = exp(s[t] - m')           masked to 0 where t is past the row's own length
 *     l      = l exp(m - m') + sum_t p[t]
 *     o      = o exp(m - m') + sum_t p[t] v_t
 *   out = o / l
 *
 * The (query head, row) pairs of the KV group and the tile are the lanes of vectors, in turn (cpu_kernels.h's
 * tile_lane: a 16-row tile of 3 heads fills 3 vectors, a 4-row one a single vector), so both products are
 * plain multiply-adds of a broadcast key or value element into a vector of pairs, the running max and sum
 * are lane-wise, and there are no horizontal sums. The online softmax sums in a
 * different order than a two-pass softmax; the results agree with torch's SDPA to float32
 * rounding (tests/unit/test_kernels.py).
 *
 * Register budget: with AVX-512 (32 vector registers) the vectors of pairs are done HEADS at a time, 3,
 * sharing each broadcast element; with 16 registers (AVX2, NEON) one at a
 * time, so that the 8 sums stay in registers. The code is the same, in GCC vector extensions. (Tiles of 16 rows
 * with AVX-512, against 8: a 512-token chunk at the start of a prompt 179-186 ms against 193-209, 1,536 tokens
 * into it 353-358 against 520-530; BENCHMARKS.md.)
 *
 * A float16 cache's block is converted to float32 once per tile and KV head (its 16 tokens' keys
 * and values: 2k conversions against the tile's 50k multiply-adds), and the float32 code runs on
 * that copy: the same results, bit for bit, as a float32 cache holding the rounded values. An int8
 * cache's block is dequantized the same way, each token's row times its scale.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "cpu_kernels.h"

/* One lane per row of a tile: 16 with AVX-512 (its 32 registers hold the same sums as 8-lane ones with AVX2's
 * 16), 8 elsewhere (cpu_kernels.h's TILE). */
#if TILE == 16
typedef f32x16 vr;
typedef i32x16 vir;
#else
typedef v8 vr;
typedef vi8 vir;
#endif
static inline vr loadr(const float *p) { vr x; memcpy(&x, p, sizeof x); return x; }
static inline void storer(float *p, vr x) { memcpy(p, &x, sizeof x); }
EXP_NONPOSITIVE(expr_nonpositive, vr, vir)  /* exp8_nonpositive (cpu_kernels.h) of a tile's lanes */

#ifdef HEADS  /* set on the command line: for tests of each variant */
#elif defined(__AVX512VL__)
#define HEADS 3  /* vectors of pairs that share one pass: 3 x 8 sums + 3 queries + 1 broadcast */
#else
#define HEADS 1  /* 8 sums + 1 query + 1 broadcast of 16 registers */
#endif
#define TK 8      /* keys per score pass: 8 sums per head */
#define CC 8      /* value columns per pass: 8 sums per head */
/* The keys and values of the block AHEAD blocks on are prefetched into L2, not L1, where they
 * evicted the tile's own queries and sums, and a few lines per value pass, not all at once,
 * which filled the queue of misses (A/B at 8k context, 1 thread, AVX-512 build: 233 ms all at
 * once into L1, 196 into L2, 156-180 spread; 237 without). */
#define AHEAD 2
#define STEP 16   /* tokens per online-softmax update (at most one cache block) */

static inline vr vmax(vr a, vr b) {
    const vir above = a > b;
    return (vr)(((vir)a & above) | ((vir)b & ~above));
}

/* s[j][t] = scale sum_i k_t[i] qt[j][i] for NH heads and TK keys; qt[j] is [hd][8] (row lanes),
 * key t's row at k[t]. The sum runs in pieces of SPAN terms, added at the end, so that no
 * chain of roundings is longer than SPAN (float32 sums of 64 or 128 terms in one chain drift
 * from torch's blocked sums by several ulp). */
#define SPAN 16
static inline __attribute__((always_inline)) void tile_scores(const int NH, const float *qt, const float *const k[TK],
                                                              int64_t hd, float scale, vr s[][STEP], int t0) {
    vr total[HEADS][TK];
    for (int j = 0; j < NH; j++)
        for (int t = 0; t < TK; t++) total[j][t] = (vr){0};
    for (int64_t i0 = 0; i0 < hd; i0 += SPAN) {
        vr acc[HEADS][TK];
        for (int j = 0; j < NH; j++)
            for (int t = 0; t < TK; t++) acc[j][t] = (vr){0};
        const int64_t end = i0 + SPAN < hd ? i0 + SPAN : hd;
        for (int64_t i = i0; i < end; i++) {
            vr q[HEADS];
            for (int j = 0; j < NH; j++) q[j] = loadr(qt + (j * hd + i) * TILE);
            for (int t = 0; t < TK; t++) {
                const float x = k[t][i];
                for (int j = 0; j < NH; j++) acc[j][t] += x * q[j];
            }
        }
        for (int j = 0; j < NH; j++)
            for (int t = 0; t < TK; t++) total[j][t] += acc[j][t];
    }
    for (int j = 0; j < NH; j++)
        for (int t = 0; t < TK; t++) s[j][t0 + t] = scale * total[j][t];
}

/* o[j][c + u] = alpha[j] o[j][c + u] + sum_t p[j][t] v_t[c + u], u < W, for NH heads; o[j] is
 * [hd][8] (row lanes), value t's row at v + t * hd. */
static inline __attribute__((always_inline)) void tile_values(const int NH, const int W, const vr p[][STEP], int nt,
                                                              const float *v, int64_t hd, const vr *alpha,
                                                              float *o, int64_t c) {
    vr acc[HEADS][CC];
    for (int j = 0; j < NH; j++)
        for (int u = 0; u < W; u++) acc[j][u] = loadr(o + (j * hd + c + u) * TILE) * alpha[j];
    for (int t = 0; t < nt; t++) {
        vr w[HEADS];
        for (int j = 0; j < NH; j++) w[j] = p[j][t];
        const float *x = v + t * hd + c;
        for (int u = 0; u < W; u++)
            for (int j = 0; j < NH; j++) acc[j][u] += x[u] * w[j];
    }
    for (int j = 0; j < NH; j++)
        for (int u = 0; u < W; u++) storer(o + (j * hd + c + u) * TILE, acc[j][u]);
}

/* One update of NH heads' running (m, l, o) by the nt tokens t0.. of one block, whose keys
 * and values are rows hd apart at k and v. Lanes whose length `lens` is at or below a token
 * get no weight from it (only when `masked`: some lane ends inside this run). The same rows
 * AHEAD blocks on, `ahead_bytes` at ak and av (NULL: none), are prefetched a few lines per
 * value pass. */
static inline __attribute__((always_inline)) void tile_step(const int NH, const float *qt, const float *k,
                                                            const float *v, int nt, int64_t t0, int masked,
                                                            const vir *lens, int64_t hd, float scale, float *o, vr *m,
                                                            vr *l, const char *ak, const char *av, int64_t ahead_bytes) {
    vr s[HEADS][STEP];
    for (int t = 0; t < nt; t += TK) {
        const float *rows[TK];  /* past nt: the last key again, masked below */
        for (int u = 0; u < TK; u++) rows[u] = k + (t + u < nt ? t + u : nt - 1) * hd;
        tile_scores(NH, qt, rows, hd, scale, s, t);
    }
    vr alpha[HEADS];
    for (int j = 0; j < NH; j++) {
        if (masked) {
            const vr minus_inf = (vr){0} - INFINITY;
            for (int t = 0; t < nt; t++) {
                const vir live = (vir){0} + (int32_t)(t0 + t) < lens[j];
                s[j][t] = (vr)(((vir)s[j][t] & live) | ((vir)minus_inf & ~live));
            }
        }
        vr top = s[j][0];
        for (int t = 1; t < nt; t++) top = vmax(top, s[j][t]);
        const vr next = vmax(m[j], top);  /* finite: every lane sees the part's first token in its first step */
        alpha[j] = expr_nonpositive(m[j] - next);
        vr sum = {0};
        for (int t = 0; t < nt; t++) {
            vr e = expr_nonpositive(s[j][t] - next);
            if (masked) e = (vr)((vir)e & ((vir){0} + (int32_t)(t0 + t) < lens[j]));  /* exp(-inf) is 0 */
            s[j][t] = e;
            sum += e;
        }
        l[j] = l[j] * alpha[j] + sum;
        m[j] = next;
    }
    const int64_t passes = hd / CC, span = ahead_bytes;
    int64_t c = 0;
    for (int64_t pass = 0; c + CC <= hd; c += CC, pass++) {
        if (ak)  /* lines [pass, pass + 1) * span / passes of each run, 64 bytes apart */
            for (int64_t i = pass * span / passes / 64 * 64; i < (pass + 1) * span / passes; i += 64) {
                __builtin_prefetch(ak + i, 0, 2);
                __builtin_prefetch(av + i, 0, 2);
            }
        tile_values(NH, CC, s, nt, v, hd, alpha, o, c);
    }
    for (; c < hd; c++) tile_values(NH, 1, s, nt, v, hd, alpha, o, c);
}

static void tile_steps(int64_t nh, const float *qt, const float *k, const float *v, int nt, int64_t t0,
                       int masked, const vir *lens, int64_t hd, float scale, float *o, vr *m, vr *l,
                       const char *ak, const char *av, int64_t ahead_bytes) {
    for (int64_t j = 0; j < nh; j += HEADS) {
        const int64_t n = nh - j < HEADS ? nh - j : HEADS;
        const float *q = qt + j * hd * TILE;
        float *oj = o + j * hd * TILE;
        if (HEADS >= 3 && n == 3)
            tile_step(HEADS >= 3 ? 3 : 1, q, k, v, nt, t0, masked, lens + j, hd, scale, oj, m + j, l + j, ak, av,
                      ahead_bytes);
        else if (HEADS >= 2 && n == 2)
            tile_step(HEADS >= 2 ? 2 : 1, q, k, v, nt, t0, masked, lens + j, hd, scale, oj, m + j, l + j, ak, av,
                      ahead_bytes);
        else
            tile_step(1, q, k, v, nt, t0, masked, lens + j, hd, scale, oj, m + j, l + j, ak, av, ahead_bytes);
        ak = av = NULL;  /* once per step */
    }
}

/* A tile's rows row0 .. row0 + rows - 1 (rows <= TILE) of one block table, with context lengths that may differ per
 * row, over KV head `g`: every query head of g's group, over the tokens [begin, end) of their context (begin a
 * multiple of the block size, below every row's length, so that each lane sees its first token). */
void realizar_attend_tile(const struct paged_attention *A, const struct attention_unit *unit) {
    const struct attention_tile *tile = A->tiles + unit->item;
    const int64_t row0 = tile->first, rows = tile->rows, g = unit->g, begin = unit->begin, end = unit->end;
    const int64_t group = A->group, hd = A->hd, bs = A->bs;
    static __thread void *scratch;
    static __thread int64_t capacity;
    const int64_t pairs = group * rows, nv = tile_vectors(group, rows);  /* cpu_kernels.h's tile_lane */
    const int64_t need = 2 * nv * hd * TILE + 3 * nv * TILE + (A->kv != KV_FLOAT32 ? 2 * bs * hd : 0);
    float *const buffer = thread_scratch(&scratch, &capacity, need * (int64_t)sizeof(float));
    if (!buffer) {
        atomic_store(&((struct paged_attention *)A)->failed, 1);
        return;
    }
    float *const qt = buffer, *const o = buffer + nv * hd * TILE;  /* [nv][hd][TILE] each */
    vr *const m = (vr *)(void *)(o + nv * hd * TILE), *const l = m + nv;
    vir *const lens = (vir *)(void *)(l + nv);                          /* each lane's context length */
    float *const kf = (float *)(void *)(lens + nv), *const vf = kf + bs * hd;  /* a float16 or int8 block as float32 */

    const int64_t shortest = tile->shortest;
    for (int64_t lane = 0; lane < nv * TILE; lane++) {  /* lanes past the pairs repeat the last pair */
        const int64_t pair = lane < pairs ? lane : pairs - 1, h = g * group + pair / rows, u = pair % rows;
        for (int64_t i = 0; i < hd; i++)
            qt[tile_lane(lane, i, hd)] = A->q_all[(row0 + u) * A->q_stride + h * hd + i];
        ((int32_t *)(void *)lens)[lane] = (int32_t)A->context_lens[row0 + u];
    }
    for (int64_t j = 0; j < nv; j++) {
        m[j] = (vr){0} - INFINITY;
        l[j] = (vr){0};
    }
    memset(o, 0, sizeof(float) * (size_t)(nv * hd * TILE));

    const int64_t *table = A->block_tables + A->row_tables[row0] * A->max_blocks;
    const int64_t element = kv_bytes(A->kv);
    for (int64_t t0 = begin, blk = begin / bs; t0 < end; t0 += bs, blk++) {
        const int64_t at = (table[blk] * A->kv_heads + g) * bs * hd;
        const float *kb, *vb;
        if (A->kv == KV_INT8) {
            const int64_t count = end - t0 < bs ? end - t0 : bs, first = at / hd;  /* the block's first row */
            const int8_t *kq = (const int8_t *)A->key_cache + at, *vq = (const int8_t *)A->value_cache + at;
            for (int64_t u = 0; u < count; u++) {
                const float ks = A->key_scales[first + u], vs = A->value_scales[first + u];
                for (int64_t i = u * hd; i < (u + 1) * hd; i++) {
                    kf[i] = ks * (float)kq[i];
                    vf[i] = vs * (float)vq[i];
                }
            }
            kb = kf;
            vb = vf;
        } else if (A->kv == KV_FLOAT16) {
            const int64_t count = (end - t0 < bs ? end - t0 : bs) * hd;
            const _Float16 *kh = (const _Float16 *)A->key_cache + at, *vh = (const _Float16 *)A->value_cache + at;
            int64_t i = 0;
            for (; i + 8 <= count; i += 8) {
                store8(kf + i, load8h(kh + i));
                store8(vf + i, load8h(vh + i));
            }
            for (; i < count; i++) {
                kf[i] = (float)kh[i];
                vf[i] = (float)vh[i];
            }
            kb = kf;
            vb = vf;
        } else {
            kb = (const float *)A->key_cache + at;
            vb = (const float *)A->value_cache + at;
        }
        const char *ak = NULL, *av = NULL;  /* scattered blocks, which no hardware prefetcher can follow */
        if (t0 + AHEAD * bs < end) {
            const int64_t ahead = (table[blk + AHEAD] * A->kv_heads + g) * bs * hd * element;
            ak = (const char *)A->key_cache + ahead;
            av = (const char *)A->value_cache + ahead;
        }
        for (int64_t off = 0; off < bs && t0 + off < end; off += STEP) {
            int64_t nt = bs - off < STEP ? bs - off : STEP;
            nt = end - (t0 + off) < nt ? end - (t0 + off) : nt;
            tile_steps(nv, qt, kb + off * hd, vb + off * hd, (int)nt, t0 + off, t0 + off + nt > shortest, lens, hd,
                       A->scale, o, m, l, ak ? ak + off * hd * element : NULL, av ? av + off * hd * element : NULL,
                       nt * hd * element);
        }
    }
    if (unit->partial) {  /* one part of a split context: paged_attention.c merges the parts */
        memcpy(unit->partial, o, sizeof(float) * (size_t)(nv * hd * TILE));
        memcpy(unit->partial + nv * hd * TILE, m, sizeof(float) * (size_t)(2 * nv * TILE));  /* m, then l */
        return;
    }
    const float *const sums = (const float *)(void *)l;
    for (int64_t pair = 0; pair < pairs; pair++) {
        const int64_t h = g * group + pair / rows, u = pair % rows;
        float *y = A->out_all + (row0 + u) * A->heads * hd + h * hd;
        for (int64_t c = 0; c < hd; c++) y[c] = o[tile_lane(pair, c, hd)] / sums[pair];
    }
}
