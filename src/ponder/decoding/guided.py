"""Decoding towards a target defined by a scorer: reward-guided token decoding
(FUDGE-style) and sequential Monte Carlo (SMC) steering.

* ``RewardGuidance`` (Yang & Klein, 2021, FUDGE; Deng & Raffel, 2023, RAD) is a
  processor: it keeps the ``top_k`` tokens and adds ``weight · log P(a | prefix + v)``
  from a prefix scorer to each, so greedy or sampling decodes from
  p(v | x) · P(a | x, v)^weight over the candidates. Any scorer
  ``(list of token-id sequences) -> [N] log-probabilities`` works;
  ``reward_prefix_scorer(rm)`` reads ponder's reward model at the last token.
* ``SMC`` (Lew et al., 2023, "Sequential Monte Carlo steering of LLMs"): N particles
  propose tokens from the model; whenever a particle reaches a boundary (a newline,
  its end, or every ``every`` tokens) its weight is multiplied by the potential's
  change φ(x_≤t) / φ(x_≤s); when the effective sample size falls below
  ``ess_threshold · N`` the particles are resampled (systematic resampling) and their
  KV caches forked to match. The result is a weighted sample from
  p(y | x) · φ(y) (normalised), not from p alone.
"""

from __future__ import annotations

import math
import time
from typing import Any, Callable, Sequence

import torch

from ..protocols import Access, GeneratorBase, require_access
from ..types import Generation, Usage
from .generate import Options, encode_prompt, random_seed, row_generator
from .common_adapters import NEG_INF, Processor, SettingError, _check

PrefixScorer = Callable[[list[list[int]]], torch.Tensor]


def reward_prefix_scorer(rm: Any, batch_size: int = 64) -> PrefixScorer:
    """log σ(reward logit at the last token) of each sequence under a ponder reward
    model: the probability that the prefix is on a correct path."""

    @torch.inference_mode()
    def score(seqs: list[list[int]]) -> torch.Tensor:
        out = []
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            logits = rm.token_logits(chunk)
            out += [float(torch.nn.functional.logsigmoid(lg[-1])) for lg in logits]
        return torch.tensor(out)

    return score


class RewardGuidance(Processor):
    """Reweight the ``top_k`` candidates by a prefix scorer: logit + weight · log P(a | prefix, v);
    every other token is dropped. weight = 0 is the identity."""

    def __init__(self, scorer: PrefixScorer, top_k: int = 8, weight: float = 1.0) -> None:
        _check(callable(scorer), "scorer must be a callable (list of token-id lists) -> tensor of log-probabilities")
        _check(isinstance(top_k, int) and top_k >= 1, f"top_k must be an integer >= 1; got {top_k!r}")
        _check(isinstance(weight, (int, float)) and math.isfinite(weight) and weight >= 0,
               f"weight must be a finite number >= 0 (0 = off); got {weight!r}")
        self.scorer, self.top_k, self.weight = scorer, top_k, float(weight)
        self.is_identity = self.weight == 0.0
        self.calls = 0  # scorer sequences evaluated (for compute accounting)

    def __call__(self, tokens, logits):
        B, V = logits.shape
        k = min(self.top_k, V)
        top = torch.topk(logits, k, dim=-1).indices  # [B, k]
        seqs = []
        for b in range(B):
            prefix = [t for t in tokens[b].tolist() if t >= 0]
            seqs += [prefix + [v] for v in top[b].tolist()]
        bonus = self.scorer(seqs).to(logits.dtype).reshape(B, k)  # [B, k]
        self.calls += len(seqs)
        out = torch.full_like(logits, NEG_INF)
        out.scatter_(1, top, logits.gather(1, top) + self.weight * bonus)
        return out


def ess(log_w: torch.Tensor) -> float:
    """Effective sample size of normalised-or-not log weights: (Σw)² / Σw²."""
    w = (log_w - log_w.max()).exp()
    return float(w.sum() ** 2 / (w * w).sum())


def systematic_resample(log_w: torch.Tensor, generator: torch.Generator) -> list[int]:
    """Indices drawn by systematic resampling (one uniform, N evenly spaced points)."""
    n = log_w.shape[0]
    w = (log_w - log_w.max()).exp().double()
    cdf = (w / w.sum()).cumsum(0)
    u = (torch.rand((), generator=generator, dtype=torch.float64) + torch.arange(n, dtype=torch.float64)) / n
    return torch.searchsorted(cdf, u.clamp(max=cdf[-1].item() - 1e-12)).clamp(max=n - 1).tolist()


class SMC(GeneratorBase):
    """Sequential Monte Carlo steering (Lew et al., 2023) towards p(y|x)·φ(y).

    ``potential(list of token-id sequences) -> [N] log φ`` (e.g.
    ``reward_prefix_scorer(rm)``) is evaluated at each particle's boundaries: a newline
    (``boundary="line"``), its end, or every ``every`` tokens (``boundary="tokens"``).
    Proposals are the model at ``temperature``; with τ ≠ 1 the weights include the
    correction p/q, so the target stays p·φ. ``generate(prompt, n)`` returns the ``n``
    particles of highest final weight; ``score`` is each one's normalised weight."""

    strategy = "smc"

    def __init__(self, lm: Any, potential: Callable[[list[list[int]]], torch.Tensor], num_particles: int = 16,
                 boundary: str = "line", every: int = 8, ess_threshold: float = 0.5, temperature: float = 1.0,
                 **options: Any) -> None:
        require_access(lm, Access.LOGITS, "sequential Monte Carlo")
        _check(callable(potential), "potential must be a callable (list of token-id lists) -> tensor of log-potentials")
        _check(isinstance(num_particles, int) and num_particles >= 1, f"num_particles must be an integer >= 1; got {num_particles!r}")
        _check(boundary in ("line", "tokens"), f"boundary must be 'line' or 'tokens'; got {boundary!r}")
        _check(isinstance(every, int) and every >= 1, f"every must be an integer >= 1; got {every!r}")
        _check(isinstance(ess_threshold, (int, float)) and 0 <= ess_threshold <= 1,
               f"ess_threshold must be in [0, 1] (0 = never resample, 1 = always); got {ess_threshold!r}")
        _check(isinstance(temperature, (int, float)) and temperature > 0, f"temperature must be > 0; got {temperature!r}")
        self.lm, self.potential, self.N = lm, potential, num_particles
        self.boundary, self.every, self.ess_threshold, self.temperature = boundary, every, float(ess_threshold), float(temperature)
        self.options = Options(**options)
        self.options.refuse("SMC", "stop", "token_healing", "logprobs")  # particles resample at step boundaries, not stop strings
        self._newline_ids = {t for t in range(lm.vocab_size) if "\n" in lm.decode([t])}

    def run(self, prompt_ids: list[int], seed: int) -> tuple[list[Generation], torch.Tensor, Usage, int]:
        """All particles, their final log weights, the bill, and how many resamplings."""
        lm, N = self.lm, self.N
        opt = self.options.within(lm, len(prompt_ids))
        t0 = time.perf_counter()
        stop_ids = set(opt.stop_token_ids) | (set() if opt.ignore_eos else set(lm.eos_token_ids))
        gen = row_generator(seed, 0)
        logits, cache = lm.prefill([prompt_ids], capacity=len(prompt_ids) + opt.max_tokens + 1)
        cache = cache.fork([0] * N)
        logits = logits.expand(N, -1)
        toks: list[list[int]] = [[] for _ in range(N)]
        lps: list[list[float]] = [[] for _ in range(N)]
        done = [False] * N
        log_w = torch.zeros(N, dtype=torch.float64)
        last_phi = torch.zeros(N, dtype=torch.float64)
        since = [0] * N
        resamples = calls = scored = 0
        computed = len(prompt_ids)
        for step in range(opt.max_tokens):
            logp = logits.float().log_softmax(-1)  # [N, V] the model
            q = (logits.float() / self.temperature).log_softmax(-1)  # the proposal
            new = torch.multinomial(q.exp(), 1, generator=gen)[:, 0]
            at_boundary = []
            for i in range(N):
                if done[i]:
                    continue
                t = int(new[i])
                toks[i].append(t)
                lps[i].append(float(logp[i, t]))
                log_w[i] += float(logp[i, t] - q[i, t])  # importance correction p/q (0 when tau = 1)
                since[i] += 1
                end = t in stop_ids or step + 1 == opt.max_tokens
                done[i] = end
                hit = t in self._newline_ids if self.boundary == "line" else since[i] >= self.every
                if end or hit:
                    at_boundary.append(i)
                    since[i] = 0
            if at_boundary:
                phi = self.potential([list(prompt_ids) + toks[i] for i in at_boundary]).double()
                scored += len(at_boundary)
                idx = torch.tensor(at_boundary)
                log_w[idx] += phi - last_phi[idx]
                last_phi[idx] = phi
            if all(done):
                break
            if self.ess_threshold > 0 and ess(log_w) < self.ess_threshold * N:
                pick = systematic_resample(log_w, gen)
                cache.reorder_(pick)
                toks = [list(toks[j]) for j in pick]
                lps = [list(lps[j]) for j in pick]
                done = [done[j] for j in pick]
                since = [since[j] for j in pick]
                last_phi = last_phi[pick]
                new = new[pick]
                log_w = torch.full((N,), float(torch.logsumexp(log_w, 0) - math.log(N)), dtype=torch.float64)
                resamples += 1
            feed = torch.tensor([toks[i][-1] if toks[i] else 0 for i in range(N)])
            logits = lm.step(feed, cache)
            calls += 1
            computed += sum(not d for d in done)
        gens = []
        for i in range(N):
            ids = toks[i]
            finish = "stop" if ids and ids[-1] in stop_ids else "length"
            text = lm.decode(ids[:-1] if finish == "stop" else ids)
            gens.append(Generation(text, ids, lps[i], finish, stop=ids[-1] if finish == "stop" else None))  # type: ignore[arg-type]
        usage = Usage(prompt_tokens=len(prompt_ids), generated_tokens=sum(len(t) for t in toks), computed_tokens=computed,
                      model_calls=calls + 1, flops=lm.flops(computed, 0), wall_s=time.perf_counter() - t0)
        return gens, log_w, usage, resamples

    def generate_batch(self, prompts: Sequence[str | Sequence[int]], n: int = 1, seed: int | None = None) -> list[list[Generation]]:
        if not isinstance(n, int) or n < 1 or n > self.N:
            raise SettingError(f"n must be in [1, num_particles={self.N}]; got {n!r}")
        if seed is None:
            seed = random_seed()
        out = []
        for p in prompts:
            ids = encode_prompt(self.lm, p)
            gens, log_w, usage, resamples = self.run(ids, seed)
            w = (log_w - torch.logsumexp(log_w, 0)).exp()
            order = torch.argsort(w, descending=True).tolist()[:n]
            best = []
            for r, i in enumerate(order):
                g = gens[i]
                g.score = float(w[i])
                g.usage = usage if r == 0 else Usage()
                g.meta.update(strategy=self.strategy, particles=self.N, resamples=resamples, weight=float(w[i]))
                best.append(g)
            out.append(best)
        return out

    async def agenerate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        import asyncio

        return (await asyncio.to_thread(self.generate_batch, [prompt], n, seed))[0]

    def generate(self, prompt: str, n: int = 1, seed: int | None = None) -> list[Generation]:
        return self.generate_batch([prompt], n, seed)[0]
