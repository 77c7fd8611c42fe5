/* Top-1 prompt logprob entries on CPU, float32: per row of logits, the target token's logprob and rank and
 * the greedy token's id and logprob, in two passes over the row while it is in cache (torch takes six:
 * logsumexp's max, exp and sum, max with indices, the compare and its sum). Rows are spread over OpenMP
 * threads (torch's own libgomp); compiled by kernels/native.py for the ISA torch runs with.
 *
 *   logits  [R, V] float32, rows `ld` floats apart
 *   targets [R] int64 in [0, V)
 *   vals    [R, 2]: the target's logprob, then the greedy token's
 *   ids     [R, 2]: the target, then the greedy token (the first index of the maximum, as torch.max)
 *   ranks   [R]: 1 + the number of other tokens whose logit is >= the target's (at least 1)
 *   returns the number of rows whose maximum or exp-sum is not finite (NaN / inf logits): the caller then
 *   takes the torch path, whose semantics for those it keeps. Finiteness is read from the bits, which
 *   -ffast-math cannot assume away.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline int finite_bits(float x)
{
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return (b & 0x7f800000u) != 0x7f800000u;
}

int64_t logprob_rows(const float *restrict logits, int64_t R, int64_t V, int64_t ld, const int64_t *restrict targets,
                     float *restrict vals, int64_t *restrict ids, int64_t *restrict ranks, int threads)
{
    int64_t bad = 0;
#pragma omp parallel for num_threads(threads) schedule(static) reduction(+ : bad)
    for (int64_t r = 0; r < R; r++) {
        const float *x = logits + r * ld;
        const int64_t t = targets[r];
        const float c = x[t];
        float m = x[0];
        int64_t ge = 0;
        for (int64_t j = 0; j < V; j++) {
            m = x[j] > m ? x[j] : m;
            ge += x[j] >= c;
        }
        int64_t arg = 0;
        while (arg < V - 1 && x[arg] != m)
            arg++;
        float s = 0.0f;
        for (int64_t j = 0; j < V; j++)
            s += expf(x[j] - m);
        if (!finite_bits(m) || !finite_bits(s)) {
            bad++;
            continue;
        }
        const float lse = m + logf(s);
        vals[2 * r] = c - lse;
        vals[2 * r + 1] = m - lse;
        ids[2 * r] = t;
        ids[2 * r + 1] = arg;
        ranks[r] = ge;
    }
    return bad;
}
