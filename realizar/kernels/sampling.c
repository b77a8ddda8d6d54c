/* Drawing tokens from softmax(logits / temperature) without sorting or materializing the
 * distribution: per row, the largest logit, the normalizer sum_i exp((x_i - max) / t), then
 * a walk along the vocabulary until the running mass passes u * normalizer. This is inverse
 * CDF sampling in vocabulary order, exactly what sampling.py's torch path does; rows run in
 * parallel on the thread pool. Tokens whose logit is -inf (banned) get probability 0.
 */
#include <math.h>
#include <stdint.h>

#include "cpu_kernels.h"

struct draw {
    const float *logits;
    const int64_t *rows;
    const float *temperatures, *uniforms;
    int64_t *out;
    int64_t ld, vocab;
};

static inline v8 weights8(const float *x, float top, float inv_t) {
    const v8 v = load8(x);
    const vi8 live = v > -INFINITY;
    return (v8)((vi8)exp8_nonpositive((v - top) * inv_t) & live);
}

static inline float weight1(float x, float top, float inv_t) {
    return x > -INFINITY ? exp_nonpositive((x - top) * inv_t) : 0.0f;
}

static void draw_row(const void *arg, int64_t r) {
    const struct draw *d = arg;
    const float *x = d->logits + d->rows[r] * d->ld;
    const int64_t V = d->vocab;
    const float inv_t = 1.0f / d->temperatures[r];
    float top = -INFINITY;
    for (int64_t i = 0; i < V; i++) top = x[i] > top ? x[i] : top;
    if (top == -INFINITY) {  /* every token banned: nothing to draw, keep the first */
        d->out[r] = 0;
        return;
    }
    v8 acc = {0};
    int64_t i = 0;
    for (; i + 8 <= V; i += 8) acc += weights8(x + i, top, inv_t);
    float total = sum8(acc);
    for (; i < V; i++) total += weight1(x[i], top, inv_t);

    const float target = d->uniforms[r] * total;
    float mass = 0.0f;
    int64_t chosen = -1, last_live = 0;
    for (i = 0; i + 8 <= V && chosen < 0; i += 8) {
        const v8 w = weights8(x + i, top, inv_t);
        const float block = sum8(w);
        if (mass + block <= target) {  /* the draw lies further on */
            mass += block;
            for (int j = 0; j < 8; j++) last_live = w[j] > 0.0f ? i + j : last_live;
            continue;
        }
        for (int j = 0; j < 8 && chosen < 0; j++) {
            mass += w[j];
            if (w[j] > 0.0f) last_live = i + j;
            if (mass > target) chosen = i + j;
        }
    }
    for (; i < V && chosen < 0; i++) {
        const float w = weight1(x[i], top, inv_t);
        mass += w;
        if (w > 0.0f) last_live = i;
        if (mass > target) chosen = i;
    }
    d->out[r] = chosen >= 0 ? chosen : last_live;  /* rounding can leave the mass a hair short */
}

/* out[r] = a token drawn from softmax(logits[rows[r]] / temperatures[r]) with the uniform
 * number uniforms[r] in [0, 1); logits rows are ld floats apart. */
void realizar_sample(const float *logits, int64_t ld, int64_t vocab, const int64_t *rows,
                     const float *temperatures, const float *uniforms, int64_t *out, int64_t n) {
    const struct draw d = {.logits = logits, .rows = rows, .temperatures = temperatures,
                           .uniforms = uniforms, .out = out, .ld = ld, .vocab = vocab};
    realizar_parallel(draw_row, &d, n);
}
