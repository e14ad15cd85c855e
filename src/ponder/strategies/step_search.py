"""Step-level searches over a text-only policy, scored by a PRM or a step checker."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import SettingError
from ..params import SamplingParams
from .core import ALL_ADAPTERS, Context, Setting, Strategy, _given, register, samples


# -- step-level search ----------------------------------------------------------------------
def _reward_or_exact(name: str, key: str, s: dict[str, Any], ctx: Context, choices: tuple[str, str],
                     use_reward: Callable[[Any], Any], make_exact: Callable[[Any], Any]) -> Any:
    """The scorer ``--set KEY=`` names: the reward model (``choices[0]``, from
    --reward-model) or the task's exact checker (``choices[1]``)."""
    reward, exact = choices
    kind = s.get(key, reward)
    if kind == reward:
        if ctx.reward_model is None:
            raise SettingError(f"--strategy {name} needs --reward-model, or --set {key}={exact} "
                               "(the task's exact checker)")
        return use_reward(ctx.reward_model)
    if kind == exact:
        if ctx.task is None:
            raise SettingError(f"--strategy {name} with {key}={exact} needs a task (ponder eval --task NAME)")
        return make_exact(ctx.task)
    raise SettingError(f"{key} must be {reward} (--reward-model) or {exact} (the task's exact checker); got {kind!r}",
                       key)


def _step_scorer(name: str, s: dict[str, Any], ctx: Context) -> Any:
    from ..scoring.verifiers import StepVerifier

    return _reward_or_exact(name, "scorer", s, ctx, ("prm", "steps"), lambda rm: rm.prm("last"), StepVerifier)


def _search(cls_path: str, name: str, **names: str):
    def factory(lm, p, s, ctx):
        import importlib

        module, cls = cls_path.rsplit(".", 1)
        search = getattr(importlib.import_module(module), cls)
        return search(lm, _step_scorer(name, s, ctx), params=p,
                      **_given(s, n="samples", max_depth="max_depth", refine="refine", refine_threshold="refine_threshold",
                               **names))

    return factory


# a step-level search is scored (its result depends on the reward model unless scorer=steps)
_SEARCH = dict(adapters=ALL_ADAPTERS, options=("stop", "stop_token_ids", "ignore_eos"), access="text", scored=True)
# every step-level search can redraw low-scored steps in place (refinement inside the tree)
_REFINE = (Setting("refine", int, "redraws of a low-scored step", lo=0),
           Setting("refine_threshold", float, "a step scored below this is redrawn", lo=0.0, hi=1.0))
register(Strategy("prm-beam", _search("ponder.meta.search.beam.PRMBeamSearch", "prm-beam", beam_width="beam_width"),
                  "PRM beam search over steps (Snell et al. 2024): N paths, keep N/M, expand each M; --set beam_width=M "
                  "scorer=prm|steps", (samples(), "beam_width", "max_depth", "scorer", *_REFINE), **_SEARCH))
register(Strategy("dvts", _search("ponder.meta.search.dvts.DVTS", "dvts", beam_width="beam_width"),
                  "diverse verifier tree search (Beeching et al. 2024): N/M independent greedy beams of width M",
                  (samples(), "beam_width", "max_depth", "scorer", *_REFINE), **_SEARCH))
register(Strategy("rebase", _search("ponder.meta.search.rebase.REBASE", "rebase", temperature="balance_temperature",
                                    select="select"),
                  "REBASE (Wu et al. 2024): each depth's budget split by softmax(score / T); --set "
                  "balance_temperature=T", (samples(), "max_depth", "scorer", "balance_temperature", "select", *_REFINE),
                  **_SEARCH))
register(Strategy("lookahead", _search("ponder.meta.search.lookahead.LookaheadSearch", "lookahead",
                                       beam_width="beam_width", lookahead="lookahead"),
                  "lookahead search (Snell et al. 2024): PRM beam search valuing each step by a greedy rollout of "
                  "--set lookahead=K more steps", (samples(), "beam_width", "lookahead", "max_depth", "scorer", *_REFINE),
                  **_SEARCH))
register(Strategy("tot-bfs", _search("ponder.meta.search.tot.TreeOfThoughtsBFS", "tot-bfs", breadth="breadth", k="k"),
                  "tree of thoughts, breadth-first (Yao et al. 2023): keep --set breadth=B states, k proposals each",
                  (Setting("breadth", int, "states kept", lo=1, default=4, spends=True), "k", "max_depth", "scorer",
                   *_REFINE), **_SEARCH))
register(Strategy("tot-dfs", _search("ponder.meta.search.tot.TreeOfThoughtsDFS", "tot-dfs", k="k",
                                     threshold="threshold", max_expansions="max_expansions"),
                  "tree of thoughts, depth-first (Yao et al. 2023): best proposal first, prune below --set "
                  "threshold=V, backtrack", ("k", "threshold", Setting("max_expansions", int, "proposals expanded", lo=1, default=32,
                                                                         spends=True), "max_depth", "scorer", *_REFINE),
                  **_SEARCH))
register(Strategy("particles", _search("ponder.meta.search.particles.ParticleFilter", "particles",
                                       temperature="balance_temperature"),
                  "particle filtering over steps (Puri et al. 2025): N particles resampled by softmax(PRM / T) after "
                  "each step", (samples(), "max_depth", "scorer", "balance_temperature", *_REFINE), **_SEARCH))


def _mcts(lm, p, s, ctx):
    from ..meta.search.mcts import MCTS

    # A rollout scorer whenever one is at hand (the reward model as an ORM): MCTS then
    # values nodes by PRM and rollout ("both", its default with a rollout scorer)
    rollout = None
    if s.get("value") != "prm":
        kind = s.get("rollout_scorer", "orm")
        if kind == "orm":
            if ctx.reward_model is None and s.get("value") is not None:
                raise SettingError("--strategy mcts with value=rollout|both needs --reward-model (an ORM) or "
                                   "--set rollout_scorer=verifier (the task's exact answer checker)")
            rollout = ctx.reward_model
        elif kind == "verifier":
            from ..scoring.verifiers import AnswerVerifier

            if ctx.task is None:
                raise SettingError("rollout_scorer=verifier needs a task (ponder eval --task NAME)")
            rollout = AnswerVerifier(ctx.task)
        else:
            raise SettingError(f"rollout_scorer must be orm or verifier; got {kind!r}")
    return MCTS(lm, _step_scorer("mcts", s, ctx), params=p, rollout_scorer=rollout,
                **_given(s, iterations="iterations", width="width", c="c", value="value", max_depth="max_depth",
                         refine="refine", refine_threshold="refine_threshold"))


register(Strategy("mcts", _mcts, "Monte Carlo tree search over steps, UCT (Hao et al. 2023): --set iterations=I "
                  "width=W c=C value=prm|rollout|both (default both with a reward model) rollout_scorer=orm|verifier",
                  (Setting("iterations", int, "simulations", lo=1, default=16, spends=True), "width", "c", "value",
                   "rollout_scorer", "max_depth", "scorer", *_REFINE), **_SEARCH))
