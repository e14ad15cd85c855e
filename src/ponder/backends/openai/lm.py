"""``OpenAILM``: the model behind a completions server (or a chat-only API) as a
``TextLM``, or a ``LogprobsLM`` where the server gives top-k log-probabilities and
scores prompts: the request body (each SamplingParams field as its ``api`` kind says),
the samples (``n`` where the server honours it, else seeded requests), the reading of
choices into ``Generation``s, the bill, and prompt scoring by ``echo``."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path
from typing import Any, Sequence

from ...errors import BackendError, SettingError
from ...types import Generation, Usage
from .probe import probe
from .responses import chat_choice, load_tokenizer
from .transport import Transport


class OpenAILM(Transport):
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

    # vLLM's default token budget of one engine step on a CPU (max_num_batched_tokens of
    # its API server); seeded requests are paced below it (_seeded_slot)
    VLLM_STEP_TOKENS = 2048

    def __init__(self, base_url: str | Sequence[str], model: str | None = None, *, api_key: str | None = None,
                 tokenizer: Any = None, max_concurrency: int = 64, timeout: float = 300.0, attempts: int = 6,
                 retry_timeout: float = 600.0, connect_timeout: float = 10.0, chat: bool = False,
                 seeded_prefill_tokens: int | str | None = "auto") -> None:
        super().__init__(base_url, api_key=api_key, max_concurrency=max_concurrency, timeout=timeout,
                         attempts=attempts, retry_timeout=retry_timeout, connect_timeout=connect_timeout)
        if not (seeded_prefill_tokens in ("auto", None) or (isinstance(seeded_prefill_tokens, int)
                                                            and not isinstance(seeded_prefill_tokens, bool)
                                                            and seeded_prefill_tokens >= 1)):
            raise SettingError("seeded_prefill_tokens must be 'auto', None (no pacing) or an integer >= 1 (prompt "
                               f"tokens of seeded requests in flight); got {seeded_prefill_tokens!r}")
        if not isinstance(chat, bool):
            raise SettingError(f"chat must be True (each prompt a user message to /chat/completions) or False; got {chat!r}")
        self.chat = chat or any(c for _, c in self.api_roots)  # a URL ending in /chat/completions says so itself
        self.tokenizer = load_tokenizer(tokenizer)
        # where a chat template may be found (tokenizer_config.json next to tokenizer.json)
        self.tokenizer_folder = (None if not isinstance(tokenizer, (str, Path))
                                 else str(Path(tokenizer) if Path(tokenizer).is_dir() else Path(tokenizer).parent))
        self._probe(model)
        # vLLM's CPU engine dies on a seeded request whose prompt it prefills in chunks
        # (see _seeded_slot): against vLLM, seeded requests are paced so that none is
        self.seeded_prefill_tokens: int | None = (
            max(self.VLLM_STEP_TOKENS // 4, self.VLLM_STEP_TOKENS - self.max_concurrency) if self.server == "vllm"
            else None) if seeded_prefill_tokens == "auto" else seeded_prefill_tokens

    def _probe(self, model: str | None) -> None:
        probe(self, model)

    def capabilities(self) -> dict[str, Any]:
        """What probing found (what ``ponder models --endpoint`` prints)."""
        return {"model": self.model, "endpoint": self.endpoint, "chat": self.chat, "access": self.access.name.lower(),
                "n": self.supports_n, "top_logprobs": self.gives_top_logprobs, "prompt_scoring": self.scores_prompts,
                "token_ids": self.returns_token_ids, "usage": self.gives_usage, "sampling": self.sampling,
                "server": self.server, "seeded_prefill_tokens": self.seeded_prefill_tokens}

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
        from ...params import SamplingParams

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
            c = chat_choice(c)
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
