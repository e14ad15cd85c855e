"""Token-level strategies: greedy and sampling, controlled generation with several models,
speculative decoding, the beam family, search over tokens, reward-guided decoding and SMC."""

from __future__ import annotations

from typing import Any, Callable

from ..errors import SettingError
from ..params import SamplingParams
from .core import ALL_ADAPTERS, Setting, Strategy, _bool, _flags, _floats, _given, _remote, _token_level, load_model, register


# -- token level ----------------------------------------------------------------------------
def _text(lm, p, s):
    from ..decoding.text import TextGenerator

    return TextGenerator(lm, p)


def _greedy(lm, p, s, ctx):
    from ..decoding.generate import Greedy

    if _remote(lm):
        return _text(lm, p.replace(temperature=0.0), s)
    return Greedy(lm, **_token_level(lm, p, s, adapters=False))


def _sample(lm, p, s, ctx):
    from ..decoding.generate import Greedy, Sample

    if _remote(lm):
        return _text(lm, p, s)
    if p.greedy:  # temperature 0: greedy decoding (the OpenAI convention)
        return Greedy(lm, **_token_level(lm, p, s, adapters=False))
    return Sample(lm, **_token_level(lm, p, s))


register(Strategy("greedy", _greedy, "argmax at every step", constraint=True, access="text"))
register(Strategy("sample", _sample, "ancestral sampling through temperature/top-k/top-p/min-p/typical/epsilon/eta/"
                  "top-n-sigma/mirostat", adapters=ALL_ADAPTERS, constraint=True, access="text"))



def _controlled(lm, p, s, generator: Callable[..., Any]) -> dict[str, Any]:
    """Keyword arguments for a controlled generator; whether it samples by default is
    read from its own signature (the default lives there)."""
    import inspect

    sample = _bool(s.get("sample", inspect.signature(generator).parameters["sample"].default), "sample")
    if not sample and p.changed("adapter"):
        raise SettingError(f"{_flags(list(p.changed('adapter')))} apply when sampling; add --set sample=true")
    return dict(sample=sample, **_token_level(lm, p, s, adapters=sample))


def _contrastive(lm, p, s, ctx):
    from ..decoding.controlled import ContrastiveDecoding

    amateur = load_model(s.get("amateur", "arith-draft"), "--set amateur")
    return ContrastiveDecoding(lm, amateur, **_given(s, alpha="alpha", beta="beta"),
                               **_controlled(lm, p, s, ContrastiveDecoding))


def _product(lm, p, s, ctx):
    from ..decoding.controlled import ProductOfExperts

    names = [m for m in str(s.get("models", "")).split(",") if m.strip()]
    if not names:
        raise SettingError("--strategy product needs --set models=NAME[,NAME...] (combined with --model)")
    others = [load_model(m.strip(), "--set models") for m in names]
    weights = _floats(s["weights"], "weights") if "weights" in s else [1.0] * (1 + len(others))
    return ProductOfExperts([lm, *others], weights, **_controlled(lm, p, s, ProductOfExperts))


def _cfg(lm, p, s, ctx):
    from ..decoding.controlled import ClassifierFreeGuidance

    return ClassifierFreeGuidance(lm, **_given(s, guidance_scale="guidance_scale", negative_prompt="negative_prompt"),
                                  **_controlled(lm, p, s, ClassifierFreeGuidance))


def _dola(lm, p, s, ctx):
    from ..decoding.controlled import DoLa

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
    from ..decoding.speculative import Speculative

    name = s.get("draft_model", "arith-draft")
    draft = "ngram" if name == "ngram" else load_model(name, "--draft-model")
    return Speculative(lm, draft, **_given(s, num_draft_tokens="num_draft_tokens", max_ngram="max_ngram",
                                           record_drafts="record_drafts", draft_weights="draft_weights"),
                       **_token_level(lm, p, s, adapters=False),
                       **{k: v for k, v in p.changed("adapter").items() if k != "temperature"},
                       temperature=p.temperature)


register(Strategy("speculative", _speculative,
                  "speculative decoding, lossless (Leviathan et al. 2023): --set draft_model=NAME or ngram (prompt "
                  "lookup); num_draft_tokens=K or auto; temperature 0 = greedy; record_drafts=true keeps each "
                  "round's drafts for ponder view; draft_weights=bfloat16 (default: half the bytes per draft step, the "
                  "same output) or float32",
                  ("draft_model", "num_draft_tokens", "max_ngram", "record_drafts", "draft_weights"), ("temperature", "top_k", "top_p", "min_p"),
                  options=("stop", "stop_token_ids", "ignore_eos")))


# -- the beam family ------------------------------------------------------------------------
_BEAM = dict(num_beams="num_beams", length_penalty="length_penalty", early_stopping="early_stopping")
NUM_BEAMS = Setting("num_beams", int, "beams kept", lo=1, default=4, spends=True)
_BEAM_SETTINGS = (NUM_BEAMS, "length_penalty", "early_stopping")


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
    from ..decoding.beam import BeamSearch

    return BeamSearch(lm, **_beam_settings(s), **_given(s, num_beam_groups="num_beam_groups",
                                                          diversity_penalty="diversity_penalty"),
                      **_token_level(lm, p, s, adapters=False))


def _diverse_beam(lm, p, s, ctx):
    from ..decoding.beam import DiverseBeamSearch

    return DiverseBeamSearch(lm, **_beam_settings(s), **_given(s, num_beam_groups="num_beam_groups",
                                                                 diversity_penalty="diversity_penalty"),
                             **_token_level(lm, p, s, adapters=False))


def _beam_sample(lm, p, s, ctx):
    from ..decoding.beam import BeamSample

    return BeamSample(lm, **_beam_settings(s), **_token_level(lm, p, s))


def _stochastic_beam(lm, p, s, ctx):
    from ..decoding.beam import StochasticBeamSearch

    if p.greedy:  # not the default 1.0 in its place: a temperature asked for is never replaced
        raise SettingError("--strategy stochastic-beam samples (Gumbel keys) and needs --temperature > 0; got 0 "
                           "(for deterministic beams use --strategy beam)")
    return StochasticBeamSearch(lm, **_given(s, num_beams="num_beams"), **_token_level(lm, p, s))


_BEAM_OPTIONS = ("stop", "stop_token_ids", "ignore_eos")
register(Strategy("beam", _beam, "beam search, transformers-compatible: --num-beams K --length-penalty L "
                  "--early-stopping; --n K returns the K best",
                  _BEAM_SETTINGS + ("num_beam_groups", "diversity_penalty"), options=_BEAM_OPTIONS, constraint=True))
register(Strategy("diverse-beam", _diverse_beam, "diverse (group) beam search: --num-beam-groups G "
                  "--diversity-penalty D (Vijayakumar et al. 2018)",
                  _BEAM_SETTINGS + ("num_beam_groups", "diversity_penalty"), options=_BEAM_OPTIONS, constraint=True))
register(Strategy("beam-sample", _beam_sample, "beam sampling: candidates drawn from softmax of beam scores "
                  "(transformers do_sample + num_beams)", _BEAM_SETTINGS, ALL_ADAPTERS[:8], options=_BEAM_OPTIONS,
                  constraint=True))
register(Strategy("stochastic-beam", _stochastic_beam, "stochastic beam search: K samples without replacement via "
                  "Gumbel-top-k (Kool et al. 2019)", (NUM_BEAMS,), ("temperature",), options=_BEAM_OPTIONS,
                  constraint=True))


# -- search over tokens ---------------------------------------------------------------------
def _contrastive_search(lm, p, s, ctx):
    from ..decoding.token_search import ContrastiveSearch

    return ContrastiveSearch(lm, **({"top_k": p.top_k} if p.top_k else {}),
                             **_given(s, penalty_alpha="penalty_alpha"), **p.options())


def _best_first(lm, p, s, ctx):
    from ..decoding.token_search import BestFirstSearch

    return BestFirstSearch(lm, **_given(s, expand="expand", max_expansions="max_expansions", lookahead="lookahead"),
                           **p.options())


_SEARCH_OPTIONS = ("stop", "stop_token_ids", "ignore_eos")
register(Strategy("contrastive-search", _contrastive_search, "contrastive search: --top-k K --set penalty_alpha=A "
                  "(Su et al. 2022)", ("penalty_alpha",), ("top_k",), history=False, options=_SEARCH_OPTIONS))
register(Strategy("best-first", _best_first, "best-first search by sequence log-prob (exact MAP within --set "
                  "max_expansions=N); --set expand=K lookahead=D",
                  ("expand", Setting("max_expansions", int, "nodes expanded", lo=1, default=256, spends=True), "lookahead"),
                  history=False, options=_SEARCH_OPTIONS))


# -- reward-guided decoding -----------------------------------------------------------------
def _reward_guided(lm, p, s, ctx):
    from ..decoding.guided import RewardGuidance, reward_prefix_scorer
    from ..processor import Chain

    guide = RewardGuidance(reward_prefix_scorer(ctx.reward_model), **_given(s, top_k="guide_top_k", weight="weight"))
    sample = _bool(s.get("sample", False), "sample")
    if not sample and p.changed("adapter"):
        raise SettingError(f"{_flags(list(p.changed('adapter')))} apply when sampling; add --set sample=true")
    gen = _sample(lm, p, s, ctx) if sample else _greedy(lm, p, s, ctx)
    gen.processors = Chain(guide, gen.processors)  # the guide sees raw logits, adapters act after it
    return gen


def _smc(lm, p, s, ctx):
    from ..decoding.guided import SMC, reward_prefix_scorer

    return SMC(lm, reward_prefix_scorer(ctx.reward_model),
               **_given(s, num_particles="particles", boundary="boundary", every="every", ess_threshold="ess_threshold"),
               **p.adapters(), **p.options())


register(Strategy("reward-guided", _reward_guided, "reward-guided token decoding (FUDGE): --reward-model scores the "
                  "top --set guide_top_k=K tokens, --set weight=W", ("guide_top_k", "weight", "sample"), ALL_ADAPTERS,
                  constraint=True, needs=("reward_model",), scored=True))
register(Strategy("smc", _smc, "sequential Monte Carlo steering towards p·reward (Lew et al. 2023): --set particles=N "
                  "ess_threshold=E", (Setting("particles", int, "particles", lo=1, default=16, spends=True), "boundary", "every",
                                     "ess_threshold"), ("temperature",),
                  history=False, options=("stop_token_ids", "ignore_eos"), needs=("reward_model",), scored=True))
