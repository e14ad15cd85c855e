"""Token-level generation on a logits-level model: greedy and sampling.

Every prompt becomes a request to the model's engine (``ponder.engine.Engine``), which
prefills each distinct prompt once (reusing cached prefixes), forks its KV cache into
``n`` rows, then repeats { processors -> pick a token -> check stops } while any row is
alive, dropping finished rows and admitting new requests between steps. ``Greedy`` and
``Sample`` are thin generators over it; other strategies (beam, speculative, search)
reuse the same pieces: ``Options``, the processor chain, ``StopStringMatcher``.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from ..protocols import Access, GeneratorBase, require_access
from ..types import Generation
from .processors import ADAPTER_SETTINGS, HISTORY_SETTINGS, Chain, SettingError, make_processors
from ..engine.engine import MAX_SEED, Request, StreamEvent, engine_for, random_seed, row_generator  # noqa: F401 (re-exported)

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


def pick_greedy(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    return logits.argmax(dim=-1)


def pick_sample(logits: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Ancestral sampling from softmax(logits) [B, V] by the inverse CDF: row i takes
    the first token whose cumulative probability exceeds its uniform draw u_i ([B],
    float64 in [0, 1)), all rows at once in float64. The engine gives every sample its
    own stream of draws, one per step, so a row's choice depends on nothing else in
    the batch."""
    cdf = logits.double().softmax(dim=-1).cumsum(dim=-1)  # [B, V]
    u = uniforms * cdf[:, -1]  # the total is 1 up to rounding
    # right=True: the first index with cdf > u, never a zero-probability token
    return torch.searchsorted(cdf, u[:, None], right=True)[:, 0].clamp_(max=cdf.shape[-1] - 1)


def split_options(settings: dict[str, Any], legal: Sequence[str] | set[str], who: str) -> dict[str, Any]:
    """Take the ``Options`` fields out of ``settings`` (in place) and return them; any
    remaining setting not in ``legal`` is a SettingError naming what ``who`` takes."""
    options = {k: settings.pop(k) for k in list(settings) if k in OPTION_FIELDS}
    for k in settings:
        if k not in legal:
            raise SettingError(f"{who} does not take {k!r}; it takes {', '.join(sorted(legal))}")
    return options


def encode_prompt(lm: Any, prompt: str | Sequence[int]) -> list[int]:
    """Token ids of a prompt given as text or ids; an empty prompt is a SettingError."""
    if isinstance(prompt, str):
        if prompt == "":
            raise SettingError("the prompt is empty; give at least one character of text")
        return lm.encode(prompt)
    ids = list(prompt)
    if not ids:
        raise SettingError("the prompt is empty; give at least one token")
    return ids


def decode_loop(
    lm: Any,
    prompts: Sequence[Sequence[int]],
    n: int,
    pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    processors: Chain,
    options: Options,
    seed: int | None,
    stream: bool = False,
) -> Iterator[StreamEvent]:
    """Yield ``StreamEvent``s; every output ends with an event carrying its Generation.
    Each prompt is one request to the model's engine (``ponder.engine``), which batches
    it with whatever else is running and reuses cached prefixes."""
    require_access(lm, Access.LOGITS, "token-level decoding")
    if seed is None:  # one random seed for the call, so its samples are distinct and reproducible together
        seed = random_seed()
    reqs = [Request(p, n, pick, processors, options, seed, stream, index_base=i * n) for i, p in enumerate(prompts)]
    yield from engine_for(lm).run(reqs)


class TokenGenerator(GeneratorBase):
    """A token-level generator: a model, a way to pick tokens, processors and options.
    ``pick(scores [B, V], uniforms [B]) -> tokens [B]`` gets each row's processed scores
    and one U(0, 1) draw (float64) from that sample's own stream; a deterministic pick
    ignores the draws."""

    strategy = "custom"

    def __init__(
        self,
        lm: Any,
        pick: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
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
        return encode_prompt(self.lm, prompt)

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
        options = split_options(settings, HISTORY_SETTINGS, "greedy decoding")
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
        options = split_options(settings, set(HISTORY_SETTINGS) | set(ADAPTER_SETTINGS), "sampling")
        chain_ = make_processors(temperature, top_k, top_p, min_p, extra=processors,
                                 stop_token_ids=_stops(lm, options), **settings)
        super().__init__(lm, pick_sample, chain_, **options)
        self.settings = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, **settings)




def _stops(lm: Any, options: dict[str, Any]) -> list[int]:
    """The tokens min_tokens must hold back: EOS and any stop token ids."""
    return list(options.get("stop_token_ids", ())) + ([] if options.get("ignore_eos") else list(lm.eos_token_ids))
