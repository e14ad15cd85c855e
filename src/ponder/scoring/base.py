"""The scorer contract: ``score(prompt, completions) -> Scores``, plus a step-level form.

A scorer rates completions of one prompt. It returns one value per completion and what
scoring cost (a ``Usage``, so a meta-generator's bill includes its scorers). A step
scorer (a process reward model, an exact step checker) also rates each step of each
completion; ``aggregate`` turns step values into one (last, min, product or mean, the
choices of Lightman et al. 2023 and Wang et al. 2024).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from ..errors import SettingError
from ..types import Usage


@dataclass
class Scores:
    """One value per completion (higher is better), and the bill of computing them.
    ``steps``: per completion, one value per step, when the scorer reads steps."""

    values: list[float]
    usage: Usage = field(default_factory=Usage)
    steps: list[list[float]] | None = None
    meta: dict = field(default_factory=dict)  # scorer-specific notes (e.g. a judge's verdicts)


@runtime_checkable
class Scorer(Protocol):
    name: str

    def score(self, prompt: str, completions: Sequence[str]) -> Scores: ...


@runtime_checkable
class StepScorer(Scorer, Protocol):
    def score_steps(self, prompt: str, completions: Sequence[str]) -> Scores:
        """``Scores.steps``: each completion's step values; ``values``: their aggregate."""
        ...


AGGREGATIONS = ("last", "min", "product", "mean")


def aggregate(steps: Sequence[float], how: str, empty: float = 0.0) -> float:
    """One value from a path's step values: the last step's, the minimum, the product
    or the mean. A path with no step gets ``empty``."""
    if how not in AGGREGATIONS:
        raise SettingError(f"aggregation must be one of {', '.join(AGGREGATIONS)}; got {how!r}")
    if not steps:
        return empty
    if how == "last":
        return float(steps[-1])
    if how == "min":
        return float(min(steps))
    if how == "product":
        return float(math.prod(steps))
    return float(sum(steps) / len(steps))


def run_sync(coro):
    """Run a coroutine to completion from synchronous code, also when called inside a
    running event loop (a meta-generator's ``aggregate`` is synchronous code running in
    its loop): then it runs on a fresh loop in a helper thread. Scorers that call an
    async backend (a judge, a remote model) use this, so ``score`` stays synchronous."""
    import asyncio

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


def per_request(requests: Sequence[tuple[str, Sequence[str]]], steps: list[list[float]], usages: list[Any],
                aggregation: str) -> list["Scores"]:
    """Flat per-completion step values and bills back into one ``Scores`` per request
    (values: the ``aggregation`` of each completion's steps)."""
    out, k = [], 0
    for _, cs in requests:
        mine = steps[k : k + len(cs)]
        out.append(Scores([aggregate(x, aggregation, empty=0.0) for x in mine], Usage.total(usages[k : k + len(cs)]), mine))
        k += len(cs)
    return out


class ProcessReward:
    """A reward model read at step ends (PRM), each path scored by ``aggregation`` of its
    steps: last, min, product or mean."""

    def __init__(self, rm: Any, aggregation: str = "last") -> None:
        aggregate([], aggregation)  # validates the name
        self.rm, self.aggregation = rm, aggregation
        self.name = f"{rm.name}/prm-{aggregation}"

    def score_steps(self, prompt: str, completions: Sequence[str]) -> Scores:
        return self.rm.score_steps(prompt, completions, aggregation=self.aggregation)

    def score(self, prompt: str, completions: Sequence[str]) -> Scores:
        return self.score_steps(prompt, completions)

    def score_steps_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[Scores]:
        return self.rm.score_steps_many(requests, aggregation=self.aggregation)


def split_spec(spec: str, legal: Sequence[str], where: str = "--reward-format", empty_ok: bool = False,
               hint: str = "") -> tuple[str, dict[str, str]]:
    """A format spec ``NAME:key=value,...`` as (NAME, {key: value}), ``\\n`` spelling a
    newline; a key outside ``legal`` (or, unless ``empty_ok``, an empty value) is
    refused, naming the legal keys. Reward formats (``formats.py``) and generative
    verifiers (``generative.py``) read their specs so."""
    base, _, rest = spec.partition(":")
    changes: dict[str, str] = {}
    for part in rest.split(",") if rest else []:
        key, eq, value = part.partition("=")
        if not eq or key not in legal or not (value or empty_ok):
            raise SettingError(f"{where} {spec!r}: overrides are key=value with key among {', '.join(legal)}{hint}; "
                               f"got {part!r}", "reward_format")
        changes[key] = value.replace("\\n", "\n")
    return base, changes
