"""Parallel meta-generators: sample N, then aggregate (majority, best-of-N, weighted
vote, MBR, rejection, oracle, universal self-consistency)."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import SettingError
from ..params import SamplingParams
from .core import ALL_ADAPTERS, STRATEGIES, Context, Strategy, _given, _nested, build, register, samples
from .token_level import _sample


# -- parallel meta-generators ---------------------------------------------------------------
def _inner(lm, p, s, ctx):
    """The generator a parallel method draws its samples from: sampling, or with
    ``--set over=NAME`` any registered strategy (majority vote over speculative
    sampling, best-of-N over beam search), built by the registry with the same
    sampling parameters and the settings given as ``over.KEY=VALUE``; the inner
    strategy refuses what it cannot honour, by name."""
    if "over" not in s:
        return _sample(lm, p, s, ctx)
    inner = _nested(s, "over")
    if s["over"] in STRATEGIES and not STRATEGIES[s["over"]].inner:
        raise SettingError(f"--set over={s['over']}: a parallel method cannot draw its samples from "
                           f"{s['over']}; choose a token-level strategy (sample, beam, speculative, ...)")
    return build(s["over"], lm, p, inner, ctx)


def _majority(lm, p, s, ctx):
    from ..meta.parallel import MajorityVote

    return MajorityVote(_inner(lm, p, s, ctx), ctx.task.extract_answer, **_given(s, n="samples"))


def _outcome_scorer(name: str, lm: Any, s: dict[str, Any], ctx: Context) -> Any:
    """--set scorer=reward (the --reward-model), logprob (mean token log-probability under
    the policy) or judge (the policy model grades each answer, LLM-as-judge)."""
    kind = s.get("scorer", "reward")
    if kind == "reward":
        if ctx.reward_model is None:
            raise SettingError(f"--strategy {name} needs --reward-model, or --set scorer=logprob|judge")
        return ctx.reward_model
    if kind == "logprob":
        from ..scoring.logprob import SequenceLogprob

        return SequenceLogprob(lm, "mean")
    if kind == "judge":
        from ..scoring.judge import LLMJudge

        return LLMJudge(lm, **_given(s, samples="judge_samples"))
    raise SettingError(f"scorer must be reward (--reward-model), logprob or judge; got {kind!r}")


def _best_of_n(lm, p, s, ctx):
    from ..meta.parallel import BestOfN

    return BestOfN(_inner(lm, p, s, ctx), _outcome_scorer("best-of-n", lm, s, ctx), **_given(s, n="samples"))


def _weighted(lm, p, s, ctx):
    from ..meta.parallel import WeightedMajorityVote

    weight = s.get("weight", "reward")
    if weight == "reward" and ctx.reward_model is None:
        raise SettingError("--strategy weighted-majority with weight=reward needs --reward-model (or --set weight=logprob)")
    return WeightedMajorityVote(_inner(lm, p, s, ctx), ctx.task.extract_answer, ctx.reward_model,
                                **_given(s, n="samples", weight="weight"))


def _mbr(lm, p, s, ctx):
    from ..meta.parallel import MinimumBayesRisk
    from ..scoring.utility import utility_named

    utility = utility_named(s.get("utility", "exact"), ctx.task.extract_answer)
    return MinimumBayesRisk(_inner(lm, p, s, ctx), utility, **_given(s, n="samples"))


def _rejection(lm, p, s, ctx):
    from ..meta.parallel import RejectionSampling

    return RejectionSampling(_inner(lm, p, s, ctx), _outcome_scorer("rejection", lm, s, ctx),
                             **_given(s, n="samples", threshold="threshold", batch="batch"))


def _oracle(lm, p, s, ctx):
    from ..meta.parallel import OracleSampling
    from ..scoring.verifiers import AnswerVerifier

    return OracleSampling(_inner(lm, p, s, ctx), AnswerVerifier(ctx.task), **_given(s, n="samples", batch="batch"))


def _usc(lm, p, s, ctx):
    from ..meta.parallel import UniversalSelfConsistency

    return UniversalSelfConsistency(_inner(lm, p, s, ctx), **_given(s, n="samples"))


# a parallel method draws its samples from a token-level strategy, never from another one
_PARALLEL = dict(adapters=ALL_ADAPTERS, constraint=True, meta=True, access="text", inner=False)
register(Strategy("majority", _majority, "self-consistency: majority vote over N samples (Wang et al. 2023); --set over=NAME draws them from another strategy (e.g. speculative, beam-sample), its settings as over.KEY=V",
                  (samples(), "over"), needs=("task",), **_PARALLEL))
register(Strategy("best-of-n", _best_of_n, "best of N samples by a scorer (Stiennon et al. 2020): --set "
                  "scorer=reward (--reward-model)|logprob|judge (the model grades, judge_samples=K)",
                  (samples(), "over", "scorer", "judge_samples"), scored=True, **_PARALLEL))
register(Strategy("weighted-majority", _weighted, "majority vote weighted by --reward-model scores or, with --set "
                  "weight=logprob, by sequence probability (Li et al. 2023)", (samples(), "over", "weight"),
                  needs=("task",), scored=True, **_PARALLEL))
register(Strategy("mbr", _mbr, "minimum Bayes risk over N samples, --set utility=exact|edit|bleu|chrf "
                  "(Bertsch et al. 2023)", (samples(), "over", "utility"), needs=("task",), **_PARALLEL))
register(Strategy("rejection", _rejection, "rejection sampling: draw --set batch=B at a time until the "
                  "score (--set scorer=reward|logprob|judge) reaches --set threshold=T, up to N",
                  (samples(), "over", "threshold", "batch", "scorer", "judge_samples"), scored=True, **_PARALLEL))
register(Strategy("oracle", _oracle, "repeated sampling until the task's exact verifier accepts (coverage, "
                  "pass@k; Brown et al. 2024): an upper bound, it reads the answer", (samples(), "over", "batch"),
                  needs=("task",), **_PARALLEL))
register(Strategy("usc", _usc, "universal self-consistency: the model picks the consensus of N samples "
                  "(Chen et al. 2023)", (samples(8), "over"), **_PARALLEL))
