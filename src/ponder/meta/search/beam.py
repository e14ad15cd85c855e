"""PRM beam search (Snell et al. 2024; the search-and-learn recipe of Beeching et al. 2024).

``n`` paths are in flight with beam width ``M``: the first step is sampled ``n`` times;
then, at every depth, the ``n / M`` best open paths by the step scorer's value are kept
and each is expanded into ``M`` next steps. Finished paths (an answer line, EOS, the
depth bound) leave the beam; the search stops when ``n`` have finished or none is open.
The answer is the finished path the scorer rates best.
"""

from __future__ import annotations

from ...types import Generation
from .base import BeamBudget, Node


class PRMBeamSearch(BeamBudget):
    strategy = "prm-beam"

    def keep(self, open_: list[Node], to_finish: int) -> list[tuple[Node, int]]:
        """The n / M best open paths, M next steps each."""
        best = sorted(open_, key=lambda c: -c.score)[: max(1, self.n // self.beam_width)]
        return [(c, self.beam_width) for c in best]

    async def search(self, prompt: str, seed: int) -> Generation:
        return await self.level_by_level(prompt, self.n, seed, self.keep)
