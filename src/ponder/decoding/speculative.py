"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023).

The draft proposes ``k`` tokens; the target scores all of them in one forward pass;
each proposal x_i is accepted with probability min(1, p(x_i)/q(x_i)), and at the first
rejection a token is drawn from the residual norm(max(0, p − q)). If all k are
accepted the target's next distribution gives a bonus token. The output distribution
is exactly the target's (lossless); under greedy decoding acceptance means "the
target's argmax equals the draft's", so the output is token-for-token plain greedy.

Drafts come from a small model (``draft`` a model) or from prompt lookup
(``draft="ngram"``, Saxena 2023): the tokens that followed the latest earlier
occurrence of the context's last n-gram. A lookup draft is a point mass q = 1{x}, so
the same rule accepts x with probability p(x) and resamples from p without x.

Rejected tokens are rolled back by truncating the KV caches (``KVCache.truncate_``) and
the processors (``rollback``), so penalties and grammar constraints compose with
speculation: both p and q are the *processed* distributions. ``num_draft_tokens="auto"``
adapts k: +2 after a fully accepted round, −1 otherwise (as transformers' heuristic).
Several sequences (prompts × n) are speculated together: one batched draft pass per
draft position and one batched target pass per round, each row accepting its own
number of drafts (the caches truncate per row). A row draws its random numbers in the
same order as it would alone, so a seeded batch gives each row's solo output.
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from ..models import WEIGHT_TYPES
from ..protocols import Access, GeneratorBase, require_access
from ..types import Generation, Usage
from .generate import Options, encode_prompt, random_seed, row_generator, split_options
from .adapters import make_processors
from .common_adapters import Chain, SettingError
from ..engine.stopping import StopStringMatcher


class Speculative(GeneratorBase):
    """Speculative decoding of ``target`` with ``draft``; ``temperature`` 0 is greedy."""

    strategy = "speculative"

    # k = 5: a verification pass of k + 1 = 6 tokens fills the C kernel's 6-row tile; on
    # arith with the draft model, 5 gave 2.13-2.17x plain greedy where 4 gave 1.79-2.06
    # and 6 1.94-2.01 (three interleaved runs, one thread, Intel Xeon with AVX-512)
    def __init__(self, target: Any, draft: Any, num_draft_tokens: int | str = 5, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, max_ngram: int = 3,
                 processors: Sequence[Any] = (), record_drafts: bool = False, draft_weights: str = "bfloat16",
                 **settings: Any) -> None:
        from .adapters import HISTORY_SETTINGS

        require_access(target, Access.LOGITS, "speculative decoding")
        self.ngram = isinstance(draft, str)
        if self.ngram:
            if draft != "ngram":
                raise SettingError(f"draft must be a model or 'ngram' (prompt lookup); got {draft!r}")
        else:
            require_access(draft, Access.LOGITS, "speculative decoding (draft)")
            if target.vocab_size != draft.vocab_size:
                raise SettingError(f"the draft model must share the target's tokenizer (vocab {draft.vocab_size} != {target.vocab_size})")
        self.adaptive = num_draft_tokens == "auto"
        if not self.adaptive and (not isinstance(num_draft_tokens, int) or isinstance(num_draft_tokens, bool) or num_draft_tokens < 1):
            raise SettingError(f"num_draft_tokens must be an integer >= 1 or 'auto'; got {num_draft_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise SettingError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
        if not isinstance(max_ngram, int) or max_ngram < 1:
            raise SettingError(f"max_ngram must be an integer >= 1; got {max_ngram!r}")
        options = split_options(settings, HISTORY_SETTINGS, "speculative decoding")
        # draft_weights: the type of the draft's matrices where the C kernel drafts greedily
        # (a lone greedy row). bfloat16 halves the bytes each draft step streams: on
        # arith-draft (1.2 MB of float32 matrices) a 1 MiB L2 cache (AMD Zen 4 and 5)
        # then holds them. The output is the target's either way; only which drafts are
        # accepted can change.
        if draft_weights not in WEIGHT_TYPES:
            raise SettingError(f"draft_weights must be one of {', '.join(WEIGHT_TYPES)}; got {draft_weights!r}")
        self.draft_weights = draft_weights
        if not isinstance(record_drafts, bool):
            raise SettingError(f"record_drafts must be true or false; got {record_drafts!r}")
        # record_drafts: meta["draft_rounds"] lists each round's [drafts, accepted, the
        # target's token] (for ponder view); the C loop that runs all rounds in one call
        # keeps no per-round record, so recording takes the round-at-a-time path
        self.record_drafts = record_drafts
        self.target, self.draft = target, draft
        self.k = 4 if self.adaptive else num_draft_tokens
        self.max_ngram = max_ngram
        self.greedy = temperature == 0
        self.options = Options(**options)
        self.options.refuse("speculative decoding", "token_healing", "logprobs")
        stops = list(self.options.stop_token_ids) + ([] if self.options.ignore_eos else list(target.eos_token_ids))
        self.processors: Chain = make_processors(1.0 if self.greedy else temperature, top_k, top_p, min_p,
                                                 extra=processors, stop_token_ids=stops, **settings)

    def _probs(self, procs: Chain, history: list[int], logits: torch.Tensor) -> torch.Tensor:
        """The processed distribution [V] both sides are compared under."""
        if procs.is_identity:
            return logits.softmax(-1)
        return procs(torch.tensor([history]), logits[None])[0].softmax(-1)

    def _verify(self, procs: Chain, dprocs: Chain, ctx: list[int], xs: list[int], qs: list[torch.Tensor | None],
                lg: torch.Tensor, gen: torch.Generator) -> tuple[int, int]:
        """One sequence's accept/reject over its drafts ``xs`` (draft distributions ``qs``;
        None is a point mass) against the target's logits ``lg`` [len(xs) + 1.., V]:
        returns (accepted drafts, the token the target adds). The target's processors
        step along the accepted drafts and the new token; the draft's roll back the
        rejected ones and take the new token."""
        a, new_tok = 0, None
        if self.greedy and procs.is_identity:  # argmax of the raw logits decides everything
            best = lg.argmax(-1).tolist()
            while a < len(xs) and xs[a] == best[a]:
                a += 1
            dprocs.rollback(len(xs) - a)
            return a, best[a]
        for i, x in enumerate(xs):
            p = self._probs(procs, ctx + xs[:i], lg[i])
            q = qs[i]
            if self.greedy:
                ok = int(p.argmax()) == x
            else:
                ratio = float(p[x]) if q is None else min(1.0, float(p[x] / q[x]))
                ok = float(torch.rand((), generator=gen)) < ratio
            if not ok:
                if self.greedy:
                    new_tok = int(p.argmax())
                else:
                    if q is None:  # a point-mass draft: the residual is p without x
                        resid = p.clone()
                        resid[x] = 0
                    else:
                        resid = (p - q).clamp(min=0)
                    resid = resid / resid.sum() if resid.sum() > 0 else p
                    new_tok = int(torch.multinomial(resid, 1, generator=gen))
                break
            procs.accept(torch.tensor([x]))
            a += 1
        if new_tok is None:  # all accepted: a bonus token from the target
            p = self._probs(procs, ctx + xs, lg[a])
            new_tok = int(p.argmax()) if self.greedy else int(torch.multinomial(p, 1, generator=gen))
        procs.accept(torch.tensor([new_tok]))
        dprocs.rollback(len(xs) - a)
        dprocs.accept(torch.tensor([new_tok]))
        return a, new_tok

    @staticmethod
    def _prefill(lm: Any, prompts: list[list[int]], cap: int) -> tuple[Any, list[int]]:
        """Prefill through the model's prefix cache (shared with its engine), so that a
        speculative call reuses and leaves prompt KV like every other call. Returns the
        cache and the tokens reused per prompt."""
        from ..engine.engines import engine_for

        _, cache, hits = engine_for(lm).prefill_cached(prompts, cap)
        return cache, hits

    def _lookup(self, ctx: list[int], k: int) -> list[int]:
        """Prompt lookup: the k tokens after the latest earlier match of the last n-gram."""
        for n in range(min(self.max_ngram, len(ctx) - 1), 0, -1):
            tail = ctx[-n:]
            for start in range(len(ctx) - n - 1, -1, -1):
                if ctx[start : start + n] == tail:
                    follow = ctx[start + n : start + n + k]
                    if follow:
                        return follow
        return []

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        if not isinstance(n, int) or n < 1:
            raise SettingError(f"n must be an integer >= 1; got {n!r}")
        if seed is None:
            seed = random_seed()
        all_ids = [encode_prompt(self.target, p) for p in prompts]
        rows = [(ids, row_generator(seed, j)) for ids in all_ids for j in range(n)]
        flat = self._speculate(rows)
        return [flat[i * n : (i + 1) * n] for i in range(len(all_ids))]

    def generate(self, prompt, n: int = 1, seed: int | None = None) -> list[Generation]:
        return self.generate_batch([prompt], n, seed)[0]

    async def agenerate(self, prompt, n: int = 1, seed: int | None = None) -> list[Generation]:
        import asyncio

        return await asyncio.to_thread(self.generate, prompt, n, seed)

    @torch.inference_mode()
    def _speculate(self, rows: list[tuple[list[int], torch.Generator]]) -> list[Generation]:
        """Speculate for every row at once (prompts x samples), one round at a time, as
        gpt-fast's ``speculative_decode`` does for any batch size. Each round: draft k
        tokens per row, score pending + drafts in one target pass, accept or reject per
        row, roll each row's caches back by its own rejections. A lone greedy row with
        no processors runs the whole round in one call into the C kernel. Returns one
        Generation per row, in order."""
        t0 = time.perf_counter()
        st = self._start(rows)
        while st.alive:
            kk = max(0, min(st.k, min(st.budget[r] - len(st.outs[r]) - 1 for r in st.alive)))
            if self._lone_row(st, kk):
                continue
            res = None
            if st.one_call and len(st.alive) == 1 and kk > 0:  # drafts, target pass, acceptance, rollback: one call
                r = st.alive[0]
                res = self.target.greedy_round(self.draft, st.t_pending[r], st.d_pending[r], kk, st.tcache, st.dcache,
                                               self.draft_weights)
            if res is not None:
                a, xs0, best, lp = res
                st.t_comp[r] += len(st.t_pending[r]) + kk
                st.d_comp[r] += len(st.d_pending[r]) + kk - 1
                verdicts = [(xs0, a, best[a], lp)]
            else:
                verdicts = self._round(st.alive, kk, st.prompts, st.outs, st.t_pending, st.d_pending, st.procs,
                                       st.dprocs, st.gens, st.tcache, st.dcache, st.t_comp, st.d_comp)
            self._apply(st, verdicts)
        return self._results(st, time.perf_counter() - t0)

    def _start(self, rows: list[tuple[list[int], torch.Generator]]) -> "_Batch":
        """Every row's state, and both models' caches holding each prompt but its last
        token (which is "pending")."""
        T, D, B = self.target, self.draft, len(rows)
        prompts = [list(r[0]) for r in rows]
        budget = [self.options.within(T, len(p)).max_tokens for p in prompts]
        procs0 = self.processors
        if not procs0.is_identity:
            procs0 = procs0.fork([0])
            procs0.reset()
        cap = max(map(len, prompts)) + max(budget) + 2 * max(self.k, 8) + 2
        heads = [p[:-1] if len(p) > 1 else p for p in prompts]
        empty = torch.tensor([1 if len(p) == 1 else 0 for p in prompts])  # nothing to prefill: start empty
        tcache, t_hit = self._prefill(T, heads, cap)
        tcache.truncate_(empty)
        dcache, d_hit = None, [0] * B
        if not self.ngram:
            dcache, d_hit = self._prefill(D, heads, cap)
            dcache.truncate_(empty)
        opts = self.options
        st = _Batch(prompts, [r[1] for r in rows], budget, tcache, dcache, t_hit, self.k,
                    set(opts.stop_token_ids) | (set() if opts.ignore_eos else set(T.eos_token_ids)),
                    StopStringMatcher(opts.stop))
        st.procs = [procs0.fork([0]) if not procs0.is_identity else procs0 for _ in range(B)]
        st.dprocs = [procs0.fork([0]) if not procs0.is_identity else procs0 for _ in range(B)]  # the draft's own
        # tokens each row's target and draft computed (billed at each model's own FLOPs)
        st.t_comp = [len(h) - e - t for h, e, t in zip(heads, empty.tolist(), t_hit)]
        st.d_comp = [0 if self.ngram else len(h) - e - d for h, e, d in zip(heads, empty.tolist(), d_hit)]
        st.one_call = not self.ngram and self.greedy and procs0.is_identity and hasattr(T, "greedy_round")
        st.lookup_call = self.ngram and self.greedy and procs0.is_identity and hasattr(T, "ngram_speculate")
        return st

    def _lone_row(self, st: "_Batch", kk: int) -> bool:
        """A lone greedy row: all its rounds in one C call, back at a stop token, the
        budget, or one token short (no room for a draft). False where that cannot run."""
        if len(st.alive) != 1 or st.stopper.stops or self.record_drafts:
            return False
        T, r = self.target, st.alive[0]
        left = st.budget[r] - len(st.outs[r])
        got = None
        if st.lookup_call and len(st.t_pending[r]) == 1:
            got = T.ngram_speculate(st.prompts[r] + st.outs[r], st.k, self.max_ngram, left, sorted(st.stops), st.tcache,
                                    st.credit[r])
        elif st.one_call and kk > 0 and hasattr(T, "greedy_speculate"):
            got = T.greedy_speculate(self.draft, st.t_pending[r], st.d_pending[r], st.k, self.adaptive, left,
                                     sorted(st.stops), st.tcache, st.dcache, self.draft_weights)
        if got is None:
            return False
        st.outs[r] += got["tokens"]
        st.lps[r] += got["logprobs"]
        st.drafted[r] += got["drafted"]
        st.accepted[r] += got["accepted"]
        st.rounds[r] += got["rounds"]
        st.t_comp[r] += got["t_computed"]
        st.d_comp[r] += got.get("d_computed", 0)
        st.credit[r] = got.get("credit", st.credit[r])
        if "t_pending" in got:
            st.t_pending[r], st.d_pending[r] = got["t_pending"], got["d_pending"]
            st.k = got["k"] if self.adaptive else st.k
        if st.outs[r] and st.outs[r][-1] in st.stops:
            st.finish[r], st.stop[r] = "stop", st.outs[r][-1]
        elif len(st.outs[r]) >= st.budget[r]:
            st.finish[r] = "length"
        if st.finish[r] is not None:
            st.alive = []
        return True

    def _apply(self, st: "_Batch", verdicts: list[tuple[list[int], int, int, list[float]]]) -> None:
        """Each alive row's verdict: count it, emit what was accepted and the target's
        token (watching for stops), then retire the finished rows from both caches."""
        keep = []
        for b, (r, (xs, a, new_tok, emitted_lp)) in enumerate(zip(st.alive, verdicts)):
            m = len(xs)
            st.drafted[r] += m
            st.accepted[r] += a
            st.rounds[r] += 1
            if self.record_drafts:
                st.record[r].append([list(xs), a, new_tok])
            # the draft's pending tokens: the last draft too when every draft was accepted
            st.d_pending[r] = (st.d_pending[r] + [new_tok] if m == 0 else [xs[-1], new_tok] if a == m else [new_tok])
            st.t_pending[r] = [new_tok]
            st.emit(r, xs[:a] + [new_tok], emitted_lp, self.target)
            if st.finish[r] is None:
                keep.append(b)
        if self.adaptive:  # +2 after a round every row accepted whole, -1 otherwise (one k per batch)
            whole = all(len(xs) and a == len(xs) for xs, a, _, _ in verdicts)
            st.k = min(st.k + 2, 16) if whole else max(1, st.k - 1)
        if len(keep) < len(st.alive):
            idx = torch.tensor(keep, dtype=torch.long)
            st.tcache.keep_rows_(idx)
            if st.dcache is not None:
                st.dcache.keep_rows_(idx)
            st.alive = [st.alive[b] for b in keep]

    def _results(self, st: "_Batch", wall: float) -> list[Generation]:
        T, D, B = self.target, self.draft, len(st.prompts)
        draft_name = "ngram" if self.ngram else getattr(D, "name", "draft")
        result = []
        for r in range(B):
            ids, n_prompt = st.outs[r], len(st.prompts[r])
            text = T.decode(ids[:-1] if st.finish[r] == "stop" and isinstance(st.stop[r], int) else ids)
            if isinstance(st.stop[r], str):
                text = text[: text.find(st.stop[r])]
            flops = T.flops(st.t_comp[r], n_prompt) + (0.0 if self.ngram else D.flops(st.d_comp[r], n_prompt))
            usage = Usage(prompt_tokens=n_prompt, generated_tokens=len(ids), computed_tokens=st.t_comp[r] + st.d_comp[r],
                          model_calls=st.rounds[r] + (0 if self.ngram else st.drafted[r]), flops=flops, wall_s=wall / B)
            d, a = st.drafted[r], st.accepted[r]
            result.append(Generation(
                text=text, token_ids=ids, logprobs=st.lps[r], finish_reason=st.finish[r] or "length",  # type: ignore[arg-type]
                usage=usage, stop=st.stop[r],
                meta={"strategy": self.strategy, "draft": draft_name, "drafted": d, "accepted": a,
                      "rounds": st.rounds[r], "batch": B, "prefix_cache_hit_tokens": st.t_hit[r],
                      "acceptance_rate": a / d if d else 0.0,
                      **({"draft_rounds": st.record[r]} if self.record_drafts else {})}))
        return result

    def _round(self, alive: list[int], kk: int, prompts, outs, t_pending, d_pending, procs, dprocs, gens,
               tcache, dcache, t_comp, d_comp) -> list[tuple[list[int], int, int, list[float]]]:
        """One general round for the alive rows: returns, per row, (its drafts, how many
        were accepted, the token the target adds, the emitted tokens' log-probabilities),
        with both caches rolled back to what was accepted."""
        T, D = self.target, self.draft
        n = len(alive)
        ctx = [prompts[r] + outs[r] for r in alive]
        # 1. drafts xs[b] (a lookup may find fewer than kk, or none)
        xs: list[list[int]] = [[] for _ in alive]
        qs: list[list[torch.Tensor | None]] = [[] for _ in alive]
        if self.ngram:
            for b, r in enumerate(alive):
                xs[b] = self._lookup(ctx[b], kk) if kk else []
                for x in xs[b]:
                    dprocs[r].accept(torch.tensor([x]))
                qs[b] = [None] * len(xs[b])
        elif kk:
            r0 = alive[0]
            one = (n == 1 and self.greedy and dprocs[r0].is_identity and hasattr(D, "greedy_draft")
                   and (drafts := D.greedy_draft(d_pending[r0], kk, dcache, self.draft_weights)) is not None)
            if one:  # all kk draft passes in one call into the C kernel; greedy drafts are point masses
                xs[0], qs[0] = drafts, [None] * kk
                d_comp[r0] += len(d_pending[r0]) + kk - 1
            else:
                width = max(len(d_pending[r]) for r in alive)
                feed = torch.zeros((n, width), dtype=torch.long)
                for b, r in enumerate(alive):
                    feed[b, : len(d_pending[r])] = torch.tensor(d_pending[r])
                num_new = torch.tensor([len(d_pending[r]) for r in alive])
                lg = D.forward(feed, dcache, num_new, last_only=True)  # [n, V]
                for b, r in enumerate(alive):
                    d_comp[r] += width
                for i in range(kk):
                    nxt = []
                    for b, r in enumerate(alive):
                        if self.greedy and dprocs[r].is_identity:  # a point mass at the argmax
                            q, x = None, int(lg[b].argmax())
                        else:
                            q = self._probs(dprocs[r], ctx[b] + xs[b], lg[b])
                            x = int(q.argmax()) if self.greedy else int(torch.multinomial(q, 1, generator=gens[r]))
                            dprocs[r].accept(torch.tensor([x]))
                        qs[b].append(q)
                        xs[b].append(x)
                        nxt.append(x)
                    if i < kk - 1:
                        lg = D.forward(torch.tensor(nxt)[:, None], dcache)[:, -1]
                        for r in alive:
                            d_comp[r] += 1
        width = max(len(x) for x in xs)  # rows with fewer drafts are padded to the longest
        # 2. the target scores pending + drafts for every row in one pass: [n, width + 1, V]
        t_in = torch.tensor([t_pending[r] + x + [0] * (width - len(x)) for r, x in zip(alive, xs)])
        lg = T.forward(t_in, tcache)
        raw_lp = lg.log_softmax(-1)
        out, cut_t, cut_d = [], [], []
        for b, r in enumerate(alive):
            t_comp[r] += width + 1
            # 3. accept or reject this row's drafts
            a, new_tok = self._verify(procs[r], dprocs[r], ctx[b], xs[b], qs[b], lg[b], gens[r])
            emitted = xs[b][:a] + [new_tok]
            out.append((xs[b], a, new_tok, [float(raw_lp[b, j, t]) for j, t in enumerate(emitted)]))
            # 4. what to roll back: the target holds pending + width drafts; the draft
            # holds its drafts but the last (fed only when every one was accepted)
            cut_t.append(width - a)
            m = len(xs[b])
            cut_d.append(0 if m == 0 or a == m else m - 1 - a)
        tcache.truncate_(torch.tensor(cut_t))
        if dcache is not None and kk:
            dcache.truncate_(torch.tensor(cut_d))
        return out


class _Batch:
    """A speculative call's rows, each list indexed by row: what each emitted, how it
    ended, what it drafted and had accepted, its pending tokens (the caches hold every
    token but those), and what each model computed for it."""

    def __init__(self, prompts: list[list[int]], gens: list[torch.Generator], budget: list[int], tcache: Any,
                 dcache: Any, t_hit: list[int], k: int, stops: set[int], stopper: StopStringMatcher) -> None:
        B = len(prompts)
        self.prompts, self.gens, self.budget, self.tcache, self.dcache, self.t_hit = prompts, gens, budget, tcache, \
            dcache, t_hit
        self.k, self.stops, self.stopper = k, stops, stopper
        self.outs: list[list[int]] = [[] for _ in range(B)]
        self.lps: list[list[float]] = [[] for _ in range(B)]
        self.finish: list[str | None] = [None] * B
        self.stop: list[str | int | None] = [None] * B
        self.drafted, self.accepted, self.rounds = [0] * B, [0] * B, [0] * B
        self.record: list[list[list[Any]]] = [[] for _ in range(B)]  # per row: [drafts, accepted, new token] a round
        self.t_pending = [[p[-1]] for p in prompts]
        self.d_pending = [[p[-1]] for p in prompts]
        self.credit = [1.0] * B  # each row's recent acceptance of lookup drafts (the C loop drafts while it pays)
        self.alive = list(range(B))  # batch position -> row
        self.procs: list[Any] = []
        self.dprocs: list[Any] = []
        self.t_comp: list[int] = []
        self.d_comp: list[int] = []
        self.one_call = self.lookup_call = False

    def emit(self, r: int, tokens: list[int], logprobs: list[float], lm: Any) -> None:
        """Append row r's accepted tokens until a stop token, the budget or a stop string."""
        for j, tok in enumerate(tokens):
            self.outs[r].append(tok)
            self.lps[r].append(logprobs[j])
            if tok in self.stops:
                self.finish[r], self.stop[r] = "stop", tok
                break
            if len(self.outs[r]) >= self.budget[r]:
                self.finish[r] = "length"
                break
        if self.finish[r] is None and self.stopper.stops:
            hit = self.stopper.find(lm.decode(self.outs[r]), 0)
            if hit is not None:
                self.finish[r], self.stop[r] = "stop", hit[1]
