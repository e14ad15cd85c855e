"""Constrained decoding through llguidance: regex, JSON schema, Lark grammars, choices;
and token healing.

A ``Grammar`` is compiled and checked once (an invalid or unsatisfiable grammar is a
``SettingError`` before any generation starts). ``Grammar.constraint()`` makes the
processor that masks every token the grammar cannot take next. It keeps one llguidance
matcher per row, created lazily, so it forks with beams and samples (a deep copy per
row) and rolls back with speculation (llguidance's own ``rollback``), like every other
stateful processor. When the grammar is complete only EOS remains allowed, so a
constrained output ends exactly where its grammar does.

llguidance (Microsoft; used by llama.cpp, vLLM and SGLang) computes a mask in
microseconds for our vocabularies; the mask is applied to the logits as a boolean.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from .common_adapters import NEG_INF, Processor, SettingError


def _one_line(message: str) -> str:
    """llguidance's multi-line diagnostics as one line (the source excerpt dropped)."""
    keep = []
    for line in message.splitlines():
        if re.match(r"^\s*\d+\s*\|", line):
            break
        if line.strip() and line.strip() != "^":
            keep.append(line.strip())
    return " ".join(keep)


def ll_tokenizer(lm: Any):
    """llguidance's view of the model's tokenizer (``tokenizers`` JSON), built once per model."""
    cached = getattr(lm, "_ll_tokenizer", None)
    if cached is not None:
        return cached
    import llguidance

    tok = getattr(lm, "tokenizer", None)
    if tok is None or not hasattr(tok, "to_str"):
        raise SettingError(f"constrained decoding needs a `tokenizers` tokenizer; {getattr(lm, 'name', lm)!r} has none")
    eos = list(lm.eos_token_ids)
    llt = llguidance.LLTokenizer(tok.to_str(), n_vocab=lm.vocab_size, eos_token=eos[0] if eos else None)
    try:
        lm._ll_tokenizer = llt
    except AttributeError:
        pass
    return llt


class Grammar:
    """A compiled constraint for one model's tokenizer. Build with ``Grammar.regex``,
    ``.json_schema``, ``.lark``, ``.choice`` or ``Grammar.from_settings``."""

    def __init__(self, lm: Any, grammar: str, kind: str, source: str) -> None:
        import llguidance

        self.lm, self.kind, self.source = lm, kind, source
        self.tokenizer = ll_tokenizer(lm)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.tokenizer)
        if is_error:
            raise SettingError(f"invalid {kind}: {_one_line(messages[0]) if messages else 'rejected by llguidance'}")
        self.grammar = grammar
        probe = self.matcher()
        if probe.is_error():
            raise SettingError(f"invalid {kind}: {_one_line(probe.get_error())}")
        allowed = self._mask(probe)
        allowed[list(lm.eos_token_ids)] = False  # llguidance leaves EOS open at a dead end
        if not allowed.any() and not probe.is_accepting():
            raise SettingError(f"the {kind} {source!r} cannot be satisfied: no text matches it")

    # -- construction --------------------------------------------------------------------
    @classmethod
    def regex(cls, lm: Any, pattern: str) -> "Grammar":
        import llguidance

        if not isinstance(pattern, str) or not pattern:
            raise SettingError("regex must be a non-empty pattern")
        return cls(lm, llguidance.LLMatcher.grammar_from_regex(pattern), "regex", pattern)

    @classmethod
    def json_schema(cls, lm: Any, schema: dict | str, compact: bool = True) -> "Grammar":
        """A JSON schema given as a dict, a JSON string, or a path to a .json file.
        ``compact`` (the default) fixes the separators and allows no other whitespace,
        so a model cannot spend its tokens on blank space between items."""
        import llguidance

        if isinstance(schema, str):
            text = schema.strip()
            if not text.startswith("{") and Path(text).is_file():
                text = Path(text).read_text()
            try:
                schema = json.loads(text)
            except json.JSONDecodeError as e:
                raise SettingError(f"json schema is neither a JSON object nor a readable file: {e}") from None
        if not isinstance(schema, dict):
            raise SettingError(f"a JSON schema must be a JSON object; got {type(schema).__name__}")
        try:
            g = llguidance.LLMatcher.grammar_from_json_schema(
                schema, defaults={"whitespace_flexible": False} if compact else None)
        except ValueError as e:
            raise SettingError(f"invalid JSON schema: {e}") from None
        return cls(lm, g, "JSON schema", json.dumps(schema)[:80])

    @classmethod
    def lark(cls, lm: Any, grammar: str) -> "Grammar":
        """A Lark grammar (llguidance's dialect: ``start`` is the top rule), as text or a file path."""
        import llguidance

        if isinstance(grammar, str) and "\n" not in grammar and Path(grammar).is_file():
            grammar = Path(grammar).read_text()
        if not isinstance(grammar, str) or not grammar.strip():
            raise SettingError("a Lark grammar must be non-empty text (or a path to a file)")
        return cls(lm, llguidance.LLMatcher.grammar_from_lark(grammar), "Lark grammar", grammar.strip()[:80])

    @classmethod
    def choice(cls, lm: Any, options: Sequence[str]) -> "Grammar":
        """Exactly one of ``options``."""
        import llguidance

        opts = list(options)
        if not opts or not all(isinstance(o, str) and o for o in opts):
            raise SettingError("choice needs at least one non-empty string")
        lark = "start: " + " | ".join(json.dumps(o) for o in opts)
        return cls(lm, llguidance.LLMatcher.grammar_from_lark(lark), "choice", " | ".join(opts))

    @classmethod
    def from_settings(cls, lm: Any, json_schema=None, regex=None, grammar=None, choice=None) -> "Grammar | None":
        given = [(k, v) for k, v in (("json_schema", json_schema), ("regex", regex), ("grammar", grammar),
                                     ("choice", choice)) if v is not None]
        if not given:
            return None
        for k, v in given:
            if isinstance(v, (str, list, tuple)) and not v:
                raise SettingError(f"{k} is empty; give a non-empty {k.replace('_', ' ')} or leave it out")
        if len(given) > 1:
            raise SettingError(f"give one constraint, not {' and '.join(k for k, _ in given)}")
        kind, value = given[0]
        return {"json_schema": cls.json_schema, "regex": cls.regex, "grammar": cls.lark, "choice": cls.choice}[kind](lm, value)

    # -- matching ----------------------------------------------------------------------------
    def matcher(self):
        import llguidance

        return llguidance.LLMatcher(self.tokenizer, self.grammar, log_level=0)

    def _mask(self, matcher) -> torch.Tensor:
        """Allowed next tokens [V] (bool) of one matcher."""
        bits = np.full((1, (self.lm.vocab_size + 31) // 32), -1, dtype=np.int32)
        matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        return torch.from_numpy(_allowed(bits, self.lm.vocab_size)[0])

    def constraint(self) -> "GrammarConstraint":
        return GrammarConstraint(self)

    def accepts(self, text: str) -> bool:
        """Does the grammar accept ``text`` completely (tokenized by the model)?"""
        m = self.matcher()
        ids = self.lm.encode(text, add_special_tokens=False)
        return m.consume_tokens(ids) and m.is_accepting()

    def accepts_ids(self, ids: Sequence[int]) -> bool:
        """Does the grammar accept these generated token ids as a complete output?"""
        m = self.matcher()
        return m.consume_tokens(list(ids)) and m.is_accepting()

    def __repr__(self) -> str:
        return f"Grammar({self.kind}: {self.source!r})"


def _allowed(bits: np.ndarray, vocab: int) -> np.ndarray:
    """llguidance's int32 bitmask [B, ceil(V/32)] -> bool [B, V]: bit i of word w is
    token 32w + i. On little-endian machines that is one np.unpackbits call."""
    if sys.byteorder == "little":
        return np.unpackbits(bits.view(np.uint8), axis=-1, count=vocab, bitorder="little").view(bool)
    return ((bits[:, :, None] >> np.arange(32, dtype=np.int32)) & 1).astype(bool).reshape(bits.shape[0], -1)[:, :vocab]


class GrammarConstraint(Processor):
    """Masks tokens the grammar cannot take next. One matcher per row (forkable,
    rollback-able), created on first use so a fresh request starts at the grammar's start."""

    def __init__(self, grammar: Grammar) -> None:
        self.grammar = grammar
        self._matchers: list | None = None
        self._bits: np.ndarray | None = None  # [B, ceil(V/32)] int32, llguidance's mask layout
        self._bits_at = 0  # its address (numpy's .ctypes costs microseconds per call)

    def _ensure(self, batch: int) -> list:
        if self._matchers is None or len(self._matchers) != batch:
            self._matchers = [self.grammar.matcher() for _ in range(batch)]
        return self._matchers

    def __call__(self, tokens, logits):
        B, V = logits.shape
        ms = self._ensure(B)
        W = (V + 31) // 32
        if self._bits is None or self._bits.shape != (B, W):
            self._bits = np.empty((B, W), dtype=np.int32)
            self._bits_at = self._bits.ctypes.data
        bits, base = self._bits, self._bits_at
        for i, m in enumerate(ms):
            if m.is_error():
                raise RuntimeError(f"constraint {self.grammar!r} is in an error state: {m.get_error()}")
            m.unsafe_compute_mask_ptr(base + i * W * 4, W * 4)
        allowed = _allowed(bits, V)  # numpy: one call, not four torch ops
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
            # one numpy pass over the (CPU) logits instead of two more torch ops
            return torch.from_numpy(np.where(allowed, logits.numpy(), np.float32(NEG_INF)))
        return logits.masked_fill(torch.from_numpy(~allowed).to(logits.device), NEG_INF)

    def accept(self, tokens):
        ms = self._ensure(tokens.shape[0])
        for m, t in zip(ms, tokens.tolist()):
            if not m.is_stopped():
                m.consume_token(t)

    def fork(self, rows):
        new = GrammarConstraint(self.grammar)
        if self._matchers is not None:
            new._matchers = [self._matchers[r].deep_copy() for r in rows]
        return new

    def rollback(self, n):
        for m in self._matchers or []:
            m.rollback(n)

    def reset(self):
        self._matchers = None

    def __repr__(self) -> str:
        return f"GrammarConstraint({self.grammar!r})"


# -- token healing ---------------------------------------------------------------------------
def heal_prompt(lm: Any, prompt_ids: Sequence[int], max_back: int = 1) -> tuple[list[int], str]:
    """Token healing (Lundberg, guidance 2023): drop the prompt's last ``max_back``
    tokens (never the first) and return (shortened ids, the text they spelled). The
    generation must then start by re-spelling that text, possibly with a longer token
    the prompt boundary had split, which ``PrefixConstraint`` enforces."""
    ids = list(prompt_ids)
    k = max(0, min(max_back, len(ids) - 1))
    if k == 0:
        return ids, ""
    full = lm.decode(ids, skip_special_tokens=False)
    head = lm.decode(ids[:-k], skip_special_tokens=False)
    if not full.startswith(head):
        return ids, ""
    return ids[:-k], full[len(head):]


class PrefixConstraint(Processor):
    """Allow only tokens consistent with row i's output starting with ``prefixes[i]``:
    until the prefix is spelled, a token must either extend it (be a prefix of what is
    left) or complete it (start with what is left). After that it changes nothing."""

    def __init__(self, lm: Any, prefixes: Sequence[str]) -> None:
        self.prefixes = [prefixes] if isinstance(prefixes, str) else list(prefixes)
        self.is_identity = not any(self.prefixes)
        # token id -> its text, computed once
        self._texts = [lm.decode([t], skip_special_tokens=False) for t in range(lm.vocab_size)]
        self._spelled = [[] for _ in self.prefixes]  # per row, the texts of accepted tokens

    def __call__(self, tokens, logits):
        if logits.shape[0] != len(self.prefixes):
            raise ValueError(f"PrefixConstraint has {len(self.prefixes)} rows; the batch has {logits.shape[0]}")
        out = logits
        for i, (prefix, pieces) in enumerate(zip(self.prefixes, self._spelled)):
            done = "".join(pieces)
            left = prefix[len(done):] if len(done) < len(prefix) else ""
            if not left:
                continue
            ok = torch.tensor([bool(s) and (left.startswith(s) or s.startswith(left)) for s in self._texts])
            out = out.clone() if out is logits else out
            out[i].masked_fill_(~ok, NEG_INF)
        return out

    def accept(self, tokens):
        for pieces, t in zip(self._spelled, tokens.tolist()):
            pieces.append(self._texts[t])

    def fork(self, rows):
        new = object.__new__(PrefixConstraint)
        new.__dict__.update(self.__dict__)
        new.prefixes = [self.prefixes[r] for r in rows]
        new._spelled = [list(self._spelled[r]) for r in rows]
        return new

    def rollback(self, n):
        for pieces in self._spelled:
            del pieces[max(0, len(pieces) - n):]

    def reset(self):
        self._spelled = [[] for _ in self.prefixes]
