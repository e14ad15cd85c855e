"""Strategies by name: the registry the CLI (``--strategy``) and ``ponder eval`` use.

A strategy is a factory ``(lm, settings, ctx) -> generator``. Later families register
theirs here with ``register``; the CLI then reaches them with ``--strategy NAME`` and
their settings as flags or ``--set key=value``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from .decoding.generate import OPTION_FIELDS as OPTION_SETTINGS
from .decoding.processors import ADAPTER_DEFAULTS, ADAPTER_SETTINGS, HISTORY_SETTINGS, SettingError


@dataclass
class Strategy:
    name: str
    factory: Callable[..., Any]
    help: str
    settings: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()  # e.g. ("task",) or ("reward_model",)
    meta: bool = False


@dataclass
class Context:
    """What a strategy may need besides the model and its settings."""

    task: Any = None
    reward_model: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


STRATEGIES: dict[str, Strategy] = {}

SAMPLING_SETTINGS = ADAPTER_SETTINGS + HISTORY_SETTINGS
# Constraints, given by name on the CLI; a strategy takes them if it takes "constraint".
CONSTRAINT_SETTINGS = ("json_schema", "regex", "grammar", "choice")


def register(name: str, factory: Callable[..., Any], help: str, settings: tuple[str, ...] = (),
             needs: tuple[str, ...] = (), meta: bool = False) -> None:
    STRATEGIES[name] = Strategy(name, factory, help, settings, needs, meta)


def build(name: str, lm: Any, settings: dict[str, Any], ctx: Context | None = None) -> Any:
    """Make the generator for strategy ``name``; unknown names and settings are errors
    that list what is legal."""
    if name not in STRATEGIES:
        raise SettingError(f"--strategy {name!r} is unknown; choose one of: {', '.join(STRATEGIES)}")
    st = STRATEGIES[name]
    ctx = ctx or Context()
    for need in st.needs:
        if getattr(ctx, need) is None:
            flag = "--task" if need == "task" else "--reward-model"
            raise SettingError(f"--strategy {name} needs {flag}")
    legal = set(st.settings) | set(OPTION_SETTINGS)
    settings = dict(settings)
    given = {k: settings.pop(k) for k in CONSTRAINT_SETTINGS if k in settings}
    if any(given.values()):
        if "constraint" not in legal:
            raise SettingError(f"--strategy {name} does not take a constraint (--json-schema, --regex, --grammar, --choice)")
        from .decoding.constraints import Grammar

        settings["constraint"] = Grammar.from_settings(lm, **given).constraint()
    # Adapters left at their defaults are no setting at all (the CLI passes them always).
    settings = {k: v for k, v in settings.items()
                if k in legal or not (k in ADAPTER_DEFAULTS and v == ADAPTER_DEFAULTS[k])}
    unknown = [k for k, v in settings.items() if k not in legal and v is not None]
    if unknown:
        raise SettingError(
            f"--strategy {name} does not take {', '.join(unknown)}; it takes {', '.join(sorted(legal))}"
        )
    return st.factory(lm, {k: v for k, v in settings.items() if v is not None}, ctx)


def _options(s: dict[str, Any]) -> dict[str, Any]:
    return {k: s[k] for k in OPTION_SETTINGS if k in s}


def _greedy(lm, s, ctx):
    from .decoding.generate import Greedy

    return Greedy(lm, **{k: s[k] for k in HISTORY_SETTINGS if k in s}, **_options(s))


def _sample(lm, s, ctx):
    from .decoding.generate import Sample

    return Sample(lm, **{k: s[k] for k in SAMPLING_SETTINGS if k in s}, **_options(s))


def _majority(lm, s, ctx):
    from .meta.parallel import MajorityVote

    return MajorityVote(_sample(lm, s, ctx), ctx.task.extract_answer, n=s.get("samples", 16))


def _best_of_n(lm, s, ctx):
    from .meta.parallel import BestOfN

    return BestOfN(_sample(lm, s, ctx), ctx.reward_model, n=s.get("samples", 16))


register("greedy", _greedy, "argmax at every step", HISTORY_SETTINGS)
register("sample", _sample, "ancestral sampling through temperature/top-k/top-p/min-p/typical/epsilon/eta/top-n-sigma", SAMPLING_SETTINGS)
register("majority", _majority, "self-consistency: majority vote over N samples (Wang et al. 2023)",
         SAMPLING_SETTINGS + ("samples",), needs=("task",), meta=True)
register("best-of-n", _best_of_n, "best of N samples by a reward model (Stiennon et al. 2020)",
         SAMPLING_SETTINGS + ("samples",), needs=("reward_model",), meta=True)


def _load(name: str):
    from .models.native import NativeLM

    return NativeLM.from_pretrained(name)


def _floats(v: Any) -> list[float]:
    if isinstance(v, (list, tuple)):
        return [float(x) for x in v]
    return [float(x) for x in str(v).split(",") if x.strip()]


def _controlled_options(s: dict[str, Any], sample: bool) -> dict[str, Any]:
    """Options, history processors, and (when sampling) the adapters; adapters left at
    their defaults are dropped for greedy decoding, changed ones are an error there."""
    out = _options(s)
    out.update({k: s[k] for k in HISTORY_SETTINGS if k in s})
    out.update({k: s[k] for k in ADAPTER_SETTINGS if k in s and (sample or s[k] != ADAPTER_DEFAULTS[k])})
    return out


def _contrastive(lm, s, ctx):
    from .decoding.controlled import ContrastiveDecoding

    return ContrastiveDecoding(lm, _load(s.get("amateur", "arith-draft")), alpha=s.get("alpha", 0.1),
                               beta=s.get("beta", 1.0), sample=bool(s.get("sample", False)),
                               **_controlled_options(s, bool(s.get("sample", False))))


def _product(lm, s, ctx):
    from .decoding.controlled import ProductOfExperts

    others = [_load(m) for m in str(s.get("models", "")).split(",") if m.strip()]
    if not others:
        raise SettingError("--strategy product needs --set models=NAME[,NAME...] (combined with --model)")
    weights = _floats(s.get("weights", ",".join(["1"] * (1 + len(others)))))
    return ProductOfExperts([lm, *others], weights, sample=bool(s.get("sample", True)),
                            **_controlled_options(s, bool(s.get("sample", True))))


def _cfg(lm, s, ctx):
    from .decoding.controlled import ClassifierFreeGuidance

    return ClassifierFreeGuidance(lm, s.get("guidance_scale", 1.5), s.get("negative_prompt", ""),
                                  sample=bool(s.get("sample", False)),
                                  **_controlled_options(s, bool(s.get("sample", False))))


_CONTROLLED = ADAPTER_SETTINGS + HISTORY_SETTINGS + ("sample",)
register("contrastive", _contrastive, "contrastive decoding, expert --model vs --set amateur=NAME (Li et al. 2023)",
         _CONTROLLED + ("amateur", "alpha", "beta"))
register("product", _product, "product of experts: --model and --set models=A,B with --set weights=w0,w1,w2",
         _CONTROLLED + ("models", "weights"))
register("cfg", _cfg, "classifier-free guidance, --set guidance_scale=G --set negative_prompt=TEXT (Sanchez et al. 2023)",
         _CONTROLLED + ("guidance_scale", "negative_prompt"))


def _speculative(lm, s, ctx):
    from .decoding.speculative import Speculative

    sample = {k: s[k] for k in ("temperature", "top_k", "top_p", "min_p") if k in s}
    name = s.get("draft_model", "arith-draft")
    draft = "ngram" if name == "ngram" else _load(name)
    return Speculative(lm, draft, num_draft_tokens=s.get("num_draft_tokens", 4), max_ngram=s.get("max_ngram", 3),
                       **sample, **{k: s[k] for k in HISTORY_SETTINGS if k in s}, **_options(s))


register("speculative", _speculative,
         "speculative decoding, lossless (Leviathan et al. 2023): --set draft_model=NAME or ngram (prompt lookup); "
         "num_draft_tokens=K or auto; temperature 0 = greedy",
         ("temperature", "top_k", "top_p", "min_p", "draft_model", "num_draft_tokens", "max_ngram") + HISTORY_SETTINGS)


_BEAM = ("num_beams", "length_penalty", "early_stopping")


def _early(v: Any) -> Any:
    """early_stopping from a flag or --set: true/false/never."""
    if isinstance(v, str):
        low = v.lower()
        if low in ("true", "false"):
            return low == "true"
        return low
    return v


def _beam(lm, s, ctx):
    from .decoding.beam import BeamSearch

    return BeamSearch(lm, num_beams=s.get("num_beams", 4), length_penalty=s.get("length_penalty", 1.0),
                      early_stopping=_early(s.get("early_stopping", False)),
                      num_beam_groups=s.get("num_beam_groups", 1), diversity_penalty=s.get("diversity_penalty", 0.0),
                      **{k: s[k] for k in HISTORY_SETTINGS if k in s}, **_options(s))


def _diverse_beam(lm, s, ctx):
    s = dict(s)
    s.setdefault("num_beams", 4)
    s.setdefault("num_beam_groups", 2 if s["num_beams"] % 2 == 0 else 1)
    s.setdefault("diversity_penalty", 1.0)
    return _beam(lm, s, ctx)


def _beam_sample(lm, s, ctx):
    from .decoding.beam import BeamSample

    return BeamSample(lm, num_beams=s.get("num_beams", 4), length_penalty=s.get("length_penalty", 1.0),
                      early_stopping=_early(s.get("early_stopping", False)),
                      **{k: s[k] for k in SAMPLING_SETTINGS if k in s}, **_options(s))


def _stochastic_beam(lm, s, ctx):
    from .decoding.beam import StochasticBeamSearch

    return StochasticBeamSearch(lm, num_beams=s.get("num_beams", 4), temperature=s.get("temperature", 1.0),
                                **{k: s[k] for k in HISTORY_SETTINGS if k in s}, **_options(s))


register("beam", _beam, "beam search, transformers-compatible: --num-beams K --length-penalty L --early-stopping; --n K returns the K best",
         HISTORY_SETTINGS + _BEAM + ("num_beam_groups", "diversity_penalty"))
register("diverse-beam", _diverse_beam, "diverse (group) beam search: --num-beam-groups G --diversity-penalty D (Vijayakumar et al. 2018)",
         HISTORY_SETTINGS + _BEAM + ("num_beam_groups", "diversity_penalty"))
register("beam-sample", _beam_sample, "beam sampling: candidates drawn from softmax of beam scores (transformers do_sample + num_beams)",
         SAMPLING_SETTINGS + _BEAM)
register("stochastic-beam", _stochastic_beam, "stochastic beam search: K samples without replacement via Gumbel-top-k (Kool et al. 2019)",
         HISTORY_SETTINGS + ("num_beams", "temperature"))


def _contrastive_search(lm, s, ctx):
    from .decoding.search import ContrastiveSearch

    return ContrastiveSearch(lm, top_k=s.get("top_k", 4) or 4, penalty_alpha=s.get("penalty_alpha", 0.6), **_options(s))


def _best_first(lm, s, ctx):
    from .decoding.search import BestFirstSearch

    return BestFirstSearch(lm, expand=s.get("expand", 4), max_expansions=s.get("max_expansions", 256),
                           lookahead=s.get("lookahead", 0), **_options(s))


def _dola(lm, s, ctx):
    from .decoding.controlled import DoLa

    layers = s.get("dola_layers", "low")
    if isinstance(layers, str) and layers not in ("low", "high"):
        layers = [int(x) for x in layers.split(",") if x.strip()]
    return DoLa(lm, layers=layers, alpha=s.get("alpha", 0.1), sample=bool(s.get("sample", False)),
                **_controlled_options(s, bool(s.get("sample", False))))


register("contrastive-search", _contrastive_search,
         "contrastive search: --top-k K --set penalty_alpha=A (Su et al. 2022)", ("top_k", "penalty_alpha"))
register("best-first", _best_first,
         "best-first search by sequence log-prob (exact MAP within --set max_expansions=N); --set expand=K lookahead=D",
         ("expand", "max_expansions", "lookahead"))
register("dola", _dola, "DoLa: contrast final and early layers, --set dola_layers=low|high|0,2 alpha=A (Chuang et al. 2024)",
         _CONTROLLED + ("dola_layers", "alpha"))


def _reward_guided(lm, s, ctx):
    from .decoding.guided import RewardGuidance, reward_prefix_scorer

    guide = RewardGuidance(reward_prefix_scorer(ctx.reward_model), top_k=s.get("guide_top_k", 8), weight=s.get("weight", 1.0))
    sample = bool(s.get("sample", False))
    base = {k: v for k, v in s.items() if k not in ("guide_top_k", "weight", "sample")}
    gen = _sample(lm, base, ctx) if sample else _greedy(lm, {k: v for k, v in base.items() if k not in ADAPTER_SETTINGS}, ctx)
    from .decoding.processors import Chain

    gen.processors = Chain(guide, gen.processors)  # the guide sees raw logits, adapters act after it
    return gen


def _smc(lm, s, ctx):
    from .decoding.guided import SMC, reward_prefix_scorer

    return SMC(lm, reward_prefix_scorer(ctx.reward_model), num_particles=s.get("particles", 16),
               boundary=s.get("boundary", "line"), every=s.get("every", 8), ess_threshold=s.get("ess_threshold", 0.5),
               temperature=s.get("temperature", 1.0), **_options(s))


register("reward-guided", _reward_guided,
         "reward-guided token decoding (FUDGE): --reward-model scores the top --set guide_top_k=K tokens, --set weight=W",
         SAMPLING_SETTINGS + ("guide_top_k", "weight", "sample"), needs=("reward_model",))
register("smc", _smc, "sequential Monte Carlo steering towards p·reward (Lew et al. 2023): --set particles=N ess_threshold=E",
         ("particles", "boundary", "every", "ess_threshold", "temperature"), needs=("reward_model",))
