"""The processor contract and its composition. Imports nothing heavy.

A processor is ``(tokens, logits) -> logits``, batched: ``tokens`` [B, T] is the
history (prompt + generated) left-padded with -1, ``logits`` [B, V]. Stateful
processors implement ``accept`` / ``fork`` / ``rollback`` / ``reset`` (llama.cpp's
sampler-chain contract); for stateless ones the hooks do nothing. ``Chain`` composes
processors and is itself a processor (optax's ``chain``). The engine runs chains, the
decoding algorithms build them: so this sits below both.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .errors import SettingError


class Processor:
    """Base class: stateless processors inherit no-op state hooks."""

    is_identity = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        raise NotImplementedError

    def batch_key(self) -> Any:
        """A hashable value equal for processors that act alike on every row and read
        no history (so the engine may run one over several requests' rows at once);
        None (the default) when that is not known."""
        return None

    def banned(self) -> tuple[list[int], int] | None:
        """(ids, k) when all this processor does is forbid ``ids`` for the next k tokens
        (min_tokens does: EOS until the k-th): the engine may then decode several
        greedy steps per call, applying the ban itself. None (the default): anything else."""
        return None

    # Stateful processors override these; for stateless ones they do nothing.
    def accept(self, tokens: Any) -> None:
        """Record the tokens [B] just chosen."""

    def fork(self, rows: Sequence[int]) -> "Processor":
        """A processor whose row i continues the state of row ``rows[i]``."""
        return self

    def rollback(self, n: int) -> None:
        """Forget the last ``n`` accepted tokens."""

    def reset(self) -> None:
        """Back to the state before any token was accepted."""

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Identity(Processor):
    is_identity = True

    def banned(self):
        return [], 0

    def __call__(self, tokens, logits):
        return logits

    def batch_key(self):
        return ()


class FunctionProcessor(Processor):
    """Wrap a user's plain callable ``(tokens, logits) -> logits`` (per-request processors)."""

    def __init__(self, fn: Callable[[Any, Any], Any]) -> None:
        if not callable(fn):
            raise SettingError(f"a processor must be callable; got {type(fn).__name__}")
        self.fn = fn

    def __call__(self, tokens, logits):
        out = self.fn(tokens, logits)
        if getattr(out, "shape", None) != logits.shape or type(out) is not type(logits):
            raise SettingError(f"processor {self.fn!r} must return a tensor of shape {tuple(logits.shape)}")
        return out

    def __repr__(self) -> str:
        return f"FunctionProcessor({getattr(self.fn, '__name__', self.fn)!r})"


class Chain(Processor):
    """Apply processors in order; a chain is itself a processor."""

    def __init__(self, *processors: Any) -> None:
        flat: list[Processor] = []
        for p in processors:
            if p is None:
                continue
            if not isinstance(p, Processor):
                p = FunctionProcessor(p)
            if isinstance(p, Chain):
                flat.extend(p.processors)
            elif not p.is_identity:
                flat.append(p)
        self.processors = flat
        self.is_identity = not flat

    def __call__(self, tokens, logits):
        for p in self.processors:
            logits = p(tokens, logits)
        return logits

    def batch_key(self):
        keys = tuple(p.batch_key() for p in self.processors)
        return None if any(k is None for k in keys) else keys

    def banned(self):
        bans = [p.banned() for p in self.processors]
        if not bans:
            return [], 0
        return bans[0] if len(bans) == 1 else None  # one ban; two of them are left to the step path

    def accept(self, tokens):
        for p in self.processors:
            p.accept(tokens)

    def fork(self, rows):
        return Chain(*(p.fork(rows) for p in self.processors))

    def rollback(self, n):
        for p in self.processors:
            p.rollback(n)

    def reset(self):
        for p in self.processors:
            p.reset()

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.processors))})"


def chain(*processors: Any) -> Chain:
    return Chain(*processors)
