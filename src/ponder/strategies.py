"""Strategies by name: the registry the CLI (``--strategy``) and ``ponder eval`` use.

A strategy is a factory ``(lm, params, settings, ctx) -> generator``: ``params`` is a
``SamplingParams`` (the token-level settings every strategy shares), ``settings`` the
strategy's own (``num_beams``, ``samples``...), given as flags or ``--set key=value``.
Each registration says which sampling adapters, history processors and options the
strategy honours; ``build`` refuses the rest, naming them, so that nothing the user
set is silently ignored. Defaults live once, in the generator classes: a factory
passes only what was given.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .errors import SettingError
from .params import SamplingParams

ALL_ADAPTERS = ("temperature", "top_k", "top_p", "min_p", "typical_p", "epsilon", "eta", "top_n_sigma", "mirostat",
                "mirostat_tau", "mirostat_eta")
ALL_OPTIONS = ("stop", "stop_token_ids", "ignore_eos", "token_healing", "logprobs")
# Constraints, given by name on the CLI; a strategy takes them if it says so.
CONSTRAINT_SETTINGS = ("json_schema", "regex", "grammar", "choice")


@dataclass
class Strategy:
    name: str
    factory: Callable[..., Any]
    help: str
    settings: tuple[str, ...] = ()  # its own settings
    adapters: tuple[str, ...] = ()  # the sampling adapters it honours
    history: bool = True  # penalties, biases, bans
    options: tuple[str, ...] = ALL_OPTIONS  # stops and token healing it honours
    constraint: bool = False
    needs: tuple[str, ...] = ()  # e.g. ("task",) or ("reward_model",)
    meta: bool = False  # draws several candidates per problem (eval reports pass@N)
    access: str = "logits"  # the lowest access level its policy needs: text, logprobs or logits
    nested: tuple[str, ...] = ("over",)  # settings NAME whose value's own settings come as NAME.KEY=V


@dataclass
class Context:
    """What a strategy may need besides the model and its settings."""

    task: Any = None
    reward_model: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


STRATEGIES: dict[str, Strategy] = {}


def register(strategy: Strategy) -> None:
    STRATEGIES[strategy.name] = strategy


def _flags(names: list[str]) -> str:
    return ", ".join("--" + k.replace("_", "-") for k in names)


def build(name: str, lm: Any, params: SamplingParams | None = None, settings: dict[str, Any] | None = None,
          ctx: Context | None = None) -> Any:
    """Make the generator for strategy ``name``. Unknown names and settings, and
    settings the strategy cannot honour, are errors that say what is legal."""
    if name not in STRATEGIES:
        raise SettingError(f"--strategy {name!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    st = STRATEGIES[name]
    params = params or SamplingParams()
    ctx = ctx or Context()
    from .protocols import Access, require_access

    require_access(lm, Access[st.access.upper()], f"--strategy {name}")
    if _remote(lm):
        lm.check(params)  # settings a server cannot honour, by name, before anything runs
    for need in st.needs:
        if getattr(ctx, need) is None:
            raise SettingError(f"--strategy {name} needs {'--task' if need == 'task' else '--reward-model'}")
    # temperature 0 means greedy, which a strategy that does not sample already is
    adapters = [k for k in params.changed("adapter") if k not in st.adapters
                and not (k == "temperature" and params.greedy)]
    if adapters:
        hint = "; use --strategy sample" if name == "greedy" else ""
        raise SettingError(f"--strategy {name} does not take {_flags(adapters)}{hint}")
    if params.changed("history") and not st.history:
        raise SettingError(f"--strategy {name} does not take {_flags(list(params.changed('history')))}")
    options = [k for k in params.changed("option") if k in ALL_OPTIONS and k not in st.options]
    if options:
        raise SettingError(f"--strategy {name} does not take {_flags(options)}")
    settings = {k: v for k, v in (settings or {}).items() if v is not None}
    given = {k: settings.pop(k) for k in CONSTRAINT_SETTINGS if k in settings}
    if given:  # an empty pattern is an error, not "no constraint"
        if not st.constraint:
            raise SettingError(f"--strategy {name} does not take a constraint (--json-schema, --regex, --grammar, --choice)")
        if _remote(lm):  # before any grammar is compiled against a tokenizer the model may not have
            raise SettingError(f"a constraint ({', '.join('--' + k.replace('_', '-') for k in given)}) needs the "
                               f"model's logits, which {getattr(lm, 'endpoint', getattr(lm, 'name', lm))} does not "
                               "give (a remote server is text or logprobs level): run the model in-process "
                               "(native or hf:) or use the server's own structured output")
        from .decoding.constraints import Grammar

        settings["constraint"] = Grammar.from_settings(lm, **given).constraint()
    unknown = [k for k in settings if k not in st.settings and k != "constraint"
               and not ("." in k and _nested_ok(st, settings, k.split(".", 1)[0]))]
    if unknown:
        legal = ", ".join(sorted(st.settings)) or "no settings of its own"
        raise SettingError(f"--strategy {name} does not take {', '.join(unknown)}; it takes {legal}")
    gen = st.factory(lm, params, settings, ctx)
    gen.strategy = st.name  # one name everywhere: the registry, Generation.meta["strategy"], results
    return gen


# -- helpers the factories share ------------------------------------------------------------
def _nested_ok(st: Strategy, settings: dict[str, Any], prefix: str) -> bool:
    """``over.KEY=V`` passes through when the strategy takes ``over``; compute-optimal's
    ``best-of-n.samples=8`` when best-of-n is a strategy its policy names."""
    if prefix in st.nested and prefix in st.settings:
        return True
    # the CLI's --set turns dashes into underscores: best-of-n.samples arrives as best_of_n.samples
    return "policy" in st.nested and prefix.replace("-", "_") in {n.replace("-", "_") for n in _policy_names(settings)}


def _policy_names(settings: dict[str, Any]) -> set[str]:
    policy = settings.get("policy")
    if not isinstance(policy, str):
        return set()
    return {part.partition(":")[2].strip() for part in policy.split(",")}


def _encode(lm: Any) -> Callable[[str], list[int]]:
    return lambda w: lm.encode(w, add_special_tokens=False)


def _token_level(lm: Any, p: SamplingParams, s: dict[str, Any], adapters: bool = True) -> dict[str, Any]:
    """Keyword arguments for a token-level generator: options, history processors, the
    constraint, and (if it samples) the adapters."""
    out = {**p.options(), **p.history(_encode(lm))}
    if adapters:
        out.update(p.adapters())
    if "constraint" in s:
        out["constraint"] = s["constraint"]
    return out


def _given(s: dict[str, Any], **names: str) -> dict[str, Any]:
    """The settings that were given, renamed to the generator's argument names."""
    return {arg: s[key] for arg, key in names.items() if key in s}


def _bool(v: Any, name: str) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("true", "false", "1", "0", "yes", "no"):
        return v.lower() in ("true", "1", "yes")
    if isinstance(v, int) and v in (0, 1):
        return bool(v)
    raise SettingError(f"{name} must be true or false; got {v!r}")


def load_reward_model(name: Any, role: str = "--reward-model") -> Any:
    """A shipped reward model or a checkpoint folder; errors name ``role``."""
    from .scoring.reward import RewardModel

    if not isinstance(name, str) or not name:
        raise SettingError(f"{role} must be a reward model name or a checkpoint folder; got {name!r}")
    try:
        return RewardModel.from_pretrained(name)
    except SettingError as e:
        raise SettingError(f"{role}: {e}") from None


def load_endpoint(spec: str, role: str = "--model", **options: Any) -> Any:
    """``URL[,URL...][#MODEL]``: a model behind OpenAI-compatible servers (replicas),
    probed for what it gives; a URL ending in ``/chat/completions`` sends chat requests. ``OPENAI_API_KEY`` is sent if set; ``PONDER_TOKENIZER``
    names the model's tokenizer.json for exact scoring and token counts."""
    import os

    from .backends.openai import OpenAILM, parse_endpoint
    from .errors import BackendError

    try:
        urls, model, chat = parse_endpoint(spec)
        options.setdefault("api_key", os.environ.get("OPENAI_API_KEY") or None)
        options.setdefault("tokenizer", os.environ.get("PONDER_TOKENIZER") or None)
        return OpenAILM(urls, model, chat=chat, **options)
    except (SettingError, BackendError) as e:
        raise SettingError(f"{role}: {e}") from None


def load_model(name: Any, role: str, dtype: str = "float32", **remote: Any) -> Any:
    """A shipped model, a checkpoint folder (a NativeLM), ``hf:NAME_OR_FOLDER`` (the
    same run by transformers, an HFLM), or ``http(s)://...`` (an OpenAI-compatible
    endpoint, ``URL[,URL...][#MODEL]``, with ``remote`` options for OpenAILM); errors
    say which of the command's models (``role``: --model, --draft-model, ...) it was."""
    from .backends.native import NativeLM

    if not isinstance(name, str) or not name:
        raise SettingError(f"{role} must be a model name or a checkpoint folder; got {name!r}")
    if dtype not in ("float32", "bfloat16"):
        raise SettingError(f"--dtype must be one of float32, bfloat16; got {dtype!r}")
    if name.startswith(("http://", "https://")):
        return load_endpoint(name, role, **remote)
    if remote:
        raise SettingError(f"{role}: {', '.join(sorted(remote))} applies to a remote model (a URL) only")
    try:
        if name.startswith("hf:"):  # the same checkpoint run by transformers (extra `hf`)
            if not name[3:]:
                raise SettingError("hf: takes a checkpoint folder or a shipped model's name after it "
                                   "(hf:/path/to/model, hf:arith)")
            from .backends.hf import HFLM

            return HFLM.from_pretrained(name[3:], dtype=dtype)
        return NativeLM.from_pretrained(name, dtype=dtype)
    except SettingError as e:
        raise SettingError(f"{role}: {e}") from None


def _floats(v: Any, name: str) -> list[float]:
    items = v if isinstance(v, (list, tuple)) else str(v).split(",")
    try:
        return [float(x) for x in items if str(x).strip()]
    except ValueError:
        raise SettingError(f"{name} must be comma-separated numbers; got {v!r}") from None


# -- token level ----------------------------------------------------------------------------
def _remote(lm: Any) -> bool:
    """A backend below the logits level (an OpenAI-compatible server): its server runs
    the token-level loop, so greedy and sampling are a request with the parameters."""
    from .protocols import Access

    return getattr(lm, "access", Access.LOGITS) < Access.LOGITS


def _text(lm, p, s):
    from .decoding.text import TextGenerator

    return TextGenerator(lm, p)


def _greedy(lm, p, s, ctx):
    from .decoding.generate import Greedy

    if _remote(lm):
        return _text(lm, p.replace(temperature=0.0), s)
    return Greedy(lm, **_token_level(lm, p, s, adapters=False))


def _sample(lm, p, s, ctx):
    from .decoding.generate import Greedy, Sample

    if _remote(lm):
        return _text(lm, p, s)
    if p.greedy:  # temperature 0: greedy decoding (the OpenAI convention)
        return Greedy(lm, **_token_level(lm, p, s, adapters=False))
    return Sample(lm, **_token_level(lm, p, s))


register(Strategy("greedy", _greedy, "argmax at every step", constraint=True, access="text"))
register(Strategy("sample", _sample, "ancestral sampling through temperature/top-k/top-p/min-p/typical/epsilon/eta/"
                  "top-n-sigma/mirostat", adapters=ALL_ADAPTERS, constraint=True, access="text"))


# -- parallel meta-generators ---------------------------------------------------------------
def _inner(lm, p, s, ctx):
    """The generator a parallel method draws its samples from: sampling, or with
    ``--set over=NAME`` any registered strategy (majority vote over speculative
    sampling, best-of-N over beam search), built by the registry with the same
    sampling parameters and the settings given as ``over.KEY=VALUE``; the inner
    strategy refuses what it cannot honour, by name."""
    if "over" not in s:
        return _sample(lm, p, s, ctx)
    inner = {k[len("over."):]: v for k, v in s.items() if k.startswith("over.")}
    if s["over"] in _NOT_INNER:
        raise SettingError(f"--set over={s['over']}: a parallel method cannot draw its samples from "
                           f"{s['over']}; choose a token-level strategy (sample, beam, speculative, ...)")
    return build(s["over"], lm, p, inner, ctx)


def _majority(lm, p, s, ctx):
    from .meta.parallel import MajorityVote

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
        from .scoring.logprob import SequenceLogprob

        return SequenceLogprob(lm, "mean")
    if kind == "judge":
        from .scoring.judge import LLMJudge

        return LLMJudge(lm, **_given(s, samples="judge_samples"))
    raise SettingError(f"scorer must be reward (--reward-model), logprob or judge; got {kind!r}")


def _best_of_n(lm, p, s, ctx):
    from .meta.parallel import BestOfN

    return BestOfN(_inner(lm, p, s, ctx), _outcome_scorer("best-of-n", lm, s, ctx), **_given(s, n="samples"))


def _weighted(lm, p, s, ctx):
    from .meta.parallel import WeightedMajorityVote

    weight = s.get("weight", "reward")
    if weight == "reward" and ctx.reward_model is None:
        raise SettingError("--strategy weighted-majority with weight=reward needs --reward-model (or --set weight=logprob)")
    return WeightedMajorityVote(_inner(lm, p, s, ctx), ctx.task.extract_answer, ctx.reward_model,
                                **_given(s, n="samples", weight="weight"))


def _adaptive(lm, p, s, ctx):
    from .meta.adaptive import AdaptiveVote

    weight = s.get("weight", "none")
    if weight == "reward" and ctx.reward_model is None:
        raise SettingError("--strategy adaptive-majority with weight=reward needs --reward-model")
    return AdaptiveVote(_inner(lm, p, s, ctx), ctx.task.extract_answer, scorer=ctx.reward_model if weight == "reward"
                        else None, **_given(s, n="samples", batch="batch", rule="rule", confidence="confidence",
                                            weight="weight"))


def _deepconf(lm, p, s, ctx):
    from .meta.deepconf import ConfidenceVote

    k = _int_setting(s.get("top_k_confidence", 4), "top_k_confidence")  # the k of the token confidence
    return ConfidenceVote(_inner(lm, p.replace(logprobs=p.logprobs or k), s, ctx), ctx.task.extract_answer,
                          **_given(s, n="samples", keep="keep", window="window", measure="measure"))


def _deepconf_online(lm, p, s, ctx):
    from .meta.deepconf import OnlineConfidenceVote

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
        raise SettingError(f"{name} must be an integer in [1, 20]; got {v!r}")
    return v


def _mbr(lm, p, s, ctx):
    from .meta.parallel import MinimumBayesRisk
    from .scoring.utility import utility_named

    utility = utility_named(s.get("utility", "exact"), ctx.task.extract_answer)
    return MinimumBayesRisk(_inner(lm, p, s, ctx), utility, **_given(s, n="samples"))


def _rejection(lm, p, s, ctx):
    from .meta.parallel import RejectionSampling

    return RejectionSampling(_inner(lm, p, s, ctx), _outcome_scorer("rejection", lm, s, ctx),
                             **_given(s, n="samples", threshold="threshold", batch="batch"))


def _oracle(lm, p, s, ctx):
    from .meta.parallel import OracleSampling
    from .scoring.verifiers import AnswerVerifier

    return OracleSampling(_inner(lm, p, s, ctx), AnswerVerifier(ctx.task), **_given(s, n="samples", batch="batch"))


def _usc(lm, p, s, ctx):
    from .meta.parallel import UniversalSelfConsistency

    return UniversalSelfConsistency(_inner(lm, p, s, ctx), **_given(s, n="samples"))


_PARALLEL = dict(adapters=ALL_ADAPTERS, constraint=True, meta=True, access="text")
_NOT_INNER = ("majority", "best-of-n", "weighted-majority", "mbr", "rejection", "oracle", "usc", "cot", "tool-use",
              "self-refine", "reflexion", "refine-steps", "compute-optimal")
register(Strategy("majority", _majority, "self-consistency: majority vote over N samples (Wang et al. 2023); --set over=NAME draws them from another strategy (e.g. speculative, beam-sample), its settings as over.KEY=V",
                  ("samples", "over"), needs=("task",), **_PARALLEL))
register(Strategy("best-of-n", _best_of_n, "best of N samples by a scorer (Stiennon et al. 2020): --set "
                  "scorer=reward (--reward-model)|logprob|judge (the model grades, judge_samples=K)",
                  ("samples", "over", "scorer", "judge_samples"), **_PARALLEL))
register(Strategy("weighted-majority", _weighted, "majority vote weighted by --reward-model scores or, with --set "
                  "weight=logprob, by sequence probability (Li et al. 2023)", ("samples", "over", "weight"),
                  needs=("task",), **_PARALLEL))
register(Strategy("adaptive-majority", _adaptive, "adaptive consistency (Aggarwal et al. 2023): draw --set batch=B "
                  "samples at a time, up to N, until --set rule=beta|dirichlet|window (ESC, Li et al. 2024) says the "
                  "vote is settled at --set confidence=C; weight=reward votes by --reward-model scores",
                  ("samples", "over", "batch", "rule", "confidence", "weight"), needs=("task",), **_PARALLEL))
register(Strategy("deepconf", _deepconf, "confidence-filtered voting (DeepConf offline, Fu et al. 2025): the --set "
                  "keep=F most confident of N samples (measure=lowest|tail|bottom10 group confidence over window=W "
                  "tokens, from the top_k_confidence=K log-probabilities) vote, weighted by confidence",
                  ("samples", "over", "keep", "window", "measure", "top_k_confidence"), needs=("task",),
                  **{**_PARALLEL, "access": "logprobs"}))
register(Strategy("deepconf-online", _deepconf_online, "DeepConf online (Fu et al. 2025): --set warmup=W full "
                  "traces set a confidence threshold (the keep=F most confident); later traces stop the moment their "
                  "window=T group confidence falls below it, and drawing stops at consensus=C, at most N",
                  ("samples", "warmup", "keep", "window", "consensus", "top_k_confidence"), needs=("task",),
                  **{**_PARALLEL, "access": "logprobs", "constraint": False}))
register(Strategy("mbr", _mbr, "minimum Bayes risk over N samples, --set utility=exact|edit|bleu|chrf "
                  "(Bertsch et al. 2023)", ("samples", "over", "utility"), needs=("task",), **_PARALLEL))
register(Strategy("rejection", _rejection, "rejection sampling: draw --set batch=B at a time until the "
                  "score (--set scorer=reward|logprob|judge) reaches --set threshold=T, up to N",
                  ("samples", "over", "threshold", "batch", "scorer", "judge_samples"), **_PARALLEL))
register(Strategy("oracle", _oracle, "repeated sampling until the task's exact verifier accepts (coverage, "
                  "pass@k; Brown et al. 2024): an upper bound, it reads the answer", ("samples", "over", "batch"),
                  needs=("task",), **_PARALLEL))
register(Strategy("usc", _usc, "universal self-consistency: the model picks the consensus of N samples "
                  "(Chen et al. 2023)", ("samples", "over"), **_PARALLEL))


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
    raise SettingError(f"{key} must be {reward} (--reward-model) or {exact} (the task's exact checker); got {kind!r}")


def _step_scorer(name: str, s: dict[str, Any], ctx: Context) -> Any:
    from .scoring.verifiers import StepVerifier

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


_SEARCH = dict(adapters=ALL_ADAPTERS, options=("stop", "stop_token_ids", "ignore_eos"), access="text")
register(Strategy("prm-beam", _search("ponder.meta.search.beam.PRMBeamSearch", "prm-beam", beam_width="beam_width"),
                  "PRM beam search over steps (Snell et al. 2024): N paths, keep N/M, expand each M; --set beam_width=M "
                  "scorer=prm|steps", ("samples", "beam_width", "max_depth", "scorer"), **_SEARCH))
register(Strategy("dvts", _search("ponder.meta.search.dvts.DVTS", "dvts", beam_width="beam_width"),
                  "diverse verifier tree search (Beeching et al. 2024): N/M independent greedy beams of width M",
                  ("samples", "beam_width", "max_depth", "scorer"), **_SEARCH))
register(Strategy("rebase", _search("ponder.meta.search.rebase.REBASE", "rebase", temperature="balance_temperature",
                                    select="select"),
                  "REBASE (Wu et al. 2024): each depth's budget split by softmax(score / T); --set "
                  "balance_temperature=T", ("samples", "max_depth", "scorer", "balance_temperature", "select"),
                  **_SEARCH))
register(Strategy("lookahead", _search("ponder.meta.search.lookahead.LookaheadSearch", "lookahead",
                                       beam_width="beam_width", lookahead="lookahead"),
                  "lookahead search (Snell et al. 2024): PRM beam search valuing each step by a greedy rollout of "
                  "--set lookahead=K more steps", ("samples", "beam_width", "lookahead", "max_depth", "scorer"),
                  **_SEARCH))
register(Strategy("tot-bfs", _search("ponder.meta.search.tot.TreeOfThoughtsBFS", "tot-bfs", breadth="breadth", k="k"),
                  "tree of thoughts, breadth-first (Yao et al. 2023): keep --set breadth=B states, k proposals each",
                  ("breadth", "k", "max_depth", "scorer"), **_SEARCH))
register(Strategy("tot-dfs", _search("ponder.meta.search.tot.TreeOfThoughtsDFS", "tot-dfs", k="k",
                                     threshold="threshold", max_expansions="max_expansions"),
                  "tree of thoughts, depth-first (Yao et al. 2023): best proposal first, prune below --set "
                  "threshold=V, backtrack", ("k", "threshold", "max_expansions", "max_depth", "scorer"), **_SEARCH))
register(Strategy("particles", _search("ponder.meta.search.particles.ParticleFilter", "particles",
                                       temperature="balance_temperature"),
                  "particle filtering over steps (Puri et al. 2025): N particles resampled by softmax(PRM / T) after "
                  "each step", ("samples", "max_depth", "scorer", "balance_temperature"), **_SEARCH))


def _mcts(lm, p, s, ctx):
    from .meta.search.mcts import MCTS

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
            from .scoring.verifiers import AnswerVerifier

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
                  ("iterations", "width", "c", "value", "rollout_scorer", "max_depth", "scorer"), **_SEARCH))


def _rsd(lm, p, s, ctx):
    from .meta.search.rsd import RewardGuidedSpeculative

    name = s.get("draft_model", "arith-draft")
    draft = load_model(name, "--set draft_model")
    return RewardGuidedSpeculative(lm, _step_scorer("rsd", s, ctx), draft, params=p,
                                   **_given(s, threshold="threshold", max_depth="max_depth"))


register(Strategy("rsd", _rsd, "reward-guided speculative decoding (Liao et al. 2025): --set draft_model=NAME "
                  "(arith-draft) writes each step, the PRM scores it, the model rewrites steps below threshold=T",
                  ("draft_model", "threshold", "max_depth", "scorer"), **_SEARCH))


# -- controlled generation with several models ------------------------------------------------
# refinement inside the tree: every step-level search can redraw low-scored steps in place
_SEARCHES = ("prm-beam", "dvts", "rebase", "lookahead", "tot-bfs", "tot-dfs", "particles", "mcts")  # not rsd
for _name in _SEARCHES:
    STRATEGIES[_name].settings += ("refine", "refine_threshold")


# -- chains, tools and refinement -----------------------------------------------------------
def _cot(lm, p, s, ctx):
    from .meta.chain import ChainOfThought

    return ChainOfThought(_inner(lm, p, s, ctx), ctx.task.extract_answer, **_given(s, cue="cue", trigger="trigger"))


def _tool_use(lm, p, s, ctx):
    from .meta.chain import ToolUse
    from .meta.tools import Calculator, PythonSandbox

    known = {"calc": Calculator, "python": PythonSandbox}
    names = s.get("tools", "calc")
    names = [t.strip() for t in (names.split(",") if isinstance(names, str) else [])]
    if not names or any(t not in known for t in names):
        raise SettingError(f"tools must be a comma-separated list of {', '.join(known)}; got {s.get('tools')!r}")
    return ToolUse(lm, {t: known[t]() for t in names}, params=p, **_given(s, max_calls="max_calls"))


def _evaluator(name: str, s: dict[str, Any], ctx: Context) -> Any:
    from .scoring.verifiers import AnswerVerifier

    return _reward_or_exact(name, "evaluator", s, ctx, ("reward", "verifier"), lambda rm: rm, AnswerVerifier)


def _self_refine(lm, p, s, ctx):
    from .meta.refine import SelfRefine

    return SelfRefine(_inner(lm, p, s, ctx), **_given(s, rounds="rounds", feedback_template="feedback_template",
                                                      revise_template="revise_template"))


def _reflexion(lm, p, s, ctx):
    from .meta.refine import Reflexion

    return Reflexion(_inner(lm, p, s, ctx), _evaluator("reflexion", s, ctx),
                     **_given(s, trials="trials", threshold="threshold", memory="memory",
                              attempt_template="attempt_template", reflect_template="reflect_template",
                              memory_template="memory_template"))


def _refine_steps(lm, p, s, ctx):
    from .meta.refine import StepFeedbackRefine

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


_TEXT = dict(adapters=ALL_ADAPTERS, meta=True, access="text")
register(Strategy("cot", _cot, "zero-shot chain-of-thought with answer extraction (Kojima et al. 2022): --set "
                  "cue=TEXT trigger=TEXT; over=NAME", ("over", "cue", "trigger"), needs=("task",), **_TEXT))
register(Strategy("tool-use", _tool_use, "inline tool calls <calc>..</calc>, <python>..</python> (sandboxed), "
                  "results appended as <output>: --set tools=calc,python max_calls=K",
                  ("tools", "max_calls"), **_TEXT))
register(Strategy("self-refine", _self_refine, "Self-Refine (Madaan et al. 2023): the model critiques, then "
                  "revises, --set rounds=R feedback_template=.. revise_template=..",
                  ("over", "rounds", "feedback_template", "revise_template"), **_TEXT))
register(Strategy("reflexion", _reflexion, "Reflexion (Shinn et al. 2023): attempts judged by --set "
                  "evaluator=reward|verifier at threshold=T; reflections kept as memory=M across trials=K",
                  ("over", "evaluator", "trials", "threshold", "memory", "attempt_template", "reflect_template",
                   "memory_template"), **_TEXT))
register(Strategy("refine-steps", _refine_steps, "refinement from a step checker (--set scorer=prm|steps): keep "
                  "the steps before the first one below threshold=T, sample the rest again, up to rounds=R",
                  ("over", "scorer", "rounds", "threshold", "first"), **_TEXT))


# -- compute-optimal ------------------------------------------------------------------------
def _compute_optimal(lm, p, s, ctx):
    from .meta.compute_optimal import PROBE, ComputeOptimal

    policy = s.get("policy", "0.25:probe,0.5:best-of-n,1:prm-beam")
    if not isinstance(policy, str):
        raise SettingError(f"policy must be BOUND:STRATEGY,... (e.g. 0.25:probe,1:prm-beam); got {policy!r}")
    names = sorted(_policy_names({"policy": policy}) - {PROBE})
    inner = {}
    for name in names:
        if name not in STRATEGIES or name == "compute-optimal":
            raise SettingError(f"policy names {name!r}; choose probe or registered strategies "
                               f"(majority, best-of-n, prm-beam, ...)")
        prefixes = (name + ".", name.replace("-", "_") + ".")
        own = {k.split(".", 1)[1]: v for k, v in s.items() if k.startswith(prefixes)}
        if "samples" in STRATEGIES[name].settings and "samples" in s:
            own.setdefault("samples", s["samples"])
        inner[name] = build(name, lm, p, own, ctx)
    scorer = ctx.reward_model if s.get("difficulty") == "reward" else None
    return ComputeOptimal(_sample(lm, p, s, ctx), ctx.task.extract_answer, inner, policy=policy,
                          **_given(s, probe_n="probe", difficulty="difficulty"), scorer=scorer)


register(Strategy("compute-optimal", _compute_optimal, "compute-optimal selection (Snell et al. 2024): --set probe=K "
                  "samples estimate difficulty (difficulty=agreement|reward), then --set policy=0.25:probe,"
                  "0.5:best-of-n,1:prm-beam runs the named strategy (settings as NAME.KEY=V; samples=N for all)",
                  ("probe", "difficulty", "policy", "samples"), nested=("policy",), needs=("task",), **_TEXT))


def _controlled(lm, p, s, generator: Callable[..., Any]) -> dict[str, Any]:
    """Keyword arguments for a controlled generator; whether it samples by default is
    read from its own signature (the default lives there)."""
    import inspect

    sample = _bool(s.get("sample", inspect.signature(generator).parameters["sample"].default), "sample")
    if not sample and p.changed("adapter"):
        raise SettingError(f"{_flags(list(p.changed('adapter')))} apply when sampling; add --set sample=true")
    return dict(sample=sample, **_token_level(lm, p, s, adapters=sample))


def _contrastive(lm, p, s, ctx):
    from .decoding.controlled import ContrastiveDecoding

    amateur = load_model(s.get("amateur", "arith-draft"), "--set amateur")
    return ContrastiveDecoding(lm, amateur, **_given(s, alpha="alpha", beta="beta"),
                               **_controlled(lm, p, s, ContrastiveDecoding))


def _product(lm, p, s, ctx):
    from .decoding.controlled import ProductOfExperts

    names = [m for m in str(s.get("models", "")).split(",") if m.strip()]
    if not names:
        raise SettingError("--strategy product needs --set models=NAME[,NAME...] (combined with --model)")
    others = [load_model(m.strip(), "--set models") for m in names]
    weights = _floats(s["weights"], "weights") if "weights" in s else [1.0] * (1 + len(others))
    return ProductOfExperts([lm, *others], weights, **_controlled(lm, p, s, ProductOfExperts))


def _cfg(lm, p, s, ctx):
    from .decoding.controlled import ClassifierFreeGuidance

    return ClassifierFreeGuidance(lm, **_given(s, guidance_scale="guidance_scale", negative_prompt="negative_prompt"),
                                  **_controlled(lm, p, s, ClassifierFreeGuidance))


def _dola(lm, p, s, ctx):
    from .decoding.controlled import DoLa

    layers = _given(s, layers="dola_layers")
    v = layers.get("layers")
    if isinstance(v, str) and v not in ("low", "high"):
        try:
            layers["layers"] = [int(x) for x in v.split(",") if x.strip()]
        except ValueError:
            raise SettingError(f"dola_layers must be low, high or comma-separated layer numbers; got {v!r}") from None
    return DoLa(lm, **layers, **_given(s, alpha="alpha"), **_controlled(lm, p, s, DoLa))


register(Strategy("contrastive", _contrastive, "contrastive decoding, expert --model vs --set amateur=NAME (Li et al. 2023)",
                  ("amateur", "alpha", "beta", "sample"), ALL_ADAPTERS))
register(Strategy("product", _product, "product of experts: --model and --set models=A,B with --set weights=w0,w1,w2",
                  ("models", "weights", "sample"), ALL_ADAPTERS))
register(Strategy("cfg", _cfg, "classifier-free guidance, --set guidance_scale=G --set negative_prompt=TEXT "
                  "(Sanchez et al. 2023)", ("guidance_scale", "negative_prompt", "sample"), ALL_ADAPTERS))
register(Strategy("dola", _dola, "DoLa: contrast final and early layers, --set dola_layers=low|high|0,2 alpha=A "
                  "(Chuang et al. 2024)", ("dola_layers", "alpha", "sample"), ALL_ADAPTERS))


# -- speculative decoding -------------------------------------------------------------------
def _speculative(lm, p, s, ctx):
    from .decoding.speculative import Speculative

    name = s.get("draft_model", "arith-draft")
    draft = "ngram" if name == "ngram" else load_model(name, "--draft-model")
    return Speculative(lm, draft, **_given(s, num_draft_tokens="num_draft_tokens", max_ngram="max_ngram"),
                       **_token_level(lm, p, s, adapters=False),
                       **{k: v for k, v in p.changed("adapter").items() if k != "temperature"},
                       temperature=p.temperature)


register(Strategy("speculative", _speculative,
                  "speculative decoding, lossless (Leviathan et al. 2023): --set draft_model=NAME or ngram (prompt "
                  "lookup); num_draft_tokens=K or auto; temperature 0 = greedy",
                  ("draft_model", "num_draft_tokens", "max_ngram"), ("temperature", "top_k", "top_p", "min_p"),
                  options=("stop", "stop_token_ids", "ignore_eos")))


# -- the beam family ------------------------------------------------------------------------
_BEAM = dict(num_beams="num_beams", length_penalty="length_penalty", early_stopping="early_stopping")


def _early(v: Any) -> Any:
    """early_stopping from a flag or --set: true/false/never."""
    if isinstance(v, str) and v.lower() == "never":
        return "never"
    try:
        return _bool(v, "early_stopping")
    except SettingError:
        raise SettingError(f"early_stopping must be true, false or never; got {v!r}") from None


def _beam_settings(s: dict[str, Any]) -> dict[str, Any]:
    out = _given(s, **_BEAM)
    if "early_stopping" in out:
        out["early_stopping"] = _early(out["early_stopping"])
    return out


def _beam(lm, p, s, ctx):
    from .decoding.beam import BeamSearch

    return BeamSearch(lm, **_beam_settings(s), **_given(s, num_beam_groups="num_beam_groups",
                                                          diversity_penalty="diversity_penalty"),
                      **_token_level(lm, p, s, adapters=False))


def _diverse_beam(lm, p, s, ctx):
    from .decoding.beam import DiverseBeamSearch

    return DiverseBeamSearch(lm, **_beam_settings(s), **_given(s, num_beam_groups="num_beam_groups",
                                                                 diversity_penalty="diversity_penalty"),
                             **_token_level(lm, p, s, adapters=False))


def _beam_sample(lm, p, s, ctx):
    from .decoding.beam import BeamSample

    return BeamSample(lm, **_beam_settings(s), **_token_level(lm, p, s))


def _stochastic_beam(lm, p, s, ctx):
    from .decoding.beam import StochasticBeamSearch

    if p.greedy:  # not the default 1.0 in its place: a temperature asked for is never replaced
        raise SettingError("--strategy stochastic-beam samples (Gumbel keys) and needs --temperature > 0; got 0 "
                           "(for deterministic beams use --strategy beam)")
    return StochasticBeamSearch(lm, **_given(s, num_beams="num_beams"), **_token_level(lm, p, s))


_BEAM_OPTIONS = ("stop", "stop_token_ids", "ignore_eos")
register(Strategy("beam", _beam, "beam search, transformers-compatible: --num-beams K --length-penalty L "
                  "--early-stopping; --n K returns the K best",
                  tuple(_BEAM) + ("num_beam_groups", "diversity_penalty"), options=_BEAM_OPTIONS, constraint=True))
register(Strategy("diverse-beam", _diverse_beam, "diverse (group) beam search: --num-beam-groups G "
                  "--diversity-penalty D (Vijayakumar et al. 2018)",
                  tuple(_BEAM) + ("num_beam_groups", "diversity_penalty"), options=_BEAM_OPTIONS, constraint=True))
register(Strategy("beam-sample", _beam_sample, "beam sampling: candidates drawn from softmax of beam scores "
                  "(transformers do_sample + num_beams)", tuple(_BEAM), ALL_ADAPTERS[:8], options=_BEAM_OPTIONS,
                  constraint=True))
register(Strategy("stochastic-beam", _stochastic_beam, "stochastic beam search: K samples without replacement via "
                  "Gumbel-top-k (Kool et al. 2019)", ("num_beams",), ("temperature",), options=_BEAM_OPTIONS,
                  constraint=True))


# -- search over tokens ---------------------------------------------------------------------
def _contrastive_search(lm, p, s, ctx):
    from .decoding.search import ContrastiveSearch

    return ContrastiveSearch(lm, **({"top_k": p.top_k} if p.top_k else {}),
                             **_given(s, penalty_alpha="penalty_alpha"), **p.options())


def _best_first(lm, p, s, ctx):
    from .decoding.search import BestFirstSearch

    return BestFirstSearch(lm, **_given(s, expand="expand", max_expansions="max_expansions", lookahead="lookahead"),
                           **p.options())


_SEARCH_OPTIONS = ("stop", "stop_token_ids", "ignore_eos")
register(Strategy("contrastive-search", _contrastive_search, "contrastive search: --top-k K --set penalty_alpha=A "
                  "(Su et al. 2022)", ("penalty_alpha",), ("top_k",), history=False, options=_SEARCH_OPTIONS))
register(Strategy("best-first", _best_first, "best-first search by sequence log-prob (exact MAP within --set "
                  "max_expansions=N); --set expand=K lookahead=D", ("expand", "max_expansions", "lookahead"),
                  history=False, options=_SEARCH_OPTIONS))


# -- reward-guided decoding -----------------------------------------------------------------
def _reward_guided(lm, p, s, ctx):
    from .decoding.guided import RewardGuidance, reward_prefix_scorer
    from .processor import Chain

    guide = RewardGuidance(reward_prefix_scorer(ctx.reward_model), **_given(s, top_k="guide_top_k", weight="weight"))
    sample = _bool(s.get("sample", False), "sample")
    if not sample and p.changed("adapter"):
        raise SettingError(f"{_flags(list(p.changed('adapter')))} apply when sampling; add --set sample=true")
    gen = _sample(lm, p, s, ctx) if sample else _greedy(lm, p, s, ctx)
    gen.processors = Chain(guide, gen.processors)  # the guide sees raw logits, adapters act after it
    return gen


def _smc(lm, p, s, ctx):
    from .decoding.guided import SMC, reward_prefix_scorer

    return SMC(lm, reward_prefix_scorer(ctx.reward_model),
               **_given(s, num_particles="particles", boundary="boundary", every="every", ess_threshold="ess_threshold"),
               **p.adapters(), **p.options())


register(Strategy("reward-guided", _reward_guided, "reward-guided token decoding (FUDGE): --reward-model scores the "
                  "top --set guide_top_k=K tokens, --set weight=W", ("guide_top_k", "weight", "sample"), ALL_ADAPTERS,
                  constraint=True, needs=("reward_model",)))
register(Strategy("smc", _smc, "sequential Monte Carlo steering towards p·reward (Lew et al. 2023): --set particles=N "
                  "ess_threshold=E", ("particles", "boundary", "every", "ess_threshold"), ("temperature",),
                  history=False, options=("stop_token_ids", "ignore_eos"), needs=("reward_model",)))
