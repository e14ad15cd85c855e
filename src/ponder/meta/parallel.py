"""Parallel meta-generation: sample N, then aggregate.

* ``MajorityVote``: self-consistency (Wang et al. 2023): the most frequent extracted
  answer wins; the returned generation is the first sample that gave it.
* ``BestOfN``: rejection sampling / best-of-N (Stiennon et al. 2020; Nakano et al.
  2022): the sample with the highest score under a scorer (e.g. a reward model).

Both wrap any generator and are generators themselves. The returned Generation's
``usage`` is the sum of every sample's usage plus the scorer's, and ``trace`` holds the
samples, so the bill is honest.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any, Callable, Sequence

from ..decoding.processors import SettingError
from ..protocols import GeneratorBase
from ..types import Generation, Usage


def _check_generator(gen: Any) -> None:
    if not (callable(getattr(gen, "agenerate", None)) or callable(getattr(gen, "agenerate_many", None))):
        raise SettingError(f"generator must be a ponder generator (with agenerate); got {gen!r}")


def _check_n(n: int) -> None:
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise SettingError(f"n (samples per problem) must be an integer >= 1; got {n!r}")


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


class SampleThenAggregate(GeneratorBase):
    """Draw ``self.n`` samples per prompt from the wrapped generator, then reduce them
    to one Generation with ``aggregate(prompt, samples)``; ``n`` outputs repeat that."""

    n: int
    generator: Any

    def aggregate(self, prompt: str, samples: list[Generation]) -> Generation:
        raise NotImplementedError

    async def agenerate_many(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        _check_n(n)
        out = []
        for k in range(n):
            s = None if seed is None else seed + k * 1_000_033
            groups = await _samples(self.generator, prompts, self.n, s)
            out.append([self.aggregate(p, g) for p, g in zip(prompts, groups)])
        return [[out[k][i] for k in range(n)] for i in range(len(prompts))]

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return (await self.agenerate_many([prompt], n, seed))[0]

    def generate_batch(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        return asyncio.run(self.agenerate_many(prompts, n, seed))


    def generate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return self.generate_batch([prompt], n, seed)[0]


class MajorityVote(SampleThenAggregate):
    strategy = "majority"

    def __init__(self, generator: Any, extract_answer: Callable[[str], str | None], n: int = 16) -> None:
        _check_n(n)
        _check_generator(generator)
        if not callable(extract_answer):
            raise SettingError(f"extract_answer must be a callable (text -> answer or None); got {extract_answer!r}")
        self.generator, self.extract_answer, self.n = generator, extract_answer, n

    def aggregate(self, prompt: str, samples: list[Generation]) -> Generation:
        answers = [self.extract_answer(g.text) for g in samples]
        counts = Counter(a for a in answers if a is not None)
        usage = Usage.total(g.usage for g in samples)
        i = majority_index(answers)
        best = samples[0 if i is None else i]
        votes = 0 if i is None else counts[answers[i]]
        return Generation(
            text=best.text, token_ids=best.token_ids, logprobs=best.logprobs,
            finish_reason=best.finish_reason, usage=usage, score=votes / len(samples),
            trace=samples, meta={"strategy": self.strategy, "votes": dict(counts)},
        )



class BestOfN(SampleThenAggregate):
    """``scorer(prompt, completions) -> list[(score, Usage)]`` rates the samples."""

    strategy = "best-of-n"

    def __init__(self, generator: Any, scorer: Any, n: int = 16) -> None:
        _check_n(n)
        _check_generator(generator)
        if not callable(getattr(scorer, "score_completions", None)):
            raise SettingError(f"scorer must have score_completions(prompt, completions) (e.g. a RewardModel); "
                               f"got {scorer!r}")
        self.generator, self.scorer, self.n = generator, scorer, n

    def aggregate(self, prompt: str, samples: list[Generation]) -> Generation:
        scored = self.scorer.score_completions(prompt, [g.text for g in samples])
        usage = Usage.total(g.usage for g in samples) + Usage.total(u for _, u in scored)
        for g, (s, _) in zip(samples, scored):
            g.score = s
        best = max(range(len(samples)), key=lambda i: (scored[i][0], -i))
        b = samples[best]
        return Generation(
            text=b.text, token_ids=b.token_ids, logprobs=b.logprobs, finish_reason=b.finish_reason,
            usage=usage, score=scored[best][0], trace=samples, meta={"strategy": self.strategy},
        )

