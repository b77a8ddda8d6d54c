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
    for (i = 0; i + 8 <= V; i += 8) {
        const v8 w = weights8(x + i, top, inv_t);
        const float block = sum8(w);
        if (mass + block <= target) {  /* the draw lies further on */
            mass += block;
            continue;
        }
        for (int j = 0; j < 8; j++) {
            mass += w[j];
            if (mass > target) {
                d->out[r] = i + j;
                return;
            }
        }
    }
    for (; i < V; i++) {
        mass += weight1(x[i], top, inv_t);
        if (mass > target) {
            d->out[r] = i;
            return;
        }
    }
    /* rounding left the mass a hair short of the draw: the last token that can be drawn */
    for (i = V - 1; i > 0 && !(x[i] > -INFINITY); i--) continue;
    d->out[r] = i;
}

/* out[r] = a token drawn from softmax(logits[rows[r]] / temperatures[r]) with the uniform
 * number uniforms[r] in [0, 1); logits rows are ld floats apart. */
void realizar_sample(const float *logits, int64_t ld, int64_t vocab, const int64_t *rows,
                     const float *temperatures, const float *uniforms, int64_t *out, int64_t n) {
    const struct draw d = {.logits = logits, .rows = rows, .temperatures = temperatures,
                           .uniforms = uniforms, .out = out, .ld = ld, .vocab = vocab};
    realizar_parallel(draw_row, &d, n);
}
