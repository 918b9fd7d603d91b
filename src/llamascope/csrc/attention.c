/*
 * Attention over the KV cache: of one new token (the decode case), for float32 and bfloat16 caches,
 * and of a prompt's tokens (prefill_attention_f32, at the end), for float32 ones.
 *
 * Given the token's fused projection qkv = [q (H*D) | k (KVH*D) | v (KVH*D)]: RoPE on q and k
 * (rotate-half layout), k and v written to cache column `col` (caches are [KVH, cap, D]), then
 * for each query head h, reading KV head h / (H / KVH):
 *     out[h] = softmax(q[h] . k[0..col] * scale) . v[0..col]
 * Heads are shared between threads when there is enough work; each head's numbers do not depend
 * on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

/* Below this much work (columns x heads x head_dim, over all rows) one thread does all heads. Two
 * threads already win at a few thousand (SmolLM2 at 100 columns: 4.7 against 7.8 us a layer), but
 * each parallel region is a barrier, which costs far more whenever another process holds the
 * second core (a server beside its clients measured 10% slower); from here on the gain is
 * worth it (SmolLM2 at 500 columns: 22 against 44 us). */
#ifndef ATTENTION_PARALLEL_WORK
#define ATTENTION_PARALLEL_WORK 65536
#endif
/* Scores of up to this many columns live on the stack. */
#define STACK_COLUMNS 4096

/* 16 cache values from element i on (lanes outside `m` are 0), as float32. */
static inline __attribute__((always_inline)) __m512 load16(const int bf16, const void *base, int64_t i,
                                                           __mmask16 m) {
    if (bf16) {
        const __m256i h = _mm256_maskz_loadu_epi16(m, (const uint16_t *)base + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(m, (const float *)base + i);
}

/*
 * One query head: out[D] = softmax(q . keys[s] * scale over s < S) . values. scores: scratch [S].
 * float32 (bf16 = 0): each exponential is divided by their sum, then weights the values, as
 * softmax followed by a product does. bfloat16 (bf16 = 1), as PyTorch's CPU kernel: the
 * exponentials are summed in float32 and rounded to bfloat16 for the product with the values,
 * the sum divides at the end, and the output is rounded to bfloat16.
 */
static inline __attribute__((always_inline)) void attend_head(const int bf16, const float *q, const void *keys,
                                                              const void *values, int S, int D, float scale,
                                                              float *scores, float *out) {
    float top = -INFINITY;
    for (int s = 0; s < S; s++) {
        __m512 acc = _mm512_setzero_ps();
        for (int d = 0; d < D; d += 16) {
            const __mmask16 m = tail_mask(d, D);
            acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + d), load16(bf16, keys, (int64_t)s * D + d, m), acc);
        }
        scores[s] = _mm512_reduce_add_ps(acc) * scale;
        if (scores[s] > top) top = scores[s];
    }
    const __m512 top16 = _mm512_set1_ps(top);
    __m512 sum = _mm512_setzero_ps();
    for (int s = 0; s < S; s += 16) {
        const __mmask16 m = tail_mask(s, S);
        const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, scores + s), top16));
        sum = _mm512_mask_add_ps(sum, m, sum, e);
        _mm512_mask_storeu_ps(scores + s, m, bf16 ? bf_v(e) : e);
    }
    const float total = _mm512_reduce_add_ps(sum);
    if (!bf16) {
        const __m512 total16 = _mm512_set1_ps(total);
        for (int s = 0; s < S; s += 16) {
            const __mmask16 m = tail_mask(s, S);
            _mm512_mask_storeu_ps(scores + s, m, _mm512_div_ps(_mm512_maskz_loadu_ps(m, scores + s), total16));
        }
    }
    /* 64 output values at a time, summed in registers over the columns. */
    for (int d0 = 0; d0 < D; d0 += 64) {
        const __mmask16 m0 = tail_mask(d0, D), m1 = tail_mask(d0 + 16, D);
        const __mmask16 m2 = tail_mask(d0 + 32, D), m3 = tail_mask(d0 + 48, D);
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int s = 0; s < S; s++) {
            const __m512 p = _mm512_set1_ps(scores[s]);
            const int64_t row = (int64_t)s * D + d0;
            a0 = _mm512_fmadd_ps(p, load16(bf16, values, row, m0), a0);
            a1 = _mm512_fmadd_ps(p, load16(bf16, values, row + 16, m1), a1);
            a2 = _mm512_fmadd_ps(p, load16(bf16, values, row + 32, m2), a2);
            a3 = _mm512_fmadd_ps(p, load16(bf16, values, row + 48, m3), a3);
        }
        if (bf16) {
            const __m512 total16 = _mm512_set1_ps(total);
            a0 = bf_v(_mm512_div_ps(a0, total16));
            a1 = bf_v(_mm512_div_ps(a1, total16));
            a2 = bf_v(_mm512_div_ps(a2, total16));
            a3 = bf_v(_mm512_div_ps(a3, total16));
        }
        _mm512_mask_storeu_ps(out + d0, m0, a0);
        _mm512_mask_storeu_ps(out + d0 + 16, m1, a1);
        _mm512_mask_storeu_ps(out + d0 + 32, m2, a2);
        _mm512_mask_storeu_ps(out + d0 + 48, m3, a3);
    }
}

/* The first cache column a query at column `col` sees: 0, or with a sliding window (window > 0)
 * col - window + 1 (it sees `window` columns, its own included). */
static inline int first_column(int col, int window) {
    return window > 0 && col + 1 > window ? col + 1 - window : 0;
}

/* Every query head of B sequences in one parallel region. Sequence b: its queries at q + b * q_stride
 * ([H, D]), its caches at element slots[b] * row_elems of kcache / vcache ([KVH, cap, D] each), its
 * columns first_column(cols[b], window)..cols[b]; out [B, H * D]. */
static inline __attribute__((always_inline)) void attend_rows(const int bf16, int B, const float *q, int64_t q_stride,
                                                              const void *kcache, const void *vcache,
                                                              int64_t row_elems, const int *slots, const int *cols,
                                                              int cap, int H, int KVH, int D, float scale, int window,
                                                              float *out, int nthreads) {
    const int group = H / KVH;
    const int64_t elem = bf16 ? 2 : 4;
    int64_t work = 0;
    int widest = 0;
    for (int b = 0; b < B; b++) {
        const int seen = cols[b] + 1 - first_column(cols[b], window);
        work += (int64_t)seen * H * D;
        if (seen > widest) widest = seen;
    }
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && work >= ATTENTION_PARALLEL_WORK)
    {
        float stack[STACK_COLUMNS];
        float *scores = widest <= STACK_COLUMNS ? stack : (float *)malloc(sizeof(float) * widest);
#pragma omp for schedule(static)
        for (int i = 0; i < B * H; i++) {
            const int b = i / H, h = i % H, first = first_column(cols[b], window);
            const int64_t offset = (slots[b] * row_elems + (int64_t)(h / group) * cap * D + (int64_t)first * D) * elem;
            float *o = out + ((int64_t)b * H + h) * D;
            if (scores)
                attend_head(bf16, q + b * q_stride + (int64_t)h * D, (const char *)kcache + offset,
                            (const char *)vcache + offset, cols[b] + 1 - first, D, scale, scores, o);
            else
                for (int d = 0; d < D; d++) o[d] = NAN;  /* out of memory: visible, not wrong */
        }
        if (scores != stack) free(scores);
    }
}

/* Rotate-half RoPE in place on n heads of size D: x = x * cos + rotate_half(x) * sin. With `bf16`,
 * as PyTorch computes it in bfloat16: each product and the sum rounded (without, a * c + (-b * s)
 * is exactly a * c - b * s). */
static inline __attribute__((always_inline)) void rope_heads(const int bf16, float *x, int n, int D,
                                                             const float *cos, const float *sin) {
    const int half = D / 2;
    for (int h = 0; h < n; h++) {
        float *v = x + (int64_t)h * D;
        for (int i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            if (bf16) {
                v[i] = bf(bf(a * cos[i]) + bf(-b * sin[i]));
                v[i + half] = bf(bf(b * cos[i + half]) + bf(a * sin[i + half]));
            } else {
                v[i] = a * cos[i] + -b * sin[i];
                v[i + half] = b * cos[i + half] + a * sin[i + half];
            }
        }
    }
}

/* RoPE in place on the first `heads` heads of size D of each of `rows` rows (a prompt's fused q, k, v
 * projections, q and k first, `stride` floats apart), row r with its own tables cos / sin + r * D:
 * the float32 products and sums PyTorch's x * cos + rotate_half(x) * sin makes. */
void rope_rows_f32(float *x, int rows, int64_t stride, int heads, int D, const float *cos, const float *sin,
                   int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static) if (rows > 8 && nthreads > 1)
    for (int r = 0; r < rows; r++)
        rope_heads(0, x + r * stride, heads, D, cos + (int64_t)r * D, sin + (int64_t)r * D);
}

/* RoPE on one token's q and k (of its fused projection qkv), then k and v into cache column `col`
 * ([KVH, cap, D] caches, float32 or bfloat16 bits). */
static inline __attribute__((always_inline)) void rope_and_store(const int bf16, float *qkv, const float *cos,
                                                                 const float *sin, void *kcache, void *vcache, int col,
                                                                 int cap, int H, int KVH, int D) {
    float *q = qkv, *k = qkv + (int64_t)H * D, *v = k + (int64_t)KVH * D;
    rope_heads(bf16, q, H, D, cos, sin);
    rope_heads(bf16, k, KVH, D, cos, sin);
    for (int h = 0; h < KVH; h++) {
        const int64_t at = ((int64_t)h * cap + col) * D;
        if (bf16)
            for (int d = 0; d < D; d++) {
                ((uint16_t *)kcache)[at + d] = bf_bits(k[(int64_t)h * D + d]);
                ((uint16_t *)vcache)[at + d] = bf_bits(v[(int64_t)h * D + d]);
            }
        else {
            memcpy((float *)kcache + at, k + (int64_t)h * D, D * sizeof(float));
            memcpy((float *)vcache + at, v + (int64_t)h * D, D * sizeof(float));
        }
    }
}

/* B sequences, one new token each: row b's fused projection at qkv + b * (H + 2 KVH) * D, its
 * rotary tables at cos / sin + b * D, its caches at element slots[b] * row_elems, new column
 * cols[b], a sliding window of `window` columns (0: none); out [B, H * D]. All heads of all rows
 * share one parallel region. */
static inline __attribute__((always_inline)) void attention_rows(const int bf16, int B, float *qkv, const float *cos,
                                                                 const float *sin, void *kcache, void *vcache,
                                                                 int64_t row_elems, const int *slots, const int *cols,
                                                                 int cap, int H, int KVH, int D, float scale,
                                                                 int window, float *out, int nthreads) {
    const int64_t QKV = (int64_t)(H + 2 * KVH) * D, elem = bf16 ? 2 : 4;
    for (int b = 0; b < B; b++)
        rope_and_store(bf16, qkv + b * QKV, cos + (int64_t)b * D, sin + (int64_t)b * D,
                       (char *)kcache + slots[b] * row_elems * elem, (char *)vcache + slots[b] * row_elems * elem,
                       cols[b], cap, H, KVH, D);
    attend_rows(bf16, B, qkv, QKV, kcache, vcache, row_elems, slots, cols, cap, H, KVH, D, scale, window, out,
                nthreads);
}

void decode_attention_rows_f32(int B, float *qkv, const float *cos, const float *sin, float *kcache, float *vcache,
                               int64_t row_elems, const int *slots, const int *cols, int cap, int H, int KVH, int D,
                               float scale, int window, float *out, int nthreads) {
    attention_rows(0, B, qkv, cos, sin, kcache, vcache, row_elems, slots, cols, cap, H, KVH, D, scale, window, out,
                   nthreads);
}

/* One sequence (the module path's batch-1 attention). */
void decode_attention_f32(float *qkv, const float *cos, const float *sin, float *kcache, float *vcache,
                          int col, int cap, int H, int KVH, int D, float scale, int window, float *out, int nthreads) {
    const int slot = 0;
    attention_rows(0, 1, qkv, cos, sin, kcache, vcache, 0, &slot, &col, cap, H, KVH, D, scale, window, out, nthreads);
}

/* The same for a bfloat16 model: qkv, cos, sin hold bfloat16-exact floats, the caches bfloat16
 * bits; the output is bfloat16-exact. */
void decode_attention_rows_bf16(int B, float *qkv, const float *cos, const float *sin, uint16_t *kcache,
                                uint16_t *vcache, int64_t row_elems, const int *slots, const int *cols, int cap, int H,
                                int KVH, int D, float scale, int window, float *out, int nthreads) {
    attention_rows(1, B, qkv, cos, sin, kcache, vcache, row_elems, slots, cols, cap, H, KVH, D, scale, window, out,
                   nthreads);
}

void decode_attention_bf16(float *qkv, const float *cos, const float *sin, uint16_t *kcache, uint16_t *vcache,
                           int col, int cap, int H, int KVH, int D, float scale, int window, float *out, int nthreads) {
    const int slot = 0;
    attention_rows(1, 1, qkv, cos, sin, kcache, vcache, 0, &slot, &col, cap, H, KVH, D, scale, window, out, nthreads);
}

/* ---- a prompt's causal attention (prefill), float32 ---------------------------------------------
 * T new queries of one sequence at positions start .. start + T - 1 over its cache columns
 * 0 .. start + T - 1: query t of head h (at q + t * q_stride + h * D) attends to columns
 * first_column(start + t, window) .. start + t of KV head h / (H / KVH) ([KVH, cap, D] caches; a
 * sliding window of `window` columns, 0: none); out row t at out + t * out_stride.
 * Flash-style: each KV head's keys are first transposed into panels of 64 columns, [D, 64] each,
 * so that a tile of PREFILL_ROWS queries against a panel is 16 vector sums over D; the softmax runs
 * online over the panels (running maximum and sum per query, earlier outputs rescaled), and the
 * values are summed into the tile's outputs 64 lanes at a time. A head's tiles, longest first, go
 * round-robin to the threads. D % 16 == 0. Returns 0, or -1 when scratch memory could not be had. */
#define PREFILL_ROWS 4
#define PREFILL_COLS 64

static void prefill_tile(const float *q, int64_t q_stride, const float *kt, const float *values, int D,
                         float scale, int window, int t0, int rows, int start, float *out, int64_t out_stride,
                         float *o) {
    float m[PREFILL_ROWS], l[PREFILL_ROWS];
    float p[PREFILL_ROWS][PREFILL_COLS] __attribute__((aligned(64))) = {{0}};  /* (rows past `rows` stay 0) */
    for (int r = 0; r < PREFILL_ROWS; r++) {
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(o, 0, sizeof(float) * PREFILL_ROWS * D);
    const int last = start + t0 + rows - 1;  /* the tile's last query's position: its last column */
    /* the block of the tile's first query's first column: blocks before it are outside every window */
    const int begin = first_column(start + t0, window) / PREFILL_COLS * PREFILL_COLS;
    for (int c0 = begin; c0 <= last; c0 += PREFILL_COLS) {
        const int n = last + 1 - c0 < PREFILL_COLS ? last + 1 - c0 : PREFILL_COLS;
        /* scores s[r][c0 + j] = q[r] . k[c0 + j], 4 rows x 64 columns in 16 registers */
        __m512 s[PREFILL_ROWS][4];
        for (int r = 0; r < PREFILL_ROWS; r++)
            for (int c = 0; c < 4; c++) s[r][c] = _mm512_setzero_ps();
        const float *panel = kt + (int64_t)(c0 / PREFILL_COLS) * D * PREFILL_COLS;  /* [D, 64] */
        for (int d = 0; d < D; d++) {
            const float *row = panel + d * PREFILL_COLS;
            __m512 k4[4];
            for (int c = 0; c < 4; c++) k4[c] = _mm512_maskz_loadu_ps(tail_mask(16 * c, n), row + 16 * c);
            for (int r = 0; r < PREFILL_ROWS; r++) {
                const __m512 qv = _mm512_set1_ps(r < rows ? q[(int64_t)(t0 + r) * q_stride + d] : 0.0f);
                for (int c = 0; c < 4; c++) s[r][c] = _mm512_fmadd_ps(qv, k4[c], s[r][c]);
            }
        }
        /* online softmax over this block, causal: row r sees columns up to start + t0 + r (and,
         * with a window, from first_column(start + t0 + r, window) on) */
        for (int r = 0; r < PREFILL_ROWS; r++) {  /* (constant bounds keep s in registers) */
            if (r >= rows) break;
            /* columns of this block row r sees: at least 1, except where a tile's earlier rows end
             * before the block starts (a tile straddling a block edge), or a later row's window
             * starts after it ends: then none, and the row's state is left as it is */
            const int visible = start + t0 + r + 1 - c0;
            const int hidden_below = first_column(start + t0 + r, window) - c0;
            const __m512 hidden = _mm512_set1_ps(-INFINITY);
            __m512 top = hidden;
            __mmask16 mk[4];
            for (int c = 0; c < 4; c++) {
                mk[c] = tail_mask(16 * c, visible < n ? visible : n) & (__mmask16)~tail_mask(16 * c, hidden_below);
                s[r][c] = _mm512_mask_mov_ps(hidden, mk[c], _mm512_mul_ps(s[r][c], _mm512_set1_ps(scale)));
                top = _mm512_max_ps(top, s[r][c]);
            }
            const float block_max = _mm512_reduce_max_ps(top);
            if (block_max == -INFINITY) {  /* nothing seen here: no weights, the state as it is */
                memset(p[r], 0, sizeof(p[r]));
                continue;
            }
            const float m_new = block_max > m[r] ? block_max : m[r];
            const float alpha = expf(m[r] - m_new);  /* 0 on the first block (m = -inf) */
            const __m512 mv = _mm512_set1_ps(m_new);
            __m512 sum = _mm512_setzero_ps();
            for (int c = 0; c < 4; c++) {
                const __m512 e = _mm512_mask_mov_ps(_mm512_setzero_ps(), mk[c], exp16(_mm512_sub_ps(s[r][c], mv)));
                sum = _mm512_add_ps(sum, e);
                _mm512_storeu_ps(p[r] + 16 * c, e);
            }
            l[r] = l[r] * alpha + _mm512_reduce_add_ps(sum);
            m[r] = m_new;
            if (alpha != 1.0f) {
                const __m512 a = _mm512_set1_ps(alpha);
                for (int d = 0; d < D; d += 16)
                    _mm512_storeu_ps(o + r * D + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), a));
            }
        }
        /* o[r] += sum_j p[r][j] v[c0 + j], 64 output lanes x 4 rows in registers at a time */
        for (int d0 = 0; d0 < D; d0 += 64) {
            const int w = D - d0 < 64 ? D - d0 : 64;
            __m512 acc[PREFILL_ROWS][4];
            for (int r = 0; r < PREFILL_ROWS; r++)
                for (int c = 0; c < 4; c++)
                    acc[r][c] = _mm512_maskz_loadu_ps(tail_mask(16 * c, w), o + r * D + d0 + 16 * c);
            for (int j = 0; j < n; j++) {
                const float *v = values + (int64_t)(c0 + j) * D + d0;
                __m512 v4[4];
                for (int c = 0; c < 4; c++) v4[c] = _mm512_maskz_loadu_ps(tail_mask(16 * c, w), v + 16 * c);
                for (int r = 0; r < PREFILL_ROWS; r++) {
                    const __m512 pv = _mm512_set1_ps(p[r][j]);
                    for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(pv, v4[c], acc[r][c]);
                }
            }
            for (int r = 0; r < PREFILL_ROWS; r++)
                for (int c = 0; c < 4; c++)
                    _mm512_mask_storeu_ps(o + r * D + d0 + 16 * c, tail_mask(16 * c, w), acc[r][c]);
        }
    }
    for (int r = 0; r < rows; r++) {
        const __m512 inv = _mm512_set1_ps(1.0f / l[r]);
        float *dst = out + (int64_t)(t0 + r) * out_stride;
        for (int d = 0; d < D; d += 16)
            _mm512_storeu_ps(dst + d, _mm512_mul_ps(_mm512_loadu_ps(o + r * D + d), inv));
    }
}

int prefill_attention_f32(const float *q, int64_t q_stride, const float *kcache, const float *vcache, int cap,
                          int T, int start, int H, int KVH, int D, float scale, int window, float *out,
                          int64_t out_stride, int nthreads) {
    const int S = start + T, group = H / KVH, tiles = (T + PREFILL_ROWS - 1) / PREFILL_ROWS;
    const int panels = (S + PREFILL_COLS - 1) / PREFILL_COLS;
    /* each KV head's keys as panels of 64 columns, [panels, D, 64]: a score tile's loads are one
     * contiguous 16 KB (rows S floats apart would alias in the cache's sets) */
    const int64_t head_panels = (int64_t)panels * D * PREFILL_COLS;
    float *kt = (float *)malloc(sizeof(float) * (size_t)(KVH * head_panels));
    if (!kt) return -1;
    int failed = 0;
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
    {
#pragma omp for schedule(static)
        for (int i = 0; i < KVH * panels; i++) {
            const int g = i / panels, c0 = (i % panels) * PREFILL_COLS;
            const int n = S - c0 < PREFILL_COLS ? S - c0 : PREFILL_COLS;
            const float *k = kcache + ((int64_t)g * cap + c0) * D;
            float *dst = kt + g * head_panels + (int64_t)(c0 / PREFILL_COLS) * D * PREFILL_COLS;
            for (int d = 0; d < D; d++)  /* contiguous writes, reads down a column of the cache */
                for (int j = 0; j < n; j++) dst[d * PREFILL_COLS + j] = k[(int64_t)j * D + d];
        }
        float *o = (float *)malloc(sizeof(float) * PREFILL_ROWS * D);
        if (!o) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static, 1)
        for (int i = 0; i < H * tiles; i++) {
            if (!o) continue;
            /* a head at a time (its keys and values stay in cache), its longest tiles first, dealt
             * round-robin so the threads' shares of the causal triangle are even */
            const int h = i / tiles, tile = tiles - 1 - i % tiles, g = h / group;
            const int t0 = tile * PREFILL_ROWS, rows = T - t0 < PREFILL_ROWS ? T - t0 : PREFILL_ROWS;
            prefill_tile(q + (int64_t)h * D, q_stride, kt + g * head_panels, vcache + (int64_t)g * cap * D, D,
                         scale, window, t0, rows, start, out + (int64_t)h * D, out_stride, o);
        }
        free(o);
    }
    free(kt);
    return failed ? -1 : 0;
}
