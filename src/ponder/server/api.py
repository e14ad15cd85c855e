"""OpenAI request bodies in, validated ``Job``s out; ``Generation``s in, OpenAI
response objects out. No web framework here: the app (``app.py``) only routes.

Every check names the field at fault, so a bad request is a 400 that says what to
change, never a 500. Token-level settings become a ``SamplingParams``, whose own
checks give the legal ranges.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from ..errors import SettingError
from ..params import SamplingParams
from ..types import Generation, Usage


class ApiError(Exception):
    """An error answered to the client: status, message and the field at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.headers = status, message, param, headers or {}

    def body(self) -> dict[str, Any]:
        kind = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                405: "invalid_request_error", 413: "invalid_request_error", 415: "invalid_request_error",
                429: "rate_limit_error", 503: "service_unavailable"}.get(self.status, "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.status}}


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param)


@dataclass
class Limits:
    """What one request may ask of the server (each checked, each named on refusal)."""

    max_tokens: int = 4096  # also capped by the model's context
    max_n: int = 64
    max_prompts: int = 64
    max_body_bytes: int = 1 << 20
    max_inflight: int = 256  # requests being served; beyond it, 429 with Retry-After
    retry_after_s: int = 1


# body fields -> SamplingParams fields (OpenAI's names and vLLM's extensions)
# the SamplingParams a request may set, as each field declares (ponder.params, ``api``);
# stop and logprobs are read with their own rules
_PARAMS = tuple(f for f in SamplingParams.api_fields("openai", "extension", "ponder", "request")
                if f not in ("stop", "logprobs"))
# accepted and without effect on the output (so clients that always send them work)
_IGNORED = ("user", "service_tier", "store", "metadata", "parallel_tool_calls", "skip_special_tokens",
            "spaces_between_special_tokens")
_COMMON = {"model", "stream", "stream_options", "stop", "logit_bias", "response_format", "ponder", "return_token_ids",
           "return_tokens_as_token_ids", *_PARAMS, *_IGNORED}
COMPLETION_FIELDS = _COMMON | {"prompt", "echo", "logprobs", "best_of", "suffix"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens", "add_generation_prompt",
                         "continue_final_message"}


@dataclass
class Job:
    """One validated request."""

    prompts: list[Any]  # strings or token-id lists
    params: SamplingParams
    chat: bool = False
    stream: bool = False
    echo: bool = False
    top_logprobs: int | None = None  # None: no logprobs asked for
    constraint: dict[str, Any] = field(default_factory=dict)  # json_schema=...
    strategy: str | None = None
    settings: dict[str, Any] = field(default_factory=dict)
    task: str | None = None
    trace: bool = False
    token_ids: bool = False
    tokens_as_ids: bool = False
    model: str = ""
    score_only: bool = False  # echo with max_tokens 0: the prompt's logprobs, nothing generated
    max_tokens_given: bool = False  # the client chose max_tokens (else it shrinks to what the context leaves)
    best_of: int | None = None  # draw best_of samples, answer the n most likely (completions, as vLLM)
    include_usage: bool = True  # a stream's last chunk carries usage (stream_options.include_usage)
    max_tokens_field: str = "max_tokens"  # or max_completion_tokens: the field the client sent, named in errors


def _int(body: dict, name: str, lo: int, hi: int | None, default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if not isinstance(v, int) or isinstance(v, bool) or v < lo or (hi is not None and v > hi):
        rng = f"[{lo}, {hi}]" if hi is not None else f">= {lo}"
        raise bad(f"{name} must be an integer in {rng}; got {v!r}", name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"{name} must be true or false; got {v!r}", name)
    return v


def parse(body: Any, chat: bool, limits: Limits, context: int, served: str, vocab: int | None = None) -> Job:
    """A request body as a Job, or an ApiError naming the field. ``vocab``: the
    model's vocabulary size, which bounds token ids (``logit_bias``)."""
    if not isinstance(body, dict):
        raise bad("the request body must be a JSON object")
    legal = CHAT_FIELDS if chat else COMPLETION_FIELDS
    unknown = sorted(k for k in body if k not in legal)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}; this endpoint takes {', '.join(sorted(legal))}", unknown[0])
    model = body.get("model", served)
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string; got {model!r}", "model")
    if model not in (None, served):
        raise ApiError(404, f"model {model!r} is not served here; this server serves {served!r}", "model")

    raw: dict[str, Any] = {k: body[k] for k in _PARAMS if body.get(k) is not None}
    mt_field = "max_tokens"  # the name the client used, for errors
    if chat and body.get("max_completion_tokens") is not None:
        raw["max_tokens"], mt_field = body["max_completion_tokens"], "max_completion_tokens"
    cap = min(limits.max_tokens, context)
    given = raw.get("max_tokens") is not None
    mt = _int({mt_field: raw.get("max_tokens")}, mt_field, 0, cap, 16 if not chat else min(cap, 512))
    raw["max_tokens"] = mt
    n = _int(raw, "n", 1, limits.max_n, 1)
    best_of = None if chat else _int(body, "best_of", 1, limits.max_n, None)
    if best_of is not None and best_of < n:
        raise bad(f"best_of ({best_of}) must be >= n ({n}): the n most likely of best_of samples are returned",
                  "best_of")
    if not chat and body.get("suffix") not in (None, ""):
        raise bad("suffix is not supported: ponder's models do not fill in the middle; send the prompt only",
                  "suffix")
    _stop_and_bias(body, raw, vocab)
    job = Job(prompts=[], params=SamplingParams(), chat=chat, stream=_bool(body, "stream"), model=served)
    job.max_tokens_given, job.best_of, job.max_tokens_field = given, best_of, mt_field
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict) or not isinstance(so.get("include_usage", True), bool):
            raise bad("stream_options must be {include_usage: true | false}", "stream_options")
        if not job.stream:
            raise bad("stream_options is only for stream: true", "stream_options")
        job.include_usage = so.get("include_usage", True)
    if best_of is not None and best_of > n and job.stream:
        raise bad("best_of > n cannot stream: the best are known only at the end; set stream false", "best_of")
    _logprobs(body, job, raw)
    if mt == 0:
        if not job.echo:
            raise bad(f"{mt_field} must be >= 1 (0 is for scoring a prompt with echo)", mt_field)
        job.score_only, raw["max_tokens"] = True, 1

    rf = body.get("response_format")
    if rf is not None:
        job.constraint = _response_format(rf)
    if body.get("ponder") is not None:
        _ponder_extension(body["ponder"], job)
    try:
        job.params = SamplingParams(**raw)
    except SettingError as e:
        raise bad(str(e), str(e).split(" ", 1)[0]) from None
    except TypeError as e:
        raise bad(f"a sampling setting has the wrong type: {e}") from None
    return job


def _stop_and_bias(body: dict, raw: dict[str, Any], vocab: int | None) -> None:
    """``stop`` (a string or up to 16) and ``logit_bias`` (token id -> bias) into ``raw``."""
    if "stop" in body and body["stop"] is not None:
        stop = body["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            raise bad("stop must be a non-empty string or a list of at most 16 of them", "stop")
        raw["stop"] = stop
    if body.get("logit_bias") is not None:
        lb = body["logit_bias"]
        try:
            raw["logit_bias"] = {int(k): float(v) for k, v in lb.items()}
        except (AttributeError, TypeError, ValueError, OverflowError):
            raise bad('logit_bias must be an object of token id to bias, e.g. {"17": -100}', "logit_bias") from None
        out = [k for k in raw["logit_bias"] if not 0 <= k < (vocab if vocab is not None else 2 ** 31)]
        if out:
            raise bad(f"logit_bias key {out[0]} is not a token id of this model: ids are in [0, {vocab})",
                      "logit_bias")


def _logprobs(body: dict, job: Job, raw: dict[str, Any]) -> None:
    """Token ids in the response, and top-k logprobs: the chat way (logprobs: true,
    top_logprobs: k) or the completions way (logprobs: k, echo)."""
    job.token_ids = _bool(body, "return_token_ids")
    job.tokens_as_ids = _bool(body, "return_tokens_as_token_ids")
    if job.chat:
        if _bool(body, "logprobs"):
            job.top_logprobs = _int(body, "top_logprobs", 0, 20, 0)
        elif body.get("top_logprobs") is not None:
            raise bad("top_logprobs needs logprobs: true", "top_logprobs")
    else:
        lp = _int(body, "logprobs", 0, 20)
        job.top_logprobs = lp
        job.echo = _bool(body, "echo")
    if job.top_logprobs is not None:
        raw["logprobs"] = job.top_logprobs


def _ponder_extension(pd: Any, job: Job) -> None:
    """``ponder: {strategy, settings, task, trace}``: run a strategy for this request."""
    if not isinstance(pd, dict):
        raise bad("ponder must be an object: {strategy, settings, task, trace}", "ponder")
    extra = sorted(set(pd) - {"strategy", "settings", "task", "trace"})
    if extra:
        raise bad(f"ponder.{extra[0]} is unknown; ponder takes strategy, settings, task and trace", f"ponder.{extra[0]}")
    strategy = pd.get("strategy")
    if not isinstance(strategy, str) or not strategy:
        raise bad("ponder.strategy must name a strategy (GET /v1/strategies lists them)", "ponder.strategy")
    settings = pd.get("settings", {})
    if not isinstance(settings, dict):
        raise bad("ponder.settings must be an object of the strategy's settings", "ponder.settings")
    task = pd.get("task")
    if task is not None and not isinstance(task, str):
        raise bad("ponder.task must be a task's name", "ponder.task")
    if not isinstance(pd.get("trace", False), bool):
        raise bad("ponder.trace must be true or false", "ponder.trace")
    job.strategy, job.settings, job.task, job.trace = strategy, dict(settings), task, bool(pd.get("trace"))
    if job.best_of is not None:
        raise bad("best_of with ponder.strategy: the strategy chooses its own answers; drop best_of", "best_of")
    if job.stream:
        raise bad("stream with ponder.strategy: a strategy's answer is known only at its end; set stream false",
                  "stream")


def _response_format(rf: Any) -> dict[str, Any]:
    if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
        raise bad("response_format must be {type: text | json_object | json_schema}", "response_format")
    if rf["type"] == "text":
        return {}
    if rf["type"] == "json_object":
        return {"json_schema": json.dumps({"type": "object"})}
    js = rf.get("json_schema")
    schema = js.get("schema") if isinstance(js, dict) else None
    if not isinstance(schema, dict):
        raise bad("response_format.json_schema.schema must be a JSON schema object", "response_format.json_schema")
    return {"json_schema": json.dumps(schema)}


def prompts_of(body: dict, vocab: int) -> list[Any]:
    """A completions ``prompt``: a string, a list of strings, token ids, or lists of ids."""
    p = body.get("prompt")
    if isinstance(p, str):
        p = [p]
    elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
        p = [p]
    if not isinstance(p, list) or not p:
        raise bad("prompt must be a non-empty string, a list of strings, or token ids", "prompt")
    for i, x in enumerate(p):
        if isinstance(x, str):
            if not x:
                raise bad(f"prompt[{i}] is empty; give some text to continue", "prompt")
        elif isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            if not all(0 <= t < vocab for t in x):
                raise bad(f"prompt[{i}] holds token ids outside the vocabulary [0, {vocab})", "prompt")
        else:
            raise bad(f"prompt[{i}] must be a non-empty string or a list of token ids", "prompt")
    return p


# -- responses ---------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_of(gens: list[Generation]) -> dict[str, Any]:
    """OpenAI usage, counting every internal token of a strategy, plus ponder's own bill."""
    u = Usage.total(g.usage for g in gens)
    return {"prompt_tokens": int(u.prompt_tokens), "completion_tokens": int(u.generated_tokens),
            "total_tokens": int(u.prompt_tokens + u.generated_tokens),
            "ponder": {"computed_tokens": int(u.computed_tokens), "model_calls": int(u.model_calls),
                       "flops": u.flops, "wall_s": round(u.wall_s, 6)}}


def token_text(lm: Any, tid: int, as_id: bool) -> str:
    """A top-logprobs key: the token as the vocabulary spells it (or ``token_id:N``)."""
    return f"token_id:{tid}" if as_id else lm.decode([tid], skip_special_tokens=False)


def pieces(lm: Any, ids: list[int], text: str) -> list[str]:
    """What each token adds to ``text``: special tokens (EOS) add nothing, and tokens past
    the text's end (a stop string's, cut from it) add nothing either, so the pieces
    join to the text and ``text_offset`` agrees with the listed tokens."""
    out, pos = [], 0
    batch = getattr(getattr(lm, "tokenizer", None), "decode_batch", None)  # one call into the tokenizer
    each = batch([[t] for t in ids], skip_special_tokens=True) if batch is not None else [lm.decode([t]) for t in ids]
    for piece in each:
        piece = piece[: max(len(text) - pos, 0)]
        out.append(piece)
        pos += len(piece)
    return out


def _top(lm: Any, top: dict[int, float], chosen: int, listed: str, as_id: bool) -> dict[str, float]:
    """One position's top logprobs keyed by token text. The chosen token is keyed as it is
    listed in ``tokens`` (EOS and a cut stop string as ``''``), so it is found in its own top
    list; the alternatives keep the vocabulary's spelling."""
    return {(listed if t == chosen else token_text(lm, t, as_id)): v for t, v in top.items()}


def _listed(lm: Any, ids: list[int], text: str, as_id: bool) -> list[str]:
    return [f"token_id:{t}" for t in ids] if as_id else pieces(lm, ids, text)


def completion_logprobs(lm: Any, g: Generation, job: Job, start: int = 0,
                        prompt: tuple[list[int], list[float | None], str] | None = None) -> dict[str, Any]:
    """The completions API's logprobs object (tokens, token_logprobs, top_logprobs,
    text_offset), the echoed prompt's tokens first when ``prompt`` (ids, logprobs, text)
    is given. The listed tokens spell the returned text: a leading BOS, which the text
    does not hold, is left out of the echoed prompt."""
    toks, lps, tops, offs = [], [], [], []
    pos = start
    if prompt is not None:
        p_ids, p_lps, p_text = prompt
        skip = next((i for i, t in enumerate(p_ids) if lm.decode([t])), len(p_ids))  # leading specials (BOS)
        for s, lp in zip(_listed(lm, p_ids[skip:], p_text, job.tokens_as_ids), p_lps[skip:]):
            toks.append(s), lps.append(lp), tops.append(None if lp is None else {s: lp}), offs.append(pos)
            pos += len(s) if not job.tokens_as_ids else 0
        pos = start + len(p_text)
    own = pieces(lm, g.token_ids, g.text)
    for i, tid in enumerate(g.token_ids):
        s = f"token_id:{tid}" if job.tokens_as_ids else own[i]
        toks.append(s)
        lps.append(g.logprobs[i] if g.logprobs and i < len(g.logprobs) else None)
        top = g.top_logprobs[i] if g.top_logprobs and i < len(g.top_logprobs) else {}
        tops.append(_top(lm, top, tid, s, job.tokens_as_ids) if job.top_logprobs else None)
        offs.append(pos)
        pos += len(own[i])
    return {"tokens": toks, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offs}


def chat_logprobs(lm: Any, g: Generation, job: Job) -> dict[str, Any]:
    content = []
    own = _listed(lm, g.token_ids, g.text, job.tokens_as_ids)
    for i, tid in enumerate(g.token_ids):
        s = own[i]
        top = g.top_logprobs[i] if g.top_logprobs and i < len(g.top_logprobs) else {}
        ranked = _top(lm, dict(sorted(top.items(), key=lambda kv: -kv[1])), tid, s, job.tokens_as_ids)
        content.append({"token": s, "logprob": g.logprobs[i] if g.logprobs and i < len(g.logprobs) else None,
                        "bytes": list(s.encode()),
                        "top_logprobs": [{"token": k, "logprob": v, "bytes": list(k.encode())} for k, v in ranked.items()]})
    return {"content": content}


def envelope(kind: str, job: Job, choices: list[dict], gens: list[Generation]) -> dict[str, Any]:
    out = {"id": new_id("chatcmpl" if job.chat else "cmpl"), "object": kind, "created": int(time.time()),
           "model": job.model, "choices": choices, "usage": usage_of(gens)}
    return out


def ponder_object(job: Job, outs: list[list[Generation]]) -> dict[str, Any]:
    """The strategy, its per-output meta (scores, votes, difficulty) and, if asked, the
    trace of every internal generation."""
    return {"strategy": job.strategy or ("greedy" if job.params.greedy else "sample"),
            "outputs": [{"score": g.score, "meta": _jsonable(g.meta),
                         **({"trace": [t.to_dict(trace=True) for t in g.trace]} if job.trace else {})}
                        for gs in outs for g in gs]}


def _jsonable(x: Any) -> Any:
    try:
        json.dumps(x)
        return x
    except (TypeError, ValueError):
        if isinstance(x, dict):
            return {str(k): _jsonable(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [_jsonable(v) for v in x]
        return repr(x)
