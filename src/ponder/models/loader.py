"""Load a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)
from a local path, without importing transformers."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ModelConfig
from .llama import Transformer

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


class CheckpointError(ValueError):
    """A checkpoint folder is missing a file or holds weights that do not fit its config."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype must be float32 or bfloat16, got {dtype}")
        return dtype
    try:
        return DTYPES[dtype]
    except KeyError:
        raise ValueError(f"dtype must be one of float32, bfloat16; got {dtype!r}") from None


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(str(folder / f)))
    return sd


def load_transformer(path: str | Path, dtype: str | torch.dtype = "float32") -> Transformer:
    folder = Path(path)
    if not (folder / "config.json").exists():
        raise CheckpointError(f"{folder} is not a checkpoint folder: config.json is missing")
    cfg = ModelConfig.from_file(folder / "config.json")
    dt = parse_dtype(dtype)
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu").to(dt)
    model.load_hf_state_dict(load_state_dict(folder))
    model._rope_cache = None
    model.eval()
    model.requires_grad_(False)
    return model


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    f = Path(path) / "tokenizer.json"
    if not f.exists():
        raise CheckpointError(f"{path} has no tokenizer.json")
    return Tokenizer.from_file(str(f))
