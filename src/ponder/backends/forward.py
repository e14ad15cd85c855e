"""What every backend built on one ``forward`` primitive shares: padded prefill, the
decode step, prompt scoring, and the ``TextLM`` / ``LogprobsLM`` methods (through
ponder's engine), so that the native model and the transformers adapter differ only
in how they run a forward pass and keep their KV cache."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Sequence

import torch

from ..models.context import check_context

if TYPE_CHECKING:
    from ..params import SamplingParams
    from ..types import Generation


class ForwardLM:
    """Mixin for a ``LogitsLM`` that defines ``forward(input_ids [B, T], cache,
    num_new [B], last_only)``, ``new_cache``, ``encode`` and ``eos_token_ids``."""

    def forward(self, input_ids: torch.Tensor, cache: Any, num_new: torch.Tensor | None = None,
                last_only: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def pad_batch(self, seqs: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequences of different lengths as one right-padded batch: ids [B, T] and the
        number of real tokens per row [B] (what ``forward`` takes as ``num_new``)."""
        lens = [len(p) for p in seqs]
        if min(lens) == 0:
            raise ValueError("a prompt must hold at least one token")
        pad = self.eos_token_ids[0] if self.eos_token_ids else 0
        ids = torch.full((len(seqs), max(lens)), pad, dtype=torch.long)
        for i, p in enumerate(seqs):
            ids[i, : len(p)] = torch.as_tensor(list(p), dtype=torch.long)
        return ids, torch.tensor(lens, dtype=torch.long)

    def prefill(self, prompts: Sequence[Sequence[int]], capacity: int | None = None,
                cache: Any = None) -> tuple[torch.Tensor, Any]:
        """Run prompts of different lengths in one batch: returns last-token logits [B, V]
        and a cache holding each prompt. With ``cache``, row i's prompt is appended to
        what row i already holds (e.g. the rest of a prompt after a prefix-cache hit)."""
        ids, num_new = self.pad_batch(prompts)
        if cache is None:
            cache = self.new_cache(len(prompts), capacity or ids.shape[1] + 128)
        return self.forward(ids, cache, num_new, last_only=True), cache

    def step(self, tokens: torch.Tensor, cache: Any) -> torch.Tensor:
        """One decode step: tokens [B] -> next-token logits [B, V]."""
        return self.forward(tokens[:, None], cache)[:, 0]

    # -- TextLM and LogprobsLM ------------------------------------------------------------------
    async def generate(self, prompts: Sequence[str], params: "SamplingParams | None" = None) -> list[list["Generation"]]:
        """``params.n`` generations per prompt from the model's engine (greedy at
        temperature 0), with ``top_logprobs`` when ``params.logprobs`` > 0. Every prompt
        joins the running batch; cancelling the call withdraws them."""
        from ..params import SamplingParams

        params = params or SamplingParams()
        # the sampler (processor chain, picks) is the decoding layer's, below the backends:
        # an in-process model is a TextLM like a remote server
        from ..decoding.generate import generator_for

        if isinstance(prompts, str):
            prompts = [prompts]
        return await generator_for(self, params).agenerate_many(list(prompts), n=params.n, seed=params.seed)

    async def score(self, prompt: str, continuations: Sequence[str]) -> list[list[float]]:
        """log p(token | prompt, earlier tokens) for every token of each continuation."""
        import asyncio

        prompt_ids = self.encode(prompt)
        conts = [self.encode(c, add_special_tokens=False) for c in continuations]
        return await asyncio.to_thread(lambda: [self.score_ids(prompt_ids, c) if c else [] for c in conts])

    @torch.inference_mode()
    def score_ids(self, prompt_ids: Sequence[int], continuation_ids: Sequence[int]) -> list[float]:
        """Log-probabilities of each continuation token given the prompt."""
        check_context(self, len(prompt_ids) + len(continuation_ids), "the prompt and continuation to score")
        ids = torch.tensor([list(prompt_ids) + list(continuation_ids)])
        logits = self.forward(ids, None)[0]
        lp = logits.log_softmax(-1)
        n = len(prompt_ids)
        tgt = ids[0, n:]
        return lp[n - 1 : -1].gather(-1, tgt[:, None])[:, 0].tolist()
