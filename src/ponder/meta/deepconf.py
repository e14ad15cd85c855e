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
compute, it buys accuracy at equal compute. The online variant (``OnlineConfidenceVote``)
stops weak traces while they are generated and stops drawing at a consensus.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from ..errors import SettingError
from ..types import Generation, Usage
from ..protocols import GeneratorBase
from .parallel import SampleThenAggregate, _check_generator, _check_n, tally, weighted_result

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


# -- online: stop weak traces while they are generated ----------------------------------------
class ConfidenceStop:
    """A processor that ends a trace the moment its group confidence (the mean token
    confidence over the last ``window`` steps, from the raw logits' top ``k``) falls
    below ``threshold``: every token but EOS is masked, so the row ends at once and is
    billed for what it generated. It runs first in the chain (the constraint slot), so
    it reads the model's own distribution, as ``top_logprobs`` records it: a decision
    can be checked afterwards from the trace (``stopped_at``)."""

    is_identity = False

    def __init__(self, threshold: float, window: int, k: int, eos: int) -> None:
        self.threshold, self.window, self.k, self.eos = float(threshold), window, k, eos
        self.recent: list[list[float]] = [[]]  # per physical row: the last window confidences

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import torch

        # the same arithmetic as token_confidences on the recorded top_logprobs (the same
        # float32 values, summed in the same order in Python), so that a decision replays
        # exactly from the trace even when a window's mean sits on the threshold
        top = logits.log_softmax(-1).topk(self.k, dim=-1).values.tolist()  # [B][k]
        stop = []
        for b, c in enumerate(-(sum(v) / len(v)) for v in top):
            w = self.recent[b] if b < len(self.recent) else []
            w.append(c)
            del w[: -self.window]
            if b >= len(self.recent):
                self.recent.append(w)
            stop.append(len(w) == self.window and sum(w) / self.window < self.threshold)
        if not any(stop):
            return logits
        out = logits.clone()
        rows = torch.tensor(stop)
        out[rows] = float("-inf")
        out[rows, self.eos] = 0.0
        return out

    def batch_key(self) -> Any:
        return None

    def banned(self) -> None:
        return None

    def accept(self, tokens: Any) -> None:
        pass

    def fork(self, rows: Sequence[int]) -> "ConfidenceStop":
        out = ConfidenceStop(self.threshold, self.window, self.k, self.eos)
        out.recent = [list(self.recent[r]) if r < len(self.recent) else [] for r in rows]
        return out

    def rollback(self, n: int) -> None:
        for w in self.recent:
            del w[max(0, len(w) - n):]

    def reset(self) -> None:
        self.recent = [[]]


def stopped_at(top_logprobs: Sequence[dict[Any, float]], threshold: float, window: int) -> int | None:
    """The step at which ``ConfidenceStop`` ends this trace (None: it would not): the
    first full window whose mean token confidence is below ``threshold``."""
    conf = token_confidences(top_logprobs)
    for i in range(window - 1, len(conf)):
        if sum(conf[i - window + 1 : i + 1]) / window < threshold:
            return i
    return None


class OnlineConfidenceVote(GeneratorBase):
    """DeepConf online (Fu et al. 2025): ``warmup`` full traces set the threshold (the
    lowest group confidence among the ``keep`` most confident of them); then traces are
    drawn one at a time, each stopped the moment its group confidence falls below the
    threshold (stopped traces do not vote), until the confidence-weighted leader holds
    ``consensus`` of the vote of two or more traces, or ``n`` traces are spent.

    ``policy(stopper)`` builds the generator: with a ``ConfidenceStop`` for an in-process
    model (the row leaves the batch when stopped); a remote policy cannot be stopped
    mid-way, so its traces run whole and the same rule is applied to them afterwards
    (the same decisions given the same traces; the bill is the whole traces')."""

    strategy = "deepconf-online"
    overlapping_bills = True

    def __init__(self, policy: Callable[[Any], Any], extract_answer: Callable[[str], str | None], eos: int | None,
                 n: int = 16, warmup: int = 4, keep: float = 0.9, window: int = 16, k: int = 4,
                 consensus: float = 0.95, in_process: bool = True) -> None:
        _check_n(n, "samples (n, the most traces)")
        _check_n(warmup, "warmup (traces that set the threshold)")
        if warmup > n:
            raise SettingError(f"warmup ({warmup}) must be <= samples ({n})")
        if not isinstance(keep, (int, float)) or isinstance(keep, bool) or not 0 < keep <= 1:
            raise SettingError(f"keep must be in (0, 1]; got {keep!r}")
        if not isinstance(consensus, (int, float)) or isinstance(consensus, bool) or not 0.5 < consensus <= 1:
            raise SettingError(f"consensus must be in (0.5, 1]; got {consensus!r}")
        _check_n(window, "window (tokens per group)")
        _check_n(k, "top_k_confidence")
        if in_process and eos is None:
            raise SettingError("deepconf-online stops a trace by forcing EOS: the model must have an EOS token")
        self.policy, self.extract_answer, self.eos = policy, extract_answer, eos
        self.n, self.warmup, self.keep, self.window, self.k = n, warmup, float(keep), window, k
        self.consensus, self.in_process = float(consensus), in_process

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        _check_n(n, "n")
        return [await self._once(prompt, None if seed is None else seed + j * 1_000_033) for j in range(n)]

    async def _once(self, prompt: str, seed: int | None) -> Generation:
        warm = await self.policy(None).agenerate(prompt, n=self.warmup, seed=seed)
        if any(g.top_logprobs is None for g in warm):
            raise SettingError("deepconf-online needs each token's top-k log-probabilities (a logprobs-level backend)")
        confs = [trace_confidence(g.top_logprobs, self.window, "lowest") for g in warm]
        threshold = sorted(confs, reverse=True)[max(1, math.ceil(self.keep * len(confs))) - 1]
        traces, weights, stops = list(warm), [c if c >= threshold else 0.0 for c in confs], [None] * len(warm)
        shown = list(confs)  # each trace's confidence (lowest group), for the trace and the page
        stopper = ConfidenceStop(threshold, self.window, self.k, self.eos) if self.in_process else None
        gen = self.policy(stopper)
        why = "max_samples"
        while len(traces) < self.n:
            answers = [self.extract_answer(g.text) for g in traces]
            total = tally(answers, weights)
            voters = sum(1 for a, w in zip(answers, weights) if a is not None and w > 0)
            if voters >= 2 and max(total.values()) / max(sum(total.values()), 1e-30) >= self.consensus:
                why = "consensus"
                break
            s = None if seed is None else seed + 7_919 * len(traces)
            (g,) = await gen.agenerate(prompt, n=1, seed=s)
            at = stopped_at(g.top_logprobs or [], threshold, self.window)
            traces.append(g)
            stops.append(at)
            c = trace_confidence(g.top_logprobs or [], self.window, "lowest")
            shown.append(c)
            weights.append(0.0 if at is not None or c < threshold else c)  # a trace shorter than a window too
        answers = [self.extract_answer(g.text) if w > 0 else None for g, w in zip(traces, weights)]
        return weighted_result(traces, answers, weights, Usage.total(g.usage for g in traces), self.strategy,
                               threshold=threshold, samples_drawn=len(traces), stopped_by=why,
                               stopped_at=stops, stopped=sum(a is not None for a in stops),
                               confidence=[round(float(c), 4) if math.isfinite(c) else None for c in shown],
                               stopped_post_hoc=not self.in_process)
