"""The batching engine: continuous batching over one model, with a radix prefix cache.

Every token-level request (a prompt, ``n`` samples, its own processors, options and
seed) is submitted to the model's ``Engine``. Each engine step

1. admits waiting requests: their prompts are looked up in the prefix cache, only the
   uncached suffixes are prefilled (one padded batch for all newcomers), and each
   prompt's row joins the running batch. A request's ``n`` samples share that row until
   they pick different tokens; then it forks, one row per distinct token, so identical
   samples are computed once;
2. runs every request's own processor chain on its rows' logits and picks tokens
   with each row's own RNG (seeded by (seed, sample index), so a seeded request gives
   the same tokens alone or in any batch);
3. retires finished rows (stop token, stop string, max_tokens), storing their KV in the
   prefix cache so later calls and later steps of a meta-generator reuse it;
4. runs one decode forward pass for every remaining row.

Requests join and leave between steps (continuous batching). The caller drives: a
thread that waits for its requests takes the engine lock and steps it, which advances
every request in the batch; concurrent callers (threads, ``asyncio.to_thread``) thus
share forward passes without a scheduler thread to configure.

What a server needs: a request that fails (invalid logits, a processor that raises, a
prompt the model cannot take) fails alone and every other request continues; a
cancelled request leaves the batch at the next step and frees its rows; admission is
one policy object (``FifoAdmission``: a row cap and a KV budget); and every second of
a step is billed to the requests it served (``Usage.wall_s``).
"""

from __future__ import annotations

import collections
import concurrent.futures
import threading
import time
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import RequestCancelled, SettingError
from ..types import Generation, Usage
from .decode import Decoding
from .lock import OwnedLock
from .prefix_cache import prefill_with_prefix_cache
from .requests import (
    FifoAdmission, Request, StreamEvent, _Row, check_prompt, context_budget, event, row_generator,
)
from .stopping import IncrementalDetokenizer


class Engine(Decoding):
    """Continuous batching for one logits-level model (``prefill`` / ``step`` and a
    cache with ``fork``, ``keep_rows_`` and ``concat``). ``prefix_cache`` (a
    ``RadixCache``) is used when the model is ponder's native one; ``admission``
    decides which waiting requests join (``FifoAdmission``: ``max_rows`` rows and a
    KV budget; requests wait beyond it)."""

    def __init__(self, lm: Any, prefix_cache: Any = "auto", max_rows: int = 256, share_prompts_from: int = 128,
                 admission: Any = None) -> None:
        self.lm = lm
        self.admission = admission if admission is not None else FifoAdmission(max_rows=max_rows)
        # A request with n > 1 samples and a prompt of at least this many tokens keeps its
        # prompt's KV once (cascade attention) instead of once per diverged sample: below
        # it, copying a short prompt costs less than attending to it in two parts.
        self.share_prompts_from = share_prompts_from
        if prefix_cache == "auto":
            prefix_cache = None
            if hasattr(lm, "model") and hasattr(lm, "new_cache") and hasattr(lm.model, "cfg"):
                from .prefix_cache import REUSE_BLOCK, RadixCache

                prefix_cache = RadixCache.for_model(lm.model.cfg, lm.model.dtype, max_bytes=256 * 2**20,
                                                    min_reuse=REUSE_BLOCK)
        self.prefix_cache = prefix_cache
        self._lock = OwnedLock()
        self._withdrawn: collections.deque = collections.deque()  # withdrawals the lock's holder deferred
        self._callers: concurrent.futures.ThreadPoolExecutor | None = None
        self._callers_lock = threading.Lock()
        self._expected = 0  # async callers on their way to submit (see expect)
        self._arrivals = threading.Condition(threading.Lock())
        self._waiting: collections.deque[Request] = collections.deque()  # appended under _queue_lock
        self._queue_lock = threading.Lock()
        self._active: list[Request] = []
        self._cache: Any = None
        self._spare: Any = None  # an emptied batch's KV allocation, kept for the next batch
        self._logits: torch.Tensor | None = None  # [B, V] pending next-token logits of every live row
        # observe(name, seconds): told each request's time to first token and each
        # sample's time per output token (ponder serve's /metrics); None: nobody listens
        self.observe: Callable[[str, float], None] | None = None
        self.steps = 0
        self.multi_step_calls = 0  # steps decoded several tokens at once (_decode_steps)
        self.peak_rows = 0
        self.peak_kv_bytes = 0

    @property
    def max_rows(self) -> int:
        return self.admission.max_rows

    @property
    def callers(self) -> concurrent.futures.ThreadPoolExecutor:
        """Threads for async callers, each driving the shared batch (``run``) until its
        own requests finish: as many as the batch has rows, created on demand. Not
        under the engine's lock: the event loop asks for them, and must not wait out
        a step (and the other callers queued for the lock) to hand a request over."""
        with self._callers_lock:
            if self._callers is None:
                self._callers = concurrent.futures.ThreadPoolExecutor(max(32, self.max_rows),
                                                                      thread_name_prefix="ponder-engine")
            return self._callers

    # Longest a step waits for announced callers to submit: a few decode steps' time.
    ARRIVAL_WAIT_S = 0.005

    def expect(self) -> Callable[[], None]:
        """Announce a caller that will submit soon (from the event loop, before its
        worker thread starts); returns ``arrived``, to call once it has submitted (or
        failed; calling again does nothing). While callers are announced, a step waits
        for them, at most ARRIVAL_WAIT_S: a search's concurrent requests then start in
        one step, rather than one or two a step as their threads come in."""
        with self._arrivals:
            self._expected += 1
        done = threading.Event()

        def arrived() -> None:
            if not done.is_set():
                done.set()
                with self._arrivals:
                    self._expected -= 1
                    self._arrivals.notify_all()

        return arrived

    def _await_arrivals(self) -> None:
        if self._expected > 0:
            with self._arrivals:
                self._arrivals.wait_for(lambda: self._expected <= 0, timeout=self.ARRIVAL_WAIT_S)

    # -- public ----------------------------------------------------------------------------
    def check(self, r: Request) -> None:
        """Refuse what the model cannot take (SettingError naming it), and lower the
        request's budget to what the model's context leaves after its prompt, so that
        generation ends there with finish_reason "length"."""
        check_prompt(self.lm, r.prompt)
        vocab = getattr(self.lm, "vocab_size", None)
        if vocab is not None and any(t >= vocab for t in r.options.stop_token_ids):
            raise SettingError(f"stop_token_ids must be token ids in [0, {vocab}); got {max(r.options.stop_token_ids)}")
        r.max_new = context_budget(self.lm, len(r.prompt), r.options.max_tokens)

    def submit(self, requests: Sequence[Request]) -> None:
        """Queue requests; they join the batch at the next step (once each). A request
        the model cannot take is refused here, before any is queued."""
        for r in requests:
            if not r.submitted:
                self.check(r)
        # the queue has a lock of its own: a request arriving mid-step joins the queue at
        # once instead of waiting out the step (64 concurrent callers took 90 steps to
        # finish what one batch does in 64, most of them queued behind steps)
        with self._queue_lock:
            for r in requests:
                if not r.submitted:
                    r.submitted, r.arrived = True, time.perf_counter()
                    self._waiting.append(r)

    def run(self, requests: Sequence[Request], cancel: threading.Event | None = None,
            started: float | None = None, arrived: Callable[[], None] | None = None) -> Iterator[StreamEvent]:
        """Submit ``requests`` and drive the engine until they are all done, yielding
        their events (other callers' requests advance in the same forward passes).
        Setting ``cancel`` (from any thread) withdraws them at the next step and raises
        ``RequestCancelled``; so does closing this iterator, without the raise.

        The steps bill themselves; what this call spends around them (submission, its
        loop, since ``started`` if given) is billed to its own generations, while time
        waiting for another caller's step is not (that step bills it)."""
        begin = time.perf_counter() if started is None else started
        stepping = yielded = 0.0
        for r in requests:
            r.cancel = cancel
        self.submit(requests)
        if arrived is not None:
            arrived()
        try:
            while True:
                for r in requests:
                    while r.events:
                        t = time.perf_counter()
                        yield r.events.popleft()
                        yielded += time.perf_counter() - t
                for r in requests:
                    if r.error is not None:
                        raise r.error
                if all(r.done for r in requests):
                    gens = [g for r in requests for g in r.outputs if g is not None]
                    own = time.perf_counter() - begin - stepping - yielded
                    for g in gens:
                        g.usage.wall_s += own / len(gens)
                    return
                if cancel is not None and cancel.is_set():
                    raise RequestCancelled("the request was cancelled")
                t = time.perf_counter()
                self._await_arrivals()  # time spent for the batch, not for this call: unbilled here
                with self._lock:
                    if not all(r.done for r in requests):
                        self._step()
                stepping += time.perf_counter() - t
        finally:
            self._withdraw(requests)

    def step(self) -> None:
        """Advance every running request by one step (admitting waiting ones first)."""
        with self._lock:
            self._step()

    def prefill_cached(self, prompts: Sequence[Sequence[int]], capacity: int):
        """Prefill ``prompts`` into a new cache outside the batch, through this engine's
        prefix cache (what speculative decoding uses): (logits, cache, reused tokens)."""
        if self.prefix_cache is None:
            logits, cache = self.lm.prefill([list(p) for p in prompts], capacity=capacity)
            return logits, cache, [0] * len(prompts)
        with self._lock:
            return prefill_with_prefix_cache(self.lm, self.prefix_cache, prompts, capacity)

    def live_kv_bytes(self) -> int:
        """KV bytes the running batch holds for its valid tokens (0 when idle)."""
        return self._cache.nbytes_used() if self._cache is not None and hasattr(self._cache, "nbytes_used") else 0

    def kv_bytes_in_use(self) -> int:
        """KV bytes of the running batch's valid tokens plus the prefix cache's store."""
        return self.live_kv_bytes() + (self.prefix_cache.nbytes if self.prefix_cache is not None else 0)

    @property
    def running(self) -> int:
        """Requests in the batch or waiting to join it."""
        return len(self._active) + len(self._waiting)

    @property
    def in_batch(self) -> int:
        """Requests in the running batch."""
        return len(self._active)

    @property
    def queued(self) -> int:
        """Requests waiting to join the batch."""
        return len(self._waiting)

    # -- one step --------------------------------------------------------------------------------
    def _step(self) -> None:
        try:
            while self._withdrawn:
                r = self._withdrawn.popleft()
                if not r.done:
                    self._drop([r], RequestCancelled("the request was withdrawn"))
            with self._queue_lock:
                waiting = list(self._waiting)
            given_up = [r for r in (*self._active, *waiting) if r.cancel is not None and r.cancel.is_set()]
            if given_up:  # their callers gave up: free the rows now, whoever is stepping
                self._drop(given_up, RequestCancelled("the request was cancelled"))
            self._admit()
            if self._logits is None or not self._active:
                return
            r = self._multi_step_request()
            if r is None or not self._decode_steps(r):
                self._decode()
        except BaseException as e:  # a failure of the batch as a whole (the forward pass):
            with self._queue_lock:
                waiting = list(self._waiting)
                self._waiting.clear()
            for r in list(self._active) + waiting:  # every request in flight learns of it
                r.error = e
            self._active, self._cache, self._logits = [], None, None
            raise

    def _drop(self, requests: Sequence[Request], error: BaseException) -> None:
        """Remove requests from the queue and the batch (their rows and KV are freed)."""
        ids = {id(r) for r in requests}
        with self._queue_lock:
            for r in requests:
                if r in self._waiting:
                    self._waiting.remove(r)
        for r in requests:
            r.error = r.error or error
        if any(id(r) in ids for r in self._active):
            self._retire_rows(ids)

    def _withdraw(self, requests: Sequence[Request]) -> None:
        """A caller gave up (error or closed stream): drop its requests from the engine."""
        gone = [r for r in requests if not r.done]
        if not gone:
            return
        if self._lock.held_here():
            # An abandoned stream's generator, finalised by the garbage collector on the
            # thread that is mid-step under the lock: dropping rows now would corrupt the
            # step, and waiting for the lock would deadlock. The next step drops them.
            self._withdrawn.extend(gone)
            return
        with self._lock:
            self._drop(gone, RequestCancelled("the request was withdrawn"))

    def _kv_need(self, r: Request) -> int:
        """A request's worst-case KV: n rows of prompt + max_new tokens."""
        return int(getattr(self.lm, "kv_bytes_per_token", 0)) * (len(r.prompt) + r.max_new) * r.n

    def _admit(self) -> None:
        if not self._waiting:
            return
        rows_now = self._logits.shape[0] if self._logits is not None else 0
        # KV is reserved at each running request's worst case: a request admitted now
        # can never be starved of memory by others growing later.
        reserved = sum(self._kv_need(r) for r in self._active)
        with self._queue_lock:  # others only append meanwhile: the admitted prefix stays the queue's head
            waiting = list(self._waiting)
        new = self.admission.select(waiting, rows_now, reserved, self._kv_need)
        if not new:
            return
        with self._queue_lock:
            for _ in new:
                self._waiting.popleft()
        t0 = time.perf_counter()
        lm = self.lm
        # Room for 64 new tokens; the cache doubles when it fills. Every fork copies the whole
        # capacity of the running batch, so reserving max_tokens up front would make each copy
        # several times larger than the tokens it holds.
        cap = max(len(r.prompt) for r in new) + min(max(r.max_new for r in new), 64) + 1
        try:
            if self.prefix_cache is not None:
                logits, cache = self._prefill_with_reuse(new, cap)
            else:
                logits, cache = lm.prefill([r.prompt for r in new], capacity=cap)
        except Exception as e:  # the newcomers' prefill failed: they fail, the running batch goes on
            for r in new:
                r.error = e
            return
        # Cascade attention keeps a long prompt's KV once for its n samples, where the
        # model's forward pass can read a shared prefix.
        share = [i for i, r in enumerate(new) if r.n > 1 and len(r.prompt) >= self.share_prompts_from]
        if share and hasattr(cache, "share_rows_") and getattr(lm, "reads_shared_prefix", True):
            cache.share_rows_(share)
        for r in new:
            r.needs_text = r.stream or bool(r.stopper.stops) or bool(r.healed)
            r.rows = [_Row(j, IncrementalDetokenizer(lm.decode) if r.needs_text else None, released=len(r.healed))
                      for j in range(r.n)]
            r.phys = [list(range(r.n))]
            r.samples, r.sample_index = list(range(r.n)), None
            r.owner = torch.zeros(r.n, dtype=torch.long)
            r.gens = [row_generator(r.seed, j) for j in range(r.n)]
            r.history = torch.zeros((1, len(r.prompt) + 64), dtype=torch.long)
            r.history[0, : len(r.prompt)] = torch.tensor(r.prompt, dtype=torch.long)
            r.hist_len = len(r.prompt)
            r.stop_ids = set(r.options.stop_token_ids) | (set() if r.options.ignore_eos else set(lm.eos_token_ids))
            procs = r.template
            if not procs.is_identity:
                procs = procs.fork([0])
                procs.reset()
            r.procs = procs
        if self._cache is None and self._spare is not None and self._spare.capacity >= cache.capacity:
            self._cache, self._spare = self._spare, None  # last batch's allocation: no regrowing from one row
        if self._cache is None:
            self._cache, self._logits = cache, logits
        else:  # into the running batch's (or the kept allocation's) spare rows when it has them
            if hasattr(self._cache, "append_"):
                self._cache.append_(cache)
            else:
                self._cache = type(self._cache).concat([self._cache, cache])
            self._logits = logits if self._logits is None else torch.cat([self._logits, logits])
        self._active.extend(new)
        admit_s = time.perf_counter() - t0  # lookup, prefill, and each newcomer's set-up and join
        for r in new:
            r.prompt_wall = admit_s / len(new)

    def _prefill_with_reuse(self, new: list[Request], cap: int):
        """Prefill only what the prefix cache lacks; store every prompt's KV afterwards."""
        logits, cache, hits = prefill_with_prefix_cache(self.lm, self.prefix_cache, [r.prompt for r in new], cap)
        for r, m in zip(new, hits):
            r.reused = m
        return logits, cache

    # Largest emptied allocation kept for the next batch (a search's levels start a new
    # batch each time; regrowing it row by row costs more than the step itself).
    SPARE_BYTES = 256 * 2**20

    def _go_idle(self) -> None:
        """No row is left: keep the allocation (emptied) if it is small enough."""
        cache, self._cache, self._logits = self._cache, None, None
        if (hasattr(cache, "append_") and hasattr(cache, "nbytes_allocated")
                and cache.nbytes_allocated() <= self.SPARE_BYTES):
            cache.keep_rows_(torch.zeros(0, dtype=torch.long))
            self._spare = cache

    def _retire_rows(self, request_ids: set[int]) -> None:
        """Drop every row of the given requests (withdrawn callers)."""
        keep, start = [], 0
        for r in self._active:
            nb = len(r.phys)
            if id(r) not in request_ids:
                keep += list(range(start, start + nb))
            start += nb
        self._active = [r for r in self._active if id(r) not in request_ids]
        if not keep:
            self._go_idle()
            return
        t = torch.tensor(keep, dtype=torch.long)
        self._cache.keep_rows_(t)
        self._logits = self._logits[t]

    def _finish(self, r: Request, row: _Row, batch_row: int, store: bool = True) -> Generation:
        lm = self.lm
        if store and self.prefix_cache is not None and len(row.ids) > 1 and hasattr(self._cache, "read_row"):
            # the row holds the prompt and every generated token but the last (never fed)
            seq = r.prompt + row.ids[:-1]
            cache = self._cache
            self.prefix_cache.insert_from(seq, lambda i, j: cache.read_row(batch_row, j, start=i))
        if row.detok is None:
            row.text = lm.decode(row.ids)
        head = r.healed
        text = row.text[len(head):] if head and row.text.startswith(head) else row.text
        first = row.sample == 0
        prompt_computed = len(r.prompt) - r.reused if first else 0
        gen_computed = row.computed  # samples that shared a row computed their common tokens once
        g = Generation(text=text, token_ids=row.ids, logprobs=row.logprobs, finish_reason=row.finish,  # type: ignore[arg-type]
                       stop=row.stop, top_logprobs=row.top)
        g.usage = Usage(
            prompt_tokens=len(r.prompt),
            generated_tokens=len(row.ids),
            computed_tokens=gen_computed + prompt_computed,
            model_calls=len(row.ids),  # the forward passes it took part in: a prefill plus g - 1 steps
            flops=lm.flops(gen_computed, len(r.prompt)) + (lm.flops(prompt_computed, r.reused) if first else 0.0),
            wall_s=r.wall + (r.prompt_wall if first else 0.0),
        )
        if first and r.reused:
            g.meta["prefix_cache_hit_tokens"] = r.reused
        if self.observe is not None and r.first_token_at is not None:
            now = time.perf_counter()
            if first:
                self.observe("time_to_first_token", r.first_token_at - r.arrived)
            if len(row.ids) > 1:
                self.observe("time_per_output_token", (now - r.first_token_at) / (len(row.ids) - 1))
        r.outputs[row.sample] = g
        r.events.append(event(r, row, row.text[min(row.released, len(row.text)):], g))
        return g
