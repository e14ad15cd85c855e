"""A request's life in ``ponder serve``: the slots in flight, a client that goes away
(its work is cancelled and its rows leave the engine's batch), and the shutdown's grace
period (in-flight work ends with 503, streams with an error event)."""

# (no `from __future__ import annotations`: FastAPI reads annotations at run time)

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from .api import ApiError


class ShuttingDown(Exception):
    """The server's grace period ran out before the request finished."""


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


class Lifecycle:
    """What ``Service`` knows of the requests in flight: how many (``inflight``, each
    request takes a slot and gives it back), their work (cancelled at shutdown), and
    when the shutdown's grace period ends (``stopping_at``)."""

    def __init__(self) -> None:
        self.inflight = 0
        self.stopping_at: float | None = None  # set at shutdown: in-flight work ends with 503 from then on
        self.works: set = set()  # the non-streaming requests' work in flight
        self.loop: Any = None  # the serving loop, where the shutdown's timer runs

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
