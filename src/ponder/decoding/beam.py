"""The beam family: beam search, beam sampling, diverse (group) beam search and
stochastic beam search, on a logits-level model with a KV cache.

One loop, ``beam_loop``, serves them all. Each step it scores every one-token
extension of every live beam, keeps ``2K`` candidates per group (so that ``K`` live
beams remain even if ``K`` of them end), files the ended ones among the group's best
finished hypotheses with the length penalty, and reorders the KV cache (and any
processor state) to the surviving beams. What differs is how candidates are chosen:

* beam search takes the top ``2K`` accumulated log-probabilities;
* beam sampling draws them without replacement from ``softmax`` of those scores
  (transformers' ``do_sample=True, num_beams=K``);
* diverse beam search (Vijayakumar et al., 2018) runs ``G`` groups one after the other
  each step, and penalises tokens that earlier groups chose at this step;
* stochastic beam search (Kool et al., 2019) ranks by Gumbel perturbations of the
  sequence log-probabilities, conditioned down the tree, which makes the ``K`` final
  sequences an exact sample without replacement when they all end together.

Beam search and beam sampling follow transformers' ``generate`` exactly (scores,
``length_penalty``, ``early_stopping`` in {True, False, "never"}, n-best output), and
the tests hold them to it.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ..protocols import Access, require_access
from ..types import Generation, Usage
from .generate import Options, TokenGenerator, _stops, pick_greedy, random_seed, row_generator, split_options
from .adapters import HISTORY_SETTINGS, make_processors
from .common_adapters import Chain, SettingError
from ..engine.stopping import StopStringMatcher

NEG = -1.0e9  # transformers' "impossible" score; kept so that scores match it exactly
EARLY_STOPPING = (True, False, "never")


@dataclass
class _Hyp:
    score: float  # what the hypothesis is ranked by (length-penalised, or a Gumbel key)
    tokens: list[int]
    logprobs: list[float]
    finish: str
    group: int = 0


@dataclass
class _Group:
    """The bookkeeping of one group of ``k`` beams (all of beam search when G = 1)."""

    k: int
    tokens: list[list[int]]  # live beams' generated tokens
    logprobs: list[list[float]]  # the model's own log-prob of each of those tokens
    scores: torch.Tensor  # [k] float32 accumulated (processed) log-probs of live beams
    keys: torch.Tensor | None = None  # [k] Gumbel keys (stochastic beam search only)
    finished: list[_Hyp] = field(default_factory=list)  # best first, at most k
    improvable: bool = True  # transformers' early-stop heuristic, not yet satisfied
    done: bool = False

    @classmethod
    def start(cls, k: int, gumbel: bool) -> "_Group":
        scores = torch.full((k,), NEG)
        scores[0] = 0.0  # only the first copy of the prompt may expand at step one
        keys = scores.clone() if gumbel else None
        return cls(k, [[] for _ in range(k)], [[] for _ in range(k)], scores, keys)

    def file(self, hyp: _Hyp) -> None:
        self.finished.append(hyp)
        # stable: an earlier hypothesis wins a tie, as with transformers' merged top-k
        self.finished.sort(key=lambda h: -h.score)
        del self.finished[self.k :]


def _check_beam_settings(num_beams: int, length_penalty: float, early_stopping: Any, groups: int = 1) -> None:
    if not isinstance(num_beams, int) or isinstance(num_beams, bool) or num_beams < 1:
        raise SettingError(f"num_beams must be an integer >= 1; got {num_beams!r}")
    if not isinstance(length_penalty, (int, float)) or not math.isfinite(length_penalty):
        raise SettingError(f"length_penalty must be a finite number (1.0 = mean log-prob per token); got {length_penalty!r}")
    if early_stopping not in EARLY_STOPPING or isinstance(early_stopping, int) and not isinstance(early_stopping, bool):
        raise SettingError(f"early_stopping must be True, False or 'never'; got {early_stopping!r}")
    if not isinstance(groups, int) or groups < 1 or num_beams % groups:
        raise SettingError(f"num_beam_groups must be an integer >= 1 that divides num_beams ({num_beams}); got {groups!r}")


def gumbel_like(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Standard Gumbel noise with the shape of ``x``."""
    u = torch.rand(x.shape, generator=generator, dtype=torch.float64).clamp_(1e-300, 1.0)
    return -torch.log(-torch.log(u)).to(x.dtype)


def conditioned_gumbel(phi: torch.Tensor, parent_key: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Gumbel keys of children with log-probs ``phi`` [k, V], conditioned so that their
    maximum equals the parent's key [k] (Kool et al. 2019, eq. 23, the stable form)."""
    g = phi.double() + gumbel_like(phi, generator).double()  # [k, V]
    z = g.max(dim=-1, keepdim=True).values
    t = parent_key.double()[:, None]
    # G~ = -log(exp(-T) - exp(-Z) + exp(-G)), computed via v = T - G + log1mexp(G - Z)
    v = t - g + torch.log1p(-torch.exp(torch.clamp(g - z, max=0.0)) + 1e-300)
    out = t - torch.clamp(v, min=0.0) - torch.log1p(torch.exp(-v.abs()))
    return out.float()


@dataclass
class _Spec:
    """What every step of one beam search reads (nothing here changes while it runs)."""

    lm: Any
    k: int  # beams per group
    mode: str  # "beam" | "sample" | "stochastic"
    length_penalty: float
    early_stopping: bool | str
    stop_ids: set[int]
    stopper: StopStringMatcher
    max_new: int
    generator: torch.Generator | None

    def ends(self, g: _Group, parent: int, tok: int, gen_len: int) -> bool:
        """Does extending beam ``parent`` by ``tok`` end the hypothesis?"""
        if tok in self.stop_ids or gen_len >= self.max_new:
            return True
        return bool(self.stopper.stops) and self.stopper.find(self.lm.decode(g.tokens[parent] + [tok]), 0) is not None


def _candidates(spec: _Spec, g: _Group, acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The 2k best (or sampled) children of a group's beams: their accumulated scores,
    their flat indices into acc [k, V] (best first) and, in stochastic mode, their keys."""
    flat = acc.reshape(-1)
    width = min(2 * spec.k, flat.numel())
    if spec.mode == "beam":
        vals, idx = torch.topk(flat, width)
        return vals, idx, None
    if spec.mode == "sample":
        idx = torch.multinomial(flat.softmax(-1), width, generator=spec.generator)
        vals, order = flat[idx].sort(descending=True)
        return vals, idx[order], None
    keys = conditioned_gumbel(acc, g.keys, spec.generator).reshape(-1)  # stochastic: by conditioned Gumbel keys
    kv, idx = torch.topk(keys, width)
    return flat[idx], idx, kv


def _group_step(spec: _Spec, g: _Group, gi: int, s: torch.Tensor, raw: torch.Tensor,
                gen_len: int) -> tuple[list[int], list[int]]:
    """One step of group ``gi`` (s: its rows' processed log-probs [k, V]): file the
    children that end, keep the k best that do not, apply transformers' stopping rules.
    Returns each kept beam's parent row (within the group) and new token."""
    k, V = spec.k, s.shape[-1]
    vals, idx, kv = _candidates(spec, g, s + g.scores[:, None])
    parent, tok = (idx // V).tolist(), (idx % V).tolist()
    hits = [spec.ends(g, p, t, gen_len) for p, t in zip(parent, tok)]
    # file the ended candidates among the first k (the rest are only spares)
    if g.improvable and not (spec.early_stopping is True and len(g.finished) == k):
        for j in range(min(k, len(hits))):
            if hits[j]:
                p, t = parent[j], tok[j]
                finish = "length" if t not in spec.stop_ids and gen_len >= spec.max_new else "stop"
                rank = float(kv[j]) if kv is not None else float(vals[j] / (gen_len**spec.length_penalty))
                g.file(_Hyp(rank, g.tokens[p] + [t], g.logprobs[p] + [float(raw[gi * k + p, t])], finish, gi))
    # the k best candidates that did not end stay live
    ended = torch.tensor(hits, dtype=torch.float32) * NEG
    live_vals = vals + ended
    rank_by = live_vals if kv is None else kv + ended
    keep = torch.topk(rank_by, min(k, len(hits))).indices.tolist()
    g.tokens = [g.tokens[parent[j]] + [tok[j]] for j in keep]
    g.logprobs = [g.logprobs[parent[j]] + [float(raw[gi * k + parent[j], tok[j]])] for j in keep]
    g.scores = live_vals[keep].clone()
    if kv is not None:
        g.keys = rank_by[keep].clone()
    _stopping_rules(spec, g, gen_len, all(hits))
    return [parent[j] for j in keep], [tok[j] for j in keep]


def _stopping_rules(spec: _Spec, g: _Group, gen_len: int, all_ended: bool) -> None:
    """transformers' rules: a group is done when its best live beam cannot beat its
    worst finished one (or, early_stopping=True, when k are finished)."""
    best_len = spec.max_new if spec.early_stopping == "never" and spec.length_penalty > 0.0 else gen_len
    best_possible = g.scores[0] / (best_len**spec.length_penalty)
    worst = min(h.score for h in g.finished) if len(g.finished) == spec.k else NEG
    if spec.mode == "stochastic":  # keys only fall down the tree: stop when no live key beats the worst kept
        best_possible = g.keys[0]
    g.improvable = g.improvable and bool(best_possible > worst)
    g.done = not g.improvable or (len(g.finished) == spec.k and spec.early_stopping is True) or all_ended


def _outputs(spec: _Spec, hyps: list[_Hyp], groups: int) -> list[Generation]:
    """Finished hypotheses as generations: the stop token or string taken out of the text."""
    out = []
    for h in hyps:
        ids = h.tokens
        text_ids = ids[:-1] if ids and ids[-1] in spec.stop_ids and h.finish == "stop" else ids
        text = spec.lm.decode(text_ids)
        stop: str | int | None = ids[-1] if h.finish == "stop" and ids[-1] in spec.stop_ids else None
        if spec.stopper.stops:
            hit = spec.stopper.find(text, 0)
            if hit is not None:
                text, stop = text[: hit[0]], hit[1]
        out.append(Generation(text=text, token_ids=ids, logprobs=h.logprobs, finish_reason=h.finish,  # type: ignore[arg-type]
                              score=h.score, stop=stop, meta={"group": h.group} if groups > 1 else {}))
    return out


def beam_loop(
    lm: Any,
    prompt: Sequence[int],
    num_beams: int,
    processors: Chain,
    options: Options,
    *,
    length_penalty: float = 1.0,
    early_stopping: bool | str = False,
    groups: int = 1,
    diversity_penalty: float = 0.0,
    mode: str = "beam",  # "beam" | "sample" | "stochastic"
    generator: torch.Generator | None = None,
) -> tuple[list[Generation], Usage]:
    """Run one prompt's beams; returns every group's finished hypotheses, best first,
    and what the search cost."""
    require_access(lm, Access.LOGITS, "beam search")
    t0 = time.perf_counter()
    options = options.within(lm, len(prompt))
    K, G = num_beams, groups
    spec = _Spec(lm, K // G, mode, length_penalty, early_stopping,
                 set(options.stop_token_ids) | (set() if options.ignore_eos else set(lm.eos_token_ids)),
                 StopStringMatcher(options.stop), options.max_tokens, generator)
    k, idle = spec.k, lm.eos_token_ids[0] if lm.eos_token_ids else 0
    logits, cache = lm.prefill([list(prompt)], capacity=len(prompt) + spec.max_new + 1)
    cache, logits = cache.fork([0] * K), logits.expand(K, -1)
    history = torch.as_tensor([list(prompt)] * K, dtype=torch.long)  # [K, T]
    procs = processors if processors.is_identity else processors.fork([0])
    if not procs.is_identity:
        procs.reset()
        procs = procs.fork([0] * K)
    group = [_Group.start(k, mode == "stochastic") for _ in range(G)]
    computed, steps = len(prompt), 0
    for t in range(spec.max_new):
        raw = logits.float().log_softmax(-1)  # [K, V] the model's own log-probs
        scores = raw if procs.is_identity else procs(history, raw)
        if mode == "stochastic":  # keys need the (tempered) model's normalised log-probs
            scores = scores.log_softmax(-1)
        parents: list[int] = []  # row (0..K-1) each new live beam extends
        new_tokens: list[int] = []
        chosen_now = torch.zeros(raw.shape[-1])  # tokens chosen at this step by earlier groups
        for gi, g in enumerate(group):
            if g.done:  # a finished group idles; keep its rows in place
                parents, new_tokens = parents + list(range(gi * k, (gi + 1) * k)), new_tokens + [idle] * k
                continue
            s = scores[gi * k : (gi + 1) * k]
            if diversity_penalty and gi > 0:
                s = s - diversity_penalty * chosen_now  # Hamming diversity
            rows, toks = _group_step(spec, g, gi, s, raw, t + 1)
            parents, new_tokens = parents + [gi * k + r for r in rows], new_tokens + toks
            chosen_now[torch.tensor(toks)] += 1
        steps += 1
        if all(g.done for g in group):
            break
        idx_t = torch.tensor(parents)
        cache.reorder_(idx_t)
        history = torch.cat([history[idx_t], torch.tensor(new_tokens)[:, None]], dim=1)
        if not procs.is_identity:
            procs = procs.fork(parents)
            procs.accept(torch.tensor(new_tokens))
        logits = lm.step(torch.tensor(new_tokens), cache)
        computed += K
    hyps = sorted((h for g in group for h in g.finished), key=lambda h: -h.score)
    usage = Usage(prompt_tokens=len(prompt), generated_tokens=sum(len(h.tokens) for h in hyps),
                  computed_tokens=computed, model_calls=steps,
                  flops=lm.flops(len(prompt), 0) + K * lm.flops(max(0, steps - 1), len(prompt)),
                  wall_s=time.perf_counter() - t0)
    return _outputs(spec, hyps, G), usage


class BeamSearch(TokenGenerator):
    """Beam search (transformers-compatible): keep the ``num_beams`` best partial
    sequences by summed log-probability; a finished sequence scores
    ``sum_logprob / length ** length_penalty``. ``generate(prompt, n)`` returns the ``n``
    best (n <= num_beams), each with its ``score``.

    ``num_beam_groups > 1`` with ``diversity_penalty > 0`` is diverse beam search
    (Vijayakumar et al., 2018): groups decode in turn each step, and a token already
    chosen by an earlier group at this step loses ``diversity_penalty`` per use.
    """

    strategy = "beam"
    mode = "beam"

    def __init__(
        self,
        lm: Any,
        num_beams: int = 4,
        length_penalty: float = 1.0,
        early_stopping: bool | str = False,
        num_beam_groups: int = 1,
        diversity_penalty: float = 0.0,
        processors: Chain | Sequence[Any] | None = None,
        **settings: Any,
    ) -> None:
        require_access(lm, Access.LOGITS, "beam search")
        _check_beam_settings(num_beams, length_penalty, early_stopping, num_beam_groups)
        if not isinstance(diversity_penalty, (int, float)) or diversity_penalty < 0:
            raise SettingError(f"diversity_penalty must be a number >= 0; got {diversity_penalty!r}")
        if num_beam_groups > 1 and self.mode != "beam":
            raise SettingError("num_beam_groups applies to beam search only")
        options = split_options(settings, self._legal_settings(), self.strategy)
        extra = [processors] if isinstance(processors, Chain) else list(processors or ())
        chain_ = self._make_chain(lm, options, extra, settings)
        super().__init__(lm, pick=pick_greedy, processors=chain_, **options)
        self.options.refuse(self.strategy, "token_healing", "logprobs")  # beams run their own loop
        self.num_beams = num_beams
        self.length_penalty = float(length_penalty)
        self.early_stopping = early_stopping
        self.num_beam_groups = num_beam_groups
        self.diversity_penalty = float(diversity_penalty)

    def _legal_settings(self) -> set[str]:
        return set(HISTORY_SETTINGS)

    def _make_chain(self, lm, options, extra, settings) -> Chain:
        return make_processors(extra=extra, stop_token_ids=_stops(lm, options), **settings)

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        self._check_n(n)
        if n > self.num_beams:
            raise SettingError(f"n (the number of beams returned) must be <= num_beams ({self.num_beams}); got {n}")
        if seed is None:
            seed = random_seed()
        out = []
        for prompt in prompts:
            ids = self._encode(prompt)
            gens, usage = beam_loop(
                self.lm, ids, self.num_beams, self.processors, self.options,
                length_penalty=self.length_penalty, early_stopping=self.early_stopping,
                groups=self.num_beam_groups, diversity_penalty=self.diversity_penalty,
                mode=self.mode, generator=row_generator(seed, 0),
            )
            best = gens[:n]
            # the search's whole bill goes to the best output, so totals stay right
            for i, g in enumerate(best):
                g.usage = usage if i == 0 else Usage()
                g.meta.update(strategy=self.strategy, num_beams=self.num_beams, rank=i)
            out.append(best)
        return out

    def stream(self, prompt, n: int = 1, seed: int | None = None):
        """Beams are only known at the end: one event per returned beam."""
        from .generate import StreamEvent

        for i, g in enumerate(self.generate(prompt, n, seed)):
            yield StreamEvent(i, None, g.text, g)


class DiverseBeamSearch(BeamSearch):
    """Diverse (group) beam search (Vijayakumar et al., 2018): beam search whose beams
    form groups that decode in turn, a token chosen by an earlier group at a step
    losing ``diversity_penalty`` per use. Defaults: 2 groups (1 for an odd number of
    beams) and a penalty of 1."""

    strategy = "diverse-beam"

    def __init__(self, lm: Any, num_beams: int = 4, num_beam_groups: int | None = None,
                 diversity_penalty: float = 1.0, **settings: Any) -> None:
        if num_beam_groups is None:
            num_beam_groups = 2 if isinstance(num_beams, int) and num_beams % 2 == 0 else 1
        super().__init__(lm, num_beams=num_beams, num_beam_groups=num_beam_groups,
                         diversity_penalty=diversity_penalty, **settings)


class BeamSample(BeamSearch):
    """Beam sampling (transformers' ``do_sample=True, num_beams=K``): each step draws
    the ``2K`` candidates without replacement from ``softmax`` of the accumulated
    (processed) log-probabilities, so temperature, top-k and the other adapters shape
    what beams can become."""

    strategy = "beam-sample"
    mode = "sample"

    def __init__(self, lm: Any, num_beams: int = 4, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 min_p: float = 0.0, **settings: Any) -> None:
        self._adapters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
        super().__init__(lm, num_beams=num_beams, **settings)

    def _legal_settings(self) -> set[str]:
        from .adapters import ADAPTER_SETTINGS

        return set(HISTORY_SETTINGS) | set(ADAPTER_SETTINGS)

    def _make_chain(self, lm, options, extra, settings) -> Chain:
        a = self._adapters
        return make_processors(a["temperature"], a["top_k"], a["top_p"], a["min_p"], extra=extra,
                               stop_token_ids=_stops(lm, options), **settings)


class StochasticBeamSearch(BeamSearch):
    """Stochastic beam search (Kool, van Hoof & Welling, 2019): beam search on Gumbel
    perturbed log-probabilities, each child's key conditioned on its parent's. The
    ``num_beams`` sequences it returns are a sample *without replacement* from the
    model (exact when they all end at the same step); each ``score`` is its Gumbel key
    and ``sum_logprob`` its log-probability, which is what unbiased estimators over the
    sample need. Seeded like sampling."""

    strategy = "stochastic-beam"
    mode = "stochastic"

    def __init__(self, lm: Any, num_beams: int = 4, temperature: float = 1.0, **settings: Any) -> None:
        if "length_penalty" in settings or "early_stopping" in settings:
            raise SettingError("stochastic beam search ranks by Gumbel keys; it takes no length_penalty or early_stopping")
        if not isinstance(temperature, (int, float)) or temperature <= 0:
            raise SettingError(f"temperature must be > 0; got {temperature!r}")
        self._temperature = float(temperature)
        super().__init__(lm, num_beams=num_beams, **settings)

    def _make_chain(self, lm, options, extra, settings) -> Chain:
        return make_processors(self._temperature, extra=extra, stop_token_ids=_stops(lm, options), **settings)
