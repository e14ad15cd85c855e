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
        if isinstance(content, list):  # content parts: text only, and never dropped silently
            texts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise SettingError(f"{field}[{i}].content[{j}] is a {kind or type(part).__name__!s} part; this "
                                       "model reads text only: send {type: text, text} parts")
                if not isinstance(part.get("text"), str):
                    raise SettingError(f"{field}[{i}].content[{j}].text must be a string")
                texts.append(part["text"])
            content = "".join(texts)
        if not isinstance(content, str):
            raise SettingError(f"{field}[{i}].content must be a string; got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _json(f: Path) -> dict[str, Any]:
    """A JSON object from ``f``; {} when the file is absent."""
    if not f.is_file():
        return {}
    try:
        out = json.loads(f.read_text())
    except ValueError as e:
        raise SettingError(f"{f}: not JSON ({e})") from None
    return out if isinstance(out, dict) else {}


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
        """The template of a checkpoint folder, else the fallback. Read as transformers
        reads it: ``chat_template.jinja`` (what transformers 4.5x+ saves), then the
        older ``chat_template.json``, then ``tokenizer_config.json``'s ``chat_template``;
        the special tokens come from ``tokenizer_config.json``."""
        if folder is None:
            return cls(None)
        folder = Path(folder)
        cfg = _json(folder / "tokenizer_config.json")
        tpl = cfg.get("chat_template")
        if (folder / "chat_template.json").is_file():
            tpl = _json(folder / "chat_template.json").get("chat_template", tpl)
        if (folder / "chat_template.jinja").is_file():
            tpl = (folder / "chat_template.jinja").read_text()
        if isinstance(tpl, list):  # named templates: the default one
            tpl = next((t.get("template") for t in tpl if t.get("name") == "default"), None)
        special = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in cfg.items()
                   if k in ("bos_token", "eos_token", "unk_token", "pad_token") and v}
        return cls(tpl if isinstance(tpl, str) else None, special)

    @classmethod
    def load(cls, spec: str, model: Any = None) -> "ChatTemplate":
        """``spec``: ``auto`` (the model's own folder: an in-process model's checkpoint,
        a remote model's ``tokenizer=`` folder), a checkpoint folder, a
        ``tokenizer_config.json``, or a Jinja file. Unlike ``from_folder``, a template
        must be found: asking for one and silently getting the plain fallback would
        send a chat model prompts it was not trained on."""
        if not isinstance(spec, str) or not spec:
            raise SettingError(f"--chat-template must be auto, a checkpoint folder, a tokenizer_config.json or a "
                               f"Jinja file; got {spec!r}")
        if spec == "auto":
            folder = getattr(model, "path", None) or getattr(model, "tokenizer_folder", None)
            if folder is None:
                raise SettingError(f"--chat-template auto: model {getattr(model, 'name', model)!r} has no local folder "
                                   "to read a chat template from; give the template's folder or file (for a "
                                   "remote model, pass its tokenizer folder)")
            p = Path(folder)
        else:
            p = Path(spec).expanduser()
        if p.is_dir():
            tpl = cls.from_folder(p)
            if tpl.source is None:
                raise SettingError(f"--chat-template: {p} holds no chat_template (neither chat_template.jinja nor "
                                   "one in tokenizer_config.json); give a folder that has one, or a Jinja file")
            return tpl
        if not p.is_file():
            raise SettingError(f"--chat-template: {p} does not exist")
        if p.suffix == ".json":
            tpl = cls.from_folder(p.parent) if p.name in ("tokenizer_config.json", "chat_template.json") else None
            if tpl is None or tpl.source is None:
                raise SettingError(f"--chat-template: {p} holds no chat_template; give a model's "
                                   "tokenizer_config.json that has one, or a Jinja file")
            return tpl
        if p.name == "chat_template.jinja":  # with the folder's special tokens
            return cls(p.read_text(), cls.from_folder(p.parent).special)
        return cls(p.read_text())

    def prompt_for(self, text: str) -> str:
        """``text`` as one user message, rendered up to the assistant's turn: what a
        task's prompt becomes for a chat model. Whatever an algorithm appends (its
        steps so far) then continues the assistant turn."""
        return self.render([{"role": "user", "content": text}], add_generation_prompt=True)

    def render_closed(self, messages: Sequence[dict[str, str]]) -> str:
        """The whole conversation with every turn closed, the last assistant turn too (as
        a reward model's card renders what it scores), not continued as ``render`` does."""
        messages = check_messages(list(messages))
        if self._template is None:
            return "".join(m["content"] for m in messages)
        return self._template.render(messages=messages, add_generation_prompt=False, **self.special)

    def render(self, messages: Sequence[dict[str, str]], add_generation_prompt: bool = True) -> str:
        messages = check_messages(list(messages))
        continue_final = messages[-1]["role"] == "assistant"
        if self._template is None:
            return "".join(m["content"] for m in messages)
        if not continue_final:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **self.special)
        # Continue the final assistant turn as transformers does: mark the content's end
        # with a tag, render, cut at the tag (and drop trailing space the template trimmed).
        tag = "CONTINUE_FINAL_MESSAGE_TAG "
        last = messages[-1]["content"]
        tagged = messages[:-1] + [{**messages[-1], "content": last + tag}]
        text = self._template.render(messages=tagged, add_generation_prompt=False, **self.special)
        at = text.rfind(tag.strip())
        if at < 0 or last.strip() not in text:
            raise SettingError("cannot continue the final assistant message: the chat template does not "
                               "reproduce its content")
        return text[:at] if text[at : at + len(tag)] == tag else text[:at].rstrip()
