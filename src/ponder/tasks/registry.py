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


JSONL_OPTIONS = ("question_field", "answer_field", "id_field", "format", "prompt", "name")


def load_task(name_or_path: str, **options: Any) -> Any:
    """A registered task by name, or a JSONL file of problems (GSM8K or MATH style;
    ``options``: question_field, answer_field, id_field, format = gsm8k | math,
    prompt = a template with {question}, name)."""
    if name_or_path in TASKS:
        if options:
            raise SettingError(f"task {name_or_path} takes no options; got {', '.join(options)}")
        return TASKS[name_or_path]()
    if str(name_or_path).endswith(".jsonl"):
        from .base import JsonlTask

        unknown = set(options) - set(JSONL_OPTIONS)
        if unknown:
            raise SettingError(f"a JSONL task does not take {', '.join(sorted(unknown))}; it takes "
                               f"{', '.join(JSONL_OPTIONS)}")
        path = Path(name_or_path)
        if not path.is_file():
            raise SettingError(f"task file {name_or_path} does not exist", "task")
        if "prompt" in options:
            options["prompt_template"] = options.pop("prompt")
        return JsonlTask(path, **options)
    raise SettingError(f"task {name_or_path!r} is unknown; choose one of {', '.join(TASKS)} or give a .jsonl file",
                       "task")


def _arith() -> Any:
    from .arith import ArithTask

    return ArithTask()


register("arith", _arith)
