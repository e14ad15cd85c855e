"""``NativeLM``: ponder's own transformer, at every access level.

``LogitsLM`` (``prefill`` / ``step`` / ``forward`` / ``new_cache`` / ``flops``) is the
model itself; ``TextLM`` and ``LogprobsLM`` (``generate``, ``score``) run its engine's
token-level sampler, so that an algorithm written for a remote text-only server runs
here unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..errors import SettingError
from ..models.kv_cache import KVCache
from ..models.llama import Transformer
from ..models.llama_numpy import NumpyLlama
from ..models.loader import load_tokenizer, load_transformer
from ..protocols import Access
from ..models.context import check_context
from .forward import ForwardLM



class NativeLM(ForwardLM):
    """A Hugging Face Llama-family checkpoint run by ponder's native transformer.

    ``forward`` is the one primitive: new tokens for each row of a KV cache in, float32
    logits out. Everything else (prefill, decode step, scoring) is built on it.
    """

    access = Access.LOGITS

    BACKENDS = ("auto", "c", "numpy", "torch")
    # The C kernel keeps a packed copy of the matrices (4 bytes per parameter): above
    # this size "auto" spares that memory and runs numpy. Measured on 2 cores, C is the
    # faster up to here: 75M parameters, 1 row 11.0 vs 13.8 ms, 16 rows 29 vs 60 ms.
    C_MAX_PARAMETERS = 200_000_000

    def __init__(self, model: Transformer, tokenizer, name: str = "model", path: str | None = None,
                 backend: str = "auto") -> None:
        if backend not in self.BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(self.BACKENDS)}; got {backend!r}")
        self.model = model
        # Float32 CPU passes run outside torch, where a small model's step costs several
        # times less: as one call into a C kernel (llama_c.py, built on first use) or
        # as numpy operations (llama_numpy.py). "auto" takes C for models up to
        # C_MAX_PARAMETERS when a compiler is there, else numpy. The torch model serves
        # the rest (hidden states, shared prefixes, bfloat16) and "torch" forces it.
        self.backend = backend
        self._fast: NumpyLlama | None = None
        self._drafting_twin = None  # a bfloat16 copy of the C kernel's matrices, for drafting (made on first use)
        self.tokenizer = tokenizer
        self.name = name
        self.path = path
        self.cfg = model.cfg
        if self.cfg.is_reward_model:
            raise SettingError(f"{name} is a reward model (a token-classification head), not a language model: "
                               "it cannot generate; load it as a reward model (RewardModel)")
        eos = list(self.cfg.eos_ids)
        self._eos = eos

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: str | torch.dtype = "float32",
                        backend: str = "auto") -> "NativeLM":
        """Load a shipped model by name (``arith``) or a checkpoint folder by path."""
        from ..models.registry import resolve_model

        path, name = resolve_model(str(name_or_path))
        return cls(load_transformer(path, dtype), load_tokenizer(path), name=name, path=str(path), backend=backend)

    # -- tokens and text ------------------------------------------------------------------
    @property
    def eos_token_ids(self) -> list[int]:
        return self._eos

    @property
    def vocab_size(self) -> int:
        return self.cfg.vocab_size

    @property
    def context_length(self) -> int:
        """Positions a prompt and its generated tokens must fit in: the model's
        ``max_position_embeddings``, or its sliding window when a layer uses one."""
        return self.cfg.context_length

    @property
    def context_limit(self) -> str:
        """The config.json key ``context_length`` comes from (said in errors)."""
        return self.cfg.context_limit

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes one token takes over every layer (keys and values)."""
        cfg = self.cfg
        return 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * self.model.dtype.itemsize

    @property
    def reads_shared_prefix(self) -> bool:
        """Whether every forward pass this model runs can read a shared prefix (cascade
        attention): not when it is forced onto a backend without it (numpy)."""
        if self.backend not in ("c", "numpy") or not NumpyLlama.supports(self.model, None):
            return True
        fast = self._fast_for(None)
        return fast is None or fast.handles_shared_prefix

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def num_parameters(self) -> int:
        return self.cfg.num_parameters()

    def flops(self, n_tokens: int, context_start: int) -> float:
        """Forward FLOPs for ``n_tokens`` new tokens appended after ``context_start``."""
        if n_tokens <= 0:
            return 0.0
        mean_context = context_start + (n_tokens + 1) / 2
        return n_tokens * self.cfg.flops_per_token(int(mean_context))

    # -- the forward primitive -----------------------------------------------------------
    def new_cache(self, batch_size: int, capacity: int = 256) -> KVCache:
        return self.model.new_cache(batch_size, capacity)

    def forward(
        self,
        input_ids: torch.Tensor,  # [B, T]
        cache: KVCache | None,
        num_new: torch.Tensor | None = None,  # [B]
        last_only: bool = False,
        output_hidden_states: bool = False,
    ):
        """Logits [B, T, V] (float32), or [B, V] at each row's last new token when
        ``last_only``. With ``output_hidden_states`` returns (logits, hidden_states)."""
        if cache is None and input_ids.shape[1] > self.cfg.context_length:  # a window past which it is wrong
            check_context(self, int(input_ids.shape[1]), "the input")
        fast = self._fast_for(cache) if not output_hidden_states else None
        if fast is not None:  # no autograd outside torch: no inference-mode context to enter
            return fast.run_torch(input_ids, cache, num_new, last_only)
        return self._torch_forward(input_ids, cache, num_new, last_only, output_hidden_states)

    @torch.inference_mode()
    def _torch_forward(self, input_ids, cache, num_new, last_only, output_hidden_states):
        out = self.model(input_ids, cache, num_new, output_hidden_states=output_hidden_states)
        h, hidden = out if output_hidden_states else (out, None)
        if last_only:
            if num_new is None:
                h = h[:, -1]
            else:
                h = h[torch.arange(h.shape[0]), num_new - 1]
        logits = self.model.logits(h).float()
        return (logits, hidden) if output_hidden_states else logits

    def _fast_for(self, cache: KVCache | None) -> NumpyLlama | None:
        """The model's twin outside torch (C or numpy), if this pass can run on it."""
        if self.backend == "torch":
            return None
        fast = self._fast
        if fast is None:
            if not NumpyLlama.supports(self.model, None):
                if self.backend in ("c", "numpy"):
                    raise ValueError(f"backend {self.backend!r} cannot run this model: it needs float32 weights on the CPU and RoPE in every layer; use backend='auto' or 'torch'")
                return None
            fast = self._fast = self._make_fast()
        if cache is None or (type(cache) is KVCache and (not cache.shared or fast.handles_shared_prefix
                                                          or not cache.has_shared)):
            return fast
        if self.backend in ("c", "numpy"):
            raise ValueError(f"backend {self.backend!r} cannot read a shared prefix (cascade attention); "
                             "use backend='auto'")
        return None

    def _make_fast(self) -> NumpyLlama:
        if self.backend == "numpy":
            return NumpyLlama(self.model)
        from ..models.llama_c import CLlama, kernel_error, load_kernel

        small = self.num_parameters() <= self.C_MAX_PARAMETERS
        lib = load_kernel() if (small or self.backend == "c") else None
        if lib is not None:
            return CLlama(self.model, lib)
        if self.backend == "c":
            raise RuntimeError(f"backend 'c' is unavailable: {kernel_error()}; use backend='numpy'")
        return NumpyLlama(self.model)

    @property
    def backend_in_use(self) -> str:
        """Which implementation runs float32 passes: "c", "numpy" or "torch"."""
        fast = self._fast_for(None) if NumpyLlama.supports(self.model, None) else None
        return "torch" if fast is None else fast.kind

    def _kernel_for_row(self, cache: KVCache):
        """The C kernel, if it serves this one-row, unshared cache of a language model;
        else None (the one-call paths below then decline, and callers step in Python)."""
        if cache.batch_size != 1 or cache.shared or self.cfg.is_reward_model:
            return None
        fast = self._fast_for(cache)
        return fast if fast is not None and fast.kind == "c" else None

    def _kernels_with(self, draft: "NativeLM", tcache: KVCache, dcache: KVCache, draft_weights: str = "float32"):
        """(this model's kernel, the draft's), if the C kernel serves both caches; else None."""
        if (not isinstance(draft, NativeLM) or draft.vocab_size != self.vocab_size or draft.cfg.is_reward_model
                or tcache.shared or dcache.shared or self.cfg.is_reward_model):
            return None
        mine, theirs = self._fast_for(tcache), draft._fast_for(dcache)
        if mine is None or theirs is None or not mine.kind == theirs.kind == "c":
            return None
        return mine, draft._drafting_kernel(theirs, draft_weights)

    def _drafting_kernel(self, fast, weights: str):
        """This model's C kernel for drafting, its matrices in ``weights``: the float32
        one, or a copy packed in bfloat16 (made once): half the bytes to stream per
        draft step, so a small draft's matrices stay in a 1 MiB L2 cache between its
        steps and the target's pass. A draft's numbers never change a greedy output."""
        if weights == fast.weights:
            return fast
        twin = self._drafting_twin
        if twin is None or twin.weights != weights:
            from ..models.llama_c import CLlama

            twin = self._drafting_twin = CLlama(self.model, fast.lib, weights=weights)
        return twin

    def greedy_draft(self, feed: Sequence[int], k: int, cache: KVCache, weights: str = "float32") -> list[int] | None:
        """k greedy tokens for a one-row cache in one call (speculative drafting): the
        pending ``feed`` then each argmax is fed, the last draft is not; ``weights`` as
        in ``_drafting_kernel``. None when the C kernel does not serve this model or
        cache (callers then step one by one)."""
        fast = self._kernel_for_row(cache)
        return self._drafting_kernel(fast, weights).greedy_draft(list(feed), k, cache) if fast is not None else None

    def greedy_steps(self, first: int, n: int, cache: KVCache, stop_ids: Sequence[int], feed_last: bool = True,
                     ban: Sequence[int] = (), ban_steps: int = 0):
        """Multi-step greedy decoding of a one-row cache in one C call: feed ``first``,
        then up to ``n`` argmax tokens (never ``ban`` among the first ``ban_steps``:
        min_tokens), ending after a stop id. Returns (tokens, their
        log-probabilities, next-token logits [1, V] or None when the row ended or
        ``feed_last`` is False); None when the C kernel does not serve this model or
        cache (the engine then steps one token at a time)."""
        fast = self._kernel_for_row(cache)
        if fast is None:
            return None
        import numpy as np

        return fast.greedy_steps(first, n, cache, np.asarray(list(stop_ids), dtype=np.int64), feed_last,
                                 np.asarray(list(ban), dtype=np.int64), ban_steps)

    def greedy_speculate(self, draft: "NativeLM", t_feed: Sequence[int], d_feed: Sequence[int], k: int, adaptive: bool,
                         budget: int, stop_ids: Sequence[int], tcache: KVCache, dcache: KVCache,
                         draft_weights: str = "float32") -> dict | None:
        """Greedy speculative decoding with ``draft`` (its matrices in ``draft_weights``),
        round after round in one C call, until a stop token or ``budget`` tokens (see
        ``CLlama.greedy_speculate``); None when the C kernel does not serve both models
        and caches."""
        pair = self._kernels_with(draft, tcache, dcache, draft_weights)
        if pair is None:
            return None
        mine, theirs = pair
        return mine.greedy_speculate(theirs, list(t_feed), list(d_feed), k, adaptive, budget, list(stop_ids),
                                     tcache, dcache)

    def ngram_speculate(self, ctx: Sequence[int], k: int, max_ngram: int, budget: int, stop_ids: Sequence[int],
                        cache: KVCache, credit: float = 1.0) -> dict | None:
        """Greedy decoding with prompt-lookup drafts, every round in one C call, drafting
        only while drafts pay (see ``CLlama.ngram_speculate``); None when the C kernel
        does not serve this model or cache."""
        fast = self._kernel_for_row(cache)
        if fast is None:
            return None
        return fast.ngram_speculate(list(ctx), k, max_ngram, budget, list(stop_ids), cache, credit)

    def greedy_round(self, draft: "NativeLM", t_feed: Sequence[int], d_feed: Sequence[int], k: int,
                     tcache: KVCache, dcache: KVCache, draft_weights: str = "float32"
                     ) -> tuple[int, list[int], list[int], list[float]] | None:
        """One round of greedy speculative decoding with ``draft``, in one C call: k
        greedy drafts, one target pass over its pending tokens and the drafts, the
        longest agreeing prefix. Returns (accepted, drafts, the target's argmaxes, their
        log-probabilities), with both caches rolled back to what was accepted; None when
        the C kernel does not serve both models and caches (callers then use the
        general loop)."""
        pair = self._kernels_with(draft, tcache, dcache, draft_weights)
        if pair is None:
            return None
        mine, theirs = pair
        return mine.greedy_round(theirs, list(t_feed), list(d_feed), k, tcache, dcache)

    def __repr__(self) -> str:
        return f"NativeLM({self.name!r}, params={self.num_parameters():,}, dtype={self.model.dtype})"
