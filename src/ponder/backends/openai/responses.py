"""Reading a server's answers: a chat choice as a completions choice, a choice's text,
and the tokenizer a client counts and scores with where the server gives no ids."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ...errors import SettingError


def choice_text(c: dict[str, Any]) -> str | None:
    """A completion's or a chat completion's text."""
    return (chat_choice(c) if "message" in c else c).get("text")


def chat_choice(c: dict[str, Any]) -> dict[str, Any]:
    """A chat choice as a completions choice: ``message.content`` as ``text``, and
    ``logprobs.content`` [{token, logprob, top_logprobs: [{token, logprob}]}] as
    ``token_logprobs`` and ``top_logprobs``."""
    out = {k: v for k, v in c.items() if k not in ("message", "logprobs")}
    out["text"] = (c.get("message") or {}).get("content") or ""
    content = (c.get("logprobs") or {}).get("content")
    if isinstance(content, list) and content:
        out["logprobs"] = {
            "token_logprobs": [t.get("logprob") for t in content],
            "top_logprobs": [{x["token"]: x["logprob"] for x in (t.get("top_logprobs") or [])} for t in content]
            if any(t.get("top_logprobs") for t in content) else None,
        }
    return out


def load_tokenizer(tok: Any) -> Any:
    if tok is None or (not isinstance(tok, (str, Path)) and hasattr(tok, "encode")):
        return tok
    from tokenizers import Tokenizer

    p = Path(tok)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise SettingError(f"tokenizer must be a tokenizer.json file or a folder holding one; {tok} is neither")
    return Tokenizer.from_file(str(f))
