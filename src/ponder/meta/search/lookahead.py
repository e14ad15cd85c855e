"""Lookahead search (Snell et al. 2024): PRM beam search whose candidates are valued by
looking ahead. Each open candidate is rolled forward ``lookahead`` more steps at
temperature 0 and scored where the rollout ends; the rollout's steps are then dropped
(their tokens stay on the bill, on the candidate they valued), and the beam keeps the
candidates with the best lookahead values: more compute per step for a less myopic value.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from ...errors import SettingError
from ...scoring.base import aggregate
from ...types import Usage
from .base import Node
from .beam import PRMBeamSearch


class LookaheadSearch(PRMBeamSearch):
    strategy = "lookahead"

    def __init__(self, lm: Any, scorer: Any, n: int = 16, beam_width: int = 4, lookahead: int = 2, **kw: Any) -> None:
        super().__init__(lm, scorer, n=n, beam_width=beam_width, **kw)
        if not isinstance(lookahead, int) or isinstance(lookahead, bool) or lookahead < 0:
            raise SettingError(f"lookahead must be an integer >= 0; got {lookahead!r}")
        self.lookahead = lookahead

    async def rollout(self, prompt: str, node: Node) -> str:
        """Up to ``lookahead`` greedy steps after ``node``; their usage goes on ``node``."""
        text, greedy = "", self.params.replace(temperature=0.0, n=1, seed=0)
        for d in range(self.lookahead):
            ((g,),) = await self.lm.generate([prompt + node.path() + text], greedy)
            node.usage = node.usage + g.usage
            step, _, done = self.step_of(g, node.depth + d + 1)
            text += step
            if done:
                break
        return text

    async def _score(self, prompt: str, nodes: Sequence[Node]) -> Usage:
        usage = await super()._score(prompt, nodes)  # finished nodes keep this value
        todo = [n for n in nodes if not n.terminal]
        if not self.lookahead or not todo:
            return usage
        tails = await asyncio.gather(*(self.rollout(prompt, n) for n in todo))
        scores = await asyncio.to_thread(self.scorer.score_steps, prompt, [n.path() + t for n, t in zip(todo, tails)])
        for n, steps in zip(todo, scores.steps or [[v] for v in scores.values]):
            n.score = aggregate(steps, "last", empty=0.0)
        return usage + scores.usage
