"""Chains, tools and refinement."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import SettingError
from ..params import SamplingParams
from .core import ALL_ADAPTERS, Context, Setting, Strategy, _given, register
from .parallel import _inner
from .step_search import _reward_or_exact, _step_scorer
from .token_level import _greedy


# -- chains, tools and refinement -----------------------------------------------------------
def _cot(lm, p, s, ctx):
    from ..meta.chain import ChainOfThought

    return ChainOfThought(_inner(lm, p, s, ctx), ctx.task.extract_answer, **_given(s, cue="cue", trigger="trigger"))


def _tool_use(lm, p, s, ctx):
    from ..meta.chain import ToolUse
    from ..meta.tools import Calculator, PythonSandbox

    known = {"calc": Calculator, "python": PythonSandbox}
    names = s.get("tools", "calc")
    names = [t.strip() for t in (names.split(",") if isinstance(names, str) else [])]
    if not names or any(t not in known for t in names):
        raise SettingError(f"tools must be a comma-separated list of {', '.join(known)}; got {s.get('tools')!r}")
    return ToolUse(lm, {t: known[t]() for t in names}, params=p, **_given(s, max_calls="max_calls"))


def _evaluator(name: str, s: dict[str, Any], ctx: Context) -> Any:
    from ..scoring.verifiers import AnswerVerifier

    return _reward_or_exact(name, "evaluator", s, ctx, ("reward", "verifier"), lambda rm: rm, AnswerVerifier)


def _self_refine(lm, p, s, ctx):
    from ..meta.refine import SelfRefine

    return SelfRefine(_inner(lm, p, s, ctx), **_given(s, rounds="rounds", feedback_template="feedback_template",
                                                      revise_template="revise_template"))


def _reflexion(lm, p, s, ctx):
    from ..meta.refine import Reflexion

    return Reflexion(_inner(lm, p, s, ctx), _evaluator("reflexion", s, ctx),
                     **_given(s, trials="trials", threshold="threshold", memory="memory",
                              attempt_template="attempt_template", reflect_template="reflect_template",
                              memory_template="memory_template"))


def _refine_steps(lm, p, s, ctx):
    from ..meta.refine import StepFeedbackRefine

    first = s.get("first", "greedy")
    if first not in ("greedy", "sample"):
        raise SettingError(f"first (the first attempt) must be greedy or sample; got {first!r}")
    if p.greedy:
        raise SettingError("--strategy refine-steps redraws from the first wrong step by sampling: "
                           "--temperature must be > 0 (the first attempt is greedy unless --set first=sample)")
    retry = _inner(lm, p, s, ctx)
    opening = _greedy(lm, p, s, ctx) if first == "greedy" else None
    return StepFeedbackRefine(retry, _step_scorer("refine-steps", s, ctx), first=opening,
                              **_given(s, rounds="rounds", threshold="threshold"))


# a refinement method works on whole answers: a parallel method does not draw from it
_TEXT = dict(adapters=ALL_ADAPTERS, meta=True, access="text", inner=False)
register(Strategy("cot", _cot, "zero-shot chain-of-thought with answer extraction (Kojima et al. 2022): --set "
                  "cue=TEXT trigger=TEXT; over=NAME", ("over", "cue", "trigger"), needs=("task",), **_TEXT))
register(Strategy("tool-use", _tool_use, "inline tool calls <calc>..</calc>, <python>..</python> (sandboxed), "
                  "results appended as <output>: --set tools=calc,python max_calls=K",
                  ("tools", "max_calls"), **_TEXT))
register(Strategy("self-refine", _self_refine, "Self-Refine (Madaan et al. 2023): the model critiques, then "
                  "revises, --set rounds=R feedback_template=.. revise_template=..",
                  ("over", Setting("rounds", int, "critique-and-revise rounds", lo=1, default=2, spends=True),
                   "feedback_template", "revise_template"), **_TEXT))
register(Strategy("reflexion", _reflexion, "Reflexion (Shinn et al. 2023): attempts judged by --set "
                  "evaluator=reward|verifier at threshold=T; reflections kept as memory=M across trials=K",
                  ("over", "evaluator", Setting("trials", int, "attempts", lo=1, default=3, spends=True), "threshold",
                   "memory", "attempt_template", "reflect_template", "memory_template"), scored=True, **_TEXT))
register(Strategy("refine-steps", _refine_steps, "refinement from a step checker (--set scorer=prm|steps): keep "
                  "the steps before the first one below threshold=T, sample the rest again, up to rounds=R",
                  ("over", "scorer", Setting("rounds", int, "resampling rounds", lo=1, default=4, spends=True),
                   "threshold", "first"), scored=True, **_TEXT))
