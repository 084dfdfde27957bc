/* CPU experts for one token: out = sum_j w_j * down_j(act(gate_j x, up_j x)), reading the stored expert
 * blocks in place (fp32, bf16, fp16, q8, q4 as laid out by tiered/layout/quant.py), fp32 accumulation,
 * threads (OpenMP) over output rows. Compiled on first use by tiered/kernels/cpu_kernel.py with
 * `cc -O3 -march=native -fopenmp -shared -fPIC`; the vector paths are AVX-512F, AVX2+FMA+F16C, or portable C,
 * and q4 computed in bf16 uses AVX512-BF16's dot products where the CPU has them.
 *
 * Rounding (`rnd`: 0 none = fp32 compute, 1 bf16, 2 fp16), as the torch reference does it (model/cpu_experts.py):
 * each product's output is rounded once to the compute dtype, the activation is fp32 and its output is rounded
 * (the down product reads the compute dtype), the weighted sum over jobs is fp32 in job order, rounded once.
 * Quantized weights are used as q*s (+ m) in fp32 (the reference dequantizes in fp32 too).
 *
 * Legend: D hidden, F expert FFN, n jobs (experts on the CPU), G inputs per quantization group.
 */
#define _GNU_SOURCE /* sched_setaffinity, CPU_SET: the mailbox team's pinning */
#include <math.h>
#include <sched.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif

enum { FMT_F32 = 0, FMT_BF16 = 1, FMT_F16 = 2, FMT_Q8 = 3, FMT_Q4 = 4 };
enum { RND_NONE = 0, RND_BF16 = 1, RND_F16 = 2 };
/* rnd_mode's bit 2 (every entry point): q4 rows take their inputs rounded to 8 bits, per group of the weights'
 * quantization (d = max |x| / 127, x -> round(x / d) * d, ties to even): the opt-in `TIERED_CPU_ACT=q8` mode of
 * cpu_kernel.py, whose full groups of 64 then take integer dot products (the products and their sums exact; the
 * group's scales applied to the sum). Other formats ignore it. */
enum { ACT_Q8 = 4, RND_MASK = 3 };

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

/* ---- one vector abstraction for the three builds: VW fp32 lanes ---- */
#define ALWAYS_INLINE static inline __attribute__((always_inline))
/* loops over the R rows of a call, fully unrolled so that their accumulators stay in registers */
#define FOR_R(r) _Pragma("GCC unroll 4") for (int r = 0; r < R; r++)
#if defined(__AVX512F__)
#define VW 16
#define RMAX 4
typedef __m512 vf;
typedef __m512i vi;
#define VZERO() _mm512_setzero_ps()
#define VLD(p) _mm512_loadu_ps(p)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VSET1(s) _mm512_set1_ps(s)
#define VHSUM(v) _mm512_reduce_add_ps(v)
#define VLD_BF16(p) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p))), 16))
#define VLD_F16(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p)))
#define VLD_I8(p) _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p))))
#define VLD_U8(p) _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(p)))
#define VLO4(b) _mm512_cvtepi32_ps(_mm512_and_si512(b, _mm512_set1_epi32(0xf)))
#define VHI4(b) _mm512_cvtepi32_ps(_mm512_srli_epi32(b, 4))
#define SIMD 512
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define VW 8
#define RMAX 4
typedef __m256 vf;
typedef __m256i vi;
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#define VZERO() _mm256_setzero_ps()
#define VLD(p) _mm256_loadu_ps(p)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VSET1(s) _mm256_set1_ps(s)
#define VHSUM(v) hsum8(v)
#define VLD_BF16(p) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(p))), 16))
#define VLD_F16(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(p)))
#define VLD_I8(p) _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(p))))
#define VLD_U8(p) _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(p)))
#define VLO4(b) _mm256_cvtepi32_ps(_mm256_and_si256(b, _mm256_set1_epi32(0xf)))
#define VHI4(b) _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))
#define SIMD 256
#else /* portable C: one lane, the same loops */
#define VW 1
#define RMAX 4
typedef float vf;
typedef int vi;
#define VZERO() 0.f
#define VLD(p) (*(p))
#define VFMA(a, b, c) ((a) * (b) + (c))
#define VADD(a, b) ((a) + (b))
#define VMUL(a, b) ((a) * (b))
#define VSET1(s) (s)
#define VHSUM(v) (v)
#define VLD_BF16(p) bf16_to_f32(*(p))
#define VLD_F16(p) f16_to_f32(*(p))
#define VLD_I8(p) ((float)*(p))
#define VLD_U8(p) ((int)*(p))
#define VLO4(b) ((float)((b) & 0xf))
#define VHI4(b) ((float)((b) >> 4))
#define SIMD 0
#endif

/* This thread's number and the team's size inside a parallel region (0 and 1 without OpenMP). */
#ifdef _OPENMP
#define TEAM_ID(t0, nt) const int t0 = omp_get_thread_num(), nt = omp_get_num_threads()
#else
#define TEAM_ID(t0, nt) const int t0 = 0, nt = 1
#endif

/* Keeps a loaded vector in a register: GCC otherwise folds each of its uses into a memory operand of an FMA,
 * which multiplies the loads of a register tile (the tiled GEMM ran at 72 GF/s here, 2 Zen 4 cores, against 180). */
#if SIMD > 0
#define IN_REG(v) __asm__("" : "+v"(v))
#else
#define IN_REG(v) ((void)0)
#endif

/* acc (8 int32) += sums of 4 adjacent products u8 x s8 (32 bytes each): VNNI's vpdpbusd where the build has it,
 * else AVX2's vpmaddubsw (q4 codes 0..15 times |x| <= 127: pairs under 3810, no saturation) and vpmaddwd. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define I8DOT 2
#define DP_U8S8(acc, u, s) _mm256_dpbusd_epi32(acc, u, s)
#elif defined(__AVXVNNI__)
#define I8DOT 2
#define DP_U8S8(acc, u, s) _mm256_dpbusd_avx_epi32(acc, u, s)
#elif defined(__AVX2__)
#define I8DOT 1
#define DP_U8S8(acc, u, s) _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)))
#else
#define I8DOT 0
#endif

/* One element / VW elements of a dense row of format fmt (a constant after inlining). */
ALWAYS_INLINE vf ldw(int fmt, const void *p, long i) {
    if (fmt == FMT_F32) return VLD((const float *)p + i);
    if (fmt == FMT_BF16) return VLD_BF16((const uint16_t *)p + i);
    if (fmt == FMT_Q8) return VLD_I8((const int8_t *)p + i); /* the code itself; the caller scales */
    return VLD_F16((const uint16_t *)p + i);
}
ALWAYS_INLINE float lds(int fmt, const void *p, long i) {
    if (fmt == FMT_F32) return ((const float *)p)[i];
    if (fmt == FMT_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    if (fmt == FMT_Q8) return (float)((const int8_t *)p)[i];
    return f16_to_f32(((const uint16_t *)p)[i]);
}

/* Software prefetch distance of the dense rows, bytes ahead of the current load (0: none). A thread's rows are
 * contiguous (gate f, f+1, ... and up f, f+1, ...), so reading ahead past a row's end fetches the next call's row.
 * Measured on the H200 box (bench_mailbox.py, 15 threads, 1/2/4 bf16 experts a post beside the GPU's gather, session
 * 13 call E): none 54/55/61 and 46/52/54 GB/s, 512 53/57/61, 1024 52/54/62, 2048 58/65/75; but end to end (call F,
 * bf16 at --vram-gb 4, two fresh processes) 2048 gave lru+cpu 492.1 / 512.5 tok/s and the worker 49-61 GB/s in the
 * step, against 515.6-520.6 and 52-58 without (call C): no gain, so none by default. */
#ifndef PF_BYTES
#define PF_BYTES 0
#endif
/* Software prefetch of q4 codes into L2: PFQ rows ahead of the row being read (0: none). A call's rows are
 * contiguous (a thread's slice of a matrix, R rows at a time; an expert's gate and up rows in step), so 4 rows
 * ahead is a later call's rows. Measured on 2 Zen 4 cores over weights that do not stay in cache (memory reads 53
 * GB/s there), GB/s at none / 4 rows into L1 / 4 rows into L2 / 8 rows into L2: a q4 GEMV 5120 x 2048 in bf16
 * 17.7 / 32.4 / 30.6 / 31.3, with x rounded to 8 bits (ACT_Q8) 19.1 / 25.9 / 47.8 / 51.5; one token's 8 q4 experts
 * of 2048 x 768 in bf16 18.6 / 24.0 / 26.9 / 28.2, ACT_Q8 22.4 / 19.9 / 28.3 / 26.2; fp32 compute (FMA-bound)
 * 13.0 / 19.2 / 18.0 / 18.3. The stream's latency, not the bandwidth, bounded the dots. Session 39, end to end with
 * the builds alternating in one process (benchmarks/ab_cpu_builds.py, the 2-layer 10.6B-width q4+q4 model;
 * ab-cpu-pfq-2026-12-05-s39.json): 16 rows ahead against 4, decode in ACT_Q8 fp32 332.1 / 286.5 tok/s (earlier
 * runs of the same comparison +2.5% to +12%; 8 rows +4.6%, 2 rows -26%, 32 rows -3%), the float mode in bf16 266.2
 * / 251.7 (fp32: equal), a 128-token prompt 915.1 / 907.9 (ACT_Q8, bf16). Hence 16. */
#ifndef PFQ
#define PFQ 16
#endif
#ifndef PFQ_HINT
#define PFQ_HINT _MM_HINT_T1
#endif
/* Bytes from a q4 row's read to its prefetch: PFQ rows of K inputs. */
static inline long pf_ahead(int K) { return (long)PFQ * ((K + 1) / 2); }
/* Software prefetch of dense rows (fp32, bf16, fp16 and q8's codes) into L2: PFD rows ahead of the row being read,
 * one line per line read (0: none); as PFQ for q4 codes. Measured on 2 cores of an Intel Xeon VM (Sapphire Rapids;
 * tools/bench_cpu_experts.py --variant, the builds alternating; one token's 8 experts of 2048 x 768 from a 3-4 GB
 * pool), GB/s at none / 4 / 8 / 16 rows: bf16 20.2 / 29.2 / 29.2 / 28.6, q8 12.6 / 23.1 / 24.5, fp32 (FMA-bound)
 * 31.9 / 34.0 / 32.7; a bf16 layout's decode in fp32 (benchmarks/ab_cpu_builds.py) 55.2 -> 74.2 tok/s. The H200
 * box's CPU (an Intel Xeon that day, 15 threads), none / 8 rows: bf16 67.6 / 79.7 GB/s (16 rows 78.2), q8 50.7 / 69.4,
 * the 397B shape's 10 bf16 experts of 4096 x 1024 78.3 / 87.4 (offload-pfd-penalty-2026-12-05-h200-s40.json). Hence 8. */
#ifndef PFD
#define PFD 8
#endif
#ifndef PFD_HINT
#define PFD_HINT _MM_HINT_T1
#endif
/* a0[r] / a1[r] += w[r][off + i] * x[i] for i below n, by vectors (x loaded once for the R rows, two vectors a
 * step); returns the first i not taken (the caller adds the rest, scalar). fmt: a float format, or q8's codes. */
ALWAYS_INLINE int fma_rows(int fmt, int R, const void *const *w, long off, const float *x, int n, vf *a0, vf *a1,
                           long ahead) {
    int i = 0;
    (void)ahead;
    for (; i + 2 * VW <= n; i += 2 * VW) {
        vf x0 = VLD(x + i), x1 = VLD(x + i + VW);
        IN_REG(x0);
        IN_REG(x1);
        FOR_R(r) {
#if PFD > 0 && SIMD > 0
            { /* the lines of this step (2 VW elements: 1 line in bf16, 2 in fp32, half of one in q8) PFD rows on */
                const char *pa = (const char *)w[r] + (off + i) * (fmt == FMT_F32 ? 4 : fmt == FMT_Q8 ? 1 : 2) + ahead;
                _mm_prefetch(pa, PFD_HINT);
                if (fmt == FMT_F32 && VW == 16) _mm_prefetch(pa + 64, PFD_HINT);
            }
#endif
#if PF_BYTES > 0 && SIMD > 0
            _mm_prefetch((const char *)w[r] + (off + i) * (fmt == FMT_F32 ? 4 : fmt == FMT_Q8 ? 1 : 2) + PF_BYTES,
                         _MM_HINT_T0);
#endif
            a0[r] = VFMA(ldw(fmt, w[r], off + i), x0, a0[r]);
            a1[r] = VFMA(ldw(fmt, w[r], off + i + VW), x1, a1[r]);
        }
    }
    for (; i + VW <= n; i += VW) {
        const vf x0 = VLD(x + i);
        FOR_R(r) a0[r] = VFMA(ldw(fmt, w[r], off + i), x0, a0[r]);
    }
    return i;
}

/* Bytes of one code row of K inputs. */
static inline long row_bytes(int fmt, int K) {
    switch (fmt) {
    case FMT_F32: return 4L * K;
    case FMT_BF16: case FMT_F16: return 2L * K;
    case FMT_Q8: return K;
    default: return (K + 1) / 2;
    }
}

/* ---- R dense rows w[r][0:K] dotted with one x (x loaded once for all R rows) ---- */
ALWAYS_INLINE void dots_dense(int fmt, int R, const void *const *w, const float *x, int K, float *out) {
    vf a0[RMAX], a1[RMAX];
    FOR_R(r) a0[r] = a1[r] = VZERO();
    const int i = fma_rows(fmt, R, w, 0, x, K, a0, a1, (long)PFD * row_bytes(fmt, K));
    FOR_R(r) {
        float s = VHSUM(VADD(a0[r], a1[r]));
        for (int k = i; k < K; k++) s += lds(fmt, w[r], k) * x[k];
        out[r] = s;
    }
}

/* ---- q8: int8 codes [K], one bf16 scale per G inputs: sum_g s_g * sum_{i in g} q_i x_i. Each group's lane
 * sums are scaled into per-lane accumulators (one horizontal sum per row, not per group). ---- */
ALWAYS_INLINE void dots_q8(int R, const void *const *q, const uint16_t *const *sc, const float *x, int K, int G,
                           float *out) {
    vf c[RMAX];
    float s[RMAX];
    FOR_R(r) { c[r] = VZERO(); s[r] = 0.f; }
    for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        const int n = K - g0 < G ? K - g0 : G;
        vf t0[RMAX], t1[RMAX];
        FOR_R(r) t0[r] = t1[r] = VZERO();
        const int i = fma_rows(FMT_Q8, R, q, g0, x + g0, n, t0, t1, (long)PFD * K);
        FOR_R(r) {
            const float sg = bf16_to_f32(sc[r][gi]);
            c[r] = VFMA(VADD(t0[r], t1[r]), VSET1(sg), c[r]);
            float tt = 0.f;
            for (int k = i; k < n; k++) tt += lds(FMT_Q8, q[r], g0 + k) * x[g0 + k];
            s[r] += sg * tt;
        }
    }
    FOR_R(r) out[r] = s[r] + VHSUM(c[r]);
}

/* ---- q4: two codes per byte (input 2i in the low nibble), bf16 scale and min per G inputs:
 * sum_g s_g * sum q_i x_i + m_g * sum_{i in g} x_i. xp holds x deinterleaved per 32 inputs (the 16 even
 * inputs of a block, then the 16 odd ones), so a byte's low and high nibbles meet their inputs lane by lane;
 * xs[g] is the sum of x over group g. Blocks of 32 start at multiples of 32 (G is 64, or K when K < 64). ---- */
ALWAYS_INLINE void dots_q4(int R, const void *const *qv, const uint16_t *const *sc, const uint16_t *const *mn,
                           const float *x, const float *xp, const float *xs, int K, int G, int ng, float *out) {
    const uint8_t *q[RMAX];
    vf c[RMAX];
    float s[RMAX];
    FOR_R(r) { q[r] = (const uint8_t *)qv[r]; c[r] = VZERO(); s[r] = 0.f; }
    for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        const int n = K - g0 < G ? K - g0 : G;
        vf t0[RMAX], t1[RMAX];
        FOR_R(r) t0[r] = t1[r] = VZERO();
#if PFQ > 0 && SIMD > 0
        FOR_R(r) _mm_prefetch((const char *)q[r] + g0 / 2 + pf_ahead(K), PFQ_HINT);
#endif
        int i = 0;
        for (; i + 32 <= n; i += 32) {
            for (int h = 0; h < 16; h += VW) {
                vf xe = VLD(xp + g0 + i + h), xo = VLD(xp + g0 + i + 16 + h);
                IN_REG(xe);
                IN_REG(xo);
                FOR_R(r) {
                    const vi b = VLD_U8(q[r] + (g0 + i) / 2 + h);
                    t0[r] = VFMA(VLO4(b), xe, t0[r]);
                    t1[r] = VFMA(VHI4(b), xo, t1[r]);
                }
            }
        }
        FOR_R(r) {
            const float sg = bf16_to_f32(sc[r][gi]);
            c[r] = VFMA(VADD(t0[r], t1[r]), VSET1(sg), c[r]);
            float tt = 0.f;
            for (int k = g0 + i; k < g0 + n; k++) {
                const uint8_t b = q[r][k >> 1];
                tt += (float)((k & 1) ? (b >> 4) : (b & 0xf)) * x[k];
            }
            s[r] += sg * tt + bf16_to_f32(mn[r][gi]) * xs[gi];
        }
    }
    (void)ng;
    FOR_R(r) out[r] = s[r] + VHSUM(c[r]);
}

/* The per-call inputs that the q4 path needs in its own layout. */
typedef struct {
    const float *x;     /* [K] */
    const float *xp;    /* [K] deinterleaved per 32 (q4) */
    const float *xs;    /* [ceil(K/G)] group sums (q4) */
    const uint16_t *xb; /* q4 in bf16 on AVX512-BF16, else NULL: per full group of 64, its 32 even inputs then its
                         * 32 odd ones as bf16 (exact: x is bf16 then) */
    const int8_t *xq;   /* ACT_Q8 with groups of 64, else NULL: x's 8-bit codes, per group its 32 even inputs then
                         * its 32 odd ones (a byte's low and high nibbles meet them lane by lane) */
    const float *xd;    /* ACT_Q8: per group the codes' scale d */
} vec_t;

/* ACT_Q8: x rounded in place to 8 bits per group of G (d = max |x| / 127, code round(x / d) in [-127, 127], ties
 * to even; x becomes code * d), xd[g] = d, and with G 64 the codes of the full groups in vec_t.xq's order. */
static void act_q8(float *x, int K, int G, int8_t *xq, float *xd) {
    for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
        const int end = K - g0 < G ? K : g0 + G, full = G == 64 && end - g0 == 64;
#if defined(__AVX2__)
        if (full) { /* the same arithmetic by 8 lanes: max |x|, the division, round to nearest even, the clamp */
            const __m256 sign = _mm256_set1_ps(-0.f);
            __m256 m = _mm256_setzero_ps();
            for (int i = 0; i < 64; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + g0 + i)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float d = _mm_cvtss_f32(h) / 127.f;
            xd[gi] = d;
            const __m256 dv = _mm256_set1_ps(d), lo = _mm256_set1_ps(-127.f), hi = _mm256_set1_ps(127.f);
            int32_t c[64];
            for (int i = 0; i < 64; i += 8) {
                __m256 v = _mm256_setzero_ps();
                if (d > 0.f)
                    v = _mm256_min_ps(_mm256_max_ps(_mm256_round_ps(_mm256_div_ps(_mm256_loadu_ps(x + g0 + i), dv),
                                                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                                    lo), hi);
                _mm256_storeu_ps(x + g0 + i, _mm256_mul_ps(v, dv));
                _mm256_storeu_si256((__m256i *)(c + i), _mm256_cvtps_epi32(v));
            }
            for (int j = 0; j < 32; j++) {
                xq[g0 + j] = (int8_t)c[2 * j];
                xq[g0 + 32 + j] = (int8_t)c[2 * j + 1];
            }
            continue;
        }
#endif
        float a = 0.f;
        for (int i = g0; i < end; i++) a = fmaxf(a, fabsf(x[i]));
        const float d = a / 127.f;
        xd[gi] = d;
        for (int i = g0; i < end; i++) {
            const float c = d > 0.f ? fminf(fmaxf(nearbyintf(x[i] / d), -127.f), 127.f) : 0.f;
            x[i] = c * d;
            if (full) xq[g0 + ((i - g0) & 1) * 32 + (i - g0) / 2] = (int8_t)c;
        }
    }
}

/* x's q4 forms (xq, xd non-NULL: ACT_Q8's rounding first, x changed in place). */
static void prep_vec(float *x, int K, int G, float *xp, float *xs, uint16_t *xb, int8_t *xq, float *xd) {
    if (xq) act_q8(x, K, G, xq, xd);
    if (xb)
        for (int g0 = 0; g0 + 64 <= K; g0 += 64)
            for (int k = 0; k < 32; k++) {
                xb[g0 + k] = f32_to_bf16(x[g0 + 2 * k]);
                xb[g0 + 32 + k] = f32_to_bf16(x[g0 + 2 * k + 1]);
            }
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

/* A q4 row's short last group (when K is not a multiple of 64: inputs 64 * (K / 64) on), scalar over x as given:
 * s_g * sum c x + m_g * sum x; 0 when there is none. */
static inline float q4_short_group(const uint8_t *q, const uint16_t *sc, const uint16_t *mn, const vec_t *v, int K) {
    const int full = K / 64;
    if (full * 64 == K) return 0.f;
    float t = 0.f;
    for (int k = full * 64; k < K; k++) t += (float)((k & 1) ? (q[k >> 1] >> 4) : (q[k >> 1] & 0xf)) * v->x[k];
    return bf16_to_f32(sc[full]) * t + bf16_to_f32(mn[full]) * v->xs[full];
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
#define HAVE_BFDP 1
/* q4 with bf16 compute on AVX512-BF16: a code c becomes the bf16 128 + c (0x4300 | c: exact), and vdpbf16ps
 * multiplies 32 of them by bf16 inputs per instruction (exact products, fp32 sums). A full group of 64 then
 * gives t_g = 128 sum_g x + sum_g c x, so the row is sum_g s_g t_g + (m_g - 128 s_g) sum_g x. Groups shorter
 * than 64 (the row's last, when K is not a multiple of 64) take the scalar loop. */
ALWAYS_INLINE void dots_q4bf(int R, const void *const *qv, const uint16_t *const *sc, const uint16_t *const *mn,
                             const vec_t *v, int K, float *out) {
    const uint8_t *q[RMAX];
    __m512 c[RMAX];
    float s[RMAX];
    const int full = K / 64;
    const __m512i lo4 = _mm512_set1_epi16(0x000f), magic = _mm512_set1_epi16(0x4300);
    FOR_R(r) { q[r] = (const uint8_t *)qv[r]; c[r] = _mm512_setzero_ps(); s[r] = 0.f; }
    for (int gi = 0; gi < full; gi++) {
        const __m512bh xe = (__m512bh)_mm512_loadu_si512((const void *)(v->xb + gi * 64));
        const __m512bh xo = (__m512bh)_mm512_loadu_si512((const void *)(v->xb + gi * 64 + 32));
        const float xg = v->xs[gi];
        FOR_R(r) {
#if PFQ > 0
            _mm_prefetch((const char *)q[r] + gi * 32 + pf_ahead(K), PFQ_HINT);
#endif
            const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)(q[r] + gi * 32)));
            const __m512i wl = _mm512_or_si512(_mm512_and_si512(w, lo4), magic);
            const __m512i wh = _mm512_or_si512(_mm512_srli_epi16(w, 4), magic);
            __m512 t = _mm512_dpbf16_ps(_mm512_setzero_ps(), (__m512bh)wl, xe);
            t = _mm512_dpbf16_ps(t, (__m512bh)wh, xo);
            const float sg = bf16_to_f32(sc[r][gi]);
            c[r] = _mm512_fmadd_ps(t, _mm512_set1_ps(sg), c[r]);
            s[r] += (bf16_to_f32(mn[r][gi]) - 128.f * sg) * xg; /* scalar ports, beside the vector work */
        }
    }
    FOR_R(r) {
        s[r] += q4_short_group(q[r], sc[r], mn[r], v, K);
        out[r] = _mm512_reduce_add_ps(c[r]) + s[r];
    }
}
#else
#define HAVE_BFDP 0
#endif

#if I8DOT
/* Groups g and g + 1 of R q4 rows against ACT_Q8's codes: o[r] = hadd(t_g, t_g+1) of their 8 lanes of integer
 * sums each (x's codes loaded once for the R rows). */
ALWAYS_INLINE void q4i8_pair(int R, const uint8_t *const *q, const int8_t *xq, int g, long ahead, __m256i *o) {
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    const __m256i *xv = (const __m256i *)(xq + g * 64);
    __m256i xe0 = _mm256_loadu_si256(xv), xo0 = _mm256_loadu_si256(xv + 1);
    __m256i xe1 = _mm256_loadu_si256(xv + 2), xo1 = _mm256_loadu_si256(xv + 3);
    IN_REG(xe0);
    IN_REG(xo0);
    IN_REG(xe1);
    IN_REG(xo1);
    FOR_R(r) {
#if PFQ > 0
        _mm_prefetch((const char *)q[r] + g * 32 + ahead, PFQ_HINT);
#endif
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(q[r] + g * 32));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(q[r] + g * 32 + 32));
        const __m256i t0 = DP_U8S8(DP_U8S8(_mm256_setzero_si256(), _mm256_and_si256(w0, lo4), xe0),
                                   _mm256_and_si256(_mm256_srli_epi16(w0, 4), lo4), xo0);
        const __m256i t1 = DP_U8S8(DP_U8S8(_mm256_setzero_si256(), _mm256_and_si256(w1, lo4), xe1),
                                   _mm256_and_si256(_mm256_srli_epi16(w1, 4), lo4), xo1);
        o[r] = _mm256_hadd_epi32(t0, t1);
    }
}

/* 8 bf16 values -> fp32 */
ALWAYS_INLINE __m256 ld8_bf16(const uint16_t *p) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}
/* 4 bf16 values -> fp32 */
ALWAYS_INLINE __m128 ld4_bf16(const uint16_t *p) {
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i *)p)), 16));
}
#endif

/* q4 with ACT_Q8 (groups of 64): per full group, t_g = sum c x_code exactly in integers (32 bytes of codes against
 * 32 even and 32 odd input codes, vec_t.xq), the row sum_g s_g d_g t_g + m_g sum_g x. Eight groups at a time, their
 * lane sums reduced to one vector of 8 group sums (hadd), scaled by 8 scales times 8 d at once; the groups past
 * them one at a time; a short last group takes the scalar loop over the rounded x. */
ALWAYS_INLINE void dots_q4i8(int R, const void *const *qv, const uint16_t *const *sc, const uint16_t *const *mn,
                             const vec_t *v, int K, float *out) {
    const uint8_t *q[RMAX];
    float s[RMAX];
    const int full = K / 64;
#if I8DOT
    __m256 c[RMAX];
    const __m256i lo4 = _mm256_set1_epi8(0x0f);
    FOR_R(r) { q[r] = (const uint8_t *)qv[r]; c[r] = _mm256_setzero_ps(); s[r] = 0.f; }
    const long ahead = pf_ahead(K); /* PFQ rows ahead */
    int g8 = 0;
    {
        __m256 cm[RMAX];
        FOR_R(r) cm[r] = _mm256_setzero_ps();
        for (; g8 + 8 <= full; g8 += 8) {
            __m256i p0[RMAX], p1[RMAX], lo[RMAX];
            q4i8_pair(R, q, v->xq, g8, ahead, p0);
            q4i8_pair(R, q, v->xq, g8 + 2, ahead, p1);
            FOR_R(r) lo[r] = _mm256_hadd_epi32(p0[r], p1[r]); /* groups 0-3: half sums in each 128-bit lane */
            q4i8_pair(R, q, v->xq, g8 + 4, ahead, p0);
            q4i8_pair(R, q, v->xq, g8 + 6, ahead, p1);
            const __m256 dv = _mm256_loadu_ps(v->xd + g8), xv = _mm256_loadu_ps(v->xs + g8);
            FOR_R(r) {
                const __m256i hi = _mm256_hadd_epi32(p0[r], p1[r]); /* groups 4-7 */
                const __m256i t = _mm256_add_epi32(_mm256_permute2x128_si256(lo[r], hi, 0x20),
                                                   _mm256_permute2x128_si256(lo[r], hi, 0x31));
                c[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_mul_ps(ld8_bf16(sc[r] + g8), dv), c[r]);
                cm[r] = _mm256_fmadd_ps(ld8_bf16(mn[r] + g8), xv, cm[r]);
            }
        }
        FOR_R(r) c[r] = _mm256_add_ps(c[r], cm[r]);
    }
    __m128 c4[RMAX]; /* four groups at a time past the blocks of eight (a 768-input row: 8 + 4) */
    FOR_R(r) c4[r] = _mm_setzero_ps();
    for (; g8 + 4 <= full; g8 += 4) {
        __m256i p0[RMAX], p1[RMAX];
        q4i8_pair(R, q, v->xq, g8, ahead, p0);
        q4i8_pair(R, q, v->xq, g8 + 2, ahead, p1);
        const __m128 dv = _mm_loadu_ps(v->xd + g8), xv = _mm_loadu_ps(v->xs + g8);
        FOR_R(r) {
            const __m256i h = _mm256_hadd_epi32(p0[r], p1[r]); /* groups 0-3, half sums in each 128-bit lane */
            const __m128i t = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
            c4[r] = _mm_fmadd_ps(_mm_cvtepi32_ps(t), _mm_mul_ps(ld4_bf16(sc[r] + g8), dv), c4[r]);
            c4[r] = _mm_fmadd_ps(ld4_bf16(mn[r] + g8), xv, c4[r]);
        }
    }
    for (int gi = g8; gi < full; gi++) {
        __m256i xe = _mm256_loadu_si256((const __m256i *)(v->xq + gi * 64));
        __m256i xo = _mm256_loadu_si256((const __m256i *)(v->xq + gi * 64 + 32));
        IN_REG(xe);
        IN_REG(xo);
        const float dg = v->xd[gi], xg = v->xs[gi];
        FOR_R(r) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(q[r] + gi * 32));
            const __m256i wl = _mm256_and_si256(w, lo4), wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), lo4);
            const __m256i t = DP_U8S8(DP_U8S8(_mm256_setzero_si256(), wl, xe), wh, xo);
            c[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(t), _mm256_set1_ps(bf16_to_f32(sc[r][gi]) * dg), c[r]);
            s[r] += bf16_to_f32(mn[r][gi]) * xg; /* scalar ports, beside the vector work */
        }
    }
#else
    FOR_R(r) { q[r] = (const uint8_t *)qv[r]; s[r] = 0.f; }
    for (int gi = 0; gi < full; gi++) {
        const int8_t *xe = v->xq + gi * 64, *xo = xe + 32;
        FOR_R(r) {
            int32_t t = 0;
            for (int j = 0; j < 32; j++) {
                const uint8_t b = q[r][gi * 32 + j];
                t += (b & 0xf) * xe[j] + (b >> 4) * xo[j];
            }
            s[r] += bf16_to_f32(sc[r][gi]) * v->xd[gi] * (float)t + bf16_to_f32(mn[r][gi]) * v->xs[gi];
        }
    }
#endif
    FOR_R(r) {
        s[r] += q4_short_group(q[r], sc[r], mn[r], v, K);
#if I8DOT
        const __m128 h = _mm_add_ps(_mm_add_ps(_mm256_castps256_ps128(c[r]), _mm256_extractf128_ps(c[r], 1)), c4[r]);
        const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
        out[r] = _mm_cvtss_f32(_mm_add_ss(h2, _mm_movehdup_ps(h2))) + s[r];
#else
        out[r] = s[r];
#endif
    }
}

ALWAYS_INLINE void dots_q4_any(int R, const void *const *q, const uint16_t *const *s, const uint16_t *const *m,
                               const vec_t *v, int K, int G, int ng, float *out) {
    if (v->xq && G == 64) { dots_q4i8(R, q, s, m, v, K, out); return; }
#if HAVE_BFDP
    if (v->xb) { dots_q4bf(R, q, s, m, v, K, out); return; }
#endif
    dots_q4(R, q, s, m, v->x, v->xp, v->xs, K, G, ng, out);
}

/* R rows, each given by its parts' addresses (q codes, s scales, m mins), dotted with v -> out[R]. */
#define DOTS(F_, R_) \
    case F_ * 8 + R_: \
        if (F_ == FMT_Q8) dots_q8(R_, q, s, v->x, K, G, out); \
        else if (F_ == FMT_Q4) dots_q4_any(R_, q, s, m, v, K, G, ng, out); \
        else dots_dense(F_, R_, q, v->x, K, out); \
        return;
static void dots(int fmt, int R, const void *const *q, const uint16_t *const *s, const uint16_t *const *m,
                 const vec_t *v, int K, int G, int ng, float *out) {
    switch (fmt * 8 + R) {
    DOTS(FMT_F32, 1) DOTS(FMT_F32, 2) DOTS(FMT_F32, 4)
    DOTS(FMT_BF16, 1) DOTS(FMT_BF16, 2) DOTS(FMT_BF16, 4)
    DOTS(FMT_F16, 1) DOTS(FMT_F16, 2) DOTS(FMT_F16, 4)
    DOTS(FMT_Q8, 1) DOTS(FMT_Q8, 2) DOTS(FMT_Q8, 4)
    DOTS(FMT_Q4, 1) DOTS(FMT_Q4, 2) DOTS(FMT_Q4, 4)
    default: FOR_R(r) out[r] = NAN;
    }
}

/* Row `row` of the matrix whose parts start at ps[P_Q..P_M] (K inputs, ng groups): its parts' addresses. */
static inline void row_parts(int fmt, const uintptr_t *ps, long row, int K, long ng, const void **q,
                             const uint16_t **s, const uint16_t **m) {
    *q = (const void *)(ps[P_Q] + row * row_bytes(fmt, K));
    *s = ps[P_S] ? (const uint16_t *)ps[P_S] + row * ng : NULL;
    *m = ps[P_M] ? (const uint16_t *)ps[P_M] + row * ng : NULL;
}

static inline float load_x(const void *p, int dt, int i) {
    if (dt == RND_BF16) return bf16_to_f32(((const uint16_t *)p)[i]);
    if (dt == RND_F16) return f16_to_f32(((const uint16_t *)p)[i]);
    return ((const float *)p)[i];
}

static inline float silu_mul(float g, float u) { return g / (1.f + expf(-g)) * u; }

/* out[i] = v rounded once to the compute dtype rnd_mode (fp32 kept as is). */
static inline void put(void *out, size_t i, float v, int rnd_mode) {
    if (rnd_mode == RND_NONE) ((float *)out)[i] = v;
    else if (rnd_mode == RND_BF16) ((uint16_t *)out)[i] = f32_to_bf16(v);
    else ((uint16_t *)out)[i] = f32_to_f16(v);
}

/* What this build supports: bit f set for each format f above, bit 8 when fp16 compute/storage works, bit 9
 * when q4 in bf16 takes the AVX512-BF16 path, bit 10 when ACT_Q8's dots are vector integer products (bit 11: VNNI's,
 * else AVX2's; neither: a scalar loop). */
int tiered_cpu_caps(void) {
    return (1 << FMT_F32) | (1 << FMT_BF16) | (HAVE_F16 << FMT_F16) | (1 << FMT_Q8) | (1 << FMT_Q4) | (HAVE_F16 << 8) |
           (HAVE_BFDP << 9) | ((I8DOT > 0) << 10) | ((I8DOT == 2) << 11);
}

/* rnd_mode split into its rounding (returned) and ACT_Q8 (*act8: for q4 rows only). */
static inline int mode_split(int mode, int fmt, int *act8) {
    *act8 = (mode & ACT_Q8) && fmt == FMT_Q4;
    return mode & RND_MASK;
}

/* Which vector path this build uses: 512 (AVX-512F), 256 (AVX2+FMA+F16C) or 0 (portable C). */
int tiered_cpu_simd(void) { return SIMD; }

/* A call's jobs as every thread reads them: the jobs (part addresses, fp32 weights), sizes and the scratch. */
typedef struct {
    int fmt, n, D, F, Gi, Gf, rnd_mode, act8;
    int Flast; /* the last job's FFN rows: F, or a split job's first Flast rows (the device computes the rest) */
    long ngi, ngf, rows1;
    const uintptr_t *parts;
    const float *wts;
    float *xf, *xp, *xs, *h, *hp, *hs, *acc;
    uint16_t *xb, *hb;
    int8_t *xq, *hq; /* ACT_Q8: x's and each job's h's 8-bit codes (vec_t.xq) */
    float *xd, *hd;  /* ACT_Q8: their scales per group */
    void *out;
} jobs_t;

/* Scratch floats for up to n jobs: x fp32, its q4 forms, h fp32 [n, F] and h's q4 forms per job, the sum, then
 * ACT_Q8's codes and scales of x and of each h. */
static size_t jobs_scratch(int n, int D, int F, int Gi, int Gf) {
    const long ngi = (D + Gi - 1) / Gi, ngf = (F + Gf - 1) / Gf;
    return (size_t)2 * D + ngi + (size_t)n * (2 * F + ngf) + (size_t)D + (D / 2 + 1) + (size_t)n * (F / 2 + 1) +
           (D / 4 + 1) + ngi + (size_t)n * (F / 4 + 1 + ngf);
}

/* Lay the scratch `buf` (jobs_scratch(n) floats) out for c's n jobs and convert x (one thread). */
static void jobs_prep(jobs_t *c, float *buf, const void *x) {
    const int D = c->D, F = c->F, n = c->n;
    c->ngi = (D + c->Gi - 1) / c->Gi;
    c->ngf = (F + c->Gf - 1) / c->Gf;
    if (c->Flast <= 0 || c->Flast > F) c->Flast = F;
    c->rows1 = n > 0 ? (long)(n - 1) * F + c->Flast : 0;
    c->xf = buf; c->xp = c->xf + D; c->xs = c->xp + D; c->h = c->xs + c->ngi; c->hp = c->h + (size_t)n * F;
    c->hs = c->hp + (size_t)n * F; c->acc = c->hs + (size_t)n * c->ngf;
    /* q4 in bf16 with AVX512-BF16 (groups of 64): the bf16 pair layouts of x and of each job's h */
    const int bfdp = HAVE_BFDP && c->fmt == FMT_Q4 && c->rnd_mode == RND_BF16 && !c->act8;
    c->xb = bfdp && c->Gi == 64 ? (uint16_t *)(c->acc + D) : NULL;
    c->hb = bfdp && c->Gf == 64 ? (uint16_t *)(c->acc + D + (D / 2 + 1)) : NULL;
    float *q8 = c->acc + D + (D / 2 + 1) + (size_t)n * (F / 2 + 1); /* ACT_Q8's part of the scratch */
    c->xq = c->act8 ? (int8_t *)q8 : NULL;
    c->xd = c->act8 ? q8 + (D / 4 + 1) : NULL;
    c->hq = c->act8 ? (int8_t *)(q8 + (D / 4 + 1) + c->ngi) : NULL;
    c->hd = c->act8 ? q8 + (D / 4 + 1) + c->ngi + (size_t)n * (F / 4 + 1) : NULL;
    for (int d = 0; d < D; d++) c->xf[d] = load_x(x, c->rnd_mode, d);
    if (c->fmt == FMT_Q4) prep_vec(c->xf, D, c->Gi, c->xp, c->xs, c->xb, c->xq, c->xd);
}

/* Thread t of nt's share of the jobs' math (called by every thread of a team: it holds the team's barriers). */
static void jobs_body(const jobs_t *c, int t, int nt) {
    const int fmt = c->fmt, n = c->n, D = c->D, F = c->F, Gi = c->Gi, Gf = c->Gf, rnd_mode = c->rnd_mode;
    const long ngi = c->ngi, ngf = c->ngf, rows1 = c->rows1;
    const uintptr_t *parts = c->parts;
    const float *wts = c->wts;
    float *h = c->h, *hp = c->hp, *hs = c->hs, *acc = c->acc;
    uint16_t *hb = c->hb;
    void *out = c->out;
    const vec_t vx = {c->xf, c->xp, c->xs, c->xb, c->xq, c->xd};
    int8_t *hq = c->hq;
    float *hd = c->hd;
    /* phase 1: gate and up rows of every job, a contiguous slice of the (job, row) space per thread; two
     * FFN rows at a time (gate f, up f, gate f+1, up f+1: four rows sharing each load of x) */
    {
        const long r0 = rows1 * t / nt, r1 = rows1 * (t + 1) / nt;
        const void *q[4];
        const uint16_t *sp[4], *mp[4];
        float o[4];
        for (long r = r0; r < r1;) {
            const int j = (int)(r / F);
            const long f = r % F;
            const int two = (r + 1 < r1 && f + 1 < F) ? 2 : 1;
            const uintptr_t *pj = parts + (size_t)j * P_PER_JOB;
            for (int k = 0; k < two; k++) {
                row_parts(fmt, pj, f + k, D, ngi, &q[2 * k], &sp[2 * k], &mp[2 * k]);
                row_parts(fmt, pj + P_PER_MAT, f + k, D, ngi, &q[2 * k + 1], &sp[2 * k + 1], &mp[2 * k + 1]);
            }
            dots(fmt, 2 * two, q, sp, mp, &vx, D, Gi, (int)ngi, o);
            for (int k = 0; k < two; k++)
                h[r + k] = rnd(silu_mul(rnd(o[2 * k], rnd_mode), rnd(o[2 * k + 1], rnd_mode)), rnd_mode);
            r += two;
        }
    }
#ifdef _OPENMP
#pragma omp barrier
#endif
    if (fmt == FMT_Q4) {
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int j = 0; j < n; j++)
            prep_vec(h + (size_t)j * F, F, Gf, hp + (size_t)j * F, hs + (size_t)j * ngf, hb ? hb + (size_t)j * F : NULL,
                     hq ? hq + (size_t)j * F : NULL, hd ? hd + (size_t)j * ngf : NULL);
    }
    /* phase 2: rows of down, a contiguous slice of D per thread, jobs in order (the sum's order) */
    {
        const int d0 = (int)((long)D * t / nt), d1 = (int)((long)D * (t + 1) / nt);
        for (int d = d0; d < d1; d++) acc[d] = 0.f;
        for (int j = 0; j < n; j++) {
            const uintptr_t *pj = parts + (size_t)j * P_PER_JOB + 2 * P_PER_MAT;
            const vec_t vh = {h + (size_t)j * F, hp + (size_t)j * F, hs + (size_t)j * ngf,
                              hb ? hb + (size_t)j * F : NULL, hq ? hq + (size_t)j * F : NULL,
                              hd ? hd + (size_t)j * ngf : NULL};
            const float wj = wts[j];
            const int Fj = j == n - 1 ? c->Flast : F; /* a split job: down's first Fj columns (its h) */
            const void *q[4];
            const uint16_t *sp[4], *mp[4];
            float o[4];
            for (int d = d0; d < d1;) { /* four rows of down at a time, sharing each load of h */
                const int R = d + 4 <= d1 ? 4 : 1;
                for (int k = 0; k < R; k++) row_parts(fmt, pj, d + k, F, ngf, &q[k], &sp[k], &mp[k]);
                dots(fmt, R, q, sp, mp, &vh, Fj, Gf, (int)ngf, o);
                for (int k = 0; k < R; k++) acc[d + k] += wj * rnd(o[k], rnd_mode);
                d += R;
            }
        }
        for (int d = d0; d < d1; d++) put(out, d, acc[d], rnd_mode);
    }
}

/* The jobs' math once each job's part addresses (parts [n * P_PER_JOB]) and fp32 weights (wts [n], already
 * rounded as the caller wants) are known; 0, or -2 when out of memory. */
static int run_jobs(int fmt, int n, const uintptr_t *parts, const float *wts, int D, int F, int Gi, int Gf,
                    const void *x, void *out, int rnd_mode, int act8, int threads) {
    float *buf = (float *)malloc(jobs_scratch(n, D, F, Gi, Gf) * sizeof(float));
    if (!buf) return -2;
    jobs_t c = {.fmt = fmt, .n = n, .D = D, .F = F, .Flast = F, .Gi = Gi, .Gf = Gf, .rnd_mode = rnd_mode,
                .act8 = act8, .parts = parts, .wts = wts, .out = out};
    jobs_prep(&c, buf, x);
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
    jobs_body(&c, omp_get_thread_num(), omp_get_num_threads());
#else
    jobs_body(&c, 0, 1);
#endif
    free(buf);
    return 0;
}

/* One token's CPU experts.
 *   fmt      weight format (FMT_*), shared by every job
 *   n        jobs (experts); job j reads pool view views[j] (views NULL: view 0 for all), row rows[j]
 *   base, stride [V * 9]: per pool view, for gate, up, down x (codes, scales, mins): the address of row 0 and the
 *            row stride in bytes (0, 0 where a part is absent)
 *   wts[n]   routing weights (fp32); round_w rounds them to the compute dtype first (as the device path does)
 *   D, F     hidden and FFN sizes; Gi / Gf the quantization group along D (gate, up) and along F (down)
 *   x[D]     the token (dtype `rnd_mode`: fp32, bf16 or fp16), out[D] the result in the same dtype
 *   rnd_mode compute dtype rounding (RND_*); threads > 0 the OpenMP threads (0: OpenMP's default)
 * Returns 0, or -1 when the format or dtype is not supported by this build, -2 when out of memory. */
int tiered_cpu_experts(int fmt, int n, const uintptr_t *base, const int64_t *stride, const int32_t *views,
                       const int64_t *rows, const float *wts_in, int round_w, int D, int F, int Gi, int Gf,
                       const void *x, void *out, int rnd_mode, int threads) {
    if (fmt < FMT_F32 || fmt > FMT_Q4 || !(tiered_cpu_caps() >> fmt & 1)) return -1;
    int act8;
    rnd_mode = mode_split(rnd_mode, fmt, &act8);
    if (rnd_mode == RND_F16 && !HAVE_F16) return -1;
    if (n <= 0) {
        for (int d = 0; d < D; d++) {
            if (rnd_mode == RND_NONE) ((float *)out)[d] = 0.f;
            else ((uint16_t *)out)[d] = 0;
        }
        return 0;
    }
    uintptr_t *parts = (uintptr_t *)malloc((size_t)n * P_PER_JOB * sizeof(uintptr_t));
    float *wts = (float *)malloc((size_t)n * sizeof(float));
    if (!parts || !wts) { free(parts); free(wts); return -2; }
    for (int j = 0; j < n; j++) {
        const int v = views ? views[j] : 0;
        for (int p = 0; p < P_PER_JOB; p++) {
            const uintptr_t b = base[v * P_PER_JOB + p];
            parts[j * P_PER_JOB + p] = b ? b + (uintptr_t)(rows[j] * stride[v * P_PER_JOB + p]) : 0;
        }
        wts[j] = round_w ? rnd(wts_in[j], rnd_mode) : wts_in[j];
    }
    const int rc = run_jobs(fmt, n, parts, wts, D, F, Gi, Gf, x, out, rnd_mode, act8, threads);
    free(parts);
    free(wts);
    return rc;
}

/* T tokens through one stored matrix: out[T, N] = x W^T, W [N, K] in format fmt with its rows' parts packed (q: N
 * rows of row_bytes(fmt, K) bytes; s and m: N rows of ceil(K / G) bf16, 0 where absent), x [T, K] and out [T, N]
 * contiguous in the compute dtype rnd_mode, each output rounded once from its fp32 sum; threads over contiguous
 * slices of the rows, four rows sharing each load of x, and every token's dots of a block of rows made while those
 * rows are in L1 (the weights are read once for the T tokens). The dense projections of a CPU decode step or a few
 * batch rows (layout/quant.py's formats, or a float matrix kept as stored, read in place). Returns 0, -1 when the
 * format or dtype is not supported by this build, -2 when out of memory. */
int tiered_cpu_gemv(int fmt, int N, int K, int G, uintptr_t q, uintptr_t s, uintptr_t m, const void *x, int T,
                    void *out, int rnd_mode, int threads) {
    if (fmt < FMT_F32 || fmt > FMT_Q4 || !(tiered_cpu_caps() >> fmt & 1)) return -1;
    int act8;
    rnd_mode = mode_split(rnd_mode, fmt, &act8);
    if (rnd_mode == RND_F16 && !HAVE_F16) return -1;
    if (T <= 0) return 0;
    if (G <= 0) G = 1;
    const long ng = (K + G - 1) / G;
    const long rb = row_bytes(fmt, K);
    const size_t per = (size_t)2 * K + ng + (K / 2 + 1) + (K / 4 + 1) + ng; /* floats a token: x, its q4 forms */
    float *buf = (float *)malloc(per * T * sizeof(float));
    vec_t *vs = (vec_t *)malloc(sizeof(vec_t) * T);
    if (!buf || !vs) { free(buf); free(vs); return -2; }
    const int bfdp = HAVE_BFDP && fmt == FMT_Q4 && rnd_mode == RND_BF16 && G == 64 && !act8;
    const size_t xsz = rnd_mode == RND_NONE ? 4 : 2;
    for (int t = 0; t < T; t++) {
        float *xf = buf + per * t, *xp = xf + K, *xs = xp + K;
        uint16_t *xb = bfdp ? (uint16_t *)(xs + ng) : NULL;
        int8_t *xq = act8 ? (int8_t *)(xs + ng + (K / 2 + 1)) : NULL;
        float *xd = act8 ? xs + ng + (K / 2 + 1) + (K / 4 + 1) : NULL;
        const void *xt = (const char *)x + (size_t)t * K * xsz;
        for (int k = 0; k < K; k++) xf[k] = load_x(xt, rnd_mode, k);
        if (fmt == FMT_Q4) prep_vec(xf, K, G, xp, xs, xb, xq, xd);
        vs[t] = (vec_t){xf, xp, xs, xb, xq, xd};
    }
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
    if ((long)N * rb * T < (1L << 16)) threads = 1; /* under 64 KiB of work a team costs more than it saves */
#pragma omp parallel num_threads(threads)
#endif
    {
        TEAM_ID(t0, nt);
        const long r0 = (long)N * t0 / nt, r1 = (long)N * (t0 + 1) / nt;
        const void *qp[4];
        const uint16_t *sp[4], *mp[4];
        float o[4];
        for (long r = r0; r < r1;) {
            const int R = r + 4 <= r1 ? 4 : 1;
            for (int k = 0; k < R; k++) {
                qp[k] = (const void *)(q + (uintptr_t)((r + k) * rb));
                sp[k] = s ? (const uint16_t *)s + (r + k) * ng : NULL;
                mp[k] = m ? (const uint16_t *)m + (r + k) * ng : NULL;
            }
            for (int t = 0; t < T; t++) {
                dots(fmt, R, qp, sp, mp, &vs[t], K, G, (int)ng, o);
                for (int k = 0; k < R; k++) put(out, (size_t)t * N + r + k, o[k], rnd_mode);
            }
            r += R;
        }
    }
    free(vs);
    free(buf);
    return 0;
}

/* ---- many tokens through one stored matrix: the rows dequantized once a block, then register tiles ---- */

/* Rows per block of the tiled GEMM (dequantized once into fp32 scratch, then reused by every token) and tokens
 * per register tile: NB x TT accumulators of VW lanes (16 of the 32 AVX-512 registers). */
#define GEMM_NB 4
#define GEMM_TT 4
/* Tokens a pass over a thread's row blocks: their fp32 rows (32 x K floats: 256 KiB at K 2048) stay in L2 while
 * the blocks go by; each block is dequantized again for each pass (once per 32 tokens). */
#define GEMM_TC 32

/* One stored row of K inputs -> fp32 wf[K], as layout/quant.py's dequantize computes it (q * s for q8; q * s + m,
 * one rounding, for q4: the same fp32 values as the torch reference). q4 rows come out in xp's order: per full
 * block of 32 inputs its 16 even inputs, then its 16 odd ones; the inputs past the last full block in place. */
static void dequant_row(int fmt, const void *q, const uint16_t *s, const uint16_t *m, int K, int G, float *wf) {
    int i = 0;
    if (fmt == FMT_BF16 || fmt == FMT_F16) {
        for (; i + VW <= K; i += VW) {
            const vf v = ldw(fmt, q, i);
#if SIMD > 0
            memcpy(wf + i, &v, sizeof v);
#else
            wf[i] = v;
#endif
        }
        for (; i < K; i++) wf[i] = lds(fmt, q, i);
    } else if (fmt == FMT_Q8) {
        const int8_t *c = (const int8_t *)q;
        for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
            const int end = K - g0 < G ? K : g0 + G;
            const float sg = bf16_to_f32(s[gi]);
            const vf sv = VSET1(sg);
            for (i = g0; i + VW <= end; i += VW) {
                const vf v = VMUL(VLD_I8(c + i), sv);
#if SIMD > 0
                memcpy(wf + i, &v, sizeof v);
#else
                wf[i] = v;
#endif
            }
            for (; i < end; i++) wf[i] = (float)c[i] * sg;
        }
    } else { /* FMT_Q4 */
        const uint8_t *c = (const uint8_t *)q;
        for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {
            const int end = K - g0 < G ? K : g0 + G;
            const float sg = bf16_to_f32(s[gi]), mg = bf16_to_f32(m[gi]);
            const vf sv = VSET1(sg), mv = VSET1(mg);
            for (i = g0; i + 32 <= end; i += 32)
                for (int h = 0; h < 16; h += VW) {
                    const vi b = VLD_U8(c + i / 2 + h);
                    const vf lo = VFMA(VLO4(b), sv, mv), hi = VFMA(VHI4(b), sv, mv);
#if SIMD > 0
                    memcpy(wf + i + h, &lo, sizeof lo);
                    memcpy(wf + i + 16 + h, &hi, sizeof hi);
#else
                    wf[i + h] = lo;
                    wf[i + 16 + h] = hi;
#endif
                }
            for (; i < end; i++) {
                const uint8_t b = c[i >> 1];
                wf[i] = fmaf((float)((i & 1) ? (b >> 4) : (b & 0xf)), sg, mg);
            }
        }
    }
}

/* TT_ tokens x GEMM_NB rows: out[t][r] = sum_k w[r][k] x[t][k] over fp32 rows (K inputs). */
#define GEMM_TILE(TT_)                                                                                          \
    ALWAYS_INLINE void gemm_tile##TT_(const float *const *w, const float *const *x, int K, float *out) {     \
        vf a[TT_][GEMM_NB];                                                                                 \
        for (int t = 0; t < TT_; t++)                                                                       \
            for (int r = 0; r < GEMM_NB; r++) a[t][r] = VZERO();                                            \
        int i = 0;                                                                                          \
        for (; i + VW <= K; i += VW) {                                                                      \
            vf wv[GEMM_NB];                                                                                 \
            for (int r = 0; r < GEMM_NB; r++) { wv[r] = VLD(w[r] + i); IN_REG(wv[r]); }                     \
            for (int t = 0; t < TT_; t++) {                                                                 \
                vf xv = VLD(x[t] + i);                                                                      \
                IN_REG(xv);                                                                                 \
                for (int r = 0; r < GEMM_NB; r++) a[t][r] = VFMA(wv[r], xv, a[t][r]);                       \
            }                                                                                               \
        }                                                                                                   \
        for (int t = 0; t < TT_; t++)                                                                       \
            for (int r = 0; r < GEMM_NB; r++) {                                                             \
                float s = VHSUM(a[t][r]);                                                                   \
                for (int k = i; k < K; k++) s += w[r][k] * x[t][k];                                         \
                out[t * GEMM_NB + r] = s;                                                                   \
            }                                                                                               \
    }
GEMM_TILE(1)
GEMM_TILE(2)
GEMM_TILE(3)
GEMM_TILE(4)

/* ---- several experts, each over its own rows of tokens (a prompt's or a batch step's experts) ---- */

/* Floats a token's forms take (x fp32, q4's per-32 order, its group sums, its bf16 pairs, ACT_Q8's codes and
 * scales), and their layout. */
static size_t tok_floats(int K, int G) {
    const size_t ng = (K + G - 1) / G;
    return (size_t)2 * K + ng + (K / 2 + 1) + (K / 4 + 1) + ng;
}

/* buf[0:K] holds the token in fp32; ACT_Q8 (act8) rounds it in place first, for the tiles as for the dots. */
static vec_t tok_prep(float *buf, int K, int G, int fmt, int bfdp, int act8) {
    const size_t ng = (K + G - 1) / G;
    float *xf = buf, *xp = xf + K, *xs = xp + K;
    uint16_t *xb = bfdp ? (uint16_t *)(xs + ng) : NULL;
    int8_t *xq = act8 ? (int8_t *)(xs + ng + (K / 2 + 1)) : NULL;
    float *xd = act8 ? xs + ng + (K / 2 + 1) + (K / 4 + 1) : NULL;
    if (fmt == FMT_Q4) {
        prep_vec(xf, K, G, xp, xs, xb, xq, xd);
        for (int c = K / 32 * 32; c < K; c++) xp[c] = xf[c]; /* the tail in place: the GEMM tile's order */
    }
    return (vec_t){xf, xp, xs, xb, xq, xd};
}

/* 4 rows x TT_ tokens (2 or 3: an expert's few rows in a batch step), each weight vector dequantized once in
 * registers as dequant_row does it (q4 q * s + m with one rounding, q8 q * s, floats widened) and multiplied with
 * every token's x: the conversion a token's dots redo is shared. x in q4's per-32 order (xp) for full blocks of 32;
 * the inputs past them (a short last group) in place, scalar. o[t * GEMM_NB + r]. */
#define DOTS_MULTI(TT_)                                                                                          \
    ALWAYS_INLINE void dots_multi##TT_(int fmt, const void *const *q, const uint16_t *const *s,                  \
                                       const uint16_t *const *m, const vec_t *v, int K, int G, float *o) {      \
        vf a[TT_][GEMM_NB];                                                                                      \
        float tail[TT_][GEMM_NB];                                                                                \
        for (int t = 0; t < TT_; t++)                                                                            \
            for (int r = 0; r < GEMM_NB; r++) { a[t][r] = VZERO(); tail[t][r] = 0.f; }                          \
        if (fmt != FMT_Q4 && fmt != FMT_Q8) G = K; /* float rows: one "group", no scales */                    \
        for (int g0 = 0, gi = 0; g0 < K; g0 += G, gi++) {                                                        \
            const int end = K - g0 < G ? K : g0 + G;                                                             \
            vf S[GEMM_NB], M[GEMM_NB];                                                                           \
            float sg[GEMM_NB], mg[GEMM_NB];                                                                      \
            for (int r = 0; r < GEMM_NB; r++) {                                                                  \
                sg[r] = fmt == FMT_Q4 || fmt == FMT_Q8 ? bf16_to_f32(s[r][gi]) : 1.f;                            \
                mg[r] = fmt == FMT_Q4 ? bf16_to_f32(m[r][gi]) : 0.f;                                             \
                S[r] = VSET1(sg[r]);                                                                             \
                M[r] = VSET1(mg[r]);                                                                             \
            }                                                                                                    \
            int i = g0;                                                                                          \
            if (fmt == FMT_Q4) {                                                                                 \
                for (; i + 32 <= end; i += 32)                                                                   \
                    for (int h = 0; h < 16; h += VW) {                                                           \
                        vf xe[TT_], xo[TT_];                                                                     \
                        for (int t = 0; t < TT_; t++) {                                                          \
                            xe[t] = VLD(v[t].xp + i + h); IN_REG(xe[t]);                                         \
                            xo[t] = VLD(v[t].xp + i + 16 + h); IN_REG(xo[t]);                                    \
                        }                                                                                        \
                        for (int r = 0; r < GEMM_NB; r++) {                                                      \
                            const vi b = VLD_U8((const uint8_t *)q[r] + i / 2 + h);                              \
                            const vf wl = VFMA(VLO4(b), S[r], M[r]), wh = VFMA(VHI4(b), S[r], M[r]);             \
                            for (int t = 0; t < TT_; t++)                                                        \
                                a[t][r] = VFMA(wh, xo[t], VFMA(wl, xe[t], a[t][r]));                             \
                        }                                                                                        \
                    }                                                                                            \
            } else {                                                                                             \
                for (; i + VW <= end; i += VW) {                                                                 \
                    vf xx[TT_];                                                                                  \
                    for (int t = 0; t < TT_; t++) { xx[t] = VLD(v[t].x + i); IN_REG(xx[t]); }                    \
                    for (int r = 0; r < GEMM_NB; r++) {                                                          \
                        const vf w = fmt == FMT_Q8 ? VMUL(VLD_I8((const int8_t *)q[r] + i), S[r]) : ldw(fmt, q[r], i); \
                        for (int t = 0; t < TT_; t++) a[t][r] = VFMA(w, xx[t], a[t][r]);                         \
                    }                                                                                            \
                }                                                                                                \
            }                                                                                                    \
            for (; i < end; i++) /* the inputs past the vectors, in place */                                    \
                for (int r = 0; r < GEMM_NB; r++) {                                                              \
                    float w;                                                                                     \
                    if (fmt == FMT_Q4) {                                                                         \
                        const uint8_t b = ((const uint8_t *)q[r])[i >> 1];                                       \
                        w = fmaf((float)((i & 1) ? (b >> 4) : (b & 0xf)), sg[r], mg[r]);                         \
                    } else if (fmt == FMT_Q8) {                                                                  \
                        w = (float)((const int8_t *)q[r])[i] * sg[r];                                            \
                    } else {                                                                                     \
                        w = lds(fmt, q[r], i);                                                                   \
                    }                                                                                            \
                    for (int t = 0; t < TT_; t++) tail[t][r] += w * v[t].x[i];                                  \
                }                                                                                                \
        }                                                                                                        \
        for (int t = 0; t < TT_; t++)                                                                            \
            for (int r = 0; r < GEMM_NB; r++) o[t * GEMM_NB + r] = VHSUM(a[t][r]) + tail[t][r];                 \
    }
DOTS_MULTI(2)
DOTS_MULTI(3)

/* A token's 4 rows from an integer tile's 16 fp32 lanes (row r in lanes 4r..4r+3), plus a short last group. */
static inline void q4i8_put(const float *l, const uint8_t *const *q, const uint16_t *const *s,
                            const uint16_t *const *m, const vec_t *v, int K, float *o) {
    for (int r = 0; r < GEMM_NB; r++)
        o[r] = (l[4 * r] + l[4 * r + 1]) + (l[4 * r + 2] + l[4 * r + 3]) + q4_short_group(q[r], s[r], m[r], v, K);
}

#if defined(__AVX512VNNI__) && defined(__AVX512F__)
#define HAVE_Q4I8_TILE 1
/* ACT_Q8's many-token tiles for q4 (groups of 64) on AVX512-VNNI, over a block of GEMM_NB = 4 rows: a group's codes
 * are read as 4 pieces of 64 bytes, piece i holding rows 0-3's 16 codes that meet x's codes 16i..16i+15 (vec_t.xq's
 * order: 32 even inputs, the low nibbles of the group's 32 bytes, then 32 odd ones, their high nibbles), the 128-bit
 * lane r of a piece being row r. One vpdpbusd multiplies a piece with a token's 16 codes broadcast to the 4 lanes (64
 * products), so a group's integer sums sit in 16 int32 lanes, 4 a row, and are scaled there by the row's scale times
 * the token's d (S: each row's scale in its 4 lanes) and added to the mins' term (M: the row's min in its first lane,
 * times the token's group sum). A row's 4 lanes are summed once at the end: the same math as dots_q4i8 (exact integer
 * group sums, s * d applied to each), another fp32 summation order. A tile takes up to 8 tokens; the first tile of a
 * block makes the pieces from the codes (loads, inserts, and/shift, shared by its tokens) and, when more tiles follow,
 * keeps them in scratch (wu, 256 bytes a group) for the others; S and M are made once a block, 16 floats a group. */
static void q4i8_scales(const uint16_t *const *s, const uint16_t *const *m, int full, float *S, float *M) {
    const __m512i rep = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    for (int g = 0; g < full; g++) {
        const __m128 sv = _mm_setr_ps(bf16_to_f32(s[0][g]), bf16_to_f32(s[1][g]), bf16_to_f32(s[2][g]),
                                      bf16_to_f32(s[3][g]));
        const __m128 mv = _mm_setr_ps(bf16_to_f32(m[0][g]), bf16_to_f32(m[1][g]), bf16_to_f32(m[2][g]),
                                      bf16_to_f32(m[3][g]));
        _mm512_storeu_ps(S + g * 16, _mm512_permutexvar_ps(rep, _mm512_castps128_ps512(sv)));
        _mm512_storeu_ps(M + g * 16, _mm512_maskz_permutexvar_ps(0x1111, rep, _mm512_castps128_ps512(mv)));
    }
}

/* 16 bytes at byte offset o of each of the 4 rows' codes, row r in 128-bit lane r. */
ALWAYS_INLINE __m512i q4i8_rows16(const uint8_t *const *q, long o) {
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(q[0] + o)));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(q[1] + o)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(q[2] + o)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(q[3] + o)), 3);
}

#define Q4I8_TILE(TT_)                                                                                           \
    ALWAYS_INLINE void q4i8_tile##TT_(const uint8_t *const *q, const float *S, const float *M, int full,         \
                                      const vec_t *v, long pf, uint8_t *wu, int build, __m512 *acc) {            \
        __m512 a[TT_];                                                                                           \
        for (int t = 0; t < TT_; t++) a[t] = _mm512_setzero_ps();                                                \
        for (int g = 0; g < full; g++) {                                                                         \
            __m512i w0, w1, w2, w3;                                                                              \
            if (wu && !build) {                                                                                  \
                const __m512i *u = (const __m512i *)(wu + g * 256L);                                             \
                w0 = _mm512_loadu_si512(u), w1 = _mm512_loadu_si512(u + 1);                                      \
                w2 = _mm512_loadu_si512(u + 2), w3 = _mm512_loadu_si512(u + 3);                                  \
            } else {                                                                                             \
                if (pf && !(g & 1))                                                                              \
                    for (int r = 0; r < GEMM_NB; r++) _mm_prefetch((const char *)q[r] + g * 32L + pf, PFQ_HINT);  \
                const __m512i lo4 = _mm512_set1_epi8(0x0f);                                                      \
                const __m512i A = q4i8_rows16(q, g * 32L), B = q4i8_rows16(q, g * 32L + 16);                      \
                w0 = _mm512_and_si512(A, lo4), w1 = _mm512_and_si512(B, lo4);                                    \
                w2 = _mm512_and_si512(_mm512_srli_epi16(A, 4), lo4);                                             \
                w3 = _mm512_and_si512(_mm512_srli_epi16(B, 4), lo4);                                             \
                if (wu) {                                                                                        \
                    __m512i *u = (__m512i *)(wu + g * 256L);                                                     \
                    _mm512_storeu_si512(u, w0), _mm512_storeu_si512(u + 1, w1);                                  \
                    _mm512_storeu_si512(u + 2, w2), _mm512_storeu_si512(u + 3, w3);                              \
                }                                                                                                \
            }                                                                                                    \
            IN_REG(w0);                                                                                          \
            IN_REG(w1);                                                                                          \
            IN_REG(w2);                                                                                          \
            IN_REG(w3);                                                                                          \
            const __m512 sg = _mm512_loadu_ps(S + g * 16), mg = _mm512_loadu_ps(M + g * 16);                     \
            for (int t = 0; t < TT_; t++) {                                                                      \
                const __m128i *xg = (const __m128i *)(v[t].xq + g * 64);                                         \
                __m512i i = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w0,                                      \
                                                _mm512_broadcast_i32x4(_mm_loadu_si128(xg)));                    \
                i = _mm512_dpbusd_epi32(i, w1, _mm512_broadcast_i32x4(_mm_loadu_si128(xg + 1)));                 \
                i = _mm512_dpbusd_epi32(i, w2, _mm512_broadcast_i32x4(_mm_loadu_si128(xg + 2)));                 \
                i = _mm512_dpbusd_epi32(i, w3, _mm512_broadcast_i32x4(_mm_loadu_si128(xg + 3)));                 \
                a[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(i), _mm512_mul_ps(sg, _mm512_set1_ps(v[t].xd[g])), a[t]); \
                a[t] = _mm512_fmadd_ps(mg, _mm512_set1_ps(v[t].xs[g]), a[t]);                                    \
            }                                                                                                    \
        }                                                                                                        \
        for (int t = 0; t < TT_; t++) acc[t] = a[t];                                                             \
    }
Q4I8_TILE(8)
Q4I8_TILE(7)
Q4I8_TILE(6)
Q4I8_TILE(5)
Q4I8_TILE(4)
Q4I8_TILE(3)
Q4I8_TILE(2)
Q4I8_TILE(1)

/* The block's T tokens through the tiles (8 at a time, then the rest in one) -> o[t * GEMM_NB + r], plus a short last
 * group's scalar term. S / M as q4i8_scales filled them. */
static void q4i8_block(const uint8_t *const *q, const uint16_t *const *s, const uint16_t *const *m, int K,
                       const vec_t *v, int T, const float *S, const float *M, uint8_t *wu8, float *o) {
    const int full = K / 64;
    uint8_t *wu = T > 8 ? wu8 : NULL; /* past one tile, the first keeps its pieces there for the others */
    const long pf = PFQ > 0 ? pf_ahead(K) : 0; /* the first tile asks L2 for the codes PFQ rows ahead */
    for (int t = 0; t < T;) {
        __m512 acc[8];
        const int tt = T - t >= 8 ? 8 : T - t;
        switch (tt) {
        case 8: q4i8_tile8(q, S, M, full, v + t, t ? 0 : pf, wu, !t, acc); break;
        case 7: q4i8_tile7(q, S, M, full, v + t, t ? 0 : pf, wu, !t, acc); break;
        case 6: q4i8_tile6(q, S, M, full, v + t, t ? 0 : pf, wu, !t, acc); break;
        case 5: q4i8_tile5(q, S, M, full, v + t, t ? 0 : pf, wu, !t, acc); break;
        case 4: q4i8_tile4(q, S, M, full, v + t, t ? 0 : pf, wu, !t, acc); break;
        case 3: q4i8_tile3(q, S, M, full, v + t, t ? 0 : pf, wu, !t, acc); break;
        case 2: q4i8_tile2(q, S, M, full, v + t, t ? 0 : pf, wu, !t, acc); break;
        default: q4i8_tile1(q, S, M, full, v + t, t ? 0 : pf, wu, !t, acc); break;
        }
        for (int j = 0; j < tt; j++) {
            float l[16];
            _mm512_storeu_ps(l, acc[j]);
            q4i8_put(l, q, s, m, &v[t + j], K, o + (t + j) * GEMM_NB);
        }
        t += tt;
    }
}
#elif I8DOT
#define HAVE_Q4I8_TILE 2
/* The same tiles on 256-bit integer dots (AVX2's vpmaddubsw, or AVX-VNNI's vpdpbusd): a 4-row block is two row
 * pairs, a ymm piece holding rows 2p and 2p + 1 in its two 128-bit lanes, so S and M have q4i8_scales' layout (a
 * row's 4 lanes). On AVX2 a piece set's 4 vpmaddubsw (pairs of codes 0..15 times |x| <= 127: at most 3,810) are
 * summed in 16 bits (at most 15,240) before one vpmaddwd; up to 4 tokens a tile (16 vector registers). */
static void q4i8_scales(const uint16_t *const *s, const uint16_t *const *m, int full, float *S, float *M) {
    const __m256i lo2 = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1), hi2 = _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3);
    for (int g = 0; g < full; g++) {
        const __m256 sv = _mm256_castps128_ps256(_mm_setr_ps(bf16_to_f32(s[0][g]), bf16_to_f32(s[1][g]),
                                                             bf16_to_f32(s[2][g]), bf16_to_f32(s[3][g])));
        const __m256 mv = _mm256_castps128_ps256(_mm_setr_ps(bf16_to_f32(m[0][g]), bf16_to_f32(m[1][g]),
                                                             bf16_to_f32(m[2][g]), bf16_to_f32(m[3][g])));
        _mm256_storeu_ps(S + g * 16, _mm256_permutevar8x32_ps(sv, lo2));
        _mm256_storeu_ps(S + g * 16 + 8, _mm256_permutevar8x32_ps(sv, hi2));
        _mm256_storeu_ps(M + g * 16, _mm256_blend_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(mv, lo2), 0x11));
        _mm256_storeu_ps(M + g * 16 + 8, _mm256_blend_ps(_mm256_setzero_ps(), _mm256_permutevar8x32_ps(mv, hi2), 0x11));
    }
}

/* 16 bytes at byte offset o of rows a (low lane) and b (high lane). */
ALWAYS_INLINE __m256i q4i8_pair16(const uint8_t *a, const uint8_t *b, long o) {
    return _mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(a + o))),
                                   _mm_loadu_si128((const __m128i *)(b + o)), 1);
}

/* sum over 4 pieces of codes times x's broadcast 16 bytes -> 8 int32 lanes */
#if I8DOT == 2
#define Q4I8_SUM4(w, x) DP_U8S8(DP_U8S8(DP_U8S8(DP_U8S8(_mm256_setzero_si256(), w[0], x[0]), w[1], x[1]), w[2], x[2]), \
                                w[3], x[3])
#else
#define Q4I8_SUM4(w, x)                                                                                          \
    _mm256_madd_epi16(_mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(w[0], x[0]),                         \
                                                        _mm256_maddubs_epi16(w[1], x[1])),                        \
                                       _mm256_add_epi16(_mm256_maddubs_epi16(w[2], x[2]),                         \
                                                        _mm256_maddubs_epi16(w[3], x[3]))),                       \
                      _mm256_set1_epi16(1))
#endif

#define Q4I8_TILE2(TT_)                                                                                          \
    ALWAYS_INLINE void q4i8_tile##TT_(const uint8_t *const *q, const float *S, const float *M, int full,         \
                                      const vec_t *v, long pf, __m256 (*acc)[2]) {                                \
        __m256 a[TT_][2];                                                                                        \
        for (int t = 0; t < TT_; t++) a[t][0] = a[t][1] = _mm256_setzero_ps();                                   \
        const __m256i lo4 = _mm256_set1_epi8(0x0f);                                                              \
        for (int g = 0; g < full; g++) {                                                                         \
            if (pf && !(g & 1))                                                                                  \
                for (int r = 0; r < GEMM_NB; r++) _mm_prefetch((const char *)q[r] + g * 32L + pf, PFQ_HINT);      \
            for (int p = 0; p < 2; p++) {                                                                        \
                const __m256i A = q4i8_pair16(q[2 * p], q[2 * p + 1], g * 32L);                                  \
                const __m256i B = q4i8_pair16(q[2 * p], q[2 * p + 1], g * 32L + 16);                             \
                __m256i w[4] = {_mm256_and_si256(A, lo4), _mm256_and_si256(B, lo4),                              \
                                _mm256_and_si256(_mm256_srli_epi16(A, 4), lo4),                                  \
                                _mm256_and_si256(_mm256_srli_epi16(B, 4), lo4)};                                 \
                for (int i = 0; i < 4; i++) IN_REG(w[i]);                                                        \
                const __m256 sg = _mm256_loadu_ps(S + g * 16 + p * 8), mg = _mm256_loadu_ps(M + g * 16 + p * 8); \
                for (int t = 0; t < TT_; t++) {                                                                  \
                    const __m128i *xg = (const __m128i *)(v[t].xq + g * 64);                                     \
                    const __m256i x[4] = {_mm256_broadcastsi128_si256(_mm_loadu_si128(xg)),                      \
                                          _mm256_broadcastsi128_si256(_mm_loadu_si128(xg + 1)),                  \
                                          _mm256_broadcastsi128_si256(_mm_loadu_si128(xg + 2)),                  \
                                          _mm256_broadcastsi128_si256(_mm_loadu_si128(xg + 3))};                 \
                    const __m256i i32 = Q4I8_SUM4(w, x);                                                         \
                    a[t][p] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32), _mm256_mul_ps(sg, _mm256_set1_ps(v[t].xd[g])), \
                                              a[t][p]);                                                          \
                    a[t][p] = _mm256_fmadd_ps(mg, _mm256_set1_ps(v[t].xs[g]), a[t][p]);                          \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
        for (int t = 0; t < TT_; t++) acc[t][0] = a[t][0], acc[t][1] = a[t][1];                                  \
    }
Q4I8_TILE2(4)
Q4I8_TILE2(3)
Q4I8_TILE2(2)
Q4I8_TILE2(1)

static void q4i8_block(const uint8_t *const *q, const uint16_t *const *s, const uint16_t *const *m, int K,
                       const vec_t *v, int T, const float *S, const float *M, uint8_t *wu8, float *o) {
    (void)wu8;
    const int full = K / 64;
    const long pf = PFQ > 0 ? pf_ahead(K) : 0;
    for (int t = 0; t < T;) {
        __m256 acc[4][2];
        const int tt = T - t >= 4 ? 4 : T - t;
        switch (tt) {
        case 4: q4i8_tile4(q, S, M, full, v + t, t ? 0 : pf, acc); break;
        case 3: q4i8_tile3(q, S, M, full, v + t, t ? 0 : pf, acc); break;
        case 2: q4i8_tile2(q, S, M, full, v + t, t ? 0 : pf, acc); break;
        default: q4i8_tile1(q, S, M, full, v + t, t ? 0 : pf, acc); break;
        }
        for (int j = 0; j < tt; j++) {
            float l[16];
            _mm256_storeu_ps(l, acc[j][0]);
            _mm256_storeu_ps(l + 8, acc[j][1]);
            q4i8_put(l, q, s, m, &v[t + j], K, o + (t + j) * GEMM_NB);
        }
        t += tt;
    }
}
#else
#define HAVE_Q4I8_TILE 0
#endif
#ifndef Q4I8_MIN_T
#define Q4I8_MIN_T 2
#endif

/* Rows r0..r0+nr-1 (nr <= GEMM_NB) of one matrix (parts at ps: codes, scales, mins; K inputs) dotted with T
 * tokens v[0..T-1] -> o[t * GEMM_NB + r]: from GEMM_MIN_T tokens the rows are dequantized once into wf (Kp floats a
 * row) and multiplied in register tiles, below that each token's dots read the codes (tiered_cpu_gemv's way). */
#define GEMM_MIN_T 4
static void block_rows(int fmt, const uintptr_t *ps, long r0, int nr, int K, int G, const vec_t *v, int T, int min_t,
                       float *wf, size_t Kp, float *o) {
    const long ng = (K + G - 1) / G;
    const void *q[GEMM_NB];
    const uint16_t *s[GEMM_NB], *m[GEMM_NB];
    for (int r = 0; r < GEMM_NB; r++) row_parts(fmt, ps, r0 + (r < nr ? r : 0), K, ng, &q[r], &s[r], &m[r]);
#if HAVE_Q4I8_TILE
    if (fmt == FMT_Q4 && G == 64 && v[0].xq && T >= Q4I8_MIN_T) { /* ACT_Q8: integer tiles; S, M, pieces in wf */
        float *S = wf, *M = S + (size_t)16 * (K / 64);
        q4i8_scales(s, m, K / 64, S, M);
        q4i8_block((const uint8_t *const *)q, s, m, K, v, T, S, M, (uint8_t *)(M + (size_t)16 * (K / 64)), o);
        return;
    }
#endif
    if (T < min_t) {
        /* 2-3 tokens share each weight vector's dequantization (2 Zen 4 cores, 24 experts of 2048 x 768 at 2 / 3
         * tokens each: q4 1.14x / 1.52x the per-token dots, q8 1.16x / 1.32x, bf16 1.05x / 1.22x) */
        if (T == 2) dots_multi2(fmt, q, s, m, v, K, G, o);
        else if (T == 3) dots_multi3(fmt, q, s, m, v, K, G, o);
        else
            for (int t = 0; t < T; t++) dots(fmt, GEMM_NB, q, s, m, &v[t], K, G, (int)ng, o + t * GEMM_NB);
        return;
    }
    const float *w[GEMM_NB];
    for (int r = 0; r < GEMM_NB; r++) {
        if (fmt == FMT_F32) {
            w[r] = (const float *)q[r];
        } else {
            if (r < nr) dequant_row(fmt, q[r], s[r], m[r], K, G, wf + Kp * r);
            w[r] = wf + Kp * (r < nr ? r : 0);
        }
    }
    for (int t = 0; t < T; t += GEMM_TT) {
        const int tt = T - t < GEMM_TT ? T - t : GEMM_TT;
        const float *xs[GEMM_TT];
        for (int j = 0; j < tt; j++) xs[j] = fmt == FMT_Q4 ? v[t + j].xp : v[t + j].x;
        float *ot = o + t * GEMM_NB;
        switch (tt) {
        case 4: gemm_tile4(w, xs, K, ot); break;
        case 3: gemm_tile3(w, xs, K, ot); break;
        case 2: gemm_tile2(w, xs, K, ot); break;
        default: gemm_tile1(w, xs, K, ot); break;
        }
    }
}

/* T tokens through one stored matrix, as tiered_cpu_gemv (same arguments, same results up to the summation
 * order), for many tokens: each block of GEMM_NB rows is dequantized once into fp32 scratch (fp32 rows are read
 * in place) and the dots of GEMM_TC tokens with it are made in register tiles of GEMM_TT tokens x GEMM_NB rows,
 * where tiered_cpu_gemv converts the codes again for each token. Threads over contiguous slices of the row
 * blocks. Measured on 2 Zen 4 cores (768 x 2048, fp32 compute): q4 at 4 / 16 / 64 tokens 93 / 143 / 153 GF/s
 * against tiered_cpu_gemv's 69 / 63 / 68; one token 30 against 60 (CpuKernel.gemv picks by GEMM_MIN_ROWS). */
int tiered_cpu_gemm(int fmt, int N, int K, int G, uintptr_t q, uintptr_t s, uintptr_t m, const void *x, int T,
                    void *out, int rnd_mode, int threads) {
    if (fmt < FMT_F32 || fmt > FMT_Q4 || !(tiered_cpu_caps() >> fmt & 1)) return -1;
    int act8;
    rnd_mode = mode_split(rnd_mode, fmt, &act8);
    if (rnd_mode == RND_F16 && !HAVE_F16) return -1;
    if (T <= 0 || N <= 0) return 0;
    if (G <= 0) G = 1;
    const size_t Kp = ((size_t)K + 15) & ~(size_t)15, px = tok_floats(K, G);
    float *xb = (float *)malloc(px * T * sizeof(float));
    vec_t *vx = (vec_t *)malloc(sizeof(vec_t) * T);
    if (!xb || !vx) { free(xb); free(vx); return -2; }
    const size_t xsz = rnd_mode == RND_NONE ? 4 : 2;
    for (int t = 0; t < T; t++) { /* fp32 tokens (and q4's per-32 order, which the tiles read) */
        float *b = xb + px * t;
        for (int k = 0; k < K; k++) b[k] = load_x((const char *)x + (size_t)t * K * xsz, rnd_mode, k);
        vx[t] = tok_prep(b, K, G, fmt, 0, act8);
    }
    const uintptr_t ps[3] = {q, s, m};
    const long nblk = (N + GEMM_NB - 1) / GEMM_NB;
    int rc = 0;
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
    if ((long)N * row_bytes(fmt, K) * T < (1L << 16)) threads = 1;
    if (threads > nblk) threads = (int)nblk;
#pragma omp parallel num_threads(threads) reduction(| : rc)
#endif
    {
        TEAM_ID(t0, nt);
        float *wf = (float *)malloc(Kp * GEMM_NB * sizeof(float));
        float *o = (float *)malloc(sizeof(float) * GEMM_NB * (T < GEMM_TC ? T : GEMM_TC));
        if (!wf || !o) rc = -2;
        const long b0 = nblk * t0 / nt, b1 = nblk * (t0 + 1) / nt;
        for (int tc = 0; tc < T && !rc; tc += GEMM_TC) {
            const int tn = T - tc < GEMM_TC ? T - tc : GEMM_TC;
            for (long b = b0; b < b1; b++) {
                const long r0 = b * GEMM_NB;
                const int nr = N - r0 < GEMM_NB ? (int)(N - r0) : GEMM_NB;
                block_rows(fmt, ps, r0, nr, K, G, vx + tc, tn, 1, wf, Kp, o);
                for (int t = 0; t < tn; t++)
                    for (int r = 0; r < nr; r++) put(out, (size_t)(tc + t) * N + r0 + r, o[t * GEMM_NB + r], rnd_mode);
            }
        }
        free(wf);
        free(o);
    }
    free(xb);
    free(vx);
    return rc;
}

/* A phase's work items: per expert, its tokens in passes of GEMM_TC, each pass over the matrix's row blocks (nblk of
 * them). at[j] is expert j's first item, at[n] the count. */
static long items_count(int n, const int32_t *cnt, long nblk, long *at) {
    long k = 0;
    for (int j = 0; j < n; j++) {
        at[j] = k;
        k += (cnt[j] + GEMM_TC - 1) / GEMM_TC * nblk;
    }
    at[n] = k;
    return k;
}

/* Item k: expert j, tokens tf..tf+T-1 (first[j] is the expert's first), rows r0..r0+nr-1 of a matrix of `rows` rows. */
typedef struct { int j, T, nr; long tf, r0; } item_t;
static inline item_t item_of(const long *at, const int32_t *cnt, const int64_t *first, long nblk, int rows, long k,
                             int j) { /* j: the previous item's expert (items go in order) */
    while (at[j + 1] <= k) j++;
    const long rel = k - at[j], pass = rel / nblk;
    item_t it = {.j = j, .tf = first[j] + pass * GEMM_TC, .r0 = rel % nblk * GEMM_NB};
    it.T = cnt[j] - pass * GEMM_TC < GEMM_TC ? (int)(cnt[j] - pass * GEMM_TC) : GEMM_TC;
    it.nr = rows - it.r0 < GEMM_NB ? (int)(rows - it.r0) : GEMM_NB;
    return it;
}

/* Experts over their own tokens: for expert j (pool view row rows[j]: its gate, up, down parts at base[p] +
 * rows[j] * stride[p], as tiered_cpu_experts reads them) and its cnt[j] tokens (consecutive rows of x, experts in
 * order), out rows = down(silu(gate x) * up x), each output rounded as tiered_cpu_experts rounds one expert's (the
 * products to the compute dtype, the SwiGLU once), not weighted. x [sum cnt, D] and out [sum cnt, D] in the compute
 * dtype rnd_mode. Threads over the (expert, pass of up to GEMM_TC tokens, block of GEMM_NB rows) items of the gate
 * and up rows, a barrier, then of the down rows; a block is dequantized once a pass from GEMM_MIN_T tokens (else each
 * token's dots read its codes). Returns 0, -1 when the format or dtype is not supported by this build, -2 when out
 * of memory. */
int tiered_cpu_expert_rows(int fmt, int n, const uintptr_t *base, const int64_t *stride, const int64_t *rows,
                           const int32_t *cnt, int D, int F, int Gi, int Gf, const void *x, void *out, int rnd_mode,
                           int threads) {
    if (fmt < FMT_F32 || fmt > FMT_Q4 || !(tiered_cpu_caps() >> fmt & 1)) return -1;
    int act8;
    rnd_mode = mode_split(rnd_mode, fmt, &act8);
    if (rnd_mode == RND_F16 && !HAVE_F16) return -1;
    if (n <= 0) return 0;
    long total = 0, cmax = 0;
    for (int j = 0; j < n; j++) {
        total += cnt[j];
        if (cnt[j] > cmax) cmax = cnt[j];
    }
    if (total <= 0) return 0;
    const int bfdp = HAVE_BFDP && fmt == FMT_Q4 && rnd_mode == RND_BF16 && !act8;
    const size_t px = tok_floats(D, Gi), ph = tok_floats(F, Gf);
    const size_t Kp = (((size_t)(D > F ? D : F)) + 15) & ~(size_t)15;
    float *xb = (float *)malloc(px * total * sizeof(float)), *hb = (float *)malloc(ph * total * sizeof(float));
    vec_t *vx = (vec_t *)malloc(sizeof(vec_t) * total), *vh = (vec_t *)malloc(sizeof(vec_t) * total);
    int64_t *first = (int64_t *)malloc(sizeof(int64_t) * n);
    long *at1 = (long *)malloc(sizeof(long) * (n + 1)), *at2 = (long *)malloc(sizeof(long) * (n + 1));
    uintptr_t *parts = (uintptr_t *)malloc(sizeof(uintptr_t) * (size_t)n * P_PER_JOB);
    int rc = 0;
    if (!xb || !hb || !vx || !vh || !first || !at1 || !at2 || !parts) { rc = -2; goto done; }
    {
        const size_t xsz = rnd_mode == RND_NONE ? 4 : 2;
        for (int j = 0; j < n; j++) {
            first[j] = j ? first[j - 1] + cnt[j - 1] : 0;
            for (int p = 0; p < P_PER_JOB; p++)
                parts[(size_t)j * P_PER_JOB + p] = base[p] ? base[p] + (uintptr_t)(rows[j] * stride[p]) : 0;
        }
        const long nb1 = (F + GEMM_NB - 1) / GEMM_NB, nb2 = (D + GEMM_NB - 1) / GEMM_NB;
        const long n1 = items_count(n, cnt, nb1, at1), n2 = items_count(n, cnt, nb2, at2);
#ifdef _OPENMP
        if (threads <= 0) threads = omp_get_max_threads();
        if ((long)n * F * row_bytes(fmt, D) * 3 * total < (1L << 16)) threads = 1; /* as tiered_cpu_gemv's rule */
#pragma omp parallel num_threads(threads) reduction(| : rc)
#endif
        {
            TEAM_ID(t0, nt);
            const int tc = cmax < GEMM_TC ? (int)cmax : GEMM_TC;
            float *wf = (float *)malloc(sizeof(float) * Kp * GEMM_NB);
            float *og = (float *)malloc(sizeof(float) * GEMM_NB * tc);
            float *ou = (float *)malloc(sizeof(float) * GEMM_NB * tc);
            if (!wf || !og || !ou) rc = -2;
            /* the tokens' forms, shared out (x's 8-bit rounding and q4's orders: a 1,024-row prompt's took about 8% of
             * the call on one thread) */
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
            for (long t = 0; t < total; t++) {
                float *b = xb + px * t;
                const void *xt = (const char *)x + (size_t)t * D * xsz;
                for (int k = 0; k < D; k++) b[k] = load_x(xt, rnd_mode, k);
                vx[t] = tok_prep(b, D, Gi, fmt, bfdp && Gi == 64, act8);
            }
            /* (the omp for's implied barrier) phase 1: gate and up rows -> h = rnd(silu(rnd(g)) * rnd(u)) per token,
             * in fp32 */
            {
                const long a = n1 * t0 / nt, b = n1 * (t0 + 1) / nt;
                int j = 0;
                for (long k = a; k < b && !rc; k++) {
                    const item_t it = item_of(at1, cnt, first, nb1, F, k, j);
                    const uintptr_t *pj = parts + (size_t)(j = it.j) * P_PER_JOB;
                    block_rows(fmt, pj, it.r0, it.nr, D, Gi, vx + it.tf, it.T, GEMM_MIN_T, wf, Kp, og);
                    block_rows(fmt, pj + P_PER_MAT, it.r0, it.nr, D, Gi, vx + it.tf, it.T, GEMM_MIN_T, wf, Kp, ou);
                    for (int t = 0; t < it.T; t++)
                        for (int r = 0; r < it.nr; r++) {
                            const float g = rnd(og[t * GEMM_NB + r], rnd_mode), u = rnd(ou[t * GEMM_NB + r], rnd_mode);
                            hb[ph * (it.tf + t) + it.r0 + r] = rnd(silu_mul(g, u), rnd_mode);
                        }
                }
            }
#ifdef _OPENMP
#pragma omp barrier
#pragma omp for schedule(static)
#endif
            for (long t = 0; t < total; t++) {
                float *b = hb + ph * t;
                vh[t] = tok_prep(b, F, Gf, fmt, bfdp && Gf == 64, act8);
            }
            /* (the omp for's implied barrier: every h is ready) phase 2: down rows -> out */
            {
                const long a = n2 * t0 / nt, b = n2 * (t0 + 1) / nt;
                int j = 0;
                for (long k = a; k < b && !rc; k++) {
                    const item_t it = item_of(at2, cnt, first, nb2, D, k, j);
                    block_rows(fmt, parts + (size_t)(j = it.j) * P_PER_JOB + 2 * P_PER_MAT, it.r0, it.nr, F, Gf,
                               vh + it.tf, it.T, GEMM_MIN_T, wf, Kp, og);
                    for (int t = 0; t < it.T; t++)
                        for (int r = 0; r < it.nr; r++)
                            put(out, (size_t)(it.tf + t) * D + it.r0 + r, og[t * GEMM_NB + r], rnd_mode);
                }
            }
            free(wf);
            free(og);
            free(ou);
        }
    }
done:
    free(xb); free(hb); free(vx); free(vh); free(first); free(at1); free(at2); free(parts);
    return rc;
}

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

/* Wait while *p == v: spin (pause) while jobs keep coming, then, spin_ns after `since`, sleep sleep_ns between
 * looks; returns when *p != v. */
static void idle_wait(const volatile int64_t *p, int64_t v, int64_t since, int64_t spin_ns, int64_t sleep_ns) {
    long looks = 0;
    while (__atomic_load_n(p, __ATOMIC_ACQUIRE) == v) {
        if (spin_ns > 0 && (++looks & 255) == 0 && now_ns() - since > spin_ns) {
            struct timespec ts = {0, (long)sleep_ns};
            nanosleep(&ts, NULL);
        } else {
            cpu_relax();
        }
    }
}

/* The device step's CPU experts (tiered/model/cpu_mailbox.py, decode/devstep.py): a loop, on the calling thread,
 * that serves the jobs a CUDA graph posts into page-locked memory (the GPU writes it over PCIe) and answers there.
 *   ctl int32 [4]  [0] post: the GPU writes a new number here after the jobs and x; [1] done: written here (release)
 *                  after out; [2] stop: the host sets it to end the loop; [3] the last nonzero error code
 *   rows int64 [K] per top-k position the job's row in the pool view (base, stride: view 0 of tiered_cpu_experts),
 *                  -1 = not a CPU job; wts fp32 [K] the routing weights (round_w as there). A value <= -2 is a
 *                  split job (at most one a post): v = -2 - value, row v >> 16, and only its first v & 0xffff
 *                  FFN rows (gate, up rows; down columns) are computed here, the device computing the others
 *                  (kernels/slot_table.resolve's split; dense formats only: a quantized row split is refused)
 *   x [D], out [D] in rnd_mode's dtype (out is zero when no row is a job)
 *   stat int64 [5] layers served, experts computed, nanoseconds computing, nanoseconds from post seen to done,
 *                  team threads pinned
 *   spin_ns        after this long without a post the team sleeps sleep_ns between looks (the first post after
 *                  a pause pays up to that); 0 = always spin
 *   cpus [ncpus]   ncpus > 0: team thread t pins itself to CPU cpus[t % ncpus] (Linux; stat[4] counts the
 *                  threads whose pin took); 0 = where the scheduler puts them
 * The calling thread and threads - 1 others form one team for the loop's whole life: between posts they spin on
 * a generation number instead of OpenMP's fork and join (a 9.4 MB expert took 254 us through a fresh parallel
 * region per post on the H200 box's 16 cores, where 4 experts a post ran at 62 GB/s: the team's wake-up was a
 * third of a lone expert's time).
 * Returns 0 once stopped, -1 when the format or dtype is not supported by this build, -2 when out of memory. */
int tiered_cpu_serve(int32_t *ctl, const int64_t *rows, const float *wts_in, const void *x, void *out, int K,
                     int fmt, const uintptr_t *base, const int64_t *stride, int round_w, int D, int F, int Gi,
                     int Gf, int rnd_mode, int threads, int64_t *stat, int64_t spin_ns, int64_t sleep_ns,
                     const int32_t *cpus, int ncpus) {
    if (fmt < FMT_F32 || fmt > FMT_Q4 || !(tiered_cpu_caps() >> fmt & 1)) return -1;
    int act8;
    rnd_mode = mode_split(rnd_mode, fmt, &act8);
    if (rnd_mode == RND_F16 && !HAVE_F16) return -1;
    uintptr_t *parts = (uintptr_t *)malloc((size_t)K * P_PER_JOB * sizeof(uintptr_t));
    float *wts = (float *)malloc((size_t)K * sizeof(float));
    float *buf = (float *)malloc(jobs_scratch(K, D, F, Gi, Gf) * sizeof(float));
    if (!parts || !wts || !buf) { free(parts); free(wts); free(buf); return -2; }
    volatile int64_t gen = 0; /* the master's count of jobs handed to the team (and the stop) */
    int stopping = 0;
    jobs_t c = {.fmt = fmt, .D = D, .F = F, .Gi = Gi, .Gf = Gf, .rnd_mode = rnd_mode, .act8 = act8, .parts = parts,
                .wts = wts, .out = out};
    /* the last number answered, not the last posted: a post made before this thread ran is served too */
    int32_t last = __atomic_load_n(&ctl[1], __ATOMIC_ACQUIRE), s = last;
    int64_t t0 = 0, idle_since = now_ns();
#ifdef _OPENMP
    if (threads <= 0) threads = omp_get_max_threads();
#pragma omp parallel num_threads(threads)
#endif
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
#ifdef __linux__
        if (ncpus > 0) {
            cpu_set_t set;
            CPU_ZERO(&set);
            CPU_SET(cpus[t % ncpus], &set);
            if (sched_setaffinity(0, sizeof set, &set) == 0) __atomic_add_fetch(&stat[4], 1, __ATOMIC_RELAXED);
        }
#endif
        int64_t seen = 0, since = now_ns();
        for (;;) {
            if (t == 0) {
                /* wait for a post (a new number in ctl[0]) or the stop */
                for (;;) {
                    s = __atomic_load_n(&ctl[0], __ATOMIC_ACQUIRE);
                    if (s != last || __atomic_load_n(&ctl[2], __ATOMIC_ACQUIRE)) break;
                    if (spin_ns > 0 && now_ns() - idle_since > spin_ns) {
                        struct timespec ts = {0, (long)sleep_ns};
                        nanosleep(&ts, NULL);
                    } else {
                        for (int i = 0; i < 64; i++) cpu_relax();
                    }
                }
                if (s == last) {
                    stopping = 1;
                } else {
                    t0 = now_ns();
                    int n = 0, ks = -1;
                    for (int pass = 0; pass < 2; pass++) { /* the full jobs, then the split one (last) */
                        for (int k = 0; k < K; k++) {
                            int64_t r = rows[k];
                            if (r == -1 || (pass == 0) != (r >= 0) || (pass == 1 && ks >= 0)) continue;
                            if (r < -1) {
                                ks = k;
                                r = (-2 - r) >> 16;
                            }
                            for (int q = 0; q < P_PER_JOB; q++) {
                                const uintptr_t b = base[q];
                                parts[n * P_PER_JOB + q] = b ? b + (uintptr_t)(r * stride[q]) : 0;
                            }
                            wts[n] = round_w ? rnd(wts_in[k], rnd_mode) : wts_in[k];
                            n++;
                        }
                    }
                    c.Flast = ks >= 0 ? (int)((-2 - rows[ks]) & 0xffff) : F;
                    if (ks >= 0 && (fmt == FMT_Q8 || fmt == FMT_Q4 || c.Flast <= 0 || c.Flast >= F)) {
                        __atomic_store_n(&ctl[3], -3, __ATOMIC_RELEASE); /* a row split of a quantized job */
                        c.Flast = F;
                    }
                    c.n = n;
                    if (n > 0) jobs_prep(&c, buf, x);
                }
                __atomic_store_n(&gen, seen + 1, __ATOMIC_RELEASE);
            } else {
                idle_wait(&gen, seen, since, spin_ns, sleep_ns);
            }
            seen++;
            if (stopping) break;
            if (c.n > 0) jobs_body(&c, t, nt);
#ifdef _OPENMP
#pragma omp barrier
#endif
            since = now_ns();
            if (t == 0) {
                if (c.n == 0) {
                    for (int d = 0; d < D; d++) {
                        if (rnd_mode == RND_NONE) ((float *)out)[d] = 0.f;
                        else ((uint16_t *)out)[d] = 0;
                    }
                }
                const int64_t t1 = now_ns();
                /* the counters first: the release store of the done flag publishes them with the result */
                stat[0] += 1;
                stat[1] += c.n;
                stat[2] += t1 - t0;
                stat[3] += now_ns() - t0;
                __atomic_store_n(&ctl[1], s, __ATOMIC_RELEASE);
                last = s;
                idle_since = t1;
            }
        }
    }
    free(parts);
    free(wts);
    free(buf);
    return 0;
}
