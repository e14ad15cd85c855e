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
    int hidden, heads, kv_heads, head_dim, ffn, layers, vocab;
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
        int r = 0;
        for (; r + 3 <= R; r += 3) { /* three token rows at once: 12 sums per 7 loads */
            const float *xa = x + (size_t)r * in, *xb = xa + in, *xc = xb + in;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f;
            float c0 = 0.0f, c1 = 0.0f, c2 = 0.0f, c3 = 0.0f;
            for (int k = 0; k < in; k++) {
                float u = xa[k], v = xb[k], t = xc[k];
                a0 += w0[k] * u; a1 += w1[k] * u; a2 += w2[k] * u; a3 += w3[k] * u;
                b0 += w0[k] * v; b1 += w1[k] * v; b2 += w2[k] * v; b3 += w3[k] * v;
                c0 += w0[k] * t; c1 += w1[k] * t; c2 += w2[k] * t; c3 += w3[k] * t;
            }
            float bj[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (b) { bj[0] = b[j]; bj[1] = b[j + 1]; bj[2] = b[j + 2]; bj[3] = b[j + 3]; }
            float *ya = y + (size_t)r * out + j, *yb = ya + out, *yc = yb + out;
            if (!accumulate) {
                for (int i = 0; i < 4; i++) ya[i] = yb[i] = yc[i] = 0.0f;
            }
            ya[0] += a0 + bj[0]; ya[1] += a1 + bj[1]; ya[2] += a2 + bj[2]; ya[3] += a3 + bj[3];
            yb[0] += b0 + bj[0]; yb[1] += b1 + bj[1]; yb[2] += b2 + bj[2]; yb[3] += b3 + bj[3];
            yc[0] += c0 + bj[0]; yc[1] += c1 + bj[1]; yc[2] += c2 + bj[2]; yc[3] += c3 + bj[3];
        }
        for (; r + 2 <= R; r += 2) { /* two token rows at once: 8 sums per weight load */
            const float *xa = x + (size_t)r * in, *xb = xa + in;
            float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f, b0 = 0.0f, b1 = 0.0f, b2 = 0.0f, b3 = 0.0f;
            for (int k = 0; k < in; k++) {
                float u = xa[k], v = xb[k];
                a0 += w0[k] * u; a1 += w1[k] * u; a2 += w2[k] * u; a3 += w3[k] * u;
                b0 += w0[k] * v; b1 += w1[k] * v; b2 += w2[k] * v; b3 += w3[k] * v;
            }
            float bj[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (b) { bj[0] = b[j]; bj[1] = b[j + 1]; bj[2] = b[j + 2]; bj[3] = b[j + 3]; }
            float *ya = y + (size_t)r * out + j, *yb = ya + out;
            if (accumulate) {
                ya[0] += a0 + bj[0]; ya[1] += a1 + bj[1]; ya[2] += a2 + bj[2]; ya[3] += a3 + bj[3];
                yb[0] += b0 + bj[0]; yb[1] += b1 + bj[1]; yb[2] += b2 + bj[2]; yb[3] += b3 + bj[3];
            } else {
                ya[0] = a0 + bj[0]; ya[1] = a1 + bj[1]; ya[2] = a2 + bj[2]; ya[3] = a3 + bj[3];
                yb[0] = b0 + bj[0]; yb[1] = b1 + bj[1]; yb[2] = b2 + bj[2]; yb[3] = b3 + bj[3];
            }
        }
        for (; r < R; r++) {
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

/* The whole pass. `out` [R, hidden] receives the final normed hidden states (NULL: not
 * wanted); `logits` [n_sel, head_rows] receives head·h (+ head_bias) for the token rows
 * listed in `sel` (NULL: every row, in order). Returns 0; 1 if scratch memory could
 * not be allocated; 2 if a token id is outside [0, vocab). */
int ponder_forward(const Model *m, const int64_t *ids, int B, int T, const int64_t *start,
                   float *const *kc, float *const *vc, int64_t cap, const float *cos, const float *sin,
                   float *out, const float *head, const float *head_bias, int head_rows, const int64_t *sel, int n_sel,
                   float *logits) {
    const int h = m->hidden, H = m->heads, KV = m->kv_heads, D = m->head_dim, F = m->ffn;
    const int G = H / KV, R = B * T, QKV = (H + 2 * KV) * D;
    const float scale = 1.0f / sqrtf((float)D);
    for (int r = 0; r < R; r++)
        if (ids[r] < 0 || ids[r] >= m->vocab) return 2;
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
    for (int r = 0; r < R; r++) rmsnorm(xn + (size_t)r * h, x + (size_t)r * h, m->norm, h, m->eps);
    if (out) memcpy(out, xn, sizeof(float) * (size_t)R * h);
    if (logits) {
        if (sel) { /* gather the selected rows, then one product */
            for (int i = 0; i < n_sel; i++) memcpy(x + (size_t)i * h, xn + (size_t)sel[i] * h, sizeof(float) * h);
            matmul(logits, x, head, head_bias, n_sel, h, head_rows, 0);
        } else {
            matmul(logits, xn, head, head_bias, R, h, head_rows, 0);
        }
    }
    free(x); free(xn); free(qkv); free(att); free(gu); free(act); free(p);
    return 0;
}
