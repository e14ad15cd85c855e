"""The Llama-family decoder once more, as numpy operations over the same weights and
the same KV cache (both shared with the torch model, never copied).

Why a second implementation: a small model's decode step is some eighty tiny operations
(17 of them matrix-vector products), and on a CPU each torch operation costs several
microseconds of dispatch against about one for numpy, whose BLAS is also quicker at
matrix-vector products on AMD processors than MKL. On the shipped 1.7M-parameter model
this makes a decode step about three times faster than torch. ``NativeLM`` uses it for
float32 CPU passes when the C kernel (``llama_c.py``, faster still, built on this
class) is unavailable or the model is large; passes that need what only the torch model
has (hidden states of every layer, cascade attention here) stay in torch. ``llama.py``
stays the reference (and the training model); the tests hold all three to each other
and to transformers.

Shapes: B rows, T new tokens per row, S key slots, H query heads in KV groups of G.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from .kv_cache import KVCache
from .llama import Transformer


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().numpy()  # a view: shares the tensor's memory


class _BlasThreads:
    """Run BLAS with torch's thread count for the duration of a forward pass: numpy's
    BLAS would otherwise use every core, which on a small model costs more in
    synchronisation than it gains (twice as slow on 2 cores)."""

    def __init__(self) -> None:
        from threadpoolctl import ThreadpoolController

        self._libs = ThreadpoolController().select(user_api="blas").lib_controllers
        self._saved: list[int] = []

    def __enter__(self) -> None:
        want = torch.get_num_threads()
        self._saved = [lib.num_threads for lib in self._libs]
        for lib, n in zip(self._libs, self._saved):
            if n != want:
                lib.set_num_threads(want)

    def __exit__(self, *exc) -> None:
        want = torch.get_num_threads()
        for lib, n in zip(self._libs, self._saved):
            if n != want:
                lib.set_num_threads(n)


class NumpyLlama:
    """``forward`` as in ``Transformer.forward`` (without hidden states), for float32
    weights on the CPU; ``run`` adds the logits. ``supports`` says whether a call can
    run here."""

    def __init__(self, model: Transformer) -> None:
        cfg = model.cfg
        self.model = model
        self.cfg = cfg
        self.H, self.KV, self.D = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.eps = np.float32(cfg.rms_norm_eps)
        self.inv_hidden = np.float32(1.0 / cfg.hidden_size)
        self.scale = np.float32(cfg.head_dim**-0.5)
        self._cos = self._sin = np.zeros((0, cfg.head_dim), np.float32)
        self.ffn = cfg.intermediate_size
        self.layers = []
        for b in model.layers:
            a, m = b.self_attn, b.mlp
            # [out, in] weights are used as W.T: BLAS reads the transpose without a copy
            self.layers.append((
                _np(b.input_layernorm.weight), _np(a.qkv_proj.weight).T, _np(a.qkv_proj.bias),
                _np(a.o_proj.weight).T, _np(a.o_proj.bias), _np(b.post_attention_layernorm.weight),
                _np(m.gate_up_proj.weight).T, _np(m.gate_up_proj.bias), _np(m.down_proj.weight).T, _np(m.down_proj.bias),
                None if a.q_norm is None else _np(a.q_norm.weight), None if a.k_norm is None else _np(a.k_norm.weight),
            ))
        self.embed = _np(model.embed_tokens.weight)
        self.norm = _np(model.norm.weight)
        head = model.embed_tokens.weight if model.lm_head is None else model.lm_head.weight
        self.head = None if cfg.is_reward_model else _np(head).T
        self.score = (_np(model.score.weight).T, _np(model.score.bias)) if cfg.is_reward_model else None
        self._threads = _BlasThreads()

    kind = "numpy"  # what NativeLM.backend_in_use reports
    handles_shared_prefix = False  # cascade attention over KVCache.shared (the C kernel does)

    @staticmethod
    def supports(model: Transformer, cache: KVCache | None) -> bool:
        # NoPE layers (SmolLM3) run on the torch model only
        return (model.dtype == torch.float32 and model.embed_tokens.weight.device.type == "cpu"
                and model.cfg.rope_layers is None
                and (cache is None or (type(cache) is KVCache and not cache.has_shared)))

    def _rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        if x.size == x.shape[-1]:  # one token (a decode step): the scale is a Python float, 3 ops not 7
            flat = x.reshape(-1)
            r = 1.0 / math.sqrt(float(flat @ flat) * self.inv_hidden + self.eps)
            return x * (w * np.float32(r))
        ms = np.add.reduce(x * x, axis=-1, keepdims=True)  # np.mean costs twice as much in Python
        ms *= self.inv_hidden
        ms += self.eps
        return x / np.sqrt(ms, out=ms) * w

    def _head_rms(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        ms = np.add.reduce(x * x, axis=-1, keepdims=True)
        ms *= np.float32(1.0 / x.shape[-1])
        ms += self.eps
        return x / np.sqrt(ms, out=ms) * w

    def _rope(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """cos, signed sin [n', D] as numpy views of the torch model's table (n' >= n)."""
        if self._cos.shape[0] < n:
            cos, sin = self.model.rope_table(n, self.model.embed_tokens.weight.device)
            self._cos, self._sin = cos.numpy(), sin.numpy()
        return self._cos, self._sin

    @staticmethod
    def _views(cache: KVCache) -> tuple[list[np.ndarray], list[np.ndarray]]:
        """numpy views of the cache's tensors, kept on the cache until it swaps them."""
        v = getattr(cache, "_numpy_views", None)
        if v is None or v[0] is not cache.k[0] or v[1] is not cache.v[0]:
            v = (cache.k[0], cache.v[0], [_np(t) for t in cache.k], [_np(t) for t in cache.v])
            cache._numpy_views = v
        return v[2], v[3]

    def forward(self, input_ids: np.ndarray, cache: KVCache | None, num_new: np.ndarray | None = None) -> np.ndarray:
        """input_ids [B, T] -> final normed hidden states [B, T, hidden]. With a cache,
        row b's new tokens go at slots lengths[b].. and its length grows by num_new[b]
        (default T); without one, the tokens are a whole causal sequence."""
        B, T = input_ids.shape
        H, KV, D = self.H, self.KV, self.D
        G = H // KV
        if cache is None:
            start = np.zeros(B, dtype=np.int64)
            ks = [np.empty((B, T, KV, D), np.float32) for _ in self.layers]
            vs = [np.empty((B, T, KV, D), np.float32) for _ in self.layers]
        else:
            start = cache.lengths.numpy()
            cache.reserve(int(start.max()) + T)  # may replace the tensors: view them after
            ks, vs = self._views(cache)
        lo, hi = (int(start[0]),) * 2 if B == 1 else (int(start.min()), int(start.max()))
        span = hi + T
        cos_t, sin_t = self._rope(span)
        positions = start[:, None] + np.arange(T)  # [B, T] slot (= position) of each new token
        if lo == hi:  # every row at the same length: slices, not gathers
            cos, sin = cos_t[lo : lo + T, None], sin_t[lo : lo + T, None]  # [T, 1, D]
        else:
            cos, sin = cos_t[positions][:, :, None], sin_t[positions][:, :, None]  # [B, T, 1, D]
        if T == 1 and lo == hi:
            bias = None  # one query per row that sees every valid slot
        else:
            # key slot j is visible to the token at slot p iff j <= p
            visible = np.arange(span)[None, None, :] <= positions[:, :, None]  # [B, T, S]
            bias = np.where(visible, np.float32(0), np.float32(-np.inf))[:, None, None]  # [B, 1, 1, T, S]
        rows = np.arange(B)[:, None]
        half = D // 2
        x = self.embed[input_ids]  # [B, T, hidden]
        with np.errstate(over="ignore"):  # exp(-g) overflows harmlessly in silu
            for i, (ln1, wqkv, bqkv, wo, bo, ln2, wgu, bgu, wd, bd, qn, kn) in enumerate(self.layers):
                qkv = self._rms(x, ln1) @ wqkv
                if bqkv is not None:
                    qkv += bqkv
                qkv = qkv.reshape(B, T, H + 2 * KV, D)
                qk = qkv[:, :, : H + KV]
                if qn is not None:  # Qwen3: each head's q and k RMS-normalised over head_dim
                    qk = np.concatenate((self._head_rms(qk[:, :, :H], qn), self._head_rms(qk[:, :, H:], kn)), axis=2)
                # rotate-half with the sign in sin (see llama.py); concatenate beats np.roll 3x
                qk = qk * cos + np.concatenate((qk[..., half:], qk[..., :half]), axis=-1) * sin
                if lo == hi:
                    ks[i][:, lo : lo + T] = qk[:, :, H:]
                    vs[i][:, lo : lo + T] = qkv[:, :, H + KV :]
                else:
                    ks[i][rows, positions] = qk[:, :, H:]
                    vs[i][rows, positions] = qkv[:, :, H + KV :]
                k = ks[i][:, :span].transpose(0, 2, 3, 1)  # [B, KV, D, S]
                v = vs[i][:, :span].transpose(0, 2, 1, 3)  # [B, KV, S, D]
                q = qk[:, :, :H].reshape(B, T, KV, G, D).transpose(0, 2, 3, 1, 4).reshape(B, KV, G * T, D)
                s = q @ k  # [B, KV, G*T, S]
                s *= self.scale
                if bias is not None:
                    s = (s.reshape(B, KV, G, T, span) + bias).reshape(B, KV, G * T, span)
                s -= s.max(axis=-1, keepdims=True)
                s = np.exp(s, out=s)
                o = s @ v
                o /= s.sum(axis=-1, keepdims=True)  # [B, KV, G*T, D]
                o = o.reshape(B, KV, G, T, D).transpose(0, 3, 1, 2, 4).reshape(B, T, H * D)
                o = o @ wo
                if bo is not None:
                    o += bo
                x += o
                gu = self._rms(x, ln2) @ wgu
                if bgu is not None:
                    gu += bgu
                g, u = gu[..., : self.ffn], gu[..., self.ffn :]
                y = (g / (1.0 + np.exp(-g)) * u) @ wd
                if bd is not None:
                    y += bd
                x += y
        if cache is not None:
            cache.lengths = torch.from_numpy(start + (T if num_new is None else num_new))
        return self._rms(x, self.norm)

    def logits(self, h: np.ndarray) -> np.ndarray:
        """Hidden states [..., hidden] -> logits (or reward scores) [..., V], float32."""
        if self.score is not None:
            return h @ self.score[0] + self.score[1]
        return h @ self.head

    def run_torch(self, input_ids: torch.Tensor, cache: KVCache | None, num_new: torch.Tensor | None = None,
                  last_only: bool = False) -> torch.Tensor:
        """``run`` on torch tensors in and out (what ``NativeLM.forward`` calls)."""
        nn = None if num_new is None else num_new.numpy()
        return torch.from_numpy(self.run(input_ids.numpy(), cache, nn, last_only))

    def run(self, input_ids: np.ndarray, cache: KVCache | None, num_new: np.ndarray | None = None,
            last_only: bool = False) -> np.ndarray:
        """``forward`` then ``logits``: [B, T, V], or [B, V] at each row's last new token
        when ``last_only``."""
        if input_ids.size and (input_ids.min() < 0 or input_ids.max() >= self.cfg.vocab_size):
            raise ValueError(f"token ids must be in [0, {self.cfg.vocab_size}); got {input_ids.min()}..{input_ids.max()}")
        with self._threads:
            h = self.forward(input_ids, cache, num_new)
            if last_only:
                h = h[:, -1] if num_new is None else h[np.arange(h.shape[0]), num_new - 1]
            return self.logits(h)
