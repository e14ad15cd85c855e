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
import math
import threading
import time
import weakref
from typing import Any, Callable, Iterator, Sequence

import torch

from ..errors import RequestCancelled, SettingError
from ..types import Generation, Usage
from .requests import (
    DRAW_BLOCK, FifoAdmission, Request, StreamEvent, _Row, check_prompt, context_budget, invalid_logits_error,
    row_generator,
)
from .stopping import IncrementalDetokenizer


class _OwnedLock:
    """A lock that knows which thread holds it (``held_here``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._owner: int | None = None

    def __enter__(self) -> "_OwnedLock":
        self._lock.acquire()
        self._owner = threading.get_ident()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._owner = None
        self._lock.release()

    def held_here(self) -> bool:
        return self._owner == threading.get_ident()


class Engine:
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
                from .prefix_cache import RadixCache

                prefix_cache = RadixCache.for_model(lm.model.cfg, lm.model.dtype, max_bytes=256 * 2**20)
        self.prefix_cache = prefix_cache
        self._lock = _OwnedLock()
        self._withdrawn: collections.deque = collections.deque()  # withdrawals the lock's holder deferred
        self._callers: concurrent.futures.ThreadPoolExecutor | None = None
        self._expected = 0  # async callers on their way to submit (see expect)
        self._arrivals = threading.Condition(threading.Lock())
        self._waiting: collections.deque[Request] = collections.deque()
        self._active: list[Request] = []
        self._cache: Any = None
        self._spare: Any = None  # an emptied batch's KV allocation, kept for the next batch
        self._logits: torch.Tensor | None = None  # [B, V] pending next-token logits of every live row
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
        own requests finish: as many as the batch has rows, created on demand."""
        with self._lock:
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
        with self._lock:
            for r in requests:
                if not r.submitted:
                    r.submitted = True
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

    # -- one step --------------------------------------------------------------------------------
    def _step(self) -> None:
        try:
            while self._withdrawn:
                r = self._withdrawn.popleft()
                if not r.done:
                    self._drop([r], RequestCancelled("the request was withdrawn"))
            self._admit()
            if self._logits is None or not self._active:
                return
            r = self._multi_step_request()
            if r is None or not self._decode_steps(r):
                self._decode()
        except BaseException as e:  # a failure of the batch as a whole (the forward pass):
            for r in list(self._active) + list(self._waiting):  # every request in flight learns of it
                r.error = e
            self._active, self._cache, self._logits = [], None, None
            self._waiting.clear()
            raise

    # Tokens a multi-step call may decode (see _decode_steps): enough to amortise the
    # return to Python; few enough that a request arriving meanwhile waits ~ms. 0: off.
    MULTI_STEP = 16

    def _multi_step_request(self) -> Request | None:
        """The one running request if nothing needs Python between its tokens: a single
        greedy row, no processors, stop strings, stream or top logprobs, nobody waiting
        to join or leave, and a model that can decode several steps per call."""
        if self.MULTI_STEP < 1 or len(self._active) != 1 or self._waiting or self._withdrawn or self._expected > 0:
            return None
        r = self._active[0]
        if (r.n != 1 or len(r.phys) != 1 or not getattr(r.pick, "is_argmax", False) or r.procs.banned() is None
                or r.top_logprobs or r.needs_text or not hasattr(self.lm, "greedy_steps")
                or r.max_new - len(r.rows[0].ids) < 3):
            return None
        return r

    def _decode_steps(self, r: Request) -> bool:
        """Multi-step decoding (vLLM's multi-step scheduling): pick the next token as a
        step would, then let the model decode up to MULTI_STEP more greedily in one
        call, which stops after a stop token and does not feed a token that reaches
        max_tokens. The tokens, log-probabilities, cache and bill are a step's, repeated.
        False (nothing done) when the model's kernel cannot serve the cache."""
        t0 = time.perf_counter()
        row = r.rows[0]
        left = r.max_new - len(row.ids) - 1  # tokens allowed after this step's
        n = min(self.MULTI_STEP, left)
        lg = self._logits  # [1, V]
        ban, ban_steps = r.procs.banned()  # ids forbidden for the next ban_steps tokens (min_tokens)
        scores = lg.index_fill(-1, torch.tensor(ban, dtype=torch.long), -math.inf) if ban and ban_steps else lg
        if not math.isfinite(float(scores.amax())):  # the step path names the fault
            return False
        first = int(scores.argmax(-1))  # the greedy pick (it reads no draw)
        new, lps, logits = [first], [float(lg.log_softmax(-1)[0, first])], None
        if first not in r.stop_ids:
            got = self.lm.greedy_steps(first, n, self._cache, sorted(r.stop_ids), feed_last=n < left, ban=ban,
                                       ban_steps=ban_steps - 1)
            if got is None:
                return False
            toks, more, logits = got
            self.multi_step_calls += 1
            new += toks
            lps += more
        self.peak_rows = max(self.peak_rows, 1)
        for t, lp_t in zip(new, lps):
            row.ids.append(t)
            row.logprobs.append(lp_t)
            t_ = torch.tensor([t])
            self._extend_history(r, None, t_)
            if not r.procs.is_identity:
                r.procs.accept(t_)
        row.computed += len(new) - 1 + (logits is not None)  # every token fed: all but a last that was not
        self.steps += len(new)
        last = new[-1]
        if last in r.stop_ids:
            row.finish, row.stop = "stop", last
        elif len(row.ids) >= r.max_new:
            row.finish = "length"
        r.wall += time.perf_counter() - t0
        if row.finish is None:
            self._logits = logits
            return True
        if hasattr(self._cache, "nbytes_used"):
            self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes_in_use())
        self._finish(r, row, 0)
        r.phys = []
        self._active = []
        self._go_idle()
        return True

    def _drop(self, requests: Sequence[Request], error: BaseException) -> None:
        """Remove requests from the queue and the batch (their rows and KV are freed)."""
        ids = {id(r) for r in requests}
        for r in requests:
            if r in self._waiting:
                self._waiting.remove(r)
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
        new = self.admission.select(list(self._waiting), rows_now, reserved, self._kv_need)
        if not new:
            return
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

    @staticmethod
    def _record_top(r: Request, lg: torch.Tensor) -> None:
        """Each live sample's k most likely tokens at this step (the model's own log-probabilities)."""
        vals, ids = lg.log_softmax(-1).topk(r.top_logprobs, dim=-1)  # [P, k]
        rows = range(lg.shape[0]) if len(r.samples) == lg.shape[0] else r.owner.tolist()
        v, i = vals.tolist(), ids.tolist()
        for s, p in zip(r.samples, rows):
            row = r.rows[s]
            if row.top is None:
                row.top = []
            row.top.append(dict(zip(i[p], v[p])))

    def _pick(self, r: Request, lg: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Run the request's processors on its rows' logits lg [P, V] and pick one token
        per live sample: (tokens [samples], the model's log-probabilities of them)."""
        scores = lg if r.procs.is_identity else r.procs(r.history[:, : r.hist_len], lg)
        # NaN and +inf propagate through max, and a row with every token masked has a
        # max of -inf: one reduction finds all three (NaN fails both comparisons).
        top = scores.amax(-1).tolist()
        if not (-math.inf < (top[0] if len(top) == 1 else sum(top)) < math.inf):  # a sum keeps NaN and +-inf
            raise invalid_logits_error(r.procs, r.history[:, : r.hist_len], lg)
        draws = self._draws(r)  # [samples]
        if len(r.samples) == lg.shape[0]:  # one sample per row: no gather
            tokens = r.pick(scores, draws)  # [samples]
            lp = lg.log_softmax(-1).gather(-1, tokens[:, None])[:, 0].tolist()  # (logsumexp is 3x slower)
        else:
            tokens = r.pick(scores[r.owner], draws)
            lp = lg.log_softmax(-1)[r.owner].gather(-1, tokens[:, None])[:, 0].tolist()
        return tokens, lp

    def _pick_together(self, logits: torch.Tensor) -> dict[int, tuple[torch.Tensor, list[float]]]:
        """Pick for several requests at once where that cannot change a token: requests
        with the same pick function and processors that act alike
        on every row without reading history (equal ``batch_key``), e.g. the many small
        step requests of a tree search. Row i's choice depends only on row i's logits
        and draw, so the tokens equal per-request picking. A group whose scores are not
        all finite, or whose processors raise, is left to ``_pick``, which names the
        request at fault. Returns {id(request): (tokens, log-probabilities)}."""
        groups: dict[Any, list[tuple[Request, torch.Tensor]]] = {}
        start = 0
        for r in self._active:
            P = len(r.phys)
            if not r.top_logprobs:
                key = r.procs.batch_key()
                if key is not None:  # each live sample reads its physical row
                    rows = torch.arange(start, start + P) if len(r.samples) == P else start + r.owner
                    groups.setdefault((r.pick, key), []).append((r, rows))
            start += P
        out: dict[int, tuple[torch.Tensor, list[float]]] = {}
        for (pick, _), members in groups.items():
            if len(members) < 2:
                continue
            lg = logits.index_select(0, torch.cat([rows for _, rows in members]))  # [samples of the group, V]
            procs = members[0][0].procs
            try:
                scores = lg if procs.is_identity else procs(None, lg)
            except Exception:
                continue
            if not bool(torch.isfinite(scores.amax(-1)).all()):
                continue
            draws = torch.cat([self._draws(r) for r, _ in members])  # [samples]
            tokens = pick(scores, draws)
            lp = lg.log_softmax(-1).gather(-1, tokens[:, None])[:, 0].tolist()
            k = 0
            for r, rows in members:
                m = rows.shape[0]
                out[id(r)] = (tokens[k : k + m], lp[k : k + m])
                k += m
        return out

    def _decode(self) -> None:
        t0 = time.perf_counter()
        lm = self.lm
        logits = self._logits  # [B, V], one row per physical row
        B = logits.shape[0]
        self.peak_rows = max(self.peak_rows, B)
        picked = self._pick_together(logits) if len(self._active) > 1 else {}
        parents: list[int] = []  # global physical row each new physical row continues
        next_tokens: list[torch.Tensor] = []  # [rows] per request, in batch order
        n_samples = 0
        start = 0
        plans = []
        for r in self._active:
            P = len(r.phys)
            samples, rows = r.samples, r.rows
            n_samples += len(samples)
            try:
                got = picked.get(id(r))
                tokens, lp = got if got is not None else self._pick(r, logits[start : start + P])
                if r.top_logprobs:
                    self._record_top(r, logits[start : start + P])
            except Exception as e:  # this request fails alone: its rows leave the batch
                r.error = e
                plans.append((r, start, {}, (), None))
                start += P
                continue
            toks = tokens.tolist()
            for s, t, l in zip(samples, toks, lp):
                row = rows[s]
                row.ids.append(t)
                row.logprobs.append(l)
            # every live sample of a request has drawn the same number of tokens
            at_max = len(rows[samples[0]].ids) >= r.max_new
            if len(samples) == P and not (at_max or r.needs_text) and r.stop_ids.isdisjoint(toks):
                plans.append((r, start, None, (), tokens))  # every row continues as it is
                start += P
                continue
            # new physical rows: (parent row, token) -> the samples that continue there
            split: dict[tuple[int, int], list[int]] = {}
            finished: list[tuple[int, int]] = []  # (sample, parent row)
            owner = range(P) if len(samples) == P else r.owner.tolist()
            for p, s, t in zip(owner, samples, toks):
                row = rows[s]
                if t in r.stop_ids:
                    row.finish, row.stop = "stop", t
                elif row.detok is not None:
                    delta = row.detok.add(t)
                    if delta:
                        old = len(row.text)
                        row.text += delta
                        hit = r.stopper.find(row.text, old)
                        if hit is not None:
                            row.text = row.text[: hit[0]]
                            row.finish, row.stop = "stop", hit[1]
                if row.finish is None and at_max:
                    row.finish = "length"
                if row.finish is None:
                    split.setdefault((p, t), []).append(s)
                    if r.stream:
                        safe = r.stopper.safe_length(row.text)
                        if safe > row.released:
                            r.events.append(StreamEvent(r.index_base + row.sample, t, row.text[row.released : safe]))
                            row.released = safe
                else:
                    finished.append((s, start + p))
            plans.append((r, start, split, finished, None))
            start += P
        # Bill the step so far (processors, picks, stop checks) to every live sample.
        t1 = time.perf_counter()
        share = (t1 - t0) / max(1, n_samples)
        for r in self._active:
            r.wall += share
        finishing: list[Generation] = []
        if any(plan[3] for plan in plans) and hasattr(self._cache, "nbytes_used"):
            # KV only grows between retirements: its peak is just before one
            self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes_in_use())
        # retire finished samples (their physical row still holds their KV), then regroup
        for r, base, split, finished, tokens in plans:
            if split is None:  # unchanged rows, each computing its sample's next token
                self._extend_history(r, None, tokens)
                if not r.procs.is_identity:
                    r.procs.accept(tokens)
                for s in r.samples:
                    r.rows[s].computed += 1
                P = len(r.samples)
                parents += range(base, base + P)
                next_tokens.append(tokens)
                continue
            stored: set[int] = set()
            for s, g_row in finished:
                # samples finishing on one physical row share its KV: store it once
                finishing.append(self._finish(r, r.rows[s], g_row, store=g_row not in stored))
                stored.add(g_row)
            if not split:
                r.phys = []
                continue
            local = [p for p, _ in split]
            toks = [t for _, t in split]
            same_rows = local == list(range(len(r.phys)))
            toks_t = torch.tensor(toks)
            self._extend_history(r, None if same_rows else local, toks_t)
            if not r.procs.is_identity:
                if not same_rows:
                    r.procs = r.procs.fork(local)
                r.procs.accept(toks_t)
            r.phys = list(split.values())
            r.samples = [s for group in r.phys for s in group]
            r.sample_index = None if r.samples == list(range(r.n)) else torch.tensor(r.samples)
            if len(r.samples) != len(r.phys):
                r.owner = torch.tensor([p for p, group in enumerate(r.phys) for _ in group])
            for group in r.phys:  # the row computes its next token once, billed to its first sample
                r.rows[group[0]].computed += 1
            parents += [base + p for p in local]
            next_tokens.append(toks_t)
        self._active = [r for r in self._active if r.phys and r.error is None]
        self.steps += 1
        if not self._active:
            self._go_idle()
        else:
            if len(parents) != B or parents != list(range(B)):
                self._cache.reorder_(torch.tensor(parents, dtype=torch.long))
            fed = next_tokens[0] if len(next_tokens) == 1 else torch.cat(next_tokens)
            self._logits = lm.step(fed.long(), self._cache)
        # Bill the rest (retirements, detokenising, the forward pass) to the samples it
        # served: those going on, or, when none is left, those that just finished.
        rest = time.perf_counter() - t1
        live = sum(len(r.samples) for r in self._active)
        if live:
            for r in self._active:
                r.wall += rest / live
        elif finishing:
            for g in finishing:
                g.usage.wall_s += rest / len(finishing)

    @staticmethod
    def _draws(r: Request) -> torch.Tensor:
        """One U(0, 1) draw per live sample [samples], float64, each from its own
        stream; read from the samples' generators DRAW_BLOCK at a time."""
        col = r.steps % DRAW_BLOCK
        if col == 0:
            r.draws = torch.stack([torch.rand(DRAW_BLOCK, generator=g, dtype=torch.float64) for g in r.gens])
        r.steps += 1
        assert r.draws is not None
        return r.draws[:, col] if r.sample_index is None else r.draws[r.sample_index, col]

    @staticmethod
    def _extend_history(r: Request, rows: list[int] | None, tokens: torch.Tensor) -> None:
        """Append one token to each physical row's history; ``rows`` (the parent row of
        each new row) when the rows forked or retired."""
        h = r.history
        if rows is not None:
            h = h[torch.tensor(rows)]
        if r.hist_len == h.shape[1]:
            h = torch.cat([h, torch.zeros_like(h)], dim=1)
        h[:, r.hist_len] = tokens
        r.history = h
        r.hist_len += 1

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
        r.outputs[row.sample] = g
        r.events.append(StreamEvent(r.index_base + row.sample, row.ids[-1], row.text[min(row.released, len(row.text)):], g))
        return g


def prefill_with_prefix_cache(lm: Any, prefix_cache: Any, prompts: Sequence[Sequence[int]], capacity: int):
    """Prefill prompts, computing only what ``prefix_cache`` lacks (at least each
    prompt's last token, whose logits start a generation), then store every prompt's
    KV there. Returns (last-token logits [B, V], cache, cached tokens reused per prompt)."""
    cache = lm.new_cache(len(prompts), capacity)
    hits = []
    for i, p in enumerate(prompts):
        m, k, v = prefix_cache.lookup(list(p), limit=len(p) - 1)
        if m:
            cache.write_prefix_(i, k, v)
        hits.append(m)
    logits, _ = lm.prefill([list(p[m:]) for p, m in zip(prompts, hits)], cache=cache)
    for i, p in enumerate(prompts):
        if hits[i] < len(p):
            prefix_cache.insert_from(list(p), lambda a, b, row=i: cache.read_row(row, b, start=a))
    return logits, cache, hits


_ENGINES: "weakref.WeakKeyDictionary[Any, Engine]" = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(lm: Any) -> Engine:
    """The model's engine, made on first use: one per model object, so every generator
    over the same model shares its batch and prefix cache."""
    with _ENGINES_LOCK:
        eng = _ENGINES.get(lm)
        if eng is None:
            eng = _ENGINES[lm] = Engine(lm)
        return eng


def set_engine(lm: Any, engine: Engine) -> Engine:
    """Make ``engine`` the one every generator over ``lm`` uses (e.g. one without a
    prefix cache, or with another admission policy); returns it."""
    if engine.lm is not lm:
        raise SettingError("set_engine: the engine was made for another model")
    with _ENGINES_LOCK:
        _ENGINES[lm] = engine
    return engine
