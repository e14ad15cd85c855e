"""ponder's core vocabulary: ``Usage`` and ``Generation``. Imports nothing heavy."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Iterable, Literal

FinishReason = Literal["stop", "length", "error"]


@dataclass
class Usage:
    """What a generation spent. Additive: ``a + b`` sums every field, so a
    meta-generator's bill is the sum of its children's.

    * ``prompt_tokens``: tokens of the prompt(s) the request asked to condition on.
    * ``generated_tokens``: tokens produced.
    * ``computed_tokens``: tokens that went through the model (fewer than prompt +
      generated when KV is reused, more when speculation computes rejected drafts).
    * ``model_calls``: forward passes this request took part in.
    * ``flops``: estimated forward FLOPs (2·params per token plus attention).
    * ``wall_s``: seconds; a batch's wall time is split evenly among its requests, so
      the sum over requests equals the elapsed time.
    """

    prompt_tokens: int = 0
    generated_tokens: int = 0
    computed_tokens: int = 0
    model_calls: int = 0
    flops: float = 0.0
    wall_s: float = 0.0

    def __add__(self, other: "Usage") -> "Usage":
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(self)})

    def __sub__(self, other: "Usage") -> "Usage":
        """What ``self`` spent beyond ``other`` (a part of it)."""
        if not isinstance(other, Usage):
            return NotImplemented
        return self + other.scaled(-1)

    def __radd__(self, other: Any) -> "Usage":
        if other == 0:  # so that sum(usages) works
            return self
        return self.__add__(other)

    @staticmethod
    def total(usages: Iterable["Usage"]) -> "Usage":
        out = Usage()
        for u in usages:
            out = out + u
        return out

    def scaled(self, k: float) -> "Usage":
        """This usage times ``k`` (e.g. the mean per problem); integer fields become floats."""
        return Usage(**{f.name: getattr(self, f.name) * k for f in fields(self)})

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Generation:
    """One output of a generator.

    ``logprobs`` are the model's own log-probabilities of the chosen tokens (before any
    sampling adapter), so that sequence scores mean the same whatever the strategy.
    ``token_ids`` are every token generated, including an EOS or the tokens that
    spelled a stop string; ``text`` omits special tokens and is cut before a stop string.
    """

    text: str
    token_ids: list[int]
    logprobs: list[float] | None = None
    finish_reason: FinishReason = "length"
    usage: Usage = field(default_factory=Usage)
    score: float | None = None
    stop: str | int | None = None  # the stop string or stop token that ended it
    # with SamplingParams.logprobs = k: each generated token's k most likely tokens
    # under the model (before sampling adapters), {token id: log-probability}
    top_logprobs: list[dict[int, float]] | None = None
    trace: list["Generation"] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def sum_logprob(self) -> float | None:
        return None if self.logprobs is None else float(sum(self.logprobs))

    def to_dict(self, trace: bool = False) -> dict[str, Any]:
        d: dict[str, Any] = {
            "text": self.text,
            "token_ids": list(self.token_ids),
            "finish_reason": self.finish_reason,
            "usage": self.usage.to_dict(),
        }
        if self.logprobs is not None:
            d["logprobs"] = [round(x, 6) for x in self.logprobs]
        if self.top_logprobs is not None:
            d["top_logprobs"] = [{str(k): round(v, 6) for k, v in t.items()} for t in self.top_logprobs]
        if self.score is not None:
            d["score"] = self.score
        if self.stop is not None:
            d["stop"] = self.stop
        if self.meta:
            d["meta"] = self.meta
        if trace and self.trace:
            d["trace"] = [g.to_dict(trace=True) for g in self.trace]
        return d
