/*
 * Batch-1 matrix-vector kernels for decoding: y[t, n] = sum_k x[t, k] * W[n, k].
 *
 * At batch 1 every weight is read once per token, so speed is bytes per token over memory
 * bandwidth. These kernels read the weights in their stored form (float32, bfloat16, or the
 * GGUF block formats Q8_0 / Q4_0 / Q4_1, 32 weights per block) and use both cores (OpenMP over
 * output rows). For the block formats the activations are first quantised to 8 bits per
 * 32-wide block (scale d_x = max|x| / 127), and each block's dot product runs on AVX-512 VNNI
 * (u8 x s8 -> s32; on AVX2 the same through avx2.h), then is scaled in float:
 *   Q8_0: w = d * q            block dot = d * d_x * sum(q * q_x)
 *   Q4_0: w = d * (q - 8)      block dot = d * (d_x * sum(q * q_x) - 8 * s_x)
 *   Q4_1: w = d * q + m        block dot = d * d_x * sum(q * q_x) + m * s_x
 * with s_x = d_x * sum(q_x). Layouts are those of ggml (little-endian, fp16 scales):
 *   Q8_0 block: d:f16, q:int8[32]                         (34 bytes)
 *   Q4_0 block: d:f16, q:uint8[16] (low nibbles: weights 0..15, high nibbles: 16..31)  (18 bytes)
 *   Q4_1 block: d:f16, m:f16, q:uint8[16] (same nibble order)                          (20 bytes)
 * Layers keep them repacked four blocks to a group (see "rows repacked for the kernel" below); the
 * ggml layout is read by the LM head's Q8_0 kernels.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

#define QK 32

/* x[T, K] float -> q[T, K] int8, d[T, K/32], s[T, K/32] (s = d * sum(q)). K % 32 == 0. */
void quantize_act_q8(const float *x, int T, int K, int8_t *q, float *d, float *s) {
    const int nb = K / QK;
    for (int t = 0; t < T; t++) {
        for (int b = 0; b < nb; b++) {
            const float *xb = x + (int64_t)t * K + b * QK;
            __m512 v0 = _mm512_loadu_ps(xb), v1 = _mm512_loadu_ps(xb + 16);
            __m512 a = _mm512_max_ps(_mm512_abs_ps(v0), _mm512_abs_ps(v1));
            float amax = _mm512_reduce_max_ps(a);
            /* vmaxps may drop a NaN: a block holding one gets a NaN scale, so every product with
             * it is NaN, as in float arithmetic */
            if (_mm512_cmp_ps_mask(v0, v1, _CMP_UNORD_Q)) amax = NAN;
            float db = amax / 127.0f;
            float id = db != 0.0f ? 1.0f / db : 0.0f;
            __m512 sc = _mm512_set1_ps(id);
            __m512i i0 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v0, sc), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            __m512i i1 = _mm512_cvt_roundps_epi32(_mm512_mul_ps(v1, sc), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            int8_t *qb = q + (int64_t)t * K + b * QK;
            _mm_storeu_si128((__m128i *)qb, _mm512_cvtsepi32_epi8(i0));
            _mm_storeu_si128((__m128i *)(qb + 16), _mm512_cvtsepi32_epi8(i1));
            int sum = _mm512_reduce_add_epi32(_mm512_add_epi32(i0, i1));
            d[(int64_t)t * nb + b] = db;
            s[(int64_t)t * nb + b] = db * (float)sum;
        }
    }
}

static inline __m512 pair_scale(float a, float b) {
    return _mm512_insertf32x8(_mm512_set1_ps(a), _mm256_set1_ps(b), 1);
}

/* ---- row dot products ---------------------------------------------------------------------- */

static float dot_q8_0(const uint8_t *row, int nb, const int8_t *xq, const float *xd, const float *xs) {
    (void)xs;
    __m512 acc = _mm512_setzero_ps();
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *b0 = row + b * 34, *b1 = b0 + 34;
        prefetch_ahead(b0);
        prefetch_ahead(b0 + 64);
        const __m256i wa = _mm256_loadu_si256((const __m256i *)(b0 + 2));
        const __m256i wb = _mm256_loadu_si256((const __m256i *)(b1 + 2));
        const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(wa), wb, 1);
        const __m512i x = _mm512_loadu_si512((const void *)(xq + b * QK));
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(w), sign_onto(x, w));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), pair_scale(f16(b0) * xd[b], f16(b1) * xd[b + 1]), acc);
    }
    float sum = _mm512_reduce_add_ps(acc);
    for (; b < nb; b++) {
        /* Intrinsics on purpose: GCC 12 turns the plain s8 x s8 loop into a u8 x s8 vpdpbusd. */
        const uint8_t *b0 = row + b * 34;
        const __m256i w = _mm256_loadu_si256((const __m256i *)(b0 + 2));
        const __m256i x = _mm256_loadu_si256((const __m256i *)(xq + b * QK));
        const __m256i p = _mm256_dpbusd_epi32(_mm256_setzero_si256(), _mm256_abs_epi8(w), sign_onto_256(x, w));
        const __m256 pf = _mm256_cvtepi32_ps(p);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(pf), _mm256_extractf128_ps(pf, 1));
        h = _mm_hadd_ps(h, h);
        h = _mm_hadd_ps(h, h);
        sum += f16(b0) * xd[b] * _mm_cvtss_f32(h);
    }
    return sum;
}

/* One Q8_0 row against `rows` activation rows (rows <= 8): each pair of blocks is loaded and its
 * magnitudes taken once; every row's sums are dot_q8_0's, in the same order. */
static inline __attribute__((always_inline)) void dot_q8_0_rows_impl(const uint8_t *row, int nb, const int8_t *xq,
                                                                     int K, const float *xd, const int rows,
                                                                     float *out) {
    __m512 acc[8];
    for (int t = 0; t < rows; t++) acc[t] = _mm512_setzero_ps();
    int b = 0;
    for (; b + 1 < nb; b += 2) {
        const uint8_t *b0 = row + b * 34, *b1 = b0 + 34;
        prefetch_ahead(b0);
        prefetch_ahead(b0 + 64);
        const __m256i wa = _mm256_loadu_si256((const __m256i *)(b0 + 2));
        const __m256i wb = _mm256_loadu_si256((const __m256i *)(b1 + 2));
        const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(wa), wb, 1);
        const __m512i aw = _mm512_abs_epi8(w);
        const float d0 = f16(b0), d1 = f16(b1);
        for (int t = 0; t < rows; t++) {
            const __m512i x = _mm512_loadu_si512((const void *)(xq + (int64_t)t * K + b * QK));
            const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sign_onto(x, w));
            const float *xdt = xd + (int64_t)t * nb;
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), pair_scale(d0 * xdt[b], d1 * xdt[b + 1]), acc[t]);
        }
    }
    for (int t = 0; t < rows; t++) {
        out[t] = _mm512_reduce_add_ps(acc[t]);
        if (b < nb)  /* an odd last block: as dot_q8_0 does it */
            out[t] += dot_q8_0(row + b * 34, 1, xq + (int64_t)t * K + b * QK, xd + (int64_t)t * nb + b, NULL);
    }
}

static void dot_q8_0_rows(const uint8_t *row, int nb, const int8_t *xq, int K, const float *xd, int rows,
                          float *out) {
#define Q8R_CASE(R) case R: dot_q8_0_rows_impl(row, nb, xq, K, xd, R, out); break;
    switch (rows) {
        Q8R_CASE(1) Q8R_CASE(2) Q8R_CASE(3) Q8R_CASE(4) Q8R_CASE(5) Q8R_CASE(6) Q8R_CASE(7) Q8R_CASE(8)
    }
#undef Q8R_CASE
}

static void gemv_q8_0(const uint8_t *w, int N, int K, const int8_t *xq, const float *xd, int T, float *y,
                      int nthreads) {
    const int nb = K / QK;
    const int64_t row_bytes = (int64_t)nb * 34;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        if (T == 1) {
            y[n] = dot_q8_0(row, nb, xq, xd, NULL);
            continue;
        }
        float out[8];
        for (int t0 = 0; t0 < T; t0 += 8) {
            const int rows = T - t0 < 8 ? T - t0 : 8;
            dot_q8_0_rows(row, nb, xq + (int64_t)t0 * K, K, xd + (int64_t)t0 * nb, rows, out);
            for (int r = 0; r < rows; r++) y[(int64_t)(t0 + r) * N + n] = out[r];
        }
    }
}

/* ---- float weights ------------------------------------------------------------------------ */

/* y[T, N] = x[T, K] @ W[N, K]^T, W float32.
 *
 *   every y[t, n] = lanes(acc) + tail,  acc = fma over k = 0, 16, 32, ... of W[n, k:k+16] * x[t, k:k+16]
 *
 * one accumulator per output, summed in k order whatever T is and whichever rows share a pass, so
 * a row gets the bits it gets alone (the decode step's rows, speculative decoding's drafted
 * positions). Rows of x are taken up to 8 at a time against F32_TILE weight rows: each weight
 * vector loaded serves up to 8 rows and each x vector F32_TILE weight rows (one load per FMA was
 * the bound of a row-at-a-time loop). With one row of x, F32_TILE chains hide the FMA latency. */
#define F32_TILE 1

static inline float f32_finish(__m512 acc, const float *r, const float *xt, int k, int K) {
    float sum = _mm512_reduce_add_ps(acc);
    for (; k < K; k++) sum += r[k] * xt[k];
    return sum;
}

/* y[t, n0 + j] for j < NR (NR weight rows from r, stride K) and t < T (T <= 8 rows of x, stride K);
 * y's row stride is N. NR and T are constants where it is inlined, so the sums stay in registers. */
static inline __attribute__((always_inline)) void f32_tile(const float *r, int K, const float *x, const int T,
                                                           const int NR, float *y, int N) {
    __m512 acc[F32_TILE][8];
    for (int j = 0; j < NR; j++)
        for (int t = 0; t < T; t++) acc[j][t] = _mm512_setzero_ps();
    int k = 0;
    for (; k + 16 <= K; k += 16) {
        __m512 w[F32_TILE];
        for (int j = 0; j < NR; j++) {
            if ((k & 63) == 0) prefetch_ahead_256((const char *)(r + (int64_t)j * K + k));
            w[j] = _mm512_loadu_ps(r + (int64_t)j * K + k);
        }
        for (int t = 0; t < T; t++) {
            const __m512 xv = _mm512_loadu_ps(x + (int64_t)t * K + k);
            for (int j = 0; j < NR; j++) acc[j][t] = _mm512_fmadd_ps(w[j], xv, acc[j][t]);
        }
    }
    for (int j = 0; j < NR; j++)
        for (int t = 0; t < T; t++) y[(int64_t)t * N + j] = f32_finish(acc[j][t], r + (int64_t)j * K, x + (int64_t)t * K, k, K);
}

static void f32_tile_rows(const float *r, int K, const float *x, int T, int NR, float *y, int N) {
#define F32_CASE(R)                                         \
    case R:                                                 \
        if (NR == F32_TILE) f32_tile(r, K, x, R, F32_TILE, y, N); \
        else f32_tile(r, K, x, R, 1, y, N);                 \
        break;
    switch (T) { F32_CASE(1) F32_CASE(2) F32_CASE(3) F32_CASE(4) F32_CASE(5) F32_CASE(6) F32_CASE(7) F32_CASE(8) }
#undef F32_CASE
}

void gemv_f32(const float *w, int N, int K, const float *x, int T, float *y, int nthreads) {
    const int tiles = (N + F32_TILE - 1) / F32_TILE;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int i = 0; i < tiles; i++) {
        const int n0 = i * F32_TILE;
        const int rows = N - n0 < F32_TILE ? N - n0 : F32_TILE;
        for (int t0 = 0; t0 < T; t0 += 8) {
            const int tr = T - t0 < 8 ? T - t0 : 8;
            const float *xt = x + (int64_t)t0 * K;
            float *yt = y + (int64_t)t0 * N + n0;
            if (rows == F32_TILE) {
                f32_tile_rows(w + (int64_t)n0 * K, K, xt, tr, F32_TILE, yt, N);
            } else {
                for (int j = 0; j < rows; j++) f32_tile_rows(w + (int64_t)(n0 + j) * K, K, xt, tr, 1, yt + j, N);
            }
        }
    }
}

/* y[T, N] = x[T, K] @ W[N, K]^T, W bfloat16 (raw uint16), x and y float32. */
void gemv_bf16(const uint16_t *w, int N, int K, const float *x, int T, float *y, int nthreads) {
    const int N2 = N / 2 * 2;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N2; n += 2) {
        const uint16_t *r0 = w + (int64_t)n * K, *r1 = r0 + K;
        for (int t = 0; t < T; t++) {
            const float *xt = x + (int64_t)t * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, b0 = a0, b1 = a0;
            int k = 0;
            for (; k + 32 <= K; k += 32) {
                prefetch_ahead((const char *)r0 + 4 * (int64_t)k);
                prefetch_ahead((const char *)r0 + 4 * (int64_t)k + 64);
                const __m512 x0 = _mm512_loadu_ps(xt + k), x1 = _mm512_loadu_ps(xt + k + 16);
                a0 = _mm512_fmadd_ps(bf16x16_to_f32(r0 + k), x0, a0);
                b0 = _mm512_fmadd_ps(bf16x16_to_f32(r0 + k + 16), x1, b0);
                a1 = _mm512_fmadd_ps(bf16x16_to_f32(r1 + k), x0, a1);
                b1 = _mm512_fmadd_ps(bf16x16_to_f32(r1 + k + 16), x1, b1);
            }
            float s0 = _mm512_reduce_add_ps(_mm512_add_ps(a0, b0)), s1 = _mm512_reduce_add_ps(_mm512_add_ps(a1, b1));
            for (; k < K; k++) {
                uint32_t u0 = (uint32_t)r0[k] << 16, u1 = (uint32_t)r1[k] << 16;
                float w0, w1;
                memcpy(&w0, &u0, 4);
                memcpy(&w1, &u1, 4);
                s0 += w0 * xt[k];
                s1 += w1 * xt[k];
            }
            y[(int64_t)t * N + n] = s0;
            y[(int64_t)t * N + n + 1] = s1;
        }
    }
    for (int n = N2; n < N; n++) {
        const uint16_t *r = w + (int64_t)n * K;
        for (int t = 0; t < T; t++) {
            float s = 0.0f;
            for (int k = 0; k < K; k++) {
                uint32_t u = (uint32_t)r[k] << 16;
                float wf;
                memcpy(&wf, &u, 4);
                s += wf * x[(int64_t)t * K + k];
            }
            y[(int64_t)t * N + n] = s;
        }
    }
}

/* ---- one call per product: quantise the activations, then the block product --------------- */

/* y[T, N] = x[T, K] @ W^T for a block-format W; x float32. The 8-bit activations live in a
 * scratch buffer on the stack for small inputs (the decode case), on the heap otherwise. Returns 0,
 * or -1 when scratch memory ran out. */
int gemv_blocks_f32(int format, const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads) {
    const int nb = K / QK;
    const int64_t need = (int64_t)T * K + 2 * (int64_t)T * nb * (int64_t)sizeof(float) + 64;
    uint8_t stack[65536];
    uint8_t *scratch = need <= (int64_t)sizeof(stack) ? stack : (uint8_t *)aligned_alloc(64, (need + 63) / 64 * 64);
    if (!scratch) return -1;
    int8_t *xq = (int8_t *)scratch;
    float *xd = (float *)(scratch + (((int64_t)T * K + 63) / 64 * 64));
    float *xs = xd + (int64_t)T * nb;
    quantize_act_q8(x, T, K, xq, xd, xs);
    (void)format; /* Q8_0 in ggml's layout (an LM head before it takes float activations); layers in
                  * Q8_0 / Q4_0 / Q4_1 use the repacked kernel below */
    gemv_q8_0(w, N, K, xq, xd, T, y, nthreads);
    if (scratch != stack) free(scratch);
    return 0;
}

/* ---- the rest of a batch-1 decode step, for float32 activations ----------------------------- */

/* out[r] = w * x[r] / sqrt(mean(x[r]^2) + eps), for `rows` rows of `dim` (LLaMA's RMSNorm), on the
 * calling thread (the decode step's few rows; a prompt's go through rmsnorm_rows_f32). */
void rmsnorm_f32(const float *x, const float *w, float *out, int rows, int dim, float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * dim;
        float *o = out + (int64_t)r * dim;
        __m512 acc = _mm512_setzero_ps();
        int k = 0;
        for (; k + 16 <= dim; k += 16) {
            const __m512 v = _mm512_loadu_ps(xr + k);
            acc = _mm512_fmadd_ps(v, v, acc);
        }
        float ss = _mm512_reduce_add_ps(acc);
        for (; k < dim; k++) ss += xr[k] * xr[k];
        const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (k = 0; k < dim; k++) o[k] = w[k] * (xr[k] * scale);
    }
}

/* out[r, i] = silu(gu[r, i]) * gu[r, I + i] for `rows` rows of [gate (I) | up (I)]: the MLP's activation,
 * silu(g) = g / (1 + e^-g), 16 lanes at a time, on the calling thread. */
void silu_mul_f32(const float *gu, int rows, int I, float *out) {
    for (int r = 0; r < rows; r++) {
        const float *g = gu + (int64_t)r * 2 * I, *u = g + I;
        float *o = out + (int64_t)r * I;
        for (int i = 0; i < I; i += 16) {
            const __mmask16 m = tail_mask(i, I);
            const __m512 silu = silu16(_mm512_maskz_loadu_ps(m, g + i));
            _mm512_mask_storeu_ps(o + i, m, _mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, u + i)));
        }
    }
}

/* The same two for a prompt's rows: more than 8 are split over `nthreads` (each row's numbers as
 * on one thread); fewer stay on the calling thread without entering a parallel region. */
void rmsnorm_rows_f32(const float *x, const float *w, float *out, int rows, int dim, float eps, int nthreads) {
    if (rows <= 8 || nthreads <= 1) {
        rmsnorm_f32(x, w, out, rows, dim, eps);
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int r = 0; r < rows; r++) rmsnorm_f32(x + (int64_t)r * dim, w, out + (int64_t)r * dim, 1, dim, eps);
}

void silu_mul_rows_f32(const float *gu, int rows, int I, float *out, int nthreads) {
    if (rows <= 8 || nthreads <= 1) {
        silu_mul_f32(gu, rows, I, out);
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int r = 0; r < rows; r++) silu_mul_f32(gu + (int64_t)r * 2 * I, 1, I, out + (int64_t)r * I);
}

/* ---- bfloat16 weights and activations (AVX512-BF16, or its products on AVX2) ------------------- */

/* y[T, N] = x[T, K] @ W[N, K]^T with W and x bfloat16 (raw uint16), y float32. Each
 * vdpbf16ps multiplies 32 pairs exactly and accumulates in float32. K % 32 == 0. One weight row at a
 * time with four sums in flight, as gemv_f32. */
void gemv_bf16_bf16(const uint16_t *w, int N, int K, const uint16_t *x, int T, float *y, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint16_t *r = w + (int64_t)n * K;
        for (int t = 0; t < T; t++) {
            const uint16_t *xt = x + (int64_t)t * K;
            __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            int k = 0;
            for (; k + 128 <= K; k += 128) {
                const char *line = (const char *)(r + k);
                prefetch_ahead_256(line);
#define BF16_DOT(acc, at) acc = dot_bf16_pairs(acc, r + (at), xt + (at))
                BF16_DOT(a0, k);
                BF16_DOT(a1, k + 32);
                BF16_DOT(a2, k + 64);
                BF16_DOT(a3, k + 96);
            }
            for (; k < K; k += 32) BF16_DOT(a0, k);
#undef BF16_DOT
            y[(int64_t)t * N + n] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
        }
    }
}

/* ---- Q8_0, Q4_0 and Q4_1 rows repacked for the kernel ------------------------------------------
 * The same numbers as the ggml blocks, laid out so that four blocks go through two VNNI
 * instructions with no per-block scalar work. Per row, with nbp = blocks rounded up to 4 (the
 * extra blocks are zero), group by group of four blocks, so that a row is read as one stream:
 *   Q4_0 / Q4_1: the four blocks' packed bytes (64 bytes: low nibbles weights 0-15, high nibbles
 *                16-31 of each block), their f16 scales d[4], for Q4_1 their f16 minimums m[4]
 *                (72 or 80 bytes a group);
 *   Q8_0:        weights 0-15 of each of the four blocks (64 bytes), then weights 16-31 of each
 *                (64 bytes), stored as q + 128 (unsigned, so VNNI takes them as they are: no sign
 *                moved onto the activations), then d[4] (136 bytes, the four ggml blocks' size).
 * The activations are laid out to match: for each group of four blocks, the first 16 values of each
 * block, then the last 16 of each. Q8_0's +128 is taken back in integers: each lane's sum starts
 * at -128 times the sum of the eight activations it meets (`corr`), so it is sum(q * q_x) exactly. */

static void permute_act_groups(const int8_t *xq, int nb, int nbp, int8_t *xp) {
    memset(xp, 0, (size_t)nbp * QK);
    for (int b = 0; b < nb; b++) {
        const int g = b / 4, j = b % 4;
        memcpy(xp + g * 128 + j * 16, xq + b * QK, 16);
        memcpy(xp + g * 128 + 64 + j * 16, xq + b * QK + 16, 16);
    }
}

/* corr[g, lane] = -128 * (the lane's four activations in each half of group g), for Q8_0 (not in the
 * AVX2 build: see packed_products). */
#ifndef LLAMASCOPE_AVX2
__attribute__((noinline)) static void q8_corrections(const int8_t *xp, int G, int32_t *corr) {
    const __m512i offset = _mm512_set1_epi8((char)0x80);
    for (int g = 0; g < G; g++) {
        __m512i c = _mm512_dpbusd_epi32(_mm512_setzero_si512(), offset, _mm512_loadu_si512((const void *)(xp + g * 128)));
        c = _mm512_dpbusd_epi32(c, offset, _mm512_loadu_si512((const void *)(xp + g * 128 + 64)));
        _mm512_storeu_si512((void *)(corr + g * 16), _mm512_sub_epi32(_mm512_setzero_si512(), c));
    }
}
#endif

static inline int packed_group_bytes(int format) { return format == LS_Q8_0 ? 136 : format == LS_Q4_1 ? 80 : 72; }

/* A group's two 64-weight vectors as unsigned bytes (lo: each block's weights 0-15, hi: 16-31). */
static inline __attribute__((always_inline)) void packed_values(const int format, const uint8_t *grp, __m512i *lo,
                                                                __m512i *hi) {
    if (format == LS_Q8_0) {
        *lo = _mm512_loadu_si512((const void *)grp);
        *hi = _mm512_loadu_si512((const void *)(grp + 64));
    } else {
        const __m512i low = _mm512_set1_epi8(0x0F);
        const __m512i v = _mm512_loadu_si512((const void *)grp);
        *lo = _mm512_and_si512(v, low);
        *hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
    }
}

/* The lines of a group, prefetched for a later group (Q8_0's group spans three). */
static inline __attribute__((always_inline)) void prefetch_group(const int format, const uint8_t *grp) {
    prefetch_ahead(grp);
    prefetch_ahead(grp + 64);
    if (format == LS_Q8_0) prefetch_ahead(grp + 128);
}

/* The group's products, four per int32 lane: lo against its activations xa, hi against xb. For
 * Q8_0 each lane starts from its correction (corr_g: the group's 16, from q8_corrections), which
 * takes the +128 back. The AVX2 build's VNNI stand-in (avx2.h) sums products in pairs within int16,
 * which q + 128 against 8-bit activations would overflow: there Q8_0's weights go back to q, and
 * their sign onto the activations as dot_q8_0 does (no correction: corr_g is not read). */
static inline __attribute__((always_inline)) __m512i packed_products(const int format, const int32_t *corr_g,
                                                                     __m512i lo, __m512i hi, __m512i xa, __m512i xb) {
#ifdef LLAMASCOPE_AVX2
    (void)corr_g;
    if (format == LS_Q8_0) {
        const __m512i flip = _mm512_set1_epi8((char)0x80);
        lo = _mm512_xor_si512(lo, flip);
        hi = _mm512_xor_si512(hi, flip);
        const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_abs_epi8(lo), sign_onto(xa, lo));
        return _mm512_dpbusd_epi32(p, _mm512_abs_epi8(hi), sign_onto(xb, hi));
    }
    const __m512i start = _mm512_setzero_si512();
#else
    const __m512i start = format == LS_Q8_0 ? _mm512_loadu_si512((const void *)corr_g) : _mm512_setzero_si512();
#endif
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(start, lo, xa), hi, xb);
}

/* A group's four scales d (and for Q4_1 its minimums m in e4; Q4_0: e4 = d4). */
static inline __attribute__((always_inline)) void packed_scales(const int format, const uint8_t *grp, __m128 *d4,
                                                                __m128 *e4) {
    if (format == LS_Q4_1) {  /* d and m of the group's four blocks: one 16-byte load */
        const __m256 dm = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(grp + 64)));
        *d4 = _mm256_castps256_ps128(dm);
        *e4 = _mm256_extractf128_ps(dm, 1);
    } else {
        *d4 = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(grp + (format == LS_Q8_0 ? 128 : 64))));
        *e4 = *d4;
    }
}

/* The last step of a row: the float sums plus Q4_1's minimums (+ e) or Q4_0's offset (-8 e). */
static inline float packed_total(const int format, __m512 acc, __m128 extra) {
    __m128 h = _mm_hadd_ps(extra, extra);
    h = _mm_hadd_ps(h, h);
    const float e = _mm_cvtss_f32(h);
    const float sum = _mm512_reduce_add_ps(acc);
    return format == LS_Q8_0 ? sum : format == LS_Q4_1 ? sum + e : sum - 8.0f * e;
}

static inline __attribute__((always_inline)) float dot_packed_impl(
        const int format, const uint8_t *row, int nbp, const int8_t *xp, const int32_t *corr, const float *xd,
        const float *xs) {
    const int group_bytes = packed_group_bytes(format);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc = _mm512_setzero_ps();
    __m128 extra = _mm_setzero_ps();
    for (int g = 0; g < nbp / 4; g++) {
        const uint8_t *grp = row + (int64_t)g * group_bytes;
        prefetch_group(format, grp);
        __m512i lo, hi;
        packed_values(format, grp, &lo, &hi);
        const __m512i p = packed_products(format, corr + g * 16, lo, hi, _mm512_loadu_si512((const void *)(xp + g * 128)),
                                          _mm512_loadu_si512((const void *)(xp + g * 128 + 64)));
        __m128 d4, e4;
        packed_scales(format, grp, &d4, &e4);
        const __m128 s4 = _mm_mul_ps(d4, _mm_loadu_ps(xd + g * 4));
        const __m512 s16 = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(s4));
        acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s16, acc);
        if (format != LS_Q8_0) extra = _mm_fmadd_ps(e4, _mm_loadu_ps(xs + g * 4), extra);
    }
    return packed_total(format, acc, extra);
}

static float dot_packed(int format, const uint8_t *row, int nbp, const int8_t *xp, const int32_t *corr,
                        const float *xd, const float *xs) {
    switch (format) {
        case LS_Q8_0: return dot_packed_impl(LS_Q8_0, row, nbp, xp, corr, xd, xs);
        case LS_Q4_1: return dot_packed_impl(LS_Q4_1, row, nbp, xp, corr, xd, xs);
        default: return dot_packed_impl(LS_Q4_0, row, nbp, xp, corr, xd, xs);
    }
}

/* One weight row against `rows` activation rows (rows <= PACKED_ROWS), each with the same operations
 * in the same order as dot_packed, so every result equals the one-row kernel's bit for bit. */
#define PACKED_ROWS 8
static inline __attribute__((always_inline)) void dot_packed_rows_impl(
        const int format, const uint8_t *row, int nbp, const int8_t *xp, int64_t act_bytes, const int32_t *corr,
        const float *xd16, const float *xs, const int rows, float *out) {
    const int G = nbp / 4, group_bytes = packed_group_bytes(format);
    const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
    __m512 acc[PACKED_ROWS];
    __m128 extra[PACKED_ROWS];
    for (int t = 0; t < rows; t++) {
        acc[t] = _mm512_setzero_ps();
        extra[t] = _mm_setzero_ps();
    }
    for (int g = 0; g < G; g++) {
        const uint8_t *grp = row + (int64_t)g * group_bytes;
        prefetch_group(format, grp);
        __m512i lo, hi;
        packed_values(format, grp, &lo, &hi);
        __m128 d4, e4;
        packed_scales(format, grp, &d4, &e4);
        const __m512 d16 = _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(d4));
        for (int t = 0; t < rows; t++) {
            const int8_t *x = xp + t * act_bytes + g * 128;
            const __m512i p = packed_products(format, corr + ((int64_t)t * G + g) * 16, lo, hi,
                                              _mm512_loadu_si512((const void *)x), _mm512_loadu_si512((const void *)(x + 64)));
            const __m512 s16 = _mm512_mul_ps(d16, _mm512_loadu_ps(xd16 + ((int64_t)t * G + g) * 16));
            acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p), s16, acc[t]);
            if (format != LS_Q8_0) extra[t] = _mm_fmadd_ps(e4, _mm_loadu_ps(xs + (int64_t)t * nbp + g * 4), extra[t]);
        }
    }
    for (int t = 0; t < rows; t++) out[t] = packed_total(format, acc[t], extra[t]);
}

static void dot_packed_rows(int format, const uint8_t *row, int nbp, const int8_t *xp, int64_t act_bytes,
                            const int32_t *corr, const float *xd16, const float *xs, int rows, float *out) {
#define PACKED_CASE(R)                                                                                      \
    case R:                                                                                                 \
        if (format == LS_Q8_0) dot_packed_rows_impl(LS_Q8_0, row, nbp, xp, act_bytes, corr, xd16, xs, R, out); \
        else if (format == LS_Q4_1) dot_packed_rows_impl(LS_Q4_1, row, nbp, xp, act_bytes, corr, xd16, xs, R, out); \
        else dot_packed_rows_impl(LS_Q4_0, row, nbp, xp, act_bytes, corr, xd16, xs, R, out);          \
        break;
    switch (rows) {
        PACKED_CASE(1) PACKED_CASE(2) PACKED_CASE(3) PACKED_CASE(4) PACKED_CASE(5) PACKED_CASE(6) PACKED_CASE(7)
        PACKED_CASE(8)
    }
#undef PACKED_CASE
}

/* y[T, N] = x[T, K] @ W^T, W in the repacked layout above (format 0: Q8_0, 1: Q4_0, 2: Q4_1); x float32.
 * Returns 0, or -1 when scratch memory ran out. */
int gemv_packed_f32(int format, const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads) {
    const int nb = K / QK, nbp = (nb + 3) / 4 * 4, G = nbp / 4;
    const int64_t row_bytes = (int64_t)G * packed_group_bytes(format);
    const int64_t act_bytes = (int64_t)nbp * QK;                   /* permuted int8 activations */
    const int64_t need = T * (act_bytes + K + 2 * (int64_t)nbp * (int64_t)sizeof(float) + nbp * 16 + G * 64) + 320;
    uint8_t stack[65536];
    uint8_t *scratch = need <= (int64_t)sizeof(stack) ? stack : (uint8_t *)aligned_alloc(64, (need + 63) / 64 * 64);
    if (!scratch) return -1;
    int8_t *xp = (int8_t *)scratch;                                 /* [T, nbp * 32] */
    int8_t *xq = xp + T * act_bytes;                                /* [T, K] natural order */
    float *xd = (float *)(((uintptr_t)(xq + (int64_t)T * K) + 63) / 64 * 64);
    float *xs = xd + (int64_t)T * nbp;
    float *xd16 = (float *)(((uintptr_t)(xs + (int64_t)T * nbp) + 63) / 64 * 64);  /* [T, G, 16] */
    int32_t *corr = (int32_t *)(xd16 + (int64_t)T * G * 16);                        /* [T, G, 16] (Q8_0) */
    /* pad both scale arrays with zeros so the padded blocks contribute nothing */
    memset(xd, 0, 2 * (size_t)T * nbp * sizeof(float));
    for (int t = 0; t < T; t++) {
        quantize_act_q8(x + (int64_t)t * K, 1, K, xq + (int64_t)t * K, xd + (int64_t)t * nbp, xs + (int64_t)t * nbp);
        permute_act_groups(xq + (int64_t)t * K, nb, nbp, xp + t * act_bytes);
#ifndef LLAMASCOPE_AVX2
        if (format == LS_Q8_0) q8_corrections(xp + t * act_bytes, G, corr + (int64_t)t * G * 16);
#endif
    }
    if (T == 1) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int n = 0; n < N; n++)
            y[n] = dot_packed(format, w + n * row_bytes, nbp, xp, corr, xd, xs);
    } else {
        /* Several rows: each weight group is unpacked once for all of them. The activation scales
         * are spread to one per lane once (xd16), so each row's product is the one above. */
        const __m512i spread = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
        for (int t = 0; t < T; t++)
            for (int g = 0; g < G; g++)
                _mm512_storeu_ps(xd16 + ((int64_t)t * G + g) * 16,
                                 _mm512_permutexvar_ps(spread, _mm512_castps128_ps512(_mm_loadu_ps(xd + (int64_t)t * nbp + g * 4))));
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (int n = 0; n < N; n++) {
            float out[PACKED_ROWS];
            for (int t0 = 0; t0 < T; t0 += PACKED_ROWS) {
                const int rows = T - t0 < PACKED_ROWS ? T - t0 : PACKED_ROWS;
                dot_packed_rows(format, w + n * row_bytes, nbp, xp + t0 * act_bytes, act_bytes,
                                corr + (int64_t)t0 * G * 16, xd16 + (int64_t)t0 * G * 16, xs + (int64_t)t0 * nbp,
                                rows, out);
                for (int r = 0; r < rows; r++) y[(int64_t)(t0 + r) * N + n] = out[r];
            }
        }
    }
    if (scratch != stack) free(scratch);
    return 0;
}

/* ggml blocks [N, nb * block bytes] -> the rows repacked above [N, G * group bytes], each group's
 * missing blocks (nb not a multiple of 4) as zero blocks (q = 0, d = m = 0). formats.pack_blocks is the
 * reference (tests compare the bytes); this one runs where the library does, rows over threads:
 *   for each row n, group g, block j of the group (b = 4 g + j):
 *     Q8_0: out[16 j + i] = q_b[i] ^ 0x80, out[64 + 16 j + i] = q_b[16 + i] ^ 0x80 (i < 16), out[128 + 2 j] = d_b
 *     Q4:   out[16 j ..] = the block's 16 nibble bytes, out[64 + 2 j] = d_b, Q4_1: out[72 + 2 j] = m_b */
void pack_blocks(int format, const uint8_t *src, int N, int K, uint8_t *dst, int nthreads) {
    const int nb = K / QK, nbp = (nb + 3) / 4 * 4, G = nbp / 4, gb = packed_group_bytes(format);
    const int size = format == LS_Q8_0 ? 34 : format == LS_Q4_1 ? 20 : 18;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = src + (int64_t)n * nb * size;
        uint8_t *out = dst + (int64_t)n * G * gb;
        memset(out, 0, (size_t)G * gb);
        for (int b = 0; b < nbp; b++) {
            uint8_t *o = out + (int64_t)(b / 4) * gb;
            const int j = b % 4;
            if (format == LS_Q8_0) {
                if (b >= nb) {
                    memset(o + 16 * j, 0x80, 16);
                    memset(o + 64 + 16 * j, 0x80, 16);
                    continue;
                }
                const uint8_t *blk = row + (int64_t)b * size;
                for (int i = 0; i < 16; i++) {
                    o[16 * j + i] = blk[2 + i] ^ 0x80;
                    o[64 + 16 * j + i] = blk[18 + i] ^ 0x80;
                }
                memcpy(o + 128 + 2 * j, blk, 2);
            } else if (b < nb) {
                const uint8_t *blk = row + (int64_t)b * size;
                memcpy(o + 16 * j, blk + size - 16, 16);
                memcpy(o + 64 + 2 * j, blk, 2);
                if (format == LS_Q4_1) memcpy(o + 72 + 2 * j, blk + 2, 2);
            }
        }
    }
}

/* ---- Q8_0 weights with float32 activations -----------------------------------------------------
 * For the LM head, where the next token is decided: 8-bit activations lose too much beside the
 * outlier channels of the final hidden state, so each block is widened to float in registers. */
/* One weight row against `rows` activation rows (rows <= 8): each block is widened once for all of
 * them, and each row keeps its own sum (dot_q8_0_exact is the one-row case). */
static inline __attribute__((always_inline)) void dot_q8_0_exact_rows_impl(const uint8_t *row, int nb,
                                                                           const float *x, int K, const int rows,
                                                                           float *out) {
    __m512 acc[8];
    for (int t = 0; t < rows; t++) acc[t] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = row + b * 34;
        prefetch_ahead(blk);
        const __m512 d = _mm512_set1_ps(f16(blk));
        const __m128i q0 = _mm_loadu_si128((const __m128i *)(blk + 2));
        const __m128i q1 = _mm_loadu_si128((const __m128i *)(blk + 18));
        const __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0));
        const __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1));
        for (int t = 0; t < rows; t++) {  /* the block's integer weights times x, then times d */
            const __m512 p = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + (int64_t)t * K + b * QK + 16),
                                             _mm512_mul_ps(w0, _mm512_loadu_ps(x + (int64_t)t * K + b * QK)));
            acc[t] = _mm512_fmadd_ps(p, d, acc[t]);
        }
    }
    for (int t = 0; t < rows; t++) out[t] = _mm512_reduce_add_ps(acc[t]);
}

static float dot_q8_0_exact(const uint8_t *row, int nb, const float *x) {
    float out;
    dot_q8_0_exact_rows_impl(row, nb, x, 0, 1, &out);
    return out;
}

static void dot_q8_0_exact_rows(const uint8_t *row, int nb, const float *x, int K, int rows, float *out) {
#define Q8_CASE(R) case R: dot_q8_0_exact_rows_impl(row, nb, x, K, R, out); break;
    switch (rows) {
        Q8_CASE(1) Q8_CASE(2) Q8_CASE(3) Q8_CASE(4) Q8_CASE(5) Q8_CASE(6) Q8_CASE(7) Q8_CASE(8)
    }
#undef Q8_CASE
}

void gemv_q8_0_exact_f32(const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads) {
    const int nb = K / QK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = w + (int64_t)n * nb * 34;
        if (T == 1) {
            y[n] = dot_q8_0_exact(row, nb, x);
            continue;
        }
        float out[8];
        for (int t0 = 0; t0 < T; t0 += 8) {
            const int rows = T - t0 < 8 ? T - t0 : 8;
            dot_q8_0_exact_rows(row, nb, x + (int64_t)t0 * K, K, rows, out);
            for (int r = 0; r < rows; r++) y[(int64_t)(t0 + r) * N + n] = out[r];
        }
    }
}

/* ---- dequantisation for long inputs (prefill) ----------------------------------------------------
 * The weight as float32 (or bfloat16, rounded to nearest even) for a matrix product, with the
 * same arithmetic as the plain path (quant.dequantize): Q8_0 d * q, Q4_0 (q - 8) * d, Q4_1 q * d + m
 * (a product then a sum: the library is built without floating-point contraction). */

void dequant_q8_0(const uint8_t *w, int N, int K, void *out, int bf16, int nthreads) {
    const int nb = K / QK;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = w + (int64_t)n * nb * 34;
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = row + b * 34;
            const __m512 d = _mm512_set1_ps(f16(blk));
            const __m512 q0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 2))));
            const __m512 q1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 18))));
            store16(out, (int64_t)n * K + b * QK, bf16, _mm512_mul_ps(q0, d));
            store16(out, (int64_t)n * K + b * QK + 16, bf16, _mm512_mul_ps(q1, d));
        }
    }
}

void dequant_packed(int format, const uint8_t *w, int N, int K, void *out, int bf16, int nthreads) {
    const int nb = K / QK, nbp = (nb + 3) / 4 * 4, is_q4_1 = format == LS_Q4_1;
    const int group_bytes = packed_group_bytes(format);
    const int64_t row_bytes = (int64_t)(nbp / 4) * group_bytes;
    const __m512 eight = _mm512_set1_ps(8.0f);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        const uint8_t *row = w + n * row_bytes;
        for (int b = 0; b < nb; b++) {
            const uint8_t *grp = row + (int64_t)(b / 4) * group_bytes;
            const int j = b % 4;
            __m512 w0, w1;
            if (format == LS_Q8_0) {  /* q + 128 back to q: flip the top bit, read as int8 */
                const __m128i flip = _mm_set1_epi8((char)0x80);
                const __m128i q0 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(grp + j * 16)), flip);
                const __m128i q1 = _mm_xor_si128(_mm_loadu_si128((const __m128i *)(grp + 64 + j * 16)), flip);
                const __m512 d = _mm512_set1_ps(f16(grp + 128 + j * 2));
                w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q0)), d);
                w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(q1)), d);
            } else {
                const __m128i bytes = _mm_loadu_si128((const __m128i *)(grp + j * 16));
                const __m512i v = _mm512_cvtepu8_epi32(bytes);
                const __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
                const __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
                const __m512 d = _mm512_set1_ps(f16(grp + 64 + j * 2));
                if (is_q4_1) {
                    const __m512 m = _mm512_set1_ps(f16(grp + 72 + j * 2));
                    w0 = _mm512_add_ps(_mm512_mul_ps(lo, d), m);
                    w1 = _mm512_add_ps(_mm512_mul_ps(hi, d), m);
                } else {
                    w0 = _mm512_mul_ps(_mm512_sub_ps(lo, eight), d);
                    w1 = _mm512_mul_ps(_mm512_sub_ps(hi, eight), d);
                }
            }
            store16(out, (int64_t)n * K + b * QK, bf16, w0);
            store16(out, (int64_t)n * K + b * QK + 16, bf16, w1);
        }
    }
}
