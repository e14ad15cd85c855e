"""``OpenAILM``: a model behind any OpenAI-compatible completions server (vLLM,
SGLang, llama.cpp, Ollama, ``transformers serve``, a hosted API, ``ponder serve``)
as a ``TextLM``, or a ``LogprobsLM`` where the server gives top-k log-probabilities
and scores prompts.

What a server can do is found by probing it at construction, not by trusting the
request: ``transformers serve`` accepts ``logprobs`` and ``n`` and silently ignores
both, so a client that believed them would vote over one sample or score by nothing.
The probes are tiny completions: plain, with ``n``, with ``logprobs``, with
``echo`` (prompt scoring), with vLLM's token-id extensions, and three seeds at a
high temperature (``transformers serve`` decodes greedily whatever the temperature
unless a ``generation_config`` field asks it to sample; the probe finds which).

Scale-out and faults:

* several base URLs are replicas; each request goes to the one with the fewest
  requests outstanding (least-outstanding-requests), skipping one that failed in
  the last seconds;
* a request that meets 429, 5xx, a timeout, a dropped connection or malformed JSON is
  retried on another replica, with exponential backoff and jitter (``tenacity``),
  honouring ``Retry-After``; retries are bounded by count and by time, and a request
  that still fails raises ``BackendError`` naming the server and every error;
* each result slot is filled by exactly one response, so nothing is lost or counted
  twice (a retried request's abandoned attempt is never read);
* ``n`` goes to the server where it honours it and no seed is set (vLLM draws all n
  samples from one seed: n copies), else (or for what it returned short) k parallel
  requests with seeds ``seed + i``: the failure of many meta-generation
  proxies (optillm issues #8 and #99).

A base URL ending in ``/chat/completions`` (or ``chat=True``) sends each prompt as one
user message to the chat endpoint, for hosted APIs that have no other; the server's
chat template renders it, and the level is text (no prompt scoring there).

Usage is read from the server's responses; where a server gives none, ponder counts
with the model's tokenizer if it has one (``tokenizer=``), and each generation's
``meta["usage_counted_by"]`` says whose count it is.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import random
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..errors import BackendError, SettingError
from ..protocols import Access
from ..types import Generation, Usage

log = logging.getLogger("ponder.openai")

# statuses worth another attempt (elsewhere): rate limits, overload, gateway faults
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})

# What a request body carries of SamplingParams is declared with each field (its ``api``
# kind, ponder.params): OpenAI's own and the extensions are sent when set; the fields
# that need the model's logits go to ponder serve only.
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


def _error_text(r: Any) -> str:
    try:
        body = r.json()
        err = body.get("error", body) if isinstance(body, dict) else body
        msg = err.get("message", err) if isinstance(err, dict) else err
        return str(msg)[:300]
    except ValueError:
        return r.text[:300]


class OpenAILM:
    """A model behind one or more OpenAI-compatible servers (replicas of one model).

    ``base_url``: one URL or several, each ending at the API root (``.../v1``).
    ``model``: the served model's name; the first one ``/v1/models`` lists by default.
    ``tokenizer``: the model's ``tokenizer.json`` (or its folder, or a ``tokenizers``
    object): exact prompt scoring by token ids, and token counts where a server gives
    none. ``max_concurrency``: requests in flight at once, over all replicas.
    ``attempts`` and ``retry_timeout`` bound the retries of one request. ``chat``:
    send each prompt as one user message to ``/chat/completions`` (hosted chat-only
    APIs); the server's template renders it, and the level is text (a chat endpoint
    does not score prompts). A step-level search's partial solution is then part of
    the user message rather than a continued assistant turn: for step search prefer
    the completions endpoint with a chat template rendered by ponder (``ChatTemplate``).
    """

    KEEPALIVE = 8  # idle connections kept per event loop (see _state)
    # vLLM's default token budget of one engine step on a CPU (max_num_batched_tokens of
    # its API server); seeded requests are paced below it (_seeded_slot)
    VLLM_STEP_TOKENS = 2048
    QUIET_S = 5.0  # a retry round is logged once in this many seconds (_say_retry)

    def __init__(self, base_url: str | Sequence[str], model: str | None = None, *, api_key: str | None = None,
                 tokenizer: Any = None, max_concurrency: int = 64, timeout: float = 300.0, attempts: int = 6,
                 retry_timeout: float = 600.0, connect_timeout: float = 10.0, chat: bool = False,
                 seeded_prefill_tokens: int | str | None = "auto") -> None:
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
        if not (seeded_prefill_tokens in ("auto", None) or (isinstance(seeded_prefill_tokens, int)
                                                            and not isinstance(seeded_prefill_tokens, bool)
                                                            and seeded_prefill_tokens >= 1)):
            raise SettingError("seeded_prefill_tokens must be 'auto', None (no pacing) or an integer >= 1 (prompt "
                               f"tokens of seeded requests in flight); got {seeded_prefill_tokens!r}")
        if not isinstance(chat, bool):
            raise SettingError(f"chat must be True (each prompt a user message to /chat/completions) or False; got {chat!r}")
        split = [_api_root(u) for u in urls]
        self.chat = chat or any(c for _, c in split)  # a URL ending in /chat/completions says so itself
        self.replicas = [Replica(root) for root, _ in split]
        self.endpoint = ",".join(r.url for r in self.replicas)
        self.api_key = api_key
        self.tokenizer = _load_tokenizer(tokenizer)
        # where a chat template may be found (tokenizer_config.json next to tokenizer.json)
        self.tokenizer_folder = (None if not isinstance(tokenizer, (str, Path))
                                 else str(Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent))
        self.max_concurrency, self.attempts, self.retry_timeout = max_concurrency, attempts, float(retry_timeout)
        self.timeout, self.connect_timeout = float(timeout), float(connect_timeout)
        self._loops: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopState]" = weakref.WeakKeyDictionary()
        self.retries = 0  # attempts that failed and were retried, over this object's life
        self._said: dict[int, float] = {}  # retry round -> when it was last logged (_say_retry)
        self._ssl: Any = None  # the TLS context, made once (see _state)
        self._probe(model)
        # vLLM's CPU engine dies on a seeded request whose prompt it prefills in chunks
        # (see _seeded_slot): against vLLM, seeded requests are paced so that none is
        self.seeded_prefill_tokens: int | None = (
            max(self.VLLM_STEP_TOKENS // 4, self.VLLM_STEP_TOKENS - self.max_concurrency) if self.server == "vllm"
            else None) if seeded_prefill_tokens == "auto" else seeded_prefill_tokens

    # -- probing ---------------------------------------------------------------------------
    def _probe(self, model: str | None) -> None:
        import httpx

        with httpx.Client(timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                          headers=self._headers()) as c:
            model = self._served_model(c, model)
            self.name = self.model = model

            url = self.replicas[0].url + ("/chat/completions" if self.chat else "/completions")

            refused: list[str] = []  # the server's own words, for the error if the plain probe fails

            def ask(**extra: Any) -> dict | None:
                body = {"model": model, "prompt": "1", "max_tokens": 2, "temperature": 1.0, "seed": 0, **extra}
                if self.chat:
                    body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
                try:
                    r = c.post(url, json=body)
                except httpx.HTTPError as e:
                    raise BackendError(f"cannot reach {url} ({type(e).__name__}: {e})") from None
                if r.status_code != 200:
                    refused.append(f"{r.status_code}: {_error_text(r)}")
                    return None
                try:
                    data = r.json()
                    return data if isinstance(data.get("choices"), list) and data["choices"] else None
                except ValueError:
                    return None

            plain = ask()
            if plain is None:
                said = f" (it answered {refused[-1]})" if refused else ""
                raise BackendError(f"{url} did not complete a one-token prompt{said}; is it an OpenAI-compatible "
                                   + ("chat server whose model has a chat template?" if self.chat else
                                      "completions server? (a chat-only API: end the URL with /chat/completions)"))
            with_n = ask(n=2)
            self.supports_n = with_n is not None and len(with_n["choices"]) == 2
            self.scores_prompts = self.returns_token_ids = self.tokens_as_ids = False
            if self.chat:  # top-k logprobs the chat way; no echo, no token-id extensions
                with_lp = ask(logprobs=True, top_logprobs=2)
                content = ((with_lp or {}).get("choices", [{}])[0].get("logprobs") or {}).get("content") or []
                self.gives_top_logprobs = bool(content) and bool((content[0] or {}).get("top_logprobs"))
            else:
                with_lp = ask(logprobs=2)
                lp = (with_lp or {}).get("choices", [{}])[0].get("logprobs") or {}
                top = lp.get("top_logprobs") or []
                self.gives_top_logprobs = bool(top) and isinstance(top[0], dict) and len(top[0]) >= 1
            if self.gives_top_logprobs and not self.chat:
                echo = ask(prompt="1 2 3", echo=True, logprobs=0, max_tokens=1)
                lps = ((echo or {}).get("choices", [{}])[0].get("logprobs") or {}).get("token_logprobs") or []
                # the prompt's own tokens come back (the first has no logprob)
                self.scores_prompts = len(lps) >= 3 and any(x is not None for x in lps[:-1])
            if not self.chat:
                ext = ask(logprobs=1, return_token_ids=True, return_tokens_as_token_ids=True)
                ch = (ext or {}).get("choices", [{}])[0]
                self.returns_token_ids = isinstance(ch.get("token_ids"), list) and len(ch["token_ids"]) > 0
                toks = (ch.get("logprobs") or {}).get("tokens") or []
                self.tokens_as_ids = bool(toks) and all(isinstance(t, str) and t.startswith("token_id:") for t in toks)
            self.gives_usage = isinstance(plain.get("usage"), dict) and "completion_tokens" in plain["usage"]
            self.sampling = self._probe_sampling(ask)
        self.access = Access.LOGPROBS if self.gives_top_logprobs and self.scores_prompts else Access.TEXT

    def _served_model(self, c: Any, model: str | None) -> str:
        """The model every replica's ``/models`` lists: ``model`` if given, else the
        first one listed. Errors say which replica failed and how."""
        import httpx

        served: list[str] = []
        owners: set[Any] = set()  # who each replica says owns its models: the server's kind
        for rep in self.replicas:  # every replica must answer and serve the model
            try:
                r = c.get(rep.url + "/models")
            except httpx.HTTPError as e:
                raise BackendError(f"cannot reach {rep.url}/models ({type(e).__name__}: {e}); "
                                   "is the server running at that address?") from None
            if r.status_code == 401:
                raise BackendError(f"{rep.url} refused the API key (401): pass api_key= (--api-key)")
            if r.status_code != 200:
                raise BackendError(f"{rep.url}/models answered {r.status_code}: {_error_text(r)}")
            try:
                listed = r.json()["data"]
                ids = [m["id"] for m in listed]
            except (ValueError, KeyError, TypeError):
                raise BackendError(f"{rep.url}/models did not answer an OpenAI model list: {r.text[:200]!r}") from None
            owners |= {m.get("owned_by") for m in listed if isinstance(m, dict)}
            if model is not None and ids and model not in ids:
                raise SettingError(f"{rep.url} does not serve model {model!r}; it serves {', '.join(ids)}")
            served = served or ids
        self.server = "vllm" if "vllm" in owners else (
            next(iter(owners)) if len(owners) == 1 and isinstance(next(iter(owners)), str) else "unknown")
        if model is None:
            if not served:
                raise BackendError(f"{self.replicas[0].url}/models lists no model; pass model=")
            model = served[0]
        return model

    @staticmethod
    def _probe_sampling(ask: Any) -> str:
        """Does a temperature above 0 sample? ``transformers serve`` takes ``do_sample``
        from the model's generation config and ignores ``temperature`` (greedy for a model
        that sets none), but honours a ``generation_config`` JSON field. Three seeds at
        temperature 2 over 12 tokens: identical answers mean greedy (for a model with a
        vocabulary of more than a few tokens, the chance of three equal samples is nil)."""
        def texts(**extra: Any) -> set[str]:
            out = {_choice_text((ask(prompt="1", max_tokens=12, temperature=2.0, seed=s, **extra) or {})
                                .get("choices", [{}])[0]) for s in (0, 1, 2)}
            return out - {None}
        if len(texts()) > 1:
            return "standard"
        if len(texts(generation_config='{"do_sample": true, "top_k": 0}')) > 1:
            return "generation_config"
        return "none"

    def capabilities(self) -> dict[str, Any]:
        """What probing found (what ``ponder models --endpoint`` prints)."""
        return {"model": self.model, "endpoint": self.endpoint, "chat": self.chat, "access": self.access.name.lower(),
                "n": self.supports_n, "top_logprobs": self.gives_top_logprobs, "prompt_scoring": self.scores_prompts,
                "token_ids": self.returns_token_ids, "usage": self.gives_usage, "sampling": self.sampling,
                "server": self.server, "seeded_prefill_tokens": self.seeded_prefill_tokens}

    # -- requests --------------------------------------------------------------------------
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
                            errors.append(f"{self._where(rep)}{r.status_code} {_error_text(r)}")
                            raise _Retry(errors[-1], _retry_after(r.headers))
                        if r.status_code != 200:  # the request itself is wrong: another try cannot help
                            raise BackendError(f"{base}{path} refused the request ({r.status_code}): {_error_text(r)}")
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

    # -- TextLM ----------------------------------------------------------------------------
    def _body(self, prompt: str | list[int], params: Any, n: int, seed: int | None) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "max_tokens": params.max_tokens, "n": n}
        if self.chat:
            body["messages"] = [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        changed = params.changed()
        kinds = ("openai", "extension", "ponder") if self.server == "ponder" else ("openai", "extension")
        for f in params.api_fields(*kinds):
            if f in changed or f == "temperature":
                v = getattr(params, f)
                body[f] = ({str(k): b for k, b in v.items()} if f == "logit_bias"
                           else list(v) if isinstance(v, tuple) else v)
        if params.stop:
            body["stop"] = list(params.stop)
        if seed is not None:
            body["seed"] = seed
        if self.gives_top_logprobs and self.chat:  # the chat API's spelling of the same
            body["logprobs"] = True
            if params.logprobs:
                body["top_logprobs"] = params.logprobs
        elif self.gives_top_logprobs:  # the chosen tokens' logprobs always (sequence scores), top-k if asked
            body["logprobs"] = params.logprobs
        if self.returns_token_ids:
            body["return_token_ids"] = True
        if self.tokens_as_ids and self.gives_top_logprobs:
            body["return_tokens_as_token_ids"] = True
        if self.sampling == "generation_config":  # transformers serve: sampling settings go here
            import json

            gc = {"do_sample": params.temperature > 0, "top_k": params.top_k or 0}  # 0: no top-k (its default is 50)
            if params.temperature > 0:
                gc.update(temperature=params.temperature, top_p=params.top_p)
                if params.min_p:
                    gc["min_p"] = params.min_p
            body["generation_config"] = json.dumps(gc)
        return body

    def check(self, params: Any) -> None:
        """Refuse settings a completions server cannot honour, naming them."""
        changed = params.changed()
        local = [f for f in params.api_fields("ponder") if f in changed] if self.server != "ponder" else []
        if local:
            raise SettingError(f"{', '.join(local)} {'needs' if len(local) == 1 else 'need'} the model's logits, which {self.endpoint} does not give; "
                               "drop them or run the model in-process (native or transformers backend)")
        if params.temperature > 0 and self.sampling == "none":
            raise SettingError(f"temperature {params.temperature:g}: {self.endpoint} decodes greedily whatever the "
                               "temperature (probed: three seeds gave one answer), so sampling strategies would vote "
                               "over copies; use temperature 0 or a server that samples")
        if params.logprobs and not self.gives_top_logprobs:
            raise SettingError(f"logprobs: {self.endpoint} returns no log-probabilities (probed); set logprobs 0")

    async def generate(self, prompts: Sequence[str], params: Any = None) -> list[list[Generation]]:
        """``params.n`` generations per prompt, all requests concurrent (up to
        ``max_concurrency``)."""
        from ..params import SamplingParams

        params = params or SamplingParams()
        if isinstance(prompts, str):
            prompts = [prompts]
        self.check(params)
        for p in prompts:
            if not isinstance(p, str) or not p:
                raise SettingError(f"every prompt must be a non-empty string; got {p!r}")
        return list(await asyncio.gather(*(self._samples(p, params) for p in prompts)))

    async def _samples(self, prompt: str, params: Any) -> list[Generation]:
        n, seed = params.n, params.seed
        # vLLM draws every one of n samples from the one seed (n identical copies), so a
        # seeded request is n requests seeded seed + i, the same on every server
        if self.supports_n and n > 1 and seed is None:
            gens = await self._complete(prompt, params, n, seed)
        else:
            gens = []
        # where the server ignores n, refuses it, or returned short: one request per sample
        missing = range(len(gens), n)
        more = await asyncio.gather(*(self._complete(prompt, params, 1, None if seed is None else seed + i)
                                      for i in missing))
        for g in more:
            if gens:  # the prompt was billed once already
                g[0].usage.prompt_tokens = 0
                g[0].usage.computed_tokens = g[0].usage.generated_tokens
            gens.extend(g[:1])
        return gens[:n]

    async def _complete(self, prompt: str, params: Any, n: int, seed: int | None) -> list[Generation]:
        path, body = "/chat/completions" if self.chat else "/completions", self._body(prompt, params, n, seed)
        if seed is not None and self.seeded_prefill_tokens is not None:
            async with self._seeded_slot(prompt):
                data, elapsed = await self._post(path, body)
        else:
            data, elapsed = await self._post(path, body)
        choices = sorted(data["choices"], key=lambda c: c.get("index", 0))
        if not choices:
            raise BackendError(f"{self.endpoint} answered a completion with no choices")
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else None
        gens = [self._generation(c, params.stop) for c in choices]
        self._bill(gens, prompt, usage, elapsed)
        return gens

    def _prompt_tokens(self, prompt: str) -> int:
        """The prompt's tokens on the server, or a bound on them: exact with a tokenizer
        (+1 for a BOS), else its UTF-8 bytes + 1 (a token spells at least one byte)."""
        if self.tokenizer is not None:
            return len(self.tokenizer.encode(prompt).ids) + 1
        return len(prompt.encode()) + 1

    @contextlib.asynccontextmanager
    async def _seeded_slot(self, prompt: str) -> Any:
        """Hold a seeded request back until its prompt fits in what vLLM prefills in one
        step beside the others in flight. vLLM (0.32, CPU) rewinds a seeded request's
        random generator when it prefills the prompt in chunks, which a CPU generator
        cannot do (``RuntimeError: CPU Generator does not use offset``), and its engine
        dies (``EngineDeadError``) for every client. A step-level search sends many
        seeded requests at once, whose prompts overflow the step's 2,048 tokens, so the
        last one admitted was chunked: every PRM beam search and REBASE over 50 problems
        killed the server. Requests without a seed are never held."""
        need = self._prompt_tokens(prompt)
        budget = self.seeded_prefill_tokens
        if need > budget:
            raise SettingError(f"a seeded request of about {need} prompt tokens would be prefilled by {self.endpoint} "
                               f"in chunks (at most {budget} tokens a step are safe), which kills vLLM's CPU engine "
                               "(CPU Generator does not use offset): unset the seed, or start vLLM with a larger "
                               "--max-num-batched-tokens and pass seeded_prefill_tokens= to match")
        st = self._state()
        async with st.seeded:
            await st.seeded.wait_for(lambda: st.seeded_tokens + need <= budget)
            st.seeded_tokens += need
        try:
            yield
        finally:
            async with st.seeded:
                st.seeded_tokens -= need
                st.seeded.notify_all()

    def _generation(self, c: dict[str, Any], stops: Sequence[str] = ()) -> Generation:
        if "message" in c:  # a chat choice: the same fields, spelled the chat way
            c = _chat_choice(c)
        text = c.get("text") or ""
        reason = c.get("finish_reason")
        stop = c.get("stop_reason")
        cut = False  # a stop string was taken out of the text
        if reason == "stop" and not isinstance(stop, (str, int)):
            # Which stop string ended it, where the server does not say (vLLM and ponder
            # serve do, in stop_reason). transformers serve keeps the stop string in the
            # text, unlike OpenAI's API: take it out, so that every server answers alike
            # (a step search needs to know a step ended at its delimiter). A server that
            # drops the string and does not say (OpenAI's own) cannot be told from EOS.
            stop = next((s for s in stops if s and text.endswith(s)), None)
            if stop is not None:
                text, cut = text[:-len(stop)], True
        lp = c.get("logprobs") or {}
        ids = self._kept_ids(c, lp, text, cut)
        top = None
        if lp.get("top_logprobs"):
            top = [{self._token_key(k): float(v) for k, v in (t or {}).items()} for t in lp["top_logprobs"]]
        logprobs = [float(x) for x in lp["token_logprobs"]] if lp.get("token_logprobs") else None
        if cut and ids:  # the stop string's tokens leave the per-token lists too
            logprobs = logprobs[: len(ids)] if logprobs is not None else None
            top = top[: len(ids)] if top is not None else None
        return Generation(text=text, token_ids=ids, logprobs=logprobs,
                          finish_reason="length" if reason == "length" else "stop",
                          stop=stop if isinstance(stop, (str, int)) else None, top_logprobs=top,
                          meta={"endpoint": self.endpoint, "model": self.model})

    def _kept_ids(self, c: dict[str, Any], lp: dict[str, Any], text: str, cut: bool) -> list[int]:
        """The token ids of the generation's text: the server's own (``token_ids``, or
        vLLM's tokens as ids), unless a stop string was cut from the text, whose tokens
        they include; then (or where the server gives none) the text re-encoded by
        ponder's tokenizer; [] without one."""
        if not cut:
            if isinstance(c.get("token_ids"), list):
                return [int(t) for t in c["token_ids"]]
            if lp.get("tokens") and self.tokens_as_ids:
                return [int(t.split(":", 1)[1]) for t in lp["tokens"]]
        return self.tokenizer.encode(text, add_special_tokens=False).ids if self.tokenizer is not None else []

    def _token_key(self, k: str) -> Any:
        """A top-logprobs key as a token id where the server or the tokenizer tells it."""
        if k.startswith("token_id:"):
            return int(k.split(":", 1)[1])
        if self.tokenizer is not None:
            tid = self.tokenizer.token_to_id(k)
            if tid is not None:
                return tid
        return k

    def _bill(self, gens: list[Generation], prompt: str, usage: dict | None, elapsed: float) -> None:
        """The server's usage, split among its choices: the prompt billed to the first
        (it was computed once), each choice its own tokens."""
        counts = [len(g.logprobs) if g.logprobs is not None else len(g.token_ids) for g in gens]
        by = "server"
        if usage is not None and "completion_tokens" in usage:
            total = int(usage["completion_tokens"])
            if sum(counts) != total or not all(counts):
                base, extra = divmod(total, len(gens))
                counts = [base + (i < extra) for i in range(len(gens))]
            prompt_tokens = int(usage.get("prompt_tokens") or 0)
        elif self.tokenizer is not None:
            by = "ponder's tokenizer"
            counts = [len(self.tokenizer.encode(g.text, add_special_tokens=False).ids) for g in gens]
            prompt_tokens = len(self.tokenizer.encode(prompt).ids)
        else:
            by = "none"
            prompt_tokens = 0
        for i, (g, k) in enumerate(zip(gens, counts)):
            p = prompt_tokens if i == 0 else 0
            g.usage = Usage(prompt_tokens=p, generated_tokens=k, computed_tokens=p + k, model_calls=k,
                            wall_s=elapsed / len(gens))
            g.meta["usage_counted_by"] = by

    # -- LogprobsLM ------------------------------------------------------------------------
    async def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        """log p(token | prompt, earlier tokens) of each continuation's tokens, by
        ``echo`` with ``logprobs``: exact token boundaries with a tokenizer (the request
        goes as token ids), else by the echoed text offsets."""
        if not self.scores_prompts:
            raise SettingError(f"{self.endpoint} does not score prompts (no echo with logprobs; probed): "
                               "use a scorer that needs only text")
        return list(await asyncio.gather(*(self._score_one(prompt, c) for c in continuations)))

    async def _score_one(self, prompt: str, cont: str) -> list[float]:
        if not cont:
            return []
        body = {"model": self.model, "echo": True, "logprobs": 0, "max_tokens": 1, "temperature": 0.0}
        if self.tokenizer is not None:
            p_ids = self.tokenizer.encode(prompt).ids
            c_ids = self.tokenizer.encode(cont, add_special_tokens=False).ids
            data, _ = await self._post("/completions", {**body, "prompt": p_ids + c_ids})
            lps = data["choices"][0]["logprobs"]["token_logprobs"]
            return [float(x) for x in lps[len(p_ids): len(p_ids) + len(c_ids)]]
        data, _ = await self._post("/completions", {**body, "prompt": prompt + cont})
        lp = data["choices"][0]["logprobs"]
        offsets, lps = lp["text_offset"], lp["token_logprobs"]
        # the echoed prompt is followed by one generated token, which starts at the end
        # of prompt + cont; offsets may count a BOS string (vLLM), hence the shift
        n_prompt = len(lps) - 1
        shift = offsets[n_prompt] - len(prompt + cont)
        return [float(x) for o, x in zip(offsets[:n_prompt], lps[:n_prompt])
                if o - shift >= len(prompt) and x is not None]

    def __repr__(self) -> str:
        return f"OpenAILM({self.model!r} at {self.endpoint}, access={self.access.name.lower()})"


def _ca_bundle() -> str | None:
    """The CA bundle httpx verifies with (certifi's), if installed."""
    try:
        import certifi

        return certifi.where()
    except ImportError:
        return None


def _choice_text(c: dict[str, Any]) -> str | None:
    """A completion's or a chat completion's text."""
    return (_chat_choice(c) if "message" in c else c).get("text")


def _chat_choice(c: dict[str, Any]) -> dict[str, Any]:
    """A chat choice as a completions choice: ``message.content`` as ``text``, and
    ``logprobs.content`` [{token, logprob, top_logprobs: [{token, logprob}]}] as
    ``token_logprobs`` and ``top_logprobs``."""
    out = {k: v for k, v in c.items() if k not in ("message", "logprobs")}
    out["text"] = (c.get("message") or {}).get("content") or ""
    content = (c.get("logprobs") or {}).get("content")
    if isinstance(content, list) and content:
        out["logprobs"] = {
            "token_logprobs": [t.get("logprob") for t in content],
            "top_logprobs": [{x["token"]: x["logprob"] for x in (t.get("top_logprobs") or [])} for t in content]
            if any(t.get("top_logprobs") for t in content) else None,
        }
    return out


def _load_tokenizer(tok: Any) -> Any:
    if tok is None or (not isinstance(tok, (str, Path)) and hasattr(tok, "encode")):
        return tok
    from tokenizers import Tokenizer

    p = Path(tok)
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise SettingError(f"tokenizer must be a tokenizer.json file or a folder holding one; {tok} is neither")
    return Tokenizer.from_file(str(f))


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


__all__ = ["OpenAILM", "Replica", "RETRY_STATUS", "parse_endpoint"]
