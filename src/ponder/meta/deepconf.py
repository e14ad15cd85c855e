"""Confidence-filtered voting, offline DeepConf (Fu et al. 2025, "Deep Think with
Confidence").

A token's confidence is the negative mean log-probability of the ``k`` most likely
tokens at its step, C_i = -(1/k) sum_j log P_i(j): high when the model's mass is on
few tokens. A trace's confidence is read from its group confidences, the mean of C_i
over a sliding window of ``window`` tokens:

* ``"lowest"``: the lowest group confidence along the trace (where it was least sure);
* ``"tail"``: the mean token confidence over its last ``window`` tokens;
* ``"bottom10"``: the mean of its lowest 10% of group confidences.

The ``keep`` fraction of most confident traces (DeepConf-low keeps 10%, -high 90%)
then vote, each weighted by its confidence. The policy must return top-k
log-probabilities (``logprobs`` = k), so this runs on any ``LogprobsLM``: in-process
or a remote vLLM. The bill is every trace's tokens: offline filtering saves no
compute, it buys accuracy at equal compute (the online variant, which stops weak
traces while they are generated, is not built yet).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from ..errors import SettingError
from ..types import Generation, Usage
from .parallel import SampleThenAggregate, _check_generator, _check_n, weighted_result

MEASURES = ("lowest", "tail", "bottom10")


def token_confidences(top_logprobs: Sequence[dict[Any, float]]) -> list[float]:
    """C_i = -mean of the top-k log-probabilities at each step."""
    return [-(sum(t.values()) / len(t)) if t else 0.0 for t in top_logprobs]


def group_confidences(conf: Sequence[float], window: int) -> list[float]:
    """The mean of ``conf`` over each window of ``window`` tokens (one value for a
    trace shorter than the window)."""
    if not conf:
        return []
    if len(conf) <= window:
        return [sum(conf) / len(conf)]
    out, run = [], sum(conf[:window])
    out.append(run / window)
    for i in range(window, len(conf)):
        run += conf[i] - conf[i - window]
        out.append(run / window)
    return out


def trace_confidence(top_logprobs: Sequence[dict[Any, float]], window: int = 16, measure: str = "lowest") -> float:
    conf = token_confidences(top_logprobs)
    if not conf:
        return 0.0
    if measure == "tail":
        tail = conf[-window:]
        return sum(tail) / len(tail)
    groups = group_confidences(conf, window)
    if measure == "lowest":
        return min(groups)
    worst = sorted(groups)[: max(1, math.ceil(len(groups) / 10))]
    return sum(worst) / len(worst)


class ConfidenceVote(SampleThenAggregate):
    """DeepConf offline: ``n`` traces; the ``keep`` fraction most confident (by
    ``measure`` over ``window``-token groups) vote, weighted by confidence."""

    strategy = "deepconf"

    def __init__(self, generator: Any, extract_answer: Callable[[str], str | None], n: int = 16, keep: float = 0.9,
                 window: int = 16, measure: str = "lowest", normalize: Callable[[str], str] | None = None) -> None:
        _check_n(n)
        _check_generator(generator)
        if not callable(extract_answer):
            raise SettingError(f"extract_answer must be a callable (text -> answer or None); got {extract_answer!r}")
        if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0 < keep <= 1:
            raise SettingError(f"keep (the fraction of most confident traces that vote) must be in (0, 1]; got {keep!r}")
        _check_n(window, "window (tokens per group)")
        if measure not in MEASURES:
            raise SettingError(f"measure must be one of {', '.join(MEASURES)}; got {measure!r}")
        self.generator, self.extract_answer, self.n, self.keep = generator, extract_answer, n, float(keep)
        self.window, self.measure, self.normalize = window, measure, normalize

    def aggregate(self, prompt: str, samples: list[Generation]) -> Generation:
        if any(g.top_logprobs is None for g in samples):
            raise SettingError("deepconf needs each token's top-k log-probabilities: set logprobs (e.g. --logprobs 4 "
                               "or --set over.logprobs) on a backend that gives them (in-process, or vLLM)")
        confs = [trace_confidence(g.top_logprobs, self.window, self.measure) for g in samples]
        for g, c in zip(samples, confs):
            g.score = c
        k = max(1, math.ceil(self.keep * len(samples)))
        kept = set(sorted(range(len(samples)), key=lambda i: (-confs[i], i))[:k])
        answers = []
        for i, g in enumerate(samples):
            a = self.extract_answer(g.text) if i in kept else None
            answers.append(None if a is None else (self.normalize(a) if self.normalize else a))
        weights = [confs[i] if i in kept else 0.0 for i in range(len(samples))]
        return weighted_result(samples, answers, weights, Usage.total(g.usage for g in samples), self.strategy,
                               kept=sorted(kept), confidences=[round(c, 6) for c in confs], measure=self.measure)
