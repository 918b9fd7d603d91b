/*
 * One batch-1 decode step through the whole decoder stack in a single native call.
 *
 * The Python path runs the same kernels (gemv.c) one module at a time; at batch 1 on a small model
 * the dozens of module calls per layer cost more than the arithmetic. Here the step walks the
 * layers itself, calling the same kernels in the same order on the same numbers:
 *
 *   for each layer:  h = rmsnorm(x) ; qkv = [q | k | v](h) ; a = attention(qkv, cache) ;
 *                    x += o(a) ; h = rmsnorm(x) ; [g | u] = gate_up(h) ; x += down(silu(g) * u)
 *   then:            logits = head(rmsnorm(x))
 *
 * Activations are float32 throughout; weights are in any of the kernels' formats. Shapes:
 * x [hidden], qkv [(H + 2 KVH) * D], a [H * D], gate and up [I] each, caches [KVH, cap, D] per layer.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* The kernels of gemv.c (compiled into the same library). */
void gemv_f32(const float *w, int N, int K, const float *x, int T, float *y, int nthreads);
void gemv_bf16(const uint16_t *w, int N, int K, const float *x, int T, float *y, int nthreads);
void gemv_blocks_f32(int qtype, const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads);
void gemv_q4_packed_f32(int qtype, const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads);
void gemv_q8_0_exact_f32(const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads);
void rmsnorm_f32(const float *x, const float *w, float *out, int rows, int dim, float eps);
void silu_mul_f32(const float *gu, int rows, int I, float *out);
void decode_attention_f32(float *qkv, const float *cos, const float *sin, float *kcache, float *vcache,
                          int col, int cap, int H, int KVH, int D, float scale, float *out, int nthreads);

/* Weight formats (decode_step.py's LINEAR_KINDS). */
enum { LIN_F32 = 0, LIN_BF16 = 1, LIN_Q8_0 = 2, LIN_Q4_0 = 3, LIN_Q4_1 = 4, LIN_Q8_0_EXACT = 5 };

typedef struct {
    int kind, N, K;          /* y[N] = W[N, K] x[K] (+ bias) */
    const void *w;
    const float *bias;       /* [N] or NULL */
} linear_t;

typedef struct {
    const float *attn_norm, *mlp_norm;   /* [hidden] */
    linear_t qkv[3];                     /* outputs side by side: one fused layer, or q, k, v */
    int n_qkv;
    linear_t o;
    linear_t gate_up[2];                 /* [gate | up]: one fused layer, or gate, up */
    int n_gate_up;
    linear_t down;
} layer_t;

typedef struct {
    int n_layers, hidden, H, KVH, D, I;
    float eps, scale;
    const layer_t *layers;
    const float *final_norm;             /* [hidden] */
    linear_t head;                       /* [vocab, hidden] */
} stack_t;

static void linear(const linear_t *l, const float *x, float *y, int nthreads) {
    switch (l->kind) {
    case LIN_F32: gemv_f32((const float *)l->w, l->N, l->K, x, 1, y, nthreads); break;
    case LIN_BF16: gemv_bf16((const uint16_t *)l->w, l->N, l->K, x, 1, y, nthreads); break;
    case LIN_Q8_0: gemv_blocks_f32(0, (const uint8_t *)l->w, l->N, l->K, x, 1, y, nthreads); break;
    case LIN_Q4_0: gemv_q4_packed_f32(1, (const uint8_t *)l->w, l->N, l->K, x, 1, y, nthreads); break;
    case LIN_Q4_1: gemv_q4_packed_f32(2, (const uint8_t *)l->w, l->N, l->K, x, 1, y, nthreads); break;
    case LIN_Q8_0_EXACT: gemv_q8_0_exact_f32((const uint8_t *)l->w, l->N, l->K, x, 1, y, nthreads); break;
    }
    if (l->bias)
        for (int n = 0; n < l->N; n++) y[n] += l->bias[n];
}

/* Several layers reading the same input, outputs side by side. */
static void linears(const linear_t *ls, int count, const float *x, float *y, int nthreads) {
    for (int i = 0; i < count; i++) {
        linear(&ls[i], x, y, nthreads);
        y += ls[i].N;
    }
}

/*
 * x [hidden]: the token's embedding, overwritten with the final residual stream. cos, sin [D]:
 * the position's rotary tables. kcache[l], vcache[l]: layer l's cache; the new key and value go
 * to column `col`. logits [vocab] (the head's N). Returns 0, or -1 when scratch memory ran out.
 */
int decode_step_f32(const stack_t *s, float *x, const float *cos, const float *sin, float *const *kcache,
                    float *const *vcache, int col, int cap, float *logits, int nthreads) {
    const int hidden = s->hidden, HD = s->H * s->D, QKV = (s->H + 2 * s->KVH) * s->D, I = s->I;
    const int64_t floats = (int64_t)hidden + QKV + HD + hidden + 3 * (int64_t)I;
    float *scratch = (float *)malloc(sizeof(float) * floats);
    if (!scratch) return -1;
    float *h = scratch, *qkv = h + hidden, *a = qkv + QKV, *y = a + HD, *gu = y + hidden, *act = gu + 2 * I;
    for (int l = 0; l < s->n_layers; l++) {
        const layer_t *L = &s->layers[l];
        rmsnorm_f32(x, L->attn_norm, h, 1, hidden, s->eps);
        linears(L->qkv, L->n_qkv, h, qkv, nthreads);
        decode_attention_f32(qkv, cos, sin, kcache[l], vcache[l], col, cap, s->H, s->KVH, s->D, s->scale, a,
                             nthreads);
        linear(&L->o, a, y, nthreads);
        for (int i = 0; i < hidden; i++) x[i] += y[i];
        rmsnorm_f32(x, L->mlp_norm, h, 1, hidden, s->eps);
        linears(L->gate_up, L->n_gate_up, h, gu, nthreads);
        silu_mul_f32(gu, 1, I, act);
        linear(&L->down, act, y, nthreads);
        for (int i = 0; i < hidden; i++) x[i] += y[i];
    }
    rmsnorm_f32(x, s->final_norm, h, 1, hidden, s->eps);
    linear(&s->head, h, logits, nthreads);
    free(scratch);
    return 0;
}
