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
from fastapi.responses import JSONResponse

from .. import strategies
from ..backends.chat import ChatTemplate, check_messages
from ..errors import SettingError
from ..protocols import AccessError
from ..types import Usage
from .api import ApiError, Job, Limits, bad, parse, prompts_of
from .lifecycle import ClosingStream, Lifecycle
from .metrics import ServerMetrics
from .serving import GENERATION_ERRORS, EventStream, failure, respond, run


class Service(Lifecycle):
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
        Lifecycle.__init__(self)
        self._generators: "collections.OrderedDict[str, Any]" = collections.OrderedDict()  # built strategies, LRU
        from ..engine.engines import engine_for

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
        if name_ not in strategies.STRATEGIES:
            raise bad(f"ponder.strategy {name_!r} is unknown; GET /v1/strategies lists them", "ponder.strategy")
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

    def check_spend(self, job: Job, gen: Any) -> None:
        """The limits hold for what a strategy spends, not only for the top-level fields:
        each of its declared budgets (samples, beams, particles, iterations; their
        defaults included), and those of the strategies nested in it, times ``n`` are
        within ``max_n`` (the registry says what spends: ``strategies.core.spend``)."""
        if not job.strategy:
            return
        v, what = strategies.core.spend(job.strategy, job.settings)
        n = job.params.n
        if v * n > self.limits.max_n:
            raise bad(f"ponder.settings: {job.strategy} would spend {v} {what} per output x n={n}, over this server's "
                      f"limit of {self.limits.max_n} generations a request (--max-n); ask for fewer samples, beams, "
                      "particles or iterations", "ponder.settings")

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
            stream = EventStream(self, job, gen)
            try:
                events = await stream.start()
            except GENERATION_ERRORS as e:
                raise failure(e) from None  # before its first event: an HTTP error, not a stream
            return ClosingStream(events, stream.close, media_type="text/event-stream")
        try:
            t0 = time.monotonic()
            work = asyncio.ensure_future(run(self, job, gen, ids))
            outs = await self.until_done(work, request)
            answer = JSONResponse(await respond(self, job, outs, ids))
            flat = [g for gs in outs for g in gs]
            self.metrics.finished(Usage.total(g.usage for g in flat), [g.finish_reason for g in flat],
                                  time.monotonic() - t0)
            return answer
        except GENERATION_ERRORS as e:
            raise failure(e) from None
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


GRACE_S = 4.0  # seconds in-flight requests get to finish at shutdown
# then seconds uvicorn still waits for the 503s of those cancelled before it closes the rest with
# a plain-text 500: one engine step can hold the event loop most of a second on a loaded machine
ANSWER_S = 3.0


def serve(lm: Any, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the app with uvicorn until interrupted. At SIGTERM or Ctrl-C, requests in
    flight get the grace period to finish; then those still running are cancelled (their
    rows leave the batch) and answered with an OpenAI-shaped 503, and streams end with an
    error event, rather than uvicorn's plain-text 500 and bodies cut mid-way (uvicorn
    waits ANSWER_S more for those answers)."""
    import uvicorn

    app = create_app(lm, **options)
    svc = app.state.service

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            svc.begin_shutdown(GRACE_S)
            super().handle_exit(sig, frame)

    try:
        Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                              timeout_graceful_shutdown=GRACE_S + ANSWER_S)).run()
    finally:
        if svc.traces is not None:
            svc.traces.close()
