"""LLM-as-a-judge (Zheng et al. 2023): a model is asked to grade each completion, and
its grade is parsed into a score.

The judge is any ``TextLM`` (the policy itself, a bigger local model, a remote server):
it needs only text. ``template`` shows it the question and one answer and asks for a
grade on a scale; ``pattern`` finds the grade in its reply (the first match); the score
is the grade mapped to [0, 1]. With ``samples`` > 1 (and a temperature in ``params``)
the grade is the mean of several verdicts, which steadies a noisy judge. A reply with
no readable grade in range scores ``unparsed`` and is counted in ``Scores.meta``, so a
judge that does not follow the format is visible rather than silently zero.
"""

from __future__ import annotations

import re
from typing import Any, Sequence

from ..errors import SettingError
from ..params import SamplingParams
from ..protocols import Access, require_access
from ..types import Usage
from .base import Scores, run_sync


class LLMJudge:
    TEMPLATE = ("Please act as an impartial judge and evaluate the correctness of the answer to the question "
                "below. Rate it on a scale of {low} to {high}, and reply in the format \"Grade: N\".\n\n"
                "[Question]\n{question}\n\n[Answer]\n{answer}\n\nGrade:")

    def __init__(self, judge: Any, template: str | None = None, low: float = 1, high: float = 10,
                 pattern: str = r"(-?\d+(?:\.\d+)?)", samples: int = 1, params: SamplingParams | None = None,
                 unparsed: float = 0.0, name: str = "judge") -> None:
        require_access(judge, Access.TEXT, "an LLM judge")
        self.template = template or self.TEMPLATE
        for key in ("{question}", "{answer}"):
            if key not in self.template:
                raise SettingError(f"template must contain {key} (and may contain {{low}} and {{high}})")
        if not (isinstance(low, (int, float)) and isinstance(high, (int, float)) and low < high):
            raise SettingError(f"the grade scale needs numbers low < high; got low={low!r}, high={high!r}")
        try:
            self.pattern = re.compile(pattern)
        except re.error as e:
            raise SettingError(f"pattern is not a valid regular expression: {e}") from None
        if self.pattern.groups < 1:
            raise SettingError("pattern must have a group capturing the grade, e.g. r'Grade: (\\d+)'")
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise SettingError(f"samples (verdicts per answer) must be an integer >= 1; got {samples!r}")
        if params is not None and not isinstance(params, SamplingParams):
            raise SettingError(f"params must be a SamplingParams; got {type(params).__name__}")
        # A verdict is short: one line is enough unless the caller says otherwise.
        self.params = params or SamplingParams(temperature=0.0, max_tokens=32, stop=("\n",))
        self.judge, self.low, self.high, self.samples = judge, float(low), float(high), samples
        self.unparsed, self.name = float(unparsed), name

    def grade(self, reply: str) -> float | None:
        """The grade in ``reply`` mapped to [0, 1], or None if none is readable in range."""
        m = self.pattern.search(reply)
        if m is None:
            return None
        try:
            g = float(m.group(1))
        except ValueError:
            return None
        if not self.low <= g <= self.high:
            return None
        return (g - self.low) / (self.high - self.low)

    def score(self, prompt: str, completions: Sequence[str]) -> Scores:
        asks = [self.template.format(question=prompt.strip(), answer=c.strip(), low=_num(self.low), high=_num(self.high))
                for c in completions]
        if not asks:
            return Scores([])
        params = self.params.replace(n=self.samples)
        verdicts = run_sync(self.judge.generate(asks, params))
        values, failed, usage, replies = [], 0, Usage(), []
        for group in verdicts:
            grades = [self.grade(v.text) for v in group]
            usage = usage + Usage.total(v.usage for v in group)
            replies.append([v.text for v in group])
            ok = [g for g in grades if g is not None]
            failed += len(grades) - len(ok)
            values.append(sum(ok) / len(ok) if ok else self.unparsed)
        return Scores(values, usage, meta={"unparsed": failed, "verdicts": replies})


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
