"""What every step-level search shares: the tree, step expansion and partial-path scoring.

A simpler split than llm-reasoners' WorldModel / SearchConfig / Algorithm, which fits
text steps: the *state* is the path text (prompt + steps so far), an *action* is the
next step the policy writes, and the *world model* is concatenation, so ``StepTree``
holds states and ``expand`` / ``score`` are the search config. Each algorithm (beam.py,
dvts.py, rebase.py, ...) is then only its selection rule.
"""

from __future__ import annotations

import asyncio
import os
import re
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

from ...errors import SettingError
from ...params import SamplingParams
from ...protocols import Access, GeneratorBase, require_access
from ...types import Generation, Usage
from ...scoring.base import aggregate

_FINAL = re.compile(r"^\s*(answer\b|####)", re.IGNORECASE)


def answer_line(step: str) -> bool:
    """The default final step: a line that gives the answer ("Answer: ...", "#### ...")."""
    return bool(_FINAL.match(step))


@dataclass
class Node:
    """One step of a path. The root (``depth`` 0) holds no step."""

    id: int
    step: str
    parent: "Node | None"
    depth: int
    terminal: bool = False
    finish: str = ""  # why the step ended: "delimiter", "final", "stop" (EOS), "length", "depth"
    score: float | None = None  # the scorer's value of the path up to here
    visits: int = 0
    value: float = 0.0  # summed backed-up value (MCTS)
    tried: int = 0  # expansions drawn here (MCTS: a node is expanded `width` times, duplicates included)
    usage: Usage = field(default_factory=Usage)  # what generating this step cost
    logprob: float = 0.0
    children: list["Node"] = field(default_factory=list)
    drafts: list[dict[str, Any]] = field(default_factory=list)  # earlier steps refined away (step, score)
    rollouts: list[dict[str, Any]] = field(default_factory=list)  # paths finished from here to value it (MCTS)

    def path(self) -> str:
        steps, n = [], self
        while n is not None and n.parent is not None:
            steps.append(n.step)
            n = n.parent
        return "".join(reversed(steps))

    def walk(self) -> Iterator["Node"]:
        """This node and every node below it."""
        stack = [self]
        while stack:
            n = stack.pop()
            yield n
            stack.extend(n.children)

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "step": self.step, "depth": self.depth, "terminal": self.terminal,
                "finish": self.finish, "score": self.score, "visits": self.visits, "value": self.value,
                "usage": self.usage.to_dict(), "drafts": self.drafts,
                **({"rollouts": self.rollouts} if self.rollouts else {}),
                "children": [c.to_dict() for c in self.children]}


def tree_nodes(tree: dict[str, Any]) -> list[dict[str, Any]]:
    """Every node of a tree as ``Node.to_dict`` writes it (a search's ``meta["tree"]``,
    a stored trace), the root first."""
    out, stack = [], [tree]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n["children"])
    return out


class Tree:
    """One search's tree: its root and the ids it has handed out (state of one search,
    so concurrent searches over one object never share it)."""

    def __init__(self) -> None:
        self.root = Node(0, "", None, 0)
        self.size = 0

    def next_id(self) -> int:
        self.size += 1
        return self.size


class StepSearch(GeneratorBase):
    """The scaffolding of a step-level search over ``lm`` (any ``TextLM``) with a step
    ``scorer`` (``score_steps(prompt, completions) -> Scores``). ``params`` are the
    policy's sampling settings for one step (``max_tokens`` bounds a step); a step ends
    at ``delimiter``. ``is_final(step)`` marks a path's last step (an answer line by
    default); ``max_depth`` bounds the steps of a path.

    Refinement inside the tree: with ``refine=R``, a new step that scores below
    ``refine_threshold`` is drawn again, in place, up to R times (the better-scored
    draw stays; the others are kept in the node's ``drafts``), before the search
    selects among the steps. The bill includes every draw."""

    strategy = "step-search"
    # The searches of several prompts overlap in time (one's scorer on a thread while the
    # engine steps another's requests): a batch call's bills are scaled to its elapsed time.
    overlapping_bills = True

    def __init__(self, lm: Any, scorer: Any, params: SamplingParams | None = None, delimiter: str = "\n",
                 max_depth: int = 16, is_final: Callable[[str], bool] = answer_line, refine: int = 0,
                 refine_threshold: float = 0.5) -> None:
        require_access(lm, Access.TEXT, type(self).__name__)
        if not callable(getattr(scorer, "score_steps", None)):
            raise SettingError(f"scorer must have score_steps(prompt, completions) (a PRM or a step verifier); "
                               f"got {scorer!r}")
        if not isinstance(delimiter, str) or not delimiter:
            raise SettingError(f"delimiter must be a non-empty string; got {delimiter!r}")
        if not isinstance(max_depth, int) or isinstance(max_depth, bool) or max_depth < 1:
            raise SettingError(f"max_depth must be an integer >= 1; got {max_depth!r}")
        if params is not None and not isinstance(params, SamplingParams):
            raise SettingError(f"params must be a SamplingParams; got {type(params).__name__}")
        if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
            raise SettingError(f"refine (redraws of a step scored below refine_threshold) must be an integer >= 0; "
                               f"got {refine!r}")
        if isinstance(refine_threshold, bool) or not isinstance(refine_threshold, (int, float)) \
                or not 0.0 <= refine_threshold <= 1.0:
            raise SettingError(f"refine_threshold must be a number in [0, 1]; got {refine_threshold!r}")
        self.refine, self.refine_threshold = refine, float(refine_threshold)
        self._batchers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # event loop -> ScoreBatcher
        self.lm, self.scorer, self.delimiter, self.max_depth, self.is_final = lm, scorer, delimiter, max_depth, is_final
        self.params = (params or SamplingParams(temperature=0.8, max_tokens=64)).replace(
            stop=tuple(params.stop if params else ()) + (delimiter,))

    # -- the tree ----------------------------------------------------------------------------
    def step_of(self, g: Generation, depth: int) -> tuple[str, str, bool]:
        """A generation as a step at ``depth``: (its text, why it ended, whether the path
        ends with it): a delimiter goes on, an answer line, EOS, "length" or the depth
        bound end the path."""
        if g.finish_reason == "stop" and g.stop == self.delimiter:
            step = g.text + self.delimiter
            if self.is_final(step):
                return step, "final", True
            if depth >= self.max_depth:
                return step, "depth", True
            return step, "delimiter", False
        return g.text, ("stop" if g.finish_reason == "stop" else g.finish_reason), True

    def _step_node(self, node_id: int, parent: Node, g: Generation) -> Node:
        """A generation as the node of a step below ``parent`` (not yet attached)."""
        step, finish, terminal = self.step_of(g, parent.depth + 1)
        return Node(node_id, step, parent, parent.depth + 1, terminal=terminal, finish=finish, usage=g.usage,
                    logprob=sum(g.logprobs) if g.logprobs else 0.0)

    def _node(self, tree: Tree, parent: Node, g: Generation) -> Node:
        node = self._step_node(tree.next_id(), parent, g)
        parent.children.append(node)
        return node

    async def expand(self, prompt: str, tree: Tree, nodes: Sequence[Node], k: int | Sequence[int],
                     seed: int) -> list[list[Node]]:
        """``k`` next steps for each node (one count for all, or one per node), sampled
        concurrently: each node's request has its own seed, so equal prefixes still
        branch, and an engine-backed policy batches them all."""
        ks = [k] * len(nodes) if isinstance(k, int) else list(k)
        calls = [self.lm.generate([prompt + n.path()], self.params.replace(n=kk, seed=(seed + 7_919 * n.id) % 2**62))
                 for n, kk in zip(nodes, ks) if kk > 0]
        outs = iter(await asyncio.gather(*calls))
        kids = [[self._node(tree, n, g) for g in next(outs)[0]] if kk > 0 else [] for n, kk in zip(nodes, ks)]
        first = kids[0] if len(nodes) == 1 and nodes[0] is tree.root else []
        if len(first) >= 2 and all(c.finish == "length" for c in first):
            raise SettingError(f"max_tokens={self.params.max_tokens} is below one step: every first step was cut "
                               f"before the delimiter {self.delimiter!r}; raise max_tokens (the budget of one step)")
        return kids

    async def score(self, prompt: str, nodes: Sequence[Node], seed: int = 0) -> Usage:
        """Score each node's path with the step scorer (its last step's value) and
        return what scoring cost; with ``refine``, redraw the steps scored below the
        threshold first (``seed`` seeds the redraws). The scorer runs on a worker
        thread: the event loop (other searches, a server) goes on meanwhile."""
        if not nodes:
            return Usage()
        usage = await self._score(prompt, nodes)
        for r in range(self.refine):
            low = [n for n in nodes if n.score is not None and n.score < self.refine_threshold]
            if not low:
                break
            usage = usage + await self._redraw(prompt, low, (seed + 104_729 * (r + 1)) % 2**62)
        return usage

    async def _score(self, prompt: str, nodes: Sequence[Node]) -> Usage:
        scores = await self._batcher().score(prompt, [n.path() for n in nodes])
        for n, steps in zip(nodes, scores.steps or [[v] for v in scores.values]):
            n.score = aggregate(steps, "last", empty=0.0)
        return scores.usage

    def _batcher(self) -> "ScoreBatcher":
        """This search's scoring batcher in the running event loop: the searches of one
        call (one loop) share it, and none outlives its loop."""
        loop = asyncio.get_running_loop()
        b = self._batchers.get(loop)
        if b is None:
            b = self._batchers[loop] = ScoreBatcher(self.scorer)
        return b

    async def _redraw(self, prompt: str, nodes: Sequence[Node], seed: int) -> Usage:
        """Draw each node's step again from its parent; keep the better-scored step."""
        calls = [self.lm.generate([prompt + n.parent.path()], self.params.replace(n=1, seed=(seed + 7_919 * n.id) % 2**62))
                 for n in nodes]
        outs = await asyncio.gather(*calls)
        trial = [(n, self._step_node(n.id, n.parent, g)) for n, ((g,),) in zip(nodes, outs)]
        usage = await self._score(prompt, [t for _, t in trial])
        for n, t in trial:
            n.usage = n.usage + t.usage  # every draw is billed to the node that kept its place
            if t.score > n.score:
                n.drafts.append({"step": n.step, "score": n.score})
                n.step, n.finish, n.terminal, n.score, n.logprob = t.step, t.finish, t.terminal, t.score, t.logprob
            else:
                n.drafts.append({"step": t.step, "score": t.score})
        return usage

    # -- the result -----------------------------------------------------------------------
    def result(self, root: Node, best: Node, scorer_usage: Usage, **meta: Any) -> Generation:
        nodes = list(root.walk())
        # every step's bill plus the scorer's (steps that ran together in one engine batch
        # split their time there, so concurrent searches are not billed twice)
        usage = Usage.total(n.usage for n in nodes) + scorer_usage
        finish = "stop" if best.terminal and best.finish in ("final", "stop") else "length"
        return Generation(text=best.path(), token_ids=[], finish_reason=finish, usage=usage, score=best.score,
                          meta={"strategy": self.strategy, "tree": root.to_dict(), "nodes": len(nodes) - 1,
                                "best_node": best.id, **meta})

    async def search(self, prompt: str, seed: int) -> Generation:
        raise NotImplementedError

    async def level_by_level(self, prompt: str, n: int, seed: int,
                             choose: Callable[[list[Node], int], list[tuple[Node, int]]]) -> Generation:
        """The loop of the searches that grow a level at a time: sample ``n`` first
        steps, then, until ``n`` paths have finished or none is open, score the new
        level and let ``choose(open nodes, paths still to finish)`` say which to expand
        and into how many steps. The answer is the finished path scored best."""
        tree = Tree()
        (frontier,) = await self.expand(prompt, tree, [tree.root], n, seed)
        scorer_usage, finished, depth = Usage(), [], 1
        while True:
            scorer_usage = scorer_usage + await self.score(prompt, frontier, seed + 31 * depth)
            finished += [c for c in frontier if c.terminal]
            open_ = [c for c in frontier if not c.terminal]
            if not open_ or len(finished) >= n:
                break
            chosen = [(c, k) for c, k in choose(open_, n - len(finished)) if k > 0]
            kids = await self.expand(prompt, tree, [c for c, _ in chosen], [k for _, k in chosen], seed + depth)
            frontier = [c for cs in kids for c in cs]
            depth += 1
        best = best_terminal(finished) or max(frontier, key=lambda c: c.score)
        return self.result(tree.root, self.pick(best, finished), scorer_usage, finished=len(finished), depth=depth)

    def pick(self, best: Node, finished: list[Node]) -> Node:
        """The answer among the finished paths (the best scored; REBASE may vote)."""
        return best

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SettingError(f"n must be an integer >= 1; got {n!r}")
        base = int.from_bytes(os.urandom(6), "little") if seed is None else seed
        return [await self.search(prompt, base + k * 1_000_033) for k in range(n)]

class ScoreBatcher:
    """Coalesces the step-scoring requests of concurrent searches: while one batch is
    being scored (on a worker thread), new requests queue; then they all go in one
    call. A scorer with ``score_steps_many`` (the reward model) scores them in shared
    forward passes, so 200 searches at one level cost a few passes, not 200; any other
    scorer gets one ``score_steps`` call per request, still off the event loop."""

    def __init__(self, scorer: Any) -> None:
        self.scorer = scorer
        self.pending: list[tuple[str, list[str], asyncio.Future]] = []
        self.running = False

    async def score(self, prompt: str, texts: list[str]) -> Any:
        fut = asyncio.get_running_loop().create_future()
        self.pending.append((prompt, texts, fut))
        if not self.running:
            self.running = True
            asyncio.get_running_loop().create_task(self._drain())
        return await fut

    def _score_many(self, requests: list[tuple[str, list[str]]]) -> list[Any]:
        many = getattr(self.scorer, "score_steps_many", None)
        if callable(many):
            return many(requests)
        return [self.scorer.score_steps(p, t) for p, t in requests]

    async def _drain(self) -> None:
        try:
            await asyncio.sleep(0)  # let the searches resumed in this tick add theirs
            while self.pending:
                batch, self.pending = self.pending, []
                try:
                    results = await asyncio.to_thread(self._score_many, [(p, t) for p, t, _ in batch])
                except BaseException as e:  # every waiting search gets the scorer's error
                    for _, _, f in batch:
                        if not f.done():
                            f.set_exception(e)
                    continue
                for (_, _, f), r in zip(batch, results):
                    if not f.done():
                        f.set_result(r)
        finally:
            self.running = False


class BeamBudget(StepSearch):
    """A search with a budget of ``n`` paths explored ``beam_width`` at a time."""

    def __init__(self, lm: Any, scorer: Any, n: int = 16, beam_width: int = 4, **kw: Any) -> None:
        super().__init__(lm, scorer, **kw)
        for name, v in (("n", n), ("beam_width", beam_width)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise SettingError(f"{name} must be an integer >= 1; got {v!r}")
        if beam_width > n:
            raise SettingError(f"beam_width must be <= n ({n}); got {beam_width}")
        self.n, self.beam_width = n, beam_width


def best_terminal(nodes: Sequence[Node]) -> Node | None:
    """The highest-scoring terminal node (ties to the first), or None."""
    done = [n for n in nodes if n.terminal]
    return max(done, key=lambda n: (n.score if n.score is not None else float("-inf"))) if done else None
