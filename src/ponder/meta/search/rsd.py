"""Reward-guided speculative decoding (Liao et al. 2025, RSD): a cheap draft model
writes each step, the process reward model scores it, and the target model rewrites
only the steps scored below ``threshold``. Accepted steps cost the draft's tokens; a
rewritten step costs both. One path per output; its tree holds each step with the
draft it replaced (``drafts``, with the draft's score), so what the target wrote and
why can be read back. FLOPs are billed at each model's own size (the draft's usage
comes from the draft model), which is where the saving shows.
"""

from __future__ import annotations

from typing import Any

from ...errors import SettingError
from ...protocols import Access, require_access
from ...types import Generation, Usage
from .base import StepSearch, Tree


class RewardGuidedSpeculative(StepSearch):
    strategy = "rsd"

    def __init__(self, lm: Any, scorer: Any, draft: Any, threshold: float = 0.7, **kw: Any) -> None:
        super().__init__(lm, scorer, **kw)
        require_access(draft, Access.TEXT, "rsd's draft model")
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise SettingError(f"threshold (a draft step scored below it is rewritten) must be in [0, 1]; "
                               f"got {threshold!r}")
        self.draft, self.threshold = draft, float(threshold)

    async def search(self, prompt: str, seed: int) -> Generation:
        tree = Tree()
        node, scorer_usage, accepted, rewritten = tree.root, Usage(), 0, 0
        while not node.terminal:
            s = (seed + 7_919 * (node.depth + 1)) % 2**62
            ((g,),) = await self.draft.generate([prompt + node.path()], self.params.replace(n=1, seed=s))
            kid = self._node(tree, node, g)
            scorer_usage = scorer_usage + await self._score(prompt, [kid])
            if kid.score >= self.threshold:
                accepted += 1
            else:  # the target writes this step instead; the draft stays in the tree, billed
                ((t,),) = await self.lm.generate([prompt + node.path()], self.params.replace(n=1, seed=s + 1))
                node.children.pop()
                better = self._node(tree, node, t)
                better.usage = better.usage + kid.usage
                better.drafts.append({"step": kid.step, "score": kid.score, "by": "draft"})
                scorer_usage = scorer_usage + await self._score(prompt, [better])
                rewritten += 1
                kid = better
            node = kid
        return self.result(tree.root, node, scorer_usage, accepted=accepted, rewritten=rewritten,
                           threshold=self.threshold)
