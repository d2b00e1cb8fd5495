/* LayerNorm over the channels of a channels-last (NHWC) tensor, one row of C values per pixel:
 *
 *     y[r, c] = (x[r, c] - mean_r) / sqrt(var_r + eps) * w[c]  (+ b[c])  (+ res[r, c])
 *
 * y may be x itself (each row is read whole before it is written). The optional residual is the addition
 * that follows PolyConv's norm in a PolyNeXt block, done here instead of in one more pass over memory.
 * float32 and bfloat16 (statistics and arithmetic in float32, one rounding to bfloat16 at the end, to the
 * nearest even). Why by hand: PyTorch's CPU layer_norm runs a channels-last PolyNeXt's rows (72-768 values)
 * at 4-16 GB/s in bfloat16, against 30-45 GB/s for an elementwise product of the same tensor (2-core AMD EPYC
 * Zen 4, benchmarks/channel_norm.py); no maintained library has a faster one for rows this short. Each row is
 * read once from memory and kept in L1 for the two-pass statistics, then written once. Rows are split over
 * OpenMP threads: the process already holds torch's libgomp, so this library shares torch's thread pool.
 * Compiled on first use by polynext/ops/channel_norm.py (-O3 -march=native -fopenmp). With AVX-512 (and
 * AVX-512 BF16 for the rounding) the loops are written with intrinsics, masked at the row's end; elsewhere
 * they are plain loops for the compiler's vectoriser. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_C 4096

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) {   /* round to nearest even, NaN kept quiet (as c10::BFloat16) */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

static inline __m512 load_f32(const float *p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }

static inline __m512 load_bf16(const uint16_t *p, __mmask16 k) {
    __m256i h = _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m256i to_bf16(__m512 v) {
#if defined(__AVX512BF16__)
    return (__m256i)_mm512_cvtneps_pbh(v);
#else   /* round to nearest even by integer arithmetic; NaN made quiet */
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    return _mm512_cvtepi32_epi16(r);
#endif
}

static inline void store_f32(float *p, __mmask16 k, __m512 v) { _mm512_mask_storeu_ps(p, k, v); }
static inline void store_bf16(uint16_t *p, __mmask16 k, __m512 v) { _mm256_mask_storeu_epi16(p, k, to_bf16(v)); }

/* The value at channels c..c+15 of a row: the row itself, or the product of its two halves (PolyMLP's
 * (W_a x) * (W_b x), whose LayerNorm then reads the product without it being written to memory). */
static inline __m512 get_f32(const float *x, int64_t C, int64_t c, __mmask16 k) {
    (void)C;
    return load_f32(x + c, k);
}
static inline __m512 prod_f32(const float *x, int64_t C, int64_t c, __mmask16 k) {
    return _mm512_mul_ps(load_f32(x + c, k), load_f32(x + C + c, k));
}
static inline __m512 get_bf16(const uint16_t *x, int64_t C, int64_t c, __mmask16 k) {
    (void)C;
    return load_bf16(x + c, k);
}
static inline __m512 prod_bf16(const uint16_t *x, int64_t C, int64_t c, __mmask16 k) {
    return _mm512_mul_ps(load_bf16(x + c, k), load_bf16(x + C + c, k));
}

/* One row: the mean, then the variance as the mean of squared deviations (both passes read the row from L1,
 * converted to float32 as loaded), then the normalised row, written once. The row's last C % 16 values are
 * loaded and stored under a mask. */
#define ROW_KERNEL(NAME, T, GET, LOAD, STORE)                                                                    \
    static inline void NAME(const T *x, const float *w, const float *b, const T *res, T *y, int64_t C,          \
                            float eps) {                                                                        \
        const int64_t full = C & ~(int64_t)15;                                                                  \
        const __mmask16 kt = (__mmask16)((1u << (C - full)) - 1u);                                              \
        __m512 s0 = _mm512_setzero_ps(), s1 = _mm512_setzero_ps();                                              \
        int64_t c = 0;                                                                                          \
        for (; c + 32 <= full; c += 32) {                                                                       \
            s0 = _mm512_add_ps(s0, GET(x, C, c, 0xffff));                                                       \
            s1 = _mm512_add_ps(s1, GET(x, C, c + 16, 0xffff));                                                  \
        }                                                                                                       \
        if (c < full) s0 = _mm512_add_ps(s0, GET(x, C, c, 0xffff));                                             \
        if (kt) s1 = _mm512_add_ps(s1, GET(x, C, full, kt));                                                    \
        const __m512 mv = _mm512_set1_ps(_mm512_reduce_add_ps(_mm512_add_ps(s0, s1)) / (float)C);               \
        __m512 q0 = _mm512_setzero_ps(), q1 = _mm512_setzero_ps();                                              \
        for (c = 0; c + 32 <= full; c += 32) {                                                                  \
            __m512 d0 = _mm512_sub_ps(GET(x, C, c, 0xffff), mv), d1 = _mm512_sub_ps(GET(x, C, c + 16, 0xffff), mv); \
            q0 = _mm512_fmadd_ps(d0, d0, q0);                                                                   \
            q1 = _mm512_fmadd_ps(d1, d1, q1);                                                                   \
        }                                                                                                       \
        if (c < full) {                                                                                         \
            __m512 d = _mm512_sub_ps(GET(x, C, c, 0xffff), mv);                                                 \
            q0 = _mm512_fmadd_ps(d, d, q0);                                                                     \
        }                                                                                                       \
        if (kt) {                                                                                               \
            __m512 d = _mm512_maskz_sub_ps(kt, GET(x, C, full, kt), mv);                                        \
            q1 = _mm512_fmadd_ps(d, d, q1);                                                                     \
        }                                                                                                       \
        const float var = _mm512_reduce_add_ps(_mm512_add_ps(q0, q1)) / (float)C;                               \
        const __m512 rv = _mm512_set1_ps(1.f / sqrtf(var + eps));                                               \
        for (c = 0; c < C; c += 16) {                                                                           \
            const __mmask16 k = c < full ? (__mmask16)0xffff : kt;                                              \
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(GET(x, C, c, k), mv), rv),                     \
                                     _mm512_maskz_loadu_ps(k, w + c));                                           \
            if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, b + c));                                       \
            if (res) v = _mm512_add_ps(v, LOAD(res + c, k));                                                    \
            STORE(y + c, k, v);                                                                                 \
        }                                                                                                       \
    }

ROW_KERNEL(row_f32, float, get_f32, load_f32, store_f32)
ROW_KERNEL(row_bf16, uint16_t, get_bf16, load_bf16, store_bf16)
ROW_KERNEL(row_prod_f32, float, prod_f32, load_f32, store_f32)
ROW_KERNEL(row_prod_bf16, uint16_t, prod_bf16, load_bf16, store_bf16)

#define KERNEL "avx512"
#else   /* portable loops */

static inline void row_stats(const float *x, int64_t C, float eps, float *mean, float *rstd) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t c = 0; c < C; ++c) s += x[c];
    const float m = s / (float)C;
    float q = 0.f;
#pragma omp simd reduction(+ : q)
    for (int64_t c = 0; c < C; ++c) {
        const float d = x[c] - m;
        q += d * d;
    }
    *mean = m;
    *rstd = 1.f / sqrtf(q / (float)C + eps);
}

/* The row (or the product of its two halves) in float32, in buf; then the statistics and the normalised row. */
#define ROW_PORTABLE(NAME, T, TO_F32, FROM_F32, PRODUCT)                                                         \
    static inline void NAME(const T *x, const float *w, const float *b, const T *res, T *y, int64_t C,          \
                            float eps) {                                                                        \
        float buf[MAX_C];                                                                                       \
        for (int64_t c = 0; c < C; ++c) buf[c] = PRODUCT ? TO_F32(x[c]) * TO_F32(x[C + c]) : TO_F32(x[c]);     \
        float m, rs;                                                                                            \
        row_stats(buf, C, eps, &m, &rs);                                                                        \
        for (int64_t c = 0; c < C; ++c) {                                                                       \
            float v = (buf[c] - m) * rs * w[c];                                                                 \
            if (b) v += b[c];                                                                                   \
            if (res) v += TO_F32(res[c]);                                                                       \
            y[c] = FROM_F32(v);                                                                                 \
        }                                                                                                       \
    }

static inline float f32_id(float v) { return v; }
ROW_PORTABLE(row_f32, float, f32_id, f32_id, 0)
ROW_PORTABLE(row_bf16, uint16_t, bf16_to_f32, f32_to_bf16, 0)
ROW_PORTABLE(row_prod_f32, float, f32_id, f32_id, 1)
ROW_PORTABLE(row_prod_bf16, uint16_t, bf16_to_f32, f32_to_bf16, 1)

#define KERNEL "portable"
#endif

const char *polynext_channel_norm_kernel(void) { return KERNEL; }

/* y[r] = norm(row r) * w (+ b) (+ res[r]) for rows x C values. The row is x[r] (rows x C), or with
 * `product` the product of the two halves of x[r] (rows x 2C): x[r, :C] * x[r, C:]. y and res are rows x C,
 * contiguous; y may be x (not with `product`). w (and b, or NULL): C values of x's dtype.
 * Returns 0, or 1 if C > MAX_C (nothing written). */
int polynext_channel_norm_f32(const float *x, const float *w, const float *b, const float *res, float *y,
                              int64_t rows, int64_t C, float eps, int threads, int product) {
    if (C > MAX_C) return 1;
    const int64_t stride = product ? 2 * C : C;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const float *rr = res ? res + r * C : NULL;
        if (product)
            row_prod_f32(x + r * stride, w, b, rr, y + r * C, C, eps);
        else
            row_f32(x + r * stride, w, b, rr, y + r * C, C, eps);
    }
    return 0;
}

int polynext_channel_norm_bf16(const uint16_t *x, const uint16_t *w16, const uint16_t *b16, const uint16_t *res,
                               uint16_t *y, int64_t rows, int64_t C, float eps, int threads, int product) {
    if (C > MAX_C) return 1;
    float w[MAX_C], b[MAX_C];
    for (int64_t c = 0; c < C; ++c) w[c] = bf16_to_f32(w16[c]);
    if (b16)
        for (int64_t c = 0; c < C; ++c) b[c] = bf16_to_f32(b16[c]);
    const int64_t stride = product ? 2 * C : C;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const uint16_t *rr = res ? res + r * C : NULL;
        if (product)
            row_prod_bf16(x + r * stride, w, b16 ? b : NULL, rr, y + r * C, C, eps);
        else
            row_bf16(x + r * stride, w, b16 ? b : NULL, rr, y + r * C, C, eps);
    }
    return 0;
}
