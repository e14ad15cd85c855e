"""Adaptive sampling: stop drawing samples once the vote is settled.

* Adaptive consistency (Aggarwal et al., EMNLP 2023): draw ``batch`` samples at a time
  and stop as soon as a stopping rule over the votes so far says the leader will stay
  the leader, at most ``n`` samples. Rules (``rule``):

  - ``"beta"``: the leader's share p of the top two answers' votes, with a uniform
    prior: p ~ Beta(v1 + 1, v2 + 1); stop when P(p > 1/2) >= ``confidence``. Votes may
    be weighted (by a reward model), so v1, v2 are real; the probability is the
    regularised incomplete beta function, integrated numerically (exact for integer
    votes to 1e-9, checked against the binomial identity in the tests).
  - ``"dirichlet"``: the answers' probabilities ~ Dirichlet(votes + 1) (one component
    per answer seen, plus one for an answer not seen yet); stop when P(the leader's is
    the largest) >= ``confidence``, estimated from 4,000 seeded draws.
  - ``"window"``: early-stopping self-consistency (Li et al., ICLR 2024): stop when the
    last ``batch`` samples (a window) all give the same answer.

* ``weight="reward"``: each sample votes with its score under ``scorer`` (a reward
  model), as weighted majority vote does; the rules read the answers' shares of the
  summed weight times the number of answered samples (the weights say how the evidence
  splits, the samples how much there is; with unit weights these are the counts).

The answer is the vote's leader over every sample drawn (the same vote as
``MajorityVote`` or ``WeightedMajorityVote`` over those samples); its bill is every
sample's tokens plus the scorer's, so stopping early shows as fewer tokens.
``meta`` says how many samples were drawn and why it stopped.
"""

from __future__ import annotations

import asyncio
import math
from typing import Any, Callable, Sequence

from ..errors import SettingError
from ..protocols import GeneratorBase
from ..types import Generation, Usage
from .parallel import _check_generator, _check_n, _check_scorer, _samples, tally, weighted_result


def beta_above_half(a: float, b: float) -> float:
    """P(p > 1/2) for p ~ Beta(a + 1, b + 1): how sure the leader with ``a`` votes is to
    beat the runner-up with ``b``, under a uniform prior. Integrated over [1/2, 1] by
    the midpoint rule on the log-density (2,000 cells: error < 1e-6 for the vote
    counts met here)."""
    if a < 0 or b < 0:
        raise SettingError(f"votes must be >= 0; got {a}, {b}")
    log_norm = math.lgamma(a + b + 2) - math.lgamma(a + 1) - math.lgamma(b + 1)
    cells = 2000
    h = 0.5 / cells
    total = 0.0
    for i in range(cells):
        x = 0.5 + (i + 0.5) * h
        total += math.exp(log_norm + a * math.log(x) + b * math.log1p(-x))
    return min(1.0, total * h)


def dirichlet_leader(votes: Sequence[float], draws: int = 4000, seed: int = 0) -> float:
    """P(the first component is the largest) for Dirichlet(votes + 1) with one more
    component of weight 1 (an answer not seen yet); seeded, so a decision is the same
    every run."""
    import numpy as np

    alpha = np.array([*votes, 0.0], dtype=np.float64) + 1.0
    # a Dirichlet draw is Gammas normalised; only the argmax matters, so no normalising
    x = np.random.default_rng(seed).standard_gamma(alpha, size=(draws, len(alpha)))
    return float((x.argmax(axis=1) == 0).mean())


class AdaptiveVote(GeneratorBase):
    """Majority (or reward-weighted) vote that draws ``batch`` samples at a time, up to
    ``n``, and stops when ``rule`` says the leader is settled at ``confidence``."""

    strategy = "adaptive-majority"
    RULES = ("beta", "dirichlet", "window")
    WEIGHTS = ("none", "reward")
    overlapping_bills = True  # a scorer on a thread while the engine samples for other prompts

    def __init__(self, generator: Any, extract_answer: Callable[[str], str | None], n: int = 16, batch: int = 2,
                 rule: str = "beta", confidence: float = 0.95, weight: str = "none", scorer: Any = None,
                 normalize: Callable[[str], str] | None = None) -> None:
        _check_n(n, "samples (n, the most to draw)")
        _check_n(batch, "batch (samples drawn per round)")
        _check_generator(generator)
        if not callable(extract_answer):
            raise SettingError(f"extract_answer must be a callable (text -> answer or None); got {extract_answer!r}")
        if rule not in self.RULES:
            raise SettingError(f"rule must be one of {', '.join(self.RULES)}; got {rule!r}")
        if not isinstance(confidence, (int, float)) or isinstance(confidence, bool) or not 0.5 <= confidence < 1:
            raise SettingError(f"confidence must be in [0.5, 1); got {confidence!r}")
        if weight not in self.WEIGHTS:
            raise SettingError(f"weight must be one of {', '.join(self.WEIGHTS)}; got {weight!r}")
        if weight == "reward":
            _check_scorer(scorer)
        if rule == "window" and batch < 2:
            raise SettingError("rule='window' stops when a window of batch samples agrees: batch must be >= 2")
        self.generator, self.extract_answer, self.n, self.batch = generator, extract_answer, n, batch
        self.rule, self.confidence, self.weight, self.scorer, self.normalize = rule, float(confidence), weight, \
            scorer, normalize
        if weight == "reward":
            self.strategy = "adaptive-weighted"

    def answer_of(self, g: Generation) -> str | None:
        a = self.extract_answer(g.text)
        return None if a is None else (self.normalize(a) if self.normalize else a)

    def settled(self, answers: Sequence[str | None], weights: Sequence[float], seed: int = 0) -> tuple[bool, float]:
        """Does the rule stop here, and with what confidence (the window rule: 1 or 0)?"""
        if self.rule == "window":
            last = answers[-self.batch:]
            same = len(last) == self.batch and last[0] is not None and all(a == last[0] for a in last)
            return same, float(same)
        total = tally(answers, weights)
        if not total:
            return False, 0.0
        # weights say how the evidence splits, the number of answered samples how much of
        # it there is: votes are scaled to sum to that number (unit weights: the counts)
        voted = sum(1 for a in answers if a is not None)
        scale = voted / max(sum(total.values()), 1e-30)
        ranked = sorted((v * scale for v in total.values()), reverse=True)
        if self.rule == "beta":
            p = beta_above_half(ranked[0], ranked[1] if len(ranked) > 1 else 0.0)
        else:
            p = dirichlet_leader(ranked, seed=seed)
        return p >= self.confidence, p

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        _check_n(n, "n")
        return [await self._once(prompt, None if seed is None else seed + k * 1_000_033) for k in range(n)]

    async def acontinue(self, prompt: str, given: Sequence[Generation], seed: int | None = None) -> Generation:
        """Start from samples already drawn (a probe's): they vote, and are billed, as
        the first batch; drawing goes on only if the rule is not yet settled."""
        return await self._once(prompt, seed, given)

    async def _once(self, prompt: str, seed: int | None, given: Sequence[Generation] = ()) -> Generation:
        samples: list[Generation] = []
        answers: list[str | None] = []
        weights: list[float] = []
        usage, why, p = Usage(), "max_samples", 0.0
        group = list(given)  # the given samples are the first batch
        while True:
            if group:
                usage = usage + Usage.total(g.usage for g in group)
                if self.weight == "reward":
                    scores = await asyncio.to_thread(self.scorer.score, prompt, [g.text for g in group])
                    usage = usage + scores.usage
                    for g, v in zip(group, scores.values):
                        g.score = v
                    weights += list(scores.values)
                else:
                    weights += [1.0] * len(group)
                samples += group
                answers += [self.answer_of(g) for g in group]
                stop, p = self.settled(answers, weights, seed=len(samples))
                if stop:
                    why = self.rule
                    break
            if len(samples) >= self.n:
                break
            m = min(self.batch, self.n - len(samples))
            s = None if seed is None else seed + len(samples) * 7_919
            (group,) = await _samples(self.generator, [prompt], m, s)
        return weighted_result(samples, answers, weights, usage, self.strategy, samples_drawn=len(samples),
                               stopped_by=why, confidence=round(p, 6), rule=self.rule)
