"""Tasks by name: the registry ``ponder eval`` (and later ``ponder sweep``) use.

``load_task("arith")`` gives a registered task; a path ending in ``.jsonl`` gives a
GSM8K-style ``JsonlTask``. Later task families register theirs with ``register``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from ..errors import SettingError

TASKS: dict[str, Callable[[], Any]] = {}


def register(name: str, factory: Callable[[], Any]) -> None:
    TASKS[name] = factory


def load_task(name_or_path: str) -> Any:
    """A registered task by name, or a JSONL file of ``{"question", "answer"}`` rows."""
    if name_or_path in TASKS:
        return TASKS[name_or_path]()
    if str(name_or_path).endswith(".jsonl"):
        from .base import JsonlTask

        path = Path(name_or_path)
        if not path.is_file():
            raise SettingError(f"task file {name_or_path} does not exist")
        return JsonlTask(path)
    raise SettingError(f"task {name_or_path!r} is unknown; choose one of {', '.join(TASKS)} or give a .jsonl file")


def _arith() -> Any:
    from .arith import ArithTask

    return ArithTask()


register("arith", _arith)
