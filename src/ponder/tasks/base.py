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
FORMATS = ("gsm8k", "math")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (braces balanced), or None."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = text.find("{", i)
    if j < 0:
        return None
    depth = 0
    for k in range(j, len(text)):
        if text[k] == "{":
            depth += 1
        elif text[k] == "}":
            depth -= 1
            if depth == 0:
                return text[j + 1 : k].strip()
    return None


class JsonlTask:
    """A GSM8K- or MATH-style task from a JSONL file, one problem per row.

    * ``question_field`` / ``answer_field`` / ``id_field`` name the row's fields
      (GSM8K: question, answer; MATH: problem, solution).
    * ``format="gsm8k"``: the reference answer is the number after ``####`` (else the
      last number); an output's answer likewise, compared as numbers.
    * ``format="math"``: the reference answer is the last ``\\boxed{}`` of the answer
      field (else the whole field); an output is checked by math-verify (Hugging
      Face's parser and equivalence checker: LaTeX, fractions, sets, intervals,
      units), which never downloads anything.
    """

    def __init__(self, path: str | Path, name: str | None = None, prompt_template: str = "Q: {question}\n",
                 question_field: str = "question", answer_field: str = "answer", id_field: str = "id",
                 format: str = "gsm8k") -> None:
        if format not in FORMATS:
            raise SettingError(f"task format must be one of {', '.join(FORMATS)}; got {format!r}", "format")
        if "{question}" not in prompt_template:
            raise SettingError(f"the task's prompt template must contain {{question}}; got {prompt_template!r}")
        self.path = Path(path)
        self.name = name or self.path.stem
        self.prompt_template = prompt_template
        self.question_field, self.answer_field, self.id_field = question_field, answer_field, id_field
        self.format = format

    def problems(self, level: str | None = None, limit: int | None = None) -> list[Problem]:
        if level is not None:
            raise SettingError(f"a JSONL task has no levels; got level {level!r}", "level")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise SettingError(f"limit must be an integer >= 1; got {limit!r}", "limit")
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as e:
            raise SettingError(f"task file {self.path}: cannot be read ({e})") from None
        out = []
        q, a = self.question_field, self.answer_field
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                r = json.loads(line)
            except json.JSONDecodeError as e:
                raise SettingError(f"task file {self.path}, line {n}: not JSON ({e.msg})") from None
            missing = [k for k in (q, a) if not isinstance(r, dict) or k not in r]
            if missing:
                raise SettingError(f"task file {self.path}, line {n}: a row needs the fields {q} and {a}; "
                                   f"missing {', '.join(missing)} (set the field names with question_field / "
                                   "answer_field)")
            out.append(Problem(id=str(r.get(self.id_field, len(out))), question=str(r[q]),
                               answer=self.reference(str(r[a])), meta=r))
        if not out:
            raise SettingError(f"task file {self.path} holds no problems")
        return out[:limit] if limit else out

    def reference(self, answer: str) -> str:
        """The gold answer from a row's answer field."""
        if self.format == "math":
            return last_boxed(answer) or answer.strip()
        return self.extract_answer(answer) or answer.strip()

    def prompt(self, problem: Problem) -> str:
        return self.prompt_template.format(question=problem.question)

    def extract_answer(self, completion: str) -> str | None:
        if self.format == "math":
            boxed = last_boxed(completion or "")
            if boxed is not None:
                return boxed
            found = _math_answers(completion or "")
            return found[-1] if found else None
        if "####" in completion:
            completion = completion.rsplit("####", 1)[1]
        nums = _NUMBER.findall(completion)
        return nums[-1].replace(",", "") if nums else None

    def check_answer(self, problem: Problem, completion: str) -> bool:
        if self.format == "math":
            return math_equal(problem.answer, completion)
        got = self.extract_answer(completion)
        return got is not None and _same_number(got, problem.answer)

    def split_steps(self, completion: str) -> list[str]:
        return [s for s in completion.split("\n") if s.strip()]

    def check_steps(self, problem: Problem, steps: list[str]) -> list[bool] | None:
        return None


def _math_answers(text: str) -> list[str]:
    import logging

    from math_verify import parse

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return [str(x) for x in parse(text, parsing_timeout=None) if isinstance(x, str)]


def math_equal(gold: str, completion: str) -> bool:
    """Is ``completion``'s final answer equivalent to ``gold``? (math-verify; its
    timeouts use signals, which only the main thread may set, so they are off: a
    sweep checks answers from worker threads.)"""
    import logging

    from math_verify import parse, verify

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # it warns at every call that timeouts are off
    g = parse(gold if "$" in gold or "\\boxed" in gold else f"${gold}$", parsing_timeout=None)
    p = parse(completion, parsing_timeout=None)
    if not g or not p:
        return False
    return bool(verify(g, p, timeout_seconds=None))


def _same_number(a: str, b: str) -> bool:
    try:
        return float(a) == float(b)
    except ValueError:
        return a.strip() == b.strip()


class FormattedTask:
    """A task whose prompts pass through ``format_prompt`` (a chat template's
    ``prompt_for``, say); answers, checks and steps are the task's own."""

    def __init__(self, task: Any, format_prompt: Any) -> None:
        self.task = task
        self.format_prompt = format_prompt

    def prompt(self, problem: Problem) -> str:
        return self.format_prompt(self.task.prompt(problem))

    def __getattr__(self, name: str) -> Any:  # everything else is the wrapped task's
        if name == "task":  # not set yet (a copy being built): no recursion
            raise AttributeError(name)
        return getattr(self.task, name)

