"""What a completions server can do, found by asking it: tiny completions, plain, with
``n``, with ``logprobs``, with ``echo`` (prompt scoring), with vLLM's token-id
extensions, and three seeds at a high temperature. ``transformers serve`` accepts
``logprobs`` and ``n`` and silently ignores both, so a client that believed the request
would vote over one sample or score by nothing."""

from __future__ import annotations

from typing import Any

from ...errors import BackendError, SettingError
from ...protocols import Access
from .responses import choice_text
from .transport import error_text


def probe(lm: Any, model: str | None) -> None:
    import httpx

    with httpx.Client(timeout=httpx.Timeout(lm.timeout, connect=lm.connect_timeout),
                      headers=lm._headers()) as c:
        model = served_model(lm, c, model)
        lm.name = lm.model = model

        url = lm.replicas[0].url + ("/chat/completions" if lm.chat else "/completions")

        refused: list[str] = []  # the server's own words, for the error if the plain probe fails

        def ask(**extra: Any) -> dict | None:
            body = {"model": model, "prompt": "1", "max_tokens": 2, "temperature": 1.0, "seed": 0, **extra}
            if lm.chat:
                body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
            try:
                r = c.post(url, json=body)
            except httpx.HTTPError as e:
                raise BackendError(f"cannot reach {url} ({type(e).__name__}: {e})") from None
            if r.status_code != 200:
                refused.append(f"{r.status_code}: {error_text(r)}")
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
                               + ("chat server whose model has a chat template?" if lm.chat else
                                  "completions server? (a chat-only API: end the URL with /chat/completions)"))
        with_n = ask(n=2)
        lm.supports_n = with_n is not None and len(with_n["choices"]) == 2
        lm.scores_prompts = lm.returns_token_ids = lm.tokens_as_ids = False
        if lm.chat:  # top-k logprobs the chat way; no echo, no token-id extensions
            with_lp = ask(logprobs=True, top_logprobs=2)
            content = ((with_lp or {}).get("choices", [{}])[0].get("logprobs") or {}).get("content") or []
            lm.gives_top_logprobs = bool(content) and bool((content[0] or {}).get("top_logprobs"))
        else:
            with_lp = ask(logprobs=2)
            lp = (with_lp or {}).get("choices", [{}])[0].get("logprobs") or {}
            top = lp.get("top_logprobs") or []
            lm.gives_top_logprobs = bool(top) and isinstance(top[0], dict) and len(top[0]) >= 1
        if lm.gives_top_logprobs and not lm.chat:
            echo = ask(prompt="1 2 3", echo=True, logprobs=0, max_tokens=1)
            lps = ((echo or {}).get("choices", [{}])[0].get("logprobs") or {}).get("token_logprobs") or []
            # the prompt's own tokens come back (the first has no logprob)
            lm.scores_prompts = len(lps) >= 3 and any(x is not None for x in lps[:-1])
        if not lm.chat:
            ext = ask(logprobs=1, return_token_ids=True, return_tokens_as_token_ids=True)
            ch = (ext or {}).get("choices", [{}])[0]
            lm.returns_token_ids = isinstance(ch.get("token_ids"), list) and len(ch["token_ids"]) > 0
            toks = (ch.get("logprobs") or {}).get("tokens") or []
            lm.tokens_as_ids = bool(toks) and all(isinstance(t, str) and t.startswith("token_id:") for t in toks)
        lm.gives_usage = isinstance(plain.get("usage"), dict) and "completion_tokens" in plain["usage"]
        lm.sampling = probe_sampling(ask)
    lm.access = Access.LOGPROBS if lm.gives_top_logprobs and lm.scores_prompts else Access.TEXT

def served_model(lm: Any, c: Any, model: str | None) -> str:
    """The model every replica's ``/models`` lists: ``model`` if given, else the
    first one listed. Errors say which replica failed and how."""
    import httpx

    served: list[str] = []
    owners: set[Any] = set()  # who each replica says owns its models: the server's kind
    for rep in lm.replicas:  # every replica must answer and serve the model
        try:
            r = c.get(rep.url + "/models")
        except httpx.HTTPError as e:
            raise BackendError(f"cannot reach {rep.url}/models ({type(e).__name__}: {e}); "
                               "is the server running at that address?") from None
        if r.status_code == 401:
            raise BackendError(f"{rep.url} refused the API key (401): pass api_key= (--api-key)")
        if r.status_code != 200:
            raise BackendError(f"{rep.url}/models answered {r.status_code}: {error_text(r)}")
        try:
            listed = r.json()["data"]
            ids = [m["id"] for m in listed]
        except (ValueError, KeyError, TypeError):
            raise BackendError(f"{rep.url}/models did not answer an OpenAI model list: {r.text[:200]!r}") from None
        owners |= {m.get("owned_by") for m in listed if isinstance(m, dict)}
        if model is not None and ids and model not in ids:
            raise SettingError(f"{rep.url} does not serve model {model!r}; it serves {', '.join(ids)}")
        served = served or ids
    lm.server = "vllm" if "vllm" in owners else (
        next(iter(owners)) if len(owners) == 1 and isinstance(next(iter(owners)), str) else "unknown")
    if model is None:
        if not served:
            raise BackendError(f"{lm.replicas[0].url}/models lists no model; pass model=")
        model = served[0]
    return model

def probe_sampling(ask: Any) -> str:
    """Does a temperature above 0 sample? ``transformers serve`` takes ``do_sample``
    from the model's generation config and ignores ``temperature`` (greedy for a model
    that sets none), but honours a ``generation_config`` JSON field. Three seeds at
    temperature 2 over 12 tokens: identical answers mean greedy (for a model with a
    vocabulary of more than a few tokens, the chance of three equal samples is nil)."""
    def texts(**extra: Any) -> set[str]:
        out = {choice_text((ask(prompt="1", max_tokens=12, temperature=2.0, seed=s, **extra) or {})
                            .get("choices", [{}])[0]) for s in (0, 1, 2)}
        return out - {None}
    if len(texts()) > 1:
        return "standard"
    if len(texts(generation_config='{"do_sample": true, "top_k": 0}')) > 1:
        return "generation_config"
    return "none"
