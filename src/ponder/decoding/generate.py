"""Token-level generation on a logits-level model: greedy and sampling.

The whole algorithm is ``decode_loop``: prefill each distinct prompt once, fork its KV
cache into ``n`` rows, then repeat { processors -> pick a token -> check stops } while
any row is alive, dropping finished rows from the batch. ``Greedy`` and ``Sample`` are
thin generators over it; later strategies (beam, speculative, constrained) reuse the
same pieces: ``Options``, the processor chain, ``StopStringMatcher``.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from ..protocols import Access, GeneratorBase, require_access
from ..types import Generation, Usage
from .processors import ADAPTER_SETTINGS, HISTORY_SETTINGS, Chain, SettingError, make_processors
from .stopping import IncrementalDetokenizer, StopStringMatcher

MAX_SEED = 2**63 - 1
OPTION_FIELDS = ("max_tokens", "stop", "stop_token_ids", "ignore_eos", "token_healing")  # the fields of Options


@dataclass
class Options:
    """Settings shared by every token-level strategy, validated at construction."""

    max_tokens: int = 256
    stop: Sequence[str] = ()
    stop_token_ids: Sequence[int] = ()
    ignore_eos: bool = False
    token_healing: bool = False  # back off the prompt's last token and re-spell it (see constraints.heal_prompt)

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            raise SettingError(f"max_tokens must be an integer >= 1; got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        for s in self.stop:
            if not isinstance(s, str) or not s:
                raise SettingError(f"stop strings must be non-empty; got {s!r}")
        for t in self.stop_token_ids:
            if not isinstance(t, int) or t < 0:
                raise SettingError(f"stop_token_ids must be token ids >= 0; got {t!r}")


@dataclass
class StreamEvent:
    """One step of one output: ``index`` is the output's position in the request
    (prompt i, sample j -> i * n + j); ``text`` is newly released text."""

    index: int
    token_id: int | None
    text: str
    generation: Generation | None = None  # set on the event that finishes the output


def row_generator(seed: int, sample: int) -> torch.Generator:
    """The RNG of sample ``sample`` of a request seeded with ``seed``: it depends on
    nothing else, so a seeded request samples the same alone or inside a batch."""
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + sample * 7_919 + 1) % MAX_SEED)
    return g


def pick_greedy(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    return logits.argmax(dim=-1)


def pick_sample(logits: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Ancestral sampling from softmax(logits), row i drawing from its own RNG."""
    probs = logits.float().softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


@dataclass
class _Row:
    prompt_index: int
    sample_index: int
    prompt_len: int
    detok: IncrementalDetokenizer | None
    ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    text: str = ""
    released: int = 0
    finish: str | None = None
    stop: str | int | None = None


def decode_loop(
    lm: Any,
    prompts: Sequence[Sequence[int]],
    n: int,
    pick: Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor],
    processors: Chain,
    options: Options,
    seed: int | None,
    stream: bool = False,
) -> Iterator[StreamEvent]:
    """Yield ``StreamEvent``s; every output ends with an event carrying its Generation."""
    require_access(lm, Access.LOGITS, "token-level decoding")
    t0 = time.perf_counter()
    if seed is None:
        seed = int.from_bytes(os.urandom(8), "little") % MAX_SEED
    P = len(prompts)
    healed = [""] * P  # text taken off each prompt's end by token healing
    if options.token_healing:
        from .constraints import heal_prompt

        cut = [heal_prompt(lm, p) for p in prompts]
        prompts, healed = [c[0] for c in cut], [c[1] for c in cut]
    stopper = StopStringMatcher(options.stop)
    need_text = stream or bool(stopper.stops)
    stop_ids = set(options.stop_token_ids) | (set() if options.ignore_eos else set(lm.eos_token_ids))

    logits, cache = lm.prefill(prompts, capacity=max(map(len, prompts)) + min(options.max_tokens, 1024) + 1)
    rows_idx = torch.arange(P).repeat_interleave(n)  # prompt of each row
    if n > 1:
        cache = cache.fork(rows_idx)
        logits = logits[rows_idx]
    rows = [
        _Row(i, j, len(prompts[i]), IncrementalDetokenizer(lm.decode) if need_text or any(healed) else None,
             released=len(healed[i]))
        for i in range(P)
        for j in range(n)
    ]
    gens = [row_generator(seed, r.sample_index) for r in rows]
    # History for processors: [B, T] left-padded with -1 so each row ends at the last column.
    T0 = max(map(len, prompts))
    history = torch.full((P, T0), -1, dtype=torch.long)
    for i, p in enumerate(prompts):
        history[i, T0 - len(p) :] = torch.as_tensor(list(p))
    history = history[rows_idx]
    # Every request gets its own copy of the processors' state, fresh: a stateful
    # processor (min tokens, penalties, mirostat) must not carry over from an earlier request.
    procs = processors
    if not processors.is_identity:
        procs = processors.fork(list(range(P)))
        procs.reset()
    if any(healed):  # the output must first re-spell what healing took off
        from .constraints import PrefixConstraint

        procs = Chain(PrefixConstraint(lm, healed), procs)
    if not procs.is_identity and n > 1:
        procs = procs.fork(rows_idx.tolist())
    alive = list(range(len(rows)))  # indices into `rows` of the batch rows, in order
    done: list[Generation | None] = [None] * len(rows)

    for step in range(options.max_tokens):
        scores = logits if procs.is_identity else procs(history, logits)
        tokens = pick(scores, gens)  # [B]
        lp = logits.log_softmax(-1).gather(-1, tokens[:, None])[:, 0]
        procs.accept(tokens)
        tok_list, lp_list = tokens.tolist(), lp.tolist()
        keep: list[int] = []
        for b, ri in enumerate(alive):
            r = rows[ri]
            t = tok_list[b]
            r.ids.append(t)
            r.logprobs.append(lp_list[b])
            delta = ""
            if t in stop_ids:
                r.finish, r.stop = "stop", t
            elif r.detok is not None:
                delta = r.detok.add(t)
                if delta:
                    old = len(r.text)
                    r.text += delta
                    hit = stopper.find(r.text, old)
                    if hit is not None:
                        r.text = r.text[: hit[0]]
                        r.finish, r.stop = "stop", hit[1]
            if r.finish is None and step + 1 == options.max_tokens:
                r.finish = "length"
            if r.finish is None:
                keep.append(b)
                if stream:
                    safe = stopper.safe_length(r.text)
                    if safe > r.released:
                        yield StreamEvent(ri, t, r.text[r.released : safe])
                        r.released = safe
            else:
                if r.detok is None:
                    r.text = lm.decode(r.ids)
                head = healed[r.prompt_index]
                gen = Generation(
                    text=r.text[len(head):] if head and r.text.startswith(head) else r.text,
                    token_ids=r.ids,
                    logprobs=r.logprobs,
                    finish_reason=r.finish,  # type: ignore[arg-type]
                    stop=r.stop,
                )
                done[ri] = gen
                yield StreamEvent(ri, t, r.text[min(r.released, len(r.text)) :], gen)
        if not keep:
            break
        if len(keep) < len(alive):
            keep_t = torch.tensor(keep)
            cache.keep_rows_(keep_t)
            history = history[keep_t]
            gens = [gens[b] for b in keep]
            procs = procs.fork(keep)
            tokens = tokens[keep_t]
            alive = [alive[b] for b in keep]
        history = torch.cat([history, tokens[:, None]], dim=1)
        logits = lm.step(tokens, cache)

    _bill(lm, rows, done, n, time.perf_counter() - t0)


def _bill(lm: Any, rows: list[_Row], done: list[Generation | None], n: int, elapsed: float) -> None:
    """Fill in each generation's Usage. The shared prompt is computed once per prompt
    and billed to that prompt's first sample; the last token of an output is never fed
    back, so an output of g tokens computes g - 1 of them."""
    per = elapsed / max(1, len(rows))
    for r, g in zip(rows, done):
        assert g is not None
        first = r.sample_index == 0
        gen_computed = max(0, len(r.ids) - 1)
        computed = gen_computed + (r.prompt_len if first else 0)
        flops = lm.flops(gen_computed, r.prompt_len) + (lm.flops(r.prompt_len, 0) if first else 0.0)
        g.usage = Usage(
            prompt_tokens=r.prompt_len,
            generated_tokens=len(r.ids),
            computed_tokens=computed,
            model_calls=len(r.ids),  # one prefill plus g - 1 decode steps
            flops=flops,
            wall_s=per,
        )


class TokenGenerator(GeneratorBase):
    """A token-level generator: a model, a way to pick tokens, processors and options."""

    strategy = "custom"

    def __init__(
        self,
        lm: Any,
        pick: Callable[[torch.Tensor, list[torch.Generator]], torch.Tensor],
        processors: Chain | None = None,
        options: Options | None = None,
        **option_kwargs: Any,
    ) -> None:
        require_access(lm, Access.LOGITS, type(self).__name__)
        self.lm = lm
        self.pick = pick
        self.processors = processors if processors is not None else Chain()
        self.options = options or Options(**option_kwargs)

    def _encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if prompt == "":
                raise SettingError("the prompt is empty; give at least one character of text")
            return self.lm.encode(prompt)
        ids = list(prompt)
        if not ids:
            raise SettingError("the prompt is empty; give at least one token")
        return ids

    @staticmethod
    def _check_n(n: int) -> None:
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise SettingError(f"n must be an integer >= 1; got {n!r}")

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        """All prompts in one batched loop; returns n generations per prompt.
        Every prompt is its own request seeded with ``seed``."""
        self._check_n(n)
        if not prompts:
            return []
        ids = [self._encode(p) for p in prompts]
        events = decode_loop(self.lm, ids, n, self.pick, self.processors, self.options, seed)
        out: list[Generation | None] = [None] * (len(ids) * n)
        for ev in events:
            if ev.generation is not None:
                ev.generation.meta.setdefault("strategy", self.strategy)
                out[ev.index] = ev.generation
        return [[g for g in out[i * n : (i + 1) * n] if g is not None] for i in range(len(ids))]

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return (await asyncio.to_thread(self.generate_batch, [prompt], n, seed))[0]

    def generate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return self.generate_batch([prompt], n, seed)[0]

    async def agenerate_many(self, prompts: Sequence[str], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        return await asyncio.to_thread(self.generate_batch, list(prompts), n, seed)

    def stream(self, prompt: str | Sequence[int], n: int = 1, seed: int | None = None) -> Iterator[StreamEvent]:
        """Events as tokens are generated (text deltas never include a stop string)."""
        self._check_n(n)
        return decode_loop(self.lm, [self._encode(prompt)], n, self.pick, self.processors, self.options, seed, stream=True)

    async def astream(self, prompt: str, n: int = 1, seed: int | None = None):
        """Async iterator over ``StreamEvent``s; yields control to the loop every step."""
        for ev in self.stream(prompt, n, seed):
            yield ev
            await asyncio.sleep(0)


class Greedy(TokenGenerator):
    """Greedy decoding: the argmax token at every step (MAP approximation). History
    processors (penalties, bans, min tokens, logit bias) apply, as in transformers."""

    strategy = "greedy"

    def __init__(self, lm: Any, processors: Chain | Sequence[Any] | None = None, **settings: Any) -> None:
        options = {k: settings.pop(k) for k in list(settings) if k in OPTION_FIELDS}
        for k in settings:
            if k not in HISTORY_SETTINGS:
                raise SettingError(f"greedy decoding does not take {k!r}; it takes {', '.join(HISTORY_SETTINGS)}")
        extra = [processors] if isinstance(processors, Chain) else list(processors or ())
        chain_ = make_processors(extra=extra, stop_token_ids=_stops(lm, options), **settings)
        super().__init__(lm, pick_greedy, chain_, **options)


class Sample(TokenGenerator):
    """Ancestral sampling through a chain of adapters: temperature, top-k (Fan et al.
    2018), top-p (Holtzman et al. 2020), min-p (Nguyen et al. 2024), typical (Meister et
    al. 2023), epsilon and eta (Hewitt et al. 2022), top-nσ (Tang et al. 2024), after the
    history processors (penalties, bans, min tokens), then any extra processors (plain
    callables ``(tokens, logits) -> logits`` are accepted)."""

    strategy = "sample"

    def __init__(
        self,
        lm: Any,
        temperature: float = 1.0,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        processors: Sequence[Any] = (),
        **settings: Any,
    ) -> None:
        options = {k: settings.pop(k) for k in list(settings) if k in OPTION_FIELDS}
        legal = set(HISTORY_SETTINGS) | set(ADAPTER_SETTINGS)
        for k in settings:
            if k not in legal:
                raise SettingError(f"sampling does not take {k!r}; it takes {', '.join(sorted(legal))}")
        chain_ = make_processors(temperature, top_k, top_p, min_p, extra=processors,
                                 stop_token_ids=_stops(lm, options), **settings)
        super().__init__(lm, pick_sample, chain_, **options)
        self.settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, **settings)




def _stops(lm: Any, options: dict[str, Any]) -> list[int]:
    """The tokens min_tokens must hold back: EOS and any stop token ids."""
    return list(options.get("stop_token_ids", ())) + ([] if options.get("ignore_eos") else list(lm.eos_token_ids))
