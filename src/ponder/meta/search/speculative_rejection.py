"""Early rejection by partial reward: best-of-N that stops its weak samples mid-way.

Speculative Rejection (Sun et al., NeurIPS 2024) starts N samples, scores the partial
paths with the reward model at a checkpoint and stops the lowest-scored fraction, so
the compute of best-of-N goes to the samples still worth finishing; Cheshmi et al.
(EMNLP 2025) reject at several checkpoints. Here a checkpoint is a step boundary (the
first ``checkpoints`` steps): after each, the ``reject`` fraction of the open paths
scored lowest by the PRM stops (at least ``keep_min`` stay). The survivors then run to
the end, step by step, unscored until they finish. The answer is the finished path
scored best (``select="best"``) or the reward-weighted vote of the finished paths
(``select="weighted"``, with ``extract_answer``).

A stopped path generates nothing more: its row leaves the engine's batch when its step
ends (each step is its own request), and its bill is the steps it wrote plus the
scorer's passes. ``meta["rejected"]`` lists, per checkpoint, how many paths stopped and
the score below which they fell; each stopped node is marked ``rejected`` in the tree.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

from ...errors import SettingError
from ...types import Generation, Usage
from .base import Node, StepSearch, Tree


class SpeculativeRejection(StepSearch):
    strategy = "speculative-rejection"
    SELECT = ("best", "weighted")

    def __init__(self, lm: Any, scorer: Any, n: int = 16, reject: float = 0.75, checkpoints: int = 1,
                 keep_min: int = 1, select: str = "best", extract_answer: Callable[[str], str | None] | None = None,
                 **kw: Any) -> None:
        super().__init__(lm, scorer, **kw)
        for name, v in (("n", n), ("checkpoints", checkpoints), ("keep_min", keep_min)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SettingError(f"{name} must be an integer >= 1; got {v!r}")
        if keep_min > n:
            raise SettingError(f"keep_min must be <= n ({n}); got {keep_min}")
        if isinstance(reject, bool) or not isinstance(reject, (int, float)) or not 0.0 <= reject < 1.0:
            raise SettingError(f"reject (the fraction of open paths stopped at a checkpoint) must be in [0, 1); "
                               f"got {reject!r}")
        if select not in self.SELECT:
            raise SettingError(f"select must be one of {', '.join(self.SELECT)}; got {select!r}")
        if select == "weighted" and not callable(extract_answer):
            raise SettingError("select='weighted' votes by answer: it needs extract_answer (text -> answer or None)")
        self.n, self.reject, self.checkpoints, self.keep_min = n, float(reject), checkpoints, keep_min
        self.select, self.extract_answer = select, extract_answer

    def survivors(self, open_: list[Node]) -> tuple[list[Node], list[Node]]:
        """(kept, stopped): the ``reject`` fraction scored lowest stops, rounded down,
        at least ``keep_min`` stay; ties keep the earlier path (stable sort)."""
        stop = min(math.floor(self.reject * len(open_)), max(0, len(open_) - self.keep_min))
        ranked = sorted(open_, key=lambda c: -(c.score if c.score is not None else float("-inf")))
        kept = {c.id for c in ranked[: len(open_) - stop]}  # by id: equal steps are still different paths
        return [c for c in open_ if c.id in kept], [c for c in open_ if c.id not in kept]

    async def search(self, prompt: str, seed: int) -> Generation:
        tree = Tree()
        (frontier,) = await self.expand(prompt, tree, [tree.root], self.n, seed)
        scorer_usage, finished, rejected, depth = Usage(), [], [], 1
        while True:
            checkpoint = depth <= self.checkpoints
            # at a checkpoint every new step is scored; after it only finished paths are
            ready = frontier if checkpoint else [c for c in frontier if c.terminal]
            scorer_usage = scorer_usage + await self.score(prompt, ready, seed + 31 * depth)
            finished += [c for c in frontier if c.terminal]
            open_ = [c for c in frontier if not c.terminal]
            if checkpoint and open_:
                open_, stopped = self.survivors(open_)
                for c in stopped:
                    c.finish = "rejected"
                if stopped:
                    rejected.append({"depth": depth, "stopped": len(stopped),
                                     "below": max(c.score for c in stopped)})
            if not open_:
                break
            kids = await self.expand(prompt, tree, open_, 1, seed + depth)
            frontier = [cs[0] for cs in kids]
            depth += 1
        best = self.choose(finished)
        return self.result(tree.root, best, scorer_usage, finished=len(finished), depth=depth, rejected=rejected,
                           select=self.select)

    def choose(self, finished: list[Node]) -> Node:
        """The best-scored finished path, or the first finished path of the answer whose
        summed score is largest."""
        best = max(finished, key=lambda c: c.score if c.score is not None else float("-inf"))
        if self.select == "best":
            return best
        total: dict[str, float] = defaultdict(float)
        answers = [self.extract_answer(c.path()) for c in finished]
        for a, c in zip(answers, finished):
            if a is not None:
                total[a] += c.score or 0.0
        if not total:
            return best
        top = max(total.values())
        return next(c for a, c in zip(answers, finished) if a is not None and total[a] == top)
