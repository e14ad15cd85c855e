"""A process reward model in the format of Math-Shepherd (Wang et al. 2024) and
RLHFlow's PRMs: a causal language model that reads each step followed by a step tag,
and whose next-token distribution at the tag says whether the step is good.

The value of step t is p(good | tag_t) / (p(good | tag_t) + p(bad | tag_t)): the
softmax over the two label tokens' logits at the tag, as those models' cards compute
it. Any local checkpoint in that format works without glue code: give the tag and the
label tokens (Math-Shepherd: tag "ки", good "+", bad "-").
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from ..errors import SettingError
from ..protocols import Access, require_access
from ..types import Usage
from .base import Scores, aggregate


class StepTagPRM:
    def __init__(self, lm: Any, step_tag: str, good: str = "+", bad: str = "-", delimiter: str = "\n",
                 aggregation: str = "min", name: str | None = None) -> None:
        require_access(lm, Access.LOGITS, "a step-tag PRM")
        aggregate([], aggregation)  # validates the name
        self.lm, self.aggregation, self.delimiter = lm, aggregation, delimiter
        self.tag = self._one_token(step_tag, "step_tag")
        self.good, self.bad = self._one_token(good, "good"), self._one_token(bad, "bad")
        if self.good == self.bad:
            raise SettingError("good and bad must be different tokens")
        self.name = name or f"{getattr(lm, 'name', 'lm')}/step-tag"

    def _one_token(self, text: str, what: str) -> int:
        if not isinstance(text, str) or not text:
            raise SettingError(f"{what} must be a non-empty string")
        ids = self.lm.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise SettingError(f"{what} {text!r} is {len(ids)} tokens for this tokenizer; it must be exactly one "
                               "(the format reads one label token at each tag)")
        return ids[0]

    def layout(self, prompt: str, completion: str) -> tuple[list[int], list[int]]:
        """prompt + each step + the tag; the index of each tag."""
        ids, tags = self.lm.encode(prompt), []
        for step in [s for s in completion.split(self.delimiter) if s.strip()]:
            ids += self.lm.encode(step, add_special_tokens=False) + [self.tag]
            tags.append(len(ids) - 1)
        return ids, tags

    @torch.inference_mode()
    def score_steps(self, prompt: str, completions: Sequence[str]) -> Scores:
        t0 = time.perf_counter()
        steps, computed = [], 0
        for c in completions:
            ids, tags = self.layout(prompt, c)
            if not tags:
                steps.append([])
                continue
            logits = self.lm.forward(torch.tensor([ids]), None)[0]  # [T, V]
            pair = logits[tags][:, [self.good, self.bad]].float().softmax(-1)  # [steps, 2]
            steps.append(pair[:, 0].tolist())
            computed += len(ids)
        values = [aggregate(s, self.aggregation, empty=0.0) for s in steps]
        usage = Usage(computed_tokens=computed, model_calls=sum(1 for s in steps if s),
                      flops=self.lm.flops(computed, 0), wall_s=time.perf_counter() - t0)
        return Scores(values, usage, steps)

    def score(self, prompt: str, completions: Sequence[str]) -> Scores:
        return self.score_steps(prompt, completions)
