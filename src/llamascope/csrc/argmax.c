/*
 * Greedy choice: the index of each row's largest score, with torch.argmax's rules (the first
 * index on ties; the first NaN when a row holds one, since torch's max propagates NaN).
 * torch's own argmax over a 49k vocabulary row takes ~50 us on this kind of CPU; this ~3 us.
 */
#include <math.h>
#include <stdint.h>

#include "kernels.h"
#include "simd.h"

static int64_t argmax_row(const float *x, int cols) {
    __m512 best = _mm512_set1_ps(-INFINITY);  /* per lane: its largest value so far */
    __m512i best_at = _mm512_set1_epi32(-1);   /* and where (-1: nothing above -inf yet) */
    __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i step = _mm512_set1_epi32(16);
    __mmask16 nan = 0;
    for (int i = 0; i < cols; i += 16) {
        const __mmask16 m = tail_mask(i, cols);
        const __m512 v = _mm512_maskz_loadu_ps(m, x + i);
        nan |= _mm512_mask_cmp_ps_mask(m, v, v, _CMP_UNORD_Q);
        const __mmask16 above = _mm512_mask_cmp_ps_mask(m, v, best, _CMP_GT_OQ);  /* strict: a lane keeps its first */
        best = _mm512_mask_mov_ps(best, above, v);
        best_at = _mm512_mask_mov_epi32(best_at, above, at);
        at = _mm512_add_epi32(at, step);
    }
    if (nan) {
        for (int i = 0; i < cols; i++)
            if (isnan(x[i])) return i;
    }
    float value[16];
    int32_t where[16];
    _mm512_storeu_ps(value, best);
    _mm512_storeu_si512(where, best_at);
    float top = -INFINITY;
    int32_t first = -1;
    for (int lane = 0; lane < 16; lane++) {
        if (where[lane] < 0) continue;
        if (first < 0 || value[lane] > top || (value[lane] == top && where[lane] < first)) {
            top = value[lane];
            first = where[lane];
        }
    }
    return first < 0 ? 0 : first;  /* a row of -inf: its first column */
}

/* x [rows, cols] float32 -> out [rows] int64. */
void argmax_rows_f32(const float *x, int rows, int cols, int64_t *out) {
    for (int r = 0; r < rows; r++) out[r] = argmax_row(x + (int64_t)r * cols, cols);
}
