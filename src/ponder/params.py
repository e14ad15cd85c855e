"""``SamplingParams``: every token-level setting, with its default, legal range and help,
in one place. Imports nothing heavy.

The CLI derives its flags from these fields (``ponder.cli``), the strategy registry
hands them to generators, and the backends' ``generate(prompts, params)`` takes them;
the server and the sweep harness will do the same. A field at its default does
nothing (every processor is then the identity), so ``changed()`` is the one answer to
"did the user set this?".
"""

from __future__ import annotations

import math
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Callable, Mapping

from .errors import SettingError

# Seeds are in [0, MAX_SEED): a sample's stream is seeded with (seed * 1_000_003 + ...)
# mod MAX_SEED, a bijection on that range (1_000_003 is prime to 2**63 - 1), so no two
# seeds share streams; MAX_SEED itself would wrap onto 0.
MAX_SEED = 2**63 - 1


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


# How a field travels over the OpenAI API (``api=``), read by the client
# (backends/openai.py: what a request body carries) and the server (server/api.py: what a
# request may set), so the two cannot disagree:
#   "openai": OpenAI's own request field;
#   "extension": vLLM's and SGLang's extension (ponder serve takes it too), sent when set;
#   "ponder": needs the model's logits; ponder serve takes it, other servers do not;
#   "request": shapes the request itself (n, max_tokens, seed, stop, logprobs).
API_KINDS = ("openai", "extension", "ponder", "request")


def _setting(default: Any, help: str, legal: str, ok: Callable[[Any], bool], *, group: str = "adapter",
             flag: str | None = None, factory: Callable[[], Any] | None = None, api: str = "ponder") -> Any:
    """A field with its help, its legal range (said in errors) and its check.
    ``group``: "adapter" (sampling adapters, which greedy decoding cannot honour),
    "history" (penalties and biases, which every token-level strategy takes),
    "option" (stops, lengths, seeds) or "output" (what a result carries).
    ``api``: how it travels over the OpenAI API (``API_KINDS``)."""
    assert api in API_KINDS, api
    meta = {"help": help, "legal": legal, "ok": ok, "group": group, "flag": flag, "api": api}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class SamplingParams:
    """Token-level settings. Validated at construction: an illegal value raises a
    ``SettingError`` naming the field and its legal range."""

    n: int = _setting(1, "Number of outputs per prompt.", "an integer in [1, 1000000]",
                      lambda v: _int(v) and 1 <= v <= 1_000_000, group="option", api="request")
    max_tokens: int = _setting(256, "Most tokens to generate (generation also ends at the model's context).",
                               "an integer >= 1", lambda v: _int(v) and v >= 1, group="option", api="request")
    temperature: float = _setting(1.0, "Sampling temperature; 0 is greedy decoding.", ">= 0",
                                  lambda v: _num(v) and v >= 0, api="openai")
    top_k: int = _setting(0, "Keep the k most likely tokens (0 = off).", "an integer >= 0",
                          lambda v: _int(v) and v >= 0, api="extension")
    top_p: float = _setting(1.0, "Nucleus mass (1 = off).", "in (0, 1]", lambda v: _num(v) and 0 < v <= 1,
                          api="openai")
    min_p: float = _setting(0.0, "Min-p: keep tokens with p >= min_p * max p (0 = off).", "in [0, 1]",
                            lambda v: _num(v) and 0 <= v <= 1, api="extension")
    typical_p: float = _setting(1.0, "Locally typical sampling mass (1 = off).", "in (0, 1]",
                                lambda v: _num(v) and 0 < v <= 1)
    epsilon: float = _setting(0.0, "Epsilon sampling cut-off (0 = off).", "in [0, 1)",
                              lambda v: _num(v) and 0 <= v < 1)
    eta: float = _setting(0.0, "Eta sampling (0 = off).", "in [0, 1)", lambda v: _num(v) and 0 <= v < 1)
    top_n_sigma: float = _setting(0.0, "Top-n-sigma: keep logits within n std of the max (0 = off).", ">= 0",
                                  lambda v: _num(v) and v >= 0)
    mirostat: int = _setting(0, "Mirostat version 1 or 2 (0 = off); target surprise --mirostat-tau.",
                             "0, 1 or 2", lambda v: v in (0, 1, 2) and _int(v))
    mirostat_tau: float = _setting(5.0, "Mirostat target surprise in bits.", "> 0", lambda v: _num(v) and v > 0)
    mirostat_eta: float = _setting(0.1, "Mirostat learning rate.", "in (0, 1]", lambda v: _num(v) and 0 < v <= 1)
    repetition_penalty: float = _setting(1.0, "Repetition penalty (1 = off).", "> 0", lambda v: _num(v) and v > 0,
                                         group="history", api="extension")
    frequency_penalty: float = _setting(0.0, "Frequency penalty (0 = off).", "in [-2, 2]",
                                        lambda v: _num(v) and -2 <= v <= 2, group="history", api="openai")
    presence_penalty: float = _setting(0.0, "Presence penalty (0 = off).", "in [-2, 2]",
                                       lambda v: _num(v) and -2 <= v <= 2, group="history", api="openai")
    no_repeat_ngram_size: int = _setting(0, "Ban repeated n-grams of this size (0 = off).", "an integer >= 0",
                                         lambda v: _int(v) and v >= 0, group="history", flag="--no-repeat-ngram")
    min_tokens: int = _setting(0, "Generate at least this many tokens before EOS.", "an integer >= 0",
                               lambda v: _int(v) and v >= 0, group="history", api="extension")
    logit_bias: Mapping[int, float] = _setting(None, 'Bias added to token ids\' logits, JSON {"token_id": bias}.',
                                               "a mapping of token ids >= 0 to numbers (or -inf)",
                                               lambda v: isinstance(v, Mapping) and all(
                                                   _int(k) and k >= 0 and isinstance(b, (int, float))
                                                   and not isinstance(b, bool) and not math.isnan(b)
                                                   for k, b in v.items()),
                                               group="history", factory=dict, api="openai")
    bad_words: tuple[str, ...] = _setting((), "Text never to generate (repeatable).", "non-empty strings",
                                          lambda v: all(isinstance(w, str) and w for w in v), group="history")
    stop: tuple[str, ...] = _setting((), "Stop string (repeatable); not included in the output.",
                                     "non-empty strings", lambda v: all(isinstance(w, str) and w for w in v),
                                     group="option", api="request")
    stop_token_ids: tuple[int, ...] = _setting((), "Token ids that end generation.", "token ids >= 0",
                                               lambda v: all(_int(t) and t >= 0 for t in v), group="option",
                                               api="extension")
    ignore_eos: bool = _setting(False, "Keep generating past EOS.", "true or false",
                                lambda v: isinstance(v, bool), group="option", api="extension")
    seed: int | None = _setting(None, "Seed; the same seed gives the same output.",
                                f"an integer in [0, {MAX_SEED - 1}]", lambda v: v is None or (_int(v) and 0 <= v < MAX_SEED),
                                group="option", api="request")
    token_healing: bool = _setting(False, "Back off the prompt's last token and let the model re-spell it.",
                                   "true or false", lambda v: isinstance(v, bool), group="option")
    logprobs: int = _setting(0, "Top-k log-probabilities to return per generated token (0 = none).",
                             "an integer in [0, 20]", lambda v: _int(v) and 0 <= v <= 20, group="output", api="request")

    def __post_init__(self) -> None:
        # sequences given as lists (JSON, the CLI) or a lone string become tuples
        for name in ("bad_words", "stop", "stop_token_ids"):
            v = getattr(self, name)
            if isinstance(v, (str, int)):
                v = (v,)
            if not isinstance(v, tuple):
                try:
                    v = tuple(v)
                except TypeError:
                    raise SettingError(f"{name} must be a list; got {v!r}", name) from None
            object.__setattr__(self, name, v)
        if self.logit_bias is None:
            object.__setattr__(self, "logit_bias", {})
        for f in fields(self):
            v = getattr(self, f.name)
            if not f.metadata["ok"](v):
                raise SettingError(f"{f.name} must be {f.metadata['legal']}; got {v!r}", f.name)
        if not self.mirostat and (self.mirostat_tau != 5.0 or self.mirostat_eta != 0.1):
            raise SettingError("mirostat_tau and mirostat_eta need mirostat 1 or 2")

    def check_for(self, vocab_size: int) -> None:
        """Token ids (logit_bias keys, stop_token_ids) must be in the model's vocabulary."""
        for name, ids in (("logit_bias", list(self.logit_bias)), ("stop_token_ids", list(self.stop_token_ids))):
            bad = [t for t in ids if t >= vocab_size]
            if bad:
                raise SettingError(f"{name} token ids must be in [0, {vocab_size}); got {bad[0]}", name)

    @staticmethod
    def api_fields(*kinds: str) -> tuple[str, ...]:
        """The fields that travel over the OpenAI API as ``kinds`` say (``API_KINDS``)."""
        return tuple(f.name for f in fields(SamplingParams) if f.metadata["api"] in kinds)

    # -- what was set ----------------------------------------------------------------------
    @staticmethod
    def default(name: str) -> Any:
        f = SamplingParams.__dataclass_fields__[name]
        return f.default_factory() if f.default is MISSING else f.default  # type: ignore[misc]

    def changed(self, group: str | None = None) -> dict[str, Any]:
        """The fields that differ from their defaults (of one group, if given)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if (group is None or f.metadata["group"] == group) and getattr(self, f.name) != self.default(f.name)}

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def replace(self, **changes: Any) -> "SamplingParams":
        return replace(self, **changes)

    # -- what the generators take ----------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        """Stops and lengths, as the token-level generators' keyword arguments."""
        out: dict[str, Any] = {"max_tokens": self.max_tokens}
        for k in ("stop", "stop_token_ids", "ignore_eos", "token_healing", "logprobs"):
            if getattr(self, k) != self.default(k):
                out[k] = list(getattr(self, k)) if isinstance(getattr(self, k), tuple) else getattr(self, k)
        return out

    def history(self, encode: Callable[[str], list[int]] | None = None) -> dict[str, Any]:
        """Penalties, biases and bans that differ from their defaults, as the processor
        keyword arguments (``bad_words`` become token-id sequences through ``encode``)."""
        out = {k: v for k, v in self.changed("history").items() if k != "bad_words"}
        if self.bad_words:
            if encode is None:
                raise SettingError("bad_words need the model's tokenizer")
            out["bad_words_ids"] = [encode(w) for w in self.bad_words]
        if "logit_bias" in out:
            out["logit_bias"] = dict(out["logit_bias"])
        return out

    def adapters(self) -> dict[str, Any]:
        """The sampling adapters that differ from their defaults, as processor keyword
        arguments (temperature 0 is greedy, not an adapter)."""
        out = {k: v for k, v in self.changed("adapter").items() if k not in ("mirostat", "mirostat_tau", "mirostat_eta")}
        out.pop("temperature", None) if self.greedy else None
        if self.mirostat:
            out.update(mirostat_version=self.mirostat, mirostat_tau=self.mirostat_tau, mirostat_eta=self.mirostat_eta)
        return out

    def to_dict(self) -> dict[str, Any]:
        """The fields that differ from their defaults, JSON-ready (a result's record)."""
        return {k: (list(v) if isinstance(v, tuple) else {str(a): b for a, b in v.items()} if isinstance(v, Mapping) else v)
                for k, v in self.changed().items()}


def field_help(name: str) -> tuple[str, str, str | None]:
    """(help, legal range, flag override) of a field, for the CLI and the server."""
    m = SamplingParams.__dataclass_fields__[name].metadata
    return m["help"], m["legal"], m["flag"]
