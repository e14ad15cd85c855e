"""Answering a request of ``ponder serve``: running its job on the engine, the
OpenAI-shaped response (choices, logprobs, usage, the ``ponder`` object), and the
server-sent events of a stream."""

# (no `from __future__ import annotations`: FastAPI reads annotations at run time)

import asyncio
import json
import time
from typing import Any

from ..errors import BackendError, InvalidLogitsError, SettingError
from ..protocols import AccessError
from ..types import Generation, Usage
from .api import ApiError, Job, bad, chat_logprobs, completion_logprobs, envelope, new_id, ponder_object, usage_of
from .lifecycle import ShuttingDown

# what a request's generation may raise that is the client's answer (``failure``)
GENERATION_ERRORS = (ApiError, SettingError, AccessError, InvalidLogitsError, BackendError, ShuttingDown)


def best_of(gens: list[Generation], n: int) -> list[Generation]:
    """The ``n`` samples of highest log-probability (summed over their tokens, as vLLM
    and OpenAI rank ``best_of``), in that order; every sample's bill stays in theirs."""
    ranked = sorted(gens, key=lambda g: -sum(g.logprobs or [0.0]))
    kept, dropped = ranked[:n], ranked[n:]
    kept[0].usage = kept[0].usage + Usage.total(g.usage for g in dropped)
    return kept


def failure(e: BaseException) -> ApiError:
    """An error met while generating, as the answer to the client."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, (SettingError, AccessError)):
        return bad(str(e))
    if isinstance(e, InvalidLogitsError):
        return bad(f"the request's settings left no token to pick: {e}")
    if isinstance(e, BackendError):
        return ApiError(502, str(e))
    if isinstance(e, ShuttingDown):
        return ApiError(503, str(e))
    return ApiError(500, f"{type(e).__name__}: {e}")


async def run(svc: Any, job: Job, gen: Any, ids: list[list[int]]) -> list[list[Generation]]:
    n, seed = job.params.n, job.params.seed
    if job.score_only:  # echo-only scoring: nothing generated
        return [[Generation(text="", token_ids=[], finish_reason="length",
                            usage=Usage(prompt_tokens=len(x) if k == 0 else 0,
                                        computed_tokens=len(x) if k == 0 else 0)) for k in range(n)] for x in ids]
    if job.best_of is None or job.best_of == n:
        return await gen.agenerate_many(inputs(job, ids), n=n, seed=seed)
    outs = await gen.agenerate_many(inputs(job, ids), n=job.best_of, seed=seed)
    return [best_of(gens, n) for gens in outs]

def inputs(job: Job, ids: list[list[int]]) -> list[Any]:
    """What the generator gets: the token ids already encoded (check_lengths) for
    token-level requests, so the prompt is not encoded a second time; the text for a
    strategy, which builds prompts of its own from it."""
    return job.prompts if job.strategy else ids

async def prompt_logprobs(svc: Any, ids: list[int]) -> list[float | None]:
    scored = await asyncio.to_thread(svc.lm.score_ids, ids[:1], ids[1:]) if len(ids) > 1 else []
    return [None] + [float(x) for x in scored]

async def respond(svc: Any, job: Job, outs: list[list[Generation]], ids: list[list[int]]) -> dict[str, Any]:
    choices, flat, questions = [], [], []
    for pi, gens in enumerate(outs):
        p_text = job.prompts[pi] if isinstance(job.prompts[pi], str) else svc.lm.decode(ids[pi])
        p_lps = await prompt_logprobs(svc, ids[pi]) if job.echo and job.top_logprobs is not None else None
        for g in gens:
            i = len(flat)
            flat.append(g)
            questions.append(p_text)
            if job.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": g.text},
                          "logprobs": chat_logprobs(svc.lm, g, job) if job.top_logprobs is not None else None,
                          "finish_reason": g.finish_reason}
            else:
                lp = None
                if job.top_logprobs is not None:
                    lp = completion_logprobs(svc.lm, g, job, 0, (ids[pi], p_lps, p_text) if p_lps is not None else None)
                choice = {"index": i, "text": (p_text if job.echo else "") + g.text, "logprobs": lp,
                          "finish_reason": g.finish_reason, "stop_reason": g.stop}
            if job.token_ids:
                choice["token_ids"] = list(g.token_ids)
                choice["prompt_token_ids"] = ids[pi]
            choices.append(choice)
    out = envelope("chat.completion" if job.chat else "text_completion", job, choices, flat)
    if job.strategy:
        out["ponder"] = ponder_object(job, outs)
        if job.trace and svc.traces is not None:
            task = svc.task_for(job)
            keys = await svc.traces.write(out["id"], svc.served, job.strategy, job.settings,
                                           getattr(task, "extract_answer", None), flat, questions)
            for o, k in zip(out["ponder"]["outputs"], keys):
                o["view_id"] = k  # ponder view --db STORE, then #/g/ID
    return out


class EventStream:
    """Server-sent events: one chunk per released text delta (with its tokens'
    logprobs when asked), then the usage (unless ``include_usage`` is false) and
    [DONE]. ``close`` is called by the response when it ends however it ends: the
    events' generator itself is not closed when a client goes away (it stays suspended
    until collected), so its producers would run on.

    ``start`` awaits the first event before the response starts: a request that fails
    at once (a bad setting met by the engine) is an HTTP error, not a 200 whose body is
    an error event. A stream cut by shutdown ends with an error event."""

    DONE = object()

    def __init__(self, svc: Any, job: Job, gen: Any) -> None:
        self.svc, self.job, self.gen = svc, job, gen
        self.rid, self.created = new_id("chatcmpl" if job.chat else "cmpl"), int(time.time())
        self.kind = "chat.completion.chunk" if job.chat else "text_completion"
        self.queue: asyncio.Queue = asyncio.Queue()
        self.offsets: dict[int, int] = {}  # output index -> characters streamed so far (the next text_offset)
        self.workers: list = []
        self.closed = False

    async def _pump(self, pi: int, prompt: Any) -> None:
        try:
            async for ev in self.gen.astream(prompt, n=self.job.params.n, seed=self.job.params.seed):
                await self.queue.put((pi, ev))
        except BaseException as e:  # noqa: BLE001 (handed to the consumer)
            await self.queue.put((pi, e))
            return
        await self.queue.put((pi, self.DONE))

    async def start(self) -> Any:
        """Start the producers and wait for the first event; the events to send."""
        self.workers = [asyncio.ensure_future(self._pump(pi, p)) for pi, p in enumerate(self.job.prompts)]
        try:
            first = await self.svc.next_event(self.queue)
        except BaseException:
            await self.close()
            raise
        if isinstance(first[1], BaseException):
            await self.close()
            raise failure(first[1])
        return self.events(first)

    async def close(self) -> None:  # idempotent
        if self.closed:
            return
        self.closed = True
        self.svc.inflight -= 1  # first: the server may cancel this very call below
        for w in self.workers:  # each producer's own finally withdraws its rows from the batch
            w.cancel()
        # shielded: the server cancels a closed stream's task on every await (anyio's
        # cancel scope), and the producers must finish withdrawing all the same
        try:
            await asyncio.shield(asyncio.gather(*self.workers, return_exceptions=True))
        except asyncio.CancelledError:
            pass

    def _data(self, obj: dict[str, Any]) -> str:
        return "data: " + json.dumps(obj) + "\n\n"

    def chunk(self, i: int, text: str | None, finish: str | None, first: bool = False, ev: Any = None) -> str:
        job, lp = self.job, None
        if job.top_logprobs is not None and ev is not None and ev.token_ids:
            piece = Generation(text=ev.text, token_ids=ev.token_ids, logprobs=ev.logprobs, top_logprobs=ev.top_logprobs)
            lp = (chat_logprobs(self.svc.lm, piece, job) if job.chat
                  else completion_logprobs(self.svc.lm, piece, job, self.offsets[i]))
        if job.chat:
            delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
            c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            c = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
        return self._data({"id": self.rid, "object": self.kind, "created": self.created, "model": self.svc.served,
                           "choices": [c]})

    def error_event(self, msg: str, kind: str = "server_error") -> str:
        return self._data({"error": {"message": msg, "type": kind}})

    def heads(self) -> Any:
        """Each output's opening chunk: the chat's role, or the echoed prompt."""
        job, n = self.job, self.job.params.n
        for pi in range(len(job.prompts)):
            for j in range(n):
                head = job.prompts[pi] if (job.echo and isinstance(job.prompts[pi], str)) else None
                self.offsets[pi * n + j] = len(head or "")
                if job.chat or head:
                    yield self.chunk(pi * n + j, head, None, first=True)

    async def events(self, first: Any) -> Any:
        finished: list[Generation] = []
        pending, t0, open_ = [first], time.monotonic(), len(self.workers)
        try:
            for head in self.heads():
                yield head
            while open_:
                try:
                    pi, ev = pending.pop() if pending else await self.svc.next_event(self.queue)
                except ShuttingDown as e:
                    yield self.error_event(str(e), "service_unavailable")
                    yield "data: [DONE]\n\n"
                    return
                if ev is self.DONE or isinstance(ev, BaseException):
                    open_ -= 1
                    if ev is not self.DONE:
                        err = failure(ev)
                        yield self.error_event(err.message, err.body()["error"]["type"])
                    continue
                i, g = pi * self.job.params.n + ev.index, ev.generation
                if g is None:
                    yield self.chunk(i, ev.text, None, ev=ev)
                else:
                    finished.append(g)
                    yield self.chunk(i, ev.text or None, g.finish_reason, ev=ev)
                self.offsets[i] = self.offsets.get(i, 0) + len(ev.text)
            self.svc.metrics.finished(Usage.total(g.usage for g in finished), [g.finish_reason for g in finished],
                                      time.monotonic() - t0)
            if self.job.include_usage:
                yield self._data({"id": self.rid, "object": self.kind, "created": self.created,
                                  "model": self.svc.served, "choices": [], "usage": usage_of(finished)})
            yield "data: [DONE]\n\n"
        finally:
            await self.close()
