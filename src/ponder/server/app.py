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

from ..errors import BackendError, InvalidLogitsError, SettingError
from ..protocols import AccessError
from ..types import Generation, Usage
from .api import (ApiError, Job, Limits, bad, chat_logprobs, completion_logprobs, envelope, new_id, parse,
                  ponder_object, prompts_of, usage_of)


def create_app(lm: Any, *, reward_model: Any = None, task: str | None = "arith", api_key: str | None = None,
               limits: Limits | None = None, name: str | None = None) -> Any:
    """The FastAPI app serving ``lm`` (a NativeLM)."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse

    from .. import strategies
    from ..backends.chat import ChatTemplate, check_messages

    limits = limits or Limits()
    served = name or lm.name
    context = int(lm.context_length)
    template = ChatTemplate.from_folder(getattr(lm, "path", None))
    tasks: dict[str, Any] = {}
    state = {"inflight": 0}
    app = FastAPI(title="ponder", version="0.1.0", docs_url=None, redoc_url=None)

    class ClosingStream(StreamingResponse):
        """A streaming response that runs ``on_close`` when it ends, however it ends
        (the client gone, the stream done): so a disconnect stops the generation."""

        def __init__(self, content: Any, on_close: Any, **kw: Any) -> None:
            super().__init__(content, **kw)
            self.on_close = on_close

        async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.on_close()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError) -> Any:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        got = request.headers.get("authorization", "")
        token = got[7:] if got.lower().startswith("bearer ") else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer KEY")

    async def read_json(request: Request) -> Any:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limits.max_body_bytes:
            raise ApiError(413, f"the body is {declared} bytes; at most {limits.max_body_bytes} are accepted")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limits.max_body_bytes:
                raise ApiError(413, f"the body is over {limits.max_body_bytes} bytes")
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks) or b"null")
        except ValueError as e:
            raise bad(f"the body is not valid JSON: {e}") from None

    def task_for(job: Job) -> Any:
        name_ = job.task or task
        if name_ is None:
            return None
        if name_ not in tasks:
            from ..tasks.registry import load_task

            try:
                tasks[name_] = load_task(name_)
            except SettingError as e:
                raise bad(f"ponder.task: {e}", "ponder.task") from None
        return tasks[name_]

    def generator(job: Job) -> Any:
        name_ = job.strategy or "sample"
        settings = {**job.settings, **job.constraint}
        ctx = strategies.Context(task=task_for(job) if job.strategy else None, reward_model=reward_model)
        try:
            return strategies.build(name_, lm, job.params.replace(n=1, seed=None), settings, ctx)
        except (SettingError, AccessError) as e:
            param = "response_format" if job.constraint and "schema" in str(e).lower() else (
                "ponder.settings" if job.strategy else None)
            msg = str(e).replace("--strategy", "ponder.strategy").replace("--set ", "ponder.settings.")
            raise bad(msg, param) from None

    def prompts(job: Job, body: dict) -> list[Any]:
        if job.chat:
            try:
                return [template.render(check_messages(body.get("messages")))]
            except SettingError as e:
                raise bad(str(e), "messages") from None
        ps = prompts_of(body, lm.vocab_size)
        if len(ps) > limits.max_prompts:
            raise bad(f"prompt holds {len(ps)} prompts; at most {limits.max_prompts} per request", "prompt")
        if job.strategy:  # strategies take text
            ps = [p if isinstance(p, str) else lm.decode(p) for p in ps]
        return ps

    def check_lengths(job: Job) -> list[list[int]]:
        ids = [lm.encode(p) if isinstance(p, str) else list(p) for p in job.prompts]
        for i, x in enumerate(ids):
            if len(x) >= context:
                raise bad(f"prompt {i} is {len(x)} tokens; the model's context is {context} tokens, and generation "
                          "needs room: shorten the prompt", "messages" if job.chat else "prompt")
        return ids

    async def until_done(work: "asyncio.Task[Any]", request: Request) -> Any:
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

    async def run(job: Job, gen: Any, ids: list[list[int]]) -> list[list[Generation]]:
        n, seed = job.params.n, job.params.seed
        if job.score_only:  # echo-only scoring: nothing generated
            return [[Generation(text="", token_ids=[], finish_reason="length",
                                usage=Usage(prompt_tokens=len(x) if k == 0 else 0,
                                            computed_tokens=len(x) if k == 0 else 0)) for k in range(n)] for x in ids]
        return await gen.agenerate_many(job.prompts, n=n, seed=seed)

    async def prompt_logprobs(ids: list[int]) -> list[float | None]:
        scored = await asyncio.to_thread(lm.score_ids, ids[:1], ids[1:]) if len(ids) > 1 else []
        return [None] + [float(x) for x in scored]

    async def respond(job: Job, outs: list[list[Generation]], ids: list[list[int]]) -> dict[str, Any]:
        choices, flat = [], []
        for pi, gens in enumerate(outs):
            p_text = job.prompts[pi] if isinstance(job.prompts[pi], str) else lm.decode(ids[pi])
            p_lps = await prompt_logprobs(ids[pi]) if job.echo and job.top_logprobs is not None else None
            for g in gens:
                i = len(flat)
                flat.append(g)
                if job.chat:
                    choice = {"index": i, "message": {"role": "assistant", "content": g.text},
                              "logprobs": chat_logprobs(lm, g, job) if job.top_logprobs is not None else None,
                              "finish_reason": g.finish_reason}
                else:
                    lp = None
                    if job.top_logprobs is not None:
                        lp = completion_logprobs(lm, g, job, 0, (ids[pi], p_lps) if p_lps is not None else None)
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

    def stream(job: Job, gen: Any, ids: list[list[int]]) -> tuple[Any, Any]:
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
            state["inflight"] -= 1  # first: the server may cancel this very call below
            for w in workers:  # each producer's own finally withdraws its rows from the batch
                w.cancel()
            await asyncio.gather(*workers, return_exceptions=True)

        def chunk(i: int, text: str | None, finish: str | None, first: bool = False) -> str:
            if job.chat:
                delta = ({"role": "assistant", "content": ""} if first else {}) | ({"content": text} if text else {})
                c = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": i, "text": text or "", "logprobs": None, "finish_reason": finish}
            return "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": served,
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
                yield "data: " + json.dumps({"id": rid, "object": kind, "created": created, "model": served,
                                             "choices": [], "usage": usage_of(finished)}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                await close()

        return events(), close

    async def handle(request: Request, chat: bool) -> Any:
        check_key(request)
        body = await read_json(request)
        job = parse(body, chat, limits, context, served)
        job.prompts = prompts(job, body)
        ids = check_lengths(job)
        gen = generator(job)
        if state["inflight"] >= limits.max_inflight:
            raise ApiError(429, f"the server is saturated ({limits.max_inflight} requests in flight); retry later",
                           headers={"Retry-After": str(limits.retry_after_s)})
        state["inflight"] += 1
        if job.stream:
            events, close = stream(job, gen, ids)
            return ClosingStream(events, close, media_type="text/event-stream")
        try:
            work = asyncio.ensure_future(run(job, gen, ids))
            outs = await until_done(work, request)
            return JSONResponse(await respond(job, outs, ids))
        except (SettingError, AccessError) as e:
            raise bad(str(e)) from None
        except InvalidLogitsError as e:
            raise bad(f"the request's settings left no token to pick: {e}") from None
        except BackendError as e:
            raise ApiError(502, str(e)) from None
        finally:
            state["inflight"] -= 1

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models(request: Request) -> Any:
        check_key(request)
        return {"object": "list", "data": [{"id": served, "object": "model", "created": 0, "owned_by": "ponder",
                                            "max_model_len": context}]}

    @app.get("/v1/strategies")
    async def list_strategies(request: Request) -> Any:
        check_key(request)
        return {"object": "list", "data": [{"id": s.name, "access": s.access, "settings": list(s.settings),
                                            "help": s.help} for s in strategies.STRATEGIES.values()]}

    @app.get("/health")
    async def health() -> Any:
        return {"status": "ok", "inflight": state["inflight"]}

    return app


def serve(lm: Any, host: str = "127.0.0.1", port: int = 8000, **options: Any) -> None:
    """Run the app with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(create_app(lm, **options), host=host, port=port, log_level="warning", timeout_graceful_shutdown=5)
