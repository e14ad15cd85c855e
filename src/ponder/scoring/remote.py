"""A reward model behind vLLM's pooling runner (one server or replicas): the same scorer
as the in-process ``RewardModel``, in any format of ``ponder.scoring.formats``.

    vllm serve arith-reward --runner pooling        (ponder: --reward-model http://HOST:8000/v1#arith-reward)

* Solutions are rendered to token ids here, with the verifier's own tokenizer, so step
  markers land exactly where the format puts them; vLLM gets ids (``/pooling`` with
  ``input: [[ids], ...]``) and returns each token's (or each marker's) head output.
* Every open path of a scoring call goes in one request (several problems' paths
  together, as the searches batch them), split into a few concurrent requests only when
  large.
* vLLM recomputes every prefix a pooling request carries (STEP pooling turns its prefix
  cache off), so a client memo keeps each read position's value: a path's next step
  resends the path, but a path whose values are all known is never sent again, and equal
  paths go once.
* Retries, replicas and the wall-time bill are the generation side's (``OpenAILM``'s
  transport); at load the server is probed once, and a server whose pooling task, row
  count or label count does not fit the format is refused with the flag to change.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from typing import Any, Sequence

from ..backends.openai import Transport
from ..errors import BackendError, SettingError
from ..types import Usage
from .base import Scores, aggregate, per_request, run_sync
from .formats import PONDER, RewardFormat, Renderer, ponder_layout

class PoolingServer(Transport):
    """The generation side's transport (replicas, retries, the shared clock) to a server
    that pools rather than completes: probed by its model list only."""

    def __init__(self, base_url: str | Sequence[str], model: str | None = None, **transport: Any) -> None:
        super().__init__(base_url, **transport)
        self._probe(model)

    def _probe(self, model: str | None) -> None:
        import httpx

        try:
            with httpx.Client(timeout=httpx.Timeout(self.timeout, connect=self.connect_timeout),
                              headers=self._headers()) as c:
                r = c.get(self.replicas[0].url + "/models")
        except httpx.HTTPError as e:
            raise BackendError(f"cannot reach {self.replicas[0].url}/models ({type(e).__name__}: {e}); is the vLLM "
                               "pooling server running at that address?") from None
        names = [m.get("id") for m in (r.json().get("data") or [])] if r.status_code == 200 else []
        if not names:
            raise BackendError(f"{self.replicas[0].url}/models answered {r.status_code} with no model")
        if model is not None and model not in names:
            raise SettingError(f"{self.endpoint} serves {', '.join(map(repr, names))}, not {model!r}: give "
                               f"URL#{names[0]}", "reward_model")
        self.model, self.server = model or names[0], "vllm"


class RemoteRewardModel:
    """A verifier served by vLLM with ``--runner pooling``, read as ``fmt`` says."""

    MAX_SEQS = 128  # sequences per request (larger calls go as several concurrent requests)
    MEMO_LIMIT = 500_000

    def __init__(self, urls: str | Sequence[str], model: str | None, fmt: RewardFormat, tokenizer: Any,
                 template: Any = None, context: int | None = None, eos: int | None = None, **transport: Any) -> None:
        from ..backends.openai import load_tokenizer

        self.fmt = fmt
        self.server = PoolingServer(urls, model, **transport)
        self.name = self.server.model
        self.endpoint = self.server.endpoint
        self.path = None
        self.tokenizer = load_tokenizer(tokenizer)
        self.eos = eos if eos is not None else self.tokenizer.token_to_id("<|endoftext|>")
        if fmt is PONDER and self.eos is None:
            raise SettingError(f"the ponder format appends an EOS, and {tokenizer}'s config names none", "reward_model")
        self.renderer = None if fmt is PONDER else Renderer(fmt, self.tokenizer, template, context)
        self.aggregation = "min"
        self._memo: dict[tuple[int, ...], float] = {}
        self._lock = threading.Lock()
        self.requests = 0  # requests sent, over this object's life (benchmarks read it)
        self.sent_tokens = 0  # tokens those requests carried (what the server computed)
        self.probed = self._check_server()

    # -- layout --------------------------------------------------------------------------
    def layout(self, prompt: str, completion: str) -> tuple[list[int], list[int], int | None]:
        if self.renderer is not None:
            lay = self.renderer.layout(prompt, completion)
            return lay.ids, lay.steps, lay.outcome
        lay = ponder_layout(lambda text, special: self.tokenizer.encode(text, add_special_tokens=special).ids,
                            prompt, completion, self.eos)
        return lay.ids, lay.steps, lay.outcome

    # -- the server ------------------------------------------------------------------------
    def _body(self, seqs: list[list[int]]) -> dict[str, Any]:
        return {"model": self.name, "input": seqs, "add_special_tokens": False,
                "use_activation": self.fmt.score != "raw"}

    def _check_server(self) -> str:
        """One request at load: a short solution, checked against what the format needs."""
        if self.fmt.name == "skywork-prm":
            raise SettingError("the skywork-prm format's value head needs a vLLM plugin; run it in-process (its folder) "
                               "or through transformers (hf:FOLDER)", "reward_format")
        sep = self.fmt.split
        ids, steps, outcome = self.layout("1+1", f"1+1=2{sep}Answer: 2{sep}")
        try:
            rows = run_sync(self._post([ids]))[0]
        except BackendError as e:
            msg = " ".join(str(e).split())
            hint = ("start vLLM with --runner pooling" if "404" in msg or "Not Found" in msg else
                    "start vLLM with the pooling task the format reads: --pooler-config "
                    "'{\"task\": \"token_classify\"}' (or classify for seq-rm)" if "pooling_task" in msg.lower() else
                    self._flag())
            raise SettingError(f"--reward-model {self.endpoint}#{self.name} refused a {self.fmt.name} scoring request: "
                               f"{hint} ({msg[:200]})", "reward_model") from None
        reads = steps if self.fmt.process else [outcome]
        shape = self._shape(rows, ids, reads)
        return shape

    def _flag(self) -> str:
        """The server flag this format needs, for a refusal."""
        if self.fmt is PONDER:
            return ("start it with --runner pooling and no --pooler-config pooling_type STEP (the ponder format reads "
                    "every line end and an EOS: ALL pooling)")
        if self.fmt.marker and self.renderer is not None:
            return (f"start it with --pooler-config '{{\"pooling_type\": \"STEP\", \"step_tag_id\": "
                    f"{self.renderer.marker_id}}}' (this tokenizer's id of {self.fmt.marker!r}), or pooling_type ALL")
        return "start it with --runner pooling (README: Your reward model)"

    def _shape(self, rows: Any, ids: list[int], reads: list[int]) -> str:
        """What the server's answer is: a row per token ("all"), a row per marker ("step"),
        or one row for the sequence ("seq"); refused when it does not fit the format."""
        rows = rows if not rows or isinstance(rows[0], list) else [rows]
        if len(rows) == len(ids):
            kind = "all"
        elif self.fmt.marker and len(rows) == len(reads):
            kind = "step"
        elif not self.fmt.process and len(rows) == 1:
            kind = "seq"
        else:
            raise SettingError(f"--reward-model {self.endpoint}#{self.name} returned {len(rows)} rows for {len(ids)} "
                               f"tokens and {len(reads)} read positions: {self._flag()}", "reward_model")
        width = len(rows[0])
        want = 2 if self.fmt.score in ("softmax1", "p1", "p1_minus_p0") else 1
        if width != want:
            raise SettingError(f"--reward-model {self.endpoint}#{self.name}: the server's head gives {width} value(s) "
                               f"per position, and the {self.fmt.name} format reads {want}: check --reward-format, or "
                               "the server's --hf-overrides / num_labels", "reward_model")
        return f"{kind},width={width}"

    async def _post(self, seqs: list[list[int]]) -> list[Any]:
        def valid(d: Any) -> bool:
            return isinstance(d, dict) and isinstance(d.get("data"), list) and len(d["data"]) == len(seqs)

        data, _ = await self.server._post("/pooling", self._body(seqs), valid=valid, what="a pooling answer", root=True)
        self.requests += 1
        self.sent_tokens += sum(map(len, seqs))
        return [d["data"] for d in sorted(data["data"], key=lambda d: d["index"])]

    # -- reading -------------------------------------------------------------------------
    def read(self, seqs: list[list[int]], wanted: list[list[int]]) -> tuple[list[dict[int, float]], list[int]]:
        """The format's value at the ``wanted`` positions of each sequence: from the memo,
        else from one batched request (equal sequences sent once). Returns the values and
        the tokens each sequence made the server compute."""
        out: list[dict[int, float]] = [dict() for _ in seqs]
        todo: dict[tuple[int, ...], set[int]] = {}
        with self._lock:
            for i, (s, w) in enumerate(zip(seqs, wanted)):
                for t in w:
                    v = self._memo.get(tuple(s[: t + 1]))
                    if v is None:
                        todo.setdefault(tuple(s), set()).update(w)
                        break
                    out[i][t] = v
        computed = [0] * len(seqs)
        if todo:
            send = [list(k) for k in todo]
            rows = run_sync(self._post_all(send))
            with self._lock:
                if len(self._memo) > self.MEMO_LIMIT:
                    self._memo.clear()
                for s, r in zip(send, rows):
                    pos = sorted(todo[tuple(s)])
                    for t, v in zip(pos, self._values(r, s, pos)):
                        self._memo[tuple(s[: t + 1])] = v
            first = {}
            for i, (s, w) in enumerate(zip(seqs, wanted)):
                key = tuple(s)
                if key in todo and key not in first:
                    first[key] = i
                    computed[i] = len(s)
                for t in w:
                    out[i][t] = self._memo.get(tuple(s[: t + 1]), out[i].get(t))
        return out, computed

    async def _post_all(self, seqs: list[list[int]]) -> list[Any]:
        parts = [seqs[i : i + self.MAX_SEQS] for i in range(0, len(seqs), self.MAX_SEQS)]
        got = await asyncio.gather(*(self._post(p) for p in parts))
        return [r for part in got for r in part]

    def _values(self, rows: Any, ids: list[int], pos: list[int]) -> list[float]:
        """The format's scores at positions ``pos`` from one sequence's rows (activated by
        the server where the format maps logits through a sigmoid or softmax)."""
        if rows and not isinstance(rows[0], list):
            rows = [rows]
        if len(rows) == len(ids):  # a row per token
            picked = [rows[t] for t in pos]
        elif len(rows) == 1:  # one row for the sequence (an outcome format)
            picked = rows * len(pos)
        else:  # a row per marker, in order: the markers are the read positions
            marks = [i for i, t in enumerate(ids) if self.renderer and t == self.renderer.marker_id]
            at = {m: k for k, m in enumerate(marks)}
            picked = [rows[at[t]] for t in pos]
        how = self.fmt.score
        if how in ("softmax1", "p1"):
            return [float(r[1]) for r in picked]
        if how == "p1_minus_p0":
            return [float(r[1]) - float(r[0]) for r in picked]
        return [float(r[0]) for r in picked]  # sigmoid / two_way (activated), raw

    # -- the Scorer contract -----------------------------------------------------------------
    def score_steps_many(self, requests: Sequence[tuple[str, Sequence[str]]], batch_size: int = 0,
                         aggregation: str = "last") -> list[Scores]:
        t0 = time.perf_counter()
        flat = [(p, c) for p, cs in requests for c in cs]
        lay = [self.layout(p, c) for p, c in flat]
        seqs = [ids for ids, _, _ in lay]
        reads = [ends if self.fmt.process else ([end] if end is not None else []) for _, ends, end in lay]
        vals, computed = self.read(seqs, reads)
        wall = time.perf_counter() - t0
        steps = [[v[t] for t in r] for r, v in zip(reads, vals)]
        usages = [Usage(computed_tokens=c, model_calls=1 if c else 0, wall_s=wall / max(1, len(flat))) for c in computed]
        return per_request(requests, steps, usages, aggregation)

    def score_steps(self, prompt: str, completions: Sequence[str], batch_size: int = 0,
                    aggregation: str = "last") -> Scores:
        return self.score_steps_many([(prompt, completions)], aggregation=aggregation)[0]

    def score_completions(self, prompt: str, completions: Sequence[str]) -> list[tuple[float, Usage]]:
        t0 = time.perf_counter()
        lay = [self.layout(prompt, c) for c in completions]
        seqs = [ids for ids, _, _ in lay]
        wanted = [[end] if end is not None else ends for _, ends, end in lay]
        vals, computed = self.read(seqs, wanted)
        wall = time.perf_counter() - t0
        out = []
        for (_, ends, end), v, c in zip(lay, vals, computed):
            u = Usage(computed_tokens=c, model_calls=1 if c else 0, wall_s=wall / max(1, len(completions)))
            out.append((v[end] if end is not None else aggregate([v[e] for e in ends], self.aggregation, empty=0.0), u))
        return out

    def score(self, prompt: str, completions: Sequence[str]) -> Scores:
        scored = self.score_completions(prompt, completions)
        return Scores([s for s, _ in scored], Usage.total(u for _, u in scored))

    def step_scores(self, prompt: str, completions: Sequence[str]) -> list[list[float]]:
        return self.score_steps(prompt, completions).steps or []

    def prm(self, aggregation: str = "last") -> Any:
        from .base import ProcessReward

        return ProcessReward(self, aggregation)

    def clear_cache(self) -> None:
        with self._lock:
            self._memo.clear()

    def identity(self) -> str:
        """What the results store keys this verifier by: server, model, format and what
        the probe found."""
        return f"{self.endpoint}#{self.name}:{self.fmt.name}:{self.probed}"

    def __repr__(self) -> str:
        return f"RemoteRewardModel({self.name!r} at {self.endpoint}, format={self.fmt.name})"


def tokenizer_for(model: str | None, given: Any = None) -> Any:
    """The verifier's tokenizer folder: given, else $PONDER_REWARD_TOKENIZER, else the
    served model's name if it is a shipped model or a local folder (vLLM's default
    served name is the --model path)."""
    if given:
        return given
    env = os.environ.get("PONDER_REWARD_TOKENIZER")
    if env:
        return env
    if model:
        from ..models.registry import resolve_model

        try:
            path, _ = resolve_model(model)
            return str(path)
        except Exception:
            pass
    raise SettingError(f"the remote verifier {model!r} needs its tokenizer here, to lay solutions out exactly: name a "
                       "shipped model or a local folder after '#', or set PONDER_REWARD_TOKENIZER to its folder",
                       "reward_model")
