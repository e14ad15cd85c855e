/* One forward pass of a Llama-family decoder over ponder's KV cache, in plain C.
 *
 * Why: a small model's decode step is ~160 tiny operations; from Python each costs
 * 1-5 us of dispatch (numpy, torch), from C nothing. The weights, the KV cache and the
 * rotary table are the torch model's own tensors, passed as pointers (no copy). The
 * maths is llama.py's: RMSNorm, fused q/k/v, rotate-half rotary embeddings (the sign
 * lives in the sin table), grouped-query attention, SwiGLU, optional biases.
 *
 * Shapes: R = B*T token rows (B sequences, T new tokens each); row b's token t sits at
 * position start[b] + t. KV cache per layer: [B, cap, KV, D], contiguous.
 * Built by llama_c.py with the system C compiler on first use.
 */
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    int hidden, heads, kv_heads, head_dim, ffn, layers;
    float eps;
    const float *embed;  /* [V, hidden] */
    const float *norm;   /* [hidden] */
    /* per layer (arrays of `layers` pointers; a missing bias is NULL) */
    const float **ln1, **wqkv, **bqkv, **wo, **bo, **ln2, **wgu, **bgu, **wd, **bd;
} Model;

static void rmsnorm(float *out, const float *x, const float *w, int n, float eps) {
    float ss = 0.0f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* y[r, :] = W x[r, :] + b (or y += ... when accumulate), W: [out, in] row-major.
 * Four weight rows at a time against every token row: the weights, which dominate the
 * memory traffic, are read once per call however many tokens there are. */
static void matmul(float *y, const float *x, const float *W, const float *b, int R, int in, int out,
                   int accumulate) {
    int j = 0;
    for (; j + 4 <= out; j += 4) {
        const float *w0 = W + (size_t)j * in, *w1 = w0 + in, *w2 = w1 + in, *w3 = w2 + in;
        for (int r = 0; r < R; r++) {
            const float *xr = x + (size_t)r * in;
            float s0 = 0.0f, s1 = 0.0f, s2 = 0.0f, s3 = 0.0f;
            for (int k = 0; k < in; k++) {
                float v = xr[k];
                s0 += w0[k] * v;
                s1 += w1[k] * v;
                s2 += w2[k] * v;
                s3 += w3[k] * v;
            }
            if (b) {
                s0 += b[j];
                s1 += b[j + 1];
                s2 += b[j + 2];
                s3 += b[j + 3];
            }
            float *yr = y + (size_t)r * out + j;
            if (accumulate) {
                yr[0] += s0; yr[1] += s1; yr[2] += s2; yr[3] += s3;
            } else {
                yr[0] = s0; yr[1] = s1; yr[2] = s2; yr[3] = s3;
            }
        }
    }
    for (; j < out; j++) {
        const float *w0 = W + (size_t)j * in;
        for (int r = 0; r < R; r++) {
            const float *xr = x + (size_t)r * in;
            float s = 0.0f;
            for (int k = 0; k < in; k++) s += w0[k] * xr[k];
            if (b) s += b[j];
            float *yr = y + (size_t)r * out + j;
            if (accumulate) *yr += s; else *yr = s;
        }
    }
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

/* Returns 0, or 1 if scratch memory could not be allocated. `out`: [R, hidden], the
 * final normed hidden states. */
int ponder_forward(const Model *m, const int64_t *ids, int B, int T, const int64_t *start,
                   float *const *kc, float *const *vc, int64_t cap, const float *cos, const float *sin,
                   float *out) {
    const int h = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, F = m->ffn;
    const int G = H / KV, R = B * T, QKV = (H + 2 * KV) * D;
    const float scale = 1.0f / sqrtf((float)D);
    int64_t span = 0;
    for (int b = 0; b < B; b++)
        if (start[b] + T > span) span = start[b] + T;
    float *x = malloc(sizeof(float) * (size_t)R * h);
    float *xn = malloc(sizeof(float) * (size_t)R * h);
    float *qkv = malloc(sizeof(float) * (size_t)R * QKV);
    float *att = malloc(sizeof(float) * (size_t)R * H * D);
    float *gu = malloc(sizeof(float) * (size_t)R * 2 * F);
    float *act = malloc(sizeof(float) * (size_t)R * F);
    float *p = malloc(sizeof(float) * (size_t)span);
    if (!x || !xn || !qkv || !att || !gu || !act || !p) {
        free(x); free(xn); free(qkv); free(att); free(gu); free(act); free(p);
        return 1;
    }
    for (int r = 0; r < R; r++) memcpy(x + (size_t)r * h, m->embed + (size_t)ids[r] * h, sizeof(float) * h);

    for (int l = 0; l < m->layers; l++) {
        for (int r = 0; r < R; r++) rmsnorm(xn + (size_t)r * h, x + (size_t)r * h, m->ln1[l], h, m->eps);
        matmul(qkv, xn, m->wqkv[l], m->bqkv[l], R, h, QKV, 0);
        /* rotate q and k, then store k and v at each token's slot */
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                int64_t pos = start[b] + t;
                float *row = qkv + (size_t)(b * T + t) * QKV;
                for (int i = 0; i < H + KV; i++) rope(row + (size_t)i * D, cos + pos * D, sin + pos * D, D);
                size_t slot = ((size_t)b * cap + pos) * KV * D;
                memcpy(kc[l] + slot, row + (size_t)H * D, sizeof(float) * KV * D);
                memcpy(vc[l] + slot, row + (size_t)(H + KV) * D, sizeof(float) * KV * D);
            }
        /* causal attention: the token at position pos sees slots 0..pos of its row */
        for (int b = 0; b < B; b++)
            for (int t = 0; t < T; t++) {
                int64_t pos = start[b] + t;
                const float *row = qkv + (size_t)(b * T + t) * QKV;
                float *o = att + (size_t)(b * T + t) * H * D;
                for (int hd = 0; hd < H; hd++) {
                    const float *q = row + (size_t)hd * D;
                    const float *K = kc[l] + (size_t)b * cap * KV * D + (size_t)(hd / G) * D;
                    const float *V = vc[l] + (size_t)b * cap * KV * D + (size_t)(hd / G) * D;
                    float mx = -FLT_MAX;
                    for (int64_t j = 0; j <= pos; j++) {
                        const float *kj = K + (size_t)j * KV * D;
                        float s = 0.0f;
                        for (int d = 0; d < D; d++) s += q[d] * kj[d];
                        p[j] = s * scale;
                        if (p[j] > mx) mx = p[j];
                    }
                    float sum = 0.0f;
                    for (int64_t j = 0; j <= pos; j++) {
                        p[j] = expf(p[j] - mx);
                        sum += p[j];
                    }
                    float *oh = o + (size_t)hd * D;
                    for (int d = 0; d < D; d++) oh[d] = 0.0f;
                    for (int64_t j = 0; j <= pos; j++) {
                        const float *vj = V + (size_t)j * KV * D;
                        float w = p[j] / sum;
                        for (int d = 0; d < D; d++) oh[d] += w * vj[d];
                    }
                }
            }
        matmul(x, att, m->wo[l], m->bo[l], R, H * D, h, 1); /* residual */
        for (int r = 0; r < R; r++) rmsnorm(xn + (size_t)r * h, x + (size_t)r * h, m->ln2[l], h, m->eps);
        matmul(gu, xn, m->wgu[l], m->bgu[l], R, h, 2 * F, 0);
        for (int r = 0; r < R; r++) {
            const float *g = gu + (size_t)r * 2 * F, *u = g + F;
            float *a = act + (size_t)r * F;
            for (int i = 0; i < F; i++) a[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
        }
        matmul(x, act, m->wd[l], m->bd[l], R, F, h, 1); /* residual */
    }
    for (int r = 0; r < R; r++) rmsnorm(out + (size_t)r * h, x + (size_t)r * h, m->norm, h, m->eps);
    free(x); free(xn); free(qkv); free(att); free(gu); free(act); free(p);
    return 0;
}
