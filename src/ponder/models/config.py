"""Model configuration read from a Hugging Face ``config.json``.

Both the transformers v4 spelling (``rope_theta`` + ``rope_scaling``) and the v5
spelling (``rope_parameters``) are understood, so checkpoints from either era load.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral", "smollm3")


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2: bias on q, k, v only
    o_bias: bool = False  # Llama attention_bias=True: bias on o as well
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    # Reward models ship as LlamaForTokenClassification with num_labels=1.
    architecture: str = "LlamaForCausalLM"
    num_labels: int = 0
    # SmolLM3: which layers apply RoPE (None: every layer); the others attend without
    # positions (NoPE).
    rope_layers: tuple[bool, ...] | None = None
    # Sliding-window attention (Mistral; Qwen2 with use_sliding_window): the window,
    # when some layer uses one. Within the window it equals full attention, so ponder
    # runs such models with their context capped at the window (context_length).
    sliding_window: int | None = None
    # Qwen3: an RMSNorm over each head's q and k (before RoPE)
    qk_norm: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "max_position_embeddings"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive integer; got {v!r}")
        for t in self.eos_ids + [x for x in (self.bos_token_id, self.pad_token_id) if x is not None]:
            if not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size:
                raise ValueError(f"special token ids (eos, bos, pad) must be in [0, {self.vocab_size}); got {t!r}")
        if self.hidden_size % self.num_attention_heads and self.head_dim is None:
            raise ValueError("hidden_size must be divisible by num_attention_heads")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    @property
    def context_length(self) -> int:
        """Positions ponder runs the model over: max_position_embeddings, or the
        sliding window when a layer uses one (beyond it the window would drop keys)."""
        if self.sliding_window is not None:
            return min(self.max_position_embeddings, self.sliding_window)
        return self.max_position_embeddings

    @property
    def context_limit(self) -> str:
        """What sets ``context_length``, as config.json names it (said in errors)."""
        if self.sliding_window is not None and self.sliding_window < self.max_position_embeddings:
            return "sliding_window"
        return "max_position_embeddings"

    @property
    def is_reward_model(self) -> bool:
        return self.num_labels > 0

    @property
    def eos_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        if isinstance(self.eos_token_id, int):
            return [self.eos_token_id]
        return list(self.eos_token_id)

    def num_parameters(self) -> int:
        """Parameter count implied by the config (embeddings counted once if tied)."""
        h, f, L = self.hidden_size, self.intermediate_size, self.num_hidden_layers
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        mlp = 3 * h * f + (2 * f + h if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h
        n = L * per_layer + h + self.vocab_size * h
        if self.is_reward_model:
            n += h * self.num_labels + self.num_labels
        elif not self.tie_word_embeddings:
            n += self.vocab_size * h
        return n

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token: 2·(non-embedding params) + attention over ``context``.

        The attention term is 2 (QK^T and AV) × 2 FLOPs × layers × heads × head_dim × context.
        """
        n = self.num_parameters() - self.vocab_size * self.hidden_size
        if self.tie_word_embeddings and not self.is_reward_model:
            n += self.vocab_size * self.hidden_size  # the lm_head matmul is still done
        attn = 4 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * context
        return 2.0 * n + attn

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"model_type {model_type!r} is not supported; ponder's native engine "
                f"loads {', '.join(SUPPORTED_MODEL_TYPES)}"
            )
        heads = d["num_attention_heads"]
        rope_theta = d.get("rope_theta", 10000.0)
        rope_scaling = d.get("rope_scaling")
        params = d.get("rope_parameters")
        if params:  # transformers v5
            params = dict(params)
            rope_theta = params.pop("rope_theta", rope_theta)
            if params.get("rope_type", params.get("type", "default")) != "default":
                rope_scaling = params
        if rope_scaling is not None:
            if not isinstance(rope_scaling, dict):
                raise ValueError(f"rope_scaling must be an object; got {rope_scaling!r}")
            kind = rope_scaling.get("rope_type", rope_scaling.get("type"))
            if kind not in (None, "default", "llama3", "linear"):
                raise ValueError(f"rope_scaling type {kind!r} is not supported (llama3, linear)")
            if kind in (None, "default"):
                rope_scaling = None
            elif not isinstance(rope_scaling.get("factor"), (int, float)) or rope_scaling["factor"] <= 0:
                raise ValueError(f"rope_scaling of type {kind} needs a positive factor; got {rope_scaling.get('factor')!r}")
        archs = d.get("architectures") or ["LlamaForCausalLM"]
        is_qwen = model_type in ("qwen2", "qwen3")  # their sliding-window keys
        qwen2 = model_type == "qwen2"  # bias on q, k, v (Qwen3 has none unless attention_bias)
        L = d["num_hidden_layers"]
        rope_layers = None
        if model_type == "smollm3":  # transformers' SmolLM3Config: 1 = RoPE, 0 = NoPE per layer
            flags = d.get("no_rope_layers")
            if flags is None:
                every = d.get("no_rope_layer_interval", 4)
                flags = [int((i + 1) % every != 0) for i in range(L)]
            if len(flags) != L:
                raise ValueError(f"no_rope_layers has {len(flags)} entries for {L} layers")
            rope_layers = None if all(flags) else tuple(bool(f) for f in flags)
        # Sliding windows, per layer as transformers decides them.
        window = d.get("sliding_window")
        types = d.get("layer_types")
        if types is not None:
            sliding = any(t == "sliding_attention" for t in types)
        elif is_qwen:
            sliding = bool(d.get("use_sliding_window", False)) and d.get("max_window_layers", L) < L
        else:
            sliding = window is not None
        if sliding and not (isinstance(window, int) and window > 0):
            raise ValueError(f"sliding_window must be a positive integer when a layer uses it; got {window!r}")
        attention_bias = bool(d.get("attention_bias", False))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_hidden_layers=d["num_hidden_layers"],
            num_attention_heads=heads,
            num_key_value_heads=d.get("num_key_value_heads") or heads,
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=float(rope_theta),
            rope_scaling=rope_scaling,
            max_position_embeddings=d.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
            qkv_bias=qwen2 or attention_bias,
            o_bias=attention_bias and not qwen2,
            qk_norm=model_type == "qwen3",
            mlp_bias=bool(d.get("mlp_bias", False)),
            model_type=model_type,
            bos_token_id=d.get("bos_token_id"),
            eos_token_id=d.get("eos_token_id"),
            pad_token_id=d.get("pad_token_id"),
            architecture=archs[0],
            # transformers' default is two labels, and it leaves defaults out of config.json
            num_labels=(d.get("num_labels") or len(d.get("id2label", {})) or 2)
            if archs[0].endswith("ForTokenClassification")
            else 0,
            rope_layers=rope_layers,
            sliding_window=window if sliding else None,
        )

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        return cls.from_dict(json.loads(Path(path).read_text()))

    def to_hf_dict(self) -> dict[str, Any]:
        """The config.json that ``transformers`` reads back for the same weights."""
        d: dict[str, Any] = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.qkv_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "pad_token_id": self.pad_token_id,
            "torch_dtype": "float32",
        }
        if self.rope_scaling:
            d["rope_scaling"] = self.rope_scaling
        if self.is_reward_model:
            d["num_labels"] = self.num_labels
            d["id2label"] = {str(i): f"LABEL_{i}" for i in range(self.num_labels)}
            d["label2id"] = {f"LABEL_{i}": i for i in range(self.num_labels)}
        d.update(self.extra)
        return d

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rope_inv_freq(cfg: ModelConfig) -> "torch.Tensor":  # noqa: F821
    """Inverse frequencies for RoPE, with Llama-3 or linear scaling applied."""
    import torch

    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    sc = cfg.rope_scaling
    if not sc:
        return inv
    kind = sc.get("rope_type", sc.get("type"))
    factor = float(sc["factor"])  # checked at load (from_dict)
    if kind == "linear":
        return inv / factor
    # Llama 3: leave high frequencies alone, divide low frequencies by `factor`,
    # and interpolate smoothly in between (Meta's reference implementation).
    low = float(sc.get("low_freq_factor", 1.0))
    high = float(sc.get("high_freq_factor", 4.0))
    old_ctx = float(sc.get("original_max_position_embeddings", 8192))
    low_wavelen = old_ctx / low
    high_wavelen = old_ctx / high
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(medium, smoothed, scaled)
