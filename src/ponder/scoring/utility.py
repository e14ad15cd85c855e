"""Utilities for minimum Bayes risk decoding: how much two completions agree.

``utility(a, b) -> float`` in [0, 1], symmetric where the metric is. MBR (Kumar and
Byrne 2004; Bertsch et al. 2023) picks the candidate with the highest expected utility
against the others. Library metrics, not hand-rolled: edit similarity from
``rapidfuzz``, BLEU and chrF from ``sacrebleu``. Any callable of the same shape works.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import SettingError

Utility = Callable[[str, str], float]


def exact_match(extract: Callable[[str], Any] | None = None) -> Utility:
    """1 when both completions give the same answer (``extract``; the whole text
    stripped by default), else 0. A completion without an answer matches nothing."""

    def utility(a: str, b: str) -> float:
        x, y = (extract(a), extract(b)) if extract else (a.strip(), b.strip())
        return 1.0 if x is not None and x == y else 0.0

    utility.__name__ = "exact_match"
    return utility


def edit_similarity(a: str, b: str) -> float:
    """Normalised Indel similarity (rapidfuzz's ``ratio`` / 100)."""
    from rapidfuzz import fuzz

    return fuzz.ratio(a, b) / 100.0


def bleu(a: str, b: str) -> float:
    """Sentence BLEU of ``a`` against reference ``b`` (sacrebleu, exponential smoothing), / 100."""
    import sacrebleu

    return sacrebleu.sentence_bleu(a, [b]).score / 100.0


def chrf(a: str, b: str) -> float:
    """Sentence chrF of ``a`` against reference ``b`` (sacrebleu), / 100."""
    import sacrebleu

    return sacrebleu.sentence_chrf(a, [b]).score / 100.0


UTILITIES: dict[str, Utility] = {"edit": edit_similarity, "bleu": bleu, "chrf": chrf}


def utility_named(name: str | Utility, extract: Callable[[str], Any] | None = None) -> Utility:
    """A utility by name (exact, edit, bleu, chrf) or a user's callable."""
    if callable(name):
        return name
    if name == "exact":
        return exact_match(extract)
    if name not in UTILITIES:
        raise SettingError(f"utility must be one of exact, {', '.join(UTILITIES)} or a callable; got {name!r}")
    return UTILITIES[name]
