"""``TextGenerator``: a generator over any ``TextLM``, the policy a meta-generator needs.

Majority vote, best-of-N and step-level search ask their policy only for text: this
turns a backend's ``generate(prompts, params)`` into the ``Generator`` interface
(``agenerate(prompt, n, seed)``), so they run unchanged on ponder's engine or on a
remote server that gives nothing but text.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from ..errors import SettingError
from ..params import SamplingParams
from ..protocols import Access, GeneratorBase, require_access
from ..types import Generation


class TextGenerator(GeneratorBase):
    """Sample from ``lm`` (any ``TextLM``) with ``params``; ``n`` and ``seed`` come per call."""

    strategy = "sample"

    def __init__(self, lm: Any, params: SamplingParams | None = None) -> None:
        require_access(lm, Access.TEXT, "a text generator")
        if params is not None and not isinstance(params, SamplingParams):
            raise SettingError(f"params must be a SamplingParams; got {type(params).__name__}")
        self.lm, self.params = lm, params or SamplingParams()

    async def agenerate_many(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        params = self.params.replace(n=n, seed=seed)  # validated: n and seed in range
        outs = await self.lm.generate(list(prompts), params)
        for gens in outs:
            for g in gens:
                g.meta.setdefault("strategy", self.strategy)
        return outs

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return (await self.agenerate_many([prompt], n, seed))[0]

    def generate_batch(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        return asyncio.run(self.agenerate_many(prompts, n, seed))
