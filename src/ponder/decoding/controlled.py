"""Controlled generation with several models (or one model under several prompts).

``CombinedLM`` runs several logits-level models in lockstep, each with its own KV
cache and its own view of the prompt, and hands the decoding loop one combined score
per step. The token-level strategies then work unchanged (greedy, sampling, stops,
streaming, n): composition by functions, not by flags.

* contrastive decoding (Li et al. 2023): log p_expert − β·log p_amateur over the
  tokens that pass the plausibility constraint p_expert ≥ α·max p_expert;
* product of experts / DExperts / proxy tuning (Liu et al. 2021; 2024):
  Σ_i w_i · log p_i, e.g. base + (expert − anti-expert) with weights (1, 1, −1);
* classifier-free guidance (Sanchez et al. 2023): log p_uncond + γ·(log p_cond − log p_uncond),
  the unconditional branch seeing a negative prompt instead of the user's.

The returned ``logprobs`` are those of the combined score (log-softmax of it), since
that is the distribution the strategy decodes from.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch

from ..protocols import Access, require_access
from .generate import Greedy, Sample
from .processors import SettingError, _check


class CompositeCache:
    """One KV cache per member model, branched together."""

    def __init__(self, caches: list[Any]) -> None:
        self.caches = caches

    def fork(self, rows):
        return CompositeCache([c.fork(rows) for c in self.caches])

    def reorder_(self, rows):
        for c in self.caches:
            c.reorder_(rows)

    def keep_rows_(self, rows):
        for c in self.caches:
            c.keep_rows_(rows)

    def truncate_(self, n):
        for c in self.caches:
            c.truncate_(n)


class CombinedLM:
    """Several models that share a tokenizer, decoded as one.

    ``combine(list of [B, V] float32 logits) -> [B, V] scores``; ``prompt_maps[i]`` turns
    the user's prompt ids into member i's prompt (None: the same prompt)."""

    access = Access.LOGITS

    def __init__(self, members: Sequence[Any], combine: Callable[[list[torch.Tensor]], torch.Tensor],
                 prompt_maps: Sequence[Callable[[list[int]], list[int]] | None] | None = None, name: str = "combined") -> None:
        if len(members) < 1:
            raise SettingError("a combination needs at least one model")
        for m in members:
            require_access(m, Access.LOGITS, name)
        vocab = {m.vocab_size for m in members}
        if len(vocab) != 1:
            raise SettingError(f"{name}: the models must share a tokenizer, but their vocabularies differ in size {sorted(vocab)}")
        self.members = list(members)
        self.combine = combine
        self.prompt_maps = list(prompt_maps) if prompt_maps else [None] * len(members)
        self.name = name
        self.vocab_size = vocab.pop()
        lead = self.members[0]
        self.encode, self.decode, self.tokenizer = lead.encode, lead.decode, lead.tokenizer

    @property
    def eos_token_ids(self) -> list[int]:
        return self.members[0].eos_token_ids

    def flops(self, n_tokens: int, context_start: int) -> float:
        return sum(m.flops(n_tokens, context_start) for m in self.members)

    def member_logits(self, prompts: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Each member's next-token logits for the prompts (for checking the formula)."""
        return [m.prefill([f(list(p)) if f else list(p) for p in prompts])[0]
                for m, f in zip(self.members, self.prompt_maps)]

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int | None = None):
        outs = []
        for m, f in zip(self.members, self.prompt_maps):
            mp = [f(list(p)) if f else list(p) for p in prompts]
            cap = None if capacity is None else capacity + max(0, max(map(len, mp)) - max(map(len, prompts)))
            outs.append(m.prefill(mp, cap))
        return self.combine([lg for lg, _ in outs]), CompositeCache([c for _, c in outs])

    def step(self, tokens: torch.Tensor, cache: CompositeCache) -> torch.Tensor:
        return self.combine([m.step(tokens, c) for m, c in zip(self.members, cache.caches)])


def contrastive_scores(alpha: float = 0.1, beta: float = 1.0) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Li et al. (2023), Contrastive Decoding: expert minus amateur log-probabilities on
    the plausible set V_head = {x : p_exp(x) ≥ α · max p_exp}; −inf elsewhere."""
    _check(isinstance(alpha, (int, float)) and 0 < alpha <= 1, f"alpha must be in (0, 1]; got {alpha}")
    _check(isinstance(beta, (int, float)) and beta >= 0, f"beta must be >= 0; got {beta}")
    log_alpha = math.log(alpha)

    def combine(logits: list[torch.Tensor]) -> torch.Tensor:
        expert, amateur = logits[0].log_softmax(-1), logits[1].log_softmax(-1)
        plausible = expert >= expert.max(-1, keepdim=True).values + log_alpha
        return torch.where(plausible, expert - beta * amateur, torch.full_like(expert, float("-inf")))

    return combine


def product_scores(weights: Sequence[float]) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Σ_i w_i · log_softmax(logits_i): product of experts (DExperts, proxy tuning)."""
    for w in weights:
        _check(isinstance(w, (int, float)) and math.isfinite(w), f"weights must be finite numbers; got {w}")

    def combine(logits: list[torch.Tensor]) -> torch.Tensor:
        if len(logits) != len(weights):
            raise SettingError(f"{len(weights)} weights for {len(logits)} models")
        return sum(w * lg.log_softmax(-1) for w, lg in zip(weights, logits))

    return combine


def guidance_scores(scale: float) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """Classifier-free guidance (Sanchez et al. 2023) on log-probabilities:
    log p_uncond + γ·(log p_cond − log p_uncond); γ = 1 is the plain model."""
    _check(isinstance(scale, (int, float)) and scale >= 0, f"guidance_scale must be >= 0 (1 = no guidance); got {scale}")

    def combine(logits: list[torch.Tensor]) -> torch.Tensor:
        cond, uncond = logits[0].log_softmax(-1), logits[1].log_softmax(-1)
        return uncond + scale * (cond - uncond)

    return combine


def _generator(lm: CombinedLM, sample: bool, **settings: Any):
    return Sample(lm, **settings) if sample else Greedy(lm, **settings)


def ContrastiveDecoding(expert: Any, amateur: Any, alpha: float = 0.1, beta: float = 1.0, sample: bool = False, **settings: Any):
    """Greedy (or sampled) decoding of the contrastive objective (Li et al. 2023)."""
    lm = CombinedLM([expert, amateur], contrastive_scores(alpha, beta), name="contrastive decoding")
    return _generator(lm, sample, **settings)


def ProductOfExperts(models: Sequence[Any], weights: Sequence[float], sample: bool = True, **settings: Any):
    """Decode from the normalised product Π p_i^{w_i} (DExperts / proxy tuning)."""
    if len(models) != len(weights):
        raise SettingError(f"product of experts: {len(weights)} weights for {len(models)} models")
    lm = CombinedLM(models, product_scores(weights), name="product of experts")
    return _generator(lm, sample, **settings)


def ClassifierFreeGuidance(lm: Any, guidance_scale: float = 1.5, negative_prompt: str = "", sample: bool = False, **settings: Any):
    """Classifier-free guidance with two prompts: the user's and ``negative_prompt``
    (empty: only the BOS token, i.e. unconditional)."""
    neg = lm.encode(negative_prompt) if negative_prompt else lm.encode("")
    if not neg:
        neg = [lm.eos_token_ids[0]]
    combined = CombinedLM([lm, lm], guidance_scores(guidance_scale), [None, lambda ids: list(neg)],
                          name="classifier-free guidance")
    return _generator(combined, sample, **settings)
