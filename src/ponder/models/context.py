"""A model's context, as its config.json limits it: how many positions it may run over,
and which key says so (named in errors)."""

from __future__ import annotations

from typing import Any

from ..errors import SettingError


def context_limit(lm: Any) -> str:
    """The config.json key that sets a model's context: its sliding window when a layer
    uses one narrower than the positions, else max_position_embeddings."""
    return getattr(lm, "context_limit", None) or "max_position_embeddings"


def check_context(lm: Any, n_tokens: int, what: str) -> None:
    """Refuse ``n_tokens`` positions beyond the model's context, by name: past a sliding
    window the model would attend to keys the window drops, silently wrong."""
    ctx = getattr(lm, "context_length", None)
    if ctx is not None and n_tokens > ctx:
        raise SettingError(
            f"{what} is {n_tokens} tokens, but model {getattr(lm, 'name', '')!r} has a context of {ctx} "
            f"({context_limit(lm)}); past it the model's outputs are wrong, so shorten it to at most {ctx} tokens")
