"""Token-level generation on a logits-level model: greedy and sampling.

Every prompt becomes a request to the model's engine (``ponder.engine.Engine``), which
prefills each distinct prompt once (reusing cached prefixes), forks its KV cache into
``n`` rows, then repeats { processors -> pick a token -> check stops } while any row is
alive, dropping finished rows and admitting new requests between steps. ``Greedy`` and
``Sample`` are thin generators over it; other strategies (beam, speculative, search)
reuse the same pieces: ``Options``, the processor chain, ``StopStringMatcher``.
"""

from __future__ import annotations

import asyncio
import functools
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, Sequence

import torch

from ..engine.engines import engine_for
from ..engine.requests import (  # noqa: F401 (row_generator re-exported)
    MAX_SEED, Request, StreamEvent, check_prompt, context_budget, random_seed, row_generator,
)
from ..protocols import Access, GeneratorBase, require_access
from ..types import Generation
from .adapters import ADAPTER_SETTINGS, HISTORY_SETTINGS, make_processors
from .common_adapters import Chain, SettingError

OPTION_FIELDS = ("max_tokens", "stop", "stop_token_ids", "ignore_eos", "token_healing", "logprobs")  # the fields of Options


@dataclass
class Options:
    """Settings shared by every token-level strategy, validated at construction."""

    max_tokens: int = 256
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    token_healing: bool = False  # back off the prompt's last token and re-spell it (see constraints.heal_prompt)
    logprobs: int = 0  # record each generated token's k most likely alternatives (Generation.top_logprobs)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise SettingError(f"max_tokens must be an integer >= 1; got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SettingError(f"stop strings must be non-empty; got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                raise SettingError(f"stop_token_ids must be token ids >= 0; got {t!r}")
        if not isinstance(self.logprobs, int) or isinstance(self.logprobs, bool) or not 0 <= self.logprobs <= 20:
            raise SettingError(f"logprobs must be an integer in [0, 20]; got {self.logprobs!r}")

    def refuse(self, who: str, *names: str) -> None:
        """A SettingError if any of these options is set: ``who`` cannot honour it."""
        for k in names:
            if getattr(self, k) != getattr(Options, k):
                raise SettingError(f"{who} does not take {k}={getattr(self, k)!r}")

    def within(self, lm: Any, prompt_len: int) -> "Options":
        """These options with ``max_tokens`` lowered to what the model's context leaves
        after a prompt of ``prompt_len`` tokens (generation then ends with "length")."""
        budget = context_budget(lm, prompt_len, self.max_tokens)
        return self if budget == self.max_tokens else replace(self, max_tokens=budget)


def pick_greedy(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


pick_greedy.is_argmax = True  # type: ignore[attr-defined]  (the engine may then decode several steps per call)


def pick_sample(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Ancestral sampling from softmax(logits) [B, V] by the inverse CDF: row i takes
    the first token whose cumulative probability exceeds its uniform draw u_i ([B],
    float64 in [0, 1)), all rows at once in float64. The engine gives every sample its
    own stream of draws, one per step, so a row's choice depends on nothing else in
    the batch."""
    cdf = logits.double().softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    u = uniforms * cdf[:, -1]  # the total is 1 up to rounding
    # right=True: the first index with cdf > u, never a zero-probability token
    return torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


def split_options(settings: dict[str, Any], legal: Sequence[str] | set[str], who: str) -> dict[str, Any]:
    """Take the ``Options`` fields out of ``settings`` (in place) and return them; any
    remaining setting not in ``legal`` is a SettingError naming what ``who`` takes."""
    options = {k: settings.pop(k) for k in list(settings) if k in OPTION_FIELDS}
    for k in settings:
        if k not in legal:
            raise SettingError(f"{who} does not take {k!r}; it takes {', '.join(sorted(legal))}")
    return options


def encode_prompt(lm: Any, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt given as text or ids; an empty prompt, text that is not
    valid Unicode, or ids that are not token ids of the model is a SettingError."""
    if isinstance(prompt, str):
        if prompt == "":
            raise SettingError("the prompt is empty; give at least one character of text")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SettingError(f"the prompt is not valid Unicode text (a lone surrogate at character {e.start}); "
                               "decode your input as UTF-8 first") from None
        return lm.encode(prompt)
    if isinstance(prompt, bytes) or not isinstance(prompt, Sequence):
        raise SettingError(f"a prompt is text or a list of token ids; got {type(prompt).__name__}")
    ids = list(prompt)
    if not ids:
        raise SettingError("the prompt is empty; give at least one token")
    check_prompt(lm, ids)
    return ids


def check_seed(seed: Any) -> None:
    """A seed is None or an integer in [0, 2**63 - 2]: every seed there gives its own
    streams (larger ones would wrap onto smaller ones)."""
    if seed is None:
        return
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < MAX_SEED:
        raise SettingError(f"seed must be an integer in [0, {MAX_SEED - 1}] or None; got {seed!r}")


def decode_loop(
    lm: Any,
    prompts: Sequence[Sequence[int]],
    n: int,
    pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    processors: Chain,
    options: Options,
    seed: int | None,
    stream: bool = False,
    cancel: threading.Event | None = None,
    started: float | None = None,
    arrived: Callable[[], None] | None = None,
) -> Iterator[StreamEvent]:
    """Yield ``StreamEvent``s; every output ends with an event carrying its Generation.
    Each prompt is one request to the model's engine (``ponder.engine``), which batches
    it with whatever else is running and reuses cached prefixes. Setting ``cancel``
    withdraws the requests (``RequestCancelled``)."""
    require_access(lm, Access.LOGITS, "token-level decoding")
    if seed is None:  # one random seed for the call, so its samples are distinct and reproducible together
        seed = random_seed()
    reqs = []
    for i, p in enumerate(prompts):
        procs, healed = processors, ""
        if options.token_healing:  # back off the prompt's last token; the output must re-spell it first
            from .constraints import PrefixConstraint, heal_prompt

            p, healed = heal_prompt(lm, p)
            if healed:
                procs = Chain(PrefixConstraint(lm, [healed]), processors)
        reqs.append(Request(p, n, pick, procs, options, seed, stream, index_base=i * n, healed=healed,
                            top_logprobs=options.logprobs))
    yield from engine_for(lm).run(reqs, cancel, started, arrived)


_CLOSING: set = set()  # clean-ups of closed streams, held until they finish


async def _close_stream(pending: Any, it: Any) -> None:
    """Wait for a worker inside ``next(it)`` to see the cancel, then close ``it`` (which
    withdraws its requests from the engine, if the engine has not dropped them yet)."""
    if pending is not None:
        try:
            await pending
        except BaseException:
            pass
    await asyncio.to_thread(it.close)


async def run_cancellable(fn: Callable[..., Any], *args: Any, engine: Any = None) -> Any:
    """``fn(*args, cancel=event)`` on a worker thread, so the event loop never blocks on
    the engine. If the awaiting task is cancelled, the event is set, the worker
    withdraws its requests from the batch (freeing their rows and KV), and only then
    does the cancellation propagate.

    With ``engine``, the thread is one of the engine's callers, and the engine is told
    at once that a caller is on its way (``expect``): the requests that a search makes
    concurrently join one batch instead of trickling in a step at a time."""
    cancel = threading.Event()
    extra: dict[str, Any] = {}
    executor = None
    if engine is not None:
        executor, extra["arrived"] = engine.callers, engine.expect()
    call = functools.partial(fn, *args, cancel=cancel, **extra)
    try:
        task = asyncio.ensure_future(asyncio.get_running_loop().run_in_executor(executor, call))
    except BaseException:
        extra.get("arrived", lambda: None)()
        raise
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        cancel.set()
        try:
            await task
        except BaseException:
            pass
        raise


def constraint_of(processors: Any) -> Any:
    """The grammar a processor chain constrains to, if any."""
    from .constraints import GrammarConstraint

    for p in getattr(processors, "processors", [processors]):
        if isinstance(p, GrammarConstraint):
            return p.grammar
    return None


class TokenGenerator(GeneratorBase):
    """A token-level generator: a model, a way to pick tokens, processors and options.
    ``pick(scores [B, V], uniforms [B]) -> tokens [B]`` gets each row's processed scores
    and one U(0, 1) draw (float64) from that sample's own stream; a deterministic pick
    ignores the draws."""

    strategy = "custom"

    def __init__(
        self,
        lm: Any,
        pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        processors: Chain | None = None,
        options: Options | None = None,
        **option_kwargs: Any,
    ) -> None:
        require_access(lm, Access.LOGITS, type(self).__name__)
        self.lm = lm
        self.pick = pick
        self.processors = processors if processors is not None else Chain()
        self.options = options or Options(**option_kwargs)

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        return encode_prompt(self.lm, prompt)

    @staticmethod
    def _check_n(n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SettingError(f"n must be an integer >= 1; got {n!r}")

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], n: int = 1, seed: int | None = None,
                       cancel: threading.Event | None = None,
                       arrived: Callable[[], None] | None = None) -> list[list[Generation]]:
        """All prompts in one batched loop; returns n generations per prompt.
        Every prompt is its own request seeded with ``seed``. ``arrived`` (from the
        engine's ``expect``) is called once the requests are submitted, or failed."""
        try:
            return self._generate_batch(prompts, n, seed, cancel, arrived)
        finally:
            if arrived is not None:
                arrived()  # idempotent: a call that failed before submitting must not hold steps back

    def _generate_batch(self, prompts: Sequence[str | Sequence[int]], n: int, seed: int | None,
                        cancel: threading.Event | None, arrived: Callable[[], None] | None) -> list[list[Generation]]:
        t0 = time.perf_counter()
        self._check_n(n)
        check_seed(seed)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
            raise SettingError(f"prompts must be a list of prompts; got {type(prompts).__name__}")
        if not prompts:
            return []
        ids = [self._encode(p) for p in prompts]
        # the engine bills this call's time from t0 on (encoding included), steps aside
        events = decode_loop(self.lm, ids, n, self.pick, self.processors, self.options, seed, cancel=cancel,
                             started=t0, arrived=arrived)
        out: list[Generation | None] = [None] * (len(ids) * n)
        for ev in events:
            if ev.generation is not None:
                out[ev.index] = ev.generation
        t1 = time.perf_counter()
        grammar = constraint_of(self.processors)
        gens = [g for g in out if g is not None]
        for g in gens:
            g.meta.setdefault("strategy", self.strategy)
            if grammar is not None:  # a constrained output cut by max_tokens is not valid yet: say so
                done = g.token_ids[:-1] if g.finish_reason == "stop" and isinstance(g.stop, int) else g.token_ids
                g.meta["constraint_complete"] = grammar.accepts_ids(done)
        # the call's own work after the engine (assembling) is part of its bill
        own = time.perf_counter() - t1
        for g in gens:
            g.usage.wall_s += own / len(gens)
        return [[g for g in out[i * n : (i + 1) * n] if g is not None] for i in range(len(ids))]

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return (await run_cancellable(self.generate_batch, [prompt], n, seed, engine=self._engine()))[0]

    def generate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return self.generate_batch([prompt], n, seed)[0]

    async def agenerate_many(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        return await run_cancellable(self.generate_batch, list(prompts), n, seed, engine=self._engine())

    def _engine(self) -> Any:
        """The engine async calls join: its caller threads (one per concurrent call; the
        event loop's default pool has only a few, and would let a search's hundreds of
        concurrent steps in a few at a time) and its arrival count."""
        return engine_for(self.lm) if hasattr(self.lm, "prefill") else None

    def stream(self, prompt: str | Sequence[int], n: int = 1, seed: int | None = None,
               cancel: threading.Event | None = None) -> Iterator[StreamEvent]:
        """Events as tokens are generated (text deltas never include a stop string)."""
        self._check_n(n)
        check_seed(seed)
        return decode_loop(self.lm, [self._encode(prompt)], n, self.pick, self.processors, self.options, seed,
                           stream=True, cancel=cancel)

    async def astream(self, prompt: str, n: int = 1, seed: int | None = None):
        """Async iterator over ``StreamEvent``s. The engine steps on a worker thread, so
        the event loop never blocks; cancelling the consuming task, or abandoning the
        iterator, withdraws the request from the batch."""
        cancel = threading.Event()
        it = self.stream(prompt, n, seed, cancel=cancel)
        end = object()
        pending = None
        try:
            while True:
                pending = asyncio.ensure_future(asyncio.to_thread(next, it, end))
                ev = await asyncio.shield(pending)
                pending = None
                if ev is end:
                    return
                yield ev
        finally:
            cancel.set()  # the engine drops the rows at its next step, whoever steps it
            # The clean-up is a task of its own: a server cancels a closed stream's task
            # again and again (anyio's cancel scopes), which must not cut it short.
            cleanup = asyncio.ensure_future(_close_stream(pending, it))
            _CLOSING.add(cleanup)
            cleanup.add_done_callback(_CLOSING.discard)
            await asyncio.shield(cleanup)


class Greedy(TokenGenerator):
    """Greedy decoding: the argmax token at every step (MAP approximation). History
    processors (penalties, bans, min tokens, logit bias) apply, as in transformers."""

    strategy = "greedy"

    def __init__(self, lm: Any, processors: Chain | Sequence[Any] | None = None, **settings: Any) -> None:
        require_access(lm, Access.LOGITS, "Greedy")
        options = split_options(settings, HISTORY_SETTINGS, "greedy decoding")
        extra = [processors] if isinstance(processors, Chain) else list(processors or ())
        chain_ = make_processors(extra=extra, stop_token_ids=_stops(lm, options), **settings)
        super().__init__(lm, pick_greedy, chain_, **options)


class Sample(TokenGenerator):
    """Ancestral sampling through a chain of adapters: temperature, top-k (Fan et al.
    2018), top-p (Holtzman et al. 2020), min-p (Nguyen et al. 2024), typical (Meister et
    al. 2023), epsilon and eta (Hewitt et al. 2022), top-nσ (Tang et al. 2024), after the
    history processors (penalties, bans, min tokens), then any extra processors (plain
    callables ``(tokens, logits) -> logits`` are accepted)."""

    strategy = "sample"

    def __init__(
        self,
        lm: Any,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        processors: Sequence[Any] = (),
        **settings: Any,
    ) -> None:
        require_access(lm, Access.LOGITS, "Sample")
        options = split_options(settings, set(HISTORY_SETTINGS) | set(ADAPTER_SETTINGS), "sampling")
        chain_ = make_processors(temperature, top_k, top_p, min_p, extra=processors,
                                 stop_token_ids=_stops(lm, options), **settings)
        super().__init__(lm, pick_sample, chain_, **options)
        self.settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, **settings)




def generator_for(lm: Any, params: Any) -> TokenGenerator:
    """The token-level generator a ``SamplingParams`` describes: greedy decoding at
    temperature 0, else sampling through its adapters; penalties, biases and stops
    as given."""
    params.check_for(lm.vocab_size)
    settings = {**params.options(), **params.history(lambda w: lm.encode(w, add_special_tokens=False))}
    if params.greedy:
        return Greedy(lm, **settings)
    return Sample(lm, **settings, **params.adapters())


def _stops(lm: Any, options: dict[str, Any]) -> list[int]:
    """The tokens min_tokens must hold back: EOS and any stop token ids."""
    return list(options.get("stop_token_ids", ())) + ([] if options.get("ignore_eos") else list(lm.eos_token_ids))
