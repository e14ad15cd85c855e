"""Exact verifiers: scorers that know the right answer.

``AnswerVerifier`` scores 1 for a completion whose answer the task accepts, else 0;
``StepVerifier`` scores each step with the task's exact step checker (an oracle process
reward) and a path by its prefix correctness. Both read the problem from the prompt
through ``problem_of(prompt)``; for ``arith`` the question is in the prompt itself, so
no answer key is needed (``ArithTask.problem_of_prompt``).
"""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from ..errors import SettingError
from ..types import Usage
from .base import Scores, aggregate


def problem_reader(task: Any, problem_of: Callable[[str], Any] | None) -> Callable[[str], Any]:
    """How a verifier finds the problem a prompt asks: ``problem_of`` or the task's own."""
    reader = problem_of or getattr(task, "problem_of_prompt", None)
    if reader is None:
        raise SettingError(f"task {getattr(task, 'name', task)!r} cannot read a problem from its prompt; "
                           "give problem_of=prompt -> Problem")
    return reader


class AnswerVerifier:
    """1.0 if ``task.check_answer`` accepts the completion, else 0.0."""

    name = "answer-verifier"

    def __init__(self, task: Any, problem_of: Callable[[str], Any] | None = None) -> None:
        self.task, self.problem_of = task, problem_reader(task, problem_of)

    def score(self, prompt: str, completions: Sequence[str]) -> Scores:
        t0 = time.perf_counter()
        problem = self.problem_of(prompt)
        values = [1.0 if self.task.check_answer(problem, c) else 0.0 for c in completions]
        return Scores(values, Usage(wall_s=time.perf_counter() - t0))


class StepVerifier:
    """The task's exact step checker as a process reward: a step scores 1.0 while the
    path is right up to it, else 0.0 (prefix correctness); a path scores by
    ``aggregation`` of its steps (default "min": right all the way)."""

    name = "step-verifier"

    def __init__(self, task: Any, problem_of: Callable[[str], Any] | None = None, aggregation: str = "min") -> None:
        aggregate([], aggregation)  # validates
        if not callable(getattr(task, "check_steps", None)):
            raise SettingError(f"task {getattr(task, 'name', task)!r} has no step checker")
        self.task, self.aggregation, self.problem_of = task, aggregation, problem_reader(task, problem_of)

    def score_steps(self, prompt: str, completions: Sequence[str]) -> Scores:
        t0 = time.perf_counter()
        problem = self.problem_of(prompt)
        steps = []
        for c in completions:
            labels = self.task.check_steps(problem, self.task.split_steps(c)) or []
            good, row = True, []
            for ok in labels:
                good = good and ok
                row.append(1.0 if good else 0.0)
            steps.append(row)
        values = [aggregate(s, self.aggregation, empty=0.0) for s in steps]
        return Scores(values, Usage(wall_s=time.perf_counter() - t0), steps)

    def score(self, prompt: str, completions: Sequence[str]) -> Scores:
        return self.score_steps(prompt, completions)
