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

import re
import time
from pathlib import Path
from typing import Sequence

import torch

from ..models.loader import load_tokenizer, load_transformer
from ..models.llama import Transformer
from ..errors import SettingError
from ..types import Usage
from .base import Scores, aggregate

# The final answer line is read by the outcome score, not as a step.
_ANSWER_LINE = re.compile(r"^\s*(answer\b|####)", re.IGNORECASE)


class RewardModel:
    def __init__(self, model: Transformer, tokenizer, name: str = "reward") -> None:
        if not model.cfg.is_reward_model:
            raise SettingError(f"{name} is not a reward model: its config has no scalar head (num_labels); "
                               "give a token-classification checkpoint such as arith-reward")
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.eos = model.cfg.eos_ids[0]

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: str = "float32") -> "RewardModel":
        from ..models.registry import resolve_model

        path, name = resolve_model(str(name_or_path))
        return cls(load_transformer(path, dtype), load_tokenizer(path), name)

    def layout(self, prompt: str, completion: str) -> tuple[list[int], list[int], int]:
        """Token ids of prompt + completion + EOS, the index of each step's last token,
        and the index of the EOS (where the outcome score is read)."""
        ids = self.tokenizer.encode(prompt).ids
        step_ends = []
        lines = completion.split("\n")
        for k, line in enumerate(lines):
            piece = line + ("\n" if k < len(lines) - 1 else "")
            if not piece:
                continue
            ids += self.tokenizer.encode(piece, add_special_tokens=False).ids
            if line.strip() and k < len(lines) - 1 and not _ANSWER_LINE.match(line):
                step_ends.append(len(ids) - 1)
        ids.append(self.eos)
        return ids, step_ends, len(ids) - 1

    @torch.inference_mode()
    def token_logits(self, seqs: list[list[int]]) -> list[torch.Tensor]:
        """The head's logit at every token of each sequence (one batch, right-padded)."""
        T = max(map(len, seqs))
        ids = torch.full((len(seqs), T), self.eos, dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
        # Right padding with a causal mask: padding never influences real positions.
        scores = self.model.logits(self.model(ids))[..., 0].float()
        return [scores[i, : len(s)] for i, s in enumerate(seqs)]

    def _usage(self, seqs: list[list[int]], wall_s: float) -> list[Usage]:
        """The bill of one scoring batch; its wall time is split evenly over the sequences."""
        cfg = self.model.cfg
        return [
            Usage(computed_tokens=len(s), model_calls=1, flops=len(s) * cfg.flops_per_token(len(s) // 2),
                  wall_s=wall_s / len(seqs))
            for s in seqs
        ]

    def score_completions(self, prompt: str, completions: Sequence[str], batch_size: int = 64) -> list[tuple[float, Usage]]:
        """Outcome score in [0, 1] for each completion, with what scoring cost."""
        out: list[tuple[float, Usage]] = []
        for i in range(0, len(completions), batch_size):
            t0 = time.perf_counter()
            lay = [self.layout(prompt, c) for c in completions[i : i + batch_size]]
            seqs = [ids for ids, _, _ in lay]
            logits = self.token_logits(seqs)
            for (ids, _, end), lg, u in zip(lay, logits, self._usage(seqs, time.perf_counter() - t0)):
                out.append((float(torch.sigmoid(lg[end])), u))
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
        steps: list[list[float]] = []
        usage = Usage()
        for i in range(0, len(completions), batch_size):
            t0 = time.perf_counter()
            lay = [self.layout(prompt, c) for c in completions[i : i + batch_size]]
            seqs = [ids for ids, _, _ in lay]
            logits = self.token_logits(seqs)
            for (_, ends, _), lg in zip(lay, logits):
                steps.append(torch.sigmoid(lg[ends]).tolist() if ends else [])
            usage = usage + Usage.total(self._usage(seqs, time.perf_counter() - t0))
        return Scores([aggregate(s, aggregation, empty=0.0) for s in steps], usage, steps)

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
