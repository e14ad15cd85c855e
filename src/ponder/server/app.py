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
from .api import (ApiError, Job, Limits, bad, chat_logprobs, completion_logprobs, envelope, new_id, parse,
                  ponder_object, prompts_of, usage_of)


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


class Service:
    """One served model and what a request goes through: the key, the body, parsing
    into a ``Job`` (api.py), the strategy built through the registry, the prompts'
    lengths against the context, the run on the engine (cancelled if the client goes
    away), and the answer, whole or streamed. The routes of ``create_app`` call it."""

    def __init__(self, lm: Any, reward_model: Any = None, task: str | None = "arith", api_key: str | None = None,
                 limits: Limits | None = None, name: str | None = None) -> None:
        self.lm, self.reward_model, self.task, self.api_key = lm, reward_model, task, api_key
        self.limits = limits or Limits()
        self.served = name or lm.name
        self.context = int(lm.context_length)
        self.template = ChatTemplate.from_folder(getattr(lm, "path", None))
        self.tasks: dict[str, Any] = {}
        self.inflight = 0

    # -- reading a request -------------------------------------------------------------
    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), self.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY")

    async def read_json(self, request: Request) -> Any:
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

    def generator(self, job: Job) -> Any:
        name_ = job.strategy or "sample"
        settings = {**job.settings, **job.constraint}
        ctx = strategies.Context(task=self.task_for(job) if job.strategy else None, reward_model=self.reward_model)
        try:
            return strategies.build(name_, self.lm, job.params.replace(n=1, seed=None), settings, ctx)
        except (SettingError, AccessError) as e:
            param = "response_format" if job.constraint and "schema" in str(e).lower() else (
                "ponder.settings" if job.strategy else None)
            msg = str(e).replace("--strategy", "ponder.strategy").replace("--set ", "ponder.settings.")
            raise bad(msg, param) from None

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
        ids = [self.lm.encode(p) if isinstance(p, str) else list(p) for p in job.prompts]
        for i, x in enumerate(ids):
            if len(x) >= self.context:
                raise bad(f"prompt {i} is {len(x)} tokens; the model's context is {self.context} tokens, and generation "
                          "needs room: shorten the prompt", "messages" if job.chat else "prompt")
        return ids

    # -- running it ----------------------------------------------------------------------
    async def until_done(self, work: "asyncio.Task[Any]", request: Request) -> Any:
        """The work's result, or its cancellation when the client goes away (its rows
        then leave the engine's batch)."""
        while True:
            done, _ = await asyncio.wait({work}, timeout=0.2)
            if done:
                return work.result()
            if await request.is_disconnected():
                work.cancel()
                try:
                    await work
                except BaseException:
                    pass
                raise ApiError(499, "the client disconnected; the request was cancelled")

    async def run(self, job: Job, gen: Any, ids: list[list[int]]) -> list[list[Generation]]:
        n, seed = job.params.n, job.params.seed
        if job.score_only:  # echo-only scoring: nothing generated
            return [[Generation(text="", token_ids=[], finish_reason="length",
                                usage=Usage(prompt_tokens=len(x) if k == 0 else 0,
                                            computed_tokens=len(x) if k == 0 else 0)) for k in range(n)] for x in ids]
        return await gen.agenerate_many(job.prompts, n=n, seed=seed)

    async def prompt_logprobs(self, ids: list[int]) -> list[float | None]:
        scored = await asyncio.to_thread(self.lm.score_ids, ids[:1], ids[1:]) if len(ids) > 1 else []
        return [None] + [float(x) for x in scored]

    async def respond(self, job: Job, outs: list[list[Generation]], ids: list[list[int]]) -> dict[str, Any]:
        choices, flat = [], []
        for pi, gens in enumerate(outs):
            p_text = job.prompts[pi] if isinstance(job.prompts[pi], str) else self.lm.decode(ids[pi])
            p_lps = await self.prompt_logprobs(ids[pi]) if job.echo and job.top_logprobs is not None else None
            for g in gens:
                i = len(flat)
                flat.append(g)
                if job.chat:
                    choice = {"index": i, "message": {"role": "assistant", "content": g.text},
                              "logprobs": chat_logprobs(self.lm, g, job) if job.top_logprobs is not None else None,
                              "finish_reason": g.finish_reason}
                else:
                    lp = None
                    if job.top_logprobs is not None:
                        lp = completion_logprobs(self.lm, g, job, 0, (ids[pi], p_lps) if p_lps is not None else None)
                    choice = {"index": i, "text": (p_text if job.echo else "") + g.text, "logprobs": lp,
                              "finish_reason": g.finish_reason, "stop_reason": g.stop}
                if job.token_ids:
                    choice["token_ids"] = list(g.token_ids)
                    choice["prompt_token_ids"] = ids[pi]
                choices.append(choice)
        out = envelope("chat.completion" if job.chat else "text_completion", job, choices, flat)
        if job.strategy:
            out["ponder"] = ponder_object(job, outs)
        return out

    def stream(self, job: Job, gen: Any, ids: list[list[int]]) -> tuple[Any, Any]:
        """Server-sent events: one chunk per released text delta, then [DONE]. Returns
        the events and ``close``, which the response calls when it ends however it
        ends: the events' generator itself is not closed when a client goes away (it
        stays suspended until collected), so its producers would run on."""
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
            await asyncio.gather(*workers, return_exceptions=True)

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if job.chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                c = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": self.served,
                                          "choices": [c]}) + "\n\n"

        async def events():
            finished: list[Generation] = []
            try:
                for pi in range(len(job.prompts)):
                    for j in range(n):
                        head = job.prompts[pi] if (job.echo and isinstance(job.prompts[pi], str)) else None
                        if job.chat or head:
                            yield chunk(pi * n + j, head, None, first=True)
                open_ = len(workers)
                while open_:
                    pi, ev = await queue.get()
                    if ev is done:
                        open_ -= 1
                        continue
                    if isinstance(ev, BaseException):
                        msg = str(ev) if isinstance(ev, (SettingError, InvalidLogitsError)) else f"{type(ev).__name__}: {ev}"
                        yield "data: " + json.dumps({"error": {"message": msg, "type": "server_error"}}) + "\n\n"
                        open_ -= 1
                        continue
                    i = pi * n + ev.index
                    if ev.text:
                        yield chunk(i, ev.text, None)
                    if ev.generation is not None:
                        finished.append(ev.generation)
                        yield chunk(i, None, ev.generation.finish_reason)
                yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": self.served,
                                             "choices": [], "usage": usage_of(finished)}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await close()

        return events(), close

    async def handle(self, request: Request, chat: bool) -> Any:
        self.check_key(request)
        body = await self.read_json(request)
        job = parse(body, chat, self.limits, self.context, self.served)
        job.prompts = self.prompts(job, body)
        ids = self.check_lengths(job)
        gen = self.generator(job)
        if self.inflight >= self.limits.max_inflight:
            raise ApiError(429, f"the server is saturated ({self.limits.max_inflight} requests in flight); retry later",
                           headers={"Retry-After": str(self.limits.retry_after_s)})
        self.inflight += 1
        if job.stream:
            events, close = self.stream(job, gen, ids)
            return ClosingStream(events, close, media_type="text/event-stream")
        try:
            work = asyncio.ensure_future(self.run(job, gen, ids))
            outs = await self.until_done(work, request)
            return JSONResponse(await self.respond(job, outs, ids))
        except (SettingError, AccessError) as e:
            raise bad(str(e)) from None
        except InvalidLogitsError as e:
            raise bad(f"the request's settings left no token to pick: {e}") from None
        except BackendError as e:
            raise ApiError(502, str(e)) from None
        finally:
            self.inflight -= 1



def create_app(lm: Any, *, reward_model: Any = None, task: str | None = "arith", api_key: str | None = None,
               limits: Limits | None = None, name: str | None = None) -> Any:
    """The FastAPI app serving ``lm`` (an in-process logits-level model: NativeLM or HFLM)."""
    svc = Service(lm, reward_model, task, api_key, limits, name)
    app = FastAPI(title="ponder", version="0.1.0", docs_url=None, redoc_url=None)
    app.state.service = svc

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> Any:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await svc.handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await svc.handle(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        svc.check_key(request)
        return {"object": "list", "data": [{"id": svc.served, "object": "model", "created": 0, "owned_by": "ponder",
                                            "max_model_len": svc.context}]}

    @app.get("/v1/strategies")
    async def list_strategies(request: Request) -> Any:
        svc.check_key(request)
        return {"object": "list", "data": [{"id": s.name, "access": s.access, "settings": list(s.settings),
                                            "help": s.help} for s in strategies.STRATEGIES.values()]}

    @app.get("/health")
    async def health() -> Any:
        from ..engine.engine import engine_for

        eng = engine_for(svc.lm)  # what a monitor wants to see of the batch
        return {"status": "ok", "inflight": svc.inflight,
                "engine": {"running": eng.running, "steps": eng.steps, "multi_step_calls": eng.multi_step_calls,
                           "peak_rows": eng.peak_rows, "kv_bytes": eng.kv_bytes_in_use()}}

    return app


def serve(lm: Any, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(lm, **options), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
