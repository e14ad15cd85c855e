"""Sequence log-probability as a score: how likely the model finds each completion.

``SequenceLogprob(lm, "mean" | "sum")`` reads log p(completion | prompt) from any
``LogprobsLM`` (``score(prompt, continuations)``: a native model's forward pass, or a
server's prompt logprobs). The mean per token is the length-normalised form (it does
not favour short completions); the sum is the joint log-probability. Used for
weighted voting by likelihood and for reranking (e.g. the "sum of log probabilities"
baseline of Wang et al. 2023).
"""

from __future__ import annotations

import time
from typing import Any, Sequence

from ..errors import SettingError
from ..protocols import Access, require_access
from ..types import Usage
from .base import Scores, run_sync


class SequenceLogprob:
    """Score = mean (or sum) of the completion's token log-probabilities under ``lm``.
    An empty completion scores ``empty`` (default -inf: it says nothing)."""

    REDUCTIONS = ("mean", "sum")

    def __init__(self, lm: Any, reduction: str = "mean", empty: float = float("-inf")) -> None:
        require_access(lm, Access.LOGPROBS, "the sequence log-probability scorer")
        if reduction not in self.REDUCTIONS:
            raise SettingError(f"reduction must be one of {', '.join(self.REDUCTIONS)}; got {reduction!r}")
        self.lm, self.reduction, self.empty = lm, reduction, float(empty)
        self.name = f"logprob-{reduction}"

    def score(self, prompt: str, completions: Sequence[str]) -> Scores:
        t0 = time.perf_counter()
        token_logprobs = run_sync(self.lm.score(prompt, list(completions)))
        values = []
        for lps in token_logprobs:
            if not lps:
                values.append(self.empty)
            else:
                values.append(float(sum(lps)) / (len(lps) if self.reduction == "mean" else 1))
        return Scores(values, self._usage(prompt, completions, token_logprobs, time.perf_counter() - t0))

    def _usage(self, prompt: str, completions: Sequence[str], token_logprobs: list[list[float]], wall: float) -> Usage:
        # Each non-empty completion is read with its prompt in one forward pass.
        n_prompt = len(self.lm.encode(prompt)) if hasattr(self.lm, "encode") else 0
        calls = [len(lps) for lps in token_logprobs if lps]
        flops = getattr(self.lm, "flops", None)
        return Usage(prompt_tokens=n_prompt * len(calls), computed_tokens=sum(n_prompt + k for k in calls),
                     model_calls=len(calls), wall_s=wall,
                     flops=sum(flops(n_prompt + k, 0) for k in calls) if callable(flops) else 0.0)
