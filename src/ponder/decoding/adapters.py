"""More sampling adapters and history-dependent processors.

Truncation adapters (stateless): typical (Meister et al. 2023), epsilon and eta
(Hewitt et al. 2022), top-nσ (Tang et al. 2024).
History processors: repetition penalty (Keskar et al. 2019), no-repeat-n-gram, logit
bias, sequence bias / bad words.
Stateful processors (``accept`` / ``fork`` / ``rollback`` / ``reset``): frequency and
presence penalties (over generated tokens, as in the OpenAI API) and min tokens.

Same contract as ``processors.py``: ``(tokens [B, T] left-padded with -1, logits [B, V])``,
validated at construction, identity when the setting does nothing.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import torch

from .common_adapters import NEG_INF, Chain, MinP, Processor, Temperature, TopK, TopP, _check


class Typical(Processor):
    """Locally typical sampling (Meister et al. 2023): keep the tokens whose surprisal is
    closest to the entropy, up to probability mass ``mass``. mass = 1 is the identity."""

    def __init__(self, mass: float) -> None:
        _check(isinstance(mass, (int, float)) and 0 < mass <= 1, f"typical_p must be in (0, 1] (1 disables it); got {mass}")
        self.mass = float(mass)
        self.is_identity = self.mass == 1.0

    def __call__(self, tokens, logits):
        if self.is_identity:
            return logits
        logp = logits.log_softmax(-1)
        ent = -(logp * logp.exp()).nansum(-1, keepdim=True)
        dist = (-logp - ent).abs()  # how far each token's surprisal is from the entropy
        sorted_dist, order = dist.sort(-1)
        cum = logits.gather(-1, order).softmax(-1).cumsum(-1)
        last = (cum < self.mass).sum(-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
        drop_sorted = sorted_dist > sorted_dist.gather(-1, last)
        drop_sorted[..., 0] = False
        return logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), NEG_INF)


class Epsilon(Processor):
    """Epsilon sampling (Hewitt et al. 2022): drop tokens with p < ε (the top one stays)."""

    def __init__(self, epsilon: float) -> None:
        _check(isinstance(epsilon, (int, float)) and 0 <= epsilon < 1, f"epsilon must be in [0, 1) (0 disables it); got {epsilon}")
        self.epsilon = float(epsilon)
        self.is_identity = self.epsilon == 0.0

    def __call__(self, tokens, logits):
        if self.is_identity:
            return logits
        drop = logits.softmax(-1) < self.epsilon
        drop &= logits < logits.max(-1, keepdim=True).values
        return logits.masked_fill(drop, NEG_INF)


class Eta(Processor):
    """Eta sampling (Hewitt et al. 2022): drop tokens with p < min(η, √η·exp(−H))."""

    def __init__(self, eta: float) -> None:
        _check(isinstance(eta, (int, float)) and 0 <= eta < 1, f"eta must be in [0, 1) (0 disables it); got {eta}")
        self.eta = float(eta)
        self.is_identity = self.eta == 0.0

    def __call__(self, tokens, logits):
        if self.is_identity:
            return logits
        logp = logits.log_softmax(-1)
        p = logp.exp()
        ent = -(logp * p).nansum(-1, keepdim=True)
        thresh = torch.clamp(math.sqrt(self.eta) * torch.exp(-ent), max=self.eta)
        drop = (p < thresh) & (logits < logits.max(-1, keepdim=True).values)
        return logits.masked_fill(drop, NEG_INF)


class TopNSigma(Processor):
    """Top-nσ (Tang et al. 2024): keep logits within n standard deviations of the max
    (statistics over the finite logits). n = 0 is the identity (disabled)."""

    def __init__(self, n: float) -> None:
        _check(isinstance(n, (int, float)) and n >= 0 and math.isfinite(n), f"top_n_sigma must be >= 0 (0 disables it); got {n}")
        self.n = float(n)
        self.is_identity = self.n == 0.0

    def __call__(self, tokens, logits):
        if self.is_identity:
            return logits
        finite = torch.isfinite(logits)
        cnt = finite.sum(-1, keepdim=True).clamp(min=1)
        x = torch.where(finite, logits, torch.zeros_like(logits))
        mean = x.sum(-1, keepdim=True) / cnt
        var = (torch.where(finite, logits - mean, torch.zeros_like(logits)) ** 2).sum(-1, keepdim=True) / cnt
        top = logits.max(-1, keepdim=True).values
        return logits.masked_fill(logits < top - self.n * var.sqrt(), NEG_INF)


def _present(tokens: torch.Tensor, vocab: int) -> torch.Tensor:
    """[B, V] bool: which tokens occur in each row's history (ignoring -1 padding)."""
    out = torch.zeros(tokens.shape[0], vocab + 1, dtype=torch.bool, device=tokens.device)
    out.scatter_(1, torch.where(tokens < 0, vocab, tokens), True)
    return out[:, :vocab]


class RepetitionPenalty(Processor):
    """CTRL's repetition penalty (Keskar et al. 2019) over the whole history: a seen
    token's logit is divided by ``penalty`` if positive, multiplied if negative."""

    def __init__(self, penalty: float) -> None:
        _check(isinstance(penalty, (int, float)) and penalty > 0 and math.isfinite(penalty),
               f"repetition_penalty must be > 0 (1 disables it); got {penalty}")
        self.penalty = float(penalty)
        self.is_identity = self.penalty == 1.0

    def __call__(self, tokens, logits):
        if self.is_identity or tokens is None or tokens.numel() == 0:
            return logits
        seen = _present(tokens, logits.shape[-1])
        penalised = torch.where(logits < 0, logits * self.penalty, logits / self.penalty)
        return torch.where(seen, penalised, logits)


class NoRepeatNGram(Processor):
    """Ban any token that would repeat an n-gram already in the history."""

    def __init__(self, n: int) -> None:
        _check(isinstance(n, int) and not isinstance(n, bool) and n >= 0, f"no_repeat_ngram_size must be an integer >= 0 (0 disables it); got {n}")
        self.n = n
        self.is_identity = n == 0

    def __call__(self, tokens, logits):
        if self.is_identity or tokens is None:
            return logits
        out = logits.clone()
        n = self.n
        for b, row in enumerate(tokens.tolist()):
            row = [t for t in row if t >= 0]
            if len(row) < n:
                continue
            prefix = tuple(row[len(row) - n + 1 :]) if n > 1 else ()
            banned = {row[i + n - 1] for i in range(len(row) - n + 1) if tuple(row[i : i + n - 1]) == prefix}
            if banned:
                out[b, list(banned)] = NEG_INF
        return out


class LogitBias(Processor):
    """Add a fixed bias to chosen token ids (OpenAI's ``logit_bias``)."""

    def __init__(self, bias: Mapping[int, float]) -> None:
        for k, v in dict(bias).items():
            _check(isinstance(k, int) and k >= 0, f"logit_bias keys must be token ids >= 0; got {k!r}")
            _check(isinstance(v, (int, float)) and not math.isnan(v), f"logit_bias values must be numbers; got {v!r}")
        self.bias = {int(k): float(v) for k, v in dict(bias).items()}
        self.is_identity = not any(self.bias.values())

    def __call__(self, tokens, logits):
        if self.is_identity:
            return logits
        ids = torch.tensor(list(self.bias), device=logits.device)
        if int(ids.max()) >= logits.shape[-1]:
            raise ValueError(f"logit_bias token id {int(ids.max())} is outside the vocabulary ({logits.shape[-1]})")
        vals = torch.tensor(list(self.bias.values()), dtype=logits.dtype, device=logits.device)
        return logits.index_add(-1, ids, vals.expand(logits.shape[0], -1))


class SequenceBias(Processor):
    """Bias the last token of a token sequence when the history ends with the rest of
    it (transformers' ``sequence_bias``). A bias of -inf bans the sequence (bad words)."""

    def __init__(self, bias: Mapping[Sequence[int], float]) -> None:
        items = []
        for seq, v in dict(bias).items():
            seq = tuple(seq)
            _check(len(seq) > 0 and all(isinstance(t, int) and t >= 0 for t in seq),
                   f"sequence_bias keys must be non-empty sequences of token ids; got {seq!r}")
            items.append((seq, float(v)))
        self.items = items
        self.is_identity = not items

    def __call__(self, tokens, logits):
        if self.is_identity:
            return logits
        out = logits.clone()
        rows = tokens.tolist() if tokens is not None else [[] for _ in range(logits.shape[0])]
        for seq, v in self.items:
            head, last = list(seq[:-1]), seq[-1]
            for b, row in enumerate(rows):
                if not head or (len(row) >= len(head) and row[len(row) - len(head) :] == head):
                    out[b, last] = out[b, last] + v
        return out


def bad_words(sequences: Sequence[Sequence[int]]) -> SequenceBias:
    """Never generate any of these token sequences."""
    return SequenceBias({tuple(s): NEG_INF for s in sequences})


class _Counts(Processor):
    """Per-row counts of accepted (generated) tokens, forkable and undoable by up to
    ``ROLLBACK_DEPTH`` tokens (speculation rolls back at most its draft length)."""

    ROLLBACK_DEPTH = 64  # the log is bounded so that fork costs O(B·V), not O(steps)

    def __init__(self) -> None:
        self._counts: torch.Tensor | None = None  # [B, V]
        self._log: list[torch.Tensor] = []  # the last accepted tokens, for rollback
        self._accepted = 0

    def _ensure(self, logits: torch.Tensor) -> torch.Tensor:
        if self._counts is None or self._counts.shape[0] != logits.shape[0]:
            self._counts = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)
        return self._counts

    def accept(self, tokens):
        if self._counts is None:
            return
        self._counts[torch.arange(tokens.shape[0]), tokens] += 1
        self._log.append(tokens.clone())
        self._accepted += 1
        if len(self._log) > self.ROLLBACK_DEPTH:
            del self._log[0]

    def fork(self, rows):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        new._counts = None if self._counts is None else self._counts[idx].clone()
        new._log = [t[idx] for t in self._log]
        return new

    def rollback(self, n):
        n = min(n, self._accepted)
        if n > len(self._log):
            raise ValueError(f"{type(self).__name__} can roll back at most {self.ROLLBACK_DEPTH} tokens; asked for {n}")
        for _ in range(n):
            t = self._log.pop()
            self._counts[torch.arange(t.shape[0]), t] -= 1
        self._accepted -= n

    def reset(self):
        self._counts, self._log, self._accepted = None, [], 0


class FrequencyPenalty(_Counts):
    """logit -= f · (times the token was generated so far), as in the OpenAI API."""

    def __init__(self, penalty: float) -> None:
        super().__init__()
        _check(isinstance(penalty, (int, float)) and -2 <= penalty <= 2, f"frequency_penalty must be in [-2, 2] (0 disables it); got {penalty}")
        self.penalty = float(penalty)
        self.is_identity = self.penalty == 0.0

    def __call__(self, tokens, logits):
        return logits - self.penalty * self._ensure(logits)


class PresencePenalty(_Counts):
    """logit -= p if the token was generated at all so far, as in the OpenAI API."""

    def __init__(self, penalty: float) -> None:
        super().__init__()
        _check(isinstance(penalty, (int, float)) and -2 <= penalty <= 2, f"presence_penalty must be in [-2, 2] (0 disables it); got {penalty}")
        self.penalty = float(penalty)
        self.is_identity = self.penalty == 0.0

    def __call__(self, tokens, logits):
        return logits - self.penalty * (self._ensure(logits) > 0).to(logits.dtype)


class MinTokens(Processor):
    """Forbid the stop tokens (EOS) until ``min_tokens`` tokens have been generated.
    Its state is one count: every row of a chain has generated as many tokens."""

    def __init__(self, min_tokens: int, stop_token_ids: Sequence[int]) -> None:
        _check(isinstance(min_tokens, int) and min_tokens >= 0, f"min_tokens must be an integer >= 0 (0 disables it); got {min_tokens}")
        self.min_tokens = min_tokens
        self.stop_token_ids = list(stop_token_ids)
        self.is_identity = min_tokens == 0 or not self.stop_token_ids
        self._generated = 0

    def __call__(self, tokens, logits):
        if self._generated >= self.min_tokens:
            return logits
        return logits.index_fill(-1, torch.tensor(self.stop_token_ids, device=logits.device), NEG_INF)

    def banned(self):
        return self.stop_token_ids, max(0, self.min_tokens - self._generated)

    def accept(self, tokens):
        self._generated += 1

    def fork(self, rows):
        new = object.__new__(MinTokens)
        new.__dict__.update(self.__dict__)
        return new

    def rollback(self, n):
        self._generated = max(0, self._generated - n)

    def reset(self):
        self._generated = 0


class MirostatV2(Processor):
    """Mirostat v2 (Basu et al. 2021): keep tokens whose surprisal (bits) is at most μ,
    then move μ towards the target surprisal τ after each token: μ -= η·(s(token) − τ).
    Stateful per row: ``accept`` updates μ, ``fork`` copies it, ``rollback`` restores it."""

    def __init__(self, tau: float = 5.0, eta: float = 0.1) -> None:
        _check(isinstance(tau, (int, float)) and tau > 0, f"mirostat tau must be > 0; got {tau}")
        _check(isinstance(eta, (int, float)) and 0 < eta <= 1, f"mirostat eta must be in (0, 1]; got {eta}")
        self.tau, self.eta = float(tau), float(eta)
        self._mu: torch.Tensor | None = None  # [B]
        self._surprisal: torch.Tensor | None = None  # [B, V] from the last call
        self._history: list[torch.Tensor] = []

    def __call__(self, tokens, logits):
        if self._mu is None or self._mu.shape[0] != logits.shape[0]:
            self._mu = torch.full((logits.shape[0],), 2 * self.tau)
        surprisal = -logits.log_softmax(-1) / math.log(2)
        self._surprisal = surprisal
        drop = surprisal > self._mu[:, None]
        drop &= logits < logits.max(-1, keepdim=True).values  # the top token always stays
        return logits.masked_fill(drop, NEG_INF)

    def accept(self, tokens):
        if self._surprisal is None:
            return
        s = self._surprisal.gather(-1, tokens[:, None])[:, 0]
        self._history.append(self._mu.clone())
        self._mu = self._mu - self.eta * (s - self.tau)

    def fork(self, rows):
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        idx = torch.as_tensor(list(rows), dtype=torch.long)
        new._mu = None if self._mu is None else self._mu[idx].clone()
        # the last call's surprisals travel too, so a fork can still accept the token just picked
        new._surprisal = None if self._surprisal is None else self._surprisal[idx]
        new._history = [h[idx] for h in self._history]
        return new

    def rollback(self, n):
        for _ in range(min(n, len(self._history))):
            self._mu = self._history.pop()

    def reset(self):
        self._mu, self._surprisal, self._history = None, None, []


class MirostatV1(MirostatV2):
    """Mirostat v1 (Basu et al. 2021, Algorithm 1): estimate the Zipf exponent ŝ from
    the top ``m`` probabilities, keep the top k tokens with
    k = ((ε̂·2^μ) / (1 − N^(−ε̂)))^(1/ŝ), ε̂ = ŝ − 1, then move μ towards τ after each
    token as in v2. Stateful per row like v2 (fork, rollback, reset)."""

    def __init__(self, tau: float = 5.0, eta: float = 0.1, m: int = 100) -> None:
        super().__init__(tau, eta)
        _check(isinstance(m, int) and m >= 2, f"mirostat m must be an integer >= 2; got {m}")
        self.m = m

    def __call__(self, tokens, logits):
        B, V = logits.shape
        if self._mu is None or self._mu.shape[0] != B:
            self._mu = torch.full((B,), 2 * self.tau)
        logp = logits.log_softmax(-1)
        m = min(self.m, V)
        top = torch.topk(logp, m, dim=-1).values  # [B, m] descending
        i = torch.arange(m - 1, dtype=torch.float32)
        t = torch.log((i + 2) / (i + 1))  # [m-1]
        b = (top[:, :-1] - top[:, 1:]).clamp(max=1e4)  # log(p_i / p_{i+1}), [B, m-1]
        b = torch.nan_to_num(b, nan=0.0, posinf=1e4)
        s_hat = (t * b).sum(-1) / (t * t).sum()  # [B]
        eps = s_hat - 1
        k = ((eps * torch.pow(2.0, self._mu)) / (1 - torch.pow(float(V), -eps))).pow(1 / s_hat)
        k = torch.nan_to_num(k, nan=float(V), posinf=float(V)).round().clamp(1, V).long()  # [B]
        sorted_logits = torch.sort(logits, dim=-1, descending=True).values
        kth = sorted_logits.gather(-1, (k - 1)[:, None])  # [B, 1]
        out = logits.masked_fill(logits < kth, NEG_INF)
        # the surprise of a token is measured on the truncated distribution (as llama.cpp)
        self._surprisal = -out.log_softmax(-1) / math.log(2)
        return out


# -- the standard chain ------------------------------------------------------------------
def make_processors(
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
    extra: Sequence[Any] = (),
    *,
    typical_p: float = 1.0,
    epsilon: float = 0.0,
    eta: float = 0.0,
    top_n_sigma: float = 0.0,
    repetition_penalty: float = 1.0,
    frequency_penalty: float = 0.0,
    presence_penalty: float = 0.0,
    no_repeat_ngram_size: int = 0,
    logit_bias: dict[int, float] | None = None,
    bad_words_ids: Sequence[Sequence[int]] = (),
    min_tokens: int = 0,
    mirostat_tau: float = 0.0,
    mirostat_eta: float = 0.1,
    mirostat_version: int = 2,
    stop_token_ids: Sequence[int] = (),
    constraint: Any = None,
) -> Chain:
    """The standard chain, in the order transformers applies it: history processors
    (logit bias, as transformers' ``sequence_bias``, then penalties, bans, min tokens)
    on the raw logits, then the sampling
    adapters (temperature, top-k, top-p, min-p, typical, epsilon, eta, top-nσ), then any
    extra (user) processors. A ``constraint`` (a grammar mask) comes first of all, so
    that every later adapter renormalises over legal tokens only. Every setting at its
    default is the identity."""
    return Chain(
        constraint,
        # transformers' order: sequence bias first, then the repetition penalty
        LogitBias(logit_bias or {}),
        RepetitionPenalty(repetition_penalty), FrequencyPenalty(frequency_penalty),
        PresencePenalty(presence_penalty), NoRepeatNGram(no_repeat_ngram_size),
        bad_words(bad_words_ids) if bad_words_ids else None,
        MinTokens(min_tokens, stop_token_ids),
        Temperature(temperature), TopK(top_k), TopP(top_p), MinP(min_p),
        Typical(typical_p), Epsilon(epsilon), Eta(eta), TopNSigma(top_n_sigma),
        _mirostat(mirostat_version, mirostat_tau, mirostat_eta) if mirostat_tau else None,
        *extra,
    )


def _mirostat(version: int, tau: float, eta: float) -> Processor:
    _check(version in (1, 2), f"mirostat_version must be 1 or 2; got {version!r}")
    return MirostatV1(tau, eta) if version == 1 else MirostatV2(tau, eta)


HISTORY_SETTINGS = ("repetition_penalty", "frequency_penalty", "presence_penalty", "no_repeat_ngram_size",
                    "logit_bias", "bad_words_ids", "min_tokens", "constraint")
# The sampling adapters' settings and the values at which they do nothing (as in
# make_processors' signature); the CLI and the strategy registry read these.
ADAPTER_DEFAULTS = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "epsilon": 0.0,
                    "eta": 0.0, "top_n_sigma": 0.0, "mirostat_tau": 0.0, "mirostat_eta": 0.1, "mirostat_version": 2}
ADAPTER_SETTINGS = tuple(ADAPTER_DEFAULTS)
