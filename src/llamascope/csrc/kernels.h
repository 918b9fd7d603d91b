/*
 * The kernels' interface, written once: the weight formats they take, the decode step's
 * description of a model, and every function the library exports, whether to Python or to the
 * other C files. Every .c file includes it.
 *
 * LS_API marks the functions Python calls: kernels.py binds exactly these (its SIGNATURES table,
 * checked against this file by tests/test_kernels_header.py); the others are called only from C.
 * Python reads the enums below from this file (kernels.header_enum).
 *
 * Conventions: W [N, K] a weight matrix, x [T, K] activations, y [T, N] = x W^T, float32 unless
 * said; bfloat16 values travel as their raw uint16 bits. `nthreads` is the OpenMP thread count.
 * Functions returning int return 0, or -1 when their scratch memory ran out (decode_step_f32: -2
 * for a layer whose format it does not run).
 */
#ifndef LLAMASCOPE_KERNELS_H
#define LLAMASCOPE_KERNELS_H

#include <stdint.h>

#define LS_API /* called from Python (kernels.py binds it) */

/* ---- formats ------------------------------------------------------------------------------------ */

/* A weight's element format: float rows, ggml's 32-weight blocks (gemv.c) or its 256-weight
 * K-quant super-blocks (kquant.c). The block products' and dequantisers' `format` argument, and
 * ls_linear_t.format. Python reads it by name (kernels.format_code("Q4_K") is LS_Q4_K). */
enum ls_format {
    LS_F32 = 0,
    LS_BF16 = 1,
    LS_Q8_0 = 2,
    LS_Q4_0 = 3,
    LS_Q4_1 = 4,
    LS_Q2_K = 5,
    LS_Q3_K = 6,
    LS_Q4_K = 7,
    LS_Q5_K = 8,
    LS_Q6_K = 9,
};

/* How a weight's bytes are laid out: ROWS, each output's weights in a row as stored (float, or
 * ggml's blocks); PACKED, Q8_0/Q4_0/Q4_1 regrouped four blocks at a time (gemv.c's header). */
enum ls_layout {
    LS_LAYOUT_ROWS = 0,
    LS_LAYOUT_PACKED = 1,
};

/* ---- the decode step's description of a model (decode_step.py mirrors these with ctypes) ------- */

typedef struct {
    int format, layout;      /* enum ls_format, enum ls_layout */
    int float_activations;   /* Q8_0 rows only: x stays float32 (an LM head), not 8-bit blocks */
    int N, K;                /* y[N] = W[N, K] x[K] (+ bias) */
    const void *w;
    const float *bias;       /* [N] or NULL */
} ls_linear_t;

typedef struct {
    const float *attn_norm, *mlp_norm;   /* [hidden] */
    const float *q_norm, *k_norm;        /* [D]: RMSNorm over each query and key head (Qwen3), or NULL */
    int window;                          /* sliding window in cache columns (0: none) */
    ls_linear_t qkv[3];                  /* outputs side by side: one fused layer, or q, k, v */
    int n_qkv;
    ls_linear_t o;
    ls_linear_t gate_up[2];              /* [gate | up]: one fused layer, or gate, up */
    int n_gate_up;
    ls_linear_t down;
} ls_layer_t;

typedef struct {
    int n_layers, hidden, H, KVH, D, I;
    float eps, scale;
    const ls_layer_t *layers;
    const float *final_norm;             /* [hidden] */
    ls_linear_t head;                    /* [vocab, hidden] */
} ls_stack_t;

/* ---- products: y[T, N] = x[T, K] W^T ------------------------------------------------------------ */

/* x -> 8 bits per 32-wide block: q [T, K], scales d and d * sum(q) s [T, K/32]; K % 32 == 0. */
void quantize_act_q8(const float *x, int T, int K, int8_t *q, float *d, float *s);
/* W float32. */
LS_API void gemv_f32(const float *w, int N, int K, const float *x, int T, float *y, int nthreads);
/* W bfloat16, x float32. */
LS_API void gemv_bf16(const uint16_t *w, int N, int K, const float *x, int T, float *y, int nthreads);
/* W and x bfloat16 (exact products, float32 sums); K % 32 == 0. */
LS_API void gemv_bf16_bf16(const uint16_t *w, int N, int K, const uint16_t *x, int T, float *y, int nthreads);
/* W Q8_0 in ggml's layout, x quantised to 8 bits (format: LS_Q8_0). */
LS_API int gemv_blocks_f32(int format, const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads);
/* W Q8_0, Q4_0 or Q4_1 in the kernels' repacked layout, x quantised to 8 bits. */
LS_API int gemv_packed_f32(int format, const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads);
/* W Q8_0 in ggml's layout, x float32 (the LM head's exact product). */
LS_API void gemv_q8_0_exact_f32(const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads);
/* W a K-quant (LS_Q2_K .. LS_Q6_K) as GGUF stores it, x quantised to 8 bits; K % 256 == 0. */
LS_API int gemv_kquant_f32(int format, const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads);

/* ---- block dequantisers: W -> out [N, K], float32 (bf16 = 0) or bfloat16 (bf16 = 1) --------------- */

/* Q8_0 in ggml's layout. */
LS_API void dequant_q8_0(const uint8_t *w, int N, int K, void *out, int bf16, int nthreads);
/* Q8_0, Q4_0 or Q4_1 in the repacked layout. */
LS_API void dequant_packed(int format, const uint8_t *w, int N, int K, void *out, int bf16, int nthreads);
/* ggml Q8_0 / Q4_0 / Q4_1 blocks [N, nb * block bytes] -> the kernels' packed rows (formats.pack_blocks). */
LS_API void pack_blocks(int format, const uint8_t *src, int N, int K, uint8_t *dst, int nthreads);
/* A K-quant as GGUF stores it. */
LS_API void dequant_kquant(int format, const uint8_t *w, int N, int K, void *out, int bf16, int nthreads);

/* ---- norms and activations ----------------------------------------------------------------------- */

/* RMSNorm of `rows` rows of `dim`, times w, on the calling thread. */
void rmsnorm_f32(const float *x, const float *w, float *out, int rows, int dim, float eps);
/* silu(gate) * up for `rows` rows of [gate (I) | up (I)] -> out [rows, I], on the calling thread. */
void silu_mul_f32(const float *gu, int rows, int I, float *out);
/* rmsnorm_f32 with a prompt's rows split over threads. */
LS_API void rmsnorm_rows_f32(const float *x, const float *w, float *out, int rows, int dim, float eps, int nthreads);
/* silu_mul_f32 with a prompt's rows split over threads. */
LS_API void silu_mul_rows_f32(const float *gu, int rows, int I, float *out, int nthreads);

/* ---- RoPE and attention over the KV cache ([KVH, cap, D] caches) -------------------------------- */

/* RoPE in place on the first `heads` heads of each of `rows` rows `stride` floats apart. */
LS_API void rope_rows_f32(float *x, int rows, int64_t stride, int heads, int D, const float *cos, const float *sin,
                          int nthreads);
/* One token of B sequences: RoPE, k and v into column cols[b] of row slots[b], attention over the
 * `window` columns up to it (0: all) -> out [B, H * D]. */
void decode_attention_rows_f32(int B, float *qkv, const float *cos, const float *sin, float *kcache, float *vcache,
                               int64_t row_elems, const int *slots, const int *cols, int cap, int H, int KVH, int D,
                               float scale, int window, float *out, int nthreads);
/* The same with bfloat16 caches and bfloat16-exact values. */
void decode_attention_rows_bf16(int B, float *qkv, const float *cos, const float *sin, uint16_t *kcache,
                                uint16_t *vcache, int64_t row_elems, const int *slots, const int *cols, int cap, int H,
                                int KVH, int D, float scale, int window, float *out, int nthreads);
/* One token of one sequence at cache column `col` -> out [H * D]. */
LS_API void decode_attention_f32(float *qkv, const float *cos, const float *sin, float *kcache, float *vcache,
                                 int col, int cap, int H, int KVH, int D, float scale, int window, float *out,
                                 int nthreads);
/* The same with bfloat16 caches and bfloat16-exact values. */
LS_API void decode_attention_bf16(float *qkv, const float *cos, const float *sin, uint16_t *kcache, uint16_t *vcache,
                                  int col, int cap, int H, int KVH, int D, float scale, int window, float *out,
                                  int nthreads);
/* A prompt's T causal queries from position `start`, each over the `window` columns up to its own
 * (0: all) -> out rows `out_stride` floats apart. */
LS_API int prefill_attention_f32(const float *q, int64_t q_stride, const float *kcache, const float *vcache, int cap,
                                 int T, int start, int H, int KVH, int D, float scale, int window, float *out,
                                 int64_t out_stride, int nthreads);

/* ---- decode step: one new token of B sequences through the whole stack -> logits [B, vocab] ------ */

/* float32 activations; x [B, hidden] the embeddings, overwritten with the final residual stream. */
LS_API int decode_step_f32(const ls_stack_t *s, int B, float *x, const float *cos, const float *sin,
                           float *const *kcache, float *const *vcache, const int *slots, const int *cols, int cap,
                           float *logits, int nthreads);
/* bfloat16 activations, weights and caches (bfloat16 bits); logits float32. */
LS_API int decode_step_bf16(const ls_stack_t *s, int B, uint16_t *x_bits, const uint16_t *cos_bits,
                            const uint16_t *sin_bits, uint16_t *const *kcache, uint16_t *const *vcache,
                            const int *slots, const int *cols, int cap, float *logits, int nthreads);

/* ---- argmax ------------------------------------------------------------------------------------- */

/* Each row's first largest value (its first NaN if any): x [rows, cols] -> out [rows]. */
LS_API void argmax_rows_f32(const float *x, int rows, int cols, int64_t *out);

#endif
