"""The engine of each model: one per model object, made on first use, so that every
generator over the same model shares its batch and its prefix cache. Held weakly: a
model that is dropped takes its engine with it."""

from __future__ import annotations

import threading
import weakref
from typing import TYPE_CHECKING, Any

from ..errors import SettingError

if TYPE_CHECKING:
    from .engine import Engine

_ENGINES: "weakref.WeakKeyDictionary[Any, Engine]" = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(lm: Any) -> "Engine":
    """The model's engine, made on first use: one per model object, so every generator
    over the same model shares its batch and prefix cache."""
    with _ENGINES_LOCK:
        eng = _ENGINES.get(lm)
        if eng is None:
            from .engine import Engine

            eng = _ENGINES[lm] = Engine(lm)
        return eng


def clear_prefix_caches() -> int:
    """Empty the prefix cache of every live engine (what a sweep does between chunks,
    so that a configuration's computed tokens never depend on what ran before it).
    Returns the tokens dropped."""
    with _ENGINES_LOCK:
        engines = list(_ENGINES.values())
    dropped = 0
    for eng in engines:
        if eng.prefix_cache is not None:
            with eng._lock:
                dropped += eng.prefix_cache.tokens
                eng.prefix_cache.clear()
    return dropped


def set_engine(lm: Any, engine: "Engine") -> "Engine":
    """Make ``engine`` the one every generator over ``lm`` uses (e.g. one without a
    prefix cache, or with another admission policy); returns it."""
    if engine.lm is not lm:
        raise SettingError("set_engine: the engine was made for another model")
    with _ENGINES_LOCK:
        _ENGINES[lm] = engine
    return engine
