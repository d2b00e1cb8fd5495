/* polynext's hand-written CPU kernels, compiled on first use by polynext/ops/cpu_kernels.py
 * (-O3 -march=native -ffp-contract=off, -fopenmp when torch's libgomp is loaded: the process already holds it,
 * so these loops share torch's thread pool). float32 and bfloat16; bfloat16 values are computed in float32 and
 * rounded once, to the nearest even. With AVX-512 (and AVX-512 BF16 for the rounding) the loops are written
 * with intrinsics, masked at a row's end; elsewhere they are plain loops for the compiler's vectoriser, except the
 * depthwise and 1x1 kernels (9.-12., 14.), which also have AVX2 forms (x86-64-v3: AVX2 and FMA): 9. and 14. one
 * source for both through a small vector layer, 10.'s tile its own.
 *
 * 1. polynext_channel_norm_*: LayerNorm over the channels of a channels-last (NHWC) tensor, one row of C
 *    values per pixel:
 *
 *        y[r, c] = (x[r, c] - mean_r) / sqrt(var_r + eps) * w[c]  (+ b[c])  (+ res[r, c])
 *
 *    y may be x itself (each row is read whole before it is written). The optional residual is the addition
 *    that follows PolyConv's norm in a PolyNeXt block, and the row may be the product of the two halves of a
 *    wider row (PolyMLP's (W_a x) * (W_b x)), both done here instead of in more passes over memory. Why by
 *    hand: PyTorch's CPU layer_norm runs a channels-last PolyNeXt's rows (72-768 values) at 4-16 GB/s in
 *    bfloat16, against 30-55 GB/s for an elementwise product of the same tensor (2-core AMD EPYC Zen 4,
 *    benchmarks/cpu_kernels.py); no maintained library has a faster one for rows this short. Each row is read
 *    once from memory and kept in L1 for the two-pass statistics, then written once.
 *
 * 2. polynext_poly_rows_*: the polynomial attention's weights from its scores, one row per query:
 *
 *        A[r, j] = (S[r, j] + 1)^p / max(sum_j (S[r, j] + 1)^p, eps)      (p = 2 or 4)
 *
 *    in place or into out, and the row sums. PyTorch does this in seven passes over the N x N scores at
 *    bfloat16 inference (a conversion to float32, +1, two squares, the sum, the division, the conversion
 *    back): here the row is read once into L1 and written once. (In float32 PyTorch's path normalises after
 *    A @ V and is as fast, so polynext uses this kernel in bfloat16.)
 *
 * 3. Training (ops/channel_norm.py's and ops/poly_attention.py's autograd functions): the norm's forward also
 *    stores each row's mean and 1/std, and polynext_channel_norm_backward_f32 gives the gradients from them
 *    (with the product of halves: the gradients of both halves); the attention's forward writes (S + 1)^p and
 *    the row sums in one pass (polynext_poly_rows_* without normalising), and its backward recomputes A and
 *    (S + 1)^(p-1) in one pass (polynext_poly_prep_*) and forms dL/dS in another (polynext_poly_ds_*).
 *
 * 4. polynext_flip_mul_*: PolyConv's product of its coarse branch with its channel-reversed fine branch, on
 *    channels-last rows of C values, and its backward:
 *
 *        y[r, c] = a[r, c] * b[r, C-1-c];   da[r, c] = g[r, c] * b[r, C-1-c],  db[r, C-1-c] = g[r, c] * a[r, c]
 *
 *    PyTorch writes the reversed copy of b first (and in the backward reverses the product g * a): three
 *    passes more than these. Plain loops, which the compiler vectorises with lane permutes.
 *
 * 5. polynext_dw_wgrad_*: the weight gradient of a depthwise k x k convolution (stride 1, same padding, dilation
 *    d) of channels-last maps, for ops/depthwise.py's backward. PyTorch's CPU backward sends every depthwise
 *    weight gradient but the undilated 3x3 one to oneDNN's generic grouped kernel, 5-10x slower than the
 *    forward; polynext's phase split and column cut (ops/depthwise.py) bring the dilated and 5x5 ones back to
 *    oneDNN's fast 3-wide kernel at the cost of copies. Here an image's input and output gradient are copied in
 *    one pass into planes of 16 channels (the input's zero-padded), and every tap's sum is a register: one
 *    load and one FMA per tap and pixel, from L2.
 *
 * 6. polynext_poly_attention_f32: the whole polynomial attention of PolyAttn at float32 CPU inference,
 *
 *        O = (A / rowsum(A)) V,  A = (Q K^T + 1)^p,
 *
 *    eight query rows at a time: their scores against 32 keys at a time in registers (K transposed once per
 *    head), raised to the power and summed as they leave the registers, kept for the eight rows in L1 / L2
 *    (8 x M floats), then multiplied with V and divided by the sums. PyTorch's path writes the N x N scores of a
 *    tile of heads, passes over them three times more (+1, two squares) and once for the sums, and reads them for
 *    A V: at APolyNeXt's 196-token shapes its products ran at about a third of the machine's matrix-product rate,
 *    the whole op here at about two thirds (2-core Zen 4). AVX-512 only: the blocks are register tiles.
 *
 * 7. polynext_poly_attention_backward_f32: its backward in training, the same blocks: the scores recomputed, A and
 *    P^(p-1) kept for eight query rows in L1 / L2, and the five products (the scores, dV += A^T dY, dA = dY V^T,
 *    dQ = dS K, dK += dS^T Q) from there, where PyTorch's path writes a tile's N x N buffers and reads them back.
 *
 * 8. polynext_poly_attention_bf16 / polynext_poly_attention_backward_bf16: 6. and 7. for bfloat16 heads, their
 *    products on AVX-512 BF16's pair dot product.
 *
 * 9. polynext_polyconv_dw_*: PolyConv's three depthwise convolutions and its product at CPU inference, in one pass
 *    over the activation (at the end of this file):
 *
 *        y = DW_out( DW_coarse(u) * flip_c(DW_fine(u)) )
 *
 *    where PyTorch's path (oneDNN) runs the fine convolution, the reversal of its channels, the coarse convolution
 *    with the product as its post-op and the output convolution: four passes over a tensor that does not fit in the
 *    caches, each at a memory-bound 12-15 GMAC/s on a 2-core Zen 4 (polynext profile), about a sixth of the
 *    machine's FMA rate.
 *
 * 10. polynext_pointwise_f32: a 1x1 convolution of a channels-last float32 tensor at CPU inference, its outputs in
 *     register tiles of 72 or 48 (first written for PolyNeXt's narrow first two stages), y = x W (+ y):
 *
 *         y[p, n] (+)= sum_k x[p, k] W[k, n]
 *
 *     oneDNN's kernels for the narrow products (48-144 outputs) run at 45-65 GMAC/s on a 2-core Zen 4 against about
 *     90 for wide ones; here a tile of 5 pixels x 72 outputs (4 vectors and a half) or 8 pixels x 48 outputs stays
 *     in registers for the whole sum over k, which also runs the wider layers a few per cent faster than oneDNN.
 *
 * 11. polynext_pointwise_norm_f32: 10. with 1.'s LayerNorm as its epilogue (PolyConv's pw_out with its norm and
 *     residual, PolyMLP's fc_in with its product and norm): a pixel tile's outputs are normalised from a buffer on
 *     the stack by 1.'s row functions, so the convolution's output never goes to memory and back.
 *
 * 12. polynext_poly_mlp_f32: a PolyNeXt block's whole PolyMLP residual (fc_in, the product and norm of 11., fc_out
 *     added into the stream as in 10.) for a block of pixels at a time, its intermediates in per-thread buffers.
 *
 * 13. polynext_pointwise_norm_bf16 / polynext_poly_mlp_bf16: 11. and 12. for a bf16 model, on AVX-512 BF16's pair
 *     dot product.
 *
 * 14. polynext_heads_dw_*: a depthwise convolution from one memory layout into another (PolyAttn's Q, K and V
 *     convolutions from the channels-last projection straight into the attention's heads, its output convolution
 *     from the heads back to channels-last), where PyTorch's path adds a copy before or after each. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
static inline int64_t thread_id(void) { return omp_get_thread_num(); }
static inline int64_t thread_count(void) { return omp_get_num_threads(); }
#else
static inline int64_t thread_id(void) { return 0; }
static inline int64_t thread_count(void) { return 1; }
#endif

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
#define ROW_KERNEL2(NAME, T, TY, GET, LOAD, STORE)                                                               \
    static inline void NAME(const T *x, const float *w, const float *b, const TY *res, TY *y, int64_t C,        \
                            float eps, float *st) {                                                             \
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
        const float rs = 1.f / sqrtf(var + eps);                                                                \
        const __m512 rv = _mm512_set1_ps(rs);                                                                   \
        if (st) {                                                                                               \
            st[0] = _mm512_cvtss_f32(mv);                                                                       \
            st[1] = rs;                                                                                         \
        }                                                                                                       \
        for (c = 0; c < C; c += 16) {                                                                           \
            const __mmask16 k = c < full ? (__mmask16)0xffff : kt;                                              \
            __m512 v = _mm512_mul_ps(_mm512_mul_ps(_mm512_sub_ps(GET(x, C, c, k), mv), rv),                     \
                                     _mm512_maskz_loadu_ps(k, w + c));                                           \
            if (b) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(k, b + c));                                       \
            if (res) v = _mm512_add_ps(v, LOAD(res + c, k));                                                    \
            STORE(y + c, k, v);                                                                                 \
        }                                                                                                       \
    }

#define ROW_KERNEL(NAME, T, GET, LOAD, STORE) ROW_KERNEL2(NAME, T, T, GET, LOAD, STORE)
ROW_KERNEL(row_f32, float, get_f32, load_f32, store_f32)
ROW_KERNEL(row_bf16, uint16_t, get_bf16, load_bf16, store_bf16)
ROW_KERNEL(row_prod_f32, float, prod_f32, load_f32, store_f32)
ROW_KERNEL(row_prod_bf16, uint16_t, prod_bf16, load_bf16, store_bf16)
/* float32 rows in (the 1x1 kernel's buffer, 13.), bfloat16 out (and residual) */
ROW_KERNEL2(row_f32_bf16, float, uint16_t, get_f32, load_bf16, store_bf16)
ROW_KERNEL2(row_prod_f32_bf16, float, uint16_t, prod_f32, load_bf16, store_bf16)


static inline __m512 poly_pow(__m512 s, int power) {   /* (s + 1)^power, power 2 or 4 */
    __m512 p = _mm512_add_ps(s, _mm512_set1_ps(1.f));
    p = _mm512_mul_ps(p, p);
    return power == 4 ? _mm512_mul_ps(p, p) : p;
}

/* One row of attention weights: the sum of (s + 1)^p (the masked tail's lanes kept at 0), then each value
 * recomputed from L1 and divided by the sum; without `normalise`, (s + 1)^p written in the first pass. Returns the
 * (clamped) sum. */
#define POLY_ROW(NAME, T, LOAD, STORE)                                                                           \
    static inline float NAME(const T *s, T *out, int64_t N, int power, float eps, int normalise) {              \
        const int64_t full = N & ~(int64_t)15;                                                                  \
        const __mmask16 kt = (__mmask16)((1u << (N - full)) - 1u);                                              \
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();                                              \
        int64_t c = 0;                                                                                          \
        if (!normalise) {                                                                                       \
            for (; c < N; c += 16) {                                                                            \
                const __mmask16 k = c < full ? (__mmask16)0xffff : kt;                                          \
                const __m512 p = _mm512_maskz_mov_ps(k, poly_pow(LOAD(s + c, k), power));                      \
                STORE(out + c, k, p);                                                                           \
                a0 = _mm512_add_ps(a0, p);                                                                      \
            }                                                                                                   \
            float r = _mm512_reduce_add_ps(a0);                                                                 \
            return !(r >= eps) ? (r != r ? r : eps) : r;                                                        \
        }                                                                                                       \
        for (; c + 32 <= full; c += 32) {                                                                       \
            a0 = _mm512_add_ps(a0, poly_pow(LOAD(s + c, 0xffff), power));                                      \
            a1 = _mm512_add_ps(a1, poly_pow(LOAD(s + c + 16, 0xffff), power));                                 \
        }                                                                                                       \
        if (c < full) a0 = _mm512_add_ps(a0, poly_pow(LOAD(s + c, 0xffff), power));                            \
        if (kt) a1 = _mm512_add_ps(a1, _mm512_maskz_mov_ps(kt, poly_pow(LOAD(s + full, kt), power)));          \
        float r = _mm512_reduce_add_ps(_mm512_add_ps(a0, a1));                                                  \
        if (!(r >= eps)) r = r != r ? r : eps;   /* clamp_min(eps), NaN kept */                                \
        const __m512 rv = _mm512_set1_ps(r);                                                                    \
        for (c = 0; c < N; c += 16) {                                                                           \
            const __mmask16 k = c < full ? (__mmask16)0xffff : kt;                                              \
            STORE(out + c, k, _mm512_div_ps(poly_pow(LOAD(s + c, k), power), rv));                              \
        }                                                                                                       \
        return r;                                                                                               \
    }

/* The attention backward's recomputation, one row: from the scores S, P = S + 1, A = P^p (divided by the row's
 * sum r where given) written over S, and P^(p-1) in float32, the same products in the same order as PyTorch's
 * path (P^2 = P P, P^3 = P P^2, P^4 = P^2 P^2). */
#define POLY_PREP(NAME, T, LOAD, STORE)                                                                          \
    static inline void NAME(T *s, float *p3, int64_t N, int power, const float *r) {                            \
        const int64_t full = N & ~(int64_t)15;                                                                  \
        const __mmask16 kt = (__mmask16)((1u << (N - full)) - 1u);                                              \
        const __m512 rv = _mm512_set1_ps(r ? *r : 1.f);                                                         \
        for (int64_t c = 0; c < N; c += 16) {                                                                   \
            const __mmask16 k = c < full ? (__mmask16)0xffff : kt;                                              \
            const __m512 p = _mm512_add_ps(LOAD(s + c, k), _mm512_set1_ps(1.f));                                \
            const __m512 p2 = _mm512_mul_ps(p, p);                                                              \
            __m512 a = power == 4 ? _mm512_mul_ps(p2, p2) : p2;                                                 \
            store_f32(p3 + c, k, power == 4 ? _mm512_mul_ps(p, p2) : p);                                        \
            if (r) a = _mm512_div_ps(a, rv);                                                                    \
            STORE(s + c, k, a);                                                                                 \
        }                                                                                                       \
    }

/* dL/dS of one row, over dL/dA: (dA + d) P^(p-1), d the row's term (the row sum's gradient, times p). */
#define POLY_DS(NAME, T, LOAD, STORE)                                                                            \
    static inline void NAME(T *da, const float *p3, int64_t N, float d) {                                       \
        const int64_t full = N & ~(int64_t)15;                                                                  \
        const __mmask16 kt = (__mmask16)((1u << (N - full)) - 1u);                                              \
        const __m512 dv = _mm512_set1_ps(d);                                                                    \
        for (int64_t c = 0; c < N; c += 16) {                                                                   \
            const __mmask16 k = c < full ? (__mmask16)0xffff : kt;                                              \
            STORE(da + c, k, _mm512_mul_ps(_mm512_add_ps(LOAD(da + c, k), dv), load_f32(p3 + c, k)));          \
        }                                                                                                       \
    }

POLY_PREP(poly_prep_f32, float, load_f32, store_f32)
POLY_PREP(poly_prep_bf16, uint16_t, load_bf16, store_bf16)
POLY_DS(poly_ds_f32, float, load_f32, store_f32)
POLY_DS(poly_ds_bf16, uint16_t, load_bf16, store_bf16)

POLY_ROW(poly_row_f32, float, load_f32, store_f32)
POLY_ROW(poly_row_bf16, uint16_t, load_bf16, store_bf16)

/* One row of the norm's backward (polynext_channel_norm_backward_f32): the two sums over the row, then dx and
 * the weight's (and bias's) partial sums; both passes read the row from L1. */
#define BWD_ROW(NAME, TX, LOADX, STOREX, PRODUCT)                                                                \
    static inline void NAME(const TX *g, const TX *x, const float *w, const float *st, TX *dx,                  \
                            float *dw, float *db, int64_t C) {                                                  \
        const int64_t full = C & ~(int64_t)15;                                                                  \
        const __mmask16 kt = (__mmask16)((1u << (C - full)) - 1u);                                              \
        const __m512 mv = _mm512_set1_ps(st[0]), rv = _mm512_set1_ps(st[1]);                                   \
        __m512 s1 = _mm512_setzero_ps(), s2 = _mm512_setzero_ps();                                              \
        for (int64_t c = 0; c < C; c += 16) {   /* masked lanes: g = 0, so they add nothing */                  \
            const __mmask16 k = c < full ? (__mmask16)0xffff : kt;                                              \
            const __m512 z = PRODUCT ? _mm512_mul_ps(LOADX(x + c, k), LOADX(x + C + c, k)) : LOADX(x + c, k);   \
            const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(z, mv), rv);                                         \
            const __m512 gw = _mm512_mul_ps(LOADX(g + c, k), load_f32(w + c, k));                               \
            s1 = _mm512_add_ps(s1, gw);                                                                         \
            s2 = _mm512_fmadd_ps(gw, xh, s2);                                                                   \
        }                                                                                                       \
        const __m512 m1 = _mm512_set1_ps(_mm512_reduce_add_ps(s1) / (float)C);                                  \
        const __m512 m2 = _mm512_set1_ps(_mm512_reduce_add_ps(s2) / (float)C);                                  \
        for (int64_t c = 0; c < C; c += 16) {                                                                   \
            const __mmask16 k = c < full ? (__mmask16)0xffff : kt;                                              \
            const __m512 a = LOADX(x + c, k);                                                                   \
            const __m512 bb = PRODUCT ? LOADX(x + C + c, k) : a;                                                \
            const __m512 z = PRODUCT ? _mm512_mul_ps(a, bb) : a;                                                \
            const __m512 xh = _mm512_mul_ps(_mm512_sub_ps(z, mv), rv);                                         \
            const __m512 gv = LOADX(g + c, k);                                                                  \
            const __m512 gw = _mm512_mul_ps(gv, load_f32(w + c, k));                                            \
            const __m512 dz = _mm512_mul_ps(rv, _mm512_sub_ps(_mm512_sub_ps(gw, m1), _mm512_mul_ps(xh, m2)));  \
            if (PRODUCT) {                                                                                      \
                STOREX(dx + c, k, _mm512_mul_ps(dz, bb));                                                       \
                STOREX(dx + C + c, k, _mm512_mul_ps(dz, a));                                                    \
            } else {                                                                                            \
                STOREX(dx + c, k, dz);                                                                          \
            }                                                                                                   \
            store_f32(dw + c, k, _mm512_add_ps(load_f32(dw + c, k), _mm512_mul_ps(gv, xh)));                   \
            if (db) store_f32(db + c, k, _mm512_add_ps(load_f32(db + c, k), gv));                              \
        }                                                                                                       \
    }

BWD_ROW(bwd_row_f32, float, load_f32, store_f32, 0)
BWD_ROW(bwd_row_prod_f32, float, load_f32, store_f32, 1)
BWD_ROW(bwd_row_bf16, uint16_t, load_bf16, store_bf16, 0)
BWD_ROW(bwd_row_prod_bf16, uint16_t, load_bf16, store_bf16, 1)

/* One item of polynext_dw_wgrad_* (5. above): channel blocks b0..b1-1 (16 channels each, the last one masked) of
 * image x (H x W x C, channels-last) and its output gradient g. One pass over the image's pixels copies each block
 * into its own plane: x's into pad, zero-padded by p on every side ((H + 2p) x (W + 2p) vectors), g's into gp
 * (H x W vectors); then, block by block from L2, every output pixel's gradient meets each tap's input vector with
 * no bounds to check, and the k x k sums stay in registers (k = 3 and 5, dilation 1 and 2: 9 and 25 of the 32
 * registers, the taps' offsets constants). */
#define DW_TAPS(K, D)                                                                                           \
    do {                                                                                                        \
        __m512 acc[K * K];                                                                                      \
        _Pragma("GCC unroll 25")                                                                                \
        for (int t = 0; t < K * K; ++t) acc[t] = _mm512_setzero_ps();                                           \
        for (int64_t h = 0; h < H; ++h) {                                                                       \
            const float *gr = gq + h * W * 16;                                                                  \
            const float *row[K];                                                                                \
            _Pragma("GCC unroll 5")                                                                             \
            for (int i = 0; i < K; ++i) row[i] = xq + (h + (int64_t)i * D) * Wp * 16;                           \
            for (int64_t w = 0; w < W; ++w) {                                                                   \
                const __m512 gv = _mm512_loadu_ps(gr + w * 16);                                                 \
                _Pragma("GCC unroll 5")                                                                         \
                for (int i = 0; i < K; ++i)                                                                     \
                    _Pragma("GCC unroll 5")                                                                     \
                    for (int j = 0; j < K; ++j)                                                                 \
                        acc[i * K + j] = _mm512_fmadd_ps(gv, _mm512_loadu_ps(row[i] + (w + j * D) * 16), acc[i * K + j]); \
            }                                                                                                   \
        }                                                                                                       \
        _Pragma("GCC unroll 25")                                                                                \
        for (int t = 0; t < K * K; ++t)                                                                         \
            _mm512_mask_storeu_ps(out + t * C + c0, km, _mm512_add_ps(_mm512_maskz_loadu_ps(km, out + t * C + c0), acc[t])); \
    } while (0)

static inline __mmask16 block_mask(int64_t C, int64_t c0) {
    return C - c0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (C - c0)) - 1u);
}

#define DW_ITEM(NAME, T, LOAD)                                                                                  \
    static void NAME(const T *x, const T *g, float *pad, float *gp, float *out, int64_t H, int64_t W, int64_t C, \
                     int64_t b0, int64_t b1, int k, int d) {                                                    \
        const int64_t p = (int64_t)d * (k - 1) / 2, Wp = W + 2 * p, plane = (H + 2 * p) * Wp * 16, gplane = H * W * 16; \
        const __m512 zero = _mm512_setzero_ps();                                                                \
        for (int64_t b = 0; b < b1 - b0; ++b) {        /* the planes' borders */                               \
            float *xq = pad + b * plane;                                                                        \
            for (int64_t q = 0; q < p * Wp; ++q) {                                                              \
                _mm512_storeu_ps(xq + q * 16, zero);                                                            \
                _mm512_storeu_ps(xq + ((H + p) * Wp + q) * 16, zero);                                           \
            }                                                                                                   \
            for (int64_t h = 0; h < H; ++h)                                                                     \
                for (int64_t w = 0; w < p; ++w) {                                                               \
                    _mm512_storeu_ps(xq + ((h + p) * Wp + w) * 16, zero);                                       \
                    _mm512_storeu_ps(xq + ((h + p) * Wp + W + p + w) * 16, zero);                               \
                }                                                                                               \
        }                                                                                                       \
        for (int64_t h = 0; h < H; ++h)                /* one pass over the image's pixels */                  \
            for (int64_t w = 0; w < W; ++w) {                                                                   \
                const T *xr = x + (h * W + w) * C, *gr = g + (h * W + w) * C;                                   \
                for (int64_t b = b0; b < b1; ++b) {                                                             \
                    const __mmask16 km = block_mask(C, 16 * b);                                                 \
                    _mm512_storeu_ps(pad + (b - b0) * plane + ((h + p) * Wp + w + p) * 16, LOAD(xr + 16 * b, km)); \
                    _mm512_storeu_ps(gp + (b - b0) * gplane + (h * W + w) * 16, LOAD(gr + 16 * b, km));         \
                }                                                                                               \
            }                                                                                                   \
        for (int64_t b = b0; b < b1; ++b) {                                                                     \
            const float *xq = pad + (b - b0) * plane, *gq = gp + (b - b0) * gplane;                             \
            const int64_t c0 = 16 * b;                                                                          \
            const __mmask16 km = block_mask(C, c0);                                                             \
            if (k == 3 && d == 1) DW_TAPS(3, 1);                                                                \
            else if (k == 3 && d == 2) DW_TAPS(3, 2);                                                           \
            else if (k == 5 && d == 1) DW_TAPS(5, 1);                                                           \
            else if (k == 5 && d == 2) DW_TAPS(5, 2);                                                           \
            else                                       /* other sizes: one tap at a time over the map */       \
                for (int i = 0; i < k; ++i)                                                                     \
                    for (int j = 0; j < k; ++j) {                                                               \
                        __m512 acc = _mm512_setzero_ps();                                                       \
                        for (int64_t h = 0; h < H; ++h)                                                         \
                            for (int64_t w = 0; w < W; ++w)                                                     \
                                acc = _mm512_fmadd_ps(_mm512_loadu_ps(gq + (h * W + w) * 16),                   \
                                                      _mm512_loadu_ps(xq + ((h + (int64_t)i * d) * Wp + w + j * d) * 16), acc); \
                        float *o = out + (i * k + j) * C + c0;                                                  \
                        _mm512_mask_storeu_ps(o, km, _mm512_add_ps(_mm512_maskz_loadu_ps(km, o), acc));         \
                    }                                                                                           \
        }                                                                                                       \
    }

DW_ITEM(dw_item_f32, float, load_f32)
DW_ITEM(dw_item_bf16, uint16_t, load_bf16)

/* The fused attention (6. and 7. above) works on ATTN_ROWS query rows of one head at a time, head dimension D = 16 or
 * 32; the helpers below are its three loop nests, inlined into each block function with D a constant (so that the
 * accumulators stay in registers). M keys are padded with zero columns to Mp in the transposed copies kt / vt, and
 * a block's weights (ATTN_ROWS x Mp floats, ab) stay in L1 / L2. */
#define ATTN_ROWS 8
#define ATTN_SUM 256
#define ATTN_INLINE static inline __attribute__((always_inline))

/* the 16 x 16 words r transposed in place (unpacks within 128-bit lanes, then two lane shuffles) */
static inline void attn_transpose16(__m512i *r) {
    __m512i t[16];
    for (int i = 0; i < 8; ++i) {
        t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
    }
    for (int i = 0; i < 4; ++i) {   /* r[4i + c], 128-bit lane L: rows 4i .. 4i + 3 of column 4L + c */
        r[4 * i] = _mm512_unpacklo_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 1] = _mm512_unpackhi_epi64(t[4 * i], t[4 * i + 2]);
        r[4 * i + 2] = _mm512_unpacklo_epi64(t[4 * i + 1], t[4 * i + 3]);
        r[4 * i + 3] = _mm512_unpackhi_epi64(t[4 * i + 1], t[4 * i + 3]);
    }
    for (int c = 0; c < 4; ++c) {   /* column 4L + c: lane L of r[c], r[4 + c], r[8 + c], r[12 + c] */
        const __m512i u0 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0x44), u1 = _mm512_shuffle_i32x4(r[c], r[4 + c], 0xEE);
        const __m512i v0 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0x44);
        const __m512i v1 = _mm512_shuffle_i32x4(r[8 + c], r[12 + c], 0xEE);
        t[c] = _mm512_shuffle_i32x4(u0, v0, 0x88);
        t[4 + c] = _mm512_shuffle_i32x4(u0, v0, 0xDD);
        t[8 + c] = _mm512_shuffle_i32x4(u1, v1, 0x88);
        t[12 + c] = _mm512_shuffle_i32x4(u1, v1, 0xDD);
    }
    for (int i = 0; i < 16; ++i) r[i] = t[i];
}

/* a[r] (and b[r] where `two`) = the rows xb[r] (ATTN_ROWS x D) against the columns j .. j + 15 (j + 16 .. j + 31)
 * of the transposed t (D x Mp): the scores Q K^T of 32 keys, or dY V^T. */
ATTN_INLINE void attn_dots(const float *xb, const float *t, int64_t j, int64_t Mp, int64_t D, int two, __m512 *a,
                           __m512 *b) {
    for (int r = 0; r < ATTN_ROWS; ++r) a[r] = b[r] = _mm512_setzero_ps();
    if (two)
        for (int64_t d = 0; d < D; ++d) {
            const __m512 t0 = _mm512_loadu_ps(t + d * Mp + j), t1 = _mm512_loadu_ps(t + d * Mp + j + 16);
            for (int r = 0; r < ATTN_ROWS; ++r) {
                const __m512 x = _mm512_set1_ps(xb[r * D + d]);
                a[r] = _mm512_fmadd_ps(x, t0, a[r]);
                b[r] = _mm512_fmadd_ps(x, t1, b[r]);
            }
        }
    else
        for (int64_t d = 0; d < D; ++d) {
            const __m512 t0 = _mm512_loadu_ps(t + d * Mp + j);
            for (int r = 0; r < ATTN_ROWS; ++r) a[r] = _mm512_fmadd_ps(_mm512_set1_ps(xb[r * D + d]), t0, a[r]);
        }
}

/* tot[r * DV + e] = sum_j ab[r, j] x[j, 16 e .. 16 e + 15] over the M rows of x (M x D): A V, or dS K; summed in
 * blocks of ATTN_SUM keys (a two-level sum, so that long rows lose no more than PyTorch's blocked products). */
ATTN_INLINE void attn_weigh(const float *ab, int64_t Mp, const float *x, int64_t M, int64_t D, __m512 *tot) {
    const int DV = (int)(D / 16);
    for (int i = 0; i < ATTN_ROWS * DV; ++i) tot[i] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < M; j0 += ATTN_SUM) {
        const int64_t j1 = j0 + ATTN_SUM < M ? j0 + ATTN_SUM : M;
        __m512 acc[ATTN_ROWS * 2];
        for (int i = 0; i < ATTN_ROWS * DV; ++i) acc[i] = _mm512_setzero_ps();
        for (int64_t j = j0; j < j1; ++j) {
            __m512 xv[2];
            for (int e = 0; e < DV; ++e) xv[e] = _mm512_loadu_ps(x + j * D + 16 * e);
            for (int r = 0; r < ATTN_ROWS; ++r) {
                const __m512 w = _mm512_set1_ps(ab[r * Mp + j]);
                for (int e = 0; e < DV; ++e) acc[r * DV + e] = _mm512_fmadd_ps(w, xv[e], acc[r * DV + e]);
            }
        }
        for (int i = 0; i < ATTN_ROWS * DV; ++i) tot[i] = _mm512_add_ps(tot[i], acc[i]);
    }
}

/* out[j] += sum_r ab[r, j] xb[r] for the M rows of out (M x D): dV += A^T dY, or dK += dS^T Q; the rows xb
 * (ATTN_ROWS x D) in registers, one row of out at a time. */
ATTN_INLINE void attn_scatter(const float *ab, int64_t Mp, const float *xb, float *out, int64_t M, int64_t D) {
    const int DV = (int)(D / 16);
    __m512 x[ATTN_ROWS * 2];
    for (int r = 0; r < ATTN_ROWS; ++r)
        for (int e = 0; e < DV; ++e) x[r * DV + e] = _mm512_loadu_ps(xb + r * D + 16 * e);
    for (int64_t j = 0; j < M; ++j) {
        __m512 acc[2];
        for (int e = 0; e < DV; ++e) acc[e] = _mm512_setzero_ps();
        for (int r = 0; r < ATTN_ROWS; ++r) {
            const __m512 w = _mm512_set1_ps(ab[r * Mp + j]);
            for (int e = 0; e < DV; ++e) acc[e] = _mm512_fmadd_ps(w, x[r * DV + e], acc[e]);
        }
        for (int e = 0; e < DV; ++e)
            _mm512_storeu_ps(out + j * D + 16 * e, _mm512_add_ps(_mm512_loadu_ps(out + j * D + 16 * e), acc[e]));
    }
}

/* the forward's end for nr rows: each row sum (lanes of sum[r]) clamped to eps (NaN kept), written to rowsum[r]
 * unless it is NULL, and the row's A V (tot) divided by it */
ATTN_INLINE void attn_divide_rows(const __m512 *sum, __m512 *tot, int64_t nr, int64_t D, float eps, float *rowsum) {
    const int DV = (int)(D / 16);
    for (int64_t r = 0; r < nr; ++r) {
        float t = _mm512_reduce_add_ps(sum[r]);
        if (!(t >= eps)) t = t != t ? t : eps;   /* clamp_min(eps), NaN kept */
        if (rowsum) rowsum[r] = t;
        for (int e = 0; e < DV; ++e) tot[r * DV + e] = _mm512_div_ps(tot[r * DV + e], _mm512_set1_ps(t));
    }
}

/* Forward, rows i0 .. i0 + nr - 1 (nr <= ATTN_ROWS): the rows of Q copied to qb (zero rows past nr); per 32 keys
 * the scores, (s + 1)^p (zero past the last key) into ab and summed per lane; then O = A V / max(row sum, eps). */
ATTN_INLINE void attn_forward_rows(const float *q, const float *kt, const float *v, float *o, float *rowsum,
                                   int64_t i0, int64_t nr, int64_t M, int64_t Mp, int64_t D, int power, float eps,
                                   float *qb, float *ab) {
    const int DV = (int)(D / 16);
    memset(qb, 0, sizeof(float) * ATTN_ROWS * D);
    memcpy(qb, q + i0 * D, sizeof(float) * nr * D);
    __m512 sum[ATTN_ROWS], a0[ATTN_ROWS], a1[ATTN_ROWS], tot[ATTN_ROWS * 2];
    for (int r = 0; r < ATTN_ROWS; ++r) sum[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < Mp; j += 32) {
        const int two = j + 32 <= Mp;
        attn_dots(qb, kt, j, Mp, D, two, a0, a1);
        const __mmask16 m0 = block_mask(M, j), m1 = two ? block_mask(M, j + 16) : 0;
        for (int r = 0; r < ATTN_ROWS; ++r) {
            const __m512 p0 = _mm512_maskz_mov_ps(m0, poly_pow(a0[r], power));
            _mm512_storeu_ps(ab + r * Mp + j, p0);
            sum[r] = _mm512_add_ps(sum[r], p0);
            if (two) {
                const __m512 p1 = _mm512_maskz_mov_ps(m1, poly_pow(a1[r], power));
                _mm512_storeu_ps(ab + r * Mp + j + 16, p1);
                sum[r] = _mm512_add_ps(sum[r], p1);
            }
        }
    }
    attn_weigh(ab, Mp, v, M, D, tot);
    attn_divide_rows(sum, tot, nr, D, eps, rowsum ? rowsum + i0 : NULL);
    for (int64_t r = 0; r < nr; ++r)
        for (int e = 0; e < DV; ++e) _mm512_storeu_ps(o + (i0 + r) * D + 16 * e, tot[r * DV + e]);
}

/* Backward, the same rows: dy = g / r into yb and d = -p (g . o) / r per row; the scores recomputed, A = P^p into ab
 * and P^(p-1) into pb (zero past the last key); dv += A^T dy; dS = (p dy V^T + d) P^(p-1) over ab; dq = dS K;
 * dk += dS^T q. */
ATTN_INLINE void attn_backward_rows(const float *q, const float *kt, const float *k, const float *vt, const float *o,
                                    const float *g, const float *rowsum, float *dq, float *dk, float *dv, int64_t i0,
                                    int64_t nr, int64_t M, int64_t Mp, int64_t D, int power, float *qb, float *yb,
                                    float *ab, float *pb) {
    const int DV = (int)(D / 16);
    const __m512 one = _mm512_set1_ps(1.f), pw = _mm512_set1_ps((float)power);
    float dterm[ATTN_ROWS] = {0.f};
    __m512 a0[ATTN_ROWS], a1[ATTN_ROWS], tot[ATTN_ROWS * 2];
    memset(qb, 0, sizeof(float) * ATTN_ROWS * D);
    memset(yb, 0, sizeof(float) * ATTN_ROWS * D);
    memcpy(qb, q + i0 * D, sizeof(float) * nr * D);
    for (int64_t r = 0; r < nr; ++r) {
        const float inv = 1.f / rowsum[i0 + r];
        __m512 go = _mm512_setzero_ps();
        for (int e = 0; e < DV; ++e) {
            const __m512 gv = _mm512_loadu_ps(g + (i0 + r) * D + 16 * e);
            go = _mm512_fmadd_ps(gv, _mm512_loadu_ps(o + (i0 + r) * D + 16 * e), go);
            _mm512_storeu_ps(yb + r * D + 16 * e, _mm512_mul_ps(gv, _mm512_set1_ps(inv)));
        }
        dterm[r] = -(float)power * _mm512_reduce_add_ps(go) * inv;
    }
    for (int64_t j = 0; j < Mp; j += 32) {
        const int two = j + 32 <= Mp;
        attn_dots(qb, kt, j, Mp, D, two, a0, a1);
        const __mmask16 m[2] = {block_mask(M, j), two ? block_mask(M, j + 16) : (__mmask16)0};
        for (int r = 0; r < ATTN_ROWS; ++r)
            for (int h = 0; h < 1 + two; ++h) {
                const __m512 p = _mm512_add_ps(h ? a1[r] : a0[r], one), p2 = _mm512_mul_ps(p, p);
                const __m512 a = power == 4 ? _mm512_mul_ps(p2, p2) : p2, p3 = power == 4 ? _mm512_mul_ps(p, p2) : p;
                _mm512_storeu_ps(ab + r * Mp + j + 16 * h, _mm512_maskz_mov_ps(m[h], a));
                _mm512_storeu_ps(pb + r * Mp + j + 16 * h, _mm512_maskz_mov_ps(m[h], p3));
            }
    }
    attn_scatter(ab, Mp, yb, dv, M, D);
    for (int64_t j = 0; j < Mp; j += 32) {
        const int two = j + 32 <= Mp;
        attn_dots(yb, vt, j, Mp, D, two, a0, a1);
        for (int r = 0; r < ATTN_ROWS; ++r)
            for (int h = 0; h < 1 + two; ++h) {
                const __m512 da = _mm512_fmadd_ps(h ? a1[r] : a0[r], pw, _mm512_set1_ps(dterm[r]));
                float *at = ab + r * Mp + j + 16 * h;
                _mm512_storeu_ps(at, _mm512_mul_ps(da, _mm512_loadu_ps(pb + r * Mp + j + 16 * h)));
            }
    }
    attn_weigh(ab, Mp, k, M, D, tot);
    for (int64_t r = 0; r < nr; ++r)
        for (int e = 0; e < DV; ++e) _mm512_storeu_ps(dq + (i0 + r) * D + 16 * e, tot[r * DV + e]);
    attn_scatter(ab, Mp, qb, dk, M, D);
}

/* the blocks, with D a constant in each branch */
static int attn_block(const float *q, const float *kt, const float *v, float *o, float *rowsum, int64_t i0, int64_t nr,
                      int64_t M, int64_t Mp, int64_t D, int power, float eps, float *qb, float *ab) {
    if (D == 32) attn_forward_rows(q, kt, v, o, rowsum, i0, nr, M, Mp, 32, power, eps, qb, ab);
    else if (D == 16) attn_forward_rows(q, kt, v, o, rowsum, i0, nr, M, Mp, 16, power, eps, qb, ab);
    else return 1;
    return 0;
}

static void attn_bwd_block(const float *q, const float *kt, const float *k, const float *vt, const float *o,
                           const float *g, const float *rowsum, float *dq, float *dk, float *dv, int64_t i0,
                           int64_t nr, int64_t M, int64_t Mp, int64_t D, int power, float *qb, float *yb, float *ab,
                           float *pb) {
    if (D == 32) attn_backward_rows(q, kt, k, vt, o, g, rowsum, dq, dk, dv, i0, nr, M, Mp, 32, power, qb, yb, ab, pb);
    else attn_backward_rows(q, kt, k, vt, o, g, rowsum, dq, dk, dv, i0, nr, M, Mp, 16, power, qb, yb, ab, pb);
}
#define ATTN_FUSED 1

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
                            float eps, float *st) {                                                             \
        float buf[MAX_C];                                                                                       \
        for (int64_t c = 0; c < C; ++c) buf[c] = PRODUCT ? TO_F32(x[c]) * TO_F32(x[C + c]) : TO_F32(x[c]);     \
        float m, rs;                                                                                            \
        row_stats(buf, C, eps, &m, &rs);                                                                        \
        if (st) {                                                                                               \
            st[0] = m;                                                                                          \
            st[1] = rs;                                                                                         \
        }                                                                                                       \
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


#define POLY_ROW_PORTABLE(NAME, T, TO_F32, FROM_F32)                                                            \
    static inline float NAME(const T *s, T *out, int64_t N, int power, float eps, int normalise) {              \
        float r = 0.f;                                                                                          \
        for (int64_t c = 0; c < N; ++c) {                                                                       \
            float p = TO_F32(s[c]) + 1.f;                                                                       \
            p *= p;                                                                                             \
            if (power == 4) p *= p;                                                                             \
            r += p;                                                                                             \
            if (!normalise) out[c] = FROM_F32(p);                                                               \
        }                                                                                                       \
        if (!(r >= eps)) r = r != r ? r : eps;                                                                  \
        if (normalise)                                                                                          \
            for (int64_t c = 0; c < N; ++c) {                                                                   \
                float p = TO_F32(s[c]) + 1.f;                                                                   \
                p *= p;                                                                                         \
                out[c] = FROM_F32((power == 4 ? p * p : p) / r);                                                \
            }                                                                                                   \
        return r;                                                                                               \
    }

#define POLY_PREP_PORTABLE(NAME, T, TO_F32, FROM_F32)                                                           \
    static inline void NAME(T *s, float *p3, int64_t N, int power, const float *r) {                            \
        for (int64_t c = 0; c < N; ++c) {                                                                       \
            const float p = TO_F32(s[c]) + 1.f, p2 = p * p;                                                     \
            float a = power == 4 ? p2 * p2 : p2;                                                                \
            p3[c] = power == 4 ? p * p2 : p;                                                                    \
            if (r) a /= *r;                                                                                     \
            s[c] = FROM_F32(a);                                                                                 \
        }                                                                                                       \
    }

#define POLY_DS_PORTABLE(NAME, T, TO_F32, FROM_F32)                                                             \
    static inline void NAME(T *da, const float *p3, int64_t N, float d) {                                       \
        for (int64_t c = 0; c < N; ++c) da[c] = FROM_F32((TO_F32(da[c]) + d) * p3[c]);                          \
    }

POLY_PREP_PORTABLE(poly_prep_f32, float, f32_id, f32_id)
POLY_PREP_PORTABLE(poly_prep_bf16, uint16_t, bf16_to_f32, f32_to_bf16)
POLY_DS_PORTABLE(poly_ds_f32, float, f32_id, f32_id)
POLY_DS_PORTABLE(poly_ds_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

POLY_ROW_PORTABLE(poly_row_f32, float, f32_id, f32_id)
POLY_ROW_PORTABLE(poly_row_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

#define BWD_PORTABLE(NAME, TX, TO_F32, FROM_F32, PRODUCT)                                                        \
    static inline void NAME(const TX *g, const TX *x, const float *w, const float *st, TX *dx,                  \
                            float *dw, float *db, int64_t C) {                                                  \
        float xh[MAX_C], gf[MAX_C];                                                                             \
        const float m = st[0], rs = st[1];                                                                      \
        float s1 = 0.f, s2 = 0.f;                                                                               \
        for (int64_t c = 0; c < C; ++c) {                                                                       \
            xh[c] = ((PRODUCT ? TO_F32(x[c]) * TO_F32(x[C + c]) : TO_F32(x[c])) - m) * rs;                      \
            gf[c] = TO_F32(g[c]);                                                                               \
            const float gw = gf[c] * w[c];                                                                      \
            s1 += gw;                                                                                           \
            s2 += gw * xh[c];                                                                                   \
        }                                                                                                       \
        s1 /= (float)C;                                                                                         \
        s2 /= (float)C;                                                                                         \
        for (int64_t c = 0; c < C; ++c) {                                                                       \
            const float dz = rs * ((gf[c] * w[c] - s1) - xh[c] * s2);                                           \
            if (PRODUCT) {   /* (x[c] is read before dx[c] is written: dx is another buffer) */                 \
                const float a = TO_F32(x[c]), bb = TO_F32(x[C + c]);                                            \
                dx[c] = FROM_F32(dz * bb);                                                                      \
                dx[C + c] = FROM_F32(dz * a);                                                                   \
            } else {                                                                                            \
                dx[c] = FROM_F32(dz);                                                                           \
            }                                                                                                   \
            dw[c] += gf[c] * xh[c];                                                                             \
            if (db) db[c] += gf[c];                                                                             \
        }                                                                                                       \
    }

BWD_PORTABLE(bwd_row_f32, float, f32_id, f32_id, 0)
BWD_PORTABLE(bwd_row_prod_f32, float, f32_id, f32_id, 1)
BWD_PORTABLE(bwd_row_bf16, uint16_t, bf16_to_f32, f32_to_bf16, 0)
BWD_PORTABLE(bwd_row_prod_bf16, uint16_t, bf16_to_f32, f32_to_bf16, 1)

#define DW_ITEM(NAME, T, TO_F32)                                                                                \
    static void NAME(const T *x, const T *g, float *pad, float *gp, float *out, int64_t H, int64_t W, int64_t C, \
                     int64_t b0, int64_t b1, int k, int d) {                                                    \
        const int64_t p = (int64_t)d * (k - 1) / 2, Wp = W + 2 * p, plane = (H + 2 * p) * Wp * 16, gplane = H * W * 16; \
        memset(pad, 0, (size_t)(b1 - b0) * plane * sizeof(float));                                             \
        memset(gp, 0, (size_t)(b1 - b0) * gplane * sizeof(float));                                             \
        for (int64_t h = 0; h < H; ++h)                                                                         \
            for (int64_t w = 0; w < W; ++w)                                                                     \
                for (int64_t c = 16 * b0; c < C && c < 16 * b1; ++c) {                                          \
                    const int64_t b = c / 16 - b0, l = c % 16;                                                  \
                    pad[b * plane + ((h + p) * Wp + w + p) * 16 + l] = TO_F32(x[(h * W + w) * C + c]);          \
                    gp[b * gplane + (h * W + w) * 16 + l] = TO_F32(g[(h * W + w) * C + c]);                     \
                }                                                                                               \
        for (int64_t b = 0; b < b1 - b0; ++b) {                                                                 \
            const float *xq = pad + b * plane, *gq = gp + b * gplane;                                           \
            const int64_t c0 = 16 * (b0 + b), nc = C - c0 < 16 ? C - c0 : 16;                                  \
            float acc[49 * 16];                                                                                 \
            memset(acc, 0, sizeof(acc));                                                                        \
            for (int64_t h = 0; h < H; ++h)                                                                     \
                for (int64_t w = 0; w < W; ++w) {                                                               \
                    const float *gv = gq + (h * W + w) * 16;                                                    \
                    for (int i = 0; i < k; ++i)                                                                 \
                        for (int j = 0; j < k; ++j) {                                                           \
                            const float *xr = xq + ((h + (int64_t)i * d) * Wp + w + j * d) * 16;                \
                            float *a = acc + (i * k + j) * 16;                                                  \
                            for (int c = 0; c < 16; ++c) a[c] += gv[c] * xr[c];                                 \
                        }                                                                                       \
                }                                                                                               \
            for (int t = 0; t < k * k; ++t)                                                                     \
                for (int64_t c = 0; c < nc; ++c) out[t * C + c0 + c] += acc[t * 16 + c];                        \
        }                                                                                                       \
    }

DW_ITEM(dw_item_f32, float, f32_id)
DW_ITEM(dw_item_bf16, uint16_t, bf16_to_f32)

#define ATTN_ROWS 8
#define ATTN_FUSED 0   /* the fused attention needs AVX-512 (its blocks are register tiles); PyTorch's path elsewhere */
static void attn_bwd_block(const float *q, const float *kt, const float *k, const float *vt, const float *o,
                           const float *g, const float *rowsum, float *dq, float *dk, float *dv, int64_t i0,
                           int64_t nr, int64_t M, int64_t Mp, int64_t D, int power, float *qb, float *yb, float *ab,
                           float *pb) {
    (void)q; (void)kt; (void)k; (void)vt; (void)o; (void)g; (void)rowsum; (void)dq; (void)dk; (void)dv; (void)i0;
    (void)nr; (void)M; (void)Mp; (void)D; (void)power; (void)qb; (void)yb; (void)ab; (void)pb;
}
static int attn_block(const float *q, const float *kt, const float *v, float *o, float *rowsum, int64_t i0, int64_t nr,
                      int64_t M, int64_t Mp, int64_t D, int power, float eps, float *qb, float *ab) {
    (void)q; (void)kt; (void)v; (void)o; (void)rowsum; (void)i0; (void)nr; (void)M; (void)Mp; (void)D; (void)power;
    (void)eps; (void)qb; (void)ab;
    return 1;
}

#if defined(__AVX2__) && defined(__FMA__)
#define KERNEL "avx2"       /* the depthwise and 1x1 kernels (9.-12., 14.) with AVX2 intrinsics, these loops portable */
#else
#define KERNEL "portable"
#endif
#endif

const char *polynext_cpu_kernels_code(void) { return KERNEL; }

/* y[r] = norm(row r) * w (+ b) (+ res[r]) for rows x C values. The row is x[r] (rows x C), or with
 * `product` the product of the two halves of x[r] (rows x 2C): x[r, :C] * x[r, C:]. y and res are rows x C,
 * contiguous; y may be x (not with `product`). w (and b, or NULL): C float32 values (bfloat16 ones for
 * polynext_channel_norm_bf16). stats (or NULL): each row's mean and 1/std, for the backward.
 * Returns 0, or 1 if C > MAX_C (nothing written). */
#define NORM_FORWARD(NAME, T, ROW, ROW_PROD)                                                                     \
    int NAME(const T *x, const float *w, const float *b, const T *res, T *y, float *stats, int64_t rows,         \
             int64_t C, float eps, int threads, int product) {                                                  \
        (void)threads;   /* (unused where built without OpenMP) */                                              \
        if (C > MAX_C) return 1;                                                                                \
        const int64_t stride = product ? 2 * C : C;                                                             \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                       \
        for (int64_t r = 0; r < rows; ++r) {                                                                    \
            const T *rr = res ? res + r * C : NULL;                                                             \
            float *st = stats ? stats + 2 * r : NULL;                                                           \
            if (product)                                                                                        \
                ROW_PROD(x + r * stride, w, b, rr, y + r * C, C, eps, st);                                      \
            else                                                                                                \
                ROW(x + r * stride, w, b, rr, y + r * C, C, eps, st);                                           \
        }                                                                                                       \
        return 0;                                                                                               \
    }

NORM_FORWARD(polynext_channel_norm_f32, float, row_f32, row_prod_f32)
/* bfloat16 rows with float32 weight and bias, as in bf16 autocast training (CPU autocast runs layer_norm in the
 * input's dtype with the parameters in float32: bfloat16 in and out, computed in float32) */
NORM_FORWARD(polynext_channel_norm_bf16_w32, uint16_t, row_bf16, row_prod_bf16)

/* bfloat16 rows and parameters (a bf16 model's inference): the parameters converted to float32 once */
int polynext_channel_norm_bf16(const uint16_t *x, const uint16_t *w16, const uint16_t *b16, const uint16_t *res,
                               uint16_t *y, float *stats, int64_t rows, int64_t C, float eps, int threads,
                               int product) {
    if (C > MAX_C) return 1;
    float w[MAX_C], b[MAX_C];
    for (int64_t c = 0; c < C; ++c) w[c] = bf16_to_f32(w16[c]);
    if (b16)
        for (int64_t c = 0; c < C; ++c) b[c] = bf16_to_f32(b16[c]);
    return polynext_channel_norm_bf16_w32(x, w, b16 ? b : NULL, res, y, stats, rows, C, eps, threads, product);
}

/* The backward of polynext_channel_norm_f32 (training), from the rows' saved mean and 1/std (stats):
 *
 *     x^ = (x - mean) / std,  g' = g * w,  dx = (g' - mean_c g' - x^ * mean_c(g' * x^)) / std
 *     dw += g * x^,  db += g           (summed over the rows: one partial sum per thread, in dw_part / db_part)
 *
 * With `product` the row is the product z = a * b of the two halves of x (rows x 2C), and dx (rows x 2C) gets
 * dz * b and dz * a. PyTorch's layer_norm backward plus the product's make five passes over these tensors;
 * here a row of g and x is read once into L1 and dx written once. The residual's gradient is g itself.
 * dw_part and db_part (threads x C, or db_part NULL) must be zero; returns 0, or 1 if C > MAX_C. The _bf16 form
 * takes bfloat16 g and x and writes bfloat16 dx (bf16 autocast training: the weight and its gradient float32). */
/* (f32: float32 g, x and dx; bf16: bfloat16 ones, as in bf16 autocast training, the weight float32) */
#define NORM_BACKWARD(NAME, TX, ROW, ROW_PROD)                                                                   \
    int NAME(const TX *g, const TX *x, const float *w, const float *stats, TX *dx, float *dw_part,            \
             float *db_part, int64_t rows, int64_t C, int threads, int product) {                               \
        (void)threads;                                                                                          \
        if (C > MAX_C) return 1;                                                                                \
        const int64_t stride = product ? 2 * C : C;                                                             \
        _Pragma("omp parallel num_threads(threads)")                                                            \
        {                                                                                                       \
            const int64_t tid = thread_id(), nt = thread_count();                                               \
            float *dw = dw_part + tid * C, *db = db_part ? db_part + tid * C : NULL;                            \
            for (int64_t r = rows * tid / nt; r < rows * (tid + 1) / nt; ++r) {                                 \
                if (product)                                                                                    \
                    ROW_PROD(g + r * C, x + r * stride, w, stats + 2 * r, dx + r * stride, dw, db, C);          \
                else                                                                                            \
                    ROW(g + r * C, x + r * stride, w, stats + 2 * r, dx + r * stride, dw, db, C);               \
            }                                                                                                   \
        }                                                                                                       \
        return 0;                                                                                               \
    }

NORM_BACKWARD(polynext_channel_norm_backward_f32, float, bwd_row_f32, bwd_row_prod_f32)
NORM_BACKWARD(polynext_channel_norm_backward_bf16, uint16_t, bwd_row_bf16, bwd_row_prod_bf16)

/* out[r] = (s[r] + 1)^power / max(sum_j (s[r, j] + 1)^power, eps) for rows x N scores (power 2 or 4), or
 * without `normalise` (s[r] + 1)^power; out may be s; the clamped sums go to rowsum (float32, rows values) unless
 * it is NULL. Returns 0, or 1 for another power (nothing written). */
#define POLY_ROWS(NAME, T, ROW)                                                                                  \
    int NAME(const T *s, T *out, float *rowsum, int64_t rows, int64_t N, int power, float eps, int threads,      \
             int normalise) {                                                                                   \
        (void)threads;                                                                                          \
        if (power != 2 && power != 4) return 1;                                                                 \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                       \
        for (int64_t r = 0; r < rows; ++r) {                                                                    \
            const float sum = ROW(s + r * N, out + r * N, N, power, eps, normalise);                            \
            if (rowsum) rowsum[r] = sum;                                                                        \
        }                                                                                                       \
        return 0;                                                                                               \
    }

POLY_ROWS(polynext_poly_rows_f32, float, poly_row_f32)
POLY_ROWS(polynext_poly_rows_bf16, uint16_t, poly_row_bf16)

/* The polynomial attention's backward (ops/poly_attention.py), for rows x N scores S recomputed from Q and K:
 *
 *   polynext_poly_prep_*:  A = (S + 1)^p written over S (divided by rowsum[r] where rowsum is not NULL: the
 *                          normalised weights that the bfloat16 path multiplies), and (S + 1)^(p-1) into p3
 *                          (float32), in one pass where PyTorch makes four;
 *   polynext_poly_ds_*:    dL/dS = (dL/dA + d[r]) (S + 1)^(p-1) written over dL/dA, in one pass where PyTorch
 *                          makes two (four in bfloat16, with the conversions).
 *
 * The same float32 products in the same order as PyTorch's operators (bfloat16 values converted as loaded and
 * rounded once as stored). Return 0, or 1 for a power other than 2 or 4 (nothing written). */
#define POLY_BACKWARD(PREP, DS, T, PREP_ROW, DS_ROW)                                                             \
    int PREP(T *s, float *p3, const float *rowsum, int64_t rows, int64_t N, int power, int threads) {            \
        (void)threads;                                                                                          \
        if (power != 2 && power != 4) return 1;                                                                 \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                       \
        for (int64_t r = 0; r < rows; ++r) PREP_ROW(s + r * N, p3 + r * N, N, power, rowsum ? rowsum + r : NULL); \
        return 0;                                                                                               \
    }                                                                                                           \
    int DS(T *da, const float *p3, const float *d, int64_t rows, int64_t N, int threads) {                       \
        (void)threads;                                                                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                       \
        for (int64_t r = 0; r < rows; ++r) DS_ROW(da + r * N, p3 + r * N, N, d[r]);                            \
        return 0;                                                                                               \
    }

POLY_BACKWARD(polynext_poly_prep_f32, polynext_poly_ds_f32, float, poly_prep_f32, poly_ds_f32)
POLY_BACKWARD(polynext_poly_prep_bf16, polynext_poly_ds_bf16, uint16_t, poly_prep_bf16, poly_ds_bf16)

/* y = a * flip(b) and its backward, per row of C (see 4. above); bfloat16 products computed in float32 and
 * rounded once, as PyTorch's bfloat16 multiplication does. */
#define FLIP_MUL(NAME, BWD, T, TO_F32, FROM_F32)                                                                 \
    int NAME(const T *a, const T *b, T *y, int64_t rows, int64_t C, int threads) {                              \
        (void)threads;                                                                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                       \
        for (int64_t r = 0; r < rows; ++r) {                                                                    \
            const T *ar = a + r * C, *br = b + r * C + C - 1;                                                   \
            T *yr = y + r * C;                                                                                  \
            for (int64_t c = 0; c < C; ++c) yr[c] = FROM_F32(TO_F32(ar[c]) * TO_F32(br[-c]));                   \
        }                                                                                                       \
        return 0;                                                                                               \
    }                                                                                                           \
    int BWD(const T *g, const T *a, const T *b, T *da, T *db, int64_t rows, int64_t C, int threads) {           \
        (void)threads;                                                                                          \
        _Pragma("omp parallel for num_threads(threads) schedule(static)")                                       \
        for (int64_t r = 0; r < rows; ++r) {                                                                    \
            const T *gr = g + r * C, *ar = a + r * C, *br = b + r * C + C - 1;                                  \
            T *dar = da + r * C, *dbr = db + r * C + C - 1;                                                     \
            for (int64_t c = 0; c < C; ++c) {                                                                   \
                const float gv = TO_F32(gr[c]);                                                                 \
                dar[c] = FROM_F32(gv * TO_F32(br[-c]));                                                         \
                dbr[-c] = FROM_F32(gv * TO_F32(ar[c]));                                                         \
            }                                                                                                   \
        }                                                                                                       \
        return 0;                                                                                               \
    }

static inline float f32_same(float v) { return v; }
FLIP_MUL(polynext_flip_mul_f32, polynext_flip_mul_backward_f32, float, f32_same, f32_same)
FLIP_MUL(polynext_flip_mul_bf16, polynext_flip_mul_backward_bf16, uint16_t, bf16_to_f32, f32_to_bf16)

/* The weight gradient of a same-padded (p = d (k - 1) / 2), stride-1 depthwise k x k convolution with dilation d
 * (see 5. above), for N channels-last images x and output gradients g (N x H x W x C each, float32, or bfloat16
 * as bf16 autocast saves them):
 *
 *     dw[i, j, c] = sum over n, h, w of g[n, h, w, c] * x[n, h + d i - p, w + d j - p, c]   (zero outside the map)
 *
 * Work items are an image's channel blocks (all of them, or with fewer than four images a thread a share, so that
 * every thread has work), split evenly over the threads; each thread adds its items into its own k x k x C float32
 * partial sum, part + tid * k * k * C (part: threads x k x k x C, zeroed by the caller, which adds the threads'
 * sums). Returns 0; 1 for an even k or k > 7; 2 if a thread's buffers could not be allocated (then part is
 * incomplete). */
#define DW_WGRAD(NAME, T, ITEM)                                                                                  \
    int NAME(const T *x, const T *g, float *part, int64_t N, int64_t H, int64_t W, int64_t C, int k, int d,     \
             int threads) {                                                                                     \
        (void)threads;                                                                                          \
        if (k % 2 == 0 || k > 7) return 1;                                                                      \
        const int64_t p = (int64_t)d * (k - 1) / 2, blocks = (C + 15) / 16;                                     \
        int64_t groups = (4 * (int64_t)threads + N - 1) / N;                                                    \
        groups = groups < 1 ? 1 : groups > blocks ? blocks : groups;                                            \
        const int64_t per = (blocks + groups - 1) / groups, items = N * groups;                                 \
        const size_t pad_floats = (size_t)per * (H + 2 * p) * (W + 2 * p) * 16;                                 \
        const size_t buf_bytes = (pad_floats + (size_t)per * H * W * 16) * sizeof(float);                       \
        int failed = 0;                                                                                         \
        _Pragma("omp parallel num_threads(threads) reduction(|:failed)")                                        \
        {                                                                                                       \
            const int64_t tid = thread_id(), nt = thread_count();                                               \
            float *buf = (float *)malloc(buf_bytes);                                                            \
            if (!buf) {                                                                                         \
                failed = 1;                                                                                     \
            } else {                                                                                            \
                float *out = part + tid * k * k * C;                                                            \
                for (int64_t it = items * tid / nt; it < items * (tid + 1) / nt; ++it) {                        \
                    const int64_t n = it / groups, b0 = (it % groups) * per;                                    \
                    const int64_t b1 = b0 + per < blocks ? b0 + per : blocks;                                   \
                    if (b0 < b1)                                                                                \
                        ITEM(x + n * H * W * C, g + n * H * W * C, buf, buf + pad_floats, out, H, W, C, b0, b1, k, d); \
                }                                                                                               \
                free(buf);                                                                                      \
            }                                                                                                   \
        }                                                                                                       \
        return failed ? 2 : 0;                                                                                  \
    }

DW_WGRAD(polynext_dw_wgrad_f32, float, dw_item_f32)
DW_WGRAD(polynext_dw_wgrad_bf16, uint16_t, dw_item_bf16)

/* The polynomial attention at CPU inference, float32, fused (see 6. above): for BH heads of N queries and M keys
 * of head dimension D (q: BH x N x D, k and v: BH x M x D, o: BH x N x D, contiguous),
 *
 *     o[h, i] = sum_j (q[h, i] . k[h, j] + 1)^p v[h, j] / max(sum_j (q[h, i] . k[h, j] + 1)^p, eps)
 *
 * and the clamped row sums into rowsum (BH x N floats) unless it is NULL. Work items are (head, block of 64
 * queries), split evenly over the threads; a thread transposes a head's K once for its items of that head.
 * Returns 0; 1 where the kernel does not serve the call (D not 16 or 32, p not 2 or 4, a build without AVX-512:
 * nothing written); 2 if a thread's buffers could not be allocated (o incomplete). */
static int attn_refused(int64_t D, int power) {
    return !ATTN_FUSED || (D != 16 && D != 32) || (power != 2 && power != 4);
}

/* x (M x D) transposed into t (D x Mp), zero columns past M (D = 16, 32 in 16 x 16 blocks with AVX-512) */
static void attn_transpose(const float *x, float *t, int64_t M, int64_t Mp, int64_t D) {
#if ATTN_FUSED
    if (D % 16 == 0) {
        for (int64_t j0 = 0; j0 < Mp; j0 += 16)
            for (int64_t c0 = 0; c0 < D; c0 += 16) {
                __m512i r[16];
                for (int64_t i = 0; i < 16; ++i)
                    r[i] = j0 + i < M ? _mm512_loadu_si512(x + (j0 + i) * D + c0) : _mm512_setzero_si512();
                attn_transpose16(r);
                for (int64_t d = 0; d < 16; ++d) _mm512_storeu_si512(t + (c0 + d) * Mp + j0, r[d]);
            }
        return;
    }
#endif
    for (int64_t d = 0; d < D; ++d) {
        for (int64_t j = 0; j < M; ++j) t[d * Mp + j] = x[j * D + d];
        for (int64_t j = M; j < Mp; ++j) t[d * Mp + j] = 0.f;
    }
}

int polynext_poly_attention_f32(const float *q, const float *k, const float *v, float *o, float *rowsum, int64_t BH,
                                int64_t N, int64_t M, int64_t D, int power, float eps, int threads) {
    (void)threads;
    if (attn_refused(D, power)) return 1;
    const int64_t Mp = (M + 15) & ~(int64_t)15, block = 64, chunks = (N + block - 1) / block, items = BH * chunks;
    int failed = 0;
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)")
    {
        const int64_t tid = thread_id(), nt = thread_count();
        float *kt = (float *)malloc(sizeof(float) * (size_t)(D * Mp + ATTN_ROWS * D + ATTN_ROWS * Mp));
        if (!kt) {
            failed = 1;
        } else {
            float *qb = kt + D * Mp, *ab = qb + ATTN_ROWS * D;
            int64_t head = -1;
            for (int64_t it = items * tid / nt; it < items * (tid + 1) / nt; ++it) {
                const int64_t h = it / chunks, r0 = (it % chunks) * block, r1 = r0 + block < N ? r0 + block : N;
                if (h != head) attn_transpose(k + h * M * D, kt, M, Mp, D);
                head = h;
                for (int64_t i0 = r0; i0 < r1; i0 += ATTN_ROWS)
                    attn_block(q + h * N * D, kt, v + h * M * D, o + h * N * D, rowsum ? rowsum + h * N : NULL, i0,
                               r1 - i0 < ATTN_ROWS ? r1 - i0 : ATTN_ROWS, M, Mp, D, power, eps, qb, ab);
            }
            free(kt);
        }
    }
    return failed ? 2 : 0;
}

/* The backward of polynext_poly_attention_f32 (see 7. above): from q (BH x N x D), k, v (BH x M x D), the forward's
 * output o and row sums (BH x N), and the output's gradient g (BH x N x D), all float32 and contiguous, dq (BH x N x D),
 * dk and dv (BH x M x D). A thread owns whole heads (dk and dv are sums over all of a head's queries): it transposes
 * the head's K and V once, zeroes its dk and dv, and goes through its queries eight at a time. Returns 0; 1 where the
 * kernel does not serve the call (as polynext_poly_attention_f32; nothing written); 2 if a thread's buffers could not
 * be allocated (the gradients incomplete). */
int polynext_poly_attention_backward_f32(const float *q, const float *k, const float *v, const float *o, const float *g,
                                         const float *rowsum, float *dq, float *dk, float *dv, int64_t BH, int64_t N,
                                         int64_t M, int64_t D, int power, int threads) {
    (void)threads;
    if (attn_refused(D, power)) return 1;
    const int64_t Mp = (M + 15) & ~(int64_t)15;
    int failed = 0;
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)")
    {
        const int64_t tid = thread_id(), nt = thread_count();
        float *kt = (float *)malloc(sizeof(float) * (size_t)(2 * D * Mp + 2 * ATTN_ROWS * D + 2 * ATTN_ROWS * Mp));
        if (!kt) {
            failed = 1;
        } else {
            float *vt = kt + D * Mp, *qb = vt + D * Mp, *yb = qb + ATTN_ROWS * D, *ab = yb + ATTN_ROWS * D;
            float *pb = ab + ATTN_ROWS * Mp;
            for (int64_t h = BH * tid / nt; h < BH * (tid + 1) / nt; ++h) {
                const float *kh = k + h * M * D;
                attn_transpose(kh, kt, M, Mp, D);
                attn_transpose(v + h * M * D, vt, M, Mp, D);
                memset(dk + h * M * D, 0, sizeof(float) * M * D);
                memset(dv + h * M * D, 0, sizeof(float) * M * D);
                for (int64_t i0 = 0; i0 < N; i0 += ATTN_ROWS)
                    attn_bwd_block(q + h * N * D, kt, kh, vt, o + h * N * D, g + h * N * D, rowsum + h * N,
                                   dq + h * N * D, dk + h * M * D, dv + h * M * D, i0,
                                   N - i0 < ATTN_ROWS ? N - i0 : ATTN_ROWS, M, Mp, D, power, qb, yb, ab, pb);
            }
            free(kt);
        }
    }
    return failed ? 2 : 0;
}

/* 1 where polynext_poly_attention_f32 is built (AVX-512), else 0. */
int polynext_poly_attention_fused(void) { return ATTN_FUSED; }

/* 8. polynext_poly_attention_bf16 / polynext_poly_attention_backward_bf16: the fused attention of 6. and 7. for
 * bfloat16 Q, K, V (CPU autocast and bf16 inference), its products on AVX-512 BF16's dot product of pairs
 * (vdpbf16ps: two bf16 products summed into a float32 lane, twice the MACs of an fp32 FMA per instruction, the
 * rate oneDNN's bf16 1x1 convolutions reach on these CPUs). PyTorch's bf16 path runs each product as a separate
 * oneDNN call on a tile's N x N scores, converts them to float32 and back around the power, and in training spent
 * about a fifth of an APolyNeXt-T step there at 13-15 % of the bf16 matrix-product peak (2-core Zen 4).
 *
 * What is rounded where (as PyTorch's bf16 path: every product's operands bf16, its sums float32): the scores, the
 * power, the row sums, dL/dA and dL/dS are float32; A, dL/dY / r and dL/dS are rounded to bf16 once as operands of
 * the next product; O and the gradients are rounded once at the end. Unlike PyTorch's path A is not normalised
 * before A V (the row sum divides the float32 result, as in 6.), the scores are not rounded to bf16 before the
 * power, and dK, dV are summed over a head's queries in float32, not rounded per tile.
 *
 * Layouts: a bf16 pair is one 32-bit word. The score products broadcast a word of two consecutive dimensions of a
 * query row and take K^T as words (D/2 x Mp: word [d][j] = (K[j, 2d], K[j, 2d + 1])); A V and dS K broadcast a word
 * of two consecutive keys of a row of A and take V (K) as key pairs (Mp/2 x D words: (V[2j, e], V[2j + 1, e]));
 * dV += A^T dY and dK += dS^T Q broadcast a word of two query rows at one key ((A[2r, j], A[2r + 1, j])) and take dY
 * (Q) as row pairs. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512BF16__)
#define ATTN_FUSED_BF16 1
#define ATTN_PAIRS (ATTN_ROWS / 2)

static inline __m512bh as_bh(__m512i x) { return (__m512bh)x; }
static inline __m512i word_at(const uint16_t *p) {   /* a bf16 pair broadcast */
    uint32_t w;
    memcpy(&w, p, 4);
    return _mm512_set1_epi32((int)w);
}

/* a[r] (b[r]) = rows xb (ATTN_ROWS x D bf16) against the keys j .. j + 15 (j + 16 .. j + 31) of the word-transposed
 * t (D/2 x Mp words): the scores Q K^T, or dY V^T. */
ATTN_INLINE void attn_dots_bf16(const uint16_t *xb, const uint32_t *t, int64_t j, int64_t Mp, int64_t D, int two,
                                __m512 *a, __m512 *b) {
    for (int r = 0; r < ATTN_ROWS; ++r) a[r] = b[r] = _mm512_setzero_ps();
    for (int64_t d = 0; d < D / 2; ++d) {
        const __m512bh t0 = as_bh(_mm512_loadu_si512(t + d * Mp + j));
        const __m512bh t1 = two ? as_bh(_mm512_loadu_si512(t + d * Mp + j + 16)) : t0;
        for (int r = 0; r < ATTN_ROWS; ++r) {
            const __m512bh x = as_bh(word_at(xb + r * D + 2 * d));
            a[r] = _mm512_dpbf16_ps(a[r], x, t0);
            if (two) b[r] = _mm512_dpbf16_ps(b[r], x, t1);
        }
    }
}

/* tot[r * DV + e] = sum_j wb[r, j] x[j, 16 e .. 16 e + 15]: wb ATTN_ROWS x Mp bf16 (zero past M), x as key pairs
 * (Mp/2 x D words); A V, or dS K; a two-level sum over blocks of ATTN_SUM keys as attn_weigh. */
ATTN_INLINE void attn_weigh_bf16(const uint16_t *wb, int64_t Mp, const uint16_t *xp, int64_t M, int64_t D,
                                 __m512 *tot) {
    const int DV = (int)(D / 16);
    const int64_t pairs = (M + 1) / 2;
    for (int i = 0; i < ATTN_ROWS * DV; ++i) tot[i] = _mm512_setzero_ps();
    for (int64_t j0 = 0; j0 < pairs; j0 += ATTN_SUM / 2) {
        const int64_t j1 = j0 + ATTN_SUM / 2 < pairs ? j0 + ATTN_SUM / 2 : pairs;
        __m512 acc[ATTN_ROWS * 2];
        for (int i = 0; i < ATTN_ROWS * DV; ++i) acc[i] = _mm512_setzero_ps();
        for (int64_t j = j0; j < j1; ++j) {
            __m512bh xv[2];
            for (int e = 0; e < DV; ++e) xv[e] = as_bh(_mm512_loadu_si512(xp + (j * D + 16 * e) * 2));
            for (int r = 0; r < ATTN_ROWS; ++r) {
                const __m512bh w = as_bh(word_at(wb + r * Mp + 2 * j));
                for (int e = 0; e < DV; ++e) acc[r * DV + e] = _mm512_dpbf16_ps(acc[r * DV + e], w, xv[e]);
            }
        }
        for (int i = 0; i < ATTN_ROWS * DV; ++i) tot[i] = _mm512_add_ps(tot[i], acc[i]);
    }
}

/* out[j] += sum_r wp[r, j] xp[r] for the M rows of out (M x D float32): dV += A^T dY, or dK += dS^T Q; wp the
 * weights as row pairs (ATTN_PAIRS x Mp words), xp the rows as row pairs (ATTN_PAIRS x D words), in registers. */
ATTN_INLINE void attn_scatter_bf16(const uint32_t *wp, int64_t Mp, const uint16_t *xp, float *out, int64_t M,
                                   int64_t D) {
    const int DV = (int)(D / 16);
    __m512bh x[ATTN_PAIRS * 2];
    for (int r = 0; r < ATTN_PAIRS; ++r)
        for (int e = 0; e < DV; ++e) x[r * DV + e] = as_bh(_mm512_loadu_si512(xp + (r * D + 16 * e) * 2));
    for (int64_t j = 0; j < M; ++j) {
        __m512 acc[2];
        for (int e = 0; e < DV; ++e) acc[e] = _mm512_loadu_ps(out + j * D + 16 * e);
        for (int r = 0; r < ATTN_PAIRS; ++r) {
            const __m512bh w = as_bh(_mm512_set1_epi32((int)wp[r * Mp + j]));
            for (int e = 0; e < DV; ++e) acc[e] = _mm512_dpbf16_ps(acc[e], w, x[r * DV + e]);
        }
        for (int e = 0; e < DV; ++e) _mm512_storeu_ps(out + j * D + 16 * e, acc[e]);
    }
}

/* the float32 rows a[0 .. ATTN_ROWS - 1] (16 keys from j) stored as bf16 rows into wb (ATTN_ROWS x Mp) and / or as
 * row pairs into wp (ATTN_PAIRS x Mp words) */
ATTN_INLINE void attn_store_rows_bf16(const __m512 *a, int64_t j, int64_t Mp, uint16_t *wb, uint32_t *wp) {
    if (wb)
        for (int r = 0; r < ATTN_ROWS; ++r)
            _mm256_storeu_si256((__m256i *)(wb + r * Mp + j), (__m256i)_mm512_cvtneps_pbh(a[r]));
    if (wp) {
        const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22,
                                               6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
        for (int r = 0; r < ATTN_PAIRS; ++r) {
            const __m512i two_rows = (__m512i)_mm512_cvtne2ps_pbh(a[2 * r + 1], a[2 * r]);
            _mm512_storeu_si512(wp + r * Mp + j, _mm512_permutexvar_epi16(pairs, two_rows));
        }
    }
}

/* out (D words) = the pairs (a[e], b[e]) of two bf16 rows, b NULL for a zero row; D = 32 with two lane permutes */
static inline void attn_interleave_bf16(const uint16_t *a, const uint16_t *b, int64_t D, uint16_t *out) {
    if (D == 32) {
        const __m512i lo = _mm512_set_epi16(47, 15, 46, 14, 45, 13, 44, 12, 43, 11, 42, 10, 41, 9, 40, 8, 39, 7, 38, 6,
                                            37, 5, 36, 4, 35, 3, 34, 2, 33, 1, 32, 0);
        const __m512i hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
        const __m512i x = _mm512_loadu_si512(a), y = b ? _mm512_loadu_si512(b) : _mm512_setzero_si512();
        _mm512_storeu_si512(out, _mm512_permutex2var_epi16(x, lo, y));
        _mm512_storeu_si512(out + 32, _mm512_permutex2var_epi16(x, hi, y));
        return;
    }
    for (int64_t e = 0; e < D; ++e) {
        out[2 * e] = a[e];
        out[2 * e + 1] = b ? b[e] : 0;
    }
}

/* the ATTN_ROWS bf16 rows xb (D wide) as row pairs into xp (ATTN_PAIRS x D words) */
static inline void attn_pairs_bf16(const uint16_t *xb, int64_t D, uint16_t *xp) {
    for (int64_t r = 0; r < ATTN_PAIRS; ++r) attn_interleave_bf16(xb + 2 * r * D, xb + (2 * r + 1) * D, D, xp + 2 * r * D);
}

/* ATTN_ROWS rows of x (bf16, nr of them real, D wide) into xb, zero past nr */
static inline void attn_rows_bf16(const uint16_t *x, int64_t nr, int64_t D, uint16_t *xb) {
    memset(xb, 0, sizeof(uint16_t) * ATTN_ROWS * D);
    memcpy(xb, x, sizeof(uint16_t) * nr * D);
}

/* x (M x D bf16) as words transposed (D/2 x Mp), and / or as key pairs (Mp/2 x D words), zero past M; D = 32 in
 * 16 x 16 blocks of words and lane permutes (as scalar loops a head's layouts took a fifth of the forward's time at
 * 196 keys, two fifths at 49, in a throwaway timing of the raw kernel with them skipped) */
static void attn_layouts_bf16(const uint16_t *x, uint32_t *t, uint16_t *kp, int64_t M, int64_t Mp, int64_t D) {
    if (t && D == 32) {
        for (int64_t j0 = 0; j0 < Mp; j0 += 16) {
            __m512i r[16];
            for (int64_t i = 0; i < 16; ++i)
                r[i] = j0 + i < M ? _mm512_loadu_si512(x + (j0 + i) * D) : _mm512_setzero_si512();
            attn_transpose16(r);
            for (int64_t d = 0; d < 16; ++d) _mm512_storeu_si512(t + d * Mp + j0, r[d]);
        }
    } else if (t) {
        for (int64_t d = 0; d < D / 2; ++d) {
            for (int64_t j = 0; j < M; ++j) memcpy(t + d * Mp + j, x + j * D + 2 * d, 4);
            for (int64_t j = M; j < Mp; ++j) t[d * Mp + j] = 0;
        }
    }
    for (int64_t j = 0; kp && j < Mp; j += 2) {
        if (j < M) attn_interleave_bf16(x + j * D, j + 1 < M ? x + (j + 1) * D : NULL, D, kp + j * D);
        else memset(kp + j * D, 0, sizeof(uint16_t) * 2 * D);
    }
}

/* Forward, rows i0 .. i0 + nr - 1 of one head (bf16 q, o; kt, vp the head's layouts): as attn_forward_rows. */
ATTN_INLINE void attn_forward_rows_bf16(const uint16_t *q, const uint32_t *kt, const uint16_t *vp, uint16_t *o,
                                        float *rowsum, int64_t i0, int64_t nr, int64_t M, int64_t Mp, int64_t D,
                                        int power, float eps, uint16_t *qb, uint16_t *ab) {
    const int DV = (int)(D / 16);
    attn_rows_bf16(q + i0 * D, nr, D, qb);
    __m512 sum[ATTN_ROWS], a0[ATTN_ROWS], a1[ATTN_ROWS], tot[ATTN_ROWS * 2];
    for (int r = 0; r < ATTN_ROWS; ++r) sum[r] = _mm512_setzero_ps();
    for (int64_t j = 0; j < Mp; j += 32) {
        const int two = j + 32 <= Mp;
        attn_dots_bf16(qb, kt, j, Mp, D, two, a0, a1);
        const __mmask16 m0 = block_mask(M, j), m1 = two ? block_mask(M, j + 16) : (__mmask16)0;
        for (int r = 0; r < ATTN_ROWS; ++r) {
            a0[r] = _mm512_maskz_mov_ps(m0, poly_pow(a0[r], power));
            sum[r] = _mm512_add_ps(sum[r], a0[r]);
            if (two) {
                a1[r] = _mm512_maskz_mov_ps(m1, poly_pow(a1[r], power));
                sum[r] = _mm512_add_ps(sum[r], a1[r]);
            }
        }
        attn_store_rows_bf16(a0, j, Mp, ab, NULL);
        if (two) attn_store_rows_bf16(a1, j + 16, Mp, ab, NULL);
    }
    attn_weigh_bf16(ab, Mp, vp, M, D, tot);
    attn_divide_rows(sum, tot, nr, D, eps, rowsum ? rowsum + i0 : NULL);
    for (int64_t r = 0; r < nr; ++r)
        for (int e = 0; e < DV; ++e) store_bf16(o + (i0 + r) * D + 16 * e, 0xFFFF, tot[r * DV + e]);
}

/* Backward, the same rows (as attn_backward_rows): kt, vt the head's K, V as transposed words, kp its K as key
 * pairs; dk, dv the head's float32 sums. */
ATTN_INLINE void attn_backward_rows_bf16(const uint16_t *q, const uint32_t *kt, const uint16_t *kp,
                                         const uint32_t *vt, const uint16_t *o, const uint16_t *g,
                                         const float *rowsum, uint16_t *dq, float *dk, float *dv, int64_t i0,
                                         int64_t nr, int64_t M, int64_t Mp, int64_t D, int power, uint16_t *qb,
                                         uint16_t *qp, uint16_t *yb, uint16_t *yp, uint32_t *ap, uint16_t *sb,
                                         float *pb) {
    const int DV = (int)(D / 16);
    const __m512 one = _mm512_set1_ps(1.f), pw = _mm512_set1_ps((float)power);
    float dterm[ATTN_ROWS] = {0.f};
    __m512 a0[ATTN_ROWS], a1[ATTN_ROWS], tot[ATTN_ROWS * 2];
    attn_rows_bf16(q + i0 * D, nr, D, qb);
    attn_pairs_bf16(qb, D, qp);
    memset(yb, 0, sizeof(uint16_t) * ATTN_ROWS * D);
    for (int64_t r = 0; r < nr; ++r) {
        const float inv = 1.f / rowsum[i0 + r];
        __m512 go = _mm512_setzero_ps();
        for (int e = 0; e < DV; ++e) {
            const __m512 gv = load_bf16(g + (i0 + r) * D + 16 * e, 0xFFFF);
            go = _mm512_fmadd_ps(gv, load_bf16(o + (i0 + r) * D + 16 * e, 0xFFFF), go);
            store_bf16(yb + r * D + 16 * e, 0xFFFF, _mm512_mul_ps(gv, _mm512_set1_ps(inv)));
        }
        dterm[r] = -(float)power * inv * _mm512_reduce_add_ps(go);
    }
    attn_pairs_bf16(yb, D, yp);
    for (int64_t j = 0; j < Mp; j += 32) {
        const int two = j + 32 <= Mp;
        attn_dots_bf16(qb, kt, j, Mp, D, two, a0, a1);
        const __mmask16 m[2] = {block_mask(M, j), two ? block_mask(M, j + 16) : (__mmask16)0};
        for (int h = 0; h < 1 + two; ++h) {
            __m512 *s = h ? a1 : a0;
            for (int r = 0; r < ATTN_ROWS; ++r) {
                const __m512 p = _mm512_add_ps(s[r], one), p2 = _mm512_mul_ps(p, p);
                const __m512 p3 = power == 4 ? _mm512_mul_ps(p, p2) : p;
                _mm512_storeu_ps(pb + r * Mp + j + 16 * h, _mm512_maskz_mov_ps(m[h], p3));
                s[r] = _mm512_maskz_mov_ps(m[h], power == 4 ? _mm512_mul_ps(p2, p2) : p2);
            }
            attn_store_rows_bf16(s, j + 16 * h, Mp, NULL, ap);
        }
    }
    attn_scatter_bf16(ap, Mp, yp, dv, M, D);
    for (int64_t j = 0; j < Mp; j += 32) {
        const int two = j + 32 <= Mp;
        attn_dots_bf16(yb, vt, j, Mp, D, two, a0, a1);
        for (int h = 0; h < 1 + two; ++h) {
            __m512 *s = h ? a1 : a0;
            for (int r = 0; r < ATTN_ROWS; ++r) {
                const __m512 da = _mm512_fmadd_ps(s[r], pw, _mm512_set1_ps(dterm[r]));
                s[r] = _mm512_mul_ps(da, _mm512_loadu_ps(pb + r * Mp + j + 16 * h));
            }
            attn_store_rows_bf16(s, j + 16 * h, Mp, sb, ap);
        }
    }
    attn_weigh_bf16(sb, Mp, kp, M, D, tot);
    for (int64_t r = 0; r < nr; ++r)
        for (int e = 0; e < DV; ++e) store_bf16(dq + (i0 + r) * D + 16 * e, 0xFFFF, tot[r * DV + e]);
    attn_scatter_bf16(ap, Mp, qp, dk, M, D);
}

static void attn_block_bf16(const uint16_t *q, const uint32_t *kt, const uint16_t *vp, uint16_t *o, float *rowsum,
                            int64_t i0, int64_t nr, int64_t M, int64_t Mp, int64_t D, int power, float eps,
                            uint16_t *qb, uint16_t *ab) {
    if (D == 32) attn_forward_rows_bf16(q, kt, vp, o, rowsum, i0, nr, M, Mp, 32, power, eps, qb, ab);
    else attn_forward_rows_bf16(q, kt, vp, o, rowsum, i0, nr, M, Mp, 16, power, eps, qb, ab);
}

static void attn_bwd_block_bf16(const uint16_t *q, const uint32_t *kt, const uint16_t *kp, const uint32_t *vt,
                                const uint16_t *o, const uint16_t *g, const float *rowsum, uint16_t *dq, float *dk,
                                float *dv, int64_t i0, int64_t nr, int64_t M, int64_t Mp, int64_t D, int power,
                                uint16_t *qb, uint16_t *qp, uint16_t *yb, uint16_t *yp, uint32_t *ap, uint16_t *sb,
                                float *pb) {
    if (D == 32)
        attn_backward_rows_bf16(q, kt, kp, vt, o, g, rowsum, dq, dk, dv, i0, nr, M, Mp, 32, power, qb, qp, yb, yp, ap,
                                sb, pb);
    else
        attn_backward_rows_bf16(q, kt, kp, vt, o, g, rowsum, dq, dk, dv, i0, nr, M, Mp, 16, power, qb, qp, yb, yp, ap,
                                sb, pb);
}

/* bytes rounded up to whole cache lines, so that every buffer carved from one allocation starts on one */
static inline size_t attn_lines(size_t bytes) { return (bytes + 63) & ~(size_t)63; }

int polynext_poly_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, float *rowsum,
                                 int64_t BH, int64_t N, int64_t M, int64_t D, int power, float eps, int threads) {
    (void)threads;
    if (attn_refused(D, power)) return 1;
    const int64_t Mp = (M + 15) & ~(int64_t)15, block = 64, chunks = (N + block - 1) / block, items = BH * chunks;
    const size_t kt_b = attn_lines(4 * (size_t)(D / 2 * Mp)), vp_b = attn_lines(2 * (size_t)(Mp * D));
    const size_t qb_b = attn_lines(2 * (size_t)(ATTN_ROWS * D)), ab_b = attn_lines(2 * (size_t)(ATTN_ROWS * Mp));
    int failed = 0;
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)")
    {
        const int64_t tid = thread_id(), nt = thread_count();
        char *buf = (char *)aligned_alloc(64, kt_b + vp_b + qb_b + ab_b);
        if (!buf) {
            failed = 1;
        } else {
            uint32_t *kt = (uint32_t *)buf;
            uint16_t *vp = (uint16_t *)(buf + kt_b), *qb = (uint16_t *)(buf + kt_b + vp_b);
            uint16_t *ab = (uint16_t *)(buf + kt_b + vp_b + qb_b);
            int64_t head = -1;
            for (int64_t it = items * tid / nt; it < items * (tid + 1) / nt; ++it) {
                const int64_t h = it / chunks, r0 = (it % chunks) * block, r1 = r0 + block < N ? r0 + block : N;
                if (h != head) {
                    attn_layouts_bf16(k + h * M * D, kt, NULL, M, Mp, D);
                    attn_layouts_bf16(v + h * M * D, NULL, vp, M, Mp, D);
                }
                head = h;
                for (int64_t i0 = r0; i0 < r1; i0 += ATTN_ROWS)
                    attn_block_bf16(q + h * N * D, kt, vp, o + h * N * D, rowsum ? rowsum + h * N : NULL, i0,
                                    r1 - i0 < ATTN_ROWS ? r1 - i0 : ATTN_ROWS, M, Mp, D, power, eps, qb, ab);
            }
            free(buf);
        }
    }
    return failed ? 2 : 0;
}

int polynext_poly_attention_backward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *o,
                                          const uint16_t *g, const float *rowsum, uint16_t *dq, uint16_t *dk,
                                          uint16_t *dv, int64_t BH, int64_t N, int64_t M, int64_t D, int power,
                                          int threads) {
    (void)threads;
    if (attn_refused(D, power)) return 1;
    const int64_t Mp = (M + 15) & ~(int64_t)15;
    const size_t kt_b = attn_lines(4 * (size_t)(D / 2 * Mp)), kp_b = attn_lines(2 * (size_t)(Mp * D));
    const size_t acc_b = attn_lines(4 * (size_t)(M * D)), row_b = attn_lines(2 * (size_t)(ATTN_ROWS * D));
    const size_t ap_b = attn_lines(4 * (size_t)(ATTN_PAIRS * Mp)), sb_b = attn_lines(2 * (size_t)(ATTN_ROWS * Mp));
    const size_t pb_b = attn_lines(4 * (size_t)(ATTN_ROWS * Mp));
    int failed = 0;
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)")
    {
        const int64_t tid = thread_id(), nt = thread_count();
        char *buf = (char *)aligned_alloc(64, 2 * kt_b + kp_b + 2 * acc_b + 4 * row_b + ap_b + sb_b + pb_b);
        if (!buf) {
            failed = 1;
        } else {
            char *at = buf;
            uint32_t *kt = (uint32_t *)at, *vt = (uint32_t *)(at += kt_b);
            uint16_t *kp = (uint16_t *)(at += kt_b);
            float *dk_acc = (float *)(at += kp_b), *dv_acc = (float *)(at += acc_b);
            uint16_t *qb = (uint16_t *)(at += acc_b), *qp = (uint16_t *)(at += row_b);
            uint16_t *yb = (uint16_t *)(at += row_b), *yp = (uint16_t *)(at += row_b);
            uint32_t *ap = (uint32_t *)(at += row_b);
            uint16_t *sb = (uint16_t *)(at += ap_b);
            float *pb = (float *)(at += sb_b);
            for (int64_t h = BH * tid / nt; h < BH * (tid + 1) / nt; ++h) {
                attn_layouts_bf16(k + h * M * D, kt, kp, M, Mp, D);
                attn_layouts_bf16(v + h * M * D, vt, NULL, M, Mp, D);
                memset(dk_acc, 0, sizeof(float) * M * D);
                memset(dv_acc, 0, sizeof(float) * M * D);
                for (int64_t i0 = 0; i0 < N; i0 += ATTN_ROWS)
                    attn_bwd_block_bf16(q + h * N * D, kt, kp, vt, o + h * N * D, g + h * N * D, rowsum + h * N,
                                        dq + h * N * D, dk_acc, dv_acc, i0, N - i0 < ATTN_ROWS ? N - i0 : ATTN_ROWS,
                                        M, Mp, D, power, qb, qp, yb, yp, ap, sb, pb);
                for (int64_t i = 0; i < M * D; i += 16) {
                    const __mmask16 m = block_mask(M * D, i);
                    store_bf16(dk + h * M * D + i, m, load_f32(dk_acc + i, m));
                    store_bf16(dv + h * M * D + i, m, load_f32(dv_acc + i, m));
                }
            }
            free(buf);
        }
    }
    return failed ? 2 : 0;
}
#else   /* needs AVX-512 BF16's pair dot product; PyTorch's path elsewhere */
#define ATTN_FUSED_BF16 0
int polynext_poly_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, uint16_t *o, float *rowsum,
                                 int64_t BH, int64_t N, int64_t M, int64_t D, int power, float eps, int threads) {
    (void)q; (void)k; (void)v; (void)o; (void)rowsum; (void)BH; (void)N; (void)M; (void)D; (void)power; (void)eps;
    (void)threads;
    return 1;
}
int polynext_poly_attention_backward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *o,
                                          const uint16_t *g, const float *rowsum, uint16_t *dq, uint16_t *dk,
                                          uint16_t *dv, int64_t BH, int64_t N, int64_t M, int64_t D, int power,
                                          int threads) {
    (void)q; (void)k; (void)v; (void)o; (void)g; (void)rowsum; (void)dq; (void)dk; (void)dv; (void)BH; (void)N;
    (void)M; (void)D; (void)power; (void)threads;
    return 1;
}
#endif

/* 1 where polynext_poly_attention_bf16 is built (AVX-512 BF16), else 0. */
int polynext_poly_attention_fused_bf16(void) { return ATTN_FUSED_BF16; }

/* 9. polynext_polyconv_dw_f32 / _bf16: PolyConv's depthwise core at inference (see 9. above), for N channels-last
 * images u (N x H x W x C, float32 or bfloat16) into y (the same shape and dtype):
 *
 *     y[c] = DW_out( DW_coarse(u)[c] * DW_fine(u)[C-1-c] )
 *
 * DW_coarse: k x k, dilation d, padding p = d (k - 1) / 2; DW_fine and DW_out: 3 x 3, padding 1; all stride 1, no
 * bias. Weights are float32 and tap-major (wc: k*k x C, wf and wo: 9 x C; tap i*k + j is row i, column j).
 *
 * A work item is an image (with fewer images than 2 x threads, a share of its 16-channel blocks), streamed row by
 * row: u's row h + 1 + p is read once, in order, into two small zero-padded float32 rings per channel block, U (the
 * block's channels c0..) and M (the mirrored channels C-1-c0.., reversed in the register), 2p + 1 rows each; then
 * per block the product's row h + 1 into a three-row ring and y's row h from it, written once, in order. Every
 * convolution reads a pixel's 16 channels as one aligned vector with no bounds to check, R pixels of a row at a
 * time with their sums in registers (R = 7 where the width is a multiple of 7, as PolyNeXt's 56 / 28 / 14 / 7 at
 * 224 px, else 8; the rings are padded to a multiple of R and the product's extra columns zeroed). A block's rings
 * take 50 KB at 56x56: they stay in L1 / L2, and u and y each cross memory once. Sums in float32, in the taps'
 * order (as oneDNN's, so float32 results match PyTorch's path bit for bit in the tests), bf16 rounded once at the
 * end. Returns 0; 1 where the kernel does not serve the call (an even k or k > 9, d < 1, C > 1024, a build without
 * AVX-512 or AVX2: nothing written); 2 if a thread's rings could not be allocated (y incomplete). With AVX2 a block is
 * 8 channels (the vector layer below); the rings, slots and taps' order are the same. */
#if defined(__AVX512F__) && defined(__AVX512BW__)
#define PCDW_BUILT 1
#define PCDW_INLINE static inline __attribute__((always_inline))
/* The vector layer of 9. and 14.: a block of PC_VW channels is one vector a pixel (AVX-512: 16 lanes, a block's last
 * partial vector under a lane mask) */
#define PC_VW 16
#define PC_MAXB 64                        /* blocks in 1024 channels: the per-block tables' size */
typedef __m512 pc_vec;
typedef __m512i pc_idx;
typedef __mmask16 pc_tail;                /* which of a block's lanes are channels */
#define PC_TAIL(n) ((__mmask16)((1u << (n)) - 1u))
#define PC_FULL ((__mmask16)0xffff)
#define PC_IDX(rev) _mm512_loadu_si512(rev)
#define PC_PERMUTE(idx, v) _mm512_permutexvar_ps(idx, v)
#define PC_LOAD(p) _mm512_load_ps(p)
#define PC_LOADU(p) _mm512_loadu_ps(p)
#define PC_LOADW(p, k) load_f32(p, k)
#define PC_STORE(p, v) _mm512_store_ps(p, v)
#define PC_ZERO() _mm512_setzero_ps()
#define PC_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define PC_MUL(a, b) _mm512_mul_ps(a, b)

/* a store of 16 lanes under mask k, unmasked where k is full (a masked store is slower on Zen 4) */
PCDW_INLINE void store_f32_full(float *p, __mmask16 k, __m512 v) {
    if (k == (__mmask16)0xffff) _mm512_storeu_ps(p, v);
    else _mm512_mask_storeu_ps(p, k, v);
}
PCDW_INLINE void store_bf16_full(uint16_t *p, __mmask16 k, __m512 v) {
    if (k == (__mmask16)0xffff) _mm256_storeu_si256((__m256i *)p, to_bf16(v));
    else _mm256_mask_storeu_epi16(p, k, to_bf16(v));
}

PCDW_INLINE __m512 load_f32_full(const float *p, __mmask16 k) {
    return k == (__mmask16)0xffff ? _mm512_loadu_ps(p) : _mm512_maskz_loadu_ps(k, p);
}
PCDW_INLINE __m512 load_bf16_full(const uint16_t *p, __mmask16 k) {
    const __m256i h = k == (__mmask16)0xffff ? _mm256_loadu_si256((const __m256i *)p) : _mm256_maskz_loadu_epi16(k, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
#elif defined(__AVX2__) && defined(__FMA__)
/* The same layer with AVX2 (x86-64-v3: Zen 1-3, Intel's client cores): blocks of 8 channels, one 256-bit vector a
 * pixel. There are no lane masks: a block's last partial vector goes through the stack (PolyNeXt's widths are
 * multiples of 8, so only other widths take that way). */
#include <immintrin.h>
#define PCDW_BUILT 1
#define PCDW_INLINE static inline __attribute__((always_inline))
#define PC_VW 8
#define PC_MAXB 128
typedef __m256 pc_vec;
typedef __m256i pc_idx;
typedef int pc_tail;                      /* the block's channel count, 1..8 */
#define PC_TAIL(n) ((int)(n))
#define PC_FULL 8
#define PC_IDX(rev) _mm256_loadu_si256((const __m256i *)(rev))
#define PC_PERMUTE(idx, v) _mm256_permutevar8x32_ps(v, idx)
#define PC_LOAD(p) _mm256_load_ps(p)
#define PC_LOADU(p) _mm256_loadu_ps(p)
#define PC_LOADW(p, k) load_f32_full(p, k)
#define PC_STORE(p, v) _mm256_store_ps(p, v)
#define PC_ZERO() _mm256_setzero_ps()
#define PC_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define PC_MUL(a, b) _mm256_mul_ps(a, b)

PCDW_INLINE void store_f32_full(float *p, int n, __m256 v) {
    if (n == 8) {
        _mm256_storeu_ps(p, v);
        return;
    }
    float t[8];
    _mm256_storeu_ps(t, v);
    memcpy(p, t, (size_t)n * sizeof(float));
}
PCDW_INLINE void store_bf16_full(uint16_t *p, int n, __m256 v) {   /* rounded as f32_to_bf16 */
    const __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    const __m256i q = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
    r = _mm256_blendv_epi8(r, q, _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    if (n == 8) {
        _mm_storeu_si128((__m128i *)p, h);
        return;
    }
    uint16_t t[8];
    _mm_storeu_si128((__m128i *)t, h);
    memcpy(p, t, (size_t)n * sizeof(uint16_t));
}

PCDW_INLINE __m256 load_f32_full(const float *p, int n) {   /* lanes n.. are 0 */
    if (n == 8) return _mm256_loadu_ps(p);
    float t[8] = {0};
    memcpy(t, p, (size_t)n * sizeof(float));
    return _mm256_loadu_ps(t);
}
PCDW_INLINE __m256 load_bf16_full(const uint16_t *p, int n) {
    uint16_t t[8] = {0};
    if (n < 8) memcpy(t, p, (size_t)n * sizeof(uint16_t));
    const __m128i h = _mm_loadu_si128((const __m128i *)(n == 8 ? p : t));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#else
#define PCDW_BUILT 0
#endif
#if PCDW_BUILT

/* acc[r] = sum over taps t of w[t] (a block's lanes) * src[t][PC_VW (x + r)], r < R */
PCDW_INLINE void pcdw_taps(const float *const *src, int64_t x, const float *w, int taps, int R, pc_vec *acc) {
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; ++r) acc[r] = PC_ZERO();
    for (int t = 0; t < taps; ++t) {
        const pc_vec wv = PC_LOAD(w + PC_VW * t);
        const float *s = src[t] + PC_VW * x;
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; ++r) acc[r] = PC_FMA(wv, PC_LOAD(s + PC_VW * r), acc[r]);
    }
}

/* the same sums for a K x K kernel with dilation D (src[i K + j] = src[i K] + PC_VW j D), K, D and R constants in
 * each instance: a kernel row's K weights in registers and each of its R + D (K - 1) inputs loaded once for the K
 * sums it enters, where pcdw_taps loads an input per tap (on a Zen 4 the loads, not the FMAs, bound that: x1.8 on a
 * 5x5 from L1). Each sum still takes its taps in order, so the values are pcdw_taps' bit for bit. */
PCDW_INLINE void pcdw_rows(const float *const *src, int64_t x, const float *w, int K, int D, int R, pc_vec *acc) {
    _Pragma("GCC unroll 8")
    for (int r = 0; r < R; ++r) acc[r] = PC_ZERO();
    for (int i = 0; i < K; ++i) {
        const float *s = src[i * K] + PC_VW * x;
        pc_vec wv[5];
        _Pragma("GCC unroll 5")
        for (int j = 0; j < K; ++j) wv[j] = PC_LOAD(w + PC_VW * (i * K + j));
        _Pragma("GCC unroll 16")
        for (int c = 0; c < R + D * (K - 1); ++c) {
            const pc_vec xv = PC_LOAD(s + PC_VW * c);
            _Pragma("GCC unroll 5")
            for (int j = 0; j < K; ++j)
                if (c - j * D >= 0 && c - j * D < R) acc[c - j * D] = PC_FMA(wv[j], xv, acc[c - j * D]);
        }
    }
}

/* pcdw_taps for a k x k kernel with dilation d: pcdw_rows where k and d are PolyNeXt's (3 or 5, dilation 1 or 2) */
PCDW_INLINE void pcdw_sum(const float *const *src, int64_t x, const float *w, int k, int d, int R, pc_vec *acc) {
    if (k == 3 && d == 1) pcdw_rows(src, x, w, 3, 1, R, acc);
    else if (k == 3 && d == 2) pcdw_rows(src, x, w, 3, 2, R, acc);
    else if (k == 5 && d == 1) pcdw_rows(src, x, w, 5, 1, R, acc);
    else if (k == 5 && d == 2) pcdw_rows(src, x, w, 5, 2, R, acc);
    else pcdw_taps(src, x, w, k * k, R, acc);
}

/* one row of the product, pr[x] = coarse[x] * fine[x] for x < Wr (R a constant in each instance). With AVX2's 16
 * registers a chunk's two sets of R sums do not fit together: the coarse sums go to pr first and are multiplied by
 * the fine sums from there. */
PCDW_INLINE void pcdw_product_row(const float *const *cu, const float *const *fm, float *pr, const float *wc,
                                  int k, int d, const float *wf, int64_t Wr, int R) {
    for (int64_t x0 = 0; x0 < Wr; x0 += R) {
#if PC_VW == 16
        pc_vec a[8], b[8];
        pcdw_sum(cu, x0, wc, k, d, R, a);
        pcdw_rows(fm, x0, wf, 3, 1, R, b);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; ++r) PC_STORE(pr + PC_VW * (x0 + r), PC_MUL(a[r], b[r]));
#else
        pc_vec a[8];
        pcdw_sum(cu, x0, wc, k, d, R, a);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; ++r) PC_STORE(pr + PC_VW * (x0 + r), a[r]);
        pcdw_rows(fm, x0, wf, 3, 1, R, a);
        _Pragma("GCC unroll 8")
        for (int r = 0; r < R; ++r) PC_STORE(pr + PC_VW * (x0 + r), PC_MUL(PC_LOAD(pr + PC_VW * (x0 + r)), a[r]));
#endif
    }
}

#define POLYCONV_DW(NAME, T, LOAD, STORE)                                                                        \
    PCDW_INLINE void NAME##_out_row(const float *const *po, const float *wo, T *y, int64_t C, int64_t W,        \
                                    int64_t Wr, pc_tail km, int R) {                                            \
        for (int64_t x0 = 0; x0 < Wr; x0 += R) {                                                                \
            pc_vec acc[8];                                                                                      \
            pcdw_rows(po, x0, wo, 3, 1, R, acc);                                                                \
            _Pragma("GCC unroll 8")                                                                             \
            for (int r = 0; r < R; ++r)                                                                         \
                if (x0 + r < W) STORE##_full(y + (x0 + r) * C, km, acc[r]);                                     \
        }                                                                                                       \
    }                                                                                                           \
    /* blocks b0..b1-1 of one image; buf: the blocks' rings (their borders zero), wts: room for their weights */ \
    static void NAME##_item(const T *u, T *y, const float *wc, const float *wf, const float *wo, float *buf,     \
                            float *wts, int64_t H, int64_t W, int64_t C, int64_t b0, int64_t b1, int k, int d,  \
                            int R) {                                                                            \
        const int64_t p = (int64_t)d * (k - 1) / 2, P = p > 1 ? p : 1, RU = 2 * p + 1, Wr = (W + R - 1) / R * R; \
        const int64_t Wp = Wr + 2 * P, Wq = Wr + 2, taps = (int64_t)k * k, nb = b1 - b0;                       \
        const int64_t ring = RU * Wp * PC_VW, pring = 3 * Wq * PC_VW, per = 2 * ring + pring;                   \
        /* wts, per block: the coarse taps, the fine taps (lanes reversed), the output taps */                  \
        pc_idx idx[PC_MAXB];                      /* per block: the lane reversal of its mirrored channels */   \
        pc_tail kms[PC_MAXB];                                                                                   \
        int64_t src[PC_MAXB];                                                                                   \
        for (int64_t b = 0; b < nb; ++b) {                                                                      \
            const int64_t c0 = PC_VW * (b0 + b), n = C - c0 < PC_VW ? C - c0 : PC_VW;                           \
            int32_t rev[PC_VW];                   /* lane i of M: channel s0 + n - 1 - i = C - 1 - (c0 + i) */  \
            for (int i = 0; i < PC_VW; ++i) rev[i] = i < n ? (int32_t)(n - 1 - i) : i;                          \
            idx[b] = PC_IDX(rev);                                                                               \
            kms[b] = PC_TAIL(n);                                                                                \
            src[b] = C - c0 - n;                                                                                \
            float *w = wts + b * (taps + 18) * PC_VW;                                                           \
            for (int64_t t = 0; t < taps; ++t) PC_STORE(w + PC_VW * t, PC_LOADW(wc + t * C + c0, kms[b]));     \
            for (int64_t t = 0; t < 9; ++t) {                                                                   \
                PC_STORE(w + PC_VW * (taps + t), PC_PERMUTE(idx[b], PC_LOADW(wf + t * C + src[b], kms[b])));    \
                PC_STORE(w + PC_VW * (taps + 9 + t), PC_LOADW(wo + t * C + c0, kms[b]));                        \
            }                                                                                                   \
        }                                                                                                       \
        /* ring slots: u's row r at (r mod RU), the product's row r at (r mod 3), r >= -RU; the rows outside the \
         * map are zero: the columns outside it always (buf is zeroed once), the rows before it here, the rows \
         * after it as they enter */                                                                            \
        for (int64_t b = 0; b < nb; ++b) {                                                                      \
            float *U = buf + b * per;                                                                           \
            for (int64_t r = 1; r <= p; ++r) {                                                                  \
                memset(U + (RU - r) * Wp * PC_VW, 0, (size_t)Wp * PC_VW * sizeof(float));                       \
                memset(U + ring + (RU - r) * Wp * PC_VW, 0, (size_t)Wp * PC_VW * sizeof(float));                \
            }                                                                                                   \
            memset(U + 2 * ring + 2 * Wq * PC_VW, 0, (size_t)Wq * PC_VW * sizeof(float));                       \
        }                                                                                                       \
        for (int64_t r = 0; r <= H + p; ++r) {    /* u's row r enters; then the product's row r - p, y's r - p - 1 */ \
            float *slot = buf + ((r % RU) * Wp + P) * PC_VW;   /* + b * per: block b's U, + ring: its M */      \
            if (r < H) {                          /* u's row in order, pixel by pixel */                       \
                const T *x = u + r * W * C;                                                                     \
                for (int64_t w = 0; w < W; ++w, x += C)                                                         \
                    for (int64_t b = 0; b < nb; ++b) {                                                          \
                        float *ur = slot + b * per + PC_VW * w;                                                 \
                        PC_STORE(ur, LOAD##_full(x + PC_VW * (b0 + b), kms[b]));                                \
                        PC_STORE(ur + ring, PC_PERMUTE(idx[b], LOAD##_full(x + src[b], kms[b])));               \
                    }                                                                                           \
            } else {                                                                                            \
                for (int64_t b = 0; b < nb; ++b)                                                                \
                    for (int64_t w = 0; w < W; ++w) {                                                           \
                        PC_STORE(slot + b * per + PC_VW * w, PC_ZERO());                                        \
                        PC_STORE(slot + b * per + ring + PC_VW * w, PC_ZERO());                                 \
                    }                                                                                           \
            }                                                                                                   \
            const int64_t h = r - p;              /* the product's row h: u's rows h - p .. h + p are in */     \
            if (h < 0) continue;                                                                                \
            const int64_t hs = (r + 1) % RU, h3 = h % 3;   /* slots of u's row h - p = r - 2p, the product's row h */ \
            /* u's next row and y's next row are fetched a share per block while this row is computed: memory \
             * and arithmetic overlap (the phases are too long for the core's own reordering) */                \
            const char *un = (const char *)(u + (r + 1) * W * C), *yn = (const char *)(y + h * W * C);           \
            const int64_t bytes = r + 1 < H ? W * C * (int64_t)sizeof(T) : 0;                                   \
            const int64_t ybytes = h < H ? W * C * (int64_t)sizeof(T) : 0;                                      \
            for (int64_t b = 0; b < nb; ++b) {                                                                  \
                for (int64_t o = bytes * b / nb & ~(int64_t)63; o < bytes * (b + 1) / nb; o += 64)              \
                    __builtin_prefetch(un + o, 0, 3);                                                           \
                for (int64_t o = ybytes * b / nb & ~(int64_t)63; o < ybytes * (b + 1) / nb; o += 64)            \
                    __builtin_prefetch(yn + o, 1, 3);                                                           \
                float *U = buf + b * per, *M = U + ring, *Pq = M + ring;                                        \
                const float *w = wts + b * (taps + 18) * PC_VW;                                                 \
                float *pr = Pq + (h3 * Wq + 1) * PC_VW;                                                         \
                if (h < H) {                                                                                    \
                    const float *cu[81], *fm[9];                                                                \
                    for (int i = 0; i < k; ++i) {         /* u's row h - p + i d: slot (h - p) mod RU + i d */  \
                        const int64_t s = hs + (int64_t)i * d;                                                  \
                        for (int j = 0; j < k; ++j)                                                             \
                            cu[i * k + j] = U + ((s < RU ? s : s - RU) * Wp + P - p + (int64_t)j * d) * PC_VW;  \
                    }                                                                                           \
                    for (int i = 0; i < 3; ++i) {                                                               \
                        const int64_t s = hs + p - 1 + i;                                                       \
                        for (int j = 0; j < 3; ++j) fm[i * 3 + j] = M + ((s < RU ? s : s - RU) * Wp + P - 1 + j) * PC_VW; \
                    }                                                                                           \
                    if (R == 7) pcdw_product_row(cu, fm, pr, w, k, d, w + PC_VW * taps, Wr, 7);                 \
                    else pcdw_product_row(cu, fm, pr, w, k, d, w + PC_VW * taps, Wr, 8);                        \
                    for (int64_t x = W; x < Wr; ++x) PC_STORE(pr + PC_VW * x, PC_ZERO());                       \
                } else {                                                                                        \
                    for (int64_t x = 0; x < Wr; ++x) PC_STORE(pr + PC_VW * x, PC_ZERO());                       \
                }                                                                                               \
                if (h == 0) continue;             /* y's row h - 1 from the product's rows h - 2 .. h */        \
                const float *po[9];                                                                             \
                for (int i = 0; i < 3; ++i)                                                                     \
                    for (int j = 0; j < 3; ++j) po[i * 3 + j] = Pq + ((h3 + 1 + i < 3 ? h3 + 1 + i : h3 + i - 2) * Wq + j) * PC_VW; \
                T *yr = y + (h - 1) * W * C + PC_VW * (b0 + b);                                                 \
                if (R == 7) NAME##_out_row(po, w + PC_VW * (taps + 9), yr, C, W, Wr, kms[b], 7);                \
                else NAME##_out_row(po, w + PC_VW * (taps + 9), yr, C, W, Wr, kms[b], 8);                       \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    int NAME(const T *u, const float *wc, const float *wf, const float *wo, T *y, int64_t N, int64_t H,         \
             int64_t W, int64_t C, int k, int d, int threads) {                                                 \
        (void)threads;                                                                                          \
        if (k % 2 == 0 || k > 9 || d < 1 || C > 1024) return 1;                                                 \
        const int R = W % 7 == 0 && W % 8 != 0 ? 7 : 8;                                                         \
        const int64_t p = (int64_t)d * (k - 1) / 2, P = p > 1 ? p : 1, Wr = (W + R - 1) / R * R;               \
        const int64_t blocks = (C + PC_VW - 1) / PC_VW;                                                         \
        int64_t groups = (2 * (int64_t)threads + N - 1) / N;                                                    \
        groups = groups < 1 ? 1 : groups > blocks ? blocks : groups;                                            \
        const int64_t gb = (blocks + groups - 1) / groups, items = N * groups;                                  \
        const size_t per = (size_t)(2 * (2 * p + 1) * (Wr + 2 * P) + 3 * (Wr + 2)) * PC_VW;                     \
        const size_t floats = (size_t)gb * (per + (size_t)(k * k + 18) * PC_VW);                                \
        int failed = 0;                                                                                         \
        _Pragma("omp parallel num_threads(threads) reduction(|:failed)")                                        \
        {                                                                                                       \
            const int64_t tid = thread_id(), nt = thread_count();                                               \
            float *buf = NULL;                    /* 64-byte aligned: a ring's vector is one cache line */      \
            if (posix_memalign((void **)&buf, 64, floats * sizeof(float)) == 0) memset(buf, 0, floats * sizeof(float)); \
            else buf = NULL;                                                                                    \
            if (!buf) {                                                                                         \
                failed = 1;                                                                                     \
            } else {                                                                                            \
                for (int64_t it = items * tid / nt; it < items * (tid + 1) / nt; ++it) {                        \
                    const int64_t img = it / groups, b0 = (it % groups) * gb;                                   \
                    const int64_t b1 = b0 + gb < blocks ? b0 + gb : blocks;                                     \
                    if (b0 >= b1) continue;                                                                     \
                    NAME##_item(u + img * H * W * C, y + img * H * W * C, wc, wf, wo, buf, buf + gb * per, H, W, \
                                C, b0, b1, k, d, R);                                                            \
                }                                                                                               \
                free(buf);                                                                                      \
            }                                                                                                   \
        }                                                                                                       \
        return failed ? 2 : 0;                                                                                  \
    }

POLYCONV_DW(polynext_polyconv_dw_f32, float, load_f32, store_f32)
POLYCONV_DW(polynext_polyconv_dw_bf16, uint16_t, load_bf16, store_bf16)
#else   /* the rings are read as vectors: AVX-512 or AVX2; PyTorch's path elsewhere */
int polynext_polyconv_dw_f32(const float *u, const float *wc, const float *wf, const float *wo, float *y, int64_t N,
                             int64_t H, int64_t W, int64_t C, int k, int d, int threads) {
    (void)u; (void)wc; (void)wf; (void)wo; (void)y; (void)N; (void)H; (void)W; (void)C; (void)k; (void)d;
    (void)threads;
    return 1;
}
int polynext_polyconv_dw_bf16(const uint16_t *u, const float *wc, const float *wf, const float *wo, uint16_t *y,
                              int64_t N, int64_t H, int64_t W, int64_t C, int k, int d, int threads) {
    (void)u; (void)wc; (void)wf; (void)wo; (void)y; (void)N; (void)H; (void)W; (void)C; (void)k; (void)d;
    (void)threads;
    return 1;
}
#endif

/* 1 where polynext_polyconv_dw_* is built (AVX-512 or AVX2), else 0. */
int polynext_polyconv_dw_built(void) { return PCDW_BUILT; }


/* 10. polynext_pointwise_f32 (see 10. above): P pixels x (P x K, row-major: a channels-last tensor's pixels) times
 * wp, the weight packed per chunk of CW output channels ([chunk][k][CW], CW = 72 or 48, N a multiple of CW; with
 * AVX2 per column of PW_COLS within the chunk, polynext_pointwise_cols), into
 * y (P x N); with `accumulate` y += x W (the residual addition that follows PolyMLP's output projection). Each
 * tile's sums are in registers for the whole sum over k, in k's order, float32; one store (or load, add, store)
 * per output. Pixel tiles are shared among the threads in order; the last, partial tile goes through a zeroed copy.
 * Returns 0; 1 where not served (CW not 72 or 48, N not a multiple of it, K > PW_MAX_K, a build without AVX-512 or
 * AVX2: nothing written). */
#define PW_MAX_K 1024
#if defined(__AVX512F__)
#define PW_BUILT 1
/* one tile: PT pixels (rows of x, stride K; of y, stride N) against one chunk of NV vectors and a TAIL of 8 lanes
 * (a 256-bit vector; 0: none) */
#define PW_TILE(NAME, PT, NV, TAIL)                                                                              \
    static inline __attribute__((always_inline)) void NAME(const float *x, int64_t K, const float *wc, float *y, \
                                                           int64_t N, int accumulate) {                          \
        __m512 a[PT][NV];                                                                                       \
        __m256 t[PT];                                                                                           \
        _Pragma("GCC unroll 8")                                                                                 \
        for (int p = 0; p < PT; ++p) {                                                                          \
            _Pragma("GCC unroll 4")                                                                             \
            for (int v = 0; v < NV; ++v) a[p][v] = _mm512_setzero_ps();                                         \
            t[p] = _mm256_setzero_ps();                                                                         \
        }                                                                                                       \
        const int64_t CW = 16 * NV + TAIL;                                                                      \
        for (int64_t k = 0; k < K; ++k) {                                                                       \
            __m512 wv[NV];                                                                                      \
            _Pragma("GCC unroll 4")                                                                             \
            for (int v = 0; v < NV; ++v) wv[v] = _mm512_loadu_ps(wc + k * CW + 16 * v);                         \
            const __m256 wt = TAIL == 8 ? _mm256_loadu_ps(wc + k * CW + 16 * NV) : _mm256_setzero_ps();         \
            _Pragma("GCC unroll 8")                                                                             \
            for (int p = 0; p < PT; ++p) {                                                                      \
                const __m512 b = _mm512_set1_ps(x[p * K + k]);                                                  \
                _Pragma("GCC unroll 4")                                                                         \
                for (int v = 0; v < NV; ++v) a[p][v] = _mm512_fmadd_ps(b, wv[v], a[p][v]);                      \
                if (TAIL == 8) t[p] = _mm256_fmadd_ps(_mm512_castps512_ps256(b), wt, t[p]);                     \
            }                                                                                                   \
        }                                                                                                       \
        _Pragma("GCC unroll 8")                                                                                 \
        for (int p = 0; p < PT; ++p) {                                                                          \
            float *yp = y + p * N;                                                                              \
            _Pragma("GCC unroll 4")                                                                             \
            for (int v = 0; v < NV; ++v)                                                                        \
                _mm512_storeu_ps(yp + 16 * v, accumulate ? _mm512_add_ps(_mm512_loadu_ps(yp + 16 * v), a[p][v]) \
                                                         : a[p][v]);                                            \
            if (TAIL == 8)                                                                                      \
                _mm256_storeu_ps(yp + 16 * NV, accumulate ? _mm256_add_ps(_mm256_loadu_ps(yp + 16 * NV), t[p])  \
                                                          : t[p]);                                              \
        }                                                                                                       \
    }
PW_TILE(pw_tile72, 5, 4, 8)
PW_TILE(pw_tile48, 8, 3, 0)

/* The pixels of a tile of CW outputs (72: 5 x 4.5 vectors, 48: 8 x 3 accumulators), and the tile. */
#define PW_MAX_PT 8                       /* the most pixels a tile takes */
static inline int64_t pw_pixels(int64_t CW) { return CW == 72 ? 5 : 8; }
static inline void pw_tile(int64_t CW, const float *x, int64_t K, const float *wc, float *y, int64_t N, int accumulate) {
    if (CW == 72) pw_tile72(x, K, wc, y, N, accumulate);
    else pw_tile48(x, K, wc, y, N, accumulate);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 (x86-64-v3): 16 vector registers, so a tile is 4 pixels x 24 outputs (12 sums, 3 weight vectors and a
 * broadcast), and a chunk of 72 or 48 outputs is 3 or 2 such columns, each over the whole sum over k in k's order.
 * The weight is packed per column ([chunk][column][k][24], PW_COLS: the packing's column width, which the caller
 * asks for), so that a column's weights are one contiguous stream, read from L1 / L2 once for 16 pixels (4 tiles). */
#define PW_BUILT 1
#define PW_COLS 24
static inline __attribute__((always_inline)) void pw8_tile24(const float *x, int64_t K, const float *wc, int64_t CW,
                                                             float *y, int64_t N, int accumulate) {
    __m256 a[4][3];
    _Pragma("GCC unroll 4")
    for (int p = 0; p < 4; ++p)
        _Pragma("GCC unroll 3")
        for (int v = 0; v < 3; ++v) a[p][v] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; ++k) {
        __m256 wv[3];
        _Pragma("GCC unroll 3")
        for (int v = 0; v < 3; ++v) wv[v] = _mm256_loadu_ps(wc + k * CW + 8 * v);
        /* the weights held in registers: folded into the FMAs as memory operands (GCC's choice) they make 16 loads
         * for 12 FMAs, more than a Zen 3 issues in the FMAs' 6 cycles (x0.6-0.8 of oneDNN's rate) */
        __asm__("" : "+x"(wv[0]), "+x"(wv[1]), "+x"(wv[2]));
        _Pragma("GCC unroll 4")
        for (int p = 0; p < 4; ++p) {
            const __m256 b = _mm256_broadcast_ss(x + p * K + k);
            _Pragma("GCC unroll 3")
            for (int v = 0; v < 3; ++v) a[p][v] = _mm256_fmadd_ps(b, wv[v], a[p][v]);
        }
    }
    _Pragma("GCC unroll 4")
    for (int p = 0; p < 4; ++p) {
        float *yp = y + p * N;
        _Pragma("GCC unroll 3")
        for (int v = 0; v < 3; ++v)
            _mm256_storeu_ps(yp + 8 * v, accumulate ? _mm256_add_ps(_mm256_loadu_ps(yp + 8 * v), a[p][v]) : a[p][v]);
    }
}
#define PW_MAX_PT 16
static inline int64_t pw_pixels(int64_t CW) { (void)CW; return 16; }
static inline void pw_tile(int64_t CW, const float *x, int64_t K, const float *wc, float *y, int64_t N, int accumulate) {
    for (int64_t s = 0; s < CW; s += 24)
        for (int64_t q = 0; q < 16; q += 4) pw8_tile24(x + q * K, K, wc + s * K, 24, y + q * N + s, N, accumulate);
}
#endif
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))

/* One pixel tile of PT rows (x: PT x K, stride K) against every chunk of the packed weight, into y (PT rows, stride
 * ldy; + y with `accumulate`). */
static inline void pw_tile_row(const float *xt, const float *wp, float *yt, int64_t K, int64_t N, int64_t CW,
                               int64_t ldy, int accumulate) {
    for (int64_t c = 0; c < N / CW; ++c) pw_tile(CW, xt, K, wp + c * K * CW, yt + c * CW, ldy, accumulate);
}

/* The pixel tile's rows of x, or (the last, partial tile) a zeroed copy of them in xpad: the tile reads PT rows. */
static inline const float *pw_rows(const float *x, int64_t p0, int64_t np, int64_t PT, int64_t K, float *xpad) {
    const float *xt = x + p0 * K;
    if (np == PT) return xt;
    memset(xpad, 0, (size_t)(PT * K) * sizeof(float));
    memcpy(xpad, xt, (size_t)(np * K) * sizeof(float));
    return xpad;
}

static inline int pw_refused(int64_t K, int64_t N, int64_t CW) {
    return !(CW == 72 || CW == 48) || N % CW != 0 || K < 1 || K > PW_MAX_K;
}

int polynext_pointwise_f32(const float *x, const float *wp, float *y, int64_t P, int64_t K, int64_t N, int64_t CW,
                           int accumulate, int threads) {
    if (pw_refused(K, N, CW)) return 1;
    const int64_t PT = pw_pixels(CW), tiles = (P + PT - 1) / PT, chunks = N / CW;
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t i = 0; i < tiles; ++i) {
        const int64_t p0 = i * PT, np = P - p0 < PT ? P - p0 : PT;
        float xpad[PW_MAX_PT * PW_MAX_K], ypad[PW_MAX_PT * 72];   /* the last, partial tile: zero rows past P */
        const float *xt = pw_rows(x, p0, np, PT, K, xpad);
        float *yt = y + p0 * N;
        if (np == PT) {
            pw_tile_row(xt, wp, yt, K, N, CW, N, accumulate);
            continue;
        }
        for (int64_t c = 0; c < chunks; ++c) {     /* into ypad (one chunk wide), then the real rows out */
            float *yc = yt + c * CW;
            for (int64_t p = 0; p < PT; ++p)
                for (int64_t j = 0; j < CW; ++j) ypad[p * CW + j] = p < np && accumulate ? yc[p * N + j] : 0.f;
            pw_tile(CW, xt, K, wp + c * K * CW, ypad, CW, accumulate);
            for (int64_t p = 0; p < np; ++p) memcpy(yc + p * N, ypad + p * CW, (size_t)CW * sizeof(float));
        }
    }
    return 0;
}

/* 11. polynext_pointwise_norm_f32: the 1x1 convolution of 10. with the channel LayerNorm of 1. as its epilogue,
 * for the two norms of a PolyNeXt block that follow a 1x1 convolution:
 *
 *     y[p] = norm(x[p] W) * nw (+ nb) (+ res[p])                       (PolyConv's pw_out, its norm and residual)
 *     y[p] = norm((x[p] W)[:N/2] * (x[p] W)[N/2:]) * nw (+ nb)        (`product`: PolyMLP's fc_in, product, norm)
 *
 * A pixel tile's N outputs go to a buffer on the stack (PT x N floats, L1 / L2) instead of memory, and the row
 * kernels of 1. (the same functions, so the same values as the two kernels one after the other) normalise them from
 * there into y (P x N, or P x N/2 with `product`); res (P x N, or NULL) may be y itself. Saves the write of the
 * convolution's output and the norm's read of it: 2N floats a pixel. Returns 0; 1 where not served (as 10., or N >
 * PWN_MAX_N: nothing written). */
#define PWN_MAX_N 2048
int polynext_pointwise_norm_f32(const float *x, const float *wp, float *y, const float *nw, const float *nb,
                                const float *res, int64_t P, int64_t K, int64_t N, int64_t CW, float eps, int product,
                                int threads) {
    if (pw_refused(K, N, CW) || N > PWN_MAX_N || (product && N % 2 != 0)) return 1;
    const int64_t PT = pw_pixels(CW), tiles = (P + PT - 1) / PT, C = product ? N / 2 : N;
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t i = 0; i < tiles; ++i) {
        const int64_t p0 = i * PT, np = P - p0 < PT ? P - p0 : PT;
        float xpad[PW_MAX_PT * PW_MAX_K], buf[PW_MAX_PT * PWN_MAX_N];
        pw_tile_row(pw_rows(x, p0, np, PT, K, xpad), wp, buf, K, N, CW, N, 0);
        for (int64_t p = 0; p < np; ++p) {
            if (product)
                row_prod_f32(buf + p * N, nw, nb, NULL, y + (p0 + p) * C, C, eps, NULL);
            else
                row_f32(buf + p * N, nw, nb, res ? res + (p0 + p) * N : NULL, y + (p0 + p) * N, N, eps, NULL);
        }
    }
    return 0;
}
/* 12. polynext_poly_mlp_f32: a PolyNeXt block's whole PolyMLP residual at inference, 11.'s epilogue followed by
 * 10.'s residual form:
 *
 *     y[p] += (norm((x[p] W_in)[:H] * (x[p] W_in)[H:]) * nw (+ nb)) W_out        (H = N / 2; y may be x)
 *
 * x and y: P x K (the residual stream, K channels); wp_in: W_in packed for 10. (K x N, chunks of CW_in), wp_out:
 * W_out packed (H x K, chunks of CW_out). A block of PB pixels (a multiple of both tiles' pixel counts) goes through
 * the input projection into a buffer (PB x N), its normalised product into another (PB x H) and the output
 * projection into y, so that nothing but x is read and y written: the separate kernels write and read N + 2H floats
 * a pixel more. A block reads all its rows of x before it writes y, so y may be x. Per-thread buffers on the heap.
 * Returns 0; 1 where not served (either projection refused by 10.'s rules, N odd or H > MAX_C: nothing written);
 * 2 if a buffer could not be allocated. */
int polynext_poly_mlp_f32(const float *x, const float *wp_in, const float *nw, const float *nb, const float *wp_out,
                          float *y, int64_t P, int64_t K, int64_t N, int64_t CW_in, int64_t CW_out, float eps,
                          int threads) {
    const int64_t H = N / 2;
    if (pw_refused(K, N, CW_in) || N % 2 != 0 || pw_refused(H, K, CW_out) || H > MAX_C) return 1;
    const int64_t PT_in = pw_pixels(CW_in), PT_out = pw_pixels(CW_out);
    const int64_t PB = PT_in == PT_out ? PT_in : PT_in * PT_out, blocks = (P + PB - 1) / PB;
    int failed = 0;
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)")
    {
        float *xpad = (float *)malloc(sizeof(float) * (size_t)(PB * (2 * K + N + H)));
        if (!xpad) {
            failed = 1;
        } else {
            float *ypad = xpad + PB * K, *buf = ypad + PB * K, *hid = buf + PB * N;
            _Pragma("omp for schedule(static)")
            for (int64_t i = 0; i < blocks; ++i) {
                const int64_t p0 = i * PB, np = P - p0 < PB ? P - p0 : PB;
                const float *xt = pw_rows(x, p0, np, PB, K, xpad);
                for (int64_t t = 0; t < PB; t += PT_in) pw_tile_row(xt + t * K, wp_in, buf + t * N, K, N, CW_in, N, 0);
                for (int64_t p = 0; p < np; ++p) row_prod_f32(buf + p * N, nw, nb, NULL, hid + p * H, H, eps, NULL);
                float *yt = y + p0 * K;
                if (np < PB) {                      /* the last, partial block: into ypad, then the real rows out */
                    memset(hid + np * H, 0, (size_t)((PB - np) * H) * sizeof(float));
                    memset(ypad, 0, (size_t)(PB * K) * sizeof(float));
                    memcpy(ypad, yt, (size_t)(np * K) * sizeof(float));
                }
                float *yb = np < PB ? ypad : yt;
                for (int64_t t = 0; t < PB; t += PT_out) pw_tile_row(hid + t * H, wp_out, yb + t * K, H, K, CW_out, K, 1);
                if (np < PB) memcpy(yt, ypad, (size_t)(np * K) * sizeof(float));
            }
            free(xpad);
        }
    }
    return failed ? 2 : 0;
}

/* 13. polynext_pointwise_norm_bf16 / polynext_poly_mlp_bf16: 11. and 12. for bfloat16 activations and weights (a
 * bf16 model's inference), their products on AVX-512 BF16's pair dot product (vdpbf16ps: two bf16 products summed
 * into a float32 lane per instruction, the rate of oneDNN's bf16 1x1 convolutions). The weight is packed per chunk
 * of CW outputs as pairs of inputs ([chunk][k / 2][CW][2] bf16: a 512-bit load is 16 outputs' pair), the tile
 * broadcasts a pair of a pixel's inputs as one 32-bit word; K even. The sums are float32 and stay so into the norm
 * (oneDNN's bf16 convolution rounds them to bf16 first); the norm's output (PolyMLP's hidden, the operand of fc_out)
 * and the stream are rounded to bf16 once, as the unfused bf16 path rounds them. */
#if defined(__AVX512BF16__)
#define PWB_BUILT 1
#define PWB_TILE(NAME, PT, NV, TAIL)                                                                             \
    static inline __attribute__((always_inline)) void NAME(const uint16_t *x, int64_t K, const uint16_t *wc,    \
                                                           float *y, int64_t ldy) {                             \
        __m512 a[PT][NV];                                                                                       \
        __m256 t[PT];                                                                                           \
        _Pragma("GCC unroll 8")                                                                                 \
        for (int p = 0; p < PT; ++p) {                                                                          \
            _Pragma("GCC unroll 4")                                                                             \
            for (int v = 0; v < NV; ++v) a[p][v] = _mm512_setzero_ps();                                         \
            t[p] = _mm256_setzero_ps();                                                                         \
        }                                                                                                       \
        const int64_t CW = 16 * NV + TAIL;                                                                      \
        for (int64_t j = 0; j < K / 2; ++j) {                                                                   \
            const uint16_t *wj = wc + j * 2 * CW;                                                               \
            __m512bh wv[NV];                                                                                    \
            _Pragma("GCC unroll 4")                                                                             \
            for (int v = 0; v < NV; ++v) wv[v] = (__m512bh)_mm512_loadu_si512(wj + 32 * v);                     \
            const __m256bh wt = (__m256bh)(TAIL == 8 ? _mm256_loadu_si256((const __m256i *)(wj + 32 * NV))     \
                                                     : _mm256_setzero_si256());                                 \
            _Pragma("GCC unroll 8")                                                                             \
            for (int p = 0; p < PT; ++p) {                                                                      \
                const __m512i b = word_pair(x + p * K + 2 * j);                                                 \
                _Pragma("GCC unroll 4")                                                                         \
                for (int v = 0; v < NV; ++v) a[p][v] = _mm512_dpbf16_ps(a[p][v], (__m512bh)b, wv[v]);           \
                if (TAIL == 8) t[p] = _mm256_dpbf16_ps(t[p], (__m256bh)_mm512_castsi512_si256(b), wt);          \
            }                                                                                                   \
        }                                                                                                       \
        _Pragma("GCC unroll 8")                                                                                 \
        for (int p = 0; p < PT; ++p) {                                                                          \
            _Pragma("GCC unroll 4")                                                                             \
            for (int v = 0; v < NV; ++v) _mm512_storeu_ps(y + p * ldy + 16 * v, a[p][v]);                      \
            if (TAIL == 8) _mm256_storeu_ps(y + p * ldy + 16 * NV, t[p]);                                       \
        }                                                                                                       \
    }
static inline __m512i word_pair(const uint16_t *p) {   /* a bf16 pair broadcast */
    uint32_t w;
    memcpy(&w, p, 4);
    return _mm512_set1_epi32((int)w);
}
PWB_TILE(pwb_tile72, 5, 4, 8)
PWB_TILE(pwb_tile48, 8, 3, 0)

/* One pixel tile (PT rows of x, stride K) against every chunk, the float32 sums into y (PT rows, stride ldy). */
static inline void pwb_tile_row(const uint16_t *xt, const uint16_t *wp, float *yt, int64_t K, int64_t N, int64_t CW,
                                int64_t ldy) {
    for (int64_t c = 0; c < N / CW; ++c) {
        const uint16_t *wc = wp + c * K * CW;
        if (CW == 72) pwb_tile72(xt, K, wc, yt + c * CW, ldy);
        else pwb_tile48(xt, K, wc, yt + c * CW, ldy);
    }
}

static inline const uint16_t *pwb_rows(const uint16_t *x, int64_t p0, int64_t np, int64_t PT, int64_t K,
                                       uint16_t *xpad) {
    const uint16_t *xt = x + p0 * K;
    if (np == PT) return xt;
    memset(xpad, 0, (size_t)(PT * K) * sizeof(uint16_t));
    memcpy(xpad, xt, (size_t)(np * K) * sizeof(uint16_t));
    return xpad;
}

/* y (rows x C bf16) += s (rows x C float32), rounded once */
static inline void pwb_add_rows(uint16_t *y, const float *s, int64_t rows, int64_t C) {
    const int64_t full = C & ~(int64_t)15;
    const __mmask16 kt = (__mmask16)((1u << (C - full)) - 1u);
    for (int64_t r = 0; r < rows; ++r)
        for (int64_t c = 0; c < C; c += 16) {
            const __mmask16 k = c < full ? (__mmask16)0xffff : kt;
            store_bf16(y + r * C + c, k, _mm512_add_ps(load_bf16(y + r * C + c, k), load_f32(s + r * C + c, k)));
        }
}

int polynext_pointwise_norm_bf16(const uint16_t *x, const uint16_t *wp, uint16_t *y, const float *nw, const float *nb,
                                 const uint16_t *res, int64_t P, int64_t K, int64_t N, int64_t CW, float eps,
                                 int product, int threads) {
    if (pw_refused(K, N, CW) || K % 2 != 0 || N > PWN_MAX_N || (product && N % 2 != 0)) return 1;
    const int64_t PT = pw_pixels(CW), tiles = (P + PT - 1) / PT, C = product ? N / 2 : N;
    _Pragma("omp parallel for num_threads(threads) schedule(static)")
    for (int64_t i = 0; i < tiles; ++i) {
        const int64_t p0 = i * PT, np = P - p0 < PT ? P - p0 : PT;
        uint16_t xpad[8 * PW_MAX_K];
        float buf[8 * PWN_MAX_N];
        pwb_tile_row(pwb_rows(x, p0, np, PT, K, xpad), wp, buf, K, N, CW, N);
        for (int64_t p = 0; p < np; ++p) {
            if (product)
                row_prod_f32_bf16(buf + p * N, nw, nb, NULL, y + (p0 + p) * C, C, eps, NULL);
            else
                row_f32_bf16(buf + p * N, nw, nb, res ? res + (p0 + p) * N : NULL, y + (p0 + p) * N, N, eps, NULL);
        }
    }
    return 0;
}

int polynext_poly_mlp_bf16(const uint16_t *x, const uint16_t *wp_in, const float *nw, const float *nb,
                           const uint16_t *wp_out, uint16_t *y, int64_t P, int64_t K, int64_t N, int64_t CW_in,
                           int64_t CW_out, float eps, int threads) {
    const int64_t H = N / 2;
    if (pw_refused(K, N, CW_in) || N % 2 != 0 || K % 2 != 0 || H % 2 != 0 || pw_refused(H, K, CW_out) || H > MAX_C)
        return 1;
    const int64_t PT_in = pw_pixels(CW_in), PT_out = pw_pixels(CW_out);
    const int64_t PB = PT_in == PT_out ? PT_in : PT_in * PT_out, blocks = (P + PB - 1) / PB;
    int failed = 0;
    _Pragma("omp parallel num_threads(threads) reduction(|:failed)")
    {
        /* per thread: the block's input rows (partial block), the projection's sums (PB x N and PB x K float32),
         * the hidden rows (PB x H bf16) */
        float *buf = (float *)malloc(sizeof(float) * (size_t)(PB * (N + K)) + sizeof(uint16_t) * (size_t)(PB * (K + H)));
        if (!buf) {
            failed = 1;
        } else {
            float *out = buf + PB * N;
            uint16_t *xpad = (uint16_t *)(out + PB * K), *hid = xpad + PB * K;
            _Pragma("omp for schedule(static)")
            for (int64_t i = 0; i < blocks; ++i) {
                const int64_t p0 = i * PB, np = P - p0 < PB ? P - p0 : PB;
                const uint16_t *xt = pwb_rows(x, p0, np, PB, K, xpad);
                for (int64_t t = 0; t < PB; t += PT_in) pwb_tile_row(xt + t * K, wp_in, buf + t * N, K, N, CW_in, N);
                for (int64_t p = 0; p < np; ++p)
                    row_prod_f32_bf16(buf + p * N, nw, nb, NULL, hid + p * H, H, eps, NULL);
                if (np < PB) memset(hid + np * H, 0, (size_t)((PB - np) * H) * sizeof(uint16_t));
                for (int64_t t = 0; t < PB; t += PT_out) pwb_tile_row(hid + t * H, wp_out, out + t * K, H, K, CW_out, K);
                pwb_add_rows(y + p0 * K, out, np, K);
            }
            free(buf);
        }
    }
    return failed ? 2 : 0;
}
#endif
#else
#define PW_BUILT 0
int polynext_pointwise_f32(const float *x, const float *wp, float *y, int64_t P, int64_t K, int64_t N, int64_t CW,
                           int accumulate, int threads) {
    (void)x; (void)wp; (void)y; (void)P; (void)K; (void)N; (void)CW; (void)accumulate; (void)threads;
    return 1;
}
int polynext_pointwise_norm_f32(const float *x, const float *wp, float *y, const float *nw, const float *nb,
                                const float *res, int64_t P, int64_t K, int64_t N, int64_t CW, float eps, int product,
                                int threads) {
    (void)x; (void)wp; (void)y; (void)nw; (void)nb; (void)res; (void)P; (void)K; (void)N; (void)CW; (void)eps;
    (void)product; (void)threads;
    return 1;
}
int polynext_poly_mlp_f32(const float *x, const float *wp_in, const float *nw, const float *nb, const float *wp_out,
                          float *y, int64_t P, int64_t K, int64_t N, int64_t CW_in, int64_t CW_out, float eps,
                          int threads) {
    (void)x; (void)wp_in; (void)nw; (void)nb; (void)wp_out; (void)y; (void)P; (void)K; (void)N; (void)CW_in;
    (void)CW_out; (void)eps; (void)threads;
    return 1;
}
#endif
#ifndef PWB_BUILT   /* the bf16 forms (13.) need AVX-512 BF16 */
#define PWB_BUILT 0
int polynext_pointwise_norm_bf16(const uint16_t *x, const uint16_t *wp, uint16_t *y, const float *nw, const float *nb,
                                 const uint16_t *res, int64_t P, int64_t K, int64_t N, int64_t CW, float eps,
                                 int product, int threads) {
    (void)x; (void)wp; (void)y; (void)nw; (void)nb; (void)res; (void)P; (void)K; (void)N; (void)CW; (void)eps;
    (void)product; (void)threads;
    return 1;
}
int polynext_poly_mlp_bf16(const uint16_t *x, const uint16_t *wp_in, const float *nw, const float *nb,
                           const uint16_t *wp_out, uint16_t *y, int64_t P, int64_t K, int64_t N, int64_t CW_in,
                           int64_t CW_out, float eps, int threads) {
    (void)x; (void)wp_in; (void)nw; (void)nb; (void)wp_out; (void)y; (void)P; (void)K; (void)N; (void)CW_in;
    (void)CW_out; (void)eps; (void)threads;
    return 1;
}
#endif

/* 1 where polynext_pointwise_f32, polynext_pointwise_norm_f32 and polynext_poly_mlp_f32 are built (AVX-512 or AVX2),
 * else 0. */
int polynext_pointwise_built(void) { return PW_BUILT; }
/* 1 where their bf16 forms (13.) are built (AVX-512 BF16), else 0. */
int polynext_pointwise_bf16_built(void) { return PWB_BUILT; }

/* 14. polynext_heads_dw_f32 / _bf16: a depthwise convolution (k x k, k odd up to 9, stride 1, "same" zero padding,
 * no bias) of N images of H x W pixels and C channels from one memory layout into another, into one output or two
 * with their own weights (PolyAttn's Q and K convolutions of the shared qk):
 *
 *     y[c, h, w] = sum_{i,j} wt[i k + j][c] x[c, h + i - p, w + j - p],     p = (k - 1) / 2
 *
 * A layout is four strides in elements, (image, pixel, group, group size): channel c of pixel h W + w of image n at
 * n img + (h W + w) pix + (c / gsize) grp + c % gsize. A channels-last slice (channels s .. s + C of N x H x W x Ct)
 * is (H W Ct, Ct, 0, C) from channel s's address; attention heads (N x heads x H W x d) are (heads H W d, d, H W d,
 * d). PyTorch's path writes the convolution channels-last and copies it into the heads (and the attention's output
 * back) as separate passes, and the 5x5 convolutions of oneDNN run at 15-18 GMAC/s here (polynext profile,
 * APolyNeXt-S); here a work item (an image's 16 channels) is copied once into a zero-padded float32 plane (20 KB at
 * 14 x 14) and every output row computed from it in L1, R pixels' sums in registers (pcdw_sum of 9., the taps in
 * order: float32 sums as oneDNN's), written straight into the output's layout. C and both group sizes must be
 * multiples of 16. Weights float32, tap-major (k*k x C). Returns 0; 1 where not served (a build without AVX-512 or AVX2,
 * an even k or k > 9, C or a group size not a multiple of 16); 2 if a thread's plane could not be allocated. With
 * AVX2 (9.'s vector layer) a work item is 8 channels; the contract stays multiples of 16, so that the callers'
 * checks do not depend on the CPU. */
#if PCDW_BUILT
#define HEADS_DW(NAME, T, LOAD, STORE)                                                                          \
    /* one output row from the plane's rows h .. h + k - 1 (src: each tap's first pixel), R a constant per call */  \
    PCDW_INLINE void NAME##_row(const float *const *src, const float *wt, int k, T *yr, int64_t ys, int64_t W,  \
                                int64_t Wr, int R) {                                                            \
        for (int64_t x0 = 0; x0 < Wr; x0 += R) {                                                                \
            pc_vec acc[8];                                                                                      \
            pcdw_sum(src, x0, wt, k, 1, R, acc);                                                                \
            _Pragma("GCC unroll 8")                                                                             \
            for (int r = 0; r < R; ++r)                                                                         \
                if (x0 + r < W) STORE##_full(yr + (x0 + r) * ys, PC_FULL, acc[r]);                              \
        }                                                                                                       \
    }                                                                                                           \
    int NAME(const T *x, const int64_t *xl, const float *w1, T *y1, const float *w2, T *y2, const int64_t *yl,  \
             int64_t N, int64_t H, int64_t W, int64_t C, int k, int threads) {                                 \
        (void)threads;                                                                                          \
        if (k % 2 == 0 || k < 1 || k > 9 || C % 16 || xl[3] % 16 || yl[3] % 16 || xl[3] < 16 || yl[3] < 16)    \
            return 1;                                                                                           \
        const int R = W % 7 == 0 && W % 8 != 0 ? 7 : 8, taps = k * k;                                          \
        const int64_t p = (k - 1) / 2, Wr = (W + R - 1) / R * R, Wp = Wr + 2 * p, Hp = H + 2 * p;              \
        const int64_t blocks = C / PC_VW, items = N * blocks;                                                   \
        const size_t floats = (size_t)(Hp * Wp + 2 * taps) * PC_VW;                                             \
        int failed = 0;                                                                                         \
        _Pragma("omp parallel num_threads(threads) reduction(|:failed)")                                        \
        {                                                                                                       \
            const int64_t tid = thread_id(), nt = thread_count();                                               \
            float *plane = NULL;          /* the borders stay zero: only the interior is ever written */       \
            if (posix_memalign((void **)&plane, 64, floats * sizeof(float)) == 0)                               \
                memset(plane, 0, floats * sizeof(float));                                                       \
            else                                                                                                \
                plane = NULL;                                                                                   \
            if (!plane) {                                                                                       \
                failed = 1;                                                                                     \
            } else {                                                                                            \
                float *wa = plane + Hp * Wp * PC_VW, *wb = wa + taps * PC_VW;                                   \
                for (int64_t it = items * tid / nt; it < items * (tid + 1) / nt; ++it) {                        \
                    const int64_t n = it / blocks, c0 = (it % blocks) * PC_VW;                                  \
                    const T *xs = x + n * xl[0] + (c0 / xl[3]) * xl[2] + c0 % xl[3];                            \
                    const int64_t yo = n * yl[0] + (c0 / yl[3]) * yl[2] + c0 % yl[3];                           \
                    for (int t = 0; t < taps; ++t) {                                                            \
                        PC_STORE(wa + PC_VW * t, PC_LOADU(w1 + (int64_t)t * C + c0));                           \
                        if (y2) PC_STORE(wb + PC_VW * t, PC_LOADU(w2 + (int64_t)t * C + c0));                   \
                    }                                                                                           \
                    for (int64_t h = 0; h < H; ++h) {                                                           \
                        float *row = plane + ((h + p) * Wp + p) * PC_VW;                                        \
                        const T *xr = xs + h * W * xl[1];                                                       \
                        for (int64_t c = 0; c < W; ++c)                                                         \
                            PC_STORE(row + PC_VW * c, LOAD##_full(xr + c * xl[1], PC_FULL));                    \
                    }                                                                                           \
                    for (int out = 0; out < (y2 ? 2 : 1); ++out) {                                              \
                        const float *wt = out ? wb : wa;                                                        \
                        T *yb = (out ? y2 : y1) + yo;                                                           \
                        for (int64_t h = 0; h < H; ++h) {                                                       \
                            const float *src[81];                                                               \
                            for (int i = 0; i < k; ++i)                                                         \
                                for (int j = 0; j < k; ++j) src[i * k + j] = plane + ((h + i) * Wp + j) * PC_VW;\
                            T *yr = yb + h * W * yl[1];                                                         \
                            if (R == 7) NAME##_row(src, wt, k, yr, yl[1], W, Wr, 7);                            \
                            else NAME##_row(src, wt, k, yr, yl[1], W, Wr, 8);                                   \
                        }                                                                                       \
                    }                                                                                           \
                }                                                                                               \
                free(plane);                                                                                    \
            }                                                                                                   \
        }                                                                                                       \
        return failed ? 2 : 0;                                                                                  \
    }

HEADS_DW(polynext_heads_dw_f32, float, load_f32, store_f32)
HEADS_DW(polynext_heads_dw_bf16, uint16_t, load_bf16, store_bf16)
#define HEADS_DW_BUILT 1
#else
#define HEADS_DW_BUILT 0
int polynext_heads_dw_f32(const float *x, const int64_t *xl, const float *w1, float *y1, const float *w2, float *y2,
                          const int64_t *yl, int64_t N, int64_t H, int64_t W, int64_t C, int k, int threads) {
    (void)x; (void)xl; (void)w1; (void)y1; (void)w2; (void)y2; (void)yl; (void)N; (void)H; (void)W; (void)C; (void)k;
    (void)threads;
    return 1;
}
int polynext_heads_dw_bf16(const uint16_t *x, const int64_t *xl, const float *w1, uint16_t *y1, const float *w2,
                           uint16_t *y2, const int64_t *yl, int64_t N, int64_t H, int64_t W, int64_t C, int k,
                           int threads) {
    (void)x; (void)xl; (void)w1; (void)y1; (void)w2; (void)y2; (void)yl; (void)N; (void)H; (void)W; (void)C; (void)k;
    (void)threads;
    return 1;
}
#endif

/* 1 where polynext_heads_dw_* is built (AVX-512 or AVX2), else 0. */
int polynext_heads_dw_built(void) { return HEADS_DW_BUILT; }

/* 10.'s packing: the width of the columns a chunk of the packed weight is split into ([chunk][column][k][width]), or
 * 0: one column, the chunk ([chunk][k][CW]). (At the end of the file: the other builds' code stays where it was.) */
#ifndef PW_COLS
#define PW_COLS 0
#endif
int polynext_pointwise_cols(void) { return PW_COLS; }
