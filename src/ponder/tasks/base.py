"""The ``Task`` interface: what a problem set must provide to be evaluated and searched.

A task turns a problem into a prompt, pulls an answer out of free-form model output,
checks it, and (optionally) checks partial solutions step by step, which gives an
oracle process reward. GSM8K-style JSONL sets plug in by implementing the same four
methods (see ``JsonlTask``).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..errors import SettingError


@dataclass(frozen=True)
class Problem:
    id: str
    question: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Task(Protocol):
    name: str

    def problems(self, level: str | None = None, limit: int | None = None) -> list[Problem]: ...

    def prompt(self, problem: Problem) -> str: ...

    def extract_answer(self, completion: str) -> str | None: ...

    def check_answer(self, problem: Problem, completion: str) -> bool: ...

    def split_steps(self, completion: str) -> list[str]: ...

    def check_steps(self, problem: Problem, steps: list[str]) -> list[bool] | None:
        """Per-step correctness of a (partial) solution, or None when the task has no
        step oracle."""
        ...


_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


class JsonlTask:
    """A GSM8K/MATH-style task from a JSONL file of ``{"question", "answer"}`` rows.

    The final answer is the number after ``####`` when present (GSM8K convention),
    else the last number in the text.
    """

    def __init__(self, path: str | Path, name: str | None = None, prompt_template: str = "Q: {question}\n") -> None:
        self.path = Path(path)
        self.name = name or self.path.stem
        self.prompt_template = prompt_template

    def problems(self, level: str | None = None, limit: int | None = None) -> list[Problem]:
        if level is not None:
            raise SettingError(f"a JSONL task has no levels; got level {level!r}")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise SettingError(f"limit must be an integer >= 1; got {limit!r}")
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SettingError(f"task file {self.path}: cannot be read ({e})") from None
        out = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise SettingError(f"task file {self.path}, line {n}: not JSON ({e.msg})") from None
            missing = [k for k in ("question", "answer") if not isinstance(r, dict) or k not in r]
            if missing:
                raise SettingError(f"task file {self.path}, line {n}: a row needs the fields question and answer; "
                                   f"missing {', '.join(missing)}")
            ans = self.extract_answer(str(r["answer"])) or str(r["answer"]).strip()
            out.append(Problem(id=str(r.get("id", len(out))), question=str(r["question"]), answer=ans, meta=r))
        if not out:
            raise SettingError(f"task file {self.path} holds no problems")
        return out[:limit] if limit else out

    def prompt(self, problem: Problem) -> str:
        return self.prompt_template.format(question=problem.question)

    def extract_answer(self, completion: str) -> str | None:
        if "####" in completion:
            completion = completion.rsplit("####", 1)[1]
        nums = _NUMBER.findall(completion)
        return nums[-1].replace(",", "") if nums else None

    def check_answer(self, problem: Problem, completion: str) -> bool:
        got = self.extract_answer(completion)
        return got is not None and _same_number(got, problem.answer)

    def split_steps(self, completion: str) -> list[str]:
        return [s for s in completion.split("\n") if s.strip()]

    def check_steps(self, problem: Problem, steps: list[str]) -> list[bool] | None:
        return None


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()
