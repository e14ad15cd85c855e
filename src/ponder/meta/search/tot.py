"""Tree of thoughts (Yao et al. 2023), breadth-first and depth-first, over steps valued
by a step scorer (the "state evaluator").

* BFS: at each depth, every kept state proposes ``k`` next steps; the ``breadth`` states
  the scorer values best are kept; the answer is the best finished state.
* DFS: follow the best-valued proposal first, prune any state valued below
  ``threshold``, and backtrack; stop at the first finished state above the threshold,
  or when ``max_expansions`` states have been expanded (then the best finished one).
"""

from __future__ import annotations

from typing import Any

from ...errors import SettingError
from ...types import Generation, Usage
from .base import Node, StepSearch, Tree, best_terminal


def _positive(**values: Any) -> None:
    for name, v in values.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise SettingError(f"{name} must be an integer >= 1; got {v!r}")


class TreeOfThoughtsBFS(StepSearch):
    strategy = "tot-bfs"

    def __init__(self, lm: Any, scorer: Any, breadth: int = 4, k: int = 4, **kw: Any) -> None:
        super().__init__(lm, scorer, **kw)
        _positive(breadth=breadth, k=k)
        self.breadth, self.k = breadth, k

    def keep(self, open_: list[Node], to_finish: int) -> list[tuple[Node, int]]:
        return [(c, self.k) for c in sorted(open_, key=lambda c: -c.score)[: self.breadth]]

    async def search(self, prompt: str, seed: int) -> Generation:
        return await self.level_by_level(prompt, self.breadth * self.k, seed, self.keep)


class TreeOfThoughtsDFS(StepSearch):
    strategy = "tot-dfs"

    def __init__(self, lm: Any, scorer: Any, k: int = 3, threshold: float = 0.5, max_expansions: int = 32,
                 **kw: Any) -> None:
        super().__init__(lm, scorer, **kw)
        _positive(k=k, max_expansions=max_expansions)
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool):
            raise SettingError(f"threshold must be a number; got {threshold!r}")
        self.k, self.threshold, self.max_expansions = k, float(threshold), max_expansions

    async def search(self, prompt: str, seed: int) -> Generation:
        tree = Tree()
        usage, finished, expansions = Usage(), [], 0
        stack = [tree.root]
        while stack and expansions < self.max_expansions:
            node = stack.pop()
            (kids,) = await self.expand(prompt, tree, [node], self.k, seed + expansions)
            expansions += 1
            usage = usage + await self.score(prompt, kids, seed + expansions)
            good = [c for c in kids if c.score >= self.threshold]  # prune the rest
            done = [c for c in good if c.terminal]
            finished += [c for c in kids if c.terminal]
            if done:
                best = max(done, key=lambda c: c.score)
                return self.result(tree.root, best, usage, expansions=expansions, found=True)
            stack += sorted((c for c in good if not c.terminal), key=lambda c: c.score)  # best on top
        best = best_terminal(finished) or max((n for n in tree.root.walk() if n is not tree.root),
                                               key=lambda n: n.score or 0.0, default=tree.root)
        return self.result(tree.root, best, usage, expansions=expansions, found=False)

