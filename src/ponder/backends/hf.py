"""``HFLM``: any local ``transformers`` causal LM at the logits level (extra ``hf``).

Every token-level algorithm (greedy, sampling adapters, beam search, constrained and
speculative decoding, the engine's continuous batching) runs on it unchanged, on CPU
or GPU, because it gives the same ``forward`` primitive as ponder's native model: new
tokens for each row of a cache in, float32 logits out.

The cache is transformers' own ``DynamicCache`` (``reorder_cache`` for beams,
``crop`` for speculation, ``batch_select_indices`` for rows leaving), wrapped in
``HFCache`` so that rows can hold different numbers of tokens. transformers keeps one
column per step for the whole batch; ponder's algorithms need ragged rows (a prompt
batch of different lengths, speculation accepting a different number of drafts per
row, requests joining a running batch). So ``HFCache`` keeps, next to the
``DynamicCache``, a ``valid`` mask over its columns and each row's token count; a
forward pass feeds explicit position ids (the row's count onwards) and the mask as
the attention mask. Attention does not care in which column a key sits (RoPE is
applied before caching), so a row's tokens may sit in any columns, with holes.

Importing this module imports transformers (seconds): ponder's core never does;
``load_model("hf:PATH")`` imports it on demand.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, Sequence

import torch

from ..errors import SettingError
from ..protocols import Access
from .forward import ForwardLM

try:
    import transformers
    from transformers import AutoModelForCausalLM, DynamicCache
except ImportError as e:  # pragma: no cover (the hf extra is installed by the tests)
    raise ImportError("the transformers backend needs the `hf` extra: pip install 'ponder[hf]'") from e


class HFCache:
    """A batch of rows over one ``DynamicCache`` [B, H, T, D] per layer, where row b's
    tokens are the columns ``valid[b]`` marks (``lengths[b]`` of them)."""

    def __init__(self, batch_size: int, device: torch.device | str = "cpu") -> None:
        self.dc: DynamicCache | None = None  # created by the first forward pass
        self.valid = torch.zeros((batch_size, 0), dtype=torch.bool, device=device)  # [B, T]
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # [B]

    @property
    def batch_size(self) -> int:
        return self.lengths.shape[0]

    @property
    def columns(self) -> int:
        return self.valid.shape[1]

    @property
    def capacity(self) -> int:  # grows on demand
        return self.columns

    def _layers(self) -> list[Any]:
        return list(self.dc.layers) if self.dc is not None else []

    def nbytes_used(self) -> int:
        """Bytes of KV holding valid tokens."""
        layers = [layer for layer in self._layers() if getattr(layer, "keys", None) is not None and layer.keys.numel()]
        if not layers or not self.columns:
            return 0
        per_token = sum(2 * layer.keys[0, :, 0].numel() * layer.keys.element_size() for layer in layers)
        return int(self.lengths.sum()) * per_token

    # -- the Cache protocol ------------------------------------------------------------
    def fork(self, rows: torch.Tensor | Sequence[int]) -> "HFCache":
        """A new cache whose row i copies row ``rows[i]``."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        new = HFCache(0, self.lengths.device)
        new.valid, new.lengths = self.valid[rows], self.lengths[rows]
        if self.dc is not None:  # a shallow copy whose layers hold the selected rows (new tensors)
            new.dc = copy.copy(self.dc)
            new.dc.layers = [copy.copy(layer) for layer in self.dc.layers]
            for layer in new.dc.layers:
                if layer.is_initialized and layer.keys.numel():
                    layer.keys, layer.values = layer.keys[rows], layer.values[rows]
        return new

    def reorder_(self, rows: torch.Tensor | Sequence[int]) -> None:
        """In place: row i becomes old row ``rows[i]`` (beams; transformers' own reorder)."""
        rows = torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)
        if self.dc is not None and self.columns:
            self.dc.reorder_cache(rows)
        self.valid, self.lengths = self.valid[rows], self.lengths[rows]

    def keep_rows_(self, rows: torch.Tensor | Sequence[int]) -> None:
        """Only these rows stay (finished requests leave the batch)."""
        self.reorder_(rows)

    def truncate_(self, n: int | torch.Tensor) -> None:
        """Roll back each row's last ``n`` tokens (an int for all rows, or a [B] tensor);
        columns no row uses any more are cropped from the ``DynamicCache``."""
        n = torch.as_tensor(n, dtype=torch.long, device=self.lengths.device).expand(self.batch_size)
        if (n < 0).any() or (n > self.lengths).any():
            raise ValueError("cannot truncate more tokens than a row holds")
        if not self.batch_size or int(n.max()) == 0:  # nothing to roll back
            return
        keep = self.lengths - n  # [B]
        self.valid = self.valid & (self.valid.long().cumsum(1) <= keep[:, None])
        self.lengths = keep
        used = self.valid.any(0).nonzero()
        last = int(used.max()) + 1 if used.numel() else 0
        if last < self.columns:
            if self.dc is not None:
                self.dc.crop(last - self.columns)
            self.valid = self.valid[:, :last]

    def append_(self, other: "HFCache") -> None:
        """Join ``other``'s rows after this cache's (requests entering a running batch);
        the shorter of the two is padded with unused columns."""
        if other.dc is None or not other.batch_size:
            return
        if self.dc is None or not self.batch_size:
            self.dc, self.valid, self.lengths = other.dc, other.valid, other.lengths
            return
        t = max(self.columns, other.columns)
        for mine, theirs in zip(self.dc.layers, other.dc.layers):
            mine.keys = torch.cat([_pad_columns(mine.keys, t), _pad_columns(theirs.keys, t)])
            mine.values = torch.cat([_pad_columns(mine.values, t), _pad_columns(theirs.values, t)])
        self.valid = torch.cat([_pad_columns(self.valid, t, dim=1), _pad_columns(other.valid, t, dim=1)])
        self.lengths = torch.cat([self.lengths, other.lengths])


def _pad_columns(x: torch.Tensor, t: int, dim: int = -2) -> torch.Tensor:
    """``x`` with zeros appended along ``dim`` up to ``t`` entries."""
    missing = t - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x, x.new_zeros(shape)], dim=dim)


def _architectures(path: Path) -> list[str]:
    import json

    try:
        return list(json.loads((Path(path) / "config.json").read_text()).get("architectures") or [])
    except (OSError, ValueError, AttributeError):
        return []


def _cache_keyword() -> str:
    """transformers renamed ``past_key_values`` to ``cache`` (5.x); take what this one has."""
    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


class HFLM(ForwardLM):
    """A local ``AutoModelForCausalLM`` checkpoint at ``LogitsLM`` level.

    Text goes through the checkpoint's ``tokenizer.json`` (the ``tokenizers`` library,
    as for the native model), so that constrained decoding and every text-level
    algorithm see the same tokens."""

    access = Access.LOGITS

    def __init__(self, model: Any, tokenizer: Any, name: str = "model", path: str | None = None) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        self.config = model.config
        self.device = next(model.parameters()).device
        self._cache_kw = _cache_keyword()
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if eos is None:
            eos = getattr(model.config, "eos_token_id", None)
        self._eos = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(e) for e in eos])

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: str | torch.dtype = "float32",
                        device: str | None = None) -> "HFLM":
        """Load a shipped model by name (``arith``) or a local checkpoint folder, on
        ``device`` (default: CUDA when there is one, else CPU). Never downloads."""
        from ..models.loader import load_tokenizer
        from ..models.registry import resolve_model

        path, name = resolve_model(str(name_or_path))
        if isinstance(dtype, str):
            if not isinstance(getattr(torch, dtype, None), torch.dtype):
                raise SettingError(f"dtype must be a torch dtype name such as float32 or bfloat16; got {dtype!r}")
            dtype = getattr(torch, dtype)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        archs = _architectures(path)
        if archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
            # transformers would load it with a freshly initialised LM head, silently
            raise SettingError(f"{path} is a {', '.join(archs)}, not a causal language model: it cannot generate")
        from transformers.utils import logging as hf_logging

        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # a local load takes a moment; its bar is noise in ponder's output
        try:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise SettingError(f"{path}: transformers cannot load it as a causal LM ({str(e).splitlines()[0]})") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        return cls(model.to(device), load_tokenizer(path), name=name, path=str(path))

    # -- tokens and text ------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def context_length(self) -> int:
        """max_position_embeddings, or the sliding window when a layer uses one: as for
        the native model (ponder's reading of config.json), since ``HFCache`` columns
        may outnumber positions (holes) and transformers' window counts columns."""
        from ..models.config import ModelConfig

        try:
            return ModelConfig.from_dict(self.config.to_dict()).context_length
        except Exception:  # an architecture ponder's reader does not know: transformers' own limit
            window = getattr(self.config, "sliding_window", None) if getattr(self.config, "use_sliding_window",
                                                                             True) else None
            limit = int(getattr(self.config, "max_position_embeddings", 0) or 2**31 - 1)
            return min(limit, int(window)) if window else limit

    @property
    def context_limit(self) -> str:
        """The config.json key ``context_length`` comes from (said in errors)."""
        from ..models.config import ModelConfig

        try:
            return ModelConfig.from_dict(self.config.to_dict()).context_limit
        except Exception:  # an architecture ponder's reader does not know
            return "max_position_embeddings"

    @property
    def kv_bytes_per_token(self) -> int:
        cfg = self.config
        heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * heads * head_dim * self.model.dtype.itemsize

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def flops(self, n_tokens: int, context_start: int) -> float:
        """Forward FLOPs for ``n_tokens`` new tokens after ``context_start``: 2 per
        weight (embeddings excluded) plus attention's QK^T and AV over the context."""
        if n_tokens <= 0:
            return 0.0
        cfg = self.config
        # The embedding lookup is free, the output projection is not (counted once when tied).
        emb, head = self.model.get_input_embeddings().weight, self.model.get_output_embeddings().weight
        weights = self.num_parameters() - emb.numel() + (head.numel() if head is emb else 0)
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        mean_context = context_start + (n_tokens + 1) / 2
        attention = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * mean_context
        return n_tokens * (2 * weights + attention)

    # -- the forward primitive -----------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int = 256) -> HFCache:
        """An empty cache of ``batch_size`` rows (``capacity`` is ignored: it grows)."""
        return HFCache(batch_size, self.device)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, cache: HFCache | None, num_new: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits [B, T, V] (float32) for ``input_ids`` [B, T] appended to each row of
        ``cache``, the first ``num_new[b]`` of row b real (the rest padding); [B, V] at
        each row's last new token when ``last_only``."""
        B, T = input_ids.shape
        dev = self.device
        ids = input_ids.to(dev)
        real = num_new is None or bool((num_new == T).all())
        num = torch.full((B,), T, dtype=torch.long, device=dev) if num_new is None else num_new.to(dev)
        new_valid = torch.arange(T, device=dev)[None, :] < num[:, None]  # [B, T]
        if cache is None:
            cache = HFCache(B, dev)
        if cache.batch_size != B:
            raise ValueError(f"input has {B} rows but the cache {cache.batch_size}")
        if cache.dc is None:
            cache.dc = DynamicCache()
        positions = cache.lengths[:, None] + torch.arange(T, device=dev)[None, :]  # [B, T]
        mask = torch.cat([cache.valid, new_valid], dim=1)  # [B, columns + T]
        keep = 1 if last_only and real else 0  # 0: logits at every position
        out = self.model(input_ids=ids, attention_mask=mask.long(), position_ids=positions, use_cache=True,
                         logits_to_keep=keep, **{self._cache_kw: cache.dc})
        cache.valid, cache.lengths = mask, cache.lengths + num
        logits = out.logits.float()  # [B, T or 1, V]
        if not last_only:
            return logits
        if keep:
            return logits[:, -1]
        return logits[torch.arange(B, device=dev), num - 1]

    def __repr__(self) -> str:
        return f"HFLM({self.name!r}, {type(self.model).__name__}, transformers {transformers.__version__}, {self.device})"
