"""A public reward model's head on ponder's engine: the checkpoint's backbone (a
Llama-family transformer with no head of its own) and its head, as the format reads it
(a token or sequence classifier, Qwen's Linear-ReLU-Linear, Skywork's value head, or two
rows of the LM head), from the checkpoint's own tensors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..errors import SettingError
from ..models.llama import Transformer
from ..models.loader import load_tokenizer


def split_head(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Take the head's tensors out of a checkpoint's state dict (what is left is the
    backbone): ``score.*`` (a classifier or Qwen's MLP), ``v_head.*``, ``lm_head.*``."""
    return {k: sd.pop(k) for k in list(sd) if k.startswith(("score.", "v_head.", "lm_head."))}


def make_head(fmt: Any, head_sd: dict[str, torch.Tensor], embed: torch.Tensor, good: int | None, bad: int | None,
              where: str) -> Any:
    """The format's head as a function of hidden states [B, T, h] -> outputs [B, T, k]
    (float32), from the checkpoint's own tensors; a head that does not fit the format is
    refused, naming both."""
    import torch.nn.functional as F

    def need(*names: str) -> list[torch.Tensor]:
        missing = [n for n in names if n not in head_sd]
        if missing:
            raise SettingError(f"{where}: the {fmt.name} format reads a head with {', '.join(names)}, and the checkpoint "
                               f"has no {', '.join(missing)} (its head tensors: {', '.join(sorted(head_sd)) or 'none'}); "
                               "is this the right --reward-format?", "reward_format")
        return [head_sd[n].float() for n in names]

    if fmt.head in ("token", "seq"):
        (w,) = need("score.weight")
        b = head_sd["score.bias"].float() if "score.bias" in head_sd else None
        k = w.shape[0]

        def head(h: torch.Tensor) -> torch.Tensor:
            return F.linear(h.float(), w, b)
    elif fmt.head == "mlp":
        w0, b0, w2, b2 = need("score.0.weight", "score.0.bias", "score.2.weight", "score.2.bias")
        k = w2.shape[0]

        def head(h: torch.Tensor) -> torch.Tensor:
            return F.linear(F.relu(F.linear(h.float(), w0, b0)), w2, b2)
    elif fmt.head == "value":
        w, b = need("v_head.summary.weight", "v_head.summary.bias")
        k = w.shape[0]

        def head(h: torch.Tensor) -> torch.Tensor:
            return F.linear(h.float(), w, b)
    elif fmt.head == "lm_rows":
        table = head_sd["lm_head.weight"].float() if "lm_head.weight" in head_sd else embed.float()
        rows = table[[good, bad]]  # [2, h]: (good, bad), the order the score map reads
        k = 2

        def head(h: torch.Tensor) -> torch.Tensor:
            return F.linear(h.float(), rows)
    else:
        raise SettingError(f"unknown head kind {fmt.head!r}")
    if k != fmt.labels and fmt.head != "lm_rows":
        raise SettingError(f"{where}: its head has {k} output(s); the {fmt.name} format reads {fmt.labels}: is this "
                           "the right --reward-format?", "reward_format")
    return head


def load_backbone_and_head(path: Path, fmt: Any, dtype: str = "float32") -> tuple[Transformer, Any]:
    """A public reward model's backbone on ponder's engine (a Llama-family transformer
    with no head of its own) and its head, for ``fmt``."""
    import json

    from ..errors import CheckpointError
    from ..models.config import ModelConfig
    from ..models.loader import build_transformer, load_state_dict

    d = json.loads((path / "config.json").read_text())
    backbone = {**d, "architectures": [causal_arch(d)], "tie_word_embeddings": True}
    backbone.pop("num_labels", None)
    backbone.pop("id2label", None)
    try:
        cfg = ModelConfig.from_dict(backbone)
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: {e}") from None
    sd = load_state_dict(path)
    head_sd = split_head(sd)
    model = build_transformer(cfg, sd, dtype, path)
    good, bad = label_ids(fmt, load_tokenizer(path))
    return model, make_head(fmt, head_sd, model.embed_tokens.weight, good, bad, str(path))


def label_ids(fmt: Any, tok: Any) -> tuple[int | None, int | None]:
    """The good and bad tokens' ids of a format read from two rows of the LM head."""
    if fmt.head != "lm_rows":
        return None, None
    from .formats import Renderer

    r = Renderer.__new__(Renderer)  # the one-token lookup alone (no layout)
    r.fmt, r.tok = fmt, tok
    return r._one(fmt.good, "the good label"), r._one(fmt.bad, "the bad label")


def causal_arch(d: dict[str, Any]) -> str:
    return {"qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM", "qwen3": "Qwen3ForCausalLM"}.get(
        d.get("model_type", "llama"), "LlamaForCausalLM")
