"""ponder: inference-time algorithms for language models.

The names a first program needs, loaded when first used (``import ponder`` itself
imports nothing heavy)::

    import ponder

    lm = ponder.load_model("arith")                          # a name, a folder, hf:FOLDER or URL#MODEL
    gen = ponder.build("majority", lm, ponder.SamplingParams(temperature=0.7),
                       {"samples": 16}, ponder.Context(task=ponder.load_task("arith")))
    (best,) = gen.generate("Q: 3+4-2\\n")
    print(best.text, best.usage)
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it
_PUBLIC = {
    "SamplingParams": "ponder.params",
    "Generation": "ponder.types",
    "Usage": "ponder.types",
    "SettingError": "ponder.errors",
    "NativeLM": "ponder.backends.native",
    "OpenAILM": "ponder.backends.openai",
    "Greedy": "ponder.decoding.generate",
    "Sample": "ponder.decoding.generate",
    "MajorityVote": "ponder.meta.parallel",
    "RewardModel": "ponder.scoring.reward",
    "build": "ponder.strategies",
    "Context": "ponder.strategies",
    "STRATEGIES": "ponder.strategies",
    "load_model": "ponder.strategies",
    "load_reward_model": "ponder.strategies",
    "load_task": "ponder.tasks.registry",
    "ArithTask": "ponder.tasks.arith",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:  # PEP 562: each name imported when first asked for
    if name not in _PUBLIC:
        raise AttributeError(f"module 'ponder' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
