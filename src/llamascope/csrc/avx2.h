/*
 * The AVX-512 operations the kernels use, for CPUs with only AVX2, FMA and F16C (most laptops and
 * desktops: AMD before Zen 4, Intel client cores since Alder Lake).
 *
 * Included by simd.h when the library is built with -DLLAMASCOPE_AVX2 (and without -mavx512*). A
 * 16-lane float or integer vector becomes a pair of 8-lane AVX2 halves (lanes 0-7, lanes 8-15), and
 * each AVX-512 name the kernels call is a macro for the same operation on both halves, so the
 * kernel sources read and compute the same in both builds. Per lane every float operation is the
 * same IEEE operation and the horizontal sums pair lanes as GCC's AVX-512 ones do, so the two
 * builds give the same numbers (compared bit for bit, kernel by kernel, NaN and infinities
 * included); only denormals differ where AVX512-BF16 flushes them to zero.
 *
 * Only the forms the kernels use are given. Two are exact only within the kernels' ranges, noted
 * where they are defined: dpbusd (no 16-bit overflow) and scalef (an integral exponent).
 */
#ifndef LLAMASCOPE_AVX2_H
#define LLAMASCOPE_AVX2_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

typedef struct { __m256 lo, hi; } f32x16;
typedef struct { __m256i lo, hi; } i32x16;  /* also 64 bytes, or 32 uint16 */

#define AVX2_INLINE static inline __attribute__((always_inline))

/* The AVX-512 type names, from here on (immintrin.h has been read). */
#define __m512 f32x16
#define __m512i i32x16

AVX2_INLINE f32x16 f16x_make(__m256 lo, __m256 hi) { f32x16 r = {lo, hi}; return r; }
AVX2_INLINE i32x16 i16x_make(__m256i lo, __m256i hi) { i32x16 r = {lo, hi}; return r; }

/* 8 mask bits -> 8 lanes of all ones (bit set) or zero. */
AVX2_INLINE __m256i lanes_of_bits(unsigned bits) {
    const __m256i pick = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32((int)bits), pick), pick);
}
AVX2_INLINE __mmask16 bits_of_lanes(__m256 lo, __m256 hi) {
    return (__mmask16)(_mm256_movemask_ps(lo) | (_mm256_movemask_ps(hi) << 8));
}

/* ---- float lanes -------------------------------------------------------------------------- */

#define AVX2_F2(name, op) \
    AVX2_INLINE f32x16 name(f32x16 a, f32x16 b) { return f16x_make(op(a.lo, b.lo), op(a.hi, b.hi)); }
AVX2_F2(avx2_add_ps, _mm256_add_ps)
AVX2_F2(avx2_sub_ps, _mm256_sub_ps)
AVX2_F2(avx2_mul_ps, _mm256_mul_ps)
AVX2_F2(avx2_div_ps, _mm256_div_ps)
AVX2_F2(avx2_max_ps, _mm256_max_ps)
AVX2_F2(avx2_min_ps, _mm256_min_ps)
#undef AVX2_F2
#undef _mm512_add_ps
#define _mm512_add_ps avx2_add_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps avx2_sub_ps
#undef _mm512_mul_ps
#define _mm512_mul_ps avx2_mul_ps
#undef _mm512_div_ps
#define _mm512_div_ps avx2_div_ps
#undef _mm512_max_ps
#define _mm512_max_ps avx2_max_ps
#undef _mm512_min_ps
#define _mm512_min_ps avx2_min_ps

#define AVX2_F3(name, op) \
    AVX2_INLINE f32x16 name(f32x16 a, f32x16 b, f32x16 c) { return f16x_make(op(a.lo, b.lo, c.lo), op(a.hi, b.hi, c.hi)); }
AVX2_F3(avx2_fmadd_ps, _mm256_fmadd_ps)
AVX2_F3(avx2_fnmadd_ps, _mm256_fnmadd_ps)
#undef AVX2_F3
#undef _mm512_fmadd_ps
#define _mm512_fmadd_ps avx2_fmadd_ps
#undef _mm512_fnmadd_ps
#define _mm512_fnmadd_ps avx2_fnmadd_ps

AVX2_INLINE f32x16 avx2_setzero_ps(void) { return f16x_make(_mm256_setzero_ps(), _mm256_setzero_ps()); }
AVX2_INLINE f32x16 avx2_set1_ps(float a) { return f16x_make(_mm256_set1_ps(a), _mm256_set1_ps(a)); }
AVX2_INLINE f32x16 avx2_loadu_ps(const float *p) { return f16x_make(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
AVX2_INLINE void avx2_storeu_ps(float *p, f32x16 v) {
    _mm256_storeu_ps(p, v.lo);
    _mm256_storeu_ps(p + 8, v.hi);
}
#undef _mm512_setzero_ps
#define _mm512_setzero_ps avx2_setzero_ps
#undef _mm512_set1_ps
#define _mm512_set1_ps avx2_set1_ps
#undef _mm512_loadu_ps
#define _mm512_loadu_ps(p) avx2_loadu_ps((const float *)(p))
#undef _mm512_storeu_ps
#define _mm512_storeu_ps(p, v) avx2_storeu_ps((float *)(p), v)

/* Masked lanes are neither read nor written (vmaskmov does not touch them, nor fault on them). */
AVX2_INLINE f32x16 avx2_maskz_loadu_ps(__mmask16 m, const float *p) {
    if (m == 0xFFFF) return avx2_loadu_ps(p);
    return f16x_make(_mm256_maskload_ps(p, lanes_of_bits(m & 0xFF)), _mm256_maskload_ps(p + 8, lanes_of_bits(m >> 8)));
}
AVX2_INLINE void avx2_mask_storeu_ps(float *p, __mmask16 m, f32x16 v) {
    if (m == 0xFFFF) {
        avx2_storeu_ps(p, v);
        return;
    }
    _mm256_maskstore_ps(p, lanes_of_bits(m & 0xFF), v.lo);
    _mm256_maskstore_ps(p + 8, lanes_of_bits(m >> 8), v.hi);
}
#undef _mm512_maskz_loadu_ps
#define _mm512_maskz_loadu_ps(m, p) avx2_maskz_loadu_ps(m, (const float *)(p))
#undef _mm512_mask_storeu_ps
#define _mm512_mask_storeu_ps(p, m, v) avx2_mask_storeu_ps((float *)(p), m, v)

/* Lanes in m take b, the others a. */
AVX2_INLINE f32x16 avx2_mask_blend_ps(__mmask16 m, f32x16 a, f32x16 b) {
    return f16x_make(_mm256_blendv_ps(a.lo, b.lo, _mm256_castsi256_ps(lanes_of_bits(m & 0xFF))),
                     _mm256_blendv_ps(a.hi, b.hi, _mm256_castsi256_ps(lanes_of_bits(m >> 8))));
}
#undef _mm512_mask_blend_ps
#define _mm512_mask_blend_ps avx2_mask_blend_ps
#undef _mm512_mask_mov_ps
#define _mm512_mask_mov_ps(src, m, a) avx2_mask_blend_ps(m, src, a)
#undef _mm512_mask_add_ps
#define _mm512_mask_add_ps(src, m, a, b) avx2_mask_blend_ps(m, src, avx2_add_ps(a, b))

AVX2_INLINE f32x16 avx2_abs_ps(f32x16 v) {
    const __m256 keep = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    return f16x_make(_mm256_and_ps(v.lo, keep), _mm256_and_ps(v.hi, keep));
}
#undef _mm512_abs_ps
#define _mm512_abs_ps avx2_abs_ps

/* Comparisons take an immediate predicate: macros, so it stays one. */
#undef _mm512_cmp_ps_mask
#define _mm512_cmp_ps_mask(a, b, imm) __extension__({                                         \
    const f32x16 a_ = (a), b_ = (b);                                                           \
    bits_of_lanes(_mm256_cmp_ps(a_.lo, b_.lo, imm), _mm256_cmp_ps(a_.hi, b_.hi, imm)); })
#undef _mm512_mask_cmp_ps_mask
#define _mm512_mask_cmp_ps_mask(m, a, b, imm) ((__mmask16)((m) & _mm512_cmp_ps_mask(a, b, imm)))
#undef _mm512_roundscale_ps
#define _mm512_roundscale_ps(v, imm) __extension__({                                          \
    const f32x16 v_ = (v);                                                                     \
    f16x_make(_mm256_round_ps(v_.lo, imm), _mm256_round_ps(v_.hi, imm)); })

/* v * 2^n for integral n in [-252, 252] (exp16's range), by two exact powers of two: the first
 * product is exact, the second rounds once, as vscalefps does. */
AVX2_INLINE __m256 scalef8(__m256 v, __m256 n) {
    const __m256i k = _mm256_cvtps_epi32(n);
    const __m256i k1 = _mm256_srai_epi32(k, 1), k2 = _mm256_sub_epi32(k, k1);
    const __m256i bias = _mm256_set1_epi32(127);
    const __m256 p1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k1, bias), 23));
    const __m256 p2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k2, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(v, p1), p2);
}
AVX2_INLINE f32x16 avx2_scalef_ps(f32x16 v, f32x16 n) { return f16x_make(scalef8(v.lo, n.lo), scalef8(v.hi, n.hi)); }
#undef _mm512_scalef_ps
#define _mm512_scalef_ps avx2_scalef_ps

AVX2_INLINE float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
AVX2_INLINE float avx2_reduce_add_ps(f32x16 v) { return hsum8(_mm256_add_ps(v.lo, v.hi)); }
AVX2_INLINE float avx2_reduce_max_ps(f32x16 v) {
    /* upper half first, as GCC's _mm512_reduce_max_ps: vmaxps returns its second operand when
     * either is NaN, so the order decides which NaN (or number) survives */
    __m256 m = _mm256_max_ps(v.hi, v.lo);
    __m128 s = _mm_max_ps(_mm256_extractf128_ps(m, 1), _mm256_castps256_ps128(m));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#undef _mm512_reduce_add_ps
#define _mm512_reduce_add_ps avx2_reduce_add_ps
#undef _mm512_reduce_max_ps
#define _mm512_reduce_max_ps avx2_reduce_max_ps

/* Lanes 0-7 from a, lanes 8-15 from b (the kernels insert at position 1 only). */
AVX2_INLINE f32x16 avx2_insertf32x8(f32x16 a, __m256 b) { return f16x_make(a.lo, b); }
#undef _mm512_insertf32x8
#define _mm512_insertf32x8(a, b, imm) ((void)sizeof(char[(imm) == 1 ? 1 : -1]), avx2_insertf32x8(a, b))  /* position 1 only */
/* Lanes 0-3 from x, the rest 0 (AVX-512 leaves them undefined). */
AVX2_INLINE f32x16 avx2_castps128_ps512(__m128 x) {
    return f16x_make(_mm256_insertf128_ps(_mm256_setzero_ps(), x, 0), _mm256_setzero_ps());
}
#undef _mm512_castps128_ps512
#define _mm512_castps128_ps512 avx2_castps128_ps512
/* Lanes 0-7 from x, the rest 0 (AVX-512 leaves them undefined). */
AVX2_INLINE f32x16 avx2_castps256_ps512(__m256 x) { return f16x_make(x, _mm256_setzero_ps()); }
#undef _mm512_castps256_ps512
#define _mm512_castps256_ps512 avx2_castps256_ps512

/* ---- integer lanes ------------------------------------------------------------------------ */

AVX2_INLINE i32x16 avx2_setzero_si512(void) { return i16x_make(_mm256_setzero_si256(), _mm256_setzero_si256()); }
AVX2_INLINE i32x16 avx2_set1_epi32(int a) { return i16x_make(_mm256_set1_epi32(a), _mm256_set1_epi32(a)); }
AVX2_INLINE i32x16 avx2_set1_epi8(char a) { return i16x_make(_mm256_set1_epi8(a), _mm256_set1_epi8(a)); }
#undef _mm512_setzero_si512
#define _mm512_setzero_si512 avx2_setzero_si512
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 avx2_set1_epi32
#undef _mm512_set1_epi8
#define _mm512_set1_epi8 avx2_set1_epi8
#undef _mm512_set_epi32
#define _mm512_set_epi32(e15, e14, e13, e12, e11, e10, e9, e8, e7, e6, e5, e4, e3, e2, e1, e0) \
    i16x_make(_mm256_set_epi32(e7, e6, e5, e4, e3, e2, e1, e0), _mm256_set_epi32(e15, e14, e13, e12, e11, e10, e9, e8))
#undef _mm512_setr_epi32
#define _mm512_setr_epi32(e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15) \
    i16x_make(_mm256_setr_epi32(e0, e1, e2, e3, e4, e5, e6, e7), _mm256_setr_epi32(e8, e9, e10, e11, e12, e13, e14, e15))

AVX2_INLINE i32x16 avx2_loadu_si512(const void *p) {
    return i16x_make(_mm256_loadu_si256((const __m256i *)p), _mm256_loadu_si256((const __m256i *)p + 1));
}
AVX2_INLINE void avx2_storeu_si512(void *p, i32x16 v) {
    _mm256_storeu_si256((__m256i *)p, v.lo);
    _mm256_storeu_si256((__m256i *)p + 1, v.hi);
}
#undef _mm512_loadu_si512
#define _mm512_loadu_si512 avx2_loadu_si512
#undef _mm512_storeu_si512
#define _mm512_storeu_si512 avx2_storeu_si512

#define AVX2_I2(name, op) \
    AVX2_INLINE i32x16 name(i32x16 a, i32x16 b) { return i16x_make(op(a.lo, b.lo), op(a.hi, b.hi)); }
AVX2_I2(avx2_and_si512, _mm256_and_si256)
AVX2_I2(avx2_or_si512, _mm256_or_si256)
AVX2_I2(avx2_xor_si512, _mm256_xor_si256)
AVX2_I2(avx2_add_epi32, _mm256_add_epi32)
AVX2_I2(avx2_sub_epi32, _mm256_sub_epi32)
#undef AVX2_I2
#undef _mm512_and_si512
#define _mm512_and_si512 avx2_and_si512
#undef _mm512_or_si512
#define _mm512_or_si512 avx2_or_si512
#undef _mm512_xor_si512
#define _mm512_xor_si512 avx2_xor_si512
#undef _mm512_add_epi32
#define _mm512_add_epi32 avx2_add_epi32
#undef _mm512_sub_epi32
#define _mm512_sub_epi32 avx2_sub_epi32

AVX2_INLINE i32x16 avx2_srli_epi16(i32x16 v, int n) { return i16x_make(_mm256_srli_epi16(v.lo, n), _mm256_srli_epi16(v.hi, n)); }
AVX2_INLINE i32x16 avx2_slli_epi16(i32x16 v, int n) { return i16x_make(_mm256_slli_epi16(v.lo, n), _mm256_slli_epi16(v.hi, n)); }
AVX2_INLINE i32x16 avx2_srli_epi32(i32x16 v, int n) { return i16x_make(_mm256_srli_epi32(v.lo, n), _mm256_srli_epi32(v.hi, n)); }
AVX2_INLINE i32x16 avx2_slli_epi32(i32x16 v, int n) { return i16x_make(_mm256_slli_epi32(v.lo, n), _mm256_slli_epi32(v.hi, n)); }
#undef _mm512_srli_epi16
#define _mm512_srli_epi16 avx2_srli_epi16
#undef _mm512_slli_epi16
#define _mm512_slli_epi16 avx2_slli_epi16
#undef _mm512_srli_epi32
#define _mm512_srli_epi32 avx2_srli_epi32
#undef _mm512_slli_epi32
#define _mm512_slli_epi32 avx2_slli_epi32

AVX2_INLINE i32x16 avx2_mask_mov_epi32(i32x16 src, __mmask16 m, i32x16 a) {
    return i16x_make(_mm256_blendv_epi8(src.lo, a.lo, lanes_of_bits(m & 0xFF)),
                     _mm256_blendv_epi8(src.hi, a.hi, lanes_of_bits(m >> 8)));
}
#undef _mm512_mask_mov_epi32
#define _mm512_mask_mov_epi32 avx2_mask_mov_epi32

AVX2_INLINE int avx2_reduce_add_epi32(i32x16 v) {
    const __m256i s8 = _mm256_add_epi32(v.lo, v.hi);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
    return _mm_cvtsi128_si32(s);
}
#undef _mm512_reduce_add_epi32
#define _mm512_reduce_add_epi32 avx2_reduce_add_epi32

AVX2_INLINE f32x16 avx2_castsi512_ps(i32x16 v) { return f16x_make(_mm256_castsi256_ps(v.lo), _mm256_castsi256_ps(v.hi)); }
AVX2_INLINE i32x16 avx2_castps_si512(f32x16 v) { return i16x_make(_mm256_castps_si256(v.lo), _mm256_castps_si256(v.hi)); }
AVX2_INLINE f32x16 avx2_cvtepi32_ps(i32x16 v) { return f16x_make(_mm256_cvtepi32_ps(v.lo), _mm256_cvtepi32_ps(v.hi)); }
/* to the nearest integer, ties to even: the MXCSR mode the kernels run in, which is the only rounding
 * they ask cvt_roundps_epi32 for */
AVX2_INLINE i32x16 avx2_cvtps_epi32(f32x16 v) { return i16x_make(_mm256_cvtps_epi32(v.lo), _mm256_cvtps_epi32(v.hi)); }
#undef _mm512_castsi512_ps
#define _mm512_castsi512_ps avx2_castsi512_ps
#undef _mm512_castps_si512
#define _mm512_castps_si512 avx2_castps_si512
#undef _mm512_cvtepi32_ps
#define _mm512_cvtepi32_ps avx2_cvtepi32_ps
#undef _mm512_cvt_roundps_epi32
#define _mm512_cvt_roundps_epi32(v, imm) avx2_cvtps_epi32(v)

/* Widening: 16 bytes or 16 uint16 to 16 int32 lanes. */
AVX2_INLINE i32x16 avx2_cvtepi8_epi32(__m128i x) { return i16x_make(_mm256_cvtepi8_epi32(x), _mm256_cvtepi8_epi32(_mm_srli_si128(x, 8))); }
AVX2_INLINE i32x16 avx2_cvtepu8_epi32(__m128i x) { return i16x_make(_mm256_cvtepu8_epi32(x), _mm256_cvtepu8_epi32(_mm_srli_si128(x, 8))); }
AVX2_INLINE i32x16 avx2_cvtepu16_epi32(__m256i x) {
    return i16x_make(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(x)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(x, 1)));
}
#undef _mm512_cvtepi8_epi32
#define _mm512_cvtepi8_epi32 avx2_cvtepi8_epi32
#undef _mm512_cvtepu8_epi32
#define _mm512_cvtepu8_epi32 avx2_cvtepu8_epi32
#undef _mm512_cvtepu16_epi32
#define _mm512_cvtepu16_epi32 avx2_cvtepu16_epi32

/* 16 int32 lanes to 16 bytes, saturating to [-128, 127]. */
AVX2_INLINE __m128i avx2_cvtsepi32_epi8(i32x16 v) {
    const __m256i w = _mm256_permute4x64_epi64(_mm256_packs_epi32(v.lo, v.hi), 0xD8);  /* 16 int16 in order */
    const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
    return _mm_packs_epi16(lo, hi);
}
#undef _mm512_cvtsepi32_epi8
#define _mm512_cvtsepi32_epi8 avx2_cvtsepi32_epi8
/* 16 int32 lanes to 16 uint16, truncating (the kernels pass values below 2^16). */
AVX2_INLINE __m256i avx2_cvtepi32_epi16(i32x16 v) {
    const __m256i keep = _mm256_set1_epi32(0xFFFF);
    return _mm256_permute4x64_epi64(_mm256_packus_epi32(_mm256_and_si256(v.lo, keep), _mm256_and_si256(v.hi, keep)), 0xD8);
}
#undef _mm512_cvtepi32_epi16
#define _mm512_cvtepi32_epi16 avx2_cvtepi32_epi16

AVX2_INLINE i32x16 avx2_castsi256_si512(__m256i x) { return i16x_make(x, _mm256_setzero_si256()); }
AVX2_INLINE i32x16 avx2_inserti64x4(i32x16 a, __m256i b) { return i16x_make(a.lo, b); }
#undef _mm512_castsi256_si512
#define _mm512_castsi256_si512 avx2_castsi256_si512
#undef _mm512_inserti64x4
#define _mm512_inserti64x4(a, b, imm) ((void)sizeof(char[(imm) == 1 ? 1 : -1]), avx2_inserti64x4(a, b))  /* position 1 only */

/* Lane i takes v's lane idx[i] (0..15). */
AVX2_INLINE __m256 permute_half(__m256i idx, f32x16 v) {
    const __m256 from_lo = _mm256_permutevar8x32_ps(v.lo, idx), from_hi = _mm256_permutevar8x32_ps(v.hi, idx);
    const __m256i upper = _mm256_cmpgt_epi32(_mm256_and_si256(idx, _mm256_set1_epi32(15)), _mm256_set1_epi32(7));
    return _mm256_blendv_ps(from_lo, from_hi, _mm256_castsi256_ps(upper));
}
AVX2_INLINE f32x16 avx2_permutexvar_ps(i32x16 idx, f32x16 v) { return f16x_make(permute_half(idx.lo, v), permute_half(idx.hi, v)); }
#undef _mm512_permutexvar_ps
#define _mm512_permutexvar_ps avx2_permutexvar_ps

/* ---- 8-bit products ------------------------------------------------------------------------ */

AVX2_INLINE i32x16 avx2_abs_epi8(i32x16 v) { return i16x_make(_mm256_abs_epi8(v.lo), _mm256_abs_epi8(v.hi)); }
#undef _mm512_abs_epi8
#define _mm512_abs_epi8 avx2_abs_epi8

/* acc + sums of four u8 x s8 products per int32 lane (vpdpbusd). Through 16-bit pair sums
 * (vpmaddubsw), which saturate beyond 32767: exact while a pair's sum stays within int16, which
 * holds for the kernels' operands: 4-bit weights (0..15) or |int8| weights (0..128) against 8-bit
 * activations in [-127, 127], at most 2 * 128 * 127 = 32512. */
AVX2_INLINE __m256i dpbusd8(__m256i acc, __m256i u, __m256i s) {
    const __m256i pairs = _mm256_maddubs_epi16(u, s);
    return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}
AVX2_INLINE i32x16 avx2_dpbusd_epi32(i32x16 acc, i32x16 u, i32x16 s) {
    return i16x_make(dpbusd8(acc.lo, u.lo, s.lo), dpbusd8(acc.hi, u.hi, s.hi));
}
#undef _mm512_dpbusd_epi32
#define _mm512_dpbusd_epi32 avx2_dpbusd_epi32
#undef _mm256_dpbusd_epi32
#define _mm256_dpbusd_epi32 dpbusd8

/* x with the sign of w moved onto it, for u8 x s8 products with |w|: simd.h's sign_onto. Lanes
 * where w is 0 become 0 (their product is 0 either way). */
AVX2_INLINE i32x16 avx2_sign_onto(i32x16 x, i32x16 w) { return i16x_make(_mm256_sign_epi8(x.lo, w.lo), _mm256_sign_epi8(x.hi, w.hi)); }
AVX2_INLINE __m256i avx2_sign_onto_256(__m256i x, __m256i w) { return _mm256_sign_epi8(x, w); }

/* ---- bfloat16 -------------------------------------------------------------------------------- */

/* 16 uint16 under a mask (masked lanes read as 0; a partial load goes element by element). */
AVX2_INLINE __m256i avx2_maskz_loadu_epi16(__mmask16 m, const void *p) {
    if (m == 0xFFFF) return _mm256_loadu_si256((const __m256i *)p);
    uint16_t tmp[16] = {0};
    for (int i = 0; i < 16; i++)
        if (m >> i & 1) memcpy(&tmp[i], (const uint16_t *)p + i, 2);
    return _mm256_loadu_si256((const __m256i *)tmp);
}
AVX2_INLINE void avx2_mask_storeu_epi16(void *p, __mmask16 m, __m256i v) {
    if (m == 0xFFFF) {
        _mm256_storeu_si256((__m256i *)p, v);
        return;
    }
    uint16_t tmp[16];
    _mm256_storeu_si256((__m256i *)tmp, v);
    for (int i = 0; i < 16; i++)
        if (m >> i & 1) memcpy((uint16_t *)p + i, &tmp[i], 2);
}
#undef _mm256_maskz_loadu_epi16
#define _mm256_maskz_loadu_epi16 avx2_maskz_loadu_epi16
#undef _mm256_mask_storeu_epi16
#define _mm256_mask_storeu_epi16 avx2_mask_storeu_epi16

/* 16 floats to bfloat16 bits, to nearest even, NaNs kept quiet NaNs (vcvtneps2bf16's rounding for
 * the normal numbers the kernels convert). */
AVX2_INLINE __m256i bf16_bits8(__m256 v) {
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    const __m256i rounded = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF), lsb)), 16);
    const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    return _mm256_blendv_epi8(rounded, quiet, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
}
AVX2_INLINE __m256i avx2_cvtneps_pbh(f32x16 v) { return avx2_cvtepi32_epi16(i16x_make(bf16_bits8(v.lo), bf16_bits8(v.hi))); }
#undef _mm512_cvtneps_pbh
#define _mm512_cvtneps_pbh avx2_cvtneps_pbh

#endif
