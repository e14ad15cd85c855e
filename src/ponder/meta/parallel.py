"""Parallel meta-generation: sample N, then aggregate.

* ``MajorityVote``: self-consistency (Wang et al. 2023): the most frequent extracted (and
  normalised) answer wins; the returned generation is the first sample that gave it.
* ``WeightedMajorityVote``: each sample votes with a weight: its reward (Uesato et al.
  2022; Li et al. 2023) or its sequence probability.
* ``BestOfN``: best-of-N (Stiennon et al. 2020; Nakano et al. 2022): the sample with the
  highest score under a scorer (e.g. a reward model).
* ``RejectionSampling``: sample until one scores at least a threshold (or N are spent).
* ``MinimumBayesRisk``: MBR (Kumar and Byrne 2004; Bertsch et al. 2023): the sample with
  the highest mean utility against the others.
* ``UniversalSelfConsistency`` (Chen et al. 2023): the model itself is shown the samples
  and asked which is the consensus.
* ``OracleSampling``: repeated sampling with a verifier (Brown et al. 2024): stop at the
  first verified sample; ``pass_at_k`` is the unbiased estimator of Chen et al. 2021.

All wrap any generator (its policy needs only text) and are generators themselves.
The returned Generation's ``usage`` is the sum of every sample's usage plus the
scorer's, and ``trace`` holds the samples, so the bill is honest.
"""

from __future__ import annotations

import asyncio
import math
import re
from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

from ..errors import SettingError
from ..protocols import GeneratorBase
from ..types import Generation, Usage


def _check_n(n: int, name: str = "n (samples per problem)") -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SettingError(f"{name} must be an integer >= 1; got {n!r}")


def _check_generator(gen: Any) -> None:
    if not (callable(getattr(gen, "agenerate", None)) or callable(getattr(gen, "agenerate_many", None))):
        raise SettingError(f"generator must be a ponder generator (with agenerate); got {gen!r}")


def _check_scorer(scorer: Any) -> None:
    if not callable(getattr(scorer, "score", None)):
        raise SettingError(f"scorer must have score(prompt, completions) -> Scores (e.g. a RewardModel); got {scorer!r}")


async def _samples(gen: Any, prompts: Sequence[str], n: int, seed: int | None) -> list[list[Generation]]:
    if hasattr(gen, "agenerate_many"):
        return await gen.agenerate_many(list(prompts), n=n, seed=seed)
    return list(await asyncio.gather(*(gen.agenerate(p, n=n, seed=seed) for p in prompts)))


def majority_index(answers: Sequence[str | None]) -> int | None:
    """Index of the first sample whose answer is the most frequent one (ties go to the
    answer reached first, so the vote is deterministic); None if no sample has an answer."""
    counts = Counter(a for a in answers if a is not None)
    if not counts:
        return None
    top = max(counts.values())
    return next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)


def tally(answers: Sequence[str | None], weights: Sequence[float]) -> dict[str, float]:
    """Each answer's summed weight (unanswered samples do not vote)."""
    total: dict[str, float] = defaultdict(float)
    for a, w in zip(answers, weights):
        if a is not None:
            total[a] += w
    return total


def weighted_index(answers: Sequence[str | None], weights: Sequence[float]) -> int | None:
    """Index of the first sample of the answer with the largest summed weight."""
    total = tally(answers, weights)
    if not total:
        return None
    top = max(total.values())
    return next(i for i, a in enumerate(answers) if a is not None and total[a] == top)


def weighted_result(samples: list[Generation], answers: Sequence[str | None], weights: Sequence[float],
                    usage: Usage, strategy: str, **meta: Any) -> Generation:
    """The weighted vote's winner (its first sample), scored by its share of the weight,
    with every answer's votes in ``meta``."""
    i = weighted_index(answers, weights)
    total = tally(answers, weights)
    share = 0.0 if i is None else total[answers[i]] / max(sum(weights), 1e-30)
    return _result(samples[0 if i is None else i], samples, usage, strategy, share,
                   votes={a: round(w, 6) for a, w in total.items()}, **meta)


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased estimator of pass@k from n samples of which c are correct (Chen et al.
    2021): 1 - C(n - c, k) / C(n, k)."""
    if not (0 <= c <= n and 1 <= k <= n):
        raise SettingError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def _result(best: Generation, samples: list[Generation], usage: Usage, strategy: str, score: float | None,
            **meta: Any) -> Generation:
    return Generation(text=best.text, token_ids=best.token_ids, logprobs=best.logprobs,
                      finish_reason=best.finish_reason, usage=usage, score=score, trace=samples,
                      meta={"strategy": strategy, **meta})


class SampleThenAggregate(GeneratorBase):
    """Draw ``self.n`` samples per prompt from the wrapped generator, then reduce them
    to one Generation with ``aggregate(prompt, samples)``; ``n`` outputs repeat that."""

    n: int
    generator: Any
    strategy = "custom"

    def aggregate(self, prompt: str, samples: list[Generation]) -> Generation:
        raise NotImplementedError

    async def agenerate_many(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        _check_n(n, "n")
        out = []
        for k in range(n):
            s = None if seed is None else seed + k * 1_000_033
            groups = await _samples(self.generator, prompts, self.n, s)
            out.append([self.aggregate(p, g) for p, g in zip(prompts, groups)])
        return [[out[k][i] for k in range(n)] for i in range(len(prompts))]

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return (await self.agenerate_many([prompt], n, seed))[0]

    async def acontinue(self, prompt: str, given: Sequence[Generation], seed: int | None = None) -> Generation:
        """One output that counts samples already drawn (a probe's, say): draw the rest
        of ``self.n`` and aggregate over all of them. The given samples are in the
        trace and the bill, so nothing is paid twice and nothing is left out."""
        more = self.n - len(given)
        drawn = (await _samples(self.generator, [prompt], more, seed))[0] if more > 0 else []
        return self.aggregate(prompt, [*given, *drawn])

    def generate_batch(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        return asyncio.run(self.agenerate_many(prompts, n, seed))

    def generate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return self.generate_batch([prompt], n, seed)[0]


class MajorityVote(SampleThenAggregate):
    """``extract_answer(text) -> answer or None``; ``normalize(answer) -> key`` makes
    equivalent answers one (e.g. "1,000" and "1000")."""

    strategy = "majority"

    def __init__(self, generator: Any, extract_answer: Callable[[str], str | None], n: int = 16,
                 normalize: Callable[[str], str] | None = None) -> None:
        _check_n(n)
        _check_generator(generator)
        if not callable(extract_answer):
            raise SettingError(f"extract_answer must be a callable (text -> answer or None); got {extract_answer!r}")
        if normalize is not None and not callable(normalize):
            raise SettingError(f"normalize must be a callable (answer -> key); got {normalize!r}")
        self.generator, self.extract_answer, self.n, self.normalize = generator, extract_answer, n, normalize

    def answers(self, samples: list[Generation]) -> list[str | None]:
        out = [self.extract_answer(g.text) for g in samples]
        return [None if a is None else (self.normalize(a) if self.normalize else a) for a in out]

    def aggregate(self, prompt: str, samples: list[Generation]) -> Generation:
        answers = self.answers(samples)
        counts = Counter(a for a in answers if a is not None)
        i = majority_index(answers)
        votes = 0 if i is None else counts[answers[i]]
        return _result(samples[0 if i is None else i], samples, Usage.total(g.usage for g in samples),
                       self.strategy, votes / len(samples), votes=dict(counts))


class WeightedMajorityVote(MajorityVote):
    """Each sample votes for its answer with a weight: ``weight="reward"``, its score
    under ``scorer``; ``weight="logprob"``, its sequence probability exp(mean token
    log-probability) under the policy (needs a policy that returns logprobs)."""

    strategy = "weighted-majority"
    WEIGHTS = ("reward", "logprob")

    def __init__(self, generator: Any, extract_answer: Callable[[str], str | None], scorer: Any = None,
                 n: int = 16, weight: str = "reward", normalize: Callable[[str], str] | None = None) -> None:
        super().__init__(generator, extract_answer, n, normalize)
        if weight not in self.WEIGHTS:
            raise SettingError(f"weight must be one of {', '.join(self.WEIGHTS)}; got {weight!r}")
        if weight == "reward":
            _check_scorer(scorer)
        self.scorer, self.weight = scorer, weight

    def aggregate(self, prompt: str, samples: list[Generation]) -> Generation:
        answers = self.answers(samples)
        usage = Usage.total(g.usage for g in samples)
        if self.weight == "reward":
            scores = self.scorer.score(prompt, [g.text for g in samples])
            weights, usage = list(scores.values), usage + scores.usage
        else:
            if any(g.logprobs is None for g in samples):
                raise SettingError("weight='logprob' needs a policy that returns token log-probabilities")
            weights = [math.exp(sum(g.logprobs) / max(1, len(g.logprobs))) for g in samples]
        for g, w in zip(samples, weights):
            g.score = w
        return weighted_result(samples, answers, weights, usage, self.strategy, weight=self.weight)


class BestOfN(SampleThenAggregate):
    """The sample with the highest ``scorer.score`` (ties to the earliest)."""

    strategy = "best-of-n"

    def __init__(self, generator: Any, scorer: Any, n: int = 16) -> None:
        _check_n(n)
        _check_generator(generator)
        _check_scorer(scorer)
        self.generator, self.scorer, self.n = generator, scorer, n

    def aggregate(self, prompt: str, samples: list[Generation]) -> Generation:
        scores = self.scorer.score(prompt, [g.text for g in samples])
        for g, s in zip(samples, scores.values):
            g.score = s
        best = max(range(len(samples)), key=lambda i: (scores.values[i], -i))
        usage = Usage.total(g.usage for g in samples) + scores.usage
        return _result(samples[best], samples, usage, self.strategy, scores.values[best])


class MinimumBayesRisk(SampleThenAggregate):
    """The sample with the highest mean ``utility`` against the other samples (the
    empirical expected utility; ties to the earliest)."""

    strategy = "mbr"

    def __init__(self, generator: Any, utility: Callable[[str, str], float], n: int = 16) -> None:
        _check_n(n)
        _check_generator(generator)
        if not callable(utility):
            raise SettingError(f"utility must be a callable (a, b) -> float; got {utility!r}")
        self.generator, self.utility, self.n = generator, utility, n

    def aggregate(self, prompt: str, samples: list[Generation]) -> Generation:
        texts = [g.text for g in samples]
        N = len(texts)
        risk = []
        for i in range(N):
            others = [self.utility(texts[i], texts[j]) for j in range(N) if j != i]
            risk.append(sum(others) / len(others) if others else 0.0)
        for g, r in zip(samples, risk):
            g.score = r
        best = max(range(N), key=lambda i: (risk[i], -i))
        return _result(samples[best], samples, Usage.total(g.usage for g in samples), self.strategy, risk[best])


class UniversalSelfConsistency(SampleThenAggregate):
    """The model reads the N samples and names the most consistent one (Chen et al.
    2023). ``judge`` (a generator; the policy by default) gets ``template`` filled with
    the question and the numbered responses; the first "Response K" in its answer picks
    sample K (1-based). An unreadable verdict falls back to the first sample."""

    strategy = "usc"
    acontinue = None  # the judge reads one fresh group; given samples have no place in it
    TEMPLATE = ("I have generated the following responses to the question: {question}\n\n{responses}\n"
                "Evaluate these responses.\nSelect the most consistent response based on majority consensus.\n"
                "Start your answer with \"The most consistent response is Response X\" (without quotes).\n")

    def __init__(self, generator: Any, n: int = 8, judge: Any = None, template: str | None = None) -> None:
        _check_n(n)
        _check_generator(generator)
        if judge is not None:
            _check_generator(judge)
        self.generator, self.n, self.judge = generator, n, judge or generator
        self.template = template or self.TEMPLATE
        if "{responses}" not in self.template:
            raise SettingError("template must contain {responses} (and may contain {question})")

    async def agenerate_many(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        _check_n(n, "n")
        out: list[list[Generation]] = [[] for _ in prompts]
        for k in range(n):
            s = None if seed is None else seed + k * 1_000_033
            groups = await _samples(self.generator, prompts, self.n, s)
            asks = [self.template.format(question=p.strip(), responses="\n".join(
                f"Response {i + 1}: {g.text.strip()}" for i, g in enumerate(group))) for p, group in zip(prompts, groups)]
            verdicts = await _samples(self.judge, asks, 1, s)
            for i, (group, (v,)) in enumerate(zip(groups, verdicts)):
                m = re.search(r"Response\s+(\d+)", v.text)
                pick = int(m[1]) - 1 if m and 1 <= int(m[1]) <= len(group) else None
                usage = Usage.total(g.usage for g in group) + v.usage
                out[i].append(_result(group[pick or 0], group, usage, self.strategy, None,
                                      chosen=pick, verdict=v.text))
        return out


class OracleSampling(GeneratorBase):
    """Repeated sampling with a verifier (Brown et al. 2024): draw ``batch`` samples at a
    time, up to ``n``, and stop at the first one ``verifier`` scores >= ``threshold``.
    ``meta``: whether one was found (coverage), how many samples it took, and the
    unbiased pass@k estimates for k = 1, 2, 4, ... <= samples drawn."""

    strategy = "oracle"
    overlapping_bills = True

    def __init__(self, generator: Any, verifier: Any, n: int = 16, batch: int = 4, threshold: float = 1.0) -> None:
        _check_n(n)
        _check_n(batch, "batch")
        _check_generator(generator)
        _check_scorer(verifier)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or math.isnan(threshold):
            raise SettingError(f"threshold must be a number; got {threshold!r}")
        self.generator, self.verifier, self.n, self.batch, self.threshold = generator, verifier, n, batch, threshold

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        _check_n(n, "n")
        outs = []
        for k in range(n):
            s0 = None if seed is None else seed + k * 1_000_033
            samples: list[Generation] = []
            usage, found, correct = Usage(), None, 0
            while len(samples) < self.n and found is None:
                m = min(self.batch, self.n - len(samples))
                s = None if s0 is None else s0 + len(samples) * 7_919
                (group,) = await _samples(self.generator, [prompt], m, s)
                scores = await asyncio.to_thread(self.verifier.score, prompt, [g.text for g in group])
                usage = usage + Usage.total(g.usage for g in group) + scores.usage
                for g, v in zip(group, scores.values):
                    g.score = v
                    ok = v >= self.threshold
                    correct += ok
                    if ok and found is None:
                        found = len(samples)
                    samples.append(g)
            best = samples[found] if found is not None else max(samples, key=lambda g: g.score)
            ks = [k_ for k_ in (1, 2, 4, 8, 16, 32, 64, 128) if k_ <= len(samples)]
            outs.append(_result(best, samples, usage, self.strategy, best.score, verified=found is not None,
                                samples_drawn=len(samples), first_verified=found,
                                pass_at_k={k_: pass_at_k(len(samples), correct, k_) for k_ in ks}))
        return outs


class RejectionSampling(OracleSampling):
    """Sample ``batch`` at a time until one scores at least ``threshold`` under
    ``scorer`` (a reward model, a verifier), up to ``n``; else the best seen."""

    strategy = "rejection"

    def __init__(self, generator: Any, scorer: Any, threshold: float = 0.5, n: int = 16, batch: int = 4) -> None:
        super().__init__(generator, scorer, n=n, batch=batch, threshold=threshold)
