"""``ponder serve``: the native engine, and every strategy, behind the OpenAI API.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /v1/strategies``, ``GET /health``. Concurrent requests share the engine's
continuous batch (each request's generation runs on one of the engine's caller
threads, and the engine steps everyone together), so throughput grows with
concurrency as vLLM's does.

The extension field ``ponder: {strategy, settings, task, trace}`` runs any registered
strategy server-side (majority vote, best-of-N, PRM beam search, MCTS, ...), as
optillm does, but with honest usage: ``usage`` counts every internal token, and the
response's ``ponder`` object carries each output's meta and, with ``trace: true``, the
strategy's internal generations.

Limits: 127.0.0.1 by default; an optional API key compared in constant time; caps on
``max_tokens``, ``n``, prompts per request, prompt length (the model's context) and
body size; beyond ``max_inflight`` requests, 429 with ``Retry-After``. A client that
disconnects cancels its work and its rows leave the batch (their KV is freed).
"""

# (no `from __future__ import annotations`: FastAPI reads the routes' annotations at run time)

import asyncio
import collections
import hmac
import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .. import strategies
from ..backends.chat import ChatTemplate, check_messages
from ..errors import BackendError, InvalidLogitsError, SettingError
from ..protocols import AccessError
from ..types import Generation, Usage
from .metrics import ServerMetrics
from .api import (ApiError, Job, Limits, bad, chat_logprobs, completion_logprobs, envelope, new_id, parse,
                  ponder_object, prompts_of, usage_of)


class ShuttingDown(Exception):
    """The server's grace period ran out before the request finished."""


# what a request's generation may raise that is the client's answer (``Service.failure``)
GENERATION_ERRORS = (ApiError, SettingError, AccessError, InvalidLogitsError, BackendError, ShuttingDown)


class ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` when it ends, however it ends (the
    client gone, the stream done): so a disconnect stops the generation."""

    def __init__(self, content: Any, on_close: Any, **kw: Any) -> None:
        super().__init__(content, **kw)
        self.on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()


def best_of(gens: list[Generation], n: int) -> list[Generation]:
    """The ``n`` samples of highest log-probability (summed over their tokens, as vLLM
    and OpenAI rank ``best_of``), in that order; every sample's bill stays in theirs."""
    ranked = sorted(gens, key=lambda g: -sum(g.logprobs or [0.0]))
    kept, dropped = ranked[:n], ranked[n:]
    kept[0].usage = kept[0].usage + Usage.total(g.usage for g in dropped)
    return kept


class Service:
    """One served model and what a request goes through: the key, the body, parsing
    into a ``Job`` (api.py), the strategy built through the registry, the prompts'
    lengths against the context, the run on the engine (cancelled if the client goes
    away), and the answer, whole or streamed. The routes of ``create_app`` call it."""

    def __init__(self, lm: Any, reward_model: Any = None, task: str | None = "arith", api_key: str | None = None,
                 limits: Limits | None = None, name: str | None = None, trace_store: Any = None) -> None:
        self.lm, self.reward_model, self.task, self.api_key = lm, reward_model, task, api_key
        # ponder.trace requests are also kept there, for ponder view (server/traces.py)
        self.traces = None
        if trace_store is not None:
            from .traces import TraceWriter

            self.traces = TraceWriter(trace_store)
        self.limits = limits or Limits()
        self.served = name or lm.name
        self.context = int(lm.context_length)
        self.template = ChatTemplate.from_folder(getattr(lm, "path", None))
        self.tasks: dict[str, Any] = {}
        self.inflight = 0
        self.stopping_at: float | None = None  # set at shutdown: in-flight work ends with 503 from then on
        self.works: set = set()  # the non-streaming requests' work in flight
        self._generators: "collections.OrderedDict[str, Any]" = collections.OrderedDict()  # built strategies, LRU
        self.loop: Any = None  # the serving loop, where the shutdown's timer runs
        from ..engine.engine import engine_for

        self.engine = engine_for(lm)
        self.metrics = ServerMetrics(self.served)
        self.engine.observe = self.metrics.observe

    # -- reading a request -------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY")

    async def read_json(self, request: Request) -> Any:
        kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            # A web page may POST text/plain (or a form) to any address without asking;
            # a JSON content type needs the browser's CORS preflight, which this server
            # never grants: so no page can spend a keyless server's compute.
            raise ApiError(415, f"the body must be JSON sent as Content-Type: application/json; got "
                                f"{kind or 'no Content-Type'}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limits.max_body_bytes:
            raise ApiError(413, f"the body is {declared} bytes; at most {self.limits.max_body_bytes} are accepted")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise ApiError(413, f"the body is over {self.limits.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except ValueError as e:
            raise bad(f"the body is not valid JSON: {e}") from None
        except RecursionError:
            raise bad("the body's JSON is nested too deeply; no field of this API nests more than a few "
                      "levels") from None

    def task_for(self, job: Job) -> Any:
        name_ = job.task or self.task
        if name_ is None:
            return None
        if name_ not in self.tasks:
            from ..tasks.registry import load_task

            try:
                self.tasks[name_] = load_task(name_)
            except SettingError as e:
                raise bad(f"ponder.task: {e}", "ponder.task") from None
        return self.tasks[name_]

    GENERATORS_KEPT = 64

    def generator(self, job: Job) -> Any:
        """The request's generator, built through the registry once per distinct
        (strategy, sampling parameters, settings) and then reused: generators keep no
        state between calls, and building one per request (processor chains, access
        checks) was a tenth of the event loop's time at 64 requests in flight."""
        name_ = job.strategy or "sample"
        settings = {**job.settings, **job.constraint}
        key = json.dumps([name_, repr(job.params.replace(n=1, seed=None)), settings, job.task], sort_keys=True,
                         default=repr)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = self._build(job, name_, settings)
            if len(self._generators) > self.GENERATORS_KEPT:
                self._generators.popitem(last=False)
        else:
            self._generators.move_to_end(key)
        self.check_spend(job, gen)  # n differs between requests that share a generator
        return gen

    def _build(self, job: Job, name_: str, settings: dict[str, Any]) -> Any:
        ctx = strategies.Context(task=self.task_for(job) if job.strategy else None, reward_model=self.reward_model)
        try:
            gen = strategies.build(name_, self.lm, job.params.replace(n=1, seed=None), settings, ctx)
        except (SettingError, AccessError) as e:
            param = "response_format" if job.constraint and "schema" in str(e).lower() else (
                "ponder.settings" if job.strategy else None)
            msg = str(e).replace("--strategy", "ponder.strategy").replace("--set ", "ponder.settings.")
            setting = getattr(e, "setting", None)
            if job.strategy and setting is not None and setting in settings:  # name the field the request sent
                param = f"ponder.settings.{setting}"
                if msg.startswith(setting + " "):
                    msg = "ponder.settings." + msg
            raise bad(msg, param) from None
        return gen

    # what a generator spends per output, by the attribute that counts it
    SPEND = ("n", "N", "num_beams", "breadth", "iterations", "max_expansions", "probe_n", "trials", "rounds")

    def check_spend(self, job: Job, gen: Any) -> None:
        """The limits hold for what a strategy spends, not only for the top-level fields:
        its samples, beams, particles or iterations (its defaults included) times ``n``
        are within ``max_n``, and its rollouts within ``max_tokens``. Nested generators
        (an inner strategy, a policy's candidates) are read too."""
        lim, n = self.limits, job.params.n
        seen, todo = set(), [(gen, 0)]
        while todo:
            g, depth = todo.pop()
            if id(g) in seen or depth > 3:
                continue
            seen.add(id(g))
            for attr, v in vars(g).items():
                if attr in self.SPEND and isinstance(v, int) and not isinstance(v, bool) and v * n > lim.max_n:
                    raise bad(f"ponder.settings: {job.strategy or 'the request'} would spend {v} {attr} per output "
                              f"x n={n}, over this server's limit of {lim.max_n} generations a request (--max-n); ask "
                              "for fewer samples, beams, particles or iterations", "ponder.settings")
                if attr == "rollout_tokens" and isinstance(v, int) and v > lim.max_tokens:
                    raise bad(f"ponder.settings.rollout_tokens {v} is over this server's max_tokens limit "
                              f"{lim.max_tokens}", "ponder.settings")
                if hasattr(v, "agenerate") and v is not g:
                    todo.append((v, depth + 1))
                elif isinstance(v, (list, tuple, dict)):
                    for x in (v.values() if isinstance(v, dict) else v):
                        if hasattr(x, "agenerate"):
                            todo.append((x, depth + 1))

    def prompts(self, job: Job, body: dict) -> list[Any]:
        if job.chat:
            try:
                return [self.template.render(check_messages(body.get("messages")))]
            except SettingError as e:
                raise bad(str(e), "messages") from None
        ps = prompts_of(body, self.lm.vocab_size)
        if len(ps) > self.limits.max_prompts:
            raise bad(f"prompt holds {len(ps)} prompts; at most {self.limits.max_prompts} per request", "prompt")
        if job.strategy:  # strategies take text
            ps = [p if isinstance(p, str) else self.lm.decode(p) for p in ps]
        return ps

    def check_lengths(self, job: Job) -> list[list[int]]:
        """The prompts' token ids; a prompt that leaves no room, or less room than the
        ``max_tokens`` the client asked for, is a 400 (as vLLM and OpenAI answer), never
        a generation silently cut at the context."""
        from ..decoding.generate import encode_prompt

        field_ = "messages" if job.chat else "prompt"
        try:
            ids = [encode_prompt(self.lm, p) for p in job.prompts]
        except SettingError as e:
            raise bad(str(e), field_) from None
        for i, x in enumerate(ids):
            if len(x) >= self.context:
                raise bad(f"prompt {i} is {len(x)} tokens; the model's context is {self.context} tokens, and generation "
                          "needs room: shorten the prompt", field_)
            if job.max_tokens_given and not job.score_only and len(x) + job.params.max_tokens > self.context:
                mt = job.max_tokens_field
                raise bad(f"prompt {i} is {len(x)} tokens and {mt} is {job.params.max_tokens}: together "
                          f"{len(x) + job.params.max_tokens}, over the model's context of {self.context} tokens; "
                          f"lower {mt} to at most {self.context - len(x)} or shorten the prompt", mt)
        return ids

    # -- running it ----------------------------------------------------------------------
    async def until_done(self, work: "asyncio.Task[Any]", request: Request) -> Any:
        """The work's result, or its cancellation when the client goes away (its rows
        then leave the engine's batch) or the shutdown's grace period ends (503).
        Nothing polls: one task waits for the server's disconnect message, and the
        shutdown is an event (a poll of every request 5 times a second cost 12% of the
        event loop's time at 64 requests in flight)."""
        self.loop = asyncio.get_running_loop()
        gone = asyncio.ensure_future(self._disconnect(request))
        self.works.add(work)  # a shutdown past its grace period cancels what is here
        try:
            done, _ = await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            self.works.discard(work)
        if work in done and not work.cancelled():
            return work.result()
        work.cancel()  # its rows leave the batch
        try:
            await work
        except BaseException:
            pass
        self.check_shutdown()
        raise ApiError(499, "the client disconnected; the request was cancelled")

    @staticmethod
    async def _disconnect(request: Request) -> None:
        """Returns when the client has gone (the body was read already, so the next
        message the server has for this request is its disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass

    def begin_shutdown(self, grace_s: float) -> None:
        """From the signal handler: in-flight work has ``grace_s`` seconds, then its
        task is cancelled and answered 503 (streams check ``stopping_at`` themselves)."""
        if self.stopping_at is not None:
            return
        self.stopping_at = time.monotonic() + grace_s
        if self.loop is not None:  # no request has come yet: nothing to cancel
            def expire() -> None:
                for w in list(self.works):
                    w.cancel()
            self.loop.call_soon_threadsafe(self.loop.call_later, grace_s, expire)

    async def run(self, job: Job, gen: Any, ids: list[list[int]]) -> list[list[Generation]]:
        n, seed = job.params.n, job.params.seed
        if job.score_only:  # echo-only scoring: nothing generated
            return [[Generation(text="", token_ids=[], finish_reason="length",
                                usage=Usage(prompt_tokens=len(x) if k == 0 else 0,
                                            computed_tokens=len(x) if k == 0 else 0)) for k in range(n)] for x in ids]
        if job.best_of is None or job.best_of == n:
            return await gen.agenerate_many(self.inputs(job, ids), n=n, seed=seed)
        outs = await gen.agenerate_many(self.inputs(job, ids), n=job.best_of, seed=seed)
        return [best_of(gens, n) for gens in outs]

    @staticmethod
    def inputs(job: Job, ids: list[list[int]]) -> list[Any]:
        """What the generator gets: the token ids already encoded (check_lengths) for
        token-level requests, so the prompt is not encoded a second time; the text for a
        strategy, which builds prompts of its own from it."""
        return job.prompts if job.strategy else ids

    async def prompt_logprobs(self, ids: list[int]) -> list[float | None]:
        scored = await asyncio.to_thread(self.lm.score_ids, ids[:1], ids[1:]) if len(ids) > 1 else []
        return [None] + [float(x) for x in scored]

    async def respond(self, job: Job, outs: list[list[Generation]], ids: list[list[int]]) -> dict[str, Any]:
        choices, flat, questions = [], [], []
        for pi, gens in enumerate(outs):
            p_text = job.prompts[pi] if isinstance(job.prompts[pi], str) else self.lm.decode(ids[pi])
            p_lps = await self.prompt_logprobs(ids[pi]) if job.echo and job.top_logprobs is not None else None
            for g in gens:
                i = len(flat)
                flat.append(g)
                questions.append(p_text)
                if job.chat:
                    choice = {"index": i, "message": {"role": "assistant", "content": g.text},
                              "logprobs": chat_logprobs(self.lm, g, job) if job.top_logprobs is not None else None,
                              "finish_reason": g.finish_reason}
                else:
                    lp = None
                    if job.top_logprobs is not None:
                        lp = completion_logprobs(self.lm, g, job, 0, (ids[pi], p_lps, p_text) if p_lps is not None else None)
                    choice = {"index": i, "text": (p_text if job.echo else "") + g.text, "logprobs": lp,
                              "finish_reason": g.finish_reason, "stop_reason": g.stop}
                if job.token_ids:
                    choice["token_ids"] = list(g.token_ids)
                    choice["prompt_token_ids"] = ids[pi]
                choices.append(choice)
        out = envelope("chat.completion" if job.chat else "text_completion", job, choices, flat)
        if job.strategy:
            out["ponder"] = ponder_object(job, outs)
            if job.trace and self.traces is not None:
                task = self.task_for(job)
                keys = await self.traces.write(out["id"], self.served, job.strategy, job.settings,
                                               getattr(task, "extract_answer", None), flat, questions)
                for o, k in zip(out["ponder"]["outputs"], keys):
                    o["view_id"] = k  # ponder view --db STORE, then #/g/ID
        return out

    async def stream(self, job: Job, gen: Any, ids: list[list[int]]) -> tuple[Any, Any]:
        """Server-sent events: one chunk per released text delta (with its tokens'
        logprobs when asked), then the usage (unless ``include_usage`` is false) and
        [DONE]. Returns the events and ``close``, which the response calls when it ends
        however it ends: the events' generator itself is not closed when a client goes
        away (it stays suspended until collected), so its producers would run on.

        The first event is awaited here, before the response starts: a request that
        fails at once (a bad setting met by the engine) is an HTTP error, not a 200
        whose body is an error event. A stream cut by shutdown ends with an error event."""
        n, seed = job.params.n, job.params.seed
        rid, created, kind = new_id("chatcmpl" if job.chat else "cmpl"), int(time.time()), \
            "chat.completion.chunk" if job.chat else "text_completion"
        queue: asyncio.Queue = asyncio.Queue()
        done = object()

        async def pump(pi: int, prompt: Any) -> None:
            try:
                async for ev in gen.astream(prompt, n=n, seed=seed):
                    await queue.put((pi, ev))
            except BaseException as e:  # noqa: BLE001 (handed to the consumer)
                await queue.put((pi, e))
                return
            await queue.put((pi, done))

        workers = [asyncio.ensure_future(pump(pi, p)) for pi, p in enumerate(job.prompts)]
        closed = {"done": False}

        async def close() -> None:  # idempotent
            if closed["done"]:
                return
            closed["done"] = True
            self.inflight -= 1  # first: the server may cancel this very call below
            for w in workers:  # each producer's own finally withdraws its rows from the batch
                w.cancel()
            # shielded: the server cancels a closed stream's task on every await (anyio's
            # cancel scope), and the producers must finish withdrawing all the same
            try:
                await asyncio.shield(asyncio.gather(*workers, return_exceptions=True))
            except asyncio.CancelledError:
                pass

        try:
            first = await self.next_event(queue)
        except BaseException:
            await close()
            raise
        if isinstance(first[1], BaseException):
            await close()
            raise self.failure(first[1])

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False, ev: Any = None) -> str:
            lp = None
            if job.top_logprobs is not None and ev is not None and ev.token_ids:
                piece = Generation(text=ev.text, token_ids=ev.token_ids, logprobs=ev.logprobs,
                                   top_logprobs=ev.top_logprobs)
                lp = (chat_logprobs(self.lm, piece, job) if job.chat
                      else completion_logprobs(self.lm, piece, job, offsets[i]))
            if job.chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                c = {"index": i, "delta": delta, "logprobs": lp, "finish_reason": finish}
            else:
                c = {"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": self.served,
                                          "choices": [c]}) + "\n\n"

        def error_event(msg: str, kind_: str = "server_error") -> str:
            return "data: " + json.dumps({"error": {"message": msg, "type": kind_}}) + "\n\n"

        offsets = {}  # output index -> characters streamed so far (text_offset of the next token)

        t0 = time.monotonic()

        async def events():
            finished: list[Generation] = []
            pending = [first]
            try:
                for pi in range(len(job.prompts)):
                    for j in range(n):
                        head = job.prompts[pi] if (job.echo and isinstance(job.prompts[pi], str)) else None
                        offsets[pi * n + j] = len(head or "")
                        if job.chat or head:
                            yield chunk(pi * n + j, head, None, first=True)
                open_ = len(workers)
                while open_:
                    try:
                        pi, ev = pending.pop() if pending else await self.next_event(queue)
                    except ShuttingDown as e:
                        yield error_event(str(e), "service_unavailable")
                        yield "data: [DONE]\n\n"
                        return
                    if ev is done:
                        open_ -= 1
                        continue
                    if isinstance(ev, BaseException):
                        err = self.failure(ev)
                        yield error_event(err.message, err.body()["error"]["type"])
                        open_ -= 1
                        continue
                    i = pi * n + ev.index
                    if ev.generation is None:
                        yield chunk(i, ev.text, None, ev=ev)
                    else:
                        finished.append(ev.generation)
                        yield chunk(i, ev.text or None, ev.generation.finish_reason, ev=ev)
                    offsets[i] = offsets.get(i, 0) + len(ev.text)
                self.metrics.finished(Usage.total(g.usage for g in finished), [g.finish_reason for g in finished],
                                      time.monotonic() - t0)
                if job.include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": self.served,
                                                 "choices": [], "usage": usage_of(finished)}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await close()

        return events(), close

    async def next_event(self, queue: asyncio.Queue) -> Any:
        """The next event of a stream; ``ShuttingDown`` once the server's grace period
        is over, checked at every event as well as while none comes (a busy stream whose
        events never paused was only checked while idle, and uvicorn cut it mid-body)."""
        while True:
            self.check_shutdown()
            try:
                return await asyncio.wait_for(queue.get(), timeout=0.2)
            except asyncio.TimeoutError:
                pass

    def check_shutdown(self) -> None:
        if self.stopping_at is not None and time.monotonic() >= self.stopping_at - 0.01:
            raise ShuttingDown("the server is shutting down and this request did not finish within its grace "
                               "period; retry it (on another replica if there is one)")

    @staticmethod
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

    async def handle(self, request: Request, chat: bool) -> Any:
        self.check_key(request)
        body = await self.read_json(request)
        job = parse(body, chat, self.limits, self.context, self.served, vocab=int(self.lm.vocab_size))
        job.prompts = self.prompts(job, body)
        ids = self.check_lengths(job)
        gen = self.generator(job)
        if self.stopping_at is not None:
            raise ApiError(503, "the server is shutting down; retry on another replica or after it restarts")
        if self.inflight >= self.limits.max_inflight:
            raise ApiError(429, f"the server is saturated ({self.limits.max_inflight} requests in flight); retry later",
                           headers={"Retry-After": str(self.limits.retry_after_s)})
        self.inflight += 1
        if job.stream:  # close() gives the slot back, however the stream ends
            try:
                events, close = await self.stream(job, gen, ids)
            except GENERATION_ERRORS as e:
                raise self.failure(e) from None  # before its first event: an HTTP error, not a stream
            return ClosingStream(events, close, media_type="text/event-stream")
        try:
            t0 = time.monotonic()
            work = asyncio.ensure_future(self.run(job, gen, ids))
            outs = await self.until_done(work, request)
            answer = JSONResponse(await self.respond(job, outs, ids))
            flat = [g for gs in outs for g in gs]
            self.metrics.finished(Usage.total(g.usage for g in flat), [g.finish_reason for g in flat],
                                  time.monotonic() - t0)
            return answer
        except GENERATION_ERRORS as e:
            raise self.failure(e) from None
        finally:
            self.inflight -= 1


def create_app(lm: Any, *, reward_model: Any = None, task: str | None = "arith", api_key: str | None = None,
               limits: Limits | None = None, name: str | None = None, trace_store: Any = None) -> Any:
    """The FastAPI app serving ``lm`` (an in-process logits-level model: NativeLM or HFLM)."""
    from fastapi.responses import Response
    from starlette.exceptions import HTTPException

    svc = Service(lm, reward_model, task, api_key, limits, name, trace_store)
    app = FastAPI(title="ponder", version="0.1.0", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> Any:
        svc.metrics.failed(e.status)
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> Any:  # unknown routes, wrong methods
        msg = {404: f"no route {request.url.path}; this server has POST /v1/completions, POST /v1/chat/completions, "
                    "GET /v1/models, GET /v1/strategies, GET /health and GET /metrics",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(e.status_code, str(e.detail))
        return await _api_error(request, ApiError(e.status_code, msg, headers=dict(e.headers or {})))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await svc.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await svc.handle(request, chat=True)

    def model_card() -> dict[str, Any]:
        return {"id": svc.served, "object": "model", "created": 0, "owned_by": "ponder", "max_model_len": svc.context}

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        svc.check_key(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(request: Request, model_id: str) -> Any:
        svc.check_key(request)
        if model_id != svc.served:
            raise ApiError(404, f"model {model_id!r} is not served here; this server serves {svc.served!r}", "model")
        return model_card()

    @app.get("/v1/strategies")
    async def list_strategies(request: Request) -> Any:
        svc.check_key(request)
        return {"object": "list", "data": [{"id": s.name, "access": s.access, "settings": list(s.settings),
                                            "help": s.help} for s in strategies.STRATEGIES.values()]}

    @app.get("/health")
    async def health() -> Any:
        eng = svc.engine  # what a monitor wants to see of the batch
        return {"status": "stopping" if svc.stopping_at is not None else "ok", "inflight": svc.inflight,
                "engine": {"running": eng.running, "steps": eng.steps, "multi_step_calls": eng.multi_step_calls,
                           "peak_rows": eng.peak_rows, "kv_bytes": eng.kv_bytes_in_use()}}

    @app.get("/metrics")
    async def metrics() -> Any:
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(svc.metrics.render(svc.engine, svc.inflight), media_type=CONTENT_TYPE_LATEST)

    return app


GRACE_S = 5.0  # seconds in-flight requests get to finish at shutdown


def serve(lm: Any, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the app with uvicorn until interrupted. At SIGTERM or Ctrl-C, requests in
    flight get the grace period to finish; a second before it ends, those still running
    are cancelled (their rows leave the batch) and answered with an OpenAI-shaped 503,
    and streams end with an error event, rather than uvicorn's plain-text 500 and
    bodies cut mid-way."""
    import uvicorn

    app = create_app(lm, **options)
    svc = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            svc.begin_shutdown(GRACE_S - 1.0)
            super().handle_exit(sig, frame)

    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level="warning", timeout_graceful_shutdown=GRACE_S)).run()
    finally:
        if svc.traces is not None:
            svc.traces.close()
