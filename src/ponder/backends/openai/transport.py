"""The transport to OpenAI-compatible servers: replicas balanced by least outstanding
requests (one that failed lately skipped), bounded retries with backoff and jitter
(``tenacity``, ``Retry-After`` honoured) that say one line per retry round, one HTTP
client per event loop, and ``SharedClock``, which splits wall time among the requests
in flight. ``OpenAILM`` (completions) and the pooling client of remote verifiers both
send through it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import random
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Sequence

from ...errors import BackendError, SettingError

log = logging.getLogger("ponder.openai")

# statuses worth another attempt (elsewhere): rate limits, overload, gateway faults
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

class _Retry(Exception):
    """One attempt failed in a way another attempt may not (a retryable fault)."""

    def __init__(self, msg: str, wait: float | None = None) -> None:
        super().__init__(msg)
        self.wait = wait


@dataclass
class Replica:
    """One base URL and what dispatch knows of it."""

    url: str
    outstanding: int = 0
    served: int = 0
    failures: int = 0  # consecutive
    down_until: float = 0.0

    COOLDOWN_S = 1.0  # after a failure, doubled per consecutive failure, at most 30 s

    def failed(self) -> None:
        self.failures += 1
        self.down_until = time.monotonic() + min(30.0, self.COOLDOWN_S * 2 ** (self.failures - 1))

    def succeeded(self) -> None:
        self.failures, self.down_until = 0, 0.0
        self.served += 1


class SharedClock:
    """Wall time split among the requests in flight, as the engine splits a step among
    the rows it serves: each moment is billed once, in equal parts to the requests
    outstanding then. So the bills of concurrent requests sum to the time during which
    any was in flight (never 64 times it), and a request alone is billed its latency."""

    def __init__(self) -> None:
        self.last = time.perf_counter()
        self.accrued: dict[int, float] = {}  # token -> seconds billed so far
        self.tokens = itertools.count()

    def _advance(self) -> None:
        now = time.perf_counter()
        if self.accrued:
            share = (now - self.last) / len(self.accrued)
            for k in self.accrued:
                self.accrued[k] += share
        self.last = now

    def start(self) -> int:
        self._advance()
        token = next(self.tokens)
        self.accrued[token] = 0.0
        return token

    def stop(self, token: int) -> float:
        self._advance()
        return self.accrued.pop(token, 0.0)


@dataclass
class _LoopState:
    """What is bound to one event loop: the HTTP client, the concurrency limit and the
    clock that splits wall time among the requests in flight."""

    client: Any
    limit: asyncio.Semaphore
    tasks: set = field(default_factory=set)
    clock: SharedClock = field(default_factory=SharedClock)
    seeded: asyncio.Condition = field(default_factory=asyncio.Condition)  # pacing of seeded prompts
    seeded_tokens: int = 0  # prompt tokens of seeded requests in flight


def _causes(errors: list[str]) -> str:
    """The distinct causes of a request's failed attempts, each once, with its count:
    "ConnectError ... (6 times)", not the same line six times."""
    seen: dict[str, int] = {}
    for e in errors:
        seen[e] = seen.get(e, 0) + 1
    return "; ".join(e if k == 1 else f"{e} ({k} times)" for e, k in list(seen.items())[-4:])


def _retry_after(headers: Any) -> float | None:
    try:
        v = float(headers.get("retry-after", ""))
    except ValueError:
        return None
    return min(max(v, 0.0), 60.0)


def error_text(r: Any) -> str:
    try:
        body = r.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message", err) if isinstance(err, dict) else err
        return str(msg)[:300]
    except ValueError:
        return r.text[:300]


class Transport:
    """POSTs to one or more replicas of one server: ``_post(path, body)`` returns the
    JSON and the wall seconds billed to it. ``base_url``: one URL or several, each
    ending at the API root (``.../v1``). ``max_concurrency``: requests in flight at
    once, over all replicas. ``attempts`` and ``retry_timeout`` bound the retries of
    one request."""

    KEEPALIVE = 8  # idle connections kept per event loop (see _state)
    QUIET_S = 5.0  # a retry round is logged once in this many seconds (_say_retry)

    def __init__(self, base_url: str | Sequence[str], *, api_key: str | None = None, max_concurrency: int = 64,
                 timeout: float = 300.0, attempts: int = 6, retry_timeout: float = 600.0,
                 connect_timeout: float = 10.0) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        if not urls or not all(isinstance(u, str) and u.startswith(("http://", "https://")) for u in urls):
            raise SettingError(f"base_url must be one or more http(s):// URLs of an OpenAI-compatible API "
                               f"(e.g. http://127.0.0.1:8000/v1); got {base_url!r}")
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise SettingError(f"max_concurrency must be an integer >= 1; got {max_concurrency!r}")
        if not isinstance(attempts, int) or attempts < 1:
            raise SettingError(f"attempts must be an integer >= 1; got {attempts!r}")
        for name, v in (("timeout", timeout), ("retry_timeout", retry_timeout), ("connect_timeout", connect_timeout)):
            if not isinstance(v, (int, float)) or v <= 0:
                raise SettingError(f"{name} must be a number of seconds > 0; got {v!r}")
        self.api_roots = [_api_root(u) for u in urls]  # (root, named the chat endpoint)
        self.replicas = [Replica(root) for root, _ in self.api_roots]
        self.endpoint = ",".join(r.url for r in self.replicas)
        self.api_key = api_key
        self.max_concurrency, self.attempts, self.retry_timeout = max_concurrency, attempts, float(retry_timeout)
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self._loops: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState]" = weakref.WeakKeyDictionary()
        self.retries = 0  # attempts that failed and were retried, over this object's life
        self._said: dict[int, float] = {}  # retry round -> when it was last logged (_say_retry)
        self._ssl: Any = None  # the TLS context, made once (see _state)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def _state(self) -> _LoopState:
        """The HTTP client and the limit of the running event loop (both are bound to
        one loop; the synchronous wrappers start a new loop per call)."""
        import httpx

        loop = asyncio.get_running_loop()
        st = self._loops.get(loop)
        if st is None:
            # Few idle connections kept: httpcore checks every idle connection of the pool
            # for each request it sends, so 64 kept alive cost 64 x 64 socket checks per
            # wave of 64 requests (measured: 0.8-1.3 s of client CPU per wave against
            # 0.16 s with 8 kept; new loopback connections are cheap).
            limits = httpx.Limits(max_connections=self.max_concurrency,
                                  max_keepalive_connections=min(self.max_concurrency, self.KEEPALIVE))
            if self._ssl is None:  # once per object: loading the CA bundle costs ~36 ms, and the
                import ssl  # synchronous API starts a new loop (so a new client) per call

                self._ssl = ssl.create_default_context(cafile=_ca_bundle())
            client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                                       limits=limits, headers=self._headers(), verify=self._ssl)
            st = self._loops[loop] = _LoopState(client, asyncio.Semaphore(self.max_concurrency))
        return st

    def _pick(self, tried: set[int]) -> Replica:
        """Least outstanding requests among replicas not failed lately and not yet tried
        by this request; failing that, among untried ones; failing that, any."""
        now = time.monotonic()
        fresh = [r for i, r in enumerate(self.replicas) if i not in tried]
        healthy = [r for r in fresh if r.down_until <= now]
        pool = healthy or fresh or self.replicas
        return min(pool, key=lambda r: (r.outstanding, r.down_until, r.served))

    async def _post(self, path: str, body: dict[str, Any], valid: Any = None, what: str = "a completion",
                    root: bool = False) -> tuple[dict[str, Any], float]:
        """POST to a replica, with bounded retries elsewhere; returns (JSON, the wall
        seconds billed to it: its share of the time, see ``SharedClock``).
        Retries are ``tenacity``'s (exponential backoff with jitter, ``Retry-After``
        honoured), and say one line per retry round, not one per request: when a server
        dies under 64 concurrent requests, the user reads a few lines, not hundreds."""
        import httpx
        from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, stop_after_delay

        st = self._state()
        errors: list[str] = []
        tried: set[int] = set()

        def wait(state: Any) -> float:  # Retry-After where the server says, else 0.1 s doubling to 5 s, + jitter
            exc = state.outcome.exception() if state.outcome is not None else None
            if isinstance(exc, _Retry) and exc.wait is not None:
                return exc.wait
            return min(5.0, 0.1 * 2 ** (state.attempt_number - 1)) + random.uniform(0.0, 0.5)

        async with st.limit:
            token = st.clock.start()  # billed from here: waiting for a free slot is others' time
            try:
                async for attempt in AsyncRetrying(retry=retry_if_exception_type(_Retry), reraise=True, wait=wait,
                                                   stop=stop_after_attempt(self.attempts)
                                                   | stop_after_delay(self.retry_timeout),
                                                   before_sleep=lambda state: self._say_retry(state, errors)):
                    with attempt:
                        if attempt.retry_state.attempt_number > 1:
                            self.retries += 1
                        if len(tried) == len(self.replicas):
                            tried.clear()
                        rep = self._pick(tried)
                        tried.add(self.replicas.index(rep))
                        rep.outstanding += 1
                        try:
                            base = rep.url.removesuffix("/v1") if root else rep.url  # vLLM's /pooling is at the root
                            r = await st.client.post(base + path, json=body)
                            data = r.json() if r.status_code == 200 else None
                        except (httpx.TransportError, httpx.DecodingError) as e:
                            rep.failed()
                            errors.append(f"{self._where(rep)}{type(e).__name__} {e}".strip())
                            raise _Retry(errors[-1]) from None
                        except ValueError as e:  # a 200 whose body is not JSON
                            rep.failed()
                            errors.append(f"{self._where(rep)}malformed JSON ({e})")
                            raise _Retry(errors[-1]) from None
                        finally:
                            rep.outstanding -= 1
                        if r.status_code in RETRY_STATUS:
                            rep.failed()
                            errors.append(f"{self._where(rep)}{r.status_code} {error_text(r)}")
                            raise _Retry(errors[-1], _retry_after(r.headers))
                        if r.status_code != 200:  # the request itself is wrong: another try cannot help
                            raise BackendError(f"{base}{path} refused the request ({r.status_code}): {error_text(r)}")
                        ok = (valid(data) if valid is not None
                              else isinstance(data, dict) and isinstance(data.get("choices"), list))
                        if not ok:
                            rep.failed()
                            errors.append(f"{self._where(rep)}not {what} ({str(data)[:120]})")
                            raise _Retry(errors[-1])
                        rep.succeeded()
                        return data, st.clock.stop(token)
            except _Retry:
                pass
            finally:
                st.clock.stop(token)
        raise BackendError(f"{path} to {self.endpoint} failed after {len(errors)} attempt(s) "
                           f"(at most {self.attempts}, {self.retry_timeout:g} s): " + _causes(errors))

    def _where(self, rep: Any) -> str:
        """A failure's prefix: the replica's URL when there are several (the endpoint, which
        every message already names, when there is one)."""
        return f"{rep.url}: " if len(self.replicas) > 1 else ""

    def _say_retry(self, state: Any, errors: list[str]) -> None:
        """One log line per retry round: the first request to fail its k-th attempt says
        so; the others failing alongside it within a few seconds stay quiet."""
        k, now = state.attempt_number, time.monotonic()
        if now - self._said.get(k, -math.inf) < self.QUIET_S:
            return
        self._said[k] = now
        log.warning("ponder: %s: %s; retrying (attempt %d of at most %d)", self.endpoint,
                    errors[-1] if errors else "failed", k + 1, self.attempts)


def _ca_bundle() -> str | None:
    """The CA bundle httpx verifies with (certifi's), if installed."""
    try:
        import certifi

        return certifi.where()
    except ImportError:
        return None


def parse_endpoint(spec: str) -> tuple[list[str], str | None, bool]:
    """``URL[,URL...][#MODEL]`` -> (base URLs, model name or None, chat). A URL may end
    at the API root (``.../v1``) or at its endpoint: ``/chat/completions`` asks for
    chat requests (a chat-only hosted API), ``/completions`` for completions."""
    urls, _, model = spec.partition("#")
    split = [_api_root(u) for u in urls.split(",") if u.strip()]
    if len({c for _, c in split}) > 1:
        raise SettingError(f"{spec}: the replicas must all be chat or all be completions endpoints")
    return [root for root, _ in split], (model or None), any(c for _, c in split)


def _api_root(url: str) -> tuple[str, bool]:
    """A URL as (the API root, whether it named the chat endpoint)."""
    u = url.strip().rstrip("/")
    if u.endswith("/chat/completions"):
        return u[: -len("/chat/completions")], True
    if u.endswith("/completions"):
        return u[: -len("/completions")], False
    return u, False
