"""One decode step of the engine's running batch (``Decoding``, a part of ``Engine``).

A step takes the pending next-token logits of every physical row ([B, V]), runs each
request's processors and picks a token per live sample with that sample's own draws
(grouping requests whose picks cannot differ), checks stop tokens, stop strings and
max_tokens, forks rows whose samples part ways and retires finished ones, then runs
one forward pass for every row that goes on. When the batch is one greedy row that
needs nothing from Python between tokens, the model decodes several tokens in one
call instead (multi-step decoding).

It reads and writes the engine's state: ``lm``, ``_active`` (running requests),
``_cache`` and ``_logits``, ``steps``, ``multi_step_calls``, ``peak_rows``,
``peak_kv_bytes``; and calls back ``_finish``, ``_go_idle``, ``kv_bytes_in_use``.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from ..types import Generation
from .requests import DRAW_BLOCK, Request, event, invalid_logits_error


class Decoding:
    """The decode step of ``Engine`` (see the module's docstring)."""

    # Tokens a multi-step call may decode (see _decode_steps): enough to amortise the
    # return to Python; few enough that a request arriving meanwhile waits ~ms. 0: off.
    MULTI_STEP = 16

    def _multi_step_request(self) -> Request | None:
        """The one running request if no choice needs Python between its tokens: a
        single greedy row whose processors at most ban tokens for a while (min_tokens),
        no top logprobs or token healing, nobody waiting to join or leave, and a model
        that can decode several steps per call. Stop strings and streams are checked
        after the call (the tokens past a stop string are dropped)."""
        if self.MULTI_STEP < 1 or len(self._active) != 1 or self._waiting or self._withdrawn or self._expected > 0:
            return None
        r = self._active[0]
        if (r.n != 1 or len(r.phys) != 1 or not getattr(r.pick, "is_argmax", False) or r.procs.banned() is None
                or r.top_logprobs or r.healed or not hasattr(self.lm, "greedy_steps")
                or r.max_new - len(r.rows[0].ids) < 3):
            return None
        return r

    def _decode_steps(self, r: Request) -> bool:
        """Multi-step decoding (vLLM's multi-step scheduling): pick the next token as a
        step would, then let the model decode up to MULTI_STEP more greedily in one
        call, which stops after a stop token and does not feed a token that reaches
        max_tokens. The tokens are then taken as steps take them (stop tokens, stop
        strings in the text, max_tokens, stream events), so outputs equal one step per
        token; where a stop string ends the row inside the call, the tokens after it are
        dropped, and billed as one step per token would bill (not at all). False (nothing done)
        when the model's kernel cannot serve the cache."""
        t0 = time.perf_counter()
        row = r.rows[0]
        left = r.max_new - len(row.ids) - 1  # tokens allowed after this step's
        n = min(self.MULTI_STEP, left)
        lg = self._logits  # [1, V]
        ban, ban_steps = r.procs.banned()  # ids forbidden for the next ban_steps tokens (min_tokens)
        scores = lg.index_fill(-1, torch.tensor(ban, dtype=torch.long), -math.inf) if ban and ban_steps else lg
        if not math.isfinite(float(scores.amax())):  # the step path names the fault
            return False
        first = int(scores.argmax(-1))  # the greedy pick (it reads no draw)
        new, lps, logits = [first], [float(lg.log_softmax(-1)[0, first])], None
        if first not in r.stop_ids:
            got = self.lm.greedy_steps(first, n, self._cache, sorted(r.stop_ids), feed_last=n < left, ban=ban,
                                       ban_steps=ban_steps - 1)
            if got is None:
                return False
            toks, more, logits = got
            self.multi_step_calls += 1
            new += toks
            lps += more
        self.peak_rows = max(self.peak_rows, 1)
        # The bill is what one step per token would have computed: each kept token that does
        # not end the row is fed once. Tokens the call decoded past a stop string are thrown
        # away and not billed, so a bill does not depend on whether the request happened to
        # be alone in the batch (only then does this path run).
        fed = len(new) - 1 + (logits is not None)  # every token fed: all but a last that was not
        for i, (t, lp_t) in enumerate(zip(new, lps)):  # as _decode takes a token, one after another
            row.ids.append(t)
            row.logprobs.append(lp_t)
            self.steps += 1
            t_ = torch.tensor([t])
            self._extend_history(r, None, t_)
            if not r.procs.is_identity:
                r.procs.accept(t_)
            if self._take(r, row, t, len(row.ids) >= r.max_new):
                fed = i  # the tokens before the one that ended the row
                break
        row.computed += fed
        r.wall += time.perf_counter() - t0
        if row.finish is None:
            self._logits = logits
            return True
        if hasattr(self._cache, "nbytes_used"):
            self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes_in_use())
        self._finish(r, row, 0)
        r.phys = []
        self._active = []
        self._go_idle()
        return True

    @staticmethod
    def _record_top(r: Request, lg: torch.Tensor) -> None:
        """Each live sample's k most likely tokens at this step (the model's own log-probabilities)."""
        vals, ids = lg.log_softmax(-1).topk(r.top_logprobs, dim=-1)  # [P, k]
        rows = range(lg.shape[0]) if len(r.samples) == lg.shape[0] else r.owner.tolist()
        v, i = vals.tolist(), ids.tolist()
        for s, p in zip(r.samples, rows):
            row = r.rows[s]
            if row.top is None:
                row.top = []
            row.top.append(dict(zip(i[p], v[p])))

    def _pick(self, r: Request, lg: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Run the request's processors on its rows' logits lg [P, V] and pick one token
        per live sample: (tokens [samples], the model's log-probabilities of them)."""
        scores = lg if r.procs.is_identity else r.procs(r.history[:, : r.hist_len], lg)
        # NaN and +inf propagate through max, and a row with every token masked has a
        # max of -inf: one reduction finds all three (NaN fails both comparisons).
        top = scores.amax(-1).tolist()
        if not (-math.inf < (top[0] if len(top) == 1 else sum(top)) < math.inf):  # a sum keeps NaN and +-inf
            raise invalid_logits_error(r.procs, r.history[:, : r.hist_len], lg)
        draws = self._draws(r)  # [samples]
        if len(r.samples) == lg.shape[0]:  # one sample per row: no gather
            tokens = r.pick(scores, draws)  # [samples]
            lp = lg.log_softmax(-1).gather(-1, tokens[:, None])[:, 0].tolist()  # (logsumexp is 3x slower)
        else:
            tokens = r.pick(scores[r.owner], draws)
            lp = lg.log_softmax(-1)[r.owner].gather(-1, tokens[:, None])[:, 0].tolist()
        return tokens, lp

    def _pick_together(self, logits: torch.Tensor) -> dict[int, tuple[torch.Tensor, list[float]]]:
        """Pick for several requests at once where that cannot change a token: requests
        with the same pick function and processors that act alike
        on every row without reading history (equal ``batch_key``), e.g. the many small
        step requests of a tree search. Row i's choice depends only on row i's logits
        and draw, so the tokens equal per-request picking. A group whose scores are not
        all finite, or whose processors raise, is left to ``_pick``, which names the
        request at fault. Returns {id(request): (tokens, log-probabilities)}."""
        groups: dict[Any, list[tuple[Request, torch.Tensor]]] = {}
        start = 0
        for r in self._active:
            P = len(r.phys)
            if not r.top_logprobs:
                key = r.procs.batch_key()
                if key is not None:  # each live sample reads its physical row
                    rows = torch.arange(start, start + P) if len(r.samples) == P else start + r.owner
                    groups.setdefault((r.pick, key), []).append((r, rows))
            start += P
        out: dict[int, tuple[torch.Tensor, list[float]]] = {}
        for (pick, _), members in groups.items():
            if len(members) < 2:
                continue
            lg = logits.index_select(0, torch.cat([rows for _, rows in members]))  # [samples of the group, V]
            procs = members[0][0].procs
            try:
                scores = lg if procs.is_identity else procs(None, lg)
            except Exception:
                continue
            if not bool(torch.isfinite(scores.amax(-1)).all()):
                continue
            draws = torch.cat([self._draws(r) for r, _ in members])  # [samples]
            tokens = pick(scores, draws)
            lp = lg.log_softmax(-1).gather(-1, tokens[:, None])[:, 0].tolist()
            k = 0
            for r, rows in members:
                m = rows.shape[0]
                out[id(r)] = (tokens[k : k + m], lp[k : k + m])
                k += m
        return out

    def _decode(self) -> None:
        """One decode step for every active request: pick each row's token and plan what
        follows (stops, forks, retirements), bill that work, apply the plans, run the
        next forward pass, and bill it to the samples it served."""
        t0 = time.perf_counter()
        logits = self._logits  # [B, V], one row per physical row
        B = logits.shape[0]
        self.peak_rows = max(self.peak_rows, B)
        picked = self._pick_together(logits) if len(self._active) > 1 else {}
        n_samples = sum(len(r.samples) for r in self._active)
        plans, start = [], 0
        for r in self._active:
            P = len(r.phys)
            plans.append(self._plan(r, start, logits[start : start + P], picked.get(id(r))))
            start += P
        # Bill the step so far (processors, picks, stop checks) to every live sample.
        t1 = time.perf_counter()
        share = (t1 - t0) / max(1, n_samples)
        for r in self._active:
            r.wall += share
        if any(plan[3] for plan in plans) and hasattr(self._cache, "nbytes_used"):
            # KV only grows between retirements: its peak is just before one
            self.peak_kv_bytes = max(self.peak_kv_bytes, self.kv_bytes_in_use())
        parents: list[int] = []  # global physical row each new physical row continues
        next_tokens: list[torch.Tensor] = []  # [rows] per request, in batch order
        finishing: list[Generation] = []
        for plan in plans:
            self._apply_plan(plan, parents, next_tokens, finishing)
        self._active = [r for r in self._active if r.phys and r.error is None]
        self.steps += 1
        if not self._active:
            self._go_idle()
        else:
            if len(parents) != B or parents != list(range(B)):
                self._cache.reorder_(torch.tensor(parents, dtype=torch.long))
            fed = next_tokens[0] if len(next_tokens) == 1 else torch.cat(next_tokens)
            self._logits = self.lm.step(fed.long(), self._cache)
        self._bill_rest(time.perf_counter() - t1, finishing)

    def _plan(self, r: Request, start: int, lg: torch.Tensor, got: Any) -> tuple[Any, ...]:
        """Request r's tokens this step (lg: its rows' logits [P, V]; ``got``: picked
        with the batch) and what follows: (r, its first row, split, finished, tokens).
        ``split`` is None when every row simply continues (``tokens`` then holds them);
        else (parent row, token) -> the samples that continue there, and ``finished``
        the (sample, row) pairs that ended. A failure is this request's alone."""
        P, samples, rows = len(r.phys), r.samples, r.rows
        try:
            tokens, lp = got if got is not None else self._pick(r, lg)
            if r.top_logprobs:
                self._record_top(r, lg)
        except Exception as e:  # this request fails alone: its rows leave the batch
            r.error = e
            return (r, start, {}, (), None)
        toks = tokens.tolist()
        for s, t, l in zip(samples, toks, lp):
            row = rows[s]
            row.ids.append(t)
            row.logprobs.append(l)
        # every live sample of a request has drawn the same number of tokens
        at_max = len(rows[samples[0]].ids) >= r.max_new
        if len(samples) == P and not (at_max or r.needs_text) and r.stop_ids.isdisjoint(toks):
            return (r, start, None, (), tokens)  # every row continues as it is
        split: dict[tuple[int, int], list[int]] = {}
        finished: list[tuple[int, int]] = []  # (sample, global row)
        owner = range(P) if len(samples) == P else r.owner.tolist()
        for p, s, t in zip(owner, samples, toks):
            if not self._take(r, rows[s], t, at_max):
                split.setdefault((p, t), []).append(s)
            else:
                finished.append((s, start + p))
        return (r, start, split, finished, None)

    def _apply_plan(self, plan: tuple[Any, ...], parents: list[int], next_tokens: list[torch.Tensor],
                    finishing: list[Generation]) -> None:
        """Retire a plan's finished samples (their row still holds their KV), then
        regroup the rest: the rows they continue from go to ``parents``, their tokens to
        ``next_tokens``."""
        r, base, split, finished, tokens = plan
        if split is None:  # unchanged rows, each computing its sample's next token
            self._extend_history(r, None, tokens)
            if not r.procs.is_identity:
                r.procs.accept(tokens)
            for s in r.samples:
                r.rows[s].computed += 1
            parents += range(base, base + len(r.samples))
            next_tokens.append(tokens)
            return
        stored: set[int] = set()
        for s, g_row in finished:  # samples finishing on one physical row share its KV: store it once
            finishing.append(self._finish(r, r.rows[s], g_row, store=g_row not in stored))
            stored.add(g_row)
        if not split:
            r.phys = []
            return
        local = [p for p, _ in split]
        toks_t = torch.tensor([t for _, t in split])
        same_rows = local == list(range(len(r.phys)))
        self._extend_history(r, None if same_rows else local, toks_t)
        if not r.procs.is_identity:
            if not same_rows:
                r.procs = r.procs.fork(local)
            r.procs.accept(toks_t)
        r.phys = list(split.values())
        r.samples = [s for group in r.phys for s in group]
        r.sample_index = None if r.samples == list(range(r.n)) else torch.tensor(r.samples)
        if len(r.samples) != len(r.phys):
            r.owner = torch.tensor([p for p, group in enumerate(r.phys) for _ in group])
        for group in r.phys:  # the row computes its next token once, billed to its first sample
            r.rows[group[0]].computed += 1
        parents += [base + p for p in local]
        next_tokens.append(toks_t)

    def _bill_rest(self, rest: float, finishing: list[Generation]) -> None:
        """Bill the rest of a step (retirements, detokenising, the forward pass) to the
        samples it served: those going on, or, when none is left, those that just finished."""
        live = sum(len(r.samples) for r in self._active)
        if live:
            for r in self._active:
                r.wall += rest / live
        elif finishing:
            for g in finishing:
                g.usage.wall_s += rest / len(finishing)

    @staticmethod
    def _take(r: Request, row: Any, t: int, at_max: bool) -> bool:
        """After ``t`` joined ``row``: does the row end here (a stop token, a stop string
        in its text, max_tokens)? If not, a stream gets the text that is now safe (no
        stop string can still start in it). Returns whether the row finished."""
        if r.first_token_at is None:
            r.first_token_at = time.perf_counter()
        if t in r.stop_ids:
            row.finish, row.stop = "stop", t
        elif row.detok is not None:
            delta = row.detok.add(t)
            if delta:
                old = len(row.text)
                row.text += delta
                hit = r.stopper.find(row.text, old)
                if hit is not None:
                    row.text = row.text[: hit[0]]
                    row.finish, row.stop = "stop", hit[1]
        if row.finish is None and at_max:
            row.finish = "length"
        if row.finish is not None:
            return True
        if r.stream:
            safe = r.stopper.safe_length(row.text)
            if safe > row.released:
                r.events.append(event(r, row, row.text[row.released : safe]))
                row.released = safe
        return False

    @staticmethod
    def _draws(r: Request) -> torch.Tensor:
        """One U(0, 1) draw per live sample [samples], float64, each from its own
        stream; read from the samples' generators DRAW_BLOCK at a time."""
        col = r.steps % DRAW_BLOCK
        if col == 0:
            r.draws = torch.stack([torch.rand(DRAW_BLOCK, generator=g, dtype=torch.float64) for g in r.gens])
        r.steps += 1
        assert r.draws is not None
        return r.draws[:, col] if r.sample_index is None else r.draws[r.sample_index, col]

    @staticmethod
    def _extend_history(r: Request, rows: list[int] | None, tokens: torch.Tensor) -> None:
        """Append one token to each physical row's history; ``rows`` (the parent row of
        each new row) when the rows forked or retired."""
        h = r.history
        if rows is not None:
            h = h[torch.tensor(rows)]
        if r.hist_len == h.shape[1]:
            h = torch.cat([h, torch.zeros_like(h)], dim=1)
        h[:, r.hist_len] = tokens
        r.history = h
        r.hist_len += 1
