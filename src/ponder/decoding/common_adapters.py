"""Logits processors: small composable transforms ``(tokens, logits) -> logits``.

Each one validates its setting at construction and names the legal range in the
error; a setting that does nothing makes the processor the identity. ``chain(...)``
composes processors and is itself a processor (as optax's ``chain``), and forwards the
stateful hooks (``accept``, ``fork``, ``rollback``, ``reset``) to its members, as
llama.cpp's sampler chain does.

Shapes: ``tokens`` [B, T] (history, left-padded with -1), ``logits`` [B, V] float.
Filtered entries become ``-inf``.
"""

from __future__ import annotations

import math


import torch

from ..errors import SettingError
from ..processor import Chain, FunctionProcessor, Identity, Processor, chain  # noqa: F401 (the contract, re-exported)

NEG_INF = float("-inf")


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise SettingError(message)


class Temperature(Processor):
    """softmax(logits / τ) (Ackley et al. 1985). τ = 1 is the identity."""

    def __init__(self, temperature: float) -> None:
        _check(
            isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0,
            f"temperature must be > 0 (use greedy decoding for τ → 0); got {temperature}",
        )
        self.temperature = float(temperature)
        self.is_identity = self.temperature == 1.0

    def batch_key(self):
        return ("Temperature", self.temperature)

    def __call__(self, tokens, logits):
        return logits if self.is_identity else logits / self.temperature


class TopK(Processor):
    """Keep the k most likely tokens (Fan et al. 2018). k = 0 is the identity."""

    def __init__(self, k: int) -> None:
        _check(isinstance(k, int) and not isinstance(k, bool) and k >= 0, f"top_k must be an integer >= 0 (0 disables it); got {k}")
        self.k = k
        self.is_identity = k == 0

    def batch_key(self):
        return ("TopK", self.k)

    def __call__(self, tokens, logits):
        if self.is_identity or self.k >= logits.shape[-1]:
            return logits
        kth = torch.topk(logits, self.k, dim=-1).values[..., -1:]  # [B, 1]
        return logits.masked_fill(logits < kth, NEG_INF)


class TopP(Processor):
    """Nucleus sampling (Holtzman et al. 2020): keep the smallest set of most likely
    tokens whose probability sums to at least p. p = 1 is the identity."""

    def __init__(self, p: float) -> None:
        _check(isinstance(p, (int, float)) and 0 < p <= 1, f"top_p must be in (0, 1] (1 disables it); got {p}")
        self.p = float(p)
        self.is_identity = self.p == 1.0

    def batch_key(self):
        return ("TopP", self.p)

    def __call__(self, tokens, logits):
        if self.is_identity:
            return logits
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Ascending order: drop the low tail whose mass is at most 1 - p; always keep the top.
        drop = cum <= 1 - self.p
        drop[..., -1] = False
        mask = drop.scatter(-1, order, drop)
        return logits.masked_fill(mask, NEG_INF)


class MinP(Processor):
    """Keep tokens with p >= min_p · max p (Nguyen et al. 2024). min_p = 0 is the identity."""

    def __init__(self, min_p: float) -> None:
        _check(isinstance(min_p, (int, float)) and 0 <= min_p <= 1, f"min_p must be in [0, 1] (0 disables it); got {min_p}")
        self.min_p = float(min_p)
        self.is_identity = self.min_p == 0.0

    def batch_key(self):
        return ("MinP", self.min_p)

    def __call__(self, tokens, logits):
        if self.is_identity:
            return logits
        probs = logits.softmax(dim=-1)
        threshold = self.min_p * probs.max(dim=-1, keepdim=True).values
        return logits.masked_fill(probs < threshold, NEG_INF)
