"""Adaptive meta-generation: spend compute where it pays (adaptive consistency, DeepConf
offline and online, reward-guided speculative decoding, compute-optimal selection)."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import SettingError
from ..params import SamplingParams
from .core import (DEFAULT_POLICY, STRATEGIES, Setting, Strategy, _given, _nested, _remote, build, load_model,
                   policy_candidates, register, samples)
from .parallel import _PARALLEL, _inner
from .refinement import _TEXT
from .step_search import _SEARCH, _step_scorer
from .token_level import _sample


# -- adaptive meta-generation --------------------------------------------------------------
def _adaptive(lm, p, s, ctx):
    from ..meta.adaptive import AdaptiveVote

    weight = s.get("weight", "none")
    if weight == "reward" and ctx.reward_model is None:
        raise SettingError("--strategy adaptive-majority with weight=reward needs --reward-model")
    return AdaptiveVote(_inner(lm, p, s, ctx), ctx.task.extract_answer, scorer=ctx.reward_model if weight == "reward"
                        else None, **_given(s, n="samples", batch="batch", rule="rule", confidence="confidence",
                                            weight="weight"))


def _deepconf(lm, p, s, ctx):
    from ..meta.deepconf import ConfidenceVote

    k = _int_setting(s.get("top_k_confidence", 4), "top_k_confidence")  # the k of the token confidence
    return ConfidenceVote(_inner(lm, p.replace(logprobs=p.logprobs or k), s, ctx), ctx.task.extract_answer,
                          **_given(s, n="samples", keep="keep", window="window", measure="measure"))


def _deepconf_online(lm, p, s, ctx):
    from ..meta.deepconf import OnlineConfidenceVote

    if "over" in s:
        raise SettingError("--strategy deepconf-online draws its own traces (it stops them mid-way); drop over=")
    k = _int_setting(s.get("top_k_confidence", 4), "top_k_confidence")
    pp = p.replace(logprobs=p.logprobs or k)

    def policy(stopper):
        return _sample(lm, pp, {"constraint": stopper} if stopper is not None else {}, ctx)

    eos = (list(getattr(lm, "eos_token_ids", [])) or [None])[0]
    return OnlineConfidenceVote(policy, ctx.task.extract_answer, eos, k=k, in_process=not _remote(lm),
                                **_given(s, n="samples", warmup="warmup", keep="keep", window="window",
                                         consensus="consensus"))


def _int_setting(v: Any, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 20:
        raise SettingError(f"{name} must be an integer in [1, 20]; got {v!r}", name)
    return v


register(Strategy("adaptive-majority", _adaptive, "adaptive consistency (Aggarwal et al. 2023): draw --set batch=B "
                  "samples at a time, up to N, until --set rule=beta|dirichlet|window (ESC, Li et al. 2024) says the "
                  "vote is settled at --set confidence=C; weight=reward votes by --reward-model scores",
                  (samples(), "over", "batch", "rule", "confidence", "weight"), needs=("task",), scored=True,
                  **_PARALLEL))
register(Strategy("deepconf", _deepconf, "confidence-filtered voting (DeepConf offline, Fu et al. 2025): the --set "
                  "keep=F most confident of N samples (measure=lowest|tail|bottom10 group confidence over window=W "
                  "tokens, from the top_k_confidence=K log-probabilities) vote, weighted by confidence",
                  (samples(), "over", "keep", "window", "measure", "top_k_confidence"), needs=("task",),
                  **{**_PARALLEL, "access": "logprobs"}))
register(Strategy("deepconf-online", _deepconf_online, "DeepConf online (Fu et al. 2025): --set warmup=W full "
                  "traces set a confidence threshold (the keep=F most confident); later traces stop the moment their "
                  "window=T group confidence falls below it, and drawing stops at consensus=C, at most N",
                  (samples(), "warmup", "keep", "window", "consensus", "top_k_confidence"), needs=("task",),
                  **{**_PARALLEL, "access": "logprobs", "constraint": False}))

def _rsd(lm, p, s, ctx):
    from ..meta.search.rsd import RewardGuidedSpeculative

    name = s.get("draft_model", "arith-draft")
    draft = load_model(name, "--set draft_model")
    return RewardGuidedSpeculative(lm, _step_scorer("rsd", s, ctx), draft, params=p,
                                   **_given(s, threshold="threshold", max_depth="max_depth"))


register(Strategy("rsd", _rsd, "reward-guided speculative decoding (Liao et al. 2025): --set draft_model=NAME "
                  "(arith-draft) writes each step, the PRM scores it, the model rewrites steps below threshold=T",
                  ("draft_model", "threshold", "max_depth", "scorer"), **_SEARCH))


def _speculative_rejection(lm, p, s, ctx):
    from ..meta.search.speculative_rejection import SpeculativeRejection

    return SpeculativeRejection(lm, _step_scorer("speculative-rejection", s, ctx), params=p,
                                extract_answer=ctx.task.extract_answer if ctx.task is not None else None,
                                **_given(s, n="samples", reject="reject", checkpoints="checkpoints",
                                         keep_min="keep_min", select="select", max_depth="max_depth"))


register(Strategy("speculative-rejection", _speculative_rejection, "early rejection by partial reward (Speculative "
                  "Rejection, Sun et al. 2024): N samples; after each of the first --set checkpoints=C steps the PRM "
                  "stops the reject=F lowest-scored open paths (at least keep_min=K stay); select=best|weighted",
                  (samples(), "reject", "checkpoints", "keep_min", "select", "max_depth", "scorer"), **_SEARCH))


# -- compute-optimal ------------------------------------------------------------------------
def _compute_optimal(lm, p, s, ctx):
    from ..meta.compute_optimal import ComputeOptimal

    policy = s.get("policy", DEFAULT_POLICY)
    if not isinstance(policy, str):
        raise SettingError(f"policy must be BOUND:STRATEGY,... (e.g. 0.25:probe,1:prm-beam); got {policy!r}")
    inner = {}
    for name, base, own in policy_candidates(s):  # NAME#TAG: another candidate of one strategy, its own settings
        if base not in STRATEGIES or base == "compute-optimal":
            raise SettingError(f"policy names {name!r}; choose probe or registered strategies "
                               f"(majority, best-of-n, prm-beam, ...), NAME#TAG for a second one of a kind")
        # NAME.model=M: the candidate runs on another model (a cheap draft's vote is a way to
        # spend compute too), so the policy chooses among every model's strategies
        on = load_model(own.pop("model"), f"--set {name}.model") if "model" in own else lm
        inner[name] = build(base, on, p, own, ctx)
    scorer = ctx.reward_model if s.get("difficulty") == "reward" else None
    probe = _sample(lm, p, s, ctx)
    if "probe_with" in s:  # a strategy's output as the probe (e.g. rsd): its settings as probe_with.KEY=V
        name = s["probe_with"]
        if name not in STRATEGIES or name == "compute-optimal":
            raise SettingError(f"probe_with must name a registered strategy other than compute-optimal; got {name!r}")
        own = _nested(s, "probe_with")
        pp = p.replace(temperature=float(own.pop("temperature"))) if "temperature" in own else p  # rsd greedy, say
        probe = build(name, lm, pp, own, ctx)
    return ComputeOptimal(probe, ctx.task.extract_answer, inner, policy=policy,
                          **_given(s, probe_n="probe", difficulty="difficulty"), scorer=scorer)


register(Strategy("compute-optimal", _compute_optimal, "compute-optimal selection (Snell et al. 2024): --set probe=K "
                  "samples estimate difficulty (difficulty=agreement|reward), then --set policy=0.25:probe,"
                  "0.5:best-of-n,1:prm-beam runs the named strategy (settings as NAME.KEY=V, NAME.model=M to run it on another "
                  "model; samples=N for all); votes "
                  "and best-of-N count the probe's samples as their first; probe_with=NAME probes with a strategy",
                  (Setting("probe", int, "probe samples", lo=1, default=4, spends=True), "probe_with", "difficulty",
                   "policy", "samples"), nested=("policy", "probe_with"), needs=("task",), scored=True, **_TEXT))
