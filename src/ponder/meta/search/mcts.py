"""Monte Carlo tree search over steps: UCT (Kocsis and Szepesvári 2006), as used for
reasoning by Hao et al. 2023 (RAP) and Zhang et al. 2024.

Each of ``iterations`` rounds: *select* from the root by UCT (mean value + c·sqrt(ln
N_parent / N_child)) while a node has been expanded ``width`` times; *expand* one new
step there (a step equal to an existing child means the policy's mass is on it:
selection goes on below that child); *evaluate* the new
path: ``value="prm"`` reads the step scorer, ``"rollout"`` lets the policy finish the
path and scores the whole with ``rollout_scorer`` (an ORM or an exact verifier), and
``"both"`` averages them; *back up* the value to the root. The answer follows the most
visited children from the root to a finished path (else the best finished path seen,
else the best rollout).

``value`` defaults to ``"both"`` when a ``rollout_scorer`` is given and to ``"prm"``
otherwise. On hard problems a PRM-only tree rarely reaches an answer within a few
dozen iterations (each iteration adds one step, and an answer is ten steps deep: 5.5%
of 200 hard problems answered at 16 iterations), while a rollout finishes a path at
every iteration. A rollout's text, score and tokens are kept on the node it valued
(``rollouts``), so the tree holds every token the search billed. A result whose tree
finished no path and had no rollout says so (``meta["no_finished_path"]``).
"""

from __future__ import annotations

import math
from typing import Any

from ...errors import SettingError
from ...types import Generation, Usage
from .base import Node, StepSearch, Tree, best_terminal


class MCTS(StepSearch):
    strategy = "mcts"
    VALUES = ("prm", "rollout", "both")

    def __init__(self, lm: Any, scorer: Any, iterations: int = 16, width: int = 3, c: float = 1.0,
                 value: str | None = None, rollout_scorer: Any = None, rollout_tokens: int = 160, **kw: Any) -> None:
        super().__init__(lm, scorer, **kw)
        for name, v in (("iterations", iterations), ("width", width), ("rollout_tokens", rollout_tokens)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SettingError(f"{name} must be an integer >= 1; got {v!r}")
        if not isinstance(c, (int, float)) or isinstance(c, bool) or not c >= 0:
            raise SettingError(f"c (the exploration constant) must be >= 0; got {c!r}")
        if value is None:
            value = "both" if rollout_scorer is not None else "prm"
        if value not in self.VALUES:
            raise SettingError(f"value must be one of {', '.join(self.VALUES)}; got {value!r}")
        if value != "prm" and not callable(getattr(rollout_scorer, "score", None)):
            raise SettingError(f"value={value!r} needs rollout_scorer with score(prompt, completions) "
                               "(an ORM or an exact verifier)")
        self.iterations, self.width, self.c, self.value = iterations, width, float(c), value
        self.rollout_scorer, self.rollout_tokens = rollout_scorer, rollout_tokens

    def uct(self, parent: Node, child: Node) -> float:
        if child.visits == 0:
            return math.inf
        return child.value / child.visits + self.c * math.sqrt(math.log(max(parent.visits, 1)) / child.visits)

    def select(self, root: Node) -> Node:
        node = root
        while not node.terminal and node.tried >= self.width and node.children:
            node = max(node.children, key=lambda ch: self.uct(node, ch))
        return node

    async def evaluate(self, prompt: str, node: Node, seed: int) -> tuple[float, Usage, tuple[float, str] | None]:
        """The node's value, the scorers' cost, and the rollout's (score, finished text)
        if any. The rollout's own tokens go on the node's bill, its text in its
        ``rollouts``."""
        usage = await self.score(prompt, [node], seed)
        prm = node.score or 0.0
        if self.value == "prm":
            return prm, usage, None
        path = node.path()
        if not node.terminal:  # the policy finishes the path, no step delimiter
            params = self.params.replace(stop=tuple(s for s in self.params.stop if s != self.delimiter),
                                         max_tokens=self.rollout_tokens, n=1, seed=seed)
            ((g,),) = await self.lm.generate([prompt + path], params)
            path = path + g.text
            node.usage = node.usage + g.usage
        scores = self.rollout_scorer.score(prompt, [path])
        v = scores.values[0]
        if not node.terminal:
            node.rollouts.append({"text": path[len(node.path()):], "score": v,
                                  "generated_tokens": int(g.usage.generated_tokens)})
        return (v if self.value == "rollout" else (v + prm) / 2), usage + scores.usage, (v, path)

    async def search(self, prompt: str, seed: int) -> Generation:
        tree = Tree()
        root, usage, seen = tree.root, Usage(), []
        best_rollout: tuple[float, str, Node] | None = None  # the best finished text a rollout wrote, and where
        for it in range(self.iterations):
            node, tries = root, 0
            while True:
                node = self.select(node)
                if node.terminal:
                    break
                (kids,) = await self.expand(prompt, tree, [node], 1, seed + 7 * it + 1_009 * tries)
                tries += 1
                node.tried += 1
                new = kids[0]
                twin = next((c for c in node.children[:-1] if c.step == new.step), None)
                if twin is None:
                    node = new
                    seen.append(new)
                    break
                # the same step again: the policy's mass is there, so go on below it (a level
                # deeper each time, so the depth bound ends this)
                node.children.pop()
                twin.usage = twin.usage + new.usage
                node = twin
            value, cost, rollout = await self.evaluate(prompt, node, seed + 13 * it)
            usage = usage + cost
            if rollout is not None and (best_rollout is None or rollout[0] > best_rollout[0]):
                best_rollout = (*rollout, node)
            n: Node | None = node
            while n is not None:  # back up
                n.visits += 1
                n.value += value
                n = n.parent
        node = root
        while node.children and not node.terminal:
            node = max(node.children, key=lambda ch: (ch.visits, ch.value))
        best = node if node.terminal else best_terminal(seen)
        if best is None and best_rollout is not None:  # the tree finished no path: the best rollout did
            # best_node is the node whose rollout wrote the answer: its path, then the rollout
            out = self.result(root, best_rollout[2], usage, iterations=self.iterations, from_rollout=True)
            out.text, out.score, out.finish_reason = best_rollout[1], best_rollout[0], "stop"
            return out
        if best is None:  # nothing finished: the deepest most-visited path, said to be unfinished
            return self.result(root, node, usage, iterations=self.iterations, no_finished_path=(
                f"no path reached an answer in {self.iterations} iterations (each adds one step); raise "
                "iterations, or value a node by a rollout (value=both with a rollout_scorer)"))
        return self.result(root, best, usage, iterations=self.iterations)
