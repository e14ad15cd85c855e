/* One forward pass of a Llama-family decoder over ponder's KV cache, in plain C.
 *
 * Why: a small model's decode step is ~160 tiny operations; from Python each costs
 * 1-5 us of dispatch (numpy, torch), from C nothing. The KV cache, the rotary table,
 * the norms and the embedding are the torch model's own tensors, passed as pointers;
 * the matrices are a packed copy (see matmul), made once per model. The
 * maths is llama.py's: RMSNorm, fused q/k/v, rotate-half rotary embeddings (the sign
 * lives in the sin table), grouped-query attention, SwiGLU, optional biases.
 *
 * Shapes: R = B*T token rows (B sequences, T new tokens each); row b's token t sits in
 * own slot start[b] + t, at position plen[b] + start[b] + t, where plen[b] is the length
 * of the shared prefix the row reads (0 without one). KV cache per layer: [B, cap, KV,
 * D], contiguous; a shared prefix per row and layer: [plen[b], KV, D].
 * Built by llama_c.py with the system C compiler on first use.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* Built with OpenMP when it can be (llama_c.py), a pass of many rows splits across
 * threads: each matrix product by output panels, the per-row steps by rows. Every
 * value is computed by one thread in the same order as without threads, so the split
 * changes no bit. The OpenMP runtime is torch's own (same library, already loaded), so
 * its threads serve torch and the kernel in turn instead of fighting over the cores. */
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_thread_num(void) { return 0; }
static inline int omp_get_num_threads(void) { return 1; }
#endif

typedef struct {
    int hidden, heads, kv_heads, head_dim, ffn, layers, vocab;
    float eps;
    const float *embed;  /* [V, hidden] */
    const float *norm;   /* [hidden] */
    /* per layer (arrays of `layers` pointers; a missing bias is NULL); the matrices
     * wqkv, wo, wgu and wd packed in panels (see matmul) */
    const float **ln1, **wqkv, **bqkv, **wo, **bo, **ln2, **wgu, **bgu, **wd, **bd;
    /* Qwen3: each head's q and k RMS-normalised over head_dim before RoPE (NULL: none) */
    const float **qn, **kn;
    /* 1: the four packed matrices hold bfloat16 (uint16, the top half of a float32),
     * widened to float32 as they load; the head and everything else stay float32. A
     * speculative draft's copy: half the bytes, so a 0.3M-parameter draft's matrices
     * fit a 1 MiB L2 cache, and a draft's numbers change only which drafts are accepted,
     * never the output. */
    int bf16;
} Model;

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define HAVE_AVX2 1
static inline float hsum8(__m256 v) {
    __m128 a = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    a = _mm_add_ps(a, _mm_movehl_ps(a, a));
    a = _mm_add_ss(a, _mm_movehdup_ps(a));
    return _mm_cvtss_f32(a);
}
#endif

#ifdef HAVE_AVX2
/* s[4q + i] = w_i · x_q for 4 rows w_i (attention keys) and nr (1-3) rows x_q (queries);
 * inlined with a constant nr, so the 4·nr running sums stay in registers. */
static inline __attribute__((always_inline)) void block4(const float *const *w, const float *x, int in, int nr,
                                                         float *s) {
    __m256 acc[12];
    for (int i = 0; i < 4 * nr; i++) acc[i] = _mm256_setzero_ps();
    for (int k = 0; k < in; k += 8) {
        __m256 xv[3];
        for (int q = 0; q < nr; q++) xv[q] = _mm256_loadu_ps(x + (size_t)q * in + k);
        for (int i = 0; i < 4; i++) {
            __m256 wv = _mm256_loadu_ps(w[i] + k);
            for (int q = 0; q < nr; q++) acc[4 * q + i] = _mm256_fmadd_ps(wv, xv[q], acc[4 * q + i]);
        }
    }
    for (int i = 0; i < 4 * nr; i++) s[i] = hsum8(acc[i]);
}
#endif

/* Weights are used packed: W [out, in] as panels of 16 output columns, P[p][k][c] =
 * W[16p + c, k] (the last panel zero-padded), made once by llama_c.py. A panel then
 * streams through memory in order, and a tile of mr token rows × 16·np columns keeps
 * its 2·mr·np running sums in registers: each step of k loads 2·np weight vectors and
 * broadcasts mr inputs (outer products, no horizontal sums).
 *
 * Every output is one sum over k in increasing order, whatever the tile shape, so a
 * row's result does not depend on how many rows share the call: a sequence decodes to
 * the same bits alone, in a batch, or in a speculative verification pass. */
#define NR 16

static inline void put_tile(float *y, const float *s, const float *b, int j0, int ncol, int accumulate) {
#if defined(HAVE_AVX2) && defined(__AVX512F__)
    /* a whole panel in one vector (as a loop, gcc made it `rep movs`, slow to start) */
    if (ncol == NR) {
        __m512 v = _mm512_loadu_ps(s);
        if (b) v = _mm512_add_ps(v, _mm512_loadu_ps(b + j0));
        if (accumulate) v = _mm512_add_ps(_mm512_loadu_ps(y), v);
        _mm512_storeu_ps(y, v);
        return;
    }
#endif
    for (int c = 0; c < ncol; c++) {
        float v = s[c] + (b ? b[j0 + c] : 0.0f);
        y[c] = accumulate ? y[c] + v : v;
    }
}

/* Weights at w (float32, or bfloat16 when bf), widened to float32: 8 or 16 lanes. */
#ifdef HAVE_AVX2
static inline __attribute__((always_inline)) __m256 load8(const float *w, size_t i, int bf) {
    if (!bf) return _mm256_loadu_ps(w + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)w + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
#endif
static inline float load1(const float *w, size_t i, int bf) {
    if (!bf) return w[i];
    uint32_t u = (uint32_t)((const uint16_t *)w)[i] << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

#ifdef HAVE_AVX2
/* One tile: mr rows of x (stride in) × np consecutive panels from P, of which the first
 * `live` rows are real; the others repeat the last real row and are not stored (a
 * 5-row tile for 4 rows: see matmul_panels). Inlined with constant mr, live and np, so
 * the sums stay in registers. */
static inline __attribute__((always_inline)) void tile(float *y, const float *x, const float *P, const float *b,
                                                       int in, int out, int j0, int mr, int live, int np,
                                                       int accumulate, int bf) {
    /* acc[2·(np·r + q) + h]: row r, panel q, half h; at most 12 (mr·np <= 6), which
     * the compiler keeps in registers (a larger array it would spill) */
    __m256 acc[12];
    for (int i = 0; i < 2 * mr * np; i++) acc[i] = _mm256_setzero_ps();
    const size_t panel = (size_t)in * NR;
    for (int k = 0; k < in; k++) {
        const size_t w = (size_t)k * NR;
        for (int r = 0; r < mr; r++) {
            __m256 xb = _mm256_broadcast_ss(x + (size_t)(r < live ? r : live - 1) * in + k);
            for (int q = 0; q < np; q++) {
                acc[2 * (np * r + q)] = _mm256_fmadd_ps(load8(P, w + q * panel, bf), xb, acc[2 * (np * r + q)]);
                acc[2 * (np * r + q) + 1] =
                    _mm256_fmadd_ps(load8(P, w + q * panel + 8, bf), xb, acc[2 * (np * r + q) + 1]);
            }
        }
    }
    /* through memory from here: indexing the sums by a loop variable would make the
     * compiler keep them in memory during the loop above too */
    float s[12 * 8];
    for (int i = 0; i < 2 * mr * np; i++) _mm256_storeu_ps(s + 8 * i, acc[i]);
    for (int r = 0; r < live; r++)
        for (int q = 0; q < np; q++) {
            int j = j0 + q * NR, ncol = out - j < NR ? out - j : NR;
            put_tile(y + (size_t)r * out + j, s + NR * (np * r + q), b, j, ncol, accumulate);
        }
}

#ifdef __AVX512F__
#define HAVE_AVX512 1
static inline __attribute__((always_inline)) __m512 load16(const float *w, size_t i, int bf) {
    if (!bf) return _mm512_loadu_ps(w + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)w + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* tile() with 512-bit vectors: a panel's 16 columns are one vector, so each step of k
 * issues half the loads and FMAs. Every column is still one sum over k in increasing
 * order, fused multiply-adds as above: the same bits as the 256-bit tile. mr·np <= 24
 * sums, which with np weight vectors and a broadcast fit the 32 vector registers. */
static inline __attribute__((always_inline)) void tile512(float *y, const float *x, const float *P, const float *b,
                                                          int in, int out, int j0, int mr, int live, int np,
                                                          int accumulate, int bf) {
    __m512 acc[24];
    for (int i = 0; i < mr * np; i++) acc[i] = _mm512_setzero_ps();
    const size_t panel = (size_t)in * NR;
    for (int k = 0; k < in; k++) {
        const size_t w = (size_t)k * NR;
        for (int r = 0; r < mr; r++) {
            __m512 xb = _mm512_set1_ps(x[(size_t)(r < live ? r : live - 1) * in + k]);
            for (int q = 0; q < np; q++)
                acc[np * r + q] = _mm512_fmadd_ps(load16(P, w + q * panel, bf), xb, acc[np * r + q]);
        }
    }
    float s[24 * NR];
    for (int i = 0; i < mr * np; i++) _mm512_storeu_ps(s + NR * i, acc[i]);
    for (int r = 0; r < live; r++)
        for (int q = 0; q < np; q++) {
            int j = j0 + q * NR, ncol = out - j < NR ? out - j : NR;
            put_tile(y + (size_t)r * out + j, s + NR * (np * r + q), b, j, ncol, accumulate);
        }
}
#endif

#endif

/* Element i of packed weights P (float32, or bfloat16 when bf), as a pointer. */
static inline const float *at(const float *P, size_t i, int bf) {
    return bf ? (const float *)((const uint16_t *)P + i) : P + i;
}

#ifdef HAVE_AVX2
/* Tiles of mr rows over panels [p0, p1): enough panels per tile (np) that 8 or more
 * independent sums hide the FMA latency (twice as many lanes per sum with 512-bit
 * vectors), one panel at a time at the end. */
static inline __attribute__((always_inline)) void rows_tile(float *y, const float *x, const float *P,
                                                            const float *b, int in, int out, int p0, int p1,
                                                            int mr, int live, int accumulate, int bf) {
    const size_t panel = (size_t)in * NR;
    int p = p0;
#ifdef HAVE_AVX512
    const int np = mr == 1 ? 8 : mr <= 3 ? 4 : mr <= 4 ? 3 : 2;
#define TILE tile512
#else
    const int np = mr == 1 ? 4 : mr <= 3 ? 2 : 1;
#define TILE tile
#endif
    for (; p + np <= p1; p += np) TILE(y, x, at(P, p * panel, bf), b, in, out, p * NR, mr, live, np, accumulate, bf);
    for (; p < p1; p++) TILE(y, x, at(P, p * panel, bf), b, in, out, p * NR, mr, live, 1, accumulate, bf);
#undef TILE
}
#endif

/* y[r, :] = W x[r, :] + b (or y += ... when accumulate) for rows r < R, over output
 * panels [p0, p1) (all of them: 0, ceil(out / 16)). P is W packed. */
static inline __attribute__((always_inline)) void matmul_panels(float *y, const float *x, const float *P,
                                                                const float *b, int R, int in, int out, int p0,
                                                                int p1, int accumulate, int bf) {
#ifdef HAVE_AVX2
    /* a few panels at a time, each then reused from L2 by every block of rows (blocks of
     * 6 rows, 12 sums, then the rest): ~256 KiB of panels, so that a large model's
     * weights stream from memory once per pass, not once per block of rows */
    int group = (int)(262144 / ((size_t)in * NR * sizeof(float)));
    group = group < 2 ? 2 : group > 8 ? 8 : group;
    for (int g = p0; g < p1; g += group) {
        int g1 = g + group < p1 ? g + group : p1;
        for (int r = 0; r < R;) {
            /* Blocks of 6 rows, but never a 4-row tile: its 8 sums are too few to hide
             * the FMA latency here (4 rows took 223 us where 5 took 192, arith's
             * matrices, one thread). So 10 -> 5 + 5, 8 -> 5 + 3, and 4 runs as a 5-row
             * tile whose fifth row repeats the fourth and is not stored. */
            int left = R - r, mr = left == 10 || left == 8 ? 5 : left < 6 ? left : 6;
            float *yr = y + (size_t)r * out;
            const float *xr = x + (size_t)r * in;
            switch (mr) {
            case 6: rows_tile(yr, xr, P, b, in, out, g, g1, 6, 6, accumulate, bf); break;
            case 5: rows_tile(yr, xr, P, b, in, out, g, g1, 5, 5, accumulate, bf); break;
            case 4: rows_tile(yr, xr, P, b, in, out, g, g1, 5, 4, accumulate, bf); break;
            case 3: rows_tile(yr, xr, P, b, in, out, g, g1, 3, 3, accumulate, bf); break;
            case 2: rows_tile(yr, xr, P, b, in, out, g, g1, 2, 2, accumulate, bf); break;
            default: rows_tile(yr, xr, P, b, in, out, g, g1, 1, 1, accumulate, bf); break;
            }
            r += mr;
        }
    }
#else
    /* the same sums (each over k in increasing order) without vector intrinsics */
    const size_t panel = (size_t)in * NR;
    for (int p = p0; p < p1; p++) {
        int j0 = p * NR, ncol = out - j0 < NR ? out - j0 : NR;
        for (int r = 0; r < R; r++) {
            float s[NR] = {0};
            const float *xr = x + (size_t)r * in, *w = at(P, p * panel, bf);
            for (int k = 0; k < in; k++)
                for (int c = 0; c < NR; c++) s[c] += load1(w, (size_t)k * NR + c, bf) * xr[k];
            put_tile(y + (size_t)r * out + j0, s, b, j0, ncol, accumulate);
        }
    }
#endif
}

/* In a parallel pass, each thread computes its share of the output panels, then waits
 * for the others: what follows reads every column. */
static void matmul(float *y, const float *x, const float *P, const float *b, int R, int in, int out, int accumulate,
                   int bf) {
    int panels = (out + NR - 1) / NR, t = omp_get_thread_num(), n = omp_get_num_threads();
    /* one instance per weight type, so the test on bf leaves the inner loops */
    if (bf) matmul_panels(y, x, P, b, R, in, out, panels * t / n, panels * (t + 1) / n, accumulate, 1);
    else matmul_panels(y, x, P, b, R, in, out, panels * t / n, panels * (t + 1) / n, accumulate, 0);
#pragma omp barrier
}

/* p[g·stride_p + j] = q_g · K_j for the G query heads of one KV head (q: [G, D]) and
 * key slots j < n (K_j = K + j·k_stride): a small matrix product with the slots as
 * weight rows, so four slots share each query load (block4 when it applies). */
static void scores(float *p, const float *q, const float *K, size_t k_stride, int64_t n, int G, int D,
                   int64_t stride_p) {
    int64_t j = 0;
#ifdef HAVE_AVX2
    if (D % 8 == 0 && G <= 3) {
        float s4[12];
        for (; j + 4 <= n; j += 4) {
            const float *ws[4] = {K + (size_t)j * k_stride, K + (size_t)(j + 1) * k_stride,
                                  K + (size_t)(j + 2) * k_stride, K + (size_t)(j + 3) * k_stride};
            if (G == 1) block4(ws, q, D, 1, s4);
            else if (G == 2) block4(ws, q, D, 2, s4);
            else block4(ws, q, D, 3, s4);
            for (int g = 0; g < G; g++)
                for (int i = 0; i < 4; i++) p[g * stride_p + j + i] = s4[4 * g + i];
        }
    }
#endif
    for (; j < n; j++) {
        const float *kj = K + (size_t)j * k_stride;
        for (int g = 0; g < G; g++) {
            const float *qh = q + (size_t)g * D;
            float s = 0.0f;
            for (int d = 0; d < D; d++) s += qh[d] * kj[d];
            p[g * stride_p + j] = s;
        }
    }
}

#ifdef HAVE_AVX2
/* o[d0 .. d0 + 8·nv) += sum_j w[j]·V_j over n slots (V_j = V + j·stride); inlined with a
 * constant nv, so the 8·nv sums stay in registers across the whole loop over slots. */
static inline __attribute__((always_inline)) void wsum_chunk(float *o, const float *w, int64_t n, const float *V,
                                                             size_t stride, int d0, int nv) {
    __m256 acc[8];
    for (int i = 0; i < nv; i++) acc[i] = _mm256_loadu_ps(o + d0 + 8 * i);
    for (int64_t j = 0; j < n; j++) {
        const float *vj = V + (size_t)j * stride + d0;
        __m256 wj = _mm256_broadcast_ss(w + j);
        for (int i = 0; i < nv; i++) acc[i] = _mm256_fmadd_ps(wj, _mm256_loadu_ps(vj + 8 * i), acc[i]);
    }
    for (int i = 0; i < nv; i++) _mm256_storeu_ps(o + d0 + 8 * i, acc[i]);
}
#endif

/* o += sum_j w[j]·V_j for one head over n slots, D floats each. */
static void wsum(float *o, const float *w, int64_t n, const float *V, size_t stride, int D) {
#ifdef HAVE_AVX2
    if (D % 8 == 0) {
        for (int d0 = 0; d0 < D; d0 += 64) {
            switch ((D - d0) / 8 >= 8 ? 8 : (D - d0) / 8) {
            case 8: wsum_chunk(o, w, n, V, stride, d0, 8); break;
            case 7: wsum_chunk(o, w, n, V, stride, d0, 7); break;
            case 6: wsum_chunk(o, w, n, V, stride, d0, 6); break;
            case 5: wsum_chunk(o, w, n, V, stride, d0, 5); break;
            case 4: wsum_chunk(o, w, n, V, stride, d0, 4); break;
            case 3: wsum_chunk(o, w, n, V, stride, d0, 3); break;
            case 2: wsum_chunk(o, w, n, V, stride, d0, 2); break;
            default: wsum_chunk(o, w, n, V, stride, d0, 1); break;
            }
        }
        return;
    }
#endif
    for (int64_t j = 0; j < n; j++) {
        const float *vj = V + (size_t)j * stride;
        for (int d = 0; d < D; d++) o[d] += w[j] * vj[d];
    }
}

/* One head's attention output: o = (sum_j p[j]·V_j) · inv_sum over the shared prefix's
 * `pre` slots (PV) then the row's own `own` slots (V), both with slot stride `stride`. */
static void weighted_sum(float *o, const float *p, float inv_sum, int64_t pre, const float *PV, int64_t own,
                         const float *V, size_t stride, int D) {
    for (int d = 0; d < D; d++) o[d] = 0.0f;
    if (pre) wsum(o, p, pre, PV, stride, D);
    wsum(o, p + pre, own, V, stride, D);
    for (int d = 0; d < D; d++) o[d] *= inv_sum;
}

/* x·cos + roll(x, D/2)·sin for one head (sin carries rotate-half's sign). */
static void rope(float *x, const float *cos, const float *sin, int D) {
    int h = D / 2;
    for (int i = 0; i < h; i++) {
        float a = x[i], c = x[i + h];
        x[i] = a * cos[i] + c * sin[i];
        x[i + h] = c * cos[i + h] + a * sin[i + h];
    }
}

/* Denormals (softmax weights of far-off keys, exp of large negatives) cost a microcode
 * assist per operation, and a small model makes many: the kernel flushes them to zero
 * while it runs (they are below 1e-38, far under float32's precision at the scale of
 * the results) and restores the caller's floating-point mode on return. */
#if defined(__SSE__)
#include <xmmintrin.h>
#define FAST_FP_BEGIN unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040); /* FTZ | DAZ */
#define FAST_FP_END _mm_setcsr(saved_csr);
#else
#define FAST_FP_BEGIN
#define FAST_FP_END
#endif

/* What one forward pass reads and writes, for run_pass. */
typedef struct {
    const Model *m;
    int B, T, n_sel, head_rows;
    const int64_t *start, *plen, *sel;
    float *const *kc, *const *vc;
    const float *const *pk, *const *pv;
    int64_t cap, stride;
    const float *cos, *sin, *head, *head_bias;
    float *x, *xn, *qkv, *att, *gu, *act, *p_all, *logits;
} Pass;

/* The layers and the head over the embedded rows in s->x, run by every thread of a
 * parallel team or by the caller alone (a one-thread pass skips the OpenMP runtime:
 * entering a region of one thread still cost futex calls, ~8% of a draft model's
 * step): `omp for` loops share out rows (and wait for each other at their end),
 * matmul shares out panels. */
static inline __attribute__((always_inline)) void run_pass(const Pass *s) {
    const Model *m = s->m;
    const int h = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, F = m->ffn;
    const int B = s->B, T = s->T, G = H / KV, R = B * T, QKV = (H + 2 * KV) * D, n_sel = s->n_sel;
    const int head_rows = s->head_rows;
    const float scale = 1.0f / sqrtf((float)D);
    const int64_t *start = s->start, *plen = s->plen, *sel = s->sel, cap = s->cap, stride = s->stride;
    float *const *kc = s->kc, *const *vc = s->vc;
    const float *const *pk = s->pk, *const *pv = s->pv;
    const float *cos = s->cos, *sin = s->sin, *head = s->head, *head_bias = s->head_bias;
    float *x = s->x, *xn = s->xn, *qkv = s->qkv, *att = s->att, *gu = s->gu, *act = s->act, *logits = s->logits;
    FAST_FP_BEGIN /* per thread (the pool's threads too), restored at the end */
    float *p = s->p_all + (size_t)G * stride * omp_get_thread_num();
    for (int l = 0; l < m->layers; l++) {
#pragma omp for schedule(static)
        for (int r = 0; r < R; r++) rmsnorm(xn + (size_t)r * h, x + (size_t)r * h, m->ln1[l], h, m->eps);
        matmul(qkv, xn, m->wqkv[l], m->bqkv[l], R, h, QKV, 0, m->bf16);
        /* rotate q and k, then store k and v at each token's slot */
#pragma omp for schedule(static)
        for (int r = 0; r < R; r++) {
            int b = r / T, t = r % T;
            int64_t pos = start[b] + t, at = pos + (plen ? plen[b] : 0); /* own slot; position */
            float *row = qkv + (size_t)r * QKV;
            if (m->qn && m->qn[l]) {
                for (int i = 0; i < H; i++) rmsnorm(row + (size_t)i * D, row + (size_t)i * D, m->qn[l], D, m->eps);
                for (int i = H; i < H + KV; i++) rmsnorm(row + (size_t)i * D, row + (size_t)i * D, m->kn[l], D, m->eps);
            }
            for (int i = 0; i < H + KV; i++) rope(row + (size_t)i * D, cos + at * D, sin + at * D, D);
            size_t slot = ((size_t)b * cap + pos) * KV * D;
            memcpy(kc[l] + slot, row + (size_t)H * D, sizeof(float) * KV * D);
            memcpy(vc[l] + slot, row + (size_t)(H + KV) * D, sizeof(float) * KV * D);
        }
        /* causal attention: the token in own slot pos sees its row's shared prefix (if
         * any, stored once for all rows of its group: cascade attention) and own slots
         * 0..pos; one softmax runs over both parts */
#pragma omp for schedule(static)
        for (int r = 0; r < R; r++) {
            int b = r / T, t = r % T;
            int64_t pos = start[b] + t, pre = plen ? plen[b] : 0, n = pre + pos + 1;
            const float *PK = pre ? pk[(size_t)b * m->layers + l] : NULL;
            const float *PV = pre ? pv[(size_t)b * m->layers + l] : NULL;
            const float *row = qkv + (size_t)r * QKV;
            float *o = att + (size_t)r * H * D;
            for (int g0 = 0; g0 < KV; g0++) { /* the G query heads that read KV head g0 */
                const float *K = kc[l] + (size_t)b * cap * KV * D + (size_t)g0 * D;
                const float *V = vc[l] + (size_t)b * cap * KV * D + (size_t)g0 * D;
                const float *qg = row + (size_t)g0 * G * D; /* [G, D], contiguous */
                if (pre) scores(p, qg, PK + (size_t)g0 * D, (size_t)KV * D, pre, G, D, stride);
                scores(p + pre, qg, K, (size_t)KV * D, pos + 1, G, D, stride);
                for (int g = 0; g < G; g++) {
                    float *pg = p + (size_t)g * stride, mx = -FLT_MAX, sum = 0.0f;
                    for (int64_t j = 0; j < n; j++) {
                        pg[j] *= scale;
                        if (pg[j] > mx) mx = pg[j];
                    }
                    for (int64_t j = 0; j < n; j++) {
                        pg[j] = expf(pg[j] - mx);
                        sum += pg[j];
                    }
                    float *oh = o + (size_t)(g0 * G + g) * D;
                    weighted_sum(oh, pg, 1.0f / sum, pre, pre ? PV + (size_t)g0 * D : NULL, pos + 1, V,
                                 (size_t)KV * D, D);
                }
            }
        }
        matmul(x, att, m->wo[l], m->bo[l], R, H * D, h, 1, m->bf16); /* residual */
#pragma omp for schedule(static)
        for (int r = 0; r < R; r++) rmsnorm(xn + (size_t)r * h, x + (size_t)r * h, m->ln2[l], h, m->eps);
        matmul(gu, xn, m->wgu[l], m->bgu[l], R, h, 2 * F, 0, m->bf16);
#pragma omp for schedule(static)
        for (int r = 0; r < R; r++) {
            const float *g = gu + (size_t)r * 2 * F, *u = g + F;
            float *a = act + (size_t)r * F;
            for (int i = 0; i < F; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        matmul(x, act, m->wd[l], m->bd[l], R, F, h, 1, m->bf16); /* residual */
    }
#pragma omp for schedule(static)
    for (int r = 0; r < R; r++) rmsnorm(xn + (size_t)r * h, x + (size_t)r * h, m->norm, h, m->eps);
    if (sel) { /* gather the selected rows, then one product */
#pragma omp for schedule(static)
        for (int i = 0; i < n_sel; i++) memcpy(x + (size_t)i * h, xn + (size_t)sel[i] * h, sizeof(float) * h);
        matmul(logits, x, head, head_bias, n_sel, h, head_rows, 0, 0);
    } else {
        matmul(logits, xn, head, head_bias, R, h, head_rows, 0, 0);
    }
    FAST_FP_END
}

/* The whole pass, on `threads` threads. `logits` [n_sel, head_rows] receives head·h
 * (+ head_bias; head packed) for the token rows listed in `sel` (NULL: every row, in
 * order, n_sel ignored). Returns 0; 1 if scratch memory could not be allocated; 2 if a
 * token id is outside [0, vocab). */
int ponder_forward(const Model *m, const int64_t *ids, int B, int T, const int64_t *start,
                   float *const *kc, float *const *vc, int64_t cap, const float *const *pk, const float *const *pv,
                   const int64_t *plen, const float *cos, const float *sin, const float *head,
                   const float *head_bias, int head_rows, const int64_t *sel, int n_sel, float *logits,
                   int threads) {
    const int h = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, F = m->ffn;
    const int G = H / KV, R = B * T, QKV = (H + 2 * KV) * D;
    for (int r = 0; r < R; r++)
        if (ids[r] < 0 || ids[r] >= m->vocab) return 2;
    int64_t span = 0, max_pre = 0; /* own slots; longest shared prefix */
    for (int b = 0; b < B; b++) {
        if (start[b] + T > span) span = start[b] + T;
        if (plen && plen[b] > max_pre) max_pre = plen[b];
    }
    if (threads < 1) threads = 1;
    const int64_t stride = max_pre + span; /* of p: one row of scores per query head */
    float *x = malloc(sizeof(float) * (size_t)R * h);
    float *xn = malloc(sizeof(float) * (size_t)R * h);
    float *qkv = malloc(sizeof(float) * (size_t)R * QKV);
    float *att = malloc(sizeof(float) * (size_t)R * H * D);
    float *gu = malloc(sizeof(float) * (size_t)R * 2 * F);
    float *act = malloc(sizeof(float) * (size_t)R * F);
    float *p_all = malloc(sizeof(float) * (size_t)G * stride * threads); /* a score buffer per thread */
    if (!x || !xn || !qkv || !att || !gu || !act || !p_all) {
        free(x); free(xn); free(qkv); free(att); free(gu); free(act); free(p_all);
        return 1;
    }
    for (int r = 0; r < R; r++) memcpy(x + (size_t)r * h, m->embed + (size_t)ids[r] * h, sizeof(float) * h);

    Pass pass = {m, B, T, n_sel, head_rows, start, plen, sel, kc, vc, pk, pv, cap, stride, cos, sin, head,
                 head_bias, x, xn, qkv, att, gu, act, p_all, logits};
    if (threads > 1) {
#pragma omp parallel num_threads(threads)
        run_pass(&pass);
    } else {
        run_pass(&pass);
    }
    free(x); free(xn); free(qkv); free(att); free(gu); free(act); free(p_all);
    return 0;
}


/* The first index of the largest of x[0..n), as torch.argmax. */
static int argmax(const float *x, int n) {
    int best = 0;
    for (int v = 1; v < n; v++)
        if (x[v] > x[best]) best = v;
    return best;
}

/* log softmax(l)[b] over n logits, summed in double: what the Python step path
 * reports as a token's log-probability. */
static float log_prob(const float *l, int n, int b) {
    int top = argmax(l, n);
    double sum = 0.0;
    for (int v = 0; v < n; v++) sum += exp((double)l[v] - l[top]);
    return (float)((double)l[b] - l[top] - log(sum));
}

/* Greedy drafting for speculative decoding: k passes of one row, the first over the
 * n_feed pending tokens, each next one over the previous pass's argmax. tokens[0..k)
 * receives the k argmaxes; the cache ends holding the feed and tokens[0..k-1) (the last
 * draft is not fed), and *start advances to match. One call instead of k round trips
 * through Python, which on a small draft model cost more than its arithmetic. */
int ponder_greedy_draft(const Model *m, const int64_t *feed, int n_feed, int k, int64_t *start,
                        float *const *kc, float *const *vc, int64_t cap, const float *cos, const float *sin,
                        const float *head, int head_rows, int64_t *tokens) {
    float *logits = malloc(sizeof(float) * (size_t)head_rows);
    if (!logits) return 1;
    int64_t prev[1];
    const int64_t *ids = feed;
    int T = n_feed;
    for (int i = 0; i < k; i++) {
        int64_t last = T - 1;
        int status = ponder_forward(m, ids, 1, T, start, kc, vc, cap, NULL, NULL, NULL, cos, sin, head, NULL,
                                    head_rows, &last, 1, logits, 1);
        if (status) {
            free(logits);
            return status;
        }
        *start += T;
        tokens[i] = prev[0] = argmax(logits, head_rows);
        ids = prev;
        T = 1;
    }
    free(logits);
    return 0;
}

/* Multi-step greedy decoding of one row in one call (vLLM's multi-step scheduling):
 * feed `first`, then up to n times take the argmax (tokens[i], its log-probability
 * lps[i]) and feed it, stopping after a token in stop[0..n_stop), which is not fed.
 * After n tokens, the last is fed too if `feed_last` (its pass writes `logits`
 * [head_rows], the next token's distribution), else not (the row ends there).
 * While i < ban_steps, the ids ban[0..n_ban) are never picked (min_tokens).
 * Returns the number of tokens written (negative on failure: -1 memory, -2 token id,
 * -3 every token banned);
 * *start advances by the tokens fed. Between tokens nothing returns to Python, which
 * at batch 1 on a small model costs as much as the arithmetic. */
int ponder_greedy_steps(const Model *m, int64_t first, int n, int64_t *start, float *const *kc, float *const *vc,
                        int64_t cap, const float *cos, const float *sin, const float *head, int head_rows,
                        const int64_t *stop, int n_stop, const int64_t *ban, int n_ban, int ban_steps, int feed_last,
                        int64_t *tokens, float *lps, float *logits, int threads) {
    int64_t id[1] = {first}, last = 0;
    for (int i = 0; i < n; i++) {
        int status = ponder_forward(m, id, 1, 1, start, kc, vc, cap, NULL, NULL, NULL, cos, sin, head, NULL,
                                    head_rows, &last, 1, logits, threads);
        if (status) return -status;
        *start += 1;
        /* the argmax outside ban[] while the ban lasts (min_tokens); the log-probability is
           the model's own, over every token, as the step path reports it */
        int b = -1;
        for (int v = 0; v < head_rows; v++) {
            int banned = 0;
            for (int j = 0; i < ban_steps && j < n_ban; j++) banned |= ban[j] == v;
            if (!banned && (b < 0 || logits[v] > logits[b])) b = v;
        }
        if (b < 0) return -3; /* everything banned */
        tokens[i] = b;
        lps[i] = log_prob(logits, head_rows, b);
        for (int j = 0; j < n_stop; j++)
            if (stop[j] == b) return i + 1;
        id[0] = b;
    }
    if (feed_last) {
        int status = ponder_forward(m, id, 1, 1, start, kc, vc, cap, NULL, NULL, NULL, cos, sin, head, NULL,
                                    head_rows, &last, 1, logits, threads);
        if (status) return -status;
        *start += 1;
    }
    return n;
}

/* One round of greedy speculative decoding in one call: the draft model `dm` drafts k
 * tokens after its pending `d_feed`; the target `tm` scores its pending `t_feed` and the
 * drafts in one pass; best[j] is the target's argmax after j drafts and lp[j] its
 * log-probability (j = 0..k). Returns a, the number of drafts equal to the target's
 * argmax (so the round emits drafts[0..a) and best[a]), and rolls both caches back to
 * what was accepted: the target holds t_feed + drafts[0..a), the draft d_feed +
 * drafts[0..min(a, k-1)). Negative on failure (-1 memory, -2 token id). */
int ponder_greedy_round(const Model *tm, const Model *dm, const int64_t *t_feed, int n_tfeed, const int64_t *d_feed,
                        int n_dfeed, int k, int64_t *t_start, float *const *tkc, float *const *tvc, int64_t tcap,
                        const float *tcos, const float *tsin, const float *thead, int64_t *d_start,
                        float *const *dkc, float *const *dvc, int64_t dcap, const float *dcos, const float *dsin,
                        const float *dhead, int vocab, int64_t *drafts, int64_t *best, float *lp, int threads) {
    int status = ponder_greedy_draft(dm, d_feed, n_dfeed, k, d_start, dkc, dvc, dcap, dcos, dsin, dhead, vocab, drafts);
    if (status) return -status;
    int T = n_tfeed + k;
    int64_t *ids = malloc(sizeof(int64_t) * (size_t)T), *sel = malloc(sizeof(int64_t) * (size_t)(k + 1));
    float *logits = malloc(sizeof(float) * (size_t)(k + 1) * vocab);
    if (!ids || !sel || !logits) {
        free(ids); free(sel); free(logits);
        return -1;
    }
    memcpy(ids, t_feed, sizeof(int64_t) * n_tfeed);
    memcpy(ids + n_tfeed, drafts, sizeof(int64_t) * k);
    for (int j = 0; j <= k; j++) sel[j] = n_tfeed - 1 + j;
    status = ponder_forward(tm, ids, 1, T, t_start, tkc, tvc, tcap, NULL, NULL, NULL, tcos, tsin, thead, NULL,
                            vocab, sel, k + 1, logits, threads);
    if (status) {
        free(ids); free(sel); free(logits);
        return -status;
    }
    *t_start += T;
    int a = -1;
    for (int j = 0; j <= k; j++) {
        const float *l = logits + (size_t)j * vocab;
        int b = argmax(l, vocab);
        best[j] = b;
        lp[j] = log_prob(l, vocab, b);
        if (a < 0 && (j == k || drafts[j] != b)) a = j;
    }
    *t_start -= k - a;         /* the target keeps t_feed + drafts[0..a) */
    if (a < k) *d_start -= k - 1 - a; /* the draft holds d_feed + drafts[0..k-1): keep drafts[0..a) */
    free(ids); free(sel); free(logits);
    return a;
}

/* Greedy speculative decoding of one row, round after round in one call, until a stop
 * token or `budget` tokens (what gpt-fast's loop does in Python, without returning
 * there between rounds). Each round is ponder_greedy_round with the pending tokens it
 * leaves: the target's is the token it added, the draft's that one (and the last
 * draft when every draft was accepted). A round drafts min(k, budget - emitted - 1)
 * tokens; with `adaptive`, k grows by 2 (at most 16) after a round accepted whole
 * and shrinks by 1 (at least 1) otherwise. Writes the emitted tokens and their
 * log-probabilities to out/out_lp, stats[0..5) = drafted, accepted, rounds, tokens
 * the target computed, tokens the draft computed, and stats[5] the final k; the
 * pending tokens to t_pend (1) and d_pend (stats[6] of them, at most 2). Returns the
 * number of tokens emitted; negative on failure (-1 memory, -2 token id). */
int ponder_greedy_speculate(const Model *tm, const Model *dm, const int64_t *t_feed, int n_tfeed,
                            const int64_t *d_feed, int n_dfeed, int k, int adaptive, int budget, const int64_t *stop,
                            int n_stop, int64_t *t_start, float *const *tkc, float *const *tvc, int64_t tcap,
                            const float *tcos, const float *tsin, const float *thead, int64_t *d_start,
                            float *const *dkc, float *const *dvc, int64_t dcap, const float *dcos, const float *dsin,
                            const float *dhead, int vocab, int64_t *out, float *out_lp, int64_t *stats,
                            int64_t *t_pend, int64_t *d_pend, int threads) {
    enum { KMAX = 16 };
    int64_t drafts[KMAX], best[KMAX + 1], tf[2], df[2];
    float lp[KMAX + 1];
    const int64_t *tp = t_feed, *dp = d_feed;
    int ntf = n_tfeed, ndf = n_dfeed, emitted = 0, kcur = k < 1 ? 1 : (k > KMAX ? KMAX : k);
    for (int j = 0; j < 5; j++) stats[j] = 0;
    for (;;) {
        int kk = budget - emitted - 1 < kcur ? budget - emitted - 1 : kcur;
        if (kk <= 0) break;
        int a = ponder_greedy_round(tm, dm, tp, ntf, dp, ndf, kk, t_start, tkc, tvc, tcap, tcos, tsin, thead,
                                    d_start, dkc, dvc, dcap, dcos, dsin, dhead, vocab, drafts, best, lp, threads);
        if (a < 0) return a;
        stats[0] += kk; stats[1] += a; stats[2] += 1; stats[3] += ntf + kk; stats[4] += ndf + kk - 1;
        int64_t next = best[a];
        int done = 0;
        for (int j = 0; j <= a && !done; j++) { /* emit drafts[0..a) and the target's token */
            int64_t tok = j < a ? drafts[j] : next;
            out[emitted] = tok;
            out_lp[emitted] = lp[j];
            emitted++;
            for (int s = 0; s < n_stop; s++) done |= stop[s] == tok;
            done |= emitted >= budget;
        }
        tf[0] = next; tp = tf; ntf = 1;
        if (a == kk) { df[0] = drafts[kk - 1]; df[1] = next; ndf = 2; } else { df[0] = next; ndf = 1; }
        dp = df;
        if (adaptive) kcur = a == kk ? (kcur + 2 > KMAX ? KMAX : kcur + 2) : (kcur > 1 ? kcur - 1 : 1);
        if (done) break;
    }
    stats[5] = kcur;
    t_pend[0] = tp[ntf - 1];
    for (int j = 0; j < ndf && j < 2; j++) d_pend[j] = dp[ndf - (ndf > 2 ? 2 : ndf) + j];
    stats[6] = ndf > 2 ? 2 : ndf;
    return emitted;
}

/* Prompt lookup (Saxena 2023): up to k tokens that followed the latest earlier
 * occurrence of ctx's last n-gram, n from max_n down to 1; written to out, counted. */
static int ngram_lookup(const int64_t *ctx, int64_t n_ctx, int max_n, int k, int64_t *out) {
    for (int n = max_n < n_ctx - 1 ? max_n : (int)n_ctx - 1; n >= 1; n--) {
        const int64_t *tail = ctx + n_ctx - n;
        for (int64_t s = n_ctx - n - 1; s >= 0; s--) {
            int same = 1;
            for (int j = 0; j < n && same; j++) same = ctx[s + j] == tail[j];
            if (!same) continue;
            int got = 0;
            for (int64_t j = s + n; j < n_ctx && got < k; j++) out[got++] = ctx[j];
            if (got) return got;
        }
    }
    return 0;
}

/* Greedy decoding of one row with prompt-lookup drafts, round after round in one
 * call, until a stop token or `budget` tokens. ctx[0..n_ctx) is the prompt and the
 * tokens emitted so far; its last token is pending (not yet in the cache); ctx has
 * room for `budget` more. Each round drafts up to min(k, budget - emitted - 1) tokens
 * by lookup, and one target pass over the pending token and the drafts gives the
 * argmax after each: the drafts that equal it are accepted, plus the target's next
 * token, exactly plain greedy's tokens. A draft is a bet: a pass over 1 + d tokens
 * costs more than over one, so drafting is switched off while it does not pay:
 * `credit` (in/out) tracks the recent acceptance (an exponential average of
 * accepted/drafted per drafting round); below 1/4 the row decodes plainly, and drafts
 * again only on every 16th round (a probe, which lifts the credit if the drafts now
 * match). stats as ponder_greedy_speculate's (no draft model: stats[4] is 0).
 * Returns the tokens emitted; negative on failure. */
int ponder_ngram_speculate(const Model *m, int64_t *ctx, int64_t n_ctx, int k, int max_n, int budget,
                           const int64_t *stop, int n_stop, int64_t *start, float *const *kc, float *const *vc,
                           int64_t cap, const float *cos, const float *sin, const float *head, int vocab,
                           int64_t *out, float *out_lp, int64_t *stats, float *credit, int threads) {
    enum { KMAX = 16 };
    int64_t ids[KMAX + 1], sel[KMAX + 1];
    float *logits = malloc(sizeof(float) * (size_t)(KMAX + 1) * vocab);
    if (!logits) return -1;
    int emitted = 0, kcur = k < 1 ? 1 : (k > KMAX ? KMAX : k), since_probe = 0;
    float c = *credit;
    for (int j = 0; j < 6; j++) stats[j] = 0;
    for (;;) {
        int room = budget - emitted - 1;
        if (room < 0) break;
        int kk = room < kcur ? room : kcur, d = 0;
        int drafting = c >= 0.25f || ++since_probe >= 16;
        if (kk > 0 && drafting) d = ngram_lookup(ctx, n_ctx, max_n, kk, ids + 1);
        if (d > 0) since_probe = 0;
        ids[0] = ctx[n_ctx - 1];
        for (int j = 0; j <= d; j++) sel[j] = j;
        int status = ponder_forward(m, ids, 1, d + 1, start, kc, vc, cap, NULL, NULL, NULL, cos, sin, head, NULL,
                                    vocab, sel, d + 1, logits, threads);
        if (status) { free(logits); return -status; }
        int a = 0, done = 0; /* a: drafts accepted (and emitted) */
        for (int j = 0; j <= d; j++) {
            const float *l = logits + (size_t)j * vocab;
            int b = argmax(l, vocab);
            out[emitted] = b;
            out_lp[emitted] = log_prob(l, vocab, b);
            ctx[n_ctx++] = b;
            emitted++;
            for (int s = 0; s < n_stop; s++) done |= stop[s] == b;
            done |= emitted >= budget;
            if (j < d && ids[1 + j] == b) a = j + 1;
            if (done || j == d || ids[1 + j] != b) break;
        }
        *start += 1 + a; /* the cache keeps the pending token and the accepted drafts */
        stats[0] += d; stats[1] += a; stats[2] += 1; stats[3] += 1 + d;
        if (d > 0) c = 0.7f * c + 0.3f * (float)a / (float)d;
        if (done) break;
    }
    *credit = c;
    stats[5] = kcur;
    free(logits);
    return emitted;
}

/* 1 if the kernel was built with OpenMP (passes can use several threads), else 0. */
int ponder_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* The instruction sets this build was compiled to use (bit 0 AVX2, 1 FMA, 2 AVX-512F),
   so that the loader can refuse a cached build the CPU cannot run before calling in. */
int ponder_isa(void) {
    int isa = 0;
#ifdef __AVX2__
    isa |= 1;
#endif
#ifdef __FMA__
    isa |= 2;
#endif
#ifdef __AVX512F__
    isa |= 4;
#endif
    return isa;
}
