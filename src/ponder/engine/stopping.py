"""Stop strings matched on decoded text, and incremental detokenisation.

Stop strings are matched on text, not on token ids, so a stop string spelled across
two tokens (``"\\nAn" + "swer"``) is still found. Streaming holds back any tail of
the text that could be the start of a stop string, so a stop string never leaks out.
"""

from __future__ import annotations

from typing import Callable, Sequence


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas.

    Byte-level BPE can split one character over several tokens, so a delta is only
    released once it no longer ends in an incomplete character (the prefix/read
    offset method used by TGI and vLLM).
    """

    def __init__(self, decode: Callable[[Sequence[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        prefix_text = self.decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self.decode(self.ids[self.prefix_offset :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            return new_text[len(prefix_text) :]
        return ""


class StopStringMatcher:
    """Finds the earliest stop string in accumulated text."""

    def __init__(self, stops: Sequence[str]) -> None:
        for s in stops:
            if not isinstance(s, str) or s == "":
                raise ValueError(f"stop strings must be non-empty strings; got {s!r}")
        self.stops = list(stops)
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_from: int) -> tuple[int, str] | None:
        """Earliest (index, stop) with a match ending after ``new_from``, else None."""
        if not self.stops:
            return None
        start = max(0, new_from - self.longest + 1)
        best: tuple[int, str] | None = None
        for s in self.stops:
            i = text.find(s, start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, s)
        return best

    def safe_length(self, text: str) -> int:
        """How much of ``text`` can be released: all of it but a tail that is a proper
        prefix of some stop string (it may still complete into one)."""
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return len(text) - hold
