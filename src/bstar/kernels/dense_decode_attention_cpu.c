/* Dense decode attention on CPU, float32: each row's query heads against that row's own keys.
 *
 * The own part of the cascade decode path (kernels/cascade_attention.py): every row holds its keys
 * and values contiguously, token-major ([L, H, D] per row, rows `row_stride` floats apart), and has
 * G query heads per KV head (GQA). One pass over each row's K and V in blocks of BLOCK tokens with
 * an online softmax, all of the row's heads together, so the row's memory is read front to back
 * once; rows are spread over OpenMP threads (torch's own libgomp, loaded first). ATen's flash
 * kernel does the same work as small GEMMs per (row, head) and reads the strided K/V at a third
 * of the memory bandwidth; compiled by kernels/native.py for the ISA torch runs with.
 *
 *   q    [B, H*G, D] contiguous (the G query heads of KV head h are h*G .. h*G+G-1)
 *   k, v key l of row b, head h at k + b*row_stride + l*tok_stride + h*head_stride (D contiguous)
 *   lens [B] keys per row, clamped to [0, L] (NULL: every row has L)
 *   out  [B, H*G, D], lse [B, H*G] (natural log of the softmax denominator; a row with no keys
 *        gets out 0 and lse -inf)
 */
#include <math.h>
#include <stdint.h>

#define BLOCK 32
#define MAX_HEADS 64 /* query heads per row; the caller checks H*G <= MAX_HEADS and D <= MAX_DIM */
#define MAX_DIM 256

static inline __attribute__((always_inline)) void attend_row(
    const float *restrict q, const float *restrict k, const float *restrict v, float *restrict out,
    float *restrict lse, int64_t len, int64_t tok_stride, int64_t head_stride, int H, int G, int D,
    float scale)
{
    float acc[MAX_HEADS * MAX_DIM];
    float m[MAX_HEADS], z[MAX_HEADS], s[MAX_HEADS][BLOCK];
    const int HG = H * G;
    for (int i = 0; i < HG; i++) {
        m[i] = -1e30f; /* finite: compiled with -ffast-math */
        z[i] = 0.f;
    }
    for (int i = 0; i < HG * D; i++) acc[i] = 0.f;
    for (int64_t l0 = 0; l0 < len; l0 += BLOCK) {
        const int n = (int)(len - l0 < BLOCK ? len - l0 : BLOCK);
        /* scores of the block's keys */
        for (int j = 0; j < n; j++) {
            const float *kj = k + (l0 + j) * tok_stride;
            for (int h = 0; h < H; h++) {
                const float *kh = kj + h * head_stride;
                for (int g = 0; g < G; g++) {
                    const float *qi = q + (h * G + g) * D;
                    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
                    for (int d = 0; d < D; d++) dot += qi[d] * kh[d];
                    s[h * G + g][j] = dot * scale;
                }
            }
        }
        /* online softmax: new running max, rescale what was accumulated, probabilities in place */
        for (int i = 0; i < HG; i++) {
            float mb = m[i];
            for (int j = 0; j < n; j++) mb = s[i][j] > mb ? s[i][j] : mb;
            const float corr = expf(m[i] - mb);
            float sum = 0.f;
#pragma omp simd reduction(+ : sum)
            for (int j = 0; j < n; j++) {
                const float p = expf(s[i][j] - mb);
                s[i][j] = p;
                sum += p;
            }
            m[i] = mb;
            z[i] = z[i] * corr + sum;
            float *a = acc + i * D;
#pragma omp simd
            for (int d = 0; d < D; d++) a[d] *= corr;
        }
        /* values */
        for (int j = 0; j < n; j++) {
            const float *vj = v + (l0 + j) * tok_stride;
            for (int h = 0; h < H; h++) {
                const float *vh = vj + h * head_stride;
                for (int g = 0; g < G; g++) {
                    const float p = s[h * G + g][j];
                    float *a = acc + (h * G + g) * D;
#pragma omp simd
                    for (int d = 0; d < D; d++) a[d] += p * vh[d];
                }
            }
        }
    }
    for (int i = 0; i < HG; i++) {
        if (len <= 0) {
            for (int d = 0; d < D; d++) out[i * D + d] = 0.f;
            lse[i] = -INFINITY;
            continue;
        }
        const float inv = 1.f / z[i];
        for (int d = 0; d < D; d++) out[i * D + d] = acc[i * D + d] * inv;
        lse[i] = m[i] + logf(z[i]);
    }
}

/* The common head dims get their own copy of the row loop, with D a constant the compiler unrolls. */
#define ROW(DIM) attend_row(qb, kb, vb, ob, lb, len, tok_stride, head_stride, H, G, DIM, scale)

void dense_decode_attention(const float *q, const float *k, const float *v, float *out, float *lse,
                            const int64_t *lens, int64_t L, int64_t B, int H, int G, int D,
                            int64_t row_stride, int64_t tok_stride, int64_t head_stride, float scale,
                            int threads)
{
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < B; b++) {
        const int64_t len = lens ? (lens[b] < 0 ? 0 : lens[b] > L ? L : lens[b]) : L; /* never past L */
        const float *qb = q + b * H * G * D, *kb = k + b * row_stride, *vb = v + b * row_stride;
        float *ob = out + b * H * G * D, *lb = lse + b * H * G;
        switch (D) {
        case 32: ROW(32); break;
        case 64: ROW(64); break;
        case 128: ROW(128); break;
        default: ROW(D);
        }
    }
}
