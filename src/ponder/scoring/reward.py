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

Public reward models in other formats (``ponder.scoring.formats``: Qwen2.5-Math-PRM and
-RM, Math-Shepherd, RLHFlow, Skywork-o1 PRM, PURE and TRL PRMs, sequence RMs) run on the
same engine: their backbone is a Llama-family transformer, their head (a token or
sequence classifier, Qwen's Linear-ReLU-Linear, Skywork's value head, or two rows of
the LM head) is read at the positions the format lays out, and mapped to the score the
model card computes. The prefix cache and the memo work for every format.
"""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..models.loader import load_tokenizer, load_transformer
from ..models.llama import Transformer
from ..errors import SettingError
from ..types import Usage
from .base import ProcessReward, Scores, aggregate, per_request
from .formats import ponder_layout
from .heads import load_backbone_and_head


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


class RewardModel:
    """``prefix_cache``: reuse KV across calls, so scoring step k+1 of a path reads
    steps 1..k from the cache instead of recomputing them (a radix tree, LRU under
    ``max_cache_bytes``); the head's logits already read are remembered too."""

    MEMO_LIMIT = 500_000  # remembered logits before the memo starts afresh

    def __init__(self, model: Transformer, tokenizer, name: str = "reward", prefix_cache: bool = True,
                 max_cache_bytes: int = 128 * 2**20, fmt: Any = None, head: Any = None, template: Any = None) -> None:
        from .formats import PONDER, Renderer

        self.fmt = fmt or PONDER
        if self.fmt is PONDER and head is not None:  # ponder's format on another backbone (hf:)
            self.renderer = None
        elif self.fmt is PONDER:
            if model.cfg.num_labels > 2:
                raise SettingError(f"{name} has {model.cfg.num_labels} labels; a reward model has one (a scalar) or "
                                   "two (bad, good)")
            if not model.cfg.is_reward_model:
                raise SettingError(f"{name} is not a reward model: its config has no scalar head (num_labels); "
                                   "give a token-classification checkpoint such as arith-reward, or name its format "
                                   "with --reward-format")
            self.renderer = None
        else:
            if head is None:
                raise SettingError(f"{name}: the {self.fmt.name} format needs its head")
            self.renderer = Renderer(self.fmt, tokenizer, template, context=model.cfg.context_length)
        self.head = head  # hidden states [B, T, h] -> the head's outputs [B, T, k] (None: the model's own)
        self.aggregation = "min"  # a process format's one score per solution (its `score`)
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.path: Path | None = None
        self.eos = model.cfg.eos_ids[0] if model.cfg.eos_ids else 0
        self.prefix_cache = None
        if prefix_cache:
            from ..engine.prefix_cache import REUSE_BLOCK, RadixCache

            self.prefix_cache = RadixCache.for_model(model.cfg, model.dtype, max_bytes=max_cache_bytes,
                                                     min_reuse=REUSE_BLOCK)
        self._ids: dict[tuple[str, bool], tuple[int, ...]] = {}  # tokenised prompts and lines
        self._memo: dict[tuple[int, ...], float] = {}  # a prefix's ids -> the head's logit at its last token
        self._lock = threading.Lock()  # searches score from several threads at once

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: str = "float32", fmt: str | None = None) -> "RewardModel":
        """A shipped reward model or a checkpoint folder, in the format its config.json
        says (or ``fmt``, a preset's name: ``ponder.scoring.formats.PRESETS``)."""
        from .formats import PONDER

        path, name, f = _resolve(name_or_path, fmt)
        if f is PONDER:
            rm = cls(load_transformer(path, dtype), load_tokenizer(path), name)
        else:
            model, head = load_backbone_and_head(Path(path), f, dtype)
            rm = cls(model, load_tokenizer(path), name, fmt=f, head=head, template=_template_of(path, f))
        rm.path = path  # where its weights are (the results store identifies a model by them)
        return rm

    def layout(self, prompt: str, completion: str) -> tuple[list[int], list[int], int | None]:
        """Token ids of the solution as the verifier reads it, the positions of its step
        scores, and where its outcome score is read (None: a process format aggregates
        its steps). Ponder's own: prompt + completion + EOS, each step line's last token,
        the EOS."""
        if self.renderer is not None:
            lay = self.renderer.layout(prompt, completion)
            return lay.ids, lay.steps, lay.outcome
        lay = ponder_layout(self._encode, prompt, completion, self.eos)
        return lay.ids, lay.steps, lay.outcome

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

    def _values(self, h: torch.Tensor) -> torch.Tensor:
        """[B, T] per-token values from hidden states [B, T, h]: ponder's log-odds (the
        sigmoid comes when read), or another format's score as its card maps it."""
        if self.head is None:
            return self._log_odds(self.model.logits(h))
        out = self.head(h).float()  # [B, T, k]
        how = self.fmt.score
        if how == "sigmoid":
            return torch.sigmoid(out[..., 0])
        if how == "raw":
            return out[..., 0]
        p = out[..., :2].softmax(-1)
        if how == "two_way":
            return p[..., 0]
        return p[..., 1] - p[..., 0] if how == "p1_minus_p0" else p[..., 1]

    def _final(self, v: float) -> float:
        return _sigmoid(v) if self.head is None else float(v)

    @torch.inference_mode()
    def token_logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """The head's value at every token of each sequence (one batch, right-padded):
        ponder's log-odds, another format's score."""
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), self.eos, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        # Right padding with a causal mask: padding never influences real positions.
        scores = self._values(self.model(ids))
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
        head = self._values(self.model(ids, cache, num_new))  # [rows, T]
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
        """One score for each completion, with what scoring cost: the outcome score, or
        for a process format the ``aggregation`` of its steps (min by default)."""
        out: list[tuple[float, Usage]] = []
        for i in range(0, len(completions), batch_size):
            t0 = time.perf_counter()
            lay = [self.layout(prompt, c) for c in completions[i : i + batch_size]]
            seqs = [ids for ids, _, _ in lay]
            wanted = [[end] if end is not None else ends for _, ends, end in lay]
            logits, computed = self.read(seqs, wanted)
            for (_, ends, end), lg, u in zip(lay, logits, self._bill(seqs, computed, time.perf_counter() - t0)):
                if end is not None:
                    out.append((self._final(lg[end]), u))
                else:
                    out.append((aggregate([self._final(lg[e]) for e in ends], self.aggregation, empty=0.0), u))
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
            # a path's steps end where its prefix's did: earlier steps come from the memo and cache.
            # An outcome format scores a partial path as a whole: its one value is its step.
            reads = [ends if self.fmt.process else ([end] if end is not None else []) for _, ends, end in lay]
            logits, computed = self.read(seqs, reads)
            steps += [[self._final(lg[e]) for e in r] for r, lg in zip(reads, logits)]
            usages += self._bill(seqs, computed, time.perf_counter() - t0)
        return per_request(requests, steps, usages, aggregation)

    def prm(self, aggregation: str = "last") -> "ProcessReward":
        """This model as a step scorer whose ``score`` aggregates the steps."""
        return ProcessReward(self, aggregation)


def _resolve(name_or_path: str | Path, fmt: str | None) -> tuple[Path, str, Any]:
    """A verifier's folder, name and format: ``fmt`` by name, else what config.json says."""
    import json

    from ..models.registry import resolve_model
    from .formats import detect, preset

    path, name = resolve_model(str(name_or_path))
    try:
        config = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    return Path(path), name, preset(fmt) if fmt is not None else detect(config, name)


def _template_of(path: str | Path, fmt: Any) -> Any:
    """The checkpoint's chat template, for a format that lays its input out as a chat."""
    if fmt.layout not in ("chat", "turns"):
        return None
    from ..backends.chat import ChatTemplate

    return ChatTemplate.from_folder(path)
