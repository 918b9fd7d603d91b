/*
 * Small AVX-512 helpers shared by the kernel sources: bfloat16 conversions and rounding, a vector
 * exponential, and moving signs for 8-bit products. Built with -DLLAMASCOPE_AVX2, the AVX-512
 * operations come from avx2.h instead, as pairs of AVX2 halves.
 */
#ifndef LLAMASCOPE_SIMD_H
#define LLAMASCOPE_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#ifdef LLAMASCOPE_AVX2
#include "avx2.h"
#endif

/* Software prefetch of the weight stream a kernel reads. A thread reads its rows in order and rows
 * are contiguous, so its weights are one stream; but a row is short (288 floats on a small model,
 * about a kilobyte of Q4 on a 2048-wide one), and the hardware prefetcher, which starts over on each
 * short run of lines, then leaves the loads waiting on memory. Each line is prefetched into L2
 * (_MM_HINT_T1: into L1 the prefetches compete with the loads for L1's miss buffers), PREFETCH_AHEAD
 * bytes ahead for the block formats and PREFETCH_FLOAT_AHEAD for float32 and bfloat16 rows (but
 * gemv_bf16, bfloat16 weights with float32 activations, keeps PREFETCH_AHEAD: not measured), the
 * distances that read fastest from memory here (kernel by kernel, 384 MB matrices with rows 288 to
 * 5632 wide, builds alternated in one process, two runs: against the earlier prefetch into L1 8 KB
 * ahead, float32 and bfloat16 read 5-48% faster; prefetching float rows 8 KB ahead into L2 gained
 * less, and 1 KB ahead lost). K-quants use their own distance (kquant.c). A distance of 0 turns
 * prefetching off. The helpers are always_inline: as plain `static inline` functions called from
 * the always_inline row kernels, GCC 12 judged them free of side effects before inlining them and deleted the calls,
 * so until 2026-11-27 the Q4, multi-row Q8_0 and K-quant kernels never prefetched (an earlier tuning
 * of the block formats' distance measured nothing). Restored, on the Xeon: a Q4_0 matrix from memory
 * 20.5 -> 27.6 GB/s, 1.1B Q4_0 decode 35.7 -> 45.0 tokens/s, Q4_K_M 26.8 -> 34.7 (2 KB ahead).
 * test_kernel_builds checks that every block kernel's loop keeps its prefetches. */
#ifndef PREFETCH_HINT
#define PREFETCH_HINT _MM_HINT_T1
#endif
#ifndef PREFETCH_AHEAD
#define PREFETCH_AHEAD 8192
#endif
#ifndef PREFETCH_FLOAT_AHEAD
#define PREFETCH_FLOAT_AHEAD 2048
#endif
/* One line prefetched `ahead` bytes past p (none where ahead is 0): the kernels' only way to prefetch,
 * so that each distance is one setting. */
static inline __attribute__((always_inline)) void prefetch_at(const void *p, int ahead) {
    if (ahead > 0) _mm_prefetch((const char *)p + ahead, PREFETCH_HINT);
}
static inline __attribute__((always_inline)) void prefetch_ahead(const void *p) { prefetch_at(p, PREFETCH_AHEAD); }
static inline __attribute__((always_inline)) void prefetch_ahead_256(const char *p) {  /* the four lines of a 256-byte run of float weights */
    for (int i = 0; i < 256; i += 64) prefetch_at(p + i, PREFETCH_FLOAT_AHEAD);
}

static inline float f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return _cvtsh_ss(h);
}

/* acc + the products of 32 bfloat16 pairs (raw uint16 at w and x), pair 2i and 2i + 1 into lane i:
 * vdpbf16ps where the build has AVX512-BF16. Elsewhere (AVX2, or AVX-512 without BF16) the same
 * sums: a product of two bfloat16 values is exact in float32, so a fused multiply-add of the
 * widened values adds it as vdpbf16ps does (odd element first, then even), except that
 * vdpbf16ps flushes denormal inputs and results to zero and this keeps them. */
static inline __m512 dot_bf16_pairs(__m512 acc, const uint16_t *w, const uint16_t *x) {
#if defined(__AVX512BF16__)
    return _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512((const void *)w), (__m512bh)_mm512_loadu_si512((const void *)x));
#else
    const __m512i wv = _mm512_loadu_si512((const void *)w), xv = _mm512_loadu_si512((const void *)x);
    const __m512i high = _mm512_set1_epi32((int)0xFFFF0000u);
    acc = _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_and_si512(wv, high)), _mm512_castsi512_ps(_mm512_and_si512(xv, high)), acc);
    return _mm512_fmadd_ps(_mm512_castsi512_ps(_mm512_slli_epi32(wv, 16)), _mm512_castsi512_ps(_mm512_slli_epi32(xv, 16)), acc);
#endif
}

/* x with the sign of w moved onto it (x negated where w < 0): VNNI multiplies u8 by s8 only, so
 * a signed product w * x runs as |w| * sign_onto(x, w). */
#ifdef LLAMASCOPE_AVX2
#define sign_onto avx2_sign_onto
#define sign_onto_256 avx2_sign_onto_256
#else
static inline __m512i sign_onto(__m512i x, __m512i w) {
    return _mm512_mask_sub_epi8(x, _mm512_movepi8_mask(w), _mm512_setzero_si512(), x);
}
static inline __m256i sign_onto_256(__m256i x, __m256i w) {
    return _mm256_mask_sub_epi8(x, _mm256_movepi8_mask(w), _mm256_setzero_si256(), x);
}
#endif

/* 16 bfloat16 values (raw uint16) widened to float32: exact. */
static inline __m512 bf16x16_to_f32(const uint16_t *p) {
    const __m256i h = _mm256_loadu_si256((const __m256i *)p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline float bf(float v) {  /* round to the nearest bfloat16, ties to even */
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7F800000u) == 0x7F800000u && (u & 0x007FFFFFu)) return v;  /* NaN */
    u += 0x7FFFu + ((u >> 16) & 1u);
    u &= 0xFFFF0000u;
    memcpy(&v, &u, 4);
    return v;
}

/* bf() on 16 lanes, by the same integer rounding (so the same results, NaNs kept). */
static inline __m512 bf_v(__m512 v) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF), lsb));
    r = _mm512_and_si512(r, _mm512_set1_epi32((int)0xFFFF0000u));
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_castsi512_ps(r), v);
}

/* 16 floats to bfloat16 bits, to nearest even, NaNs kept quiet NaNs (vcvtneps2bf16's rounding for
 * normal numbers). */
static inline __m256i bf16_bits16(__m512 v) {
#if defined(__AVX512BF16__) || defined(LLAMASCOPE_AVX2)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else
    const __m512i u = _mm512_srli_epi32(_mm512_castps_si512(bf_v(v)), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    return _mm512_cvtepi32_epi16(_mm512_mask_or_epi32(u, nan, u, _mm512_set1_epi32(0x40)));
#endif
}

/* 16 floats to out[index..] as float32, or (bf16) as bfloat16 rounded to nearest even: the
 * dequantisers' output for a float32 or a bfloat16 matrix product. */
static inline void store16(void *out, int64_t index, int bf16, __m512 v) {
    if (bf16)
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + index), bf16_bits16(v));
    else
        _mm512_storeu_ps((float *)out + index, v);
}

static inline uint16_t bf_bits(float v) {  /* v is bfloat16-exact */
    uint32_t u;
    memcpy(&u, &v, 4);
    return (uint16_t)(u >> 16);
}

static inline float bf_value(uint16_t h) {
    const uint32_t u = (uint32_t)h << 16;
    float v;
    memcpy(&v, &u, 4);
    return v;
}

/*
 * e^x on 16 lanes, within about 1 ulp of expf for x <= 88.7 (results below the smallest
 * subnormal are 0). x = n ln2 + r with n = round(x / ln2) and |r| <= ln2 / 2, ln2 split in a
 * high part with few significant bits (so n * ln2_hi is exact) and a low part; e^r by its Taylor
 * series to degree 7, whose remainder there is below 1e-8 relative; then scaled by 2^n.
 */
static inline __m512 exp16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-104.0f)), _mm512_set1_ps(88.72f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.42860682e-6f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Lanes i..n-1 of a 16-lane step starting at i: all 16 inside the array, fewer at its end, none past it. */
static inline __mmask16 tail_mask(int i, int n) {
    return n - i >= 16 ? (__mmask16)0xFFFF : n <= i ? (__mmask16)0 : (__mmask16)((1u << (n - i)) - 1);
}

/* silu(g) = g / (1 + e^-g) on 16 lanes. */
static inline __m512 silu16(__m512 g) {
    return _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
}

#endif
