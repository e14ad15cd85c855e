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
from .common_adapters import SettingError, _check


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

    @staticmethod
    def concat(caches: list["CompositeCache"]) -> "CompositeCache":
        """Stack several composite caches' rows (requests joining a batch)."""
        members = len(caches[0].caches)
        return CompositeCache([type(caches[0].caches[i]).concat([c.caches[i] for c in caches]) for i in range(members)])


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

    def new_cache(self, batch_size: int, capacity: int = 256) -> CompositeCache:
        return CompositeCache([m.new_cache(batch_size, capacity) for m in self.members])

    def forward(self, input_ids: torch.Tensor, cache: CompositeCache | None, num_new: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Combined scores [B, T, V] ([B, V] with ``last_only``) of new tokens appended
        to every member's cache (the members' own prompts come from ``prefill``)."""
        caches = cache.caches if cache is not None else [None] * len(self.members)
        outs = [m.forward(input_ids, c, num_new, last_only=last_only) for m, c in zip(self.members, caches)]
        shape = outs[0].shape
        return self.combine([o.reshape(-1, shape[-1]) for o in outs]).reshape(shape)


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


class LayerContrastLM:
    """DoLa (Chuang et al., 2024): decode by contrasting layers of one model. Each step
    picks the premature layer M among ``layers`` whose next-token distribution is
    furthest (Jensen-Shannon) from the final layer's, and scores
    log q_final − log q_M on the plausible set {x : q_final(x) ≥ α · max q_final};
    −inf elsewhere. Early layers are read through the model's own final norm and head.

    ``layers``: "low" (the lower half, every other layer from the embedding output),
    "high" (the upper half), or explicit indices (0 = embedding output; L = the last
    block, which is the final layer itself and so not allowed)."""

    access = Access.LOGITS

    def __init__(self, lm: Any, layers: str | Sequence[int] = "low", alpha: float = 0.1) -> None:
        require_access(lm, Access.LOGITS, "DoLa")
        if not hasattr(lm, "model") or not hasattr(lm.model, "layers"):
            raise SettingError("DoLa needs a native model (it reads the hidden state of every layer)")
        _check(isinstance(alpha, (int, float)) and 0 < alpha <= 1, f"alpha must be in (0, 1]; got {alpha}")
        L = len(lm.model.layers)
        if layers == "low":
            chosen = list(range(0, L // 2, 2))
        elif layers == "high":
            chosen = list(range(L // 2, L, 2))
        elif isinstance(layers, str):
            raise SettingError(f"dola layers must be 'low', 'high' or a list of layer indices; got {layers!r}")
        elif isinstance(layers, int):
            chosen = [layers]
        else:
            chosen = [int(i) for i in layers]
        bad = [i for i in chosen if not 0 <= i < L]
        _check(bool(chosen) and not bad, f"dola layers must be indices in [0, {L - 1}] (0 = embeddings); got {chosen}")
        self.lm, self.layers, self.alpha = lm, chosen, float(alpha)
        self.name = f"dola({lm.name})"
        self.vocab_size, self.encode, self.decode, self.tokenizer = lm.vocab_size, lm.encode, lm.decode, lm.tokenizer
        self.last_premature: torch.Tensor | None = None  # [B] the layer picked at the last step (for inspection)

    @property
    def eos_token_ids(self) -> list[int]:
        return self.lm.eos_token_ids

    def flops(self, n_tokens: int, context_start: int) -> float:
        return self.lm.flops(n_tokens, context_start)

    def scores(self, hidden: list[torch.Tensor]) -> torch.Tensor:
        """DoLa scores [B, V] from one position's hidden states (a list over layers of [B, H])."""
        model = self.lm.model
        final = model.logits(hidden[-1]).float().log_softmax(-1)  # [B, V] (hidden[-1] is normed)
        early = torch.stack([model.logits(model.norm(hidden[j])).float().log_softmax(-1) for j in self.layers])  # [J, B, V]
        mix = torch.logaddexp(final[None], early) - math.log(2)  # log of the midpoint distribution
        jsd = 0.5 * ((final.exp()[None] * (final[None] - mix)).sum(-1) + (early.exp() * (early - mix)).sum(-1))  # [J, B]
        pick = jsd.argmax(0)  # [B]
        self.last_premature = torch.tensor(self.layers)[pick]
        premature = early[pick, torch.arange(final.shape[0])]  # [B, V]
        plausible = final >= final.max(-1, keepdim=True).values + math.log(self.alpha)
        return torch.where(plausible, final - premature, torch.full_like(final, float("-inf")))

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int | None = None):
        ids, num_new = self.lm.pad_batch(prompts)
        cache = self.lm.new_cache(len(prompts), capacity or ids.shape[1] + 128)
        _, hidden = self.lm.forward(ids, cache, num_new, output_hidden_states=True)
        rows = torch.arange(len(prompts))
        return self.scores([h[rows, num_new - 1] for h in hidden]), cache

    def step(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        _, hidden = self.lm.forward(tokens[:, None], cache, output_hidden_states=True)
        return self.scores([h[:, -1] for h in hidden])

    def new_cache(self, batch_size: int, capacity: int = 256) -> Any:
        return self.lm.new_cache(batch_size, capacity)

    def forward(self, input_ids: torch.Tensor, cache: Any, num_new: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        """DoLa scores [B, T, V] ([B, V] with ``last_only``) of new tokens."""
        _, hidden = self.lm.forward(input_ids, cache, num_new, output_hidden_states=True)
        B, T = input_ids.shape
        if last_only:
            at = (num_new - 1) if num_new is not None else torch.full((B,), T - 1)
            return self.scores([h[torch.arange(B), at] for h in hidden])
        flat = self.scores([h.reshape(B * T, -1) for h in hidden])
        return flat.reshape(B, T, -1)


def DoLa(lm: Any, layers: str | Sequence[int] = "low", alpha: float = 0.1, sample: bool = False, **settings: Any):
    """Greedy (or sampled) decoding by contrasting layers (Chuang et al., 2024)."""
    return _generator(LayerContrastLM(lm, layers, alpha), sample, **settings)
