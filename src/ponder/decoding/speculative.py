"""Speculative decoding with a draft model (Leviathan et al. 2023; Chen et al. 2023).

The draft proposes ``k`` tokens; the target scores all of them in one forward pass;
each proposal x_i is accepted with probability min(1, p(x_i)/q(x_i)), and at the first
rejection a token is drawn from the residual norm(max(0, p − q)). If all k are
accepted the target's next distribution gives a bonus token. The output distribution
is exactly the target's (lossless); under greedy decoding acceptance means "the
target's argmax equals the draft's", so the output is token-for-token plain greedy.

Rejected tokens are rolled back by truncating both KV caches (``KVCache.truncate_``).
This version decodes one sequence at a time; the engine issue batches it.
"""

from __future__ import annotations

import os
import time
from typing import Any, Sequence

import torch

from ..protocols import Access, GeneratorBase, require_access
from ..types import Generation, Usage
from .generate import MAX_SEED, Options, row_generator
from .processors import Chain, SettingError, make_processors
from .stopping import StopStringMatcher


class Speculative(GeneratorBase):
    """Speculative decoding of ``target`` with ``draft``; ``temperature`` 0 is greedy."""

    strategy = "speculative"

    def __init__(self, target: Any, draft: Any, num_draft_tokens: int = 4, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0, **options: Any) -> None:
        require_access(target, Access.LOGITS, "speculative decoding")
        require_access(draft, Access.LOGITS, "speculative decoding (draft)")
        if target.vocab_size != draft.vocab_size:
            raise SettingError(f"the draft model must share the target's tokenizer (vocab {draft.vocab_size} != {target.vocab_size})")
        if not isinstance(num_draft_tokens, int) or num_draft_tokens < 1:
            raise SettingError(f"num_draft_tokens must be an integer >= 1; got {num_draft_tokens!r}")
        if not isinstance(temperature, (int, float)) or temperature < 0:
            raise SettingError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
        self.target, self.draft, self.k = target, draft, num_draft_tokens
        self.greedy = temperature == 0
        self.processors: Chain = make_processors(1.0 if self.greedy else temperature, top_k, top_p, min_p)
        self.options = Options(**options)

    def _probs(self, logits: torch.Tensor) -> torch.Tensor:
        """The distribution both models are compared under: [N, V]."""
        return self.processors(None, logits).softmax(-1)

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        if not isinstance(n, int) or n < 1:
            raise SettingError(f"n must be an integer >= 1; got {n!r}")
        if seed is None:
            seed = int.from_bytes(os.urandom(8), "little") % MAX_SEED
        out = []
        for p in prompts:
            ids = self.target.encode(p) if isinstance(p, str) else list(p)
            if not ids:
                raise SettingError("the prompt is empty; give at least one token")
            out.append([self._one(ids, row_generator(seed, j)) for j in range(n)])
        return out

    def generate(self, prompt, n: int = 1, seed: int | None = None) -> list[Generation]:
        return self.generate_batch([prompt], n, seed)[0]

    async def agenerate(self, prompt, n: int = 1, seed: int | None = None) -> list[Generation]:
        import asyncio

        return await asyncio.to_thread(self.generate, prompt, n, seed)

    @torch.inference_mode()
    def _one(self, prompt: list[int], gen: torch.Generator) -> Generation:
        t0 = time.perf_counter()
        T, D, k = self.target, self.draft, self.k
        opts = self.options
        stops = set(opts.stop_token_ids) | (set() if opts.ignore_eos else set(T.eos_token_ids))
        stopper = StopStringMatcher(opts.stop)
        # Both caches hold every token but the last one emitted, which is "pending".
        _, tcache = T.prefill([prompt[:-1]] if len(prompt) > 1 else [prompt], capacity=len(prompt) + opts.max_tokens + k + 2)
        _, dcache = D.prefill([prompt[:-1]] if len(prompt) > 1 else [prompt], capacity=len(prompt) + opts.max_tokens + k + 2)
        if len(prompt) == 1:  # nothing to prefill: start from empty caches
            tcache.truncate_(1)
            dcache.truncate_(1)
        t_pending, d_pending = [prompt[-1]], [prompt[-1]]
        out: list[int] = []
        logprobs: list[float] = []
        drafted = accepted = t_computed = d_computed = calls = 0
        t_computed += max(len(prompt) - 1, 0)
        d_computed += max(len(prompt) - 1, 0)
        finish, stop = "length", None
        while len(out) < opts.max_tokens:
            kk = min(k, opts.max_tokens - len(out))
            # 1. draft kk tokens
            q_rows, xs = [], []
            feed = list(d_pending)
            for _ in range(kk):
                lg = D.forward(torch.tensor([feed]), dcache)[0, -1]
                d_computed += len(feed)
                q = self._probs(lg[None])[0]
                x = int(q.argmax()) if self.greedy else int(torch.multinomial(q, 1, generator=gen))
                q_rows.append(q)
                xs.append(x)
                feed = [x]
            drafted += kk
            # 2. the target scores pending + drafts in one pass: rows predict x_1..x_kk, bonus
            t_in = t_pending + xs
            lg = T.forward(torch.tensor([t_in]), tcache)[0, len(t_pending) - 1 :]  # [kk+1, V]
            t_computed += len(t_in)
            calls += 1
            p_rows = self._probs(lg)
            raw_lp = lg.log_softmax(-1)
            # 3. accept / reject
            a = 0
            new_tok = None
            for i, x in enumerate(xs):
                p, q = p_rows[i], q_rows[i]
                if self.greedy:
                    ok = int(p.argmax()) == x
                else:
                    ok = float(torch.rand((), generator=gen)) < min(1.0, float(p[x] / q[x]))
                if not ok:
                    if self.greedy:
                        new_tok = int(p.argmax())
                    else:
                        resid = (p - q).clamp(min=0)
                        resid = resid / resid.sum() if resid.sum() > 0 else p
                        new_tok = int(torch.multinomial(resid, 1, generator=gen))
                    break
                a += 1
            if new_tok is None:  # all accepted: a bonus token from the target
                p = p_rows[kk]
                new_tok = int(p.argmax()) if self.greedy else int(torch.multinomial(p, 1, generator=gen))
            accepted += a
            emitted = xs[:a] + [new_tok]
            # 4. roll back what the caches hold beyond the accepted prefix
            tcache.truncate_(kk - a)  # target holds pending + all kk drafts
            if a == kk:
                d_pending = [xs[-1], new_tok]
            else:
                dcache.truncate_(kk - 1 - a)  # the draft holds x_1..x_{kk-1}; keep x_1..x_a
                d_pending = [new_tok]
            t_pending = [new_tok]
            # 5. emit, watching for stops
            for j, tok in enumerate(emitted):
                out.append(tok)
                logprobs.append(float(raw_lp[j, tok]))
                if tok in stops:
                    finish, stop = "stop", tok
                    break
                if len(out) >= opts.max_tokens:
                    break
            if finish == "stop":
                break
            if stopper.stops:
                text = T.decode(out)
                hit = stopper.find(text, 0)
                if hit is not None:
                    finish, stop = "stop", hit[1]
                    break
        text = T.decode(out)
        if isinstance(stop, str):
            text = text[: text.find(stop)]
        wall = time.perf_counter() - t0
        usage = Usage(
            prompt_tokens=len(prompt), generated_tokens=len(out), computed_tokens=t_computed + d_computed,
            model_calls=calls + drafted, flops=T.flops(t_computed, len(prompt)) + D.flops(d_computed, len(prompt)),
            wall_s=wall,
        )
        return Generation(text=text, token_ids=out, logprobs=logprobs, finish_reason=finish, usage=usage, stop=stop,
                          meta={"strategy": self.strategy, "drafted": drafted, "accepted": accepted,
                                "acceptance_rate": accepted / drafted if drafted else 0.0})
