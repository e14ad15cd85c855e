"""The Llama-family decoder (Llama 2/3, Qwen2, Mistral, SmolLM), in one readable file.

RMSNorm, rotary embeddings (with Llama-3 / linear scaling), SwiGLU, grouped-query
attention, optional q/k/v bias (Qwen2), tied or untied embeddings. Weights load from
Hugging Face names; q/k/v and gate/up are fused at load time so that a decode step
runs two matmuls per block instead of five, which matters on CPU where per-op
overhead dominates small models.

The same module trains (``ponder.train``) and serves, so both share one definition.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, rope_inv_freq
from .kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:  # one fused op: what a decode step runs 2·layers times
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # Normalise in float32 as Hugging Face does, then cast back before the weight.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, T, H, D]; cos, signed_sin: [B, T, 1, D]. HF Llama's rotate-half convention,
    x·cos + cat(-x2, x1)·sin, written as x·cos + roll(x, D/2)·cat(-sin1, sin2) so that
    the sign lives in the table and the rotation is one op."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


def shared_prefix_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                            cache: KVCache, layer: int) -> torch.Tensor:
    """Cascade attention for one new token per row. Row b attends to its group's shared
    prefix (stored once, [P, KV, D]) and then to its own slots; the softmax runs over
    both parts together, so the result equals attention over the concatenation.
    q: [B, H, 1, D]; k, v: [B, KV, S, D] (own slots); mask: [B, 1, 1, S] or None."""
    B, H, _, D = q.shape
    KV, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, KV, H // KV, D)  # grouped-query heads folded into the query
    own = torch.matmul(qg, k.transpose(-1, -2)) * (D**-0.5)  # [B, KV, G, S]
    if mask is not None:
        own = own.masked_fill(~mask.reshape(B, 1, 1, S), float("-inf"))
    out = torch.empty((B, KV, H // KV, D), dtype=q.dtype, device=q.device)
    for g in sorted(set(cache.group.tolist())):
        rows = (cache.group == g).nonzero()[:, 0]
        if g < 0:
            out[rows] = torch.matmul(own[rows].softmax(-1), v[rows])
            continue
        sk = cache.shared[g][0][layer].transpose(0, 1)  # [KV, P, D], read by every row of the group
        sv = cache.shared[g][1][layer].transpose(0, 1)
        pre = torch.matmul(qg[rows], sk.transpose(-1, -2)) * (D**-0.5)  # [n, KV, G, P]
        p = torch.cat([pre, own[rows]], dim=-1).softmax(-1)
        P = pre.shape[-1]
        out[rows] = torch.matmul(p[..., :P], sv) + torch.matmul(p[..., P:], v[rows])
    return out.reshape(B, H, 1, D)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, use_rope: bool = True) -> None:
        super().__init__()
        self.use_rope = use_rope  # False: a NoPE layer (SmolLM3), attention without positions
        self.n_heads = cfg.num_attention_heads
        self.n_kv = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        q, kv = self.n_heads * self.head_dim, self.n_kv * self.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, q + 2 * kv, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(q, cfg.hidden_size, bias=cfg.o_bias)
        # Qwen3: each head's q and k normalised (RMSNorm over head_dim) before RoPE
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(
        self,
        x: torch.Tensor,  # [B, T, hidden]
        cos: torch.Tensor,  # [B, T, 1, D]
        sin: torch.Tensor,
        mask: torch.Tensor | None,  # [B, 1, T, S] bool, or None
        cache: KVCache | None,
        layer: int,
        write_slots: torch.Tensor | int | None,  # [B, T] slot of each new token, or the common start
        span: int,  # number of key slots to attend over
        causal: bool = False,  # mask-free causal attention (a fresh cache, all rows aligned)
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, KV, D = self.n_heads, self.n_kv, self.head_dim
        qkv = self.qkv_proj(x).view(B, T, H + 2 * KV, D)
        qk = qkv[:, :, : H + KV]
        if self.q_norm is not None:  # Qwen3
            qk = torch.cat([self.q_norm(qkv[:, :, :H]), self.k_norm(qkv[:, :, H : H + KV])], dim=2)
        # Rotate q and k together: one op instead of two.
        qk = apply_rope(qk, cos, sin) if self.use_rope else qk
        q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + KV :]
        if cache is not None:
            if isinstance(write_slots, int):  # every row at the same length: a slice copy
                cache.k[layer][:, write_slots : write_slots + T] = k
                cache.v[layer][:, write_slots : write_slots + T] = v
            else:
                rows = torch.arange(B, device=x.device)[:, None]
                cache.k[layer][rows, write_slots] = k
                cache.v[layer][rows, write_slots] = v
            k = cache.k[layer][:, :span]
            v = cache.v[layer][:, :span]
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # [B, heads, *, D]
        if cache is not None and cache.has_shared:
            out = shared_prefix_attention(q, k, v, mask, cache, layer)
        elif mask is None and (cache is None or causal):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=T > 1, enable_gqa=H != KV)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=H != KV)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.ffn = cfg.intermediate_size
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * self.ffn, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(self.ffn, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).split(self.ffn, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, use_rope: bool = True) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, use_rope)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)


class Transformer(nn.Module):
    """Decoder-only transformer. ``forward`` returns final hidden states [B, T, hidden]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        rope = cfg.rope_layers or (True,) * cfg.num_hidden_layers
        self.layers = nn.ModuleList(Block(cfg, rope[i]) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.is_reward_model:
            self.score = nn.Linear(cfg.hidden_size, cfg.num_labels, bias=True)
            self.lm_head = None
        elif cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self._rope_cache: tuple[torch.Tensor, torch.Tensor] | None = None

    # -- rotary table ---------------------------------------------------------------------
    def rope_table(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for positions 0..n-1: [n, D], in float32, grown on demand."""
        if self._rope_cache is None or self._rope_cache[0].shape[0] < n:
            size = max(n, 2 * (self._rope_cache[0].shape[0] if self._rope_cache else 512))
            inv = rope_inv_freq(self.cfg).to(device)
            freqs = torch.outer(torch.arange(size, device=device, dtype=torch.float32), inv)
            emb = torch.cat((freqs, freqs), dim=-1)
            sin = emb.sin()
            half = sin.shape[-1] // 2
            sin[:, :half] = -sin[:, :half]  # the sign of rotate-half, see apply_rope
            self._rope_cache = (emb.cos(), sin)
        return self._rope_cache

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    def new_cache(self, batch_size: int, capacity: int = 256) -> KVCache:
        c = self.cfg
        return KVCache(
            c.num_hidden_layers, batch_size, c.num_key_value_heads, c.head_dim,
            capacity, self.dtype, self.embed_tokens.weight.device,
        )

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        cache: KVCache | None = None,
        num_new: torch.Tensor | None = None,  # [B] valid new tokens per row (rest is padding)
        output_hidden_states: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """Run the blocks. With a cache, row b's new tokens go at slots lengths[b]..,
        padding to the right of each row is computed but never counted or attended to.
        Returns the final (normed) hidden states, and with ``output_hidden_states`` also
        the residual stream after the embedding and after every block (HF convention)."""
        B, T = input_ids.shape
        dev = input_ids.device
        x = self.embed_tokens(input_ids)
        mask = None
        write_slots = None
        span = T
        causal_fresh = False
        if cache is None:
            positions = torch.arange(T, device=dev).expand(B, T)
        else:
            start = cache.lengths  # [B] own slots in use (a shared prefix comes before them)
            slots = start[:, None] + torch.arange(T, device=dev)  # [B, T] own slot of each new token
            shared = cache.has_shared
            if shared and T != 1:
                raise NotImplementedError("rows that read a shared prefix decode one token at a time")
            positions = slots + cache.base[:, None] if shared else slots
            lo, hi = start.aminmax()
            lo, hi = int(lo), int(hi)
            span = hi + T
            cache.reserve(span)
            uniform = lo == hi
            write_slots = lo if uniform else slots
            if T == 1 and uniform:
                mask = None  # one query per row that sees every valid slot
            elif uniform and lo == 0:
                mask = None  # a fresh causal block
                causal_fresh = True
            else:
                # own key slot j is visible to the new token at own slot s iff j <= s
                mask = (torch.arange(span, device=dev)[None, None, :] <= slots[:, :, None])[:, None]
        cos_t, sin_t = self.rope_table(int(positions.max()) + 1, dev)
        cos = cos_t[positions].to(x.dtype)[:, :, None, :]
        sin = sin_t[positions].to(x.dtype)[:, :, None, :]
        hidden: list[torch.Tensor] = [x] if output_hidden_states else []
        for i, blk in enumerate(self.layers):
            x = x + blk.self_attn(blk.input_layernorm(x), cos, sin, mask, cache, i, write_slots, span, causal_fresh)
            x = x + blk.mlp(blk.post_attention_layernorm(x))
            if output_hidden_states:
                hidden.append(x)
        if cache is not None:
            cache.lengths = cache.lengths + (num_new if num_new is not None else T)
        x = self.norm(x)
        if output_hidden_states:
            hidden[-1] = x  # HF reports the final normed state as the last hidden state
            return x, hidden
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Project hidden states to vocabulary logits (or reward scores for a reward model)."""
        if self.cfg.is_reward_model:
            return self.score(h)
        w = self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(h, w)

    # -- Hugging Face weight names -----------------------------------------------------
    def load_hf_state_dict(self, sd: dict[str, torch.Tensor], strict: bool = True) -> None:
        """Load weights named as in transformers (``model.layers.0.self_attn.q_proj.weight``...)."""
        sd = {k.removeprefix("model."): v for k, v in sd.items()}
        out: dict[str, torch.Tensor] = {}
        for i in range(self.cfg.num_hidden_layers):
            p = f"layers.{i}."
            for kind in ("weight", "bias"):
                parts = [sd.pop(f"{p}self_attn.{n}_proj.{kind}", None) for n in "qkv"]
                if parts[0] is not None:
                    out[f"{p}self_attn.qkv_proj.{kind}"] = torch.cat(parts)
                parts = [sd.pop(f"{p}mlp.{n}_proj.{kind}", None) for n in ("gate", "up")]
                if parts[0] is not None:
                    out[f"{p}mlp.gate_up_proj.{kind}"] = torch.cat(parts)
        out.update(sd)
        if self.lm_head is None:
            out.pop("lm_head.weight", None)
        out = {k: v.to(self.dtype) for k, v in out.items()}
        missing, unexpected = self.load_state_dict(out, strict=False)
        if strict and (missing or unexpected):
            raise ValueError(f"checkpoint does not match config: missing {missing}, unexpected {unexpected}")

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights under transformers' names, ready for ``safetensors.torch.save_file``."""
        out: dict[str, torch.Tensor] = {}
        c = self.cfg
        q, kv, f = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim, c.intermediate_size
        for k, v in self.state_dict().items():
            v = v.detach().contiguous()
            if ".qkv_proj." in k:
                for name, part in zip("qkv", v.split([q, kv, kv])):
                    out["model." + k.replace("qkv_proj", f"{name}_proj")] = part.contiguous()
            elif ".gate_up_proj." in k:
                for name, part in zip(("gate", "up"), v.split([f, f])):
                    out["model." + k.replace("gate_up_proj", f"{name}_proj")] = part.contiguous()
            elif k.startswith(("lm_head", "score")):
                out[k] = v
            else:
                out["model." + k] = v
        return out
