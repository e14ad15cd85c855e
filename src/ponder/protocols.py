"""The small protocols everything else is written against. Imports nothing heavy.

Backends, by capability (each algorithm declares the lowest level it needs):

* ``TextLM``: ``async generate(prompts, params) -> list[list[Generation]]``: text in,
  ``params.n`` generations out per prompt, honouring ``stop``, ``seed`` and
  ``max_tokens``. What any OpenAI-compatible server gives. Majority vote, best-of-N and
  step-level search need only this for their policy.
* ``LogprobsLM``: a ``TextLM`` whose generations also carry top-k log-probabilities
  of their tokens (``params.logprobs``), plus prompt scoring: the log-probability of
  each token of a continuation given a prompt (``score``).
* ``LogitsLM``: the full next-token distribution and a KV cache: ``prefill`` /
  ``step`` / ``forward`` / ``new_cache`` / ``flops`` over a ``Cache`` (``fork``,
  ``reorder_``, ``truncate_``, ``keep_rows_``). Beam search, the logits processors,
  speculative decoding and controlled generation need it.

``access`` names the highest level a backend gives (``Access``); ``require_access``
fails early, naming the level an algorithm needs. ponder's ``NativeLM`` with its
engine implements all three.

Generators (``Generator``): prompt in, ``Generation``s out; async first
(``agenerate``), so that a meta-generator written as plain async code can issue many
concurrent requests that an engine batches.
"""

from __future__ import annotations

import asyncio
import functools
import time
from enum import IntEnum
from typing import TYPE_CHECKING, Any, AsyncIterator, Protocol, Sequence, runtime_checkable

from .errors import SettingError
from .processor import Processor  # noqa: F401 (the processor contract lives in processor.py)
from .types import Generation

if TYPE_CHECKING:
    from .params import SamplingParams


class Access(IntEnum):
    """How much of the model a backend exposes; higher includes lower."""

    TEXT = 1  # sampling only (a chat API without logprobs)
    LOGPROBS = 2  # top-k logprobs per token and prompt scoring (OpenAI-compatible servers)
    LOGITS = 3  # full next-token logits and a KV cache (native engine, transformers)


class AccessError(TypeError):
    """An algorithm needs more access to the model than the backend gives."""


@runtime_checkable
class TextLM(Protocol):
    """Level 1: sampling text."""

    name: str
    access: Access

    async def generate(self, prompts: Sequence[str], params: "SamplingParams") -> list[list[Generation]]: ...


@runtime_checkable
class LogprobsLM(TextLM, Protocol):
    """Level 2: text plus top-k log-probabilities of generated tokens and prompt scoring."""

    async def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        """log p(token | prompt, earlier tokens) for every token of each continuation."""
        ...


@runtime_checkable
class Cache(Protocol):
    """A batch of per-row KV caches that token-level algorithms reshape."""

    def fork(self, rows: Any) -> "Cache":
        """A new cache whose row i copies row ``rows[i]`` (samples from one prompt)."""
        ...

    def reorder_(self, rows: Any) -> None:
        """In place: row i becomes old row ``rows[i]`` (beams)."""
        ...

    def truncate_(self, n: Any) -> None:
        """In place: drop the last ``n`` tokens (per row if ``n`` is a tensor; speculation)."""
        ...

    def keep_rows_(self, rows: Any) -> None:
        """In place: keep only these rows (finished requests leave the batch)."""
        ...


@runtime_checkable
class LogitsLM(Protocol):
    """Level 3: next-token logits over a KV cache."""

    name: str
    access: Access

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_token_ids(self) -> list[int]: ...

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def new_cache(self, batch_size: int, capacity: int = 256) -> Cache: ...

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int | None = None,
                cache: Cache | None = None) -> tuple[Any, Cache]:
        """Last-token logits [B, V] of prompts of different lengths, and their cache."""
        ...

    def step(self, tokens: Any, cache: Cache) -> Any:
        """One decode step: tokens [B] -> next-token logits [B, V]."""
        ...

    def forward(self, input_ids: Any, cache: Cache | None, num_new: Any = None, last_only: bool = False) -> Any:
        """Logits [B, T, V] for new tokens appended to each row of ``cache``."""
        ...

    def flops(self, n_tokens: int, context_start: int) -> float:
        """Forward FLOPs for ``n_tokens`` new tokens after ``context_start`` ones."""
        ...


# The protocol each level's backend must satisfy.
LEVELS = {Access.TEXT: TextLM, Access.LOGPROBS: LogprobsLM, Access.LOGITS: LogitsLM}


def require_access(model: Any, needed: Access, algorithm: str) -> None:
    """Fail early, naming the level ``algorithm`` needs, if ``model`` does not give it."""
    have = getattr(model, "access", Access.TEXT)
    name = getattr(model, "name", model)
    if have < needed:
        raise AccessError(f"{algorithm} needs {needed.name.lower()} access, but model {name!r} only gives "
                          f"{Access(have).name.lower()}; use a native or transformers backend")
    proto = LEVELS[needed]
    # the protocol's members checked directly: isinstance against a runtime-checkable
    # Protocol recomputes its members on every call in Python 3.11 (10% of a server's
    # event-loop time, building a generator per request)
    missing = sorted(m for m in _members(proto) if not hasattr(model, m))
    if missing:
        raise AccessError(f"{algorithm} needs {needed.name.lower()} access: model {name!r} declares it but lacks "
                          f"{', '.join(missing)} of the {proto.__name__} protocol")


@functools.lru_cache(maxsize=None)
def _members(proto: type) -> frozenset[str]:
    attrs = getattr(proto, "__protocol_attrs__", None)
    if attrs is None:  # Python < 3.12
        import typing

        attrs = typing._get_protocol_attrs(proto)  # type: ignore[attr-defined]
    return frozenset(attrs)


class Generator(Protocol):
    """Anything that turns a prompt into generations. Meta-generators wrap these."""

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]: ...


def bill_to_elapsed(outs: list[list[Generation]], elapsed: float) -> list[list[Generation]]:
    """Scale every output's ``wall_s`` by the same factor, so that the bills of a call
    whose parts ran concurrently sum to its elapsed time (none is counted twice, and
    none is left out)."""
    billed = sum(g.usage.wall_s for gs in outs for g in gs)
    if billed > 0:
        for gs in outs:
            for g in gs:
                g.usage.wall_s *= elapsed / billed
    return outs


class GeneratorBase:
    """Sync wrappers over ``agenerate``; subclasses implement the async method."""

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        raise NotImplementedError

    def generate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return asyncio.run(self.agenerate(prompt, n=n, seed=seed))

    # A meta-generator whose parts run concurrently (a scorer on a thread while the
    # engine serves another part) sets this: its bills then overlap, and a batch call
    # scales them to add up to its elapsed time.
    overlapping_bills = False

    async def agenerate_many(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        """Concurrent requests; an engine-backed generator batches them."""
        t0 = time.perf_counter()
        outs = list(await asyncio.gather(*(self.agenerate(p, n=n, seed=seed) for p in prompts)))
        return bill_to_elapsed(outs, time.perf_counter() - t0) if self.overlapping_bills else outs

    def generate_batch(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        return asyncio.run(self.agenerate_many(prompts, n=n, seed=seed))

    def astream(self, prompt: str, seed: int | None = None) -> AsyncIterator[Any]:
        raise NotImplementedError(f"{type(self).__name__} does not stream")


class IndependentRuns(GeneratorBase):
    """A generator whose ``n`` outputs are independent runs of ``_once(prompt, seed)``,
    run concurrently, each with its own seed (chains, refinement, compute-optimal)."""

    SEED_STRIDE = 1_000_033  # seeds of successive runs, far apart

    async def _once(self, prompt: str, seed: int | None) -> Generation:
        raise NotImplementedError

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SettingError(f"n must be an integer >= 1; got {n!r}")
        return list(await asyncio.gather(*(self._once(prompt, None if seed is None else seed + self.SEED_STRIDE * k)
                                           for k in range(n))))
