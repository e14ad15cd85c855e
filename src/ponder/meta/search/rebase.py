"""REBASE, reward-balanced search (Wu et al. 2024).

Each depth spends the remaining budget (``n`` minus the paths already finished) on the
open nodes in proportion to softmax(score / T): promising paths get many children,
weak ones few or none, instead of a fixed beam. The search stops when ``n`` paths have
finished. The answer is the finished path the scorer rates best (``select="best"``) or
the answer with the largest summed score (``select="weighted"``, needs ``extract``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable

from ...errors import SettingError
from ...types import Generation
from .base import Node, StepSearch


def allocate(scores: list[float], budget: int, temperature: float) -> list[int]:
    """Split ``budget`` children over nodes by softmax(score / T), rounding to whole
    children by the largest remainders (so the total is exactly the budget)."""
    if not scores or budget <= 0:
        return [0] * len(scores)
    top = max(scores)
    w = [math.exp((s - top) / temperature) for s in scores]
    total = sum(w)
    exact = [budget * x / total for x in w]
    out = [int(e) for e in exact]
    for i in sorted(range(len(scores)), key=lambda i: -(exact[i] - out[i]))[: budget - sum(out)]:
        out[i] += 1
    return out


class REBASE(StepSearch):
    strategy = "rebase"

    def __init__(self, lm: Any, scorer: Any, n: int = 16, temperature: float = 0.1, select: str = "best",
                 extract: Callable[[str], Any] | None = None, **kw: Any) -> None:
        super().__init__(lm, scorer, **kw)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SettingError(f"samples (n, paths to finish) must be an integer >= 1; got {n!r}")
        if not isinstance(temperature, (int, float)) or not temperature > 0:
            raise SettingError(f"temperature (of the budget's softmax) must be > 0; got {temperature!r}")
        if select not in ("best", "weighted"):
            raise SettingError(f"select must be best or weighted; got {select!r}")
        if select == "weighted" and not callable(extract):
            raise SettingError("select='weighted' needs extract (text -> answer)")
        self.n, self.temperature, self.select, self.extract = n, float(temperature), select, extract

    def balance(self, open_: list[Node], to_finish: int) -> list[tuple[Node, int]]:
        """The paths still to finish, split over the open nodes by softmax(score / T)."""
        return list(zip(open_, allocate([c.score for c in open_], to_finish, self.temperature)))

    def pick(self, best: Node, finished: list[Node]) -> Node:
        if self.select != "weighted" or not finished:
            return best
        total: dict[Any, float] = defaultdict(float)
        for c in finished:
            a = self.extract(c.path())
            if a is not None:
                total[a] += c.score or 0.0
        if not total:
            return best
        win = max(total, key=total.get)
        return max((c for c in finished if self.extract(c.path()) == win), key=lambda c: c.score)

    async def search(self, prompt: str, seed: int) -> Generation:
        return await self.level_by_level(prompt, self.n, seed, self.balance)
