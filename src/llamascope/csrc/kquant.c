/*
 * Batch-1 products with ggml's K-quant weights (Q2_K, Q3_K, Q4_K, Q5_K, Q6_K), read as the GGUF
 * file stores them: super-blocks of 256 weights, each with its own scales.
 * y[t, n] = sum_k x[t, k] * W[n, k].
 *
 *   Q2_K  (84 bytes): scales[16], qs[64], d:f16, dmin:f16           w = d*sc_i * q - dmin*m_i
 *   Q3_K (110 bytes): hmask[32], qs[64], scales[12], d:f16          w = d*(sc_i - 32) * (q - 4)
 *   Q4_K (144 bytes): d:f16, dmin:f16, scales[12], qs[128]           w = d*sc_j * q - dmin*m_j
 *   Q5_K (176 bytes): d:f16, dmin:f16, scales[12], qh[32], qs[128]   the same with a fifth bit
 *   Q6_K (210 bytes): ql[128], qh[64], scales:int8[16], d:f16        w = d*sc_i * (q - 32)
 *
 * Q4_K and Q5_K have eight sub-blocks of 32 weights, each with a 6-bit scale sc_j and minimum m_j
 * packed into `scales`. In qs, 32-byte chunk c holds sub-block 2c in its low nibbles and 2c + 1 in
 * its high nibbles; Q5_K's fifth bit of weight l of sub-block j is bit j of qh[l]. Q6_K has sixteen
 * sub-blocks of 16 weights with int8 scales; each half h (128 weights) takes ql[64h .. 64h + 63]
 * (low nibbles: weights 0-63 of the half, high nibbles: 64-127) and qh[32h .. 32h + 31], whose bit
 * pairs 0, 2, 4, 6 of byte l are the top bits of the half's weights l, l + 32, l + 64, l + 96.
 * Q2_K and Q3_K also have sixteen sub-blocks of 16: each half h takes qs[32h .. 32h + 31], whose
 * bit pairs 0, 2, 4, 6 of byte l are the low two bits of the half's weights l, l + 32, l + 64,
 * l + 96. Q2_K's scales byte i holds sc_i (low nibble) and m_i (high nibble); Q3_K's third bit of
 * the half's weight l + 32j is bit 4h + j of hmask[l], and its 6-bit scales are packed in 12 bytes:
 * bytes 0-7 hold the low nibbles of sc_0..7 (low nibbles) and sc_8..15 (high nibbles), and bit
 * pair p of byte 8 + b is the top two bits of sc_{4p + b}.
 *
 * As for the 32-weight formats (gemv.c) the activations are quantised to 8 bits per 32-wide block
 * (scale d_x, sum s_x = d_x * sum q_x), and VNNI multiplies 64 unsigned weight values by 64
 * activations at a time into 16 int32 lanes of four products each. Each lane is then scaled in
 * float by its weight scale and its activation scale. The activations are laid out once per call
 * so that each 64-byte weight vector meets its own 64 activations (a "slot"):
 *   Q4_K, Q5_K: the four slots of a super-block are sub-blocks (0, 2), (1, 3), (4, 6), (5, 7): the
 *               low then the high nibbles of qs bytes 0-63, then of bytes 64-127;
 *   Q2_K, Q3_K, Q6_K: the natural order (Q6_K: the low then the high nibbles of each half's ql).
 * Minimums (Q4_K, Q5_K) add -dmin*m_j * s_x per sub-block; Q6_K's offset -32 adds -32 d*sc_i times
 * d_x times the sum of sub-block i's activations, Q3_K's -4 likewise, and Q2_K's minimums
 * -dmin*m_i times the same 16-activation sums.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "kernels.h"
#include "simd.h"

#define QK 32
#define QK_K 256
#define SLOTS 4          /* 64-weight vectors per super-block */
#define KQ_ROWS 8        /* activation rows a weight row is unpacked once for */
/* How far ahead a super-block's lines are prefetched (simd.h's prefetch_at, into L2). This
 * kernel does more work a byte than the Q8_0 and Q4 ones, so a shorter distance suffices: on the
 * Xeon, the 1.1B Q4_K_M file's matrices read at 23 GB/s 2 KB ahead, 20 GB/s 8 KB ahead, 16.5 GB/s
 * without prefetching (Q3_K_M's 18.7 / 18.1 / -). */
#ifndef KQUANT_PREFETCH_AHEAD
#define KQUANT_PREFETCH_AHEAD 2048
#endif

static int kquant_bytes(int format) {
    switch (format) {
        case LS_Q2_K: return 84;
        case LS_Q3_K: return 110;
        case LS_Q4_K: return 144;
        case LS_Q5_K: return 176;
        default: return 210;
    }
}

/* Sixteen sub-blocks of 16 weights (Q2_K, Q3_K, Q6_K), against eight of 32 (Q4_K, Q5_K). */
static inline int per16(int format) { return format != LS_Q4_K && format != LS_Q5_K; }

/* Q3_K: the 12 packed bytes -> the sixteen scales sc_i - 32 as int8: low nibbles of bytes 0-7
 * then their high nibbles, each with bit pair i / 4 of byte 8 + i % 4 on top */
static inline __m128i k3_scales(const uint8_t *s) {
    const __m128i bytes = _mm_loadl_epi64((const __m128i *)s), nibble = _mm_set1_epi8(0x0F);
    const __m128i low = _mm_unpacklo_epi64(_mm_and_si128(bytes, nibble),
                                           _mm_and_si128(_mm_srli_epi16(bytes, 4), nibble));
    int32_t packed;
    memcpy(&packed, s + 8, 4);
    const __m128i top = _mm_and_si128(_mm_srlv_epi32(_mm_set1_epi32(packed), _mm_setr_epi32(0, 2, 4, 6)),
                                      _mm_set1_epi8(3));
    return _mm_sub_epi8(_mm_or_si128(low, _mm_slli_epi16(top, 4)), _mm_set1_epi8(32));
}

/* 32 bytes v -> 64: [v >> s1, v >> s2] (per 16-bit lane; only bits that stay within their byte are used). */
static inline __m512i pair_shifted(const uint8_t *p, int s1, int s2) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(v, s1)), _mm256_srli_epi16(v, s2), 1);
}

/* The two 32-weight blocks of a super-block that slot k's 64 activations come from. */
static void slot_blocks(int format, int k, int *a, int *b) {
    static const int pairs[SLOTS][2] = {{0, 2}, {1, 3}, {4, 6}, {5, 7}};
    if (per16(format)) {
        *a = 2 * k;
        *b = 2 * k + 1;
    } else {
        *a = pairs[k][0];
        *b = pairs[k][1];
    }
}

/* Q4_K / Q5_K: the 12 packed bytes -> sc[0..7] in bytes 0-7, m[0..7] in bytes 8-15. Bytes 0-3 hold
 * sc[0..3] (low 6 bits) and the top bits of sc[4..7]; bytes 4-7 hold m[0..3] and the top bits of
 * m[4..7]; bytes 8-11 hold the low 4 bits of sc[4..7] (low nibbles) and of m[4..7] (high nibbles). */
static inline __m128i k4_scales_mins(const uint8_t *s) {
    uint32_t a, b, c;
    memcpy(&a, s, 4);
    memcpy(&b, s + 4, 4);
    memcpy(&c, s + 8, 4);
    const uint32_t sc_lo = a & 0x3F3F3F3Fu, m_lo = b & 0x3F3F3F3Fu;
    const uint32_t sc_hi = (c & 0x0F0F0F0Fu) | (((a >> 6) & 0x03030303u) << 4);
    const uint32_t m_hi = ((c >> 4) & 0x0F0F0F0Fu) | (((b >> 6) & 0x03030303u) << 4);
    return _mm_setr_epi32((int)sc_lo, (int)sc_hi, (int)m_lo, (int)m_hi);
}

/* A super-block's scales as floats. scale: d*sc per 16 weights (Q2_K, Q3_K, Q6_K; Q3_K's sc less 32)
 * or per 32 (Q4_K, Q5_K, lanes 0-7); offset: what multiplies each 16 activations' sum (Q6_K and
 * Q3_K d*sc, to be scaled by their offsets 32 and 4; Q2_K dmin*m); mins: Q4_K/Q5_K dmin*m per 32. */
typedef struct { __m512 scale, offset; __m256 mins; } sb_scales_t;

static inline __attribute__((always_inline)) sb_scales_t sb_scales(const int format, const uint8_t *blk) {
    sb_scales_t r = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm256_setzero_ps()};
    if (format == LS_Q2_K) {
        const __m128i sm = _mm_loadu_si128((const __m128i *)blk), low = _mm_set1_epi8(0x0F);
        r.scale = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(sm, low))), _mm512_set1_ps(f16(blk + 80)));
        r.offset = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(sm, 4), low))),
                                 _mm512_set1_ps(f16(blk + 82)));
    } else if (format == LS_Q3_K) {
        r.scale = r.offset = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(k3_scales(blk + 96))),
                                           _mm512_set1_ps(f16(blk + 108)));
    } else if (format == LS_Q6_K) {
        r.scale = r.offset = _mm512_mul_ps(
            _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(blk + 192)))), _mm512_set1_ps(f16(blk + 208)));
    } else {
        const __m128i sm = k4_scales_mins(blk + 4);
        r.scale = _mm512_castps256_ps512(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(sm)), _mm256_set1_ps(f16(blk))));
        r.mins = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(sm, 8))), _mm256_set1_ps(f16(blk + 2)));
    }
    return r;
}

static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* 32 bytes v -> 64: [v, v >> 2] (per 16-bit lane; only bits that stay within their byte are used). */
static inline __m512i twice_shifted(const uint8_t *p) {
    const __m256i v = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_inserti64x4(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 2), 1);
}

/* A super-block's weights as unsigned bytes, slot by slot (see the slot order above). */
static inline __attribute__((always_inline)) void sb_values(const int format, const uint8_t *blk, __m512i q[SLOTS]) {
    const __m512i low4 = _mm512_set1_epi8(0x0F), one = _mm512_set1_epi8(1), three = _mm512_set1_epi8(3);
    if (format == LS_Q2_K) {
        for (int k = 0; k < SLOTS; k++)  /* half k / 2, bit pairs 2 (k % 2) and 2 (k % 2) + 1 */
            q[k] = _mm512_and_si512(pair_shifted(blk + 16 + 32 * (k / 2), 4 * (k % 2), 4 * (k % 2) + 2), three);
    } else if (format == LS_Q3_K) {
        for (int k = 0; k < SLOTS; k++) {
            const int h = k / 2, j = 2 * (k % 2);
            const __m512i low2 = _mm512_and_si512(pair_shifted(blk + 32 + 32 * h, 2 * j, 2 * j + 2), three);
            const __m512i top = _mm512_and_si512(pair_shifted(blk, 4 * h + j, 4 * h + j + 1), one);
            q[k] = _mm512_or_si512(low2, _mm512_slli_epi16(top, 2));
        }
    } else if (format == LS_Q6_K) {
        for (int h = 0; h < 2; h++) {
            const __m512i v = _mm512_loadu_si512((const void *)(blk + 64 * h));
            const __m512i top = twice_shifted(blk + 128 + 32 * h);  /* bit pairs (0, 2) | (4, 6) */
            q[2 * h] = _mm512_or_si512(_mm512_and_si512(v, low4), _mm512_slli_epi16(_mm512_and_si512(top, three), 4));
            q[2 * h + 1] = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(v, 4), low4),
                                           _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(top, 4), three), 4));
        }
    } else {
        const uint8_t *qs = blk + (format == LS_Q5_K ? 48 : 16);
        for (int h = 0; h < 2; h++) {
            const __m512i v = _mm512_loadu_si512((const void *)(qs + 64 * h));
            q[2 * h] = _mm512_and_si512(v, low4);
            q[2 * h + 1] = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
        }
        if (format == LS_Q5_K) {  /* slot k's two sub-blocks take qh bits (0, 2), (1, 3), (4, 6), (5, 7) */
            const __m512i top = twice_shifted(blk + 16);
            q[0] = _mm512_or_si512(q[0], _mm512_slli_epi16(_mm512_and_si512(top, one), 4));
            q[1] = _mm512_or_si512(q[1], _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(top, 1), one), 4));
            q[2] = _mm512_or_si512(q[2], _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(top, 4), one), 4));
            q[3] = _mm512_or_si512(q[3], _mm512_slli_epi16(_mm512_and_si512(_mm512_srli_epi16(top, 5), one), 4));
        }
    }
}

/* One weight row against `rows` activation rows (rows <= KQ_ROWS), prepared by gemv_kquant_f32:
 * xp [rows][K] int8 in slot order; xd, xs [rows][K/32] each block's d_x and s_x (natural order);
 * xs16 [rows][K/16] (Q6_K) d_x * the sum of each 16 activations. Every row goes through the same
 * operations in the same order, so a result does not depend on how many rows were computed with it. */
static inline __attribute__((always_inline)) void kquant_rows_impl(
        const int format, const uint8_t *row, const int nsb, const int8_t *xp, const float *xd, const float *xs,
        const float *xs16, const int64_t K, const int rows, float *out) {
    const int bytes = kquant_bytes(format);
    const int64_t nb = K / QK;
    /* which of the 16 scale lanes each lane of a slot takes: Q4_K/Q5_K sub-blocks (lanes 0-7 of the
     * scale vector); Q6_K 16-weight sub-blocks (four lanes each) */
    const __m512i pick4[SLOTS] = {
        _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 2, 2, 2, 2, 2, 2, 2, 2),
        _mm512_setr_epi32(1, 1, 1, 1, 1, 1, 1, 1, 3, 3, 3, 3, 3, 3, 3, 3),
        _mm512_setr_epi32(4, 4, 4, 4, 4, 4, 4, 4, 6, 6, 6, 6, 6, 6, 6, 6),
        _mm512_setr_epi32(5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 7, 7, 7, 7, 7)};
    const __m512i pick6[SLOTS] = {
        _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3),
        _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7),
        _mm512_setr_epi32(8, 8, 8, 8, 9, 9, 9, 9, 10, 10, 10, 10, 11, 11, 11, 11),
        _mm512_setr_epi32(12, 12, 12, 12, 13, 13, 13, 13, 14, 14, 14, 14, 15, 15, 15, 15)};
    const __m512i pairs = _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
    /* two sums per row (even and odd slots), so that a super-block's four products are two chains
     * of two dependent fused multiply-adds, not one of four */
    __m512 acc[KQ_ROWS][2], extra[KQ_ROWS];  /* extra: Q6_K's and Q3_K's offsets, Q2_K's minimums */
    __m256 minsum[KQ_ROWS];                  /* Q4_K/Q5_K's minimum terms */
    for (int t = 0; t < rows; t++) {
        acc[t][0] = acc[t][1] = _mm512_setzero_ps();
        extra[t] = _mm512_setzero_ps();
        minsum[t] = _mm256_setzero_ps();
    }
    /* Each super-block's scales and values are worked out one super-block ahead: their chains (scalar
     * loads, bit unpacking, conversion) then overlap the previous super-block's products instead of
     * holding up the sums while its bytes come from memory. */
    sb_scales_t next = sb_scales(format, row);
    __m512i next_q[SLOTS];
    sb_values(format, row, next_q);
    for (int sb = 0; sb < nsb; sb++) {
        const uint8_t *blk = row + (int64_t)sb * bytes;
        for (int i = 0; i < bytes; i += 64) prefetch_at(blk + i, KQUANT_PREFETCH_AHEAD);
        const sb_scales_t cur = next;
        if (sb + 1 < nsb) next = sb_scales(format, blk + bytes);
        const __m512 scale = cur.scale, offset = cur.offset;
        const __m256 mins = cur.mins;
        __m512i q[SLOTS];  /* the super-block's weights as unsigned bytes, slot by slot */
        for (int k = 0; k < SLOTS; k++) q[k] = next_q[k];
        if (sb + 1 < nsb) sb_values(format, blk + bytes, next_q);
        for (int t = 0; t < rows; t++) {
            const float *d8 = xd + t * nb + sb * 8;  /* the super-block's eight activation scales */
            __m512 s;  /* weight scale times activation scale, per scale lane */
            if (per16(format)) {
                s = _mm512_mul_ps(scale, _mm512_permutexvar_ps(pairs, _mm512_castps256_ps512(_mm256_loadu_ps(d8))));
                extra[t] = _mm512_fmadd_ps(offset, _mm512_loadu_ps(xs16 + t * (K / 16) + sb * 16), extra[t]);
            } else {
                s = _mm512_mul_ps(scale, _mm512_castps256_ps512(_mm256_loadu_ps(d8)));
                minsum[t] = _mm256_fmadd_ps(mins, _mm256_loadu_ps(xs + t * nb + sb * 8), minsum[t]);
            }
            const int8_t *x = xp + t * K + (int64_t)sb * QK_K;
            for (int k = 0; k < SLOTS; k++) {
                const __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), q[k], _mm512_loadu_si512((const void *)(x + 64 * k)));
                acc[t][k & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),
                                                _mm512_permutexvar_ps(per16(format) ? pick6[k] : pick4[k], s),
                                                acc[t][k & 1]);
            }
        }
    }
    /* Q6_K's values are q - 32: 32 times each 16 weights' scale times their activations' sum (Q3_K's
     * q - 4 the same with 4; Q2_K's minimums once) */
    const float times = format == LS_Q6_K ? 32.0f : format == LS_Q3_K ? 4.0f : 1.0f;
    for (int t = 0; t < rows; t++)
        out[t] = _mm512_reduce_add_ps(_mm512_add_ps(acc[t][0], acc[t][1])) -
                 (per16(format) ? times * _mm512_reduce_add_ps(extra[t]) : sum8(minsum[t]));
}

static void kquant_rows(int format, const uint8_t *row, int nsb, const int8_t *xp, const float *xd, const float *xs,
                        const float *xs16, int64_t K, int rows, float *out) {
#define KQ_CASE(R)                                                                                     \
    case R:                                                                                            \
        if (format == LS_Q4_K) kquant_rows_impl(LS_Q4_K, row, nsb, xp, xd, xs, xs16, K, R, out);  \
        else if (format == LS_Q5_K) kquant_rows_impl(LS_Q5_K, row, nsb, xp, xd, xs, xs16, K, R, out); \
        else if (format == LS_Q2_K) kquant_rows_impl(LS_Q2_K, row, nsb, xp, xd, xs, xs16, K, R, out); \
        else if (format == LS_Q3_K) kquant_rows_impl(LS_Q3_K, row, nsb, xp, xd, xs, xs16, K, R, out); \
        else kquant_rows_impl(LS_Q6_K, row, nsb, xp, xd, xs, xs16, K, R, out);                    \
        break;
    switch (rows) {
        KQ_CASE(1) KQ_CASE(2) KQ_CASE(3) KQ_CASE(4) KQ_CASE(5) KQ_CASE(6) KQ_CASE(7) KQ_CASE(8)
    }
#undef KQ_CASE
}

/* y[T, N] = x[T, K] @ W^T, W [N, K/256 super-blocks] in format 3 (Q4_K), 4 (Q5_K), 5 (Q6_K), 6 (Q2_K) or
 * 7 (Q3_K); x float32,
 * K % 256 == 0. Returns 0, or -1 when scratch memory ran out. */
int gemv_kquant_f32(int format, const uint8_t *w, int N, int K, const float *x, int T, float *y, int nthreads) {
    const int nb = K / QK, nsb = K / QK_K;
    const int64_t row_bytes = (int64_t)nsb * kquant_bytes(format);
    /* per activation row: xd, xs [nb], xs16 [K/16] floats; xq, xp [K] int8 */
    const int64_t per_row = 2 * (int64_t)nb * 4 + (int64_t)K / 16 * 4 + 2 * (int64_t)K;
    const int64_t need = ((int64_t)T * per_row + 63) / 64 * 64;
    /* on the stack for the decode case (as gemv.c's kernels), on the heap for many rows */
    _Alignas(64) uint8_t stack[65536];
    uint8_t *scratch = need <= (int64_t)sizeof(stack) ? stack : (uint8_t *)aligned_alloc(64, need);
    if (!scratch) return -1;
    float *xd = (float *)scratch, *xs = xd + (int64_t)T * nb, *xs16 = xs + (int64_t)T * nb;
    int8_t *xq = (int8_t *)(xs16 + (int64_t)T * K / 16), *xp = xq + (int64_t)T * K;
    quantize_act_q8(x, T, K, xq, xd, xs);
    for (int t = 0; t < T; t++) {
        const int8_t *q = xq + (int64_t)t * K;
        for (int sb = 0; sb < nsb; sb++)
            for (int k = 0; k < SLOTS; k++) {
                int a, b;
                slot_blocks(format, k, &a, &b);
                int8_t *dst = xp + (int64_t)t * K + (int64_t)sb * QK_K + 64 * k;
                memcpy(dst, q + ((int64_t)sb * 8 + a) * QK, QK);
                memcpy(dst + QK, q + ((int64_t)sb * 8 + b) * QK, QK);
            }
        if (per16(format))
            for (int i = 0; i < K / 16; i++) {
                int sum = 0;
                for (int j = 0; j < 16; j++) sum += q[16 * i + j];
                xs16[(int64_t)t * (K / 16) + i] = xd[(int64_t)t * nb + i / 2] * (float)sum;
            }
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        float out[KQ_ROWS];
        for (int t0 = 0; t0 < T; t0 += KQ_ROWS) {
            const int rows = T - t0 < KQ_ROWS ? T - t0 : KQ_ROWS;
            kquant_rows(format, w + n * row_bytes, nsb, xp + (int64_t)t0 * K, xd + (int64_t)t0 * nb,
                        xs + (int64_t)t0 * nb, xs16 + (int64_t)t0 * (K / 16), K, rows, out);
            for (int r = 0; r < rows; r++) y[(int64_t)(t0 + r) * N + n] = out[r];
        }
    }
    if (scratch != stack) free(scratch);
    return 0;
}

/* ---- dequantisation for long inputs (prefill) ----------------------------------------------------
 * W as float32 (or bfloat16, rounded to nearest even), with the arithmetic of ggml's reference
 * (and gguf-py's): Q2_K, Q4_K, Q5_K (d*sc) * q - (dmin*m), Q3_K (d*sc) * (q - 4), Q6_K
 * (d*sc) * (q - 32), each product and
 * difference rounded on its own (the library is built without floating-point contraction). */

/* 16 weight values (bytes at p, plus `add` from the top bits) as floats */
static inline __m512 values16(const uint8_t *p, int shift, __m128i mask, __m128i top) {
    __m128i v = _mm_loadu_si128((const __m128i *)p);
    v = _mm_and_si128(shift ? _mm_srli_epi16(v, 4) : v, mask);
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_or_si128(v, top)));
}

void dequant_kquant(int format, const uint8_t *w, int N, int K, void *out, int bf16, int nthreads) {
    const int nsb = K / QK_K, bytes = kquant_bytes(format);
    const __m128i low4 = _mm_set1_epi8(0x0F), zero = _mm_setzero_si128();
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int n = 0; n < N; n++) {
        for (int sb = 0; sb < nsb; sb++) {
            const uint8_t *blk = w + ((int64_t)n * nsb + sb) * bytes;
            const int64_t base = (int64_t)n * K + (int64_t)sb * QK_K;
            if (format == LS_Q2_K || format == LS_Q3_K) {
                /* sub-block i = 8h + 2j + c: weights 32j + 16c .. + 15 of half h, bit pair j of
                 * qs[32h + 16c ..] (Q3_K: and bit 4h + j of hmask[16c ..]) */
                int8_t sc3[16];
                if (format == LS_Q3_K) _mm_storeu_si128((__m128i *)sc3, k3_scales(blk + 96));
                const uint8_t *qs = blk + (format == LS_Q2_K ? 16 : 32);
                const float d = f16(blk + (format == LS_Q2_K ? 80 : 108)), dmin = f16(blk + 82);
                for (int i = 0; i < 16; i++) {
                    const int h = i / 8, j = (i % 8) / 2, c = i % 2;
                    __m128i v = _mm_loadu_si128((const __m128i *)(qs + 32 * h + 16 * c));
                    v = _mm_and_si128(_mm_srli_epi16(v, 2 * j), _mm_set1_epi8(3));
                    __m512 y;
                    if (format == LS_Q2_K) {
                        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(v));
                        y = _mm512_sub_ps(_mm512_mul_ps(_mm512_set1_ps(d * (float)(blk[i] & 0x0F)), q),
                                          _mm512_set1_ps(dmin * (float)(blk[i] >> 4)));
                    } else {
                        __m128i top = _mm_loadu_si128((const __m128i *)(blk + 16 * c));
                        top = _mm_and_si128(_mm_srli_epi16(top, 4 * h + j), _mm_set1_epi8(1));
                        const __m512 q = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_or_si128(v, _mm_slli_epi16(top, 2))));
                        y = _mm512_mul_ps(_mm512_set1_ps(d * (float)sc3[i]), _mm512_sub_ps(q, _mm512_set1_ps(4.0f)));
                    }
                    store16(out, base + 16 * i, bf16, y);
                }
            } else if (format == LS_Q6_K) {
                const float d = f16(blk + 208);
                const int8_t *sc = (const int8_t *)(blk + 192);
                for (int h = 0; h < 2; h++) {
                    const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
                    for (int part = 0; part < 4; part++) {  /* weights 32 * part .. + 31 of the half */
                        for (int c = 0; c < 2; c++) {        /* 16 at a time */
                            const int l = 16 * c;
                            __m128i top = _mm_loadu_si128((const __m128i *)(qh + l));
                            top = _mm_and_si128(_mm_srli_epi16(top, 2 * part), _mm_set1_epi8(3));
                            top = _mm_slli_epi16(top, 4);
                            const __m512 q = values16(ql + (part & 1) * 32 + l, part >> 1, low4, top);
                            const int idx = 8 * h + (32 * part + l) / 16;
                            const __m512 s = _mm512_set1_ps(d * (float)sc[idx]);
                            store16(out, base + 128 * h + 32 * part + l, bf16,
                                  _mm512_mul_ps(s, _mm512_sub_ps(q, _mm512_set1_ps(32.0f))));
                        }
                    }
                }
            } else {
                const float d = f16(blk), dmin = f16(blk + 2);
                uint8_t sm[16];
                _mm_storeu_si128((__m128i *)sm, k4_scales_mins(blk + 4));
                const uint8_t *qs = blk + (format == LS_Q5_K ? 48 : 16), *qh = blk + 16;
                for (int j = 0; j < 8; j++) {  /* sub-block j: chunk j / 2, low (even j) or high nibbles */
                    const __m512 s = _mm512_set1_ps(d * (float)sm[j]), m = _mm512_set1_ps(dmin * (float)sm[8 + j]);
                    for (int c = 0; c < 2; c++) {
                        const int l = 16 * c;
                        __m128i top = zero;
                        if (format == LS_Q5_K) {
                            top = _mm_loadu_si128((const __m128i *)(qh + l));
                            top = _mm_slli_epi16(_mm_and_si128(_mm_srli_epi16(top, j), _mm_set1_epi8(1)), 4);
                        }
                        const __m512 q = values16(qs + 32 * (j / 2) + l, j & 1, low4, top);
                        store16(out, base + 32 * j + l, bf16, _mm512_sub_ps(_mm512_mul_ps(s, q), m));
                    }
                }
            }
        }
    }
}
