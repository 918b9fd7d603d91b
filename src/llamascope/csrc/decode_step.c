/*
 * One batch-1 decode step through the whole decoder stack in a single native call.
 *
 * The Python path runs the same kernels (gemv.c) one module at a time; at batch 1 on a small model
 * the dozens of module calls per layer cost more than the arithmetic. Here the step walks the
 * layers itself, calling the same kernels in the same order on the same numbers:
 *
 *   for each layer:  h = rmsnorm(x) ; qkv = [q | k | v](h) ; (Qwen3: rmsnorm each q and k head) ;
 *                    a = attention(qkv, cache, the layer's window) ;
 *                    x += o(a) ; h = rmsnorm(x) ; [g | u] = gate_up(h) ; x += down(silu(g) * u)
 *   then:            logits = head(rmsnorm(x))
 *
 * Activations are float32 throughout; weights are in any of the kernels' formats. Shapes:
 * x [hidden], qkv [(H + 2 KVH) * D], a [H * D], gate and up [I] each, caches [KVH, cap, D] per layer.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

/* y[T, N] = x[T, K] W^T (+ bias) for T rows. Returns 0, or -1 when a kernel's scratch memory ran out. */
static int linear(const ls_linear_t *l, const float *x, int T, float *y, int nthreads) {
    int status = 0;
    const uint8_t *blocks = (const uint8_t *)l->w;
    switch (l->format) {
    case LS_F32: gemv_f32((const float *)l->w, l->N, l->K, x, T, y, nthreads); break;
    case LS_BF16: gemv_bf16((const uint16_t *)l->w, l->N, l->K, x, T, y, nthreads); break;
    case LS_Q8_0:
        if (l->float_activations) gemv_q8_0_exact_f32(blocks, l->N, l->K, x, T, y, nthreads);
        else if (l->layout == LS_LAYOUT_PACKED) status = gemv_packed_f32(LS_Q8_0, blocks, l->N, l->K, x, T, y, nthreads);
        else status = gemv_blocks_f32(LS_Q8_0, blocks, l->N, l->K, x, T, y, nthreads);
        break;
    case LS_Q4_0: case LS_Q4_1:  /* (packed only) */
        status = gemv_packed_f32(l->format, blocks, l->N, l->K, x, T, y, nthreads);
        break;
    case LS_Q2_K: case LS_Q3_K: case LS_Q4_K: case LS_Q5_K: case LS_Q6_K:
        status = gemv_kquant_f32(l->format, blocks, l->N, l->K, x, T, y, nthreads);
        break;
    default: return -2;  /* a format decode_step.py never describes */
    }
    if (l->bias)
        for (int t = 0; t < T; t++)
            for (int n = 0; n < l->N; n++) y[(int64_t)t * l->N + n] += l->bias[n];
    return status;
}

/* Several layers reading the same input, outputs side by side: y[T, sum of N]. */
static int linears(const ls_linear_t *ls, int count, const float *x, int T, float *y, int width, float *tmp,
                   int nthreads) {
    if (count == 1) return linear(&ls[0], x, T, y, nthreads);
    int offset = 0, status = 0;
    for (int i = 0; i < count; i++) {
        status |= linear(&ls[i], x, T, tmp, nthreads);
        for (int t = 0; t < T; t++)
            memcpy(y + (int64_t)t * width + offset, tmp + (int64_t)t * ls[i].N, sizeof(float) * ls[i].N);
        offset += ls[i].N;
    }
    return status;
}

/*
 * B sequences, one new token each. x [B, hidden]: the tokens' embeddings, overwritten with the
 * final residual stream. cos, sin [B, D]: each position's rotary tables. Layer l's cache is one
 * [rows, KVH, cap, D] tensor (kcache[l], vcache[l]); sequence b lives in row slots[b] and its new
 * key and value go to column cols[b]. logits [B, vocab] (the head's N). Returns 0, or -1 when
 * scratch memory ran out.
 */
int decode_step_f32(const ls_stack_t *s, int B, float *x, const float *cos, const float *sin, float *const *kcache,
                    float *const *vcache, const int *slots, const int *cols, int cap, float *logits, int nthreads) {
    const int hidden = s->hidden, HD = s->H * s->D, QKV = (s->H + 2 * s->KVH) * s->D, I = s->I, D = s->D;
    const int64_t row_stride = (int64_t)s->KVH * cap * D;
    const int64_t wide = QKV > 2 * I ? QKV : 2 * I;
    const int64_t floats = (int64_t)B * (hidden + QKV + HD + hidden + 3 * (int64_t)I + wide);
    float *scratch = (float *)malloc(sizeof(float) * floats);
    if (!scratch) return -1;
    float *h = scratch, *qkv = h + (int64_t)B * hidden, *a = qkv + (int64_t)B * QKV, *y = a + (int64_t)B * HD;
    float *gu = y + (int64_t)B * hidden, *act = gu + (int64_t)B * 2 * I, *tmp = act + (int64_t)B * I;
    int status = 0;
    for (int l = 0; l < s->n_layers && status == 0; l++) {
        const ls_layer_t *L = &s->layers[l];
        rmsnorm_f32(x, L->attn_norm, h, B, hidden, s->eps);
        status |= linears(L->qkv, L->n_qkv, h, B, qkv, QKV, tmp, nthreads);
        if (L->q_norm)  /* each query and key head normed in place, before RoPE */
            for (int b = 0; b < B; b++) {
                rmsnorm_f32(qkv + (int64_t)b * QKV, L->q_norm, qkv + (int64_t)b * QKV, s->H, D, s->eps);
                rmsnorm_f32(qkv + (int64_t)b * QKV + HD, L->k_norm, qkv + (int64_t)b * QKV + HD, s->KVH, D, s->eps);
            }
        decode_attention_rows_f32(B, qkv, cos, sin, kcache[l], vcache[l], row_stride, slots, cols, cap, s->H, s->KVH,
                                  D, s->scale, L->window, a, nthreads);
        status |= linear(&L->o, a, B, y, nthreads);
        for (int64_t i = 0; i < (int64_t)B * hidden; i++) x[i] += y[i];
        rmsnorm_f32(x, L->mlp_norm, h, B, hidden, s->eps);
        status |= linears(L->gate_up, L->n_gate_up, h, B, gu, 2 * I, tmp, nthreads);
        silu_mul_f32(gu, B, I, act);
        status |= linear(&L->down, act, B, y, nthreads);
        for (int64_t i = 0; i < (int64_t)B * hidden; i++) x[i] += y[i];
    }
    if (status == 0) {
        rmsnorm_f32(x, s->final_norm, h, B, hidden, s->eps);
        status = linear(&s->head, h, B, logits, nthreads);
    }
    free(scratch);
    return status;
}

/* ---- bfloat16 activations ---------------------------------------------------------------------
 * The same step for a bfloat16 model, rounding to bfloat16 wherever the module path (PyTorch in
 * bfloat16) rounds: after each product, norm, RoPE product and sum, residual sum and activation.
 * Values are held in float registers and arrays, always bfloat16-exact; products run on
 * AVX512-BF16 (exact products, float32 sums). All weights are bfloat16 (LS_BF16), K % 32 == 0.
 * Attention works in float32 on the bfloat16 queries, keys and values, and rounds its output. */

/* x[i] = bf(x[i] + y[i]): a residual sum in bfloat16. */
static void add_bf16(float *x, const float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(x + i, bf_v(_mm512_add_ps(_mm512_loadu_ps(x + i), _mm512_loadu_ps(y + i))));
    for (; i < n; i++) x[i] = bf(x[i] + y[i]);
}

/* y[T, N] = bf(x W^T) (+ bias, rounded again); x [T, K] is given as bfloat16 bits. */
static void linear_bf16(const ls_linear_t *l, const uint16_t *xb, int T, float *y, int nthreads) {
    gemv_bf16_bf16((const uint16_t *)l->w, l->N, l->K, xb, T, y, nthreads);
    for (int t = 0; t < T; t++) {
        float *yt = y + (int64_t)t * l->N;
        int n = 0;
        for (; n + 16 <= l->N; n += 16) {
            __m512 v = bf_v(_mm512_loadu_ps(yt + n));
            if (l->bias) v = bf_v(_mm512_add_ps(v, _mm512_loadu_ps(l->bias + n)));
            _mm512_storeu_ps(yt + n, v);
        }
        for (; n < l->N; n++) {
            yt[n] = bf(yt[n]);
            if (l->bias) yt[n] = bf(yt[n] + l->bias[n]);
        }
    }
}

static void linears_bf16(const ls_linear_t *ls, int count, const uint16_t *xb, int T, float *y, int width,
                         float *tmp, int nthreads) {
    if (count == 1) {
        linear_bf16(&ls[0], xb, T, y, nthreads);
        return;
    }
    int offset = 0;
    for (int i = 0; i < count; i++) {
        linear_bf16(&ls[i], xb, T, tmp, nthreads);
        for (int t = 0; t < T; t++)
            memcpy(y + (int64_t)t * width + offset, tmp + (int64_t)t * ls[i].N, sizeof(float) * ls[i].N);
        offset += ls[i].N;
    }
}

/* PyTorch's RMSNorm in bfloat16, `rows` rows: float statistics, normalised value rounded, times
 * the weight, rounded. */
static void rmsnorm_bf16(const float *x, const float *w, float *out, uint16_t *out_bits, int rows, int dim,
                         float eps) {
    for (int r = 0; r < rows; r++) {
        const float *xr = x + (int64_t)r * dim;
        float ss = 0.0f;
        for (int k = 0; k < dim; k++) ss += xr[k] * xr[k];
        const float scale = 1.0f / sqrtf(ss / (float)dim + eps);
        for (int k = 0; k < dim; k++) {
            const int64_t i = (int64_t)r * dim + k;
            out[i] = bf(w[k] * bf(xr[k] * scale));
            out_bits[i] = bf_bits(out[i]);
        }
    }
}

/* act = bf(bf(silu(g)) * u) for `rows` rows of [gate (I) | up (I)], as PyTorch's SiLU and product in
 * bfloat16 (SiLU in float, rounded), also as bfloat16 bits. */
static void silu_bf16(const float *gu, int rows, int I, float *act, uint16_t *act_bits) {
    for (int r = 0; r < rows; r++) {
        const float *g = gu + (int64_t)r * 2 * I, *u = g + I;
        float *o = act + (int64_t)r * I;
        uint16_t *ob = act_bits + (int64_t)r * I;
        for (int i = 0; i < I; i += 16) {
            const __mmask16 m = tail_mask(i, I);
            const __m512 silu = bf_v(silu16(_mm512_maskz_loadu_ps(m, g + i)));
            const __m512 v = bf_v(_mm512_mul_ps(silu, _mm512_maskz_loadu_ps(m, u + i)));
            _mm512_mask_storeu_ps(o + i, m, v);
            _mm256_mask_storeu_epi16(ob + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(v), 16)));
        }
    }
}

/* As decode_step_f32, with bfloat16 activations: x [B, hidden] the embeddings (bfloat16 bits),
 * overwritten with the final residual stream; cos, sin [B, D] bfloat16 bits; caches bfloat16;
 * logits [B, vocab] float32 (bfloat16-exact). */
int decode_step_bf16(const ls_stack_t *s, int B, uint16_t *x_bits, const uint16_t *cos_bits, const uint16_t *sin_bits,
                     uint16_t *const *kcache, uint16_t *const *vcache, const int *slots, const int *cols, int cap,
                     float *logits, int nthreads) {
    const int hidden = s->hidden, HD = s->H * s->D, QKV = (s->H + 2 * s->KVH) * s->D, I = s->I, D = s->D;
    const int64_t row_stride = (int64_t)s->KVH * cap * D;
    const int64_t wide = QKV > 2 * I ? QKV : 2 * I;
    const int64_t floats = (int64_t)B * (2 * (int64_t)hidden + QKV + HD + hidden + 3 * (int64_t)I + 2 * D + wide);
    const int64_t halves = (int64_t)B * (hidden + HD + I) + 64;
    float *scratch = (float *)malloc(sizeof(float) * floats);
    uint16_t *bits = (uint16_t *)aligned_alloc(64, (sizeof(uint16_t) * halves + 63) / 64 * 64);
    if (!scratch || !bits) {
        free(scratch);
        free(bits);
        return -1;
    }
    const int64_t BH = (int64_t)B * hidden;
    float *x = scratch, *h = x + BH, *qkv = h + BH, *a = qkv + (int64_t)B * QKV, *y = a + (int64_t)B * HD;
    float *gu = y + BH, *act = gu + (int64_t)B * 2 * I, *cos = act + (int64_t)B * I, *sin = cos + (int64_t)B * D;
    float *tmp = sin + (int64_t)B * D;
    uint16_t *hb = bits, *ab = hb + BH, *actb = ab + (int64_t)B * HD;
    for (int64_t i = 0; i < BH; i++) x[i] = bf_value(x_bits[i]);
    for (int64_t d = 0; d < (int64_t)B * D; d++) {
        cos[d] = bf_value(cos_bits[d]);
        sin[d] = bf_value(sin_bits[d]);
    }
    for (int l = 0; l < s->n_layers; l++) {
        const ls_layer_t *L = &s->layers[l];
        rmsnorm_bf16(x, L->attn_norm, h, hb, B, hidden, s->eps);
        linears_bf16(L->qkv, L->n_qkv, hb, B, qkv, QKV, tmp, nthreads);
        if (L->q_norm)  /* each query and key head normed in place, before RoPE (ab: scratch bits) */
            for (int b = 0; b < B; b++) {
                float *q = qkv + (int64_t)b * QKV;
                rmsnorm_bf16(q, L->q_norm, q, ab, s->H, D, s->eps);
                rmsnorm_bf16(q + HD, L->k_norm, q + HD, ab, s->KVH, D, s->eps);
            }
        decode_attention_rows_bf16(B, qkv, cos, sin, kcache[l], vcache[l], row_stride, slots, cols, cap, s->H, s->KVH,
                                   D, s->scale, L->window, a, nthreads);
        for (int64_t i = 0; i < (int64_t)B * HD; i++) ab[i] = bf_bits(a[i]);
        linear_bf16(&L->o, ab, B, y, nthreads);
        add_bf16(x, y, BH);
        rmsnorm_bf16(x, L->mlp_norm, h, hb, B, hidden, s->eps);
        linears_bf16(L->gate_up, L->n_gate_up, hb, B, gu, 2 * I, tmp, nthreads);
        silu_bf16(gu, B, I, act, actb);
        linear_bf16(&L->down, actb, B, y, nthreads);
        add_bf16(x, y, BH);
    }
    rmsnorm_bf16(x, s->final_norm, h, hb, B, hidden, s->eps);
    linear_bf16(&s->head, hb, B, logits, nthreads);
    for (int64_t i = 0; i < BH; i++) x_bits[i] = bf_bits(x[i]);
    free(scratch);
    free(bits);
    return 0;
}
