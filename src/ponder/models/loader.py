"""Load a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json)
from a local path, without importing transformers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .config import ModelConfig
from .llama import Transformer

from ..errors import CheckpointError, SettingError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in (torch.float32, torch.bfloat16):
            raise SettingError(f"dtype must be float32 or bfloat16, got {dtype}")
        return dtype
    try:
        return DTYPES[dtype]
    except (KeyError, TypeError):
        raise SettingError(f"dtype must be one of float32, bfloat16; got {dtype!r}") from None


def load_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index ({type(e).__name__}: {e})") from None
    else:
        files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{folder} has no *.safetensors weights")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        # safetensors never executes code (a pickle renamed .safetensors is just refused)
        try:
            sd.update(load_file(str(folder / f)))
        except Exception as e:  # SafetensorError, OSError, ...: a broken file, said plainly
            raise CheckpointError(f"{folder / f}: not a readable safetensors file ({_one_line(e)})") from None
    return sd


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return (text[:200] + "...") if len(text) > 200 else (text or type(e).__name__)


def load_transformer(path: str | Path, dtype: str | torch.dtype = "float32") -> Transformer:
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise CheckpointError(f"{folder} is not a checkpoint folder: config.json is missing")
    return build_transformer(load_config(folder / "config.json"), load_state_dict(folder), dtype, folder)


def build_transformer(cfg: Any, sd: dict[str, torch.Tensor], dtype: str | torch.dtype, folder: Path) -> Transformer:
    """A transformer of ``cfg`` holding the weights ``sd`` (transformers' names), ready to run."""
    with torch.device("meta"):
        model = Transformer(cfg)
    model = model.to_empty(device="cpu").to(parse_dtype(dtype))
    try:
        model.load_hf_state_dict(sd)
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{folder}: the weights do not fit config.json ({_one_line(e)})") from None
    model._rope_cache = None
    model.eval()
    model.requires_grad_(False)
    return model


def load_config(file: Path) -> ModelConfig:
    """config.json as a ModelConfig; anything wrong is a CheckpointError naming it."""
    try:
        d = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{file}: not a readable JSON file ({_one_line(e)})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{file}: must hold a JSON object; got {type(d).__name__}")
    try:
        return ModelConfig.from_dict(d)
    except KeyError as e:
        raise CheckpointError(f"{file}: the field {e.args[0]!r} is missing") from None
    except (TypeError, ValueError, ZeroDivisionError) as e:
        raise CheckpointError(f"{file}: {_one_line(e)}") from None


def load_tokenizer(path: str | Path):
    from tokenizers import Tokenizer

    f = Path(path) / "tokenizer.json"
    if not f.is_file():
        raise CheckpointError(f"{path} has no tokenizer.json")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # the tokenizers library raises its own Exception subclass
        raise CheckpointError(f"{f}: not a readable tokenizer ({_one_line(e)})") from None
