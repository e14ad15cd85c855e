"""Refinement: generate, get feedback, generate again.

* ``SelfRefine`` (Madaan et al. 2023): the model critiques its own answer, then revises
  it from the critique; it stops when the critique says the answer is fine, or after
  ``rounds`` revisions.
* ``Reflexion`` (Shinn et al. 2023): an evaluator (a verifier or a reward model with a
  threshold) judges each attempt; after a failed one the model writes a reflection,
  and the reflections so far (its memory across attempts) go into the next attempt's
  prompt.
* ``StepFeedbackRefine``: refinement with external feedback at the step level. A step
  checker (the task's exact step verifier, or a PRM with a threshold) names the first
  wrong step; the steps before it are kept and the rest is generated again from there
  (as in Welleck et al. 2023's corrector, with the critic replaced by a step checker).
  On ``arith`` this is a measured gain on the shipped model (benchmarks/meta_results.py).

Refinement inside a search tree is the ``refine`` option of the step-level searches
(``meta/search/base.py``): a new step the scorer rates below a threshold is drawn
again, in place, before the search selects.

Each wraps generators (any strategy) and is a generator; its usage is the sum of every
call it made, the scorers' included, and its trace holds each call's generation.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Callable

from ..errors import SettingError
from ..protocols import IndependentRuns
from ..types import Generation, Usage
from .chain import check_template


def _check_generator(g: Any, role: str) -> None:
    if not callable(getattr(g, "agenerate", None)):
        raise SettingError(f"{role} must be a ponder generator (with agenerate); got {g!r}")


def _check_scorer(obj: Any, method: str, role: str, what: str) -> None:
    if not callable(getattr(obj, method, None)):
        raise SettingError(f"{role} must have {method}(prompt, completions) ({what}); got {obj!r}")


def _check_count(v: Any, name: str, low: int) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise SettingError(f"{name} must be an integer >= {low}; got {v!r}")


def _check_threshold(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise SettingError(f"threshold must be a number in [0, 1]; got {v!r}")
    return float(v)


async def _one(gen: Any, prompt: str, seed: int | None) -> Generation:
    (g,) = await gen.agenerate(prompt, n=1, seed=seed)
    return g


def _result(best: Generation, trace: list[Generation], extra: Usage, strategy: str, **meta: Any) -> Generation:
    return Generation(text=best.text, token_ids=best.token_ids, logprobs=best.logprobs,
                      finish_reason=best.finish_reason, usage=Usage.total(g.usage for g in trace) + extra,
                      score=best.score, trace=trace, meta={"strategy": strategy, **meta})


def _seed(seed: int | None, k: int) -> int | None:
    return None if seed is None else (seed + 7_919 * k) % 2**62


class _Repeat(IndependentRuns):
    """``n`` independent runs of ``_once``; their scorers run on threads beside the engine."""

    overlapping_bills = True


_FINE = re.compile(r"\b(no (issues|errors|mistakes|problems)|looks (good|correct|right)|is (correct|right)|"
                   r"nothing to (fix|improve))\b", re.IGNORECASE)


def feedback_says_done(feedback: str) -> bool:
    """Self-Refine's stop test: the critique says there is nothing to fix."""
    return bool(_FINE.search(feedback or ""))


class SelfRefine(_Repeat):
    """Self-Refine (Madaan et al. 2023). ``generator`` answers ``prompt``; then, up to
    ``rounds`` times, ``critic`` writes feedback from ``feedback_template`` (fields
    ``{input}``, ``{answer}``) and, unless ``is_done(feedback)``, ``reviser`` writes a
    new answer from ``revise_template`` (``{input}``, ``{answer}``, ``{feedback}``).
    The critic and reviser default to ``generator``. The result is the last answer;
    ``meta["rounds"]`` counts revisions and ``meta["stopped"]`` says why it stopped."""

    strategy = "self-refine"

    def __init__(self, generator: Any, critic: Any = None, reviser: Any = None, rounds: int = 2,
                 feedback_template: str = "{input}{answer}\n\nFeedback on the answer above:",
                 revise_template: str = "{input}{answer}\n\nFeedback:{feedback}\n\nImproved answer:\n",
                 is_done: Callable[[str], bool] = feedback_says_done) -> None:
        _check_generator(generator, "generator")
        for role, g in (("critic", critic), ("reviser", reviser)):
            if g is not None:
                _check_generator(g, role)
        _check_count(rounds, "rounds", 0)
        check_template(feedback_template, {"input", "answer"}, "feedback_template")
        check_template(revise_template, {"input", "answer", "feedback"}, "revise_template")
        if not callable(is_done):
            raise SettingError(f"is_done must be a callable (feedback text -> bool); got {is_done!r}")
        self.generator, self.critic, self.reviser = generator, critic or generator, reviser or generator
        self.rounds, self.feedback_template, self.revise_template = rounds, feedback_template, revise_template
        self.is_done = is_done

    async def _once(self, prompt: str, seed: int | None) -> Generation:
        answer = await _one(self.generator, prompt, _seed(seed, 0))
        answer.meta.setdefault("role", "answer")
        trace, stopped, revisions = [answer], "rounds", 0
        for r in range(self.rounds):
            fb = await _one(self.critic, self.feedback_template.format(input=prompt, answer=answer.text),
                            _seed(seed, 2 * r + 1))
            fb.meta.setdefault("role", "feedback")
            trace.append(fb)
            if self.is_done(fb.text):
                stopped = "feedback"
                break
            answer = await _one(self.reviser, self.revise_template.format(input=prompt, answer=answer.text,
                                                                        feedback=fb.text), _seed(seed, 2 * r + 2))
            answer.meta.setdefault("role", "answer")
            trace.append(answer)
            revisions += 1
        return _result(answer, trace, Usage(), self.strategy, rounds=revisions, stopped=stopped,
                       feedback=[g.text for g in trace if g.meta.get("role") == "feedback"])


class Reflexion(_Repeat):
    """Reflexion (Shinn et al. 2023). Up to ``trials`` attempts: an attempt answers
    ``attempt_template`` (``{memory}``, ``{input}``); ``evaluator.score(prompt, [answer])``
    judges it (a verifier, or a reward model); at ``threshold`` or above it is accepted.
    After a failed attempt ``reflector`` (default: ``generator``) writes a reflection
    from ``reflect_template`` (``{input}``, ``{answer}``, ``{score}``); the last
    ``memory`` reflections, each through ``memory_template`` (``{reflection}``), make the
    next attempt's ``{memory}``. The result is the accepted attempt, or the best scored."""

    strategy = "reflexion"

    def __init__(self, generator: Any, evaluator: Any, reflector: Any = None, trials: int = 3,
                 threshold: float = 0.5, memory: int = 3, attempt_template: str = "{memory}{input}",
                 reflect_template: str = "{input}{answer}\nThis attempt was judged wrong (score {score:.2f}). "
                                         "In one sentence, what went wrong and what to do instead?\n",
                 memory_template: str = "Reflection on an earlier attempt: {reflection}\n") -> None:
        for role, g in (("generator", generator), ("reflector", reflector or generator)):
            _check_generator(g, role)
        _check_scorer(evaluator, "score", "evaluator", "a verifier or a reward model")
        _check_count(trials, "trials", 1)
        _check_count(memory, "memory", 0)
        check_template(attempt_template, {"memory", "input"}, "attempt_template")
        check_template(reflect_template, {"input", "answer", "score"}, "reflect_template")
        check_template(memory_template, {"reflection"}, "memory_template")
        self.generator, self.evaluator, self.reflector = generator, evaluator, reflector or generator
        self.trials, self.threshold, self.memory = trials, _check_threshold(threshold), memory
        self.attempt_template, self.reflect_template = attempt_template, reflect_template
        self.memory_template = memory_template

    async def _once(self, prompt: str, seed: int | None) -> Generation:
        trace: list[Generation] = []
        reflections: list[str] = []
        scorer_usage, attempts = Usage(), []
        for t in range(self.trials):
            mem = reflections[-self.memory:] if self.memory else []
            memory = "".join(self.memory_template.format(reflection=r) for r in mem)
            g = await _one(self.generator, self.attempt_template.format(memory=memory, input=prompt), _seed(seed, 2 * t))
            scores = await asyncio.to_thread(self.evaluator.score, prompt, [g.text])
            scorer_usage = scorer_usage + scores.usage
            g.score = float(scores.values[0])
            g.meta.update(role="attempt", trial=t)
            trace.append(g)
            attempts.append(g)
            if g.score >= self.threshold or t == self.trials - 1:
                break
            ref = await _one(self.reflector, self.reflect_template.format(input=prompt, answer=g.text, score=g.score),
                             _seed(seed, 2 * t + 1))
            ref.meta.update(role="reflection", trial=t)
            trace.append(ref)
            reflections.append(ref.text.strip())
        best = next((a for a in attempts if a.score >= self.threshold), None) or max(attempts, key=lambda a: a.score)
        return _result(best, trace, scorer_usage, self.strategy, trials=len(attempts),
                       accepted=best.score >= self.threshold, reflections=reflections)


class StepFeedbackRefine(_Repeat):
    """Refinement from a step checker's feedback. ``first`` (default: ``generator``)
    writes a solution; ``checker.score_steps(prompt, [solution])`` scores its steps
    (steps end at ``delimiter``); the first step below ``threshold`` is the first wrong
    one, and ``generator`` (which should sample, so that it can differ) writes the
    solution again from the steps before it. Up to ``rounds`` times, until no step is
    wrong. ``meta["attempts"]`` lists each attempt's first wrong step and the steps it
    kept; the result is the last attempt, or the best-scored one if the last still has
    a wrong step and ``keep_best`` is set."""

    strategy = "refine-steps"

    def __init__(self, generator: Any, checker: Any, first: Any = None, rounds: int = 4, threshold: float = 0.5,
                 delimiter: str = "\n", keep_best: bool = True) -> None:
        for role, g in (("generator", generator), ("first", first or generator)):
            _check_generator(g, role)
        _check_scorer(checker, "score_steps", "checker", "a step verifier or a PRM")
        _check_count(rounds, "rounds", 0)
        if not isinstance(delimiter, str) or not delimiter:
            raise SettingError(f"delimiter must be a non-empty string; got {delimiter!r}")
        self.generator, self.first, self.checker = generator, first or generator, checker
        self.rounds, self.threshold, self.delimiter, self.keep_best = rounds, _check_threshold(threshold), delimiter, keep_best

    def steps(self, text: str) -> list[str]:
        """The text's steps, each with its delimiter (the last may lack it)."""
        parts = text.split(self.delimiter)
        out = [p + self.delimiter for p in parts[:-1]]
        return out + [parts[-1]] if parts[-1] else out

    async def _check(self, prompt: str, text: str) -> tuple[list[float], Usage]:
        scores = await asyncio.to_thread(self.checker.score_steps, prompt, [text])
        steps = scores.steps[0] if scores.steps else [scores.values[0]]
        return [float(v) for v in steps], scores.usage

    async def _once(self, prompt: str, seed: int | None) -> Generation:
        g = await _one(self.first, prompt, _seed(seed, 0))
        text, trace, scorer_usage, attempts = g.text, [g], Usage(), []
        best_text, best_score, best_gen = text, float("-inf"), g
        for r in range(self.rounds + 1):
            values, u = await self._check(prompt, text)
            scorer_usage = scorer_usage + u
            wrong = next((i for i, v in enumerate(values) if v < self.threshold), None)
            score = min(values) if values else 0.0
            attempts.append({"round": r, "first_wrong_step": wrong, "score": score})
            if score > best_score:
                best_text, best_score, best_gen = text, score, trace[-1]
            if wrong is None or r == self.rounds:
                break
            kept = "".join(self.steps(text)[:wrong])
            attempts[-1]["kept_steps"] = wrong
            g = await _one(self.generator, prompt + kept, _seed(seed, r + 1))
            g.meta.update(round=r + 1, kept=kept)
            trace.append(g)
            text = kept + g.text
        last = trace[-1]
        final_text, final = (best_text, best_gen) if self.keep_best and attempts[-1]["first_wrong_step"] is not None \
            else (text, last)
        final_score = best_score if final is best_gen else attempts[-1]["score"]
        return Generation(text=final_text, token_ids=[], finish_reason=final.finish_reason,
                          usage=Usage.total(x.usage for x in trace) + scorer_usage, score=final_score, trace=trace,
                          meta={"strategy": self.strategy, "rounds": len(trace) - 1, "attempts": attempts,
                                "fixed": attempts[-1]["first_wrong_step"] is None})
