"""A reward model run by transformers (``--reward-model hf:FOLDER``): transformers'
backbone under the same formats, layouts and head as the in-process ``RewardModel``
(an oracle for ponder's engine, and a way to run an architecture it lacks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import SettingError
from ..models.loader import load_tokenizer
from .heads import causal_arch, label_ids, make_head, split_head
from .reward import RewardModel, _resolve, _template_of


class HFRewardModel(RewardModel):
    """The same verifier run by transformers (``hf:FOLDER``, extra ``hf``): the backbone
    is transformers' ``AutoModel`` of the checkpoint (any architecture transformers
    knows, Qwen3 included), the head and the layout are the format's, as in-process.
    Whole sequences each time (no KV reuse; the memo still saves repeated positions)."""

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, dtype: str = "float32", fmt: str | None = None) -> "HFRewardModel":
        import json

        from ..models.config import ModelConfig
        from ..models.loader import load_state_dict

        try:
            from transformers import AutoModel
        except ImportError:
            raise SettingError("hf: runs the verifier with transformers, which is not installed: "
                               "pip install 'ponder[hf]'") from None
        path, name, f = _resolve(name_or_path, fmt)
        config = json.loads((Path(path) / "config.json").read_text())
        from transformers.utils import logging as hf_logging

        was = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()  # the head's tensors are "unexpected" to a bare backbone: by design
        try:
            backbone = AutoModel.from_pretrained(str(path), dtype=torch.float32 if dtype == "float32" else torch.bfloat16)
        finally:
            hf_logging.set_verbosity(was)
        backbone.eval()
        head_sd = split_head(load_state_dict(Path(path)))
        tok = load_tokenizer(path)
        good, bad = label_ids(f, tok)
        head = make_head(f, head_sd, backbone.get_input_embeddings().weight.detach(), good, bad, str(path))
        shim = _HFBackbone(backbone, ModelConfig.from_dict({**config, "architectures": [causal_arch(config)],
                                                            "tie_word_embeddings": True, "num_labels": 0}))
        rm = cls(shim, tok, name, prefix_cache=False, fmt=f, head=head, template=_template_of(path, f))
        rm.path = path
        return rm

    def _forward_rows(self, seqs: list[list[int]], wanted: list[list[int]], rows: list[tuple[int, int, Any, Any]],
                      out: list[dict[int, float]], computed: list[int]) -> None:
        full = [seqs[i] for i, _, _, _ in rows]
        T = max(map(len, full))
        ids = torch.full((len(full), T), self.eos, dtype=torch.long)
        mask = torch.zeros((len(full), T), dtype=torch.long)
        for r, sq in enumerate(full):
            ids[r, : len(sq)] = torch.tensor(sq)
            mask[r, : len(sq)] = 1
        with torch.inference_mode():
            vals = self._values(self.model(ids, attention_mask=mask))
        for r, (i, _, _, _) in enumerate(rows):
            sq = seqs[i]
            for t in wanted[i]:
                if t not in out[i]:
                    out[i][t] = float(vals[r, t])
                    self._memo[tuple(sq[: t + 1])] = out[i][t]
            computed[i] = len(sq)


class _HFBackbone:
    """transformers' backbone as the reward model calls its model: hidden states [B, T, h]."""

    def __init__(self, model: Any, cfg: Any) -> None:
        self.hf, self.cfg = model, cfg

    def __call__(self, ids: torch.Tensor, cache: Any = None, num_new: Any = None, attention_mask: Any = None) -> torch.Tensor:
        return self.hf(input_ids=ids, attention_mask=attention_mask).last_hidden_state
