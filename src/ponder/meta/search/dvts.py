"""Diverse verifier tree search, DVTS (Beeching et al. 2024).

The budget ``n`` is split into ``n / M`` independent subtrees, so that one high-scoring
early step cannot pull every path into one region (the failure of beam search at large
budgets). Each subtree starts from its own sampled first step and runs a greedy beam of
width ``M``: expand its one path into ``M`` next steps, keep the one the scorer rates
best. All subtrees advance together (one round of requests per depth). The answer is
the best finished path over the subtrees.
"""

from __future__ import annotations

from ...types import Generation
from .base import BeamBudget, Tree, best_terminal


class DVTS(BeamBudget):
    strategy = "dvts"

    async def search(self, prompt: str, seed: int) -> Generation:
        tree = Tree()
        root = tree.root
        (heads,) = await self.expand(prompt, tree, [root], max(1, self.n // self.beam_width), seed)
        scorer_usage = await self.score(prompt, heads, seed)
        finished = [h for h in heads if h.terminal]
        open_ = [h for h in heads if not h.terminal]
        depth = 1
        while open_:
            kids = await self.expand(prompt, tree, open_, self.beam_width, seed + depth)
            scorer_usage = scorer_usage + await self.score(prompt, [c for cs in kids for c in cs], seed + depth)
            best = [max(cs, key=lambda c: c.score) for cs in kids]  # each subtree keeps its best step
            finished += [b for b in best if b.terminal]
            open_ = [b for b in best if not b.terminal]
            depth += 1
        top = best_terminal(finished) or max(heads, key=lambda c: c.score)
        return self.result(root, top, scorer_usage, subtrees=len(heads), depth=depth)
