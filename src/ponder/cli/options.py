"""The flags every command shares: SamplingParams' fields as flags (derived, never
written by hand), --set KEY=VALUE, escapes, and loading a verifier by spec."""

from __future__ import annotations

import functools
import inspect
import json
from dataclasses import fields
from typing import Any, Callable, List, Optional

import typer
from rich.markup import escape

from ..errors import SettingError
from ..params import SamplingParams, field_help
from . import _fail


# -- flags from SamplingParams -----------------------------------------------------------------
def _flag_type(name: str, default: Any) -> tuple[Any, Any]:
    """(annotation, CLI default) of a SamplingParams field."""
    if name == "logit_bias":
        return Optional[str], None  # JSON on the command line
    if name in ("stop", "bad_words"):
        return List[str], []
    if name == "stop_token_ids":
        return List[int], []
    if name == "seed":
        return Optional[int], default
    return type(default), default


def with_sampling_params(defaults: dict[str, Any] | None = None, exclude: tuple[str, ...] = ()) -> Callable:
    """Give a command one flag per ``SamplingParams`` field (``--top-p``, ``--seed``...)
    and hand it the validated ``params``."""
    defaults = defaults or {}

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        added, names = [], []
        for f in fields(SamplingParams):
            if f.name in exclude:
                continue
            help_, legal, alias = field_help(f.name)
            ann, default = _flag_type(f.name, defaults.get(f.name, SamplingParams.default(f.name)))
            flags = ["--" + f.name.replace("_", "-")] + ([alias] if alias else [])
            # Escaped: rich would read "[in (0, 1]" as a markup tag and print a stray "]".
            opt = typer.Option(default, *flags, help=escape(f"{help_} [{legal}]"))
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))
            names.append(f.name)

        @functools.wraps(fn)
        def wrapper(**kw: Any) -> Any:
            raw = {k: kw.pop(k) for k in names}
            return fn(params=_params_from_flags(raw, defaults), **kw)

        wrapper.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "params"] + added)
        wrapper.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != "params"},
                                   **{p.name: p.annotation for p in added}}
        return wrapper

    return deco


def _params_from_flags(raw: dict[str, Any], defaults: dict[str, Any]) -> SamplingParams:
    raw = dict(raw)
    if raw.get("logit_bias") is not None:
        try:
            bias = json.loads(raw["logit_bias"])
            raw["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (ValueError, AttributeError, TypeError):
            _fail('--logit-bias takes a JSON object of token id to bias, e.g. \'{"17": -100}\'')
    else:
        raw.pop("logit_bias", None)
    return SamplingParams(**raw)


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        if "=" not in kv:
            _fail(f"--set takes KEY=VALUE; got {kv!r}")
        k, v = kv.split("=", 1)
        key = k.strip().replace("-", "_")
        if not key:
            _fail(f"--set takes KEY=VALUE; got {kv!r}")
        try:
            out[key] = json.loads(v)
        except json.JSONDecodeError:
            out[key] = v
    return out


def _merge_sets(flags: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """A command's named flags and its ``--set`` pairs, one value per setting: a setting
    given both ways is an error naming both spellings."""
    both = [k for k, v in flags.items() if v is not None and k in sets]
    if both:
        _fail(f"{both[0]} is given twice: --{both[0].replace('_', '-')} and --set {both[0]}=...; give it once")
    return {**{k: v for k, v in flags.items() if v is not None or k not in sets}, **sets}


def _parse_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            _fail(f"{flag} takes KEY=VALUE; got {kv!r}")
        out[k.strip()] = v
    return out


def _split_sets(params: SamplingParams, sets: dict[str, Any]) -> tuple[SamplingParams, dict[str, Any]]:
    """``--set`` may also give a SamplingParams field; it is validated like a flag."""
    fields_ = {k: sets.pop(k) for k in list(sets) if k in SamplingParams.__dataclass_fields__}
    return (params.replace(**fields_) if fields_ else params), sets


# -- loading --------------------------------------------------------------------------------
def _unescape(text: str) -> str:
    """The escapes \\n and \\t a shell argument spells, as the characters they stand for."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _load_reward(name: str | None, flag: str, fmt: str | None = None):
    """A verifier by spec (a shipped name, a folder, hf:FOLDER, URL#MODEL), in ``fmt``."""
    if not name:
        return None
    from ..strategies import load_reward_model

    try:
        return load_reward_model(name, flag, fmt)
    except SettingError as e:
        _fail(str(e))


REWARD_FORMAT_HELP = ("The verifier's format (ponder, qwen-prm, qwen-orm, math-shepherd, rlhflow, skywork-prm, "
                      "token-prm, trl-prm, step-tag, seq-rm; generative: genprm, thinkprm), with overrides as "
                      "NAME:key=value,... (step-tag:marker=#,good=+,bad=-); default: what its config.json says. "
                      "A URL needs it unless its #MODEL is a local folder or shipped name.")
