"""The small protocols everything else is written against. Imports nothing heavy.

* ``LanguageModel``: a backend, with an explicit ``access`` level that algorithms check
  up front (``require_access``), so that an algorithm that needs logits fails clearly on
  a text-only backend instead of deep inside a loop.
* ``Generator``: prompt in, ``Generation``s out. Async first (``agenerate``), so that a
  meta-generator written as plain async code can issue many concurrent requests that
  an engine batches; ``generate`` is the synchronous convenience.
* ``Processor``: ``(tokens, logits) -> logits``, batched. Optional ``accept`` /
  ``fork`` / ``rollback`` / ``reset`` for stateful processors (the llama.cpp sampler
  chain contract).
"""

from __future__ import annotations

import asyncio
from enum import IntEnum
from typing import Any, AsyncIterator, Protocol, Sequence, runtime_checkable

from .types import Generation


class Access(IntEnum):
    """How much of the model a backend exposes; higher includes lower."""

    TEXT = 1  # sampling only (a chat API without logprobs)
    LOGPROBS = 2  # top-k logprobs per token and prompt scoring (OpenAI-compatible servers)
    LOGITS = 3  # full next-token logits and hidden states (native engine, transformers)


class AccessError(TypeError):
    """An algorithm needs more access to the model than the backend gives."""


@runtime_checkable
class LanguageModel(Protocol):
    name: str
    access: Access

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    @property
    def eos_token_ids(self) -> list[int]: ...


def require_access(model: Any, needed: Access, algorithm: str) -> None:
    have = getattr(model, "access", Access.TEXT)
    if have < needed:
        raise AccessError(
            f"{algorithm} needs {needed.name.lower()} access, but model "
            f"{getattr(model, 'name', model)!r} only gives {Access(have).name.lower()}; "
            f"use a native or transformers backend"
        )


@runtime_checkable
class Processor(Protocol):
    """``tokens``: [B, T] history (prompt + generated), left-padded with -1 so every
    row ends at the last column; ``logits``: [B, V]. Returns new logits [B, V]."""

    def __call__(self, tokens: Any, logits: Any) -> Any: ...


class Generator(Protocol):
    """Anything that turns a prompt into generations. Meta-generators wrap these."""

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]: ...


class GeneratorBase:
    """Sync wrappers over ``agenerate``; subclasses implement the async method."""

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        raise NotImplementedError

    def generate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return asyncio.run(self.agenerate(prompt, n=n, seed=seed))

    async def agenerate_many(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        """Concurrent requests; an engine-backed generator batches them."""
        return list(await asyncio.gather(*(self.agenerate(p, n=n, seed=seed) for p in prompts)))

    def astream(self, prompt: str, seed: int | None = None) -> AsyncIterator[Any]:
        raise NotImplementedError(f"{type(self).__name__} does not stream")
