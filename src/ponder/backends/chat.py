"""Chat prompts: ``messages`` rendered to the text a causal model continues.

A checkpoint's ``tokenizer_config.json`` may carry a Jinja ``chat_template``; it is
rendered as transformers renders it (``jinja2`` sandbox, ``trim_blocks`` and
``lstrip_blocks``, ``raise_exception``, the tokenizer's special tokens as variables,
``add_generation_prompt``). A model without one (the shipped ``arith`` is a base
model) gets the plain fallback: the messages' contents joined, so a user message
``"Q: 3+4\\n"`` is the prompt ``"Q: 3+4\\n"``.

A final assistant message is continued, not closed (``continue_final_message``): that
is how a step-level search extends an assistant turn one step at a time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import SettingError

ROLES = ("system", "user", "assistant", "tool", "developer")


def check_messages(messages: Any, field: str = "messages") -> list[dict[str, str]]:
    """Messages as a list of {role, content}; errors name the message at fault."""
    if not isinstance(messages, list) or not messages:
        raise SettingError(f"{field} must be a non-empty list of {{role, content}} objects")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise SettingError(f"{field}[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise SettingError(f"{field}[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        if isinstance(content, list):  # content parts: text only
            try:
                content = "".join(p["text"] for p in content if p.get("type") == "text")
            except (TypeError, KeyError, AttributeError):
                raise SettingError(f"{field}[{i}].content parts must be {{type: text, text}} objects") from None
        if not isinstance(content, str):
            raise SettingError(f"{field}[{i}].content must be a string; got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


class ChatTemplate:
    """A compiled chat template (or the plain fallback when ``source`` is None)."""

    def __init__(self, source: str | None, special: dict[str, str] | None = None) -> None:
        self.source = source
        self.special = special or {}
        self._template = None
        if source is not None:
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(msg: str) -> None:
                raise SettingError(f"the chat template refused the messages: {msg}")

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = raise_exception
            env.filters["tojson"] = lambda x, indent=None, **kw: json.dumps(x, indent=indent, ensure_ascii=False)
            try:
                self._template = env.from_string(source)
            except jinja2.TemplateError as e:
                raise SettingError(f"chat_template does not compile: {e}") from None

    @classmethod
    def from_folder(cls, folder: str | Path | None) -> "ChatTemplate":
        """The template of a checkpoint folder's tokenizer_config.json, else the fallback."""
        f = Path(folder) / "tokenizer_config.json" if folder is not None else None
        if f is None or not f.is_file():
            return cls(None)
        try:
            cfg = json.loads(f.read_text())
        except ValueError as e:
            raise SettingError(f"{f}: not JSON ({e})") from None
        tpl = cfg.get("chat_template")
        if isinstance(tpl, list):  # named templates: the default one
            tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items()
                   if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v}
        return cls(tpl if isinstance(tpl, str) else None, special)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        messages = check_messages(list(messages))
        continue_final = messages[-1]["role"] == "assistant"
        if self._template is None:
            return "".join(m["content"] for m in messages)
        if not continue_final:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special)
        # continue the final assistant turn: render it closed, then cut at its content's end
        text = self._template.render(messages=messages, add_generation_prompt=False, **self.special)
        last = messages[-1]["content"]
        at = text.rfind(last) if last else -1
        if at < 0:
            raise SettingError("cannot continue the final assistant message: the chat template does not "
                               "reproduce its content")
        return text[: at + len(last)]
