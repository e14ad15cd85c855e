"""Reward models: outcome (ORM) and per-step (PRM) scores from one network.

Format of a ponder reward model (``arith-reward`` is one): a Hugging Face
``LlamaForTokenClassification`` checkpoint with ``num_labels = 1`` (config.json,
model.safetensors, tokenizer.json). It reads ``prompt + solution`` and puts a logit on
every token; ponder reads it at two kinds of places:

* the last token of each step line (the ``\\n``): ``sigmoid`` is the probability that
  the solution is correct *so far* (the PRM score of that prefix);
* an EOS token appended after the solution: the probability that the final answer is
  right (the ORM score).

Load it with ``RewardModel.from_pretrained("arith-reward")`` or from any folder in
this format; transformers loads it too (``AutoModelForTokenClassification``).
"""

from __future__ import annotations

import math
import re
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..models.loader import load_tokenizer, load_transformer
from ..models.llama import Transformer
from ..errors import SettingError
from ..types import Usage
from .base import Scores, aggregate

# The final answer line is read by the outcome score, not as a step.
_ANSWER_LINE = re.compile(r"^\s*(answer\b|####)", re.IGNORECASE)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class RewardModel:
    """``prefix_cache``: reuse KV across calls, so scoring step k+1 of a path reads
    steps 1..k from the cache instead of recomputing them (a radix tree, LRU under
    ``max_cache_bytes``); the head's logits already read are remembered too."""

    MEMO_LIMIT = 500_000  # remembered logits before the memo starts afresh

    def __init__(self, model: Transformer, tokenizer, name: str = "reward", prefix_cache: bool = True,
                 max_cache_bytes: int = 128 * 2**20) -> None:
        if model.cfg.num_labels > 2:
            raise SettingError(f"{name} has {model.cfg.num_labels} labels; a reward model has one (a scalar) or two "
                               "(bad, good)")
        if not model.cfg.is_reward_model:
            raise SettingError(f"{name} is not a reward model: its config has no scalar head (num_labels); "
                               "give a token-classification checkpoint such as arith-reward")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.path: Path | None = None
        self.eos = model.cfg.eos_ids[0]
        self.prefix_cache = None
        if prefix_cache:
            from ..engine.prefix_cache import REUSE_BLOCK, RadixCache

            self.prefix_cache = RadixCache.for_model(model.cfg, model.dtype, max_bytes=max_cache_bytes,
                                                     min_reuse=REUSE_BLOCK)
        self._ids: dict[tuple[str, bool], tuple[int, ...]] = {}  # tokenised prompts and lines
        self._memo: dict[tuple[int, ...], float] = {}  # a prefix's ids -> the head's logit at its last token
        self._lock = threading.Lock()  # searches score from several threads at once

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: str = "float32") -> "RewardModel":
        from ..models.registry import resolve_model

        path, name = resolve_model(str(name_or_path))
        rm = cls(load_transformer(path, dtype), load_tokenizer(path), name)
        rm.path = path  # where its weights are (the results store identifies a model by them)
        return rm

    def layout(self, prompt: str, completion: str) -> tuple[list[int], list[int], int]:
        """Token ids of prompt + completion + EOS, the index of each step's last token,
        and the index of the EOS (where the outcome score is read)."""
        ids = list(self._encode(prompt, True))
        step_ends = []
        lines = completion.split("\n")
        for k, line in enumerate(lines):
            piece = line + ("\n" if k < len(lines) - 1 else "")
            if not piece:
                continue
            ids += self._encode(piece, False)
            if line.strip() and k < len(lines) - 1 and not _ANSWER_LINE.match(line):
                step_ends.append(len(ids) - 1)
        ids.append(self.eos)
        return ids, step_ends, len(ids) - 1

    def _encode(self, text: str, special: bool) -> tuple[int, ...]:
        """Token ids of a prompt or a line, remembered: a search scores the same prompt
        and steps again and again."""
        key = (text, special)
        ids = self._ids.get(key)
        if ids is None:
            if len(self._ids) > self.MEMO_LIMIT // 10:
                self._ids.clear()
            ids = self._ids[key] = tuple(self.tokenizer.encode(text, add_special_tokens=special).ids)
        return ids

    def _log_odds(self, out: torch.Tensor) -> torch.Tensor:
        """The head's log-odds that the path is right, [B, T]: its one logit (a scalar
        head, sigmoid), or label 1's logit minus label 0's (a two-label head: its
        softmax's "good" probability is the sigmoid of that difference)."""
        if out.shape[-1] == 1:
            return out[..., 0].float()
        return (out[..., 1] - out[..., 0]).float()

    @torch.inference_mode()
    def token_logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """The head's logit at every token of each sequence (one batch, right-padded)."""
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), self.eos, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        # Right padding with a causal mask: padding never influences real positions.
        scores = self._log_odds(self.model.logits(self.model(ids)))
        return [scores[i, : len(s)] for i, s in enumerate(seqs)]

    def read(self, seqs: list[list[int]], wanted: list[list[int]]) -> tuple[list[dict[int, float]], list[int]]:
        """The head's logit at the ``wanted`` positions of each sequence, computing only
        what was never computed: a position whose prefix was read before comes from the
        memo; the rest runs on the KV of the longest cached prefix. Returns the logits
        and the tokens each sequence computed.

        Equal sequences (a search's duplicate steps) are computed once and share their
        values: computed in different rows of a batch they could differ in the last
        bits, and a search choosing between equal paths would then choose by noise."""
        first: dict[tuple[int, ...], int] = {}
        for s in seqs:
            first.setdefault(tuple(s), len(first))
        if len(first) == len(seqs):
            return self._read(seqs, wanted)
        uniq = [list(k) for k in first]
        merged: list[set[int]] = [set() for _ in uniq]
        for s, w in zip(seqs, wanted):
            merged[first[tuple(s)]].update(w)
        vals, comp = self._read(uniq, [sorted(m) for m in merged])
        out, computed, seen = [], [], set()
        for s, w in zip(seqs, wanted):
            j = first[tuple(s)]
            out.append({t: vals[j][t] for t in w})
            computed.append(comp[j] if j not in seen else 0)  # a duplicate computes nothing
            seen.add(j)
        return out, computed

    @torch.inference_mode()
    def _read(self, seqs: list[list[int]], wanted: list[list[int]]) -> tuple[list[dict[int, float]], list[int]]:
        with self._lock:
            out = [dict() for _ in seqs]
            todo = []  # (row, start): sequences that need the model, from where
            for i, (s, want) in enumerate(zip(seqs, wanted)):
                missing = []
                for t in want:
                    v = self._memo.get(tuple(s[: t + 1]))
                    if v is None:
                        missing.append(t)
                    else:
                        out[i][t] = v
                if missing:
                    todo.append((i, min(missing)))
            computed = [0] * len(seqs)
            if not todo:
                return out, computed
            found = []  # (sequence, cached prefix length, its KV)
            for i, first in todo:
                m, k, v = (0, None, None) if self.prefix_cache is None else self.prefix_cache.lookup(seqs[i], limit=first)
                found.append((i, m, k, v))
            if len(self._memo) > self.MEMO_LIMIT:
                self._memo.clear()
            # rows of similar suffix length run together: one long suffix (a path whose
            # prefix was never cached) must not pad hundreds of one-step rows to its length
            found.sort(key=lambda f: len(seqs[f[0]]) - f[1])
            group: list[tuple[int, int, Any, Any]] = []
            for f in found:
                if group and len(seqs[f[0]]) - f[1] > 2 * (len(seqs[group[0][0]]) - group[0][1]) + 8:
                    self._forward_rows(seqs, wanted, group, out, computed)
                    group = []
                group.append(f)
            self._forward_rows(seqs, wanted, group, out, computed)
            return out, computed

    def _forward_rows(self, seqs: list[list[int]], wanted: list[list[int]], rows: list[tuple[int, int, Any, Any]],
                      out: list[dict[int, float]], computed: list[int]) -> None:
        """One forward pass over ``rows`` (sequence, cached length m, its KV): each row
        runs its tokens from m on, over the cached KV; the wanted logits go to ``out``
        and the memo, the new KV to the prefix cache."""
        cache = self.model.new_cache(len(rows), max(len(seqs[i]) for i, _, _, _ in rows) + 1)
        for row, (_, m, k, v) in enumerate(rows):
            if m:
                cache.write_prefix_(row, k, v)
        suffixes = [seqs[i][m:] for i, m, _, _ in rows]
        ids = torch.full((len(rows), max(map(len, suffixes))), self.eos, dtype=torch.long)
        for row, suf in enumerate(suffixes):
            ids[row, : len(suf)] = torch.tensor(suf)
        num_new = torch.tensor([len(x) for x in suffixes])
        head = self._log_odds(self.model.logits(self.model(ids, cache, num_new)))  # [rows, T]
        for row, (i, m, _, _) in enumerate(rows):
            s = seqs[i]
            for t in wanted[i]:
                if t not in out[i]:
                    out[i][t] = float(head[row, t - m])
                    self._memo[tuple(s[: t + 1])] = out[i][t]
            computed[i] = len(s) - m
            if self.prefix_cache is not None:
                self.prefix_cache.insert_from(s, lambda a, b, row=row: cache.read_row(row, b, start=a))

    def _bill(self, seqs: list[list[int]], computed: list[int], wall_s: float) -> list[Usage]:
        """Each sequence's share of a scoring batch: the tokens it computed (not those
        read from the cache), their FLOPs, and the wall time split evenly."""
        cfg = self.model.cfg
        return [Usage(computed_tokens=c, model_calls=1 if c else 0,
                      flops=c * cfg.flops_per_token(len(s) - c // 2), wall_s=wall_s / len(seqs))
                for s, c in zip(seqs, computed)]

    def clear_cache(self) -> None:
        """Forget every scored prefix (its KV and the memo of head values): what follows
        is billed as if scored first."""
        with self._lock:
            self._memo.clear()
            if self.prefix_cache is not None:
                self.prefix_cache.clear()

    def score_completions(self, prompt: str, completions: Sequence[str], batch_size: int = 64) -> list[tuple[float, Usage]]:
        """Outcome score in [0, 1] for each completion, with what scoring cost."""
        out: list[tuple[float, Usage]] = []
        for i in range(0, len(completions), batch_size):
            t0 = time.perf_counter()
            lay = [self.layout(prompt, c) for c in completions[i : i + batch_size]]
            seqs = [ids for ids, _, _ in lay]
            logits, computed = self.read(seqs, [[end] for _, _, end in lay])
            for (_, _, end), lg, u in zip(lay, logits, self._bill(seqs, computed, time.perf_counter() - t0)):
                out.append((float(torch.sigmoid(torch.tensor(lg[end]))), u))
        return out

    def step_scores(self, prompt: str, completions: Sequence[str], batch_size: int = 64) -> list[list[float]]:
        """PRM: for each completion, the score after each step line."""
        return self.score_steps(prompt, completions, batch_size).steps or []

    # -- the Scorer contract (ponder.scoring.base) -------------------------------------------
    def score(self, prompt: str, completions: Sequence[str]) -> Scores:
        """As an outcome reward model (ORM): the probability that each answer is right."""
        scored = self.score_completions(prompt, completions)
        return Scores([s for s, _ in scored], Usage.total(u for _, u in scored))

    def score_steps(self, prompt: str, completions: Sequence[str], batch_size: int = 64,
                    aggregation: str = "last") -> Scores:
        """As a process reward model (PRM): each step's probability that the solution is
        right so far, and their ``aggregation`` per completion."""
        return self.score_steps_many([(prompt, completions)], batch_size, aggregation)[0]

    def score_steps_many(self, requests: Sequence[tuple[str, Sequence[str]]], batch_size: int = 256,
                         aggregation: str = "last") -> list[Scores]:
        """``score_steps`` of several (prompt, completions) requests in shared batches:
        concurrent searches score one level together, in one forward pass per batch
        instead of one per search. Each request is billed its own rows' share."""
        flat = [(prompt, c) for prompt, cs in requests for c in cs]
        steps: list[list[float]] = []
        usages: list[Usage] = []
        # batches end at request boundaries: a request's sequences are scored together, so
        # what they share is computed the same way whatever else arrived with them
        bounds, size = [0], 0
        for _, cs in requests:
            if size and size + len(cs) > batch_size:
                bounds.append(bounds[-1] + size)
                size = 0
            size += len(cs)
        bounds.append(len(flat))
        for i, j in zip(bounds, bounds[1:]):
            if i == j:
                continue
            t0 = time.perf_counter()
            lay = [self.layout(prompt, c) for prompt, c in flat[i:j]]
            seqs = [ids for ids, _, _ in lay]
            # a path's steps end where its prefix's did: earlier steps come from the memo and cache
            logits, computed = self.read(seqs, [ends for _, ends, _ in lay])
            steps += [[_sigmoid(lg[e]) for e in ends] for (_, ends, _), lg in zip(lay, logits)]
            usages += self._bill(seqs, computed, time.perf_counter() - t0)
        out, k = [], 0
        for _, cs in requests:
            mine = steps[k : k + len(cs)]
            out.append(Scores([aggregate(x, aggregation, empty=0.0) for x in mine], Usage.total(usages[k : k + len(cs)]),
                              mine))
            k += len(cs)
        return out

    def prm(self, aggregation: str = "last") -> "ProcessReward":
        """This model as a step scorer whose ``score`` aggregates the steps."""
        return ProcessReward(self, aggregation)


class ProcessReward:
    """A reward model read at step ends (PRM), each path scored by ``aggregation`` of its
    steps: last, min, product or mean."""

    def __init__(self, rm: RewardModel, aggregation: str = "last") -> None:
        aggregate([], aggregation)  # validates the name
        self.rm, self.aggregation = rm, aggregation
        self.name = f"{rm.name}/prm-{aggregation}"

    def score_steps(self, prompt: str, completions: Sequence[str]) -> Scores:
        return self.rm.score_steps(prompt, completions, aggregation=self.aggregation)

    def score(self, prompt: str, completions: Sequence[str]) -> Scores:
        return self.score_steps(prompt, completions)

    def score_steps_many(self, requests: Sequence[tuple[str, Sequence[str]]]) -> list[Scores]:
        return self.rm.score_steps_many(requests, aggregation=self.aggregation)
