"""PRM beam search (Snell et al. 2024; the search-and-learn recipe of Beeching et al. 2024).

``n`` paths are in flight with beam width ``M``: the first step is sampled ``n`` times;
then, at every depth, the ``n / M`` best open paths by the step scorer's value are kept
and each is expanded into ``M`` next steps. Finished paths (an answer line, EOS, the
depth bound) leave the beam; the search stops when ``n`` have finished or none is open.
The answer is the finished path the scorer rates best.
"""

from __future__ import annotations

from typing import Any

from ...errors import SettingError
from ...types import Generation, Usage
from .base import StepSearch, Tree, best_terminal


class PRMBeamSearch(StepSearch):
    strategy = "prm-beam"

    def __init__(self, lm: Any, scorer: Any, n: int = 16, beam_width: int = 4, **kw: Any) -> None:
        super().__init__(lm, scorer, **kw)
        for name, v in (("n", n), ("beam_width", beam_width)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SettingError(f"{name} must be an integer >= 1; got {v!r}")
        if beam_width > n:
            raise SettingError(f"beam_width must be <= n ({n}); got {beam_width}")
        self.n, self.beam_width = n, beam_width

    async def search(self, prompt: str, seed: int) -> Generation:
        tree = Tree()
        root = tree.root
        (frontier,) = await self.expand(prompt, tree, [root], self.n, seed)
        scorer_usage, finished, depth = Usage(), [], 1
        while True:
            scorer_usage = scorer_usage + await self.score(prompt, frontier)
            finished += [c for c in frontier if c.terminal]
            open_ = [c for c in frontier if not c.terminal]
            if not open_ or len(finished) >= self.n:
                break
            keep = sorted(open_, key=lambda c: -c.score)[: max(1, self.n // self.beam_width)]
            frontier = [c for cs in await self.expand(prompt, tree, keep, self.beam_width, seed + depth) for c in cs]
            depth += 1
        best = best_terminal(finished) or max(frontier, key=lambda c: c.score)
        return self.result(root, best, scorer_usage, finished=len(finished), depth=depth)
