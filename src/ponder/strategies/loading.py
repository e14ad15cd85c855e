"""Loading models and verifiers by scheme: one registry, the same everywhere (the CLI's
``--model`` and ``--reward-model``, a sweep's ``[[model]]`` and ``reward_model``,
``ponder serve``, Python).

| spec | a model | a verifier |
|---|---|---|
| a shipped name, a checkpoint folder | ``NativeLM`` | ``RewardModel`` (format from config.json, or named) |
| ``hf:FOLDER`` | ``HFLM`` (transformers) | transformers' backbone with the format's head |
| ``URL[,URL...][#MODEL]`` | ``OpenAILM`` (probed) | ``RemoteRewardModel`` (vLLM ``--runner pooling``) |

A scheme is a predicate on the spec and a loader; ``register_scheme`` adds one (tried
before the built-in ones, the local fallback last). Errors name the flag or key
(``role``) the spec came from.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import SettingError
from ..models import WEIGHT_TYPES

# kind ("model" | "reward") -> [(scheme name, matches the spec, loads it)], tried in order
SCHEMES: dict[str, list[tuple[str, Callable[[str], bool], Callable[..., Any]]]] = {"model": [], "reward": []}


def register_scheme(kind: str, name: str, matches: Callable[[str], bool], load: Callable[..., Any]) -> None:
    if kind not in SCHEMES:
        raise SettingError(f"kind must be one of {', '.join(SCHEMES)}; got {kind!r}")
    SCHEMES[kind].insert(0, (name, matches, load))


def scheme_of(kind: str, spec: str) -> str:
    return next(name for name, matches, _ in SCHEMES[kind] if matches(spec))


def _is_url(spec: str) -> bool:
    return spec.startswith(("http://", "https://"))


def _is_hf(spec: str) -> bool:
    return spec.startswith("hf:")


# -- policy models -----------------------------------------------------------------------------
def load_endpoint(spec: str, role: str = "--model", **options: Any) -> Any:
    """``URL[,URL...][#MODEL]``: a model behind OpenAI-compatible servers (replicas),
    probed for what it gives; a URL ending in ``/chat/completions`` sends chat requests. ``OPENAI_API_KEY`` is sent if set; ``PONDER_TOKENIZER``
    names the model's tokenizer.json for exact scoring and token counts."""
    import os

    from ..backends.openai import OpenAILM, parse_endpoint
    from ..errors import BackendError

    try:
        urls, model, chat = parse_endpoint(spec)
        options.setdefault("api_key", os.environ.get("OPENAI_API_KEY") or None)
        options.setdefault("tokenizer", os.environ.get("PONDER_TOKENIZER") or None)
        return OpenAILM(urls, model, chat=chat, **options)
    except (SettingError, BackendError) as e:
        raise SettingError(f"{role}: {e}") from None


def _hf_model(spec: str, role: str, dtype: str, **remote: Any) -> Any:
    if not spec[3:]:
        raise SettingError(f"{role} hf: needs a checkpoint folder or a shipped model's name "
                           "(hf:/path/to/model, hf:arith)")
    from ..backends.hf import HFLM

    return HFLM.from_pretrained(spec[3:], dtype=dtype)


def _native_model(spec: str, role: str, dtype: str, **remote: Any) -> Any:
    from ..backends.native import NativeLM

    return NativeLM.from_pretrained(spec, dtype=dtype)


def load_model(name: Any, role: str = "--model", dtype: str = "float32", **remote: Any) -> Any:
    """A shipped model, a checkpoint folder (a NativeLM), ``hf:NAME_OR_FOLDER`` (the
    same run by transformers, an HFLM), or ``http(s)://...`` (an OpenAI-compatible
    endpoint, ``URL[,URL...][#MODEL]``, with ``remote`` options for OpenAILM); errors
    say which of the command's models (``role``: --model, --draft-model, ...) it was."""
    if not isinstance(name, str) or not name:
        raise SettingError(f"{role} must be a model name or a checkpoint folder; got {name!r}")
    if dtype not in WEIGHT_TYPES:
        raise SettingError(f"--dtype must be one of {', '.join(WEIGHT_TYPES)}; got {dtype!r}")
    scheme = scheme_of("model", name)
    if scheme == "url":
        return load_endpoint(name, role, **remote)
    if remote:
        raise SettingError(f"{role}: {', '.join(sorted(remote))} applies to a remote model (a URL) only")
    load = next(ld for n, _, ld in SCHEMES["model"] if n == scheme)
    try:
        return load(name, role, dtype)
    except SettingError as e:
        raise SettingError(f"{role}: {e}") from None


# -- verifiers ---------------------------------------------------------------------------------
def _remote_reward(spec: str, fmt: str | None, dtype: str, tokenizer: Any = None, **options: Any) -> Any:
    import json
    import os
    from pathlib import Path

    from ..backends.openai import parse_endpoint
    from ..scoring.formats import detect, preset
    from ..scoring.remote import RemoteRewardModel, tokenizer_for

    urls, model, _ = parse_endpoint(spec)
    folder = Path(tokenizer_for(model, tokenizer))
    folder = folder if folder.is_dir() else folder.parent
    config: dict[str, Any] = {}
    if (folder / "config.json").is_file():
        config = json.loads((folder / "config.json").read_text())
    if fmt is None and not config:
        raise SettingError(f"{spec}: a URL cannot show its config.json: name the verifier's format with "
                           "--reward-format (a sweep's or the server's reward_format)", "reward_format")
    f = preset(fmt) if fmt is not None else detect(config, spec)
    template = None
    if f.layout in ("chat", "turns"):
        from ..backends.chat import ChatTemplate

        template = ChatTemplate.from_folder(folder)
    options.setdefault("api_key", os.environ.get("OPENAI_API_KEY") or None)
    eos = config.get("eos_token_id")
    return RemoteRewardModel(urls, model, f, str(folder), template=template, context=config.get("max_position_embeddings"),
                             eos=eos[0] if isinstance(eos, list) else eos, **options)


def _hf_reward(spec: str, fmt: str | None, dtype: str, **options: Any) -> Any:
    from ..scoring.hf_reward import HFRewardModel

    if not spec[3:]:
        raise SettingError("hf: needs a checkpoint folder or a shipped model's name (hf:/path/to/prm)")
    return HFRewardModel.from_pretrained(spec[3:], dtype=dtype, fmt=fmt)


def _local_reward(spec: str, fmt: str | None, dtype: str, **options: Any) -> Any:
    from ..scoring.reward import RewardModel

    return RewardModel.from_pretrained(spec, dtype=dtype, fmt=fmt)


def _generative(spec: str, fmt: Any, dtype: str, role: str, tokenizer: Any = None, **options: Any) -> Any:
    """A generative verifier (GenPRM, ThinkPRM): the verifier is a language model loaded
    as a policy is (any scheme), asked in its own chat template where it has one."""
    from ..backends.chat import ChatTemplate
    from ..scoring.generative import CHAT_REFUSED, GenerativeVerifier

    if _is_url(spec):
        from ..backends.openai import parse_endpoint
        from ..scoring.remote import tokenizer_for

        _, model, chat = parse_endpoint(spec)
        if chat:  # refused before the server is probed
            raise SettingError(CHAT_REFUSED, "reward_model")
        try:  # the verifier's tokenizer folder, where one is known: exact token counts, its chat template
            tokenizer = tokenizer_for(model, tokenizer)
        except SettingError:
            tokenizer = None
        lm = load_model(spec, role, dtype, **({"tokenizer": tokenizer} if tokenizer else {}), **options)
        folder = getattr(lm, "tokenizer_folder", None)
    else:
        lm = load_model(spec, role, dtype)
        folder = getattr(lm, "path", None)
    return GenerativeVerifier(lm, fmt, chat=ChatTemplate.from_folder(folder) if folder else None)


def load_reward_model(name: Any, role: str = "--reward-model", fmt: str | None = None, dtype: str = "float32",
                      **options: Any) -> Any:
    """A verifier by spec (see the module's table), read in ``fmt`` (a format's name;
    default: what the checkpoint's config.json says); errors name ``role``."""
    from ..errors import BackendError

    if not isinstance(name, str) or not name:
        raise SettingError(f"{role} must be a reward model name, a checkpoint folder, hf:FOLDER or URL#MODEL; "
                           f"got {name!r}")
    from ..scoring.generative import generative_format

    scheme = scheme_of("reward", name)
    load = next(ld for n, _, ld in SCHEMES["reward"] if n == scheme)
    try:
        verdicts = generative_format(fmt)
        if verdicts is not None:
            return _generative(name, verdicts, dtype, role, **options)
        return load(name, fmt, dtype, **options)
    except (SettingError, BackendError) as e:
        said = str(e) if str(e).startswith(f"{role}:") else f"{role}: {e}"
        raise SettingError(said, getattr(e, "setting", None)) from None


SCHEMES["model"] += [("url", _is_url, load_endpoint), ("hf", _is_hf, _hf_model), ("local", lambda s: True, _native_model)]
SCHEMES["reward"] += [("url", _is_url, _remote_reward), ("hf", _is_hf, _hf_reward),
                      ("local", lambda s: True, _local_reward)]
