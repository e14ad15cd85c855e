"""A process reward model built, not trained: a checker LM's least token log-probability over
the solution so far, computed by 4 transformer blocks added on top of that checker.

Why build it: a trained head on the two-digit checker stops near 0.905 step AUC, while the
checker's own confidence (its running-min token log-probability) gives 0.96. Probes showed
why (MODEL.md): an added block learns the raw logit but not the softmax's normalisation.
Here the blocks are set by hand (the idea of compiled transformers: Lindner et al. 2023,
"Tracr") and only the head's scale and bias are fitted, so the result is an ordinary
``LlamaForTokenClassification`` checkpoint that vLLM's pooling runner serves.

The residual is rotated so that every written quantity has a coordinate axis of its own
(float32 then adds a 3e5 constant without leaking into the rest):

* the token channel: token r of the alphabet adds ``eps`` on axis ``V_r`` in its embedding,
  and the checker's blocks neither read nor write those axes (they were the residual's
  quietest directions over every layer), so each position knows its token exactly;
* A: MLP writes a constant ``C1`` on ``u`` (silu(z)z + silu(-z)(-z) = z^2, summed over a basis
  of the normalised residual, is its squared norm, d);
* A2: MLP writes the checker's logits, exactly: the final norm divides by rms(h), the block's
  own norm by rms(h + C1 u); their ratio is a function of c = x.u, fitted by a few silu units
  of c; and a constant ``C2`` on ``u`` so large that later blocks see x.u as a constant;
* B: attention head 0 copies the logits of position i-1 to i (a previous-token head made of
  RoPE); head 2 counts newlines so far against a BOS sink (o = n / (1 + n)); the MLP writes
  y_i = log p(token_i | < i) = the copied logit picked by the token channel minus a fitted
  logsumexp, and s_i = [i is in the solution];
* C: attention max-pools -y over solution positions (a softmax at 10 per nat), so position i
  holds min_{j <= i} y_j; the head reads it.

    python -m ponder.train likelihood-verifier --checker DIR --samples S.jsonl --out DIR
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import SettingError

C1, C2 = 10.0, 3e5  # A's constant (small: the logit rescale g(c) stays near 1) and A2's (dominant)
GAMMA, WSCALE, EPS = 100.0, 100.0, 0.3  # logits, y and s, and the token code, as written
G_UNITS, LSE_UNITS = 6, 440


def fit_swiglu(X: torch.Tensor, Y: torch.Tensor, H: int, iters: int, lr: float = 3e-3, seed: int = 0):
    """One SwiGLU layer without bias, X [N, d] -> scalar, least squares (Adam, cosine decay).
    Returns (gate_up [2H, d], down [H] scaled to Y, Y's mean, held-out R^2)."""
    g = torch.Generator().manual_seed(seed)
    n, d = X.shape
    tr = int(0.9 * n)
    gu = (torch.randn(2 * H, d, generator=g) * 0.02).requires_grad_()
    dn = (torch.randn(H, generator=g) * 0.02).requires_grad_()
    mu, sd = Y[:tr].mean(), Y[:tr].std()
    opt = torch.optim.Adam([gu, dn], lr=lr)

    def f(x):
        a, b = (x @ gu.T).split(H, -1)
        return (F.silu(a) * b) @ dn
    for it in range(iters + 1):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * it / iters))
        idx = torch.randint(0, tr, (2048,), generator=g)
        loss = ((f(X[idx]) - (Y[idx] - mu) / sd) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        r2 = 1 - ((f(X[tr:]) - (Y[tr:] - mu) / sd) ** 2).mean().item()
    return gu.detach(), dn.detach() * sd, mu.item(), r2


def _rms(t: torch.Tensor) -> torch.Tensor:
    return t.pow(2).mean(-1).add(1e-6).sqrt()


class Builder:
    """Builds the verifier in place on a token-classification copy of ``checker``."""

    def __init__(self, checker_dir: str | Path, rows: list[dict]):
        from ..models.loader import load_transformer, load_tokenizer
        from ..scoring.reward import RewardModel
        from .reward import _verifier_from

        self.checker = load_transformer(checker_dir).eval()
        self.tok = load_tokenizer(checker_dir)
        self.model, self.cfg = _verifier_from(self.checker, 4, True)
        self.model.eval().requires_grad_(False)
        self.rm = RewardModel(self.model, self.tok, "built")
        self.n = self.checker.cfg.num_hidden_layers
        ids: set[int] = set()
        for r in rows:
            ids |= set(self.tok.encode(r["completion"], add_special_tokens=False).ids)
        self.alphabet = sorted(ids | {0})  # 0: BOS and EOS
        self.R = len(self.alphabet)
        self.index = {t: k for k, t in enumerate(self.alphabet)}
        self.nl = self.tok.encode("\n", add_special_tokens=False).ids[0]
        self.report: dict[str, Any] = {"alphabet": self.R}
        with torch.no_grad():
            for blk in self.model.layers[self.n:]:
                for w in blk.parameters():
                    (w.zero_() if w.dim() == 2 else w.fill_(1.0))  # norms at 1, projections at 0
            self.model.norm.weight.fill_(1.0)
        self.Ep = self.checker.embed_tokens.weight.detach()[self.alphabet] * self.checker.norm.weight.detach()
        self.Qb: torch.Tensor | None = None

    def layouts(self, rows: list[dict]) -> list[tuple[list[int], list[int], int]]:
        """(ids, step ends, first solution position) per row."""
        out = []
        for r in rows:
            prompt = f"Q: {r['question']}\n"
            ids, ends, _ = self.rm.layout(prompt, r["completion"])
            out.append((ids, ends, len(self.rm.layout(prompt, "")[0]) - 1))
        return out

    @torch.no_grad()
    def resid(self, seqs, layer: int) -> list[torch.Tensor]:
        return [self.model(torch.tensor([ids]), output_hidden_states=True)[1][layer][0] for ids, _, _ in seqs]

    def true_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The checker's logits over the alphabet from a (rotated) final residual [T, d]."""
        if self.Qb is not None:
            h = (h.double() @ self.Qb.T).float()
        return self.checker.norm(h) @ self.checker.embed_tokens.weight[self.alphabet].T

    @torch.no_grad()
    def directions(self, seqs) -> None:
        """The token channel V (quietest over every layer) and the written directions (quietest
        in the final residual), all orthogonal to the embeddings and the logit read-out rows."""
        R = self.R
        every = torch.cat([torch.cat([h[0] for h in self.model(torch.tensor([ids]), output_hidden_states=True)[1]
                                      [:self.n + 1]]) for ids, _, _ in seqs[:100]])
        last = torch.cat(self.resid(seqs[:200], self.n))
        E = self.checker.embed_tokens.weight.detach()[self.alphabet]
        U, S, _ = torch.linalg.svd(torch.cat([self.Ep, E]).T, full_matrices=True)
        free = U[:, int((S > S[0] * 1e-6).sum()):]  # [d, d - 2R]
        _, Ea = torch.linalg.eigh(free.T @ (every.T @ every / len(every)) @ free)
        self.V = free @ Ea[:, :R]
        rest = torch.linalg.svd(free - self.V @ (self.V.T @ free), full_matrices=False)[0][:, :free.shape[1] - R]
        ev, Er = torch.linalg.eigh(rest.T @ (last.T @ last / len(last)) @ rest)
        B = rest @ Er[:, :2 * R + 5]
        self.u, self.wy, self.wsc, self.wm, self.ws = B[:, 0], B[:, 1], B[:, 2], B[:, 3], B[:, 4]
        self.Lp, self.Qc = B[:, 5:5 + R], B[:, 5 + R:5 + 2 * R]
        self.report["written_rms"] = [round(ev[0].sqrt().item(), 3), round(ev[2 * R + 4].sqrt().item(), 3)]

    @torch.no_grad()
    def token_channel(self) -> None:
        """Embedding of alphabet token r += EPS * V_r; the checker's blocks stop reading and
        writing V (norm weights folded into the projections first)."""
        P = torch.eye(self.cfg.hidden_size) - self.V @ self.V.T
        for blk in self.model.layers[:self.n]:
            for ln, lin in ((blk.input_layernorm, blk.self_attn.qkv_proj), (blk.post_attention_layernorm, blk.mlp.gate_up_proj)):
                lin.weight.copy_((lin.weight * ln.weight[None, :]) @ P)
                ln.weight.fill_(1.0)
            blk.self_attn.o_proj.weight.copy_(P @ blk.self_attn.o_proj.weight)
            blk.mlp.down_proj.weight.copy_(P @ blk.mlp.down_proj.weight)
        E = self.model.embed_tokens.weight
        E.copy_(E @ P)
        for r, t in enumerate(self.alphabet):
            E[t] += EPS * self.V[:, r]

    @torch.no_grad()
    def rotate(self) -> None:
        """Rotate the residual basis (in float64) so each direction above is a coordinate axis."""
        d, R = self.cfg.hidden_size, self.R
        A = torch.stack([self.u, self.wy, self.wsc, self.wm, self.ws, *self.Lp.T, *self.Qc.T, *self.V.T], 1).double()
        k = A.shape[1]
        Qb, _ = torch.linalg.qr(torch.cat([A, torch.randn(d, d, generator=torch.Generator().manual_seed(0)).double()], 1))
        Qb = Qb[:, :d].clone()
        Qb[:, :k] *= torch.sign(torch.diagonal(Qb[:, :k].T @ A))[None, :]
        for blk in self.model.layers[:self.n]:
            for W in (blk.self_attn.qkv_proj.weight, blk.mlp.gate_up_proj.weight):
                W.copy_((W.double() @ Qb).float())
            for W in (blk.self_attn.o_proj.weight, blk.mlp.down_proj.weight):
                W.copy_((Qb.T @ W.double()).float())
        W = self.model.embed_tokens.weight
        W.copy_((W.double() @ Qb).float())
        self.Ep = (self.Ep.double() @ Qb).float()
        self.Qb = Qb
        eye = torch.eye(d)
        self.u, self.wy, self.wsc, self.wm, self.ws = (eye[:, i] for i in range(5))
        self.Lp, self.Qc, self.V = eye[:, 5:5 + R], eye[:, 5 + R:5 + 2 * R], eye[:, 5 + 2 * R:5 + 3 * R]

    @torch.no_grad()
    def const_units(self, blk, start: int, C: float) -> int:
        """Units start..start+2d of ``blk``'s MLP write C on u. Returns the next free unit."""
        d, ffn = self.cfg.hidden_size, self.cfg.intermediate_size
        gu, dw, eye = blk.mlp.gate_up_proj.weight, blk.mlp.down_proj.weight, torch.eye(d)
        for lo, sign in ((start, 1.0), (start + d, -1.0)):
            gu[lo:lo + d] = sign * eye
            gu[ffn + lo:ffn + lo + d] = sign * eye
        dw[:, start:start + 2 * d] = (C / d) * self.u[:, None]
        return start + 2 * d

    def build_A(self, seqs) -> None:
        self.const_units(self.model.layers[self.n], 0, C1)
        blk, ffn, R = self.model.layers[self.n + 1], self.cfg.intermediate_size, self.R
        r = torch.cat(self.resid(seqs[:400], self.n + 1))  # h + C1 u
        c = (r / _rms(r)[:, None]) @ self.u
        g = _rms(r) / _rms(r - C1 * self.u)  # what the block's norm divided by, over the final norm's
        a = torch.linspace(-1.0, 1.0, G_UNITS).clone().requires_grad_()
        w = torch.zeros(G_UNITS, requires_grad=True)
        opt = torch.optim.LBFGS([a, w], max_iter=2000, line_search_fn="strong_wolfe", tolerance_grad=1e-12,
                                tolerance_change=1e-14)

        def closure():
            opt.zero_grad()
            loss = ((F.silu(c[:, None] * a) @ w - g) / g).pow(2).mean()
            loss.backward()
            return loss
        for _ in range(5):
            opt.step(closure)
        a, w = a.detach(), w.detach()
        self.report["g_fit_max_rel_err"] = float(((F.silu(c[:, None] * a) @ w - g) / g).abs().max())
        with torch.no_grad():
            gu, dw = blk.mlp.gate_up_proj.weight, blk.mlp.down_proj.weight
            j = 0
            for r_ in range(R):
                for k in range(G_UNITS):  # silu(a_k c) (x . E'_r) w_k = logit_r
                    gu[j], gu[ffn + j], dw[:, j] = a[k] * self.u, self.Ep[r_], GAMMA * w[k] * self.Lp[:, r_]
                    j += 1
            self.const_units(blk, j, C2)
        rb = torch.cat(self.resid(seqs[:50], self.n + 2))
        err = (rb @ self.Lp) / GAMMA - self.true_logits(torch.cat(self.resid(seqs[:50], self.n)))
        self.report["logit_err_max"] = round(err.abs().max().item(), 4)
        self.f = 1.0 / _rms(rb).mean().item()  # residual units -> normalised units, from here on
        self.c = ((rb / _rms(rb)[:, None]) @ self.u).mean().item()

    @torch.no_grad()
    def build_B_attention(self, a_prev: float = 3.0, sink: float = 30.0) -> None:
        cfg, d, D = self.cfg, self.cfg.hidden_size, self.cfg.head_dim
        H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
        blk = self.model.layers[self.n + 2]
        W, O = blk.self_attn.qkv_proj.weight, blk.self_attn.o_proj.weight
        kv = (H * D, (H + KV) * D)  # where kv head 0's k and v rows start
        # head 0: previous token. q.k peaks at offset 1 over RoPE's 4 fastest pairs.
        inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, D, 2).float() / D))
        q0, k0 = torch.zeros(D), torch.zeros(D)
        for p in range(4):
            q0[p] = a_prev
            k0[p], k0[p + D // 2] = a_prev * math.cos(inv[p]), a_prev * math.sin(inv[p])
        W[0:D] = torch.outer(q0, self.u) / self.c
        W[kv[0]:kv[0] + D] = torch.outer(k0, self.u) / self.c * math.sqrt(d)
        W[kv[1]:kv[1] + self.R] = self.Lp.T
        O[:, :self.R] = self.Qc / self.f
        # head 2 (kv head 1): BOS and each newline score `sink`, the rest 0; value [newline]
        p = D // 2 - 1  # the slowest pair: no turn over a few hundred positions
        Vb, Vn = self.V[:, self.index[0]], self.V[:, self.index[self.nl]]
        W[2 * D + p] = self.u
        W[kv[0] + D + p] = sink * (Vb + Vn) / (EPS * self.f) * math.sqrt(D) / self.c
        W[kv[1] + D] = Vn / (EPS * self.f)
        O[:, 2 * D] = WSCALE * self.ws

    def _prev_logits(self, seqs):
        """Per position: the checker's logits at i-1 [N, R], log p(token_i) [N], in-solution [N]."""
        L, Y, S = [], [], []
        with torch.no_grad():
            for (ids, _, st), h in zip(seqs, self.resid(seqs, self.n)):
                prev = torch.cat([torch.zeros(1, self.R), self.true_logits(h)[:-1]])
                tk = torch.tensor([self.index.get(t, 0) for t in ids])
                L.append(prev)
                Y.append(prev.gather(-1, tk[:, None])[:, 0] - torch.logsumexp(prev, -1))
                S.append((torch.arange(len(ids)) >= st).float())
        return torch.cat(L), torch.cat(Y), torch.cat(S)

    def build_B_mlp(self, seqs, lse_steps: int, beta: float = 40.0, a: float = 8.0) -> None:
        """y = sum_r step(token is r) * logit_{i-1,r} - lse(logit_{i-1}); s = step(o - nl/6 - 0.42)
        (o is 1/2 from the first newline on, 2/3 from the second; the prompt's own newline scores
        1/2 - 1/6 = 1/3); step(z) = [silu(z + a) - silu(z - a)] / 2a, 0 or 1 once |z| >> a."""
        ffn, R, c, f = self.cfg.intermediate_size, self.R, self.c, self.f
        L, Y, S = self._prev_logits(seqs)
        m = S > 0
        lse = torch.logsumexp(L[m], -1)
        perm = torch.randperm(int(m.sum()), generator=torch.Generator().manual_seed(0))
        gz, dn, mu, r2 = fit_swiglu(torch.cat([L[m], torch.ones(int(m.sum()), 1)], 1)[perm], lse[perm], LSE_UNITS, lse_steps)
        self.report["lse_fit_rmse"] = round((1 - r2) ** 0.5 * lse.std().item(), 4)
        toL = self.Qc.T / (GAMMA * f)  # [R, d]: logits_{i-1} = toL @ x
        one = self.u / c
        blk = self.model.layers[self.n + 2]
        gu, dw = blk.mlp.gate_up_proj.weight, blk.mlp.down_proj.weight
        with torch.no_grad():
            j = 0
            for r in range(R + 1):
                if r < R:
                    z, up, out, sharp = self.V[:, r] / (EPS * f) - 0.5 * one, toL[r], self.wy, beta
                else:
                    z = self.ws / (f * WSCALE) - self.V[:, self.index[self.nl]] / (6 * EPS * f) - 0.42 * one
                    up, out, sharp = one, self.wsc, 10 * beta  # margins 0.08: steeper
                for sign in (1, -1):
                    gu[j], gu[ffn + j], dw[:, j] = sharp * z + sign * a * one, up, sign / (2 * a) * WSCALE * out
                    j += 1
            G = gz[:, :R] @ toL + gz[:, R:] * one  # the lse units, on x
            gu[j:j + LSE_UNITS], gu[ffn + j:ffn + j + LSE_UNITS] = G[:LSE_UNITS], G[LSE_UNITS:]
            dw[:, j:j + LSE_UNITS] = -WSCALE * self.wy[:, None] * dn[None, :]
            j += LSE_UNITS
            sc = F.silu(torch.tensor(c)).item()
            gu[j], gu[ffn + j], dw[:, j] = self.u, one, -WSCALE * mu / sc * self.wy
            for w in (self.wy, self.wsc, self.wm):  # erase the checker's own content there
                j += 1
                gu[j], gu[ffn + j], dw[:, j] = self.u, w, -w / (f * sc)
        r3 = torch.cat(self.resid(seqs[:200], self.n + 3))
        n = len(r3)
        err = (r3 @ self.wy / WSCALE - Y[:n])[m[:n]]
        s = r3 @ self.wsc / WSCALE
        self.report["y_err"] = {"rms": round(err.pow(2).mean().sqrt().item(), 4), "max": round(err.abs().max().item(), 4)}
        self.report["s_err_max"] = round((s - S[:n]).abs().max().item(), 4)

    @torch.no_grad()
    def build_C(self, beta: float = 10.0, M: float = 500.0) -> None:
        """score(i, j) = -beta y_j + M s_j: a soft min of y over solution positions j <= i."""
        cfg, D = self.cfg, self.cfg.head_dim
        H, KV = cfg.num_attention_heads, cfg.num_key_value_heads
        blk = self.model.layers[self.n + 3]
        W, O = blk.self_attn.qkv_proj.weight, blk.self_attn.o_proj.weight
        p = D // 2 - 1
        W[p] = self.u
        W[H * D + p] = (-beta * self.wy + M * self.wsc) * math.sqrt(D) / (self.c * self.f * WSCALE)
        W[(H + KV) * D] = self.wy / (self.f * WSCALE)
        O[:, 0] = self.wm

    def calibrate(self, seqs, labels: list[list[bool]]) -> None:
        """The head: sigmoid(alpha * min + bias), fitted by logistic regression on step labels."""
        zs, ys = [], []
        with torch.no_grad():
            for (ids, ends, _), labs in zip(seqs, labels):
                z = self.model.norm(self.model(torch.tensor([ids]), output_hidden_states=True)[1][-1][0]) @ self.wm
                zs += [z[e].item() for e in ends[:len(labs)]]
                ys += labs[:len(ends)]
        z, y = torch.tensor(zs), torch.tensor(ys, dtype=torch.float)
        if y.min() == y.max():
            raise SettingError("the calibration rows' steps are all " + ("right" if y[0] else "wrong") +
                               "; a head's scale needs both: give more --calibration-rows")
        ab = torch.zeros(2, requires_grad=True)
        opt = torch.optim.LBFGS([ab], max_iter=200)
        zm, zsd = z.mean(), z.std()

        def closure():
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(ab[0] * (z - zm) / zsd + ab[1], y)
            loss.backward()
            return loss
        opt.step(closure)
        alpha, bias = (ab[0] / zsd).item(), (ab[1] - ab[0] * zm / zsd).item()
        with torch.no_grad():
            self.model.score.weight.copy_(alpha * self.wm[None, :])
            self.model.score.bias.fill_(bias)


def build(checker: str | Path, rows: list[dict], build_rows: int, calibration_rows: int,
          lse_steps: int = 15000) -> tuple[Any, Any, dict]:
    for name, v in (("--build-rows", build_rows), ("--calibration-rows", calibration_rows), ("--lse-steps", lse_steps)):
        if v < 1:
            raise SettingError(f"{name} must be >= 1; got {v}")
    if len(rows) < build_rows + calibration_rows:
        raise SettingError(f"--samples hold {len(rows)} rows; --build-rows + --calibration-rows need "
                           f"{build_rows + calibration_rows}")
    b = Builder(checker, rows[:build_rows])  # the alphabet: every token these samples use
    if b.cfg.intermediate_size < b.R * G_UNITS + 2 * b.cfg.hidden_size or b.cfg.num_attention_heads < 3:
        raise SettingError(f"{checker}: the checker needs an MLP of at least {b.R * G_UNITS + 2 * b.cfg.hidden_size} "
                           "units and 3 attention heads")
    seqs = b.layouts(rows[:build_rows])
    b.directions(seqs)
    b.token_channel()
    b.rotate()
    b.build_A(seqs)
    b.build_B_attention()
    b.build_B_mlp(seqs, lse_steps)
    b.build_C()
    cal = rows[build_rows:build_rows + calibration_rows]
    b.calibrate(b.layouts(cal), [r["step_labels"] for r in cal])
    return b.model, b.tok, b.report


def cmd_likelihood_verifier(args) -> int:
    from .common import save_checkpoint

    torch.set_num_threads(args.threads)
    t0 = time.time()
    rows = [json.loads(line) for path in args.samples for line in Path(path).read_text().splitlines()[:args.per_file]]
    model, tok, report = build(args.checker, rows, args.build_rows, args.calibration_rows, args.lse_steps)
    report["wall_time_s"] = round(time.time() - t0, 1)
    meta = {"kind": "reward", "command": "python -m ponder.train " + " ".join(getattr(args, "argv", []) or []),
            "reproducible": True, "checker": str(args.checker), "rows": args.build_rows + args.calibration_rows, **report}
    save_checkpoint(model, tok, Path(args.out), meta)
    print(json.dumps(report))
    return 0
