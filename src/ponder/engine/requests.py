"""What a request to the engine is, and whether it may run.

``Request`` holds one prompt, its ``n`` samples and everything that must not leak to
other requests (processors, options, seed streams); ``check_prompt`` and
``context_budget`` say whether the model can take it and how far it may generate;
``FifoAdmission`` decides when waiting requests join the batch; and
``invalid_logits_error`` names what broke a request's scores. ``engine.py`` runs the
batch these feed.
"""

from __future__ import annotations

import collections
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch

from ..models.context import context_limit
from ..errors import InvalidLogitsError, SettingError
from ..params import MAX_SEED  # seeds are in [0, MAX_SEED)
from ..processor import Chain
from ..types import Generation
from .stopping import IncrementalDetokenizer, StopStringMatcher

DRAW_BLOCK = 64  # uniform draws taken from a sample's generator at a time


def random_seed() -> int:
    """A fresh seed for a call given none: its samples differ from each other and from
    other calls', and are reproducible together from ``Generation``-level seeding."""
    return int.from_bytes(os.urandom(8), "little") % MAX_SEED


def row_generator(seed: int, sample: int) -> torch.Generator:
    """The RNG of sample ``sample`` of a request seeded with ``seed``: it depends on
    nothing else, so a seeded request samples the same alone or inside a batch. The
    engine reads it DRAW_BLOCK uniforms at a time (one torch call per sample per 64
    steps instead of one per step)."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + sample * 7_919 + 1) % MAX_SEED)
    return g


@dataclass
class StreamEvent:
    """One step of one output: ``index`` is the output's position in the call (prompt i,
    sample j -> i * n + j); ``text`` is newly released text."""

    index: int
    token_id: int | None
    text: str
    generation: Generation | None = None  # set on the event that finishes the output
    # the tokens this event covers (since the output's previous event), with their
    # log-probabilities and, when asked, their top-k alternatives
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class _Row:
    sample: int
    detok: IncrementalDetokenizer | None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top: list[dict[int, float]] | None = None  # the top-k log-probabilities at each token, when asked
    text: str = ""
    released: int = 0
    emitted: int = 0  # tokens covered by stream events so far
    finish: str | None = None
    stop: str | int | None = None
    computed: int = 0  # decode-step tokens this sample's physical row computed on its behalf


def event(r: "Request", row: _Row, text: str, generation: Generation | None = None) -> StreamEvent:
    """The stream event of ``row``'s new text, covering its tokens since the last event."""
    a, b = row.emitted, len(row.ids)
    row.emitted = b
    return StreamEvent(r.index_base + row.sample, row.ids[-1] if row.ids else None, text, generation,
                       row.ids[a:b], row.logprobs[a:b], row.top[a:b] if row.top is not None else None)


class Request:
    """One prompt and its ``n`` samples, with everything that must not leak to others."""

    def __init__(self, prompt: Sequence[int], n: int, pick: Callable, processors: Chain, options: Any,
                 seed: int | None, stream: bool = False, index_base: int = 0, healed: str = "",
                 top_logprobs: int = 0) -> None:
        self.prompt = list(prompt)
        self.n, self.pick, self.template, self.options = n, pick, processors, options
        self.seed = random_seed() if seed is None else seed
        self.stream, self.index_base = stream, index_base
        self.stopper = StopStringMatcher(options.stop)
        # Text token healing took off the prompt's end: the processors (built by the
        # caller) make the output re-spell it first, and the engine strips it from the text.
        self.healed = healed
        self.max_new = options.max_tokens  # lowered on submission to what the context leaves
        self.top_logprobs = top_logprobs  # k: record each token's k most likely alternatives
        self.outputs: list[Generation | None] = [None] * n
        self.events: collections.deque[StreamEvent] = collections.deque()
        self.error: BaseException | None = None
        # The caller's cancel event: every step drops a request whose event is set, so a
        # caller that gave up frees its rows even if it never runs again (an abandoned
        # stream whose clean-up was itself cancelled).
        self.cancel: Any = None
        self.submitted = False
        self.arrived = 0.0  # perf_counter at submission, and at its first token (for /metrics)
        self.first_token_at: float | None = None
        self.reused = 0  # prompt tokens served by the prefix cache
        self.prompt_wall = 0.0
        # set on admission
        self.rows: list[_Row] = []
        # Physical batch rows, in batch order; each lists the live samples that follow it.
        # All n samples start on one row and split only when they pick different tokens.
        self.phys: list[list[int]] = []
        self.procs: Any = None  # one state per physical row
        self.samples: list[int] = []  # the live samples in physical-row order (phys, flattened)
        self.sample_index: torch.Tensor | None = None  # the same as a tensor; None when it is 0 .. n-1
        self.owner: torch.Tensor | None = None  # physical row of each live sample, when rows are shared
        self.needs_text = False  # streaming, stop strings or healing: text is decoded as tokens come
        self.gens: list[torch.Generator] = []  # one RNG per sample
        self.draws: torch.Tensor | None = None  # [n, DRAW_BLOCK] float64: every sample's next draws
        self.steps = 0  # decode steps taken; every live sample draws once per step
        self.wall = 0.0  # wall time billed so far to each sample still live (all started together)
        # Token history of each physical row (prompt + generated), what history-reading
        # processors see: the first hist_len columns of a buffer grown by doubling, so
        # a step writes one column instead of copying the whole history.
        self.history: torch.Tensor | None = None  # [physical rows, capacity]
        self.hist_len = 0
        self.stop_ids: set[int] = set()

    @property
    def done(self) -> bool:
        return self.error is not None or all(o is not None for o in self.outputs)


@dataclass
class FifoAdmission:
    """The admission policy: waiting requests join in arrival order while the batch
    stays within ``max_rows`` rows and ``max_kv_bytes`` of KV (None: no KV budget). A
    request's KV is bounded by its worst case, n rows of prompt + max_new tokens; the
    first waiting request always joins an empty batch, so none waits forever. A
    priority or fair-share policy replaces this object (``Engine(admission=...)``)."""

    max_rows: int = 256
    max_kv_bytes: int | None = 4 * 2**30

    def __post_init__(self) -> None:
        if not isinstance(self.max_rows, int) or self.max_rows < 1:
            raise SettingError(f"max_rows must be an integer >= 1; got {self.max_rows!r}")
        if self.max_kv_bytes is not None and not (isinstance(self.max_kv_bytes, int) and self.max_kv_bytes > 0):
            raise SettingError(f"max_kv_bytes must be a positive integer or None; got {self.max_kv_bytes!r}")

    def select(self, waiting: Sequence[Request], rows: int, kv_bytes: int,
               kv_need: Callable[[Request], int]) -> list[Request]:
        """The requests to admit now, a prefix of ``waiting``, given the running
        batch's ``rows`` and the KV ``kv_bytes`` reserved for it."""
        out: list[Request] = []
        for r in waiting:
            need = kv_need(r)
            fits = rows + r.n <= self.max_rows and (self.max_kv_bytes is None or kv_bytes + need <= self.max_kv_bytes)
            if not fits and (rows or out):
                break
            out.append(r)
            rows += r.n
            kv_bytes += need
        return out


def check_prompt(lm: Any, ids: Sequence[int]) -> None:
    """A prompt the model can take: non-empty, token ids in its vocabulary, and shorter
    than its context (room for at least one new token). SettingError otherwise."""
    if not ids:
        raise SettingError("the prompt is empty; give at least one token")
    vocab = getattr(lm, "vocab_size", None)
    for t in ids:
        if not isinstance(t, int) or isinstance(t, bool) or t < 0 or (vocab is not None and t >= vocab):
            raise SettingError(f"prompt token ids must be integers in [0, {vocab}); got {t!r}")
    context_budget(lm, len(ids), 1)


def context_budget(lm: Any, prompt_len: int, max_tokens: int) -> int:
    """The tokens a request may generate after a prompt of ``prompt_len`` tokens:
    ``max_tokens``, lowered to what the model's context leaves (generation then ends
    there with "length"). A SettingError when the prompt leaves no room at all."""
    ctx = getattr(lm, "context_length", None)
    if ctx is None:
        return max_tokens
    if prompt_len >= ctx:
        raise SettingError(
            f"the prompt has {prompt_len} tokens, but model {getattr(lm, 'name', '')!r} has a context of {ctx} "
            f"({context_limit(lm)}), which must also hold the generated tokens; shorten the prompt "
            f"to at most {ctx - 1} tokens")
    return min(max_tokens, ctx - prompt_len)


def invalid_logits_error(procs: Any, history: torch.Tensor, logits: torch.Tensor) -> InvalidLogitsError:
    """Name what made a row's scores unusable: the model's own logits, or the first
    processor of the chain whose output holds NaN or +inf, or masks every token.
    Replays the chain step by step (processors' ``__call__`` changes no state)."""

    def what(x: torch.Tensor) -> str | None:
        if bool(torch.isnan(x).any()):
            return "NaN"
        if bool(torch.isposinf(x).any()):
            return "+inf"
        if not bool(torch.isfinite(x.amax(-1)).all()):
            return "no finite score (every token masked)"
        return None

    bad = what(logits)
    if bad is not None:
        return InvalidLogitsError(f"the model's logits hold {bad}; the request cannot pick a token")
    x = logits
    for p in getattr(procs, "processors", [procs]):
        x = p(history, x)
        bad = what(x)
        if bad is not None:
            return InvalidLogitsError(
                f"after processor {p!r} the scores hold {bad}; the request cannot pick a token: change that "
                "setting (a logit bias of -inf on every token, a constraint the prompt cannot follow, ...)")
    return InvalidLogitsError("the processed scores hold NaN, +inf or no finite entry")
