"""Token-level search beyond beams: contrastive search and best-first search.

* Contrastive search (Su et al., 2022): among the top-k tokens, pick the one that
  maximises (1 − α)·p(v) − α·max_j cos(h_v, h_j), where h_v is the last-layer hidden
  state the model produces *for* candidate v and h_j those of the context so far (the
  degeneration penalty). The k candidates are run as one batch on forks of the cache.
* Best-first search: a priority queue of partial sequences ordered by a pluggable
  heuristic. With the default heuristic (the sequence log-probability, which never
  rises as a sequence grows) the first finished sequence popped is the most probable
  one among all continuations: exact MAP decoding within ``max_expansions`` (Meister
  et al., 2020, "Best-first beam search"). A ``lookahead`` adds the log-probability of
  a short greedy rollout to each node's score (in the spirit of Lu et al., 2022,
  NeuroLogic A*esque), which makes the search greedier and less exhaustive.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..protocols import Access, require_access
from ..types import Generation, Usage
from .generate import OPTION_FIELDS, TokenGenerator, pick_greedy
from .common_adapters import SettingError, _check


def _finish_text(lm: Any, ids: list[int], stop_ids: set[int]) -> str:
    return lm.decode(ids[:-1] if ids and ids[-1] in stop_ids else ids)


class ContrastiveSearch(TokenGenerator):
    """Contrastive search (Su et al., 2022, "A contrastive framework for neural text
    generation"): ``top_k`` candidates, degeneration penalty weight ``penalty_alpha``
    (0 = greedy). Deterministic; ``n`` > 1 repeats the same output."""

    strategy = "contrastive-search"

    def __init__(self, lm: Any, top_k: int = 4, penalty_alpha: float = 0.6, **options: Any) -> None:
        require_access(lm, Access.LOGITS, "contrastive search")
        if not hasattr(lm, "forward"):
            raise SettingError("contrastive search needs a native model (it reads hidden states)")
        _check(isinstance(top_k, int) and top_k >= 1, f"top_k must be an integer >= 1; got {top_k!r}")
        _check(isinstance(penalty_alpha, (int, float)) and 0 <= penalty_alpha <= 1,
               f"penalty_alpha must be in [0, 1] (0 = greedy); got {penalty_alpha!r}")
        bad = [k for k in options if k not in OPTION_FIELDS]
        if bad:
            raise SettingError(f"contrastive search does not take {', '.join(bad)}; it takes top_k, penalty_alpha, "
                               f"{', '.join(OPTION_FIELDS)}")
        super().__init__(lm, pick=pick_greedy, **options)
        self.options.refuse(self.strategy, "token_healing", "logprobs")
        self.top_k, self.alpha = top_k, float(penalty_alpha)

    def _one(self, ids: list[int]) -> Generation:
        lm = self.lm
        opt = self.options.within(lm, len(ids))
        t0 = time.perf_counter()
        stop_ids = set(opt.stop_token_ids) | (set() if opt.ignore_eos else set(lm.eos_token_ids))
        cache = lm.new_cache(1, len(ids) + opt.max_tokens + 2)
        logits, hidden = lm.forward(torch.tensor([ids]), cache, output_hidden_states=True)
        logits = logits[0, -1]  # [V]
        ctx = torch.nn.functional.normalize(hidden[-1][0].float(), dim=-1)  # [T, H] unit vectors
        out_ids: list[int] = []
        out_lp: list[float] = []
        finish = "length"
        k = min(self.top_k, lm.vocab_size)
        computed = len(ids)
        for _ in range(opt.max_tokens):
            logp = logits.float().log_softmax(-1)
            top_lp, top_ids = torch.topk(logp, k)  # [k]
            if self.alpha == 0 or k == 1:
                j = 0
                cand_cache = cache
                cand_logits, cand_h = lm.forward(top_ids[:1, None], cand_cache, output_hidden_states=True)
                h_j = cand_h[-1][0, -1]
                new_logits = cand_logits[0, -1]
                computed += 1
            else:
                cand_cache = cache.fork([0] * k)
                cand_logits, cand_h = lm.forward(top_ids[:, None], cand_cache, output_hidden_states=True)
                h = torch.nn.functional.normalize(cand_h[-1][:, -1].float(), dim=-1)  # [k, H]
                penalty = (h @ ctx.T).max(-1).values  # [k] max cosine similarity to the context
                score = (1 - self.alpha) * top_lp.exp() - self.alpha * penalty
                j = int(score.argmax())
                cand_cache.keep_rows_([j])
                h_j = cand_h[-1][j, -1]
                new_logits = cand_logits[j, -1]
                computed += k
            cache = cand_cache
            tok = int(top_ids[j])
            out_ids.append(tok)
            out_lp.append(float(top_lp[j]))
            if tok in stop_ids:
                finish = "stop"
                break
            ctx = torch.cat([ctx, torch.nn.functional.normalize(h_j.float(), dim=-1)[None]])
            logits = new_logits
        text = _finish_text(lm, out_ids, stop_ids)
        stop = out_ids[-1] if finish == "stop" else None
        for s in opt.stop:
            cut = text.find(s)
            if cut >= 0:
                text, finish, stop = text[:cut], "stop", s
        usage = Usage(prompt_tokens=len(ids), generated_tokens=len(out_ids), computed_tokens=computed,
                      model_calls=len(out_ids) + 1, flops=lm.flops(computed, 0), wall_s=time.perf_counter() - t0)
        return Generation(text, out_ids, out_lp, finish, usage, stop=stop)  # type: ignore[arg-type]

    def generate_batch(self, prompts, n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        self._check_n(n)
        out = []
        for p in prompts:
            g = self._one(self._encode(p))
            g.meta["strategy"] = self.strategy
            out.append([g] + [Generation(g.text, list(g.token_ids), list(g.logprobs or []), g.finish_reason,
                                         Usage(), stop=g.stop, meta=dict(g.meta)) for _ in range(n - 1)])
        return out

    def stream(self, prompt, n: int = 1, seed: int | None = None):
        from .generate import StreamEvent

        for i, g in enumerate(self.generate(prompt, n, seed)):
            yield StreamEvent(i, None, g.text, g)


@dataclass(order=True)
class _Node:
    priority: float  # negated heuristic: heapq pops the smallest
    order: int  # insertion order breaks ties deterministically
    tokens: list[int] = field(compare=False)
    logprobs: list[float] = field(compare=False)
    parent_cache: Any = field(compare=False)  # cache of the prefix without the last token


@dataclass
class SearchNode:
    """What a best-first heuristic sees."""

    tokens: list[int]
    logprobs: list[float]
    text: str

    @property
    def logprob(self) -> float:
        return float(sum(self.logprobs))


def logprob_heuristic(node: SearchNode) -> float:
    """The sequence log-probability: best-first search is then exact MAP search."""
    return node.logprob


class BestFirstSearch(TokenGenerator):
    """Best-first search with a pluggable ``heuristic(SearchNode) -> float`` (higher is
    better). Each pop expands one node into its ``expand`` most likely next tokens;
    finished sequences (EOS, a stop token, or ``max_tokens``) are returned in the order
    they are popped, up to ``n``. ``max_expansions`` bounds the work (each expansion is
    one forward pass); if it runs out first, the best unfinished sequences are returned
    with ``finish_reason="length"`` and ``meta["complete"] = False``; ``lookahead`` d > 0 scores a node by its log-probability plus
    that of a greedy rollout of d tokens."""

    strategy = "best-first"

    def __init__(self, lm: Any, expand: int = 4, max_expansions: int = 256,
                 heuristic: Callable[[SearchNode], float] | None = None, lookahead: int = 0, **options: Any) -> None:
        require_access(lm, Access.LOGITS, "best-first search")
        _check(isinstance(expand, int) and expand >= 1, f"expand must be an integer >= 1; got {expand!r}")
        _check(isinstance(max_expansions, int) and max_expansions >= 1,
               f"max_expansions must be an integer >= 1; got {max_expansions!r}")
        _check(isinstance(lookahead, int) and lookahead >= 0, f"lookahead must be an integer >= 0; got {lookahead!r}")
        _check(heuristic is None or callable(heuristic), "heuristic must be a callable (SearchNode) -> float")
        bad = [k for k in options if k not in OPTION_FIELDS]
        if bad:
            raise SettingError(f"best-first search does not take {', '.join(bad)}")
        super().__init__(lm, pick=pick_greedy, **options)
        self.options.refuse(self.strategy, "token_healing", "logprobs")
        self.expand, self.max_expansions, self.lookahead = expand, max_expansions, lookahead
        self.heuristic = heuristic or logprob_heuristic

    def _rollout(self, cache: Any, logits: torch.Tensor, stop_ids: set[int]) -> float:
        """Log-probability of a greedy continuation of ``lookahead`` tokens (on a fork)."""
        c = cache.fork([0])
        total = 0.0
        for _ in range(self.lookahead):
            lp = logits.float().log_softmax(-1)
            t = int(lp.argmax())
            total += float(lp[t])
            if t in stop_ids:
                break
            logits = self.lm.step(torch.tensor([t]), c)[0]
        return total

    def _search(self, ids: list[int], n: int) -> tuple[list[Generation], Usage]:
        lm = self.lm
        opt = self.options.within(lm, len(ids))
        t0 = time.perf_counter()
        stop_ids = set(opt.stop_token_ids) | (set() if opt.ignore_eos else set(lm.eos_token_ids))
        logits, root = lm.prefill([ids], capacity=len(ids) + opt.max_tokens + 2)
        counter = itertools.count()
        heap: list[_Node] = []
        found: list[Generation] = []
        calls, computed = 1, len(ids)

        def push_children(tokens, logprobs, cache, next_logits):
            nonlocal calls, computed
            lp = next_logits.float().log_softmax(-1)
            top_lp, top_ids = torch.topk(lp, min(self.expand, lm.vocab_size))
            for l, t in zip(top_lp.tolist(), top_ids.tolist()):
                child = tokens + [t]
                child_lp = logprobs + [l]
                node = SearchNode(child, child_lp, lm.decode(child))
                score = self.heuristic(node)
                if self.lookahead and t not in stop_ids and len(child) < opt.max_tokens:
                    c = cache.fork([0])
                    score += self._rollout(c, lm.step(torch.tensor([t]), c)[0], stop_ids)
                    calls += self.lookahead + 1
                    computed += self.lookahead + 1
                heapq.heappush(heap, _Node(-score, next(counter), child, child_lp, cache))

        push_children([], [], root, logits[0])
        expansions = 0
        while heap and len(found) < n:
            node = heapq.heappop(heap)
            last = node.tokens[-1]
            text = lm.decode(node.tokens)
            hit = next((s for s in opt.stop if s in text), None)
            if last in stop_ids or hit is not None or len(node.tokens) >= opt.max_tokens:
                finish = "stop" if last in stop_ids or hit is not None else "length"
                out_text = _finish_text(lm, node.tokens, stop_ids)
                if hit is not None:
                    out_text = out_text[: out_text.find(hit)]
                found.append(Generation(out_text, node.tokens, node.logprobs, finish, score=-node.priority,  # type: ignore[arg-type]
                                        stop=hit if hit is not None else (last if last in stop_ids else None)))
                continue
            if expansions >= self.max_expansions:
                heapq.heappush(heap, node)  # unexpanded: it may still be returned below
                break
            expansions += 1
            cache = node.parent_cache.fork([0])
            next_logits = lm.step(torch.tensor([last]), cache)[0]
            calls += 1
            computed += 1
            push_children(node.tokens, node.logprobs, cache, next_logits)
        # Out of budget: the best unfinished sequences fill the rest, marked unfinished,
        # so the work done is returned rather than lost.
        while heap and len(found) < n:
            node = heapq.heappop(heap)
            found.append(Generation(lm.decode(node.tokens), node.tokens, node.logprobs, "length",
                                    score=-node.priority, meta={"complete": False}))
        usage = Usage(prompt_tokens=len(ids), generated_tokens=sum(len(g.token_ids) for g in found),
                      computed_tokens=computed, model_calls=calls, flops=lm.flops(computed, 0),
                      wall_s=time.perf_counter() - t0)
        return found, usage

    def generate_batch(self, prompts, n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        self._check_n(n)
        out = []
        for p in prompts:
            found, usage = self._search(self._encode(p), n)
            for i, g in enumerate(found):
                g.usage = usage if i == 0 else Usage()
                g.meta.update(strategy=self.strategy, rank=i)
            out.append(found)
        return out

    def stream(self, prompt, n: int = 1, seed: int | None = None):
        from .generate import StreamEvent

        for i, g in enumerate(self.generate(prompt, n, seed)):
            yield StreamEvent(i, None, g.text, g)
