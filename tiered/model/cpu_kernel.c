/* CPU experts for one token: out = sum_j w_j * down_j(act(gate_j x, up_j x)), reading the stored expert
 * blocks in place (fp32, bf16, fp16, q8, q4 as laid out by tiered/layout/quant.py), fp32 accumulation,
 * threads (OpenMP) over output rows. Compiled on first use by tiered/model/cpu_kernel.py with
 * `cc -O3 -march=native -fopenmp -shared -fPIC`; the vector paths are AVX-512F, AVX2+FMA, or portable C.
 *
 * Rounding (`rnd`: 0 none = fp32 compute, 1 bf16, 2 fp16), as the torch reference does it (model/cpu_experts.py):
 * each product's output is rounded once to the compute dtype, the activation is fp32 and its output is rounded
 * (the down product reads the compute dtype), the weighted sum over jobs is fp32 in job order, rounded once.
 * Quantized weights are used as q*s (+ m) in fp32 (the reference dequantizes in fp32 too).
 *
 * Legend: D hidden, F expert FFN, n jobs (experts on the CPU), G inputs per quantization group.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_F16 = 2, FMT_Q8 = 3, FMT_Q4 = 4 };
enum { RND_NONE = 0, RND_BF16 = 1, RND_F16 = 2 };

/* Per job, the parts of gate, up, down (pointers as integers, 0 where a part is absent), in this order. */
enum { P_Q = 0, P_S = 1, P_M = 2, P_PER_MAT = 3, P_PER_JOB = 9 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even, as torch */
    uint32_t u;
    memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

#if defined(__FLT16_MAX__)
#define HAVE_F16 1
static inline float f16_to_f32(uint16_t h) { _Float16 v; memcpy(&v, &h, 2); return (float)v; }
static inline uint16_t f32_to_f16(float f) { _Float16 v = (_Float16)f; uint16_t h; memcpy(&h, &v, 2); return h; }
#else
#define HAVE_F16 0
static inline float f16_to_f32(uint16_t h) { (void)h; return NAN; }
static inline uint16_t f32_to_f16(float f) { (void)f; return 0; }
#endif

static inline float rnd(float v, int mode) {
    if (mode == RND_BF16) return bf16_to_f32(f32_to_bf16(v));
    if (mode == RND_F16) return f16_to_f32(f32_to_f16(v));
    return v;
}

#if defined(__AVX512F__)
static inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
#endif
#if defined(__AVX2__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ---- dense rows: dot(w[0:K], x[0:K]), x fp32 ---- */
static float dot_f32(const float *w, const float *x, int K) {
    int i = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; i + 64 <= K; i += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= K; i += 16) a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + i), _mm512_loadu_ps(x + i), a0);
    s = hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= K; i += 32) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= K; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w + i), _mm256_loadu_ps(x + i), a0);
    s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < K; i++) s += w[i] * x[i];
    return s;
}

#if defined(__AVX512F__)
static inline __m512 ld16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
#endif
#if defined(__AVX2__)
static inline __m256 ld8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
#endif

static float dot_bf16(const uint16_t *w, const float *x, int K) {
    int i = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    for (; i + 64 <= K; i += 64) {
        a0 = _mm512_fmadd_ps(ld16_bf16(w + i), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(ld16_bf16(w + i + 16), _mm512_loadu_ps(x + i + 16), a1);
        a2 = _mm512_fmadd_ps(ld16_bf16(w + i + 32), _mm512_loadu_ps(x + i + 32), a2);
        a3 = _mm512_fmadd_ps(ld16_bf16(w + i + 48), _mm512_loadu_ps(x + i + 48), a3);
    }
    for (; i + 16 <= K; i += 16) a0 = _mm512_fmadd_ps(ld16_bf16(w + i), _mm512_loadu_ps(x + i), a0);
    s = hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (; i + 32 <= K; i += 32) {
        a0 = _mm256_fmadd_ps(ld8_bf16(w + i), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(ld8_bf16(w + i + 8), _mm256_loadu_ps(x + i + 8), a1);
        a2 = _mm256_fmadd_ps(ld8_bf16(w + i + 16), _mm256_loadu_ps(x + i + 16), a2);
        a3 = _mm256_fmadd_ps(ld8_bf16(w + i + 24), _mm256_loadu_ps(x + i + 24), a3);
    }
    for (; i + 8 <= K; i += 8) a0 = _mm256_fmadd_ps(ld8_bf16(w + i), _mm256_loadu_ps(x + i), a0);
    s = hsum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < K; i++) s += bf16_to_f32(w[i]) * x[i];
    return s;
}

static float dot_f16(const uint16_t *w, const float *x, int K) {
    int i = 0;
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
    for (; i + 32 <= K; i += 32) {
        a0 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i))), _mm512_loadu_ps(x + i), a0);
        a1 = _mm512_fmadd_ps(_mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(w + i + 16))), _mm512_loadu_ps(x + i + 16), a1);
    }
    s = hsum(_mm512_add_ps(a0, a1));
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    for (; i + 16 <= K; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i))), _mm256_loadu_ps(x + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(w + i + 8))), _mm256_loadu_ps(x + i + 8), a1);
    }
    s = hsum8(_mm256_add_ps(a0, a1));
#endif
    for (; i < K; i++) s += f16_to_f32(w[i]) * x[i];
    return s;
}

/* ---- q8: int8 codes [K], one bf16 scale per G inputs: sum_g s_g * sum_{i in g} q_i x_i. The vector paths
 * keep per-lane sums: each group's lanes are scaled into the accumulators (no horizontal sum per group). ---- */
static float dot_q8(const int8_t *q, const uint16_t *sc, const float *x, int K, int G) {
    float s = 0.f;
#if defined(__AVX512F__)
    __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
#elif defined(__AVX2__) && defined(__FMA__)
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
#endif
    for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        const int n = K - g0 < G ? K - g0 : G;
        const int8_t *qq = q + g0;
        const float *xx = x + g0;
        const float sg = bf16_to_f32(sc[gi]);
        int i = 0;
        float t = 0.f;
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (; i + 32 <= n; i += 32) {
            __m512 w0 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qq + i))));
            __m512 w1 = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qq + i + 16))));
            a0 = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xx + i), a0);
            a1 = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xx + i + 16), a1);
        }
        for (; i + 16 <= n; i += 16)
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(qq + i)))),
                                 _mm512_loadu_ps(xx + i), a0);
        const __m512 sv = _mm512_set1_ps(sg);
        c0 = _mm512_fmadd_ps(a0, sv, c0);
        c1 = _mm512_fmadd_ps(a1, sv, c1);
#elif defined(__AVX2__) && defined(__FMA__)
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            __m256 w0 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qq + i))));
            __m256 w1 = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(qq + i + 8))));
            a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xx + i), a0);
            a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xx + i + 8), a1);
        }
        const __m256 sv = _mm256_set1_ps(sg);
        c0 = _mm256_fmadd_ps(a0, sv, c0);
        c1 = _mm256_fmadd_ps(a1, sv, c1);
#endif
        for (; i < n; i++) t += (float)qq[i] * xx[i];
        s += sg * t;
    }
#if defined(__AVX512F__)
    s += hsum(_mm512_add_ps(c0, c1));
#elif defined(__AVX2__) && defined(__FMA__)
    s += hsum8(_mm256_add_ps(c0, c1));
#endif
    return s;
}

/* ---- q4: two codes per byte (input 2i low nibble), bf16 scale and min per G inputs:
 * sum_g s_g * sum q_i x_i + m_g * sum x_i. Vector path: xp holds x deinterleaved per 32 inputs (the even inputs
 * of a 32-block, then the odd ones), xs[g] the sum of x over group g. ---- */
static float dot_q4(const uint8_t *q, const uint16_t *sc, const uint16_t *mn, const float *x, const float *xp,
                    const float *xs, int K, int G) {
    float s = 0.f;
#if defined(__AVX512F__)
    const __m512i lo4 = _mm512_set1_epi32(0xf);
    __m512 c0 = _mm512_setzero_ps(), c1 = _mm512_setzero_ps();
#elif defined(__AVX2__) && defined(__FMA__)
    const __m256i lo4 = _mm256_set1_epi32(0xf);
    __m256 c0 = _mm256_setzero_ps(), c1 = _mm256_setzero_ps();
#else
    (void)xp;
#endif
    for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        const int n = K - g0 < G ? K - g0 : G;
        const float sg = bf16_to_f32(sc[gi]);
        int i = 0; /* inputs done in this group; vector blocks start at multiples of 32 (G is 64 or K) */
        float t = 0.f;
#if defined(__AVX512F__)
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (; i + 32 <= n; i += 32) {
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(q + (g0 + i) / 2)));
            a0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_and_si512(b, lo4)), _mm512_loadu_ps(xp + g0 + i), a0);
            a1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4)), _mm512_loadu_ps(xp + g0 + i + 16), a1);
        }
        const __m512 sv = _mm512_set1_ps(sg);
        c0 = _mm512_fmadd_ps(a0, sv, c0);
        c1 = _mm512_fmadd_ps(a1, sv, c1);
#elif defined(__AVX2__) && defined(__FMA__)
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        for (; i + 32 <= n; i += 32) {
            const uint8_t *qb = q + (g0 + i) / 2;
            __m256i b0 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)qb));
            __m256i b1 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(qb + 8)));
            const float *xe = xp + g0 + i;
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b0, lo4)), _mm256_loadu_ps(xe), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_and_si256(b1, lo4)), _mm256_loadu_ps(xe + 8), a1);
            a0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b0, 4)), _mm256_loadu_ps(xe + 16), a0);
            a1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(b1, 4)), _mm256_loadu_ps(xe + 24), a1);
        }
        const __m256 sv = _mm256_set1_ps(sg);
        c0 = _mm256_fmadd_ps(a0, sv, c0);
        c1 = _mm256_fmadd_ps(a1, sv, c1);
#endif
        for (; i < n; i++) {
            const int k = g0 + i;
            const uint8_t b = q[k >> 1];
            t += (float)((k & 1) ? (b >> 4) : (b & 0xf)) * x[k];
        }
        s += sg * t + bf16_to_f32(mn[gi]) * xs[gi];
    }
#if defined(__AVX512F__)
    s += hsum(_mm512_add_ps(c0, c1));
#elif defined(__AVX2__) && defined(__FMA__)
    s += hsum8(_mm256_add_ps(c0, c1));
#endif
    return s;
}

/* The per-call inputs that the q4 path needs in its own layout. */
typedef struct {
    const float *x;   /* [K] */
    const float *xp;  /* [K] deinterleaved per 32 (q4) */
    const float *xs;  /* [ceil(K/G)] group sums (q4) */
} vec_t;

static void prep_vec(const float *x, int K, int G, float *xp, float *xs) {
    for (int c = 0; c + 32 <= K; c += 32)
        for (int i = 0; i < 16; i++) {
            xp[c + i] = x[c + 2 * i];
            xp[c + 16 + i] = x[c + 2 * i + 1];
        }
    for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        float t = 0.f;
        for (int i = g0; i < K && i < g0 + G; i++) t += x[i];
        xs[gi] = t;
    }
}

/* Row r of one matrix [N, K] in format fmt, dotted with v. ps = the matrix's parts; rowb = bytes per code row;
 * ng = groups per row. */
static inline float row_dot(int fmt, const uintptr_t *ps, long r, int K, int G, long ng, const vec_t *v) {
    switch (fmt) {
    case FMT_F32: return dot_f32((const float *)ps[P_Q] + r * K, v->x, K);
    case FMT_BF16: return dot_bf16((const uint16_t *)ps[P_Q] + r * K, v->x, K);
    case FMT_F16: return dot_f16((const uint16_t *)ps[P_Q] + r * K, v->x, K);
    case FMT_Q8: return dot_q8((const int8_t *)ps[P_Q] + r * K, (const uint16_t *)ps[P_S] + r * ng, v->x, K, G);
    default:
        return dot_q4((const uint8_t *)ps[P_Q] + r * ((K + 1) / 2), (const uint16_t *)ps[P_S] + r * ng,
                      (const uint16_t *)ps[P_M] + r * ng, v->x, v->xp, v->xs, K, G);
    }
}

static inline float load_x(const void *p, int dt, int i) {
    if (dt == RND_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    if (dt == RND_F16) return f16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

static inline float silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

/* What this build supports: bit f set for each format f above, bit 8 when fp16 compute/storage works. */
int tiered_cpu_caps(void) {
    return (1 << FMT_F32) | (1 << FMT_BF16) | (HAVE_F16 << FMT_F16) | (1 << FMT_Q8) | (1 << FMT_Q4) | (HAVE_F16 << 8);
}

/* Which vector path this build uses: 512 (AVX-512F), 256 (AVX2+FMA) or 0 (portable C). */
int tiered_cpu_simd(void) {
#if defined(__AVX512F__)
    return 512;
#elif defined(__AVX2__) && defined(__FMA__)
    return 256;
#else
    return 0;
#endif
}

/* One token's CPU experts.
 *   fmt     weight format (FMT_*), shared by every job; parts[n * 9]: per job gate (q, scale, min), up (...),
 *           down (...) base addresses of that expert's matrices (0 where a part is absent)
 *   wts[n]  routing weights (fp32, already rounded as the caller wants)
 *   D, F    hidden and FFN sizes; Gi / Gf the quantization group along D (gate, up) and along F (down)
 *   x[D]    the token (dtype `rnd`: fp32, bf16 or fp16), out[D] the result in the same dtype
 *   rnd     compute dtype rounding (RND_*); threads > 0 the OpenMP threads
 * Returns 0, or -1 when the format or dtype is not supported by this build, -2 when out of memory. */
int tiered_cpu_experts(int fmt, int n, const uintptr_t *parts, const float *wts, int D, int F, int Gi, int Gf,
                       const void *x, void *out, int rnd_mode, int threads) {
    if (fmt < FMT_F32 || fmt > FMT_Q4 || !(tiered_cpu_caps() >> fmt & 1)) return -1;
    if (rnd_mode == RND_F16 && !HAVE_F16) return -1;
    if (n <= 0) {
        for (int d = 0; d < D; d++) {
            if (rnd_mode == RND_NONE) ((float *)out)[d] = 0.f;
            else ((uint16_t *)out)[d] = 0;
        }
        return 0;
    }
    const long ngi = (D + Gi - 1) / Gi, ngf = (F + Gf - 1) / Gf;
    /* scratch: x fp32, its q4 forms, h fp32 [n, F] and h's q4 forms per job */
    const size_t nfl = (size_t)2 * D + ngi + (size_t)n * (2 * F + ngf) + (size_t)D;
    float *buf = (float *)malloc(nfl * sizeof(float));
    if (!buf) return -2;
    float *xf = buf, *xp = xf + D, *xs = xp + D, *h = xs + ngi, *hp = h + (size_t)n * F, *hs = hp + (size_t)n * F;
    float *acc = hs + (size_t)n * ngf;
    for (int d = 0; d < D; d++) xf[d] = load_x(x, rnd_mode, d);
    if (fmt == FMT_Q4) prep_vec(xf, D, Gi, xp, xs);
    const vec_t vx = {xf, xp, xs};
    const long rows1 = (long)n * F;
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
#endif
    {
        int nt = 1, t = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        t = omp_get_thread_num();
#endif
        /* phase 1: gate and up rows of every job, a contiguous slice of the (job, row) space per thread */
        {
            const long r0 = rows1 * t / nt, r1 = rows1 * (t + 1) / nt;
            for (long r = r0; r < r1; r++) {
                const int j = (int)(r / F);
                const long f = r % F;
                const uintptr_t *pj = parts + (size_t)j * P_PER_JOB;
                float g = rnd(row_dot(fmt, pj, f, D, Gi, ngi, &vx), rnd_mode);
                float u = rnd(row_dot(fmt, pj + P_PER_MAT, f, D, Gi, ngi, &vx), rnd_mode);
                h[r] = rnd(silu_mul(g, u), rnd_mode);
            }
        }
#ifdef _OPENMP
#pragma omp barrier
#endif
        if (fmt == FMT_Q4) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (int j = 0; j < n; j++) prep_vec(h + (size_t)j * F, F, Gf, hp + (size_t)j * F, hs + (size_t)j * ngf);
        }
        /* phase 2: rows of down, a contiguous slice of D per thread, jobs in order (the sum's order) */
        {
            const int d0 = (int)((long)D * t / nt), d1 = (int)((long)D * (t + 1) / nt);
            for (int d = d0; d < d1; d++) acc[d] = 0.f;
            for (int j = 0; j < n; j++) {
                const uintptr_t *pj = parts + (size_t)j * P_PER_JOB + 2 * P_PER_MAT;
                const vec_t vh = {h + (size_t)j * F, hp + (size_t)j * F, hs + (size_t)j * ngf};
                const float wj = wts[j];
                for (int d = d0; d < d1; d++) acc[d] += wj * rnd(row_dot(fmt, pj, d, F, Gf, ngf, &vh), rnd_mode);
            }
            for (int d = d0; d < d1; d++) {
                if (rnd_mode == RND_NONE) ((float *)out)[d] = acc[d];
                else if (rnd_mode == RND_BF16) ((uint16_t *)out)[d] = f32_to_bf16(acc[d]);
                else ((uint16_t *)out)[d] = f32_to_f16(acc[d]);
            }
        }
    }
    free(buf);
    return 0;
}
