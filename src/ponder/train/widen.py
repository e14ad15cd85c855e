"""Widen a Llama-family checkpoint's attention heads without changing what it computes.

vLLM's CPU attention takes head sizes 32, 64, 80, 96, ... and dies on 24 ("Unsupported
CPU attention configuration: head_dim=24"). A model with head size d becomes one with
head size D > d that gives the same outputs (to float rounding), with no training:

* each head's d dimensions go to D, zero-padded, keeping RoPE's pairs: rotate-half pairs
  dimension i with i + d/2, so the first half goes to [0, d/2) and the second to
  [D/2, D/2 + d/2); the padded dimensions of q and k are zero, so q.k is unchanged;
* RoPE's frequencies stay the same: dimension pair j turns at theta^(-2j/d); with head
  size D it turns at theta'^(-2j/D), equal for theta' = theta^(D/d);
* attention divides q.k by sqrt(head size): q is multiplied by sqrt(D/d) to keep it;
* v is padded the same way and o_proj reads zeros from the padded dimensions.

    python -m ponder.train widen-heads --model arith-reward --head-dim 32 --out arith-reward-32
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch

from ..errors import SettingError


def _spread(w: torch.Tensor, heads: int, d: int, D: int, dim: int) -> torch.Tensor:
    """``w`` with its ``heads x d`` rows (dim 0) or columns (dim 1) spread to ``heads x D``,
    RoPE's half-pairs kept apart: [0, d/2) -> [0, d/2), [d/2, d) -> [D/2, D/2 + d/2)."""
    h, H = d // 2, D // 2
    if dim == 1:
        return _spread(w.t(), heads, d, D, 0).t().contiguous()
    rest = w.shape[1:]
    old = w.reshape(heads, d, *rest)
    new = torch.zeros(heads, D, *rest, dtype=w.dtype)
    new[:, :h] = old[:, :h]
    new[:, H : H + h] = old[:, h:]
    return new.reshape(heads * D, *rest)


def widen_heads(src: str | Path, out: str | Path, head_dim: int, command: str = "") -> dict[str, Any]:
    """Write to ``out`` the checkpoint at ``src`` with attention heads of ``head_dim``,
    computing the same function. Returns what changed, which (with ``command``) is also
    recorded under ``widened`` in the copy's ``training.json``, if it has one."""
    from safetensors.torch import load_file, save_file

    src, out = Path(src), Path(out)
    cfg = json.loads((src / "config.json").read_text())
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    d = cfg.get("head_dim") or cfg["hidden_size"] // heads
    if not isinstance(head_dim, int) or head_dim <= d or head_dim % 2:
        raise SettingError(f"--head-dim must be an even integer above the model's head size {d}; got {head_dim!r}")
    if cfg.get("rope_scaling") or cfg.get("model_type") in ("qwen3",) or cfg.get("no_rope_layers"):
        raise SettingError(f"{src}: widening keeps plain RoPE only (no rope_scaling, q/k norms or NoPE layers)")
    D = head_dim
    files = sorted(src.glob("*.safetensors"))
    if not files:
        raise SettingError(f"{src} holds no *.safetensors")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    scale = math.sqrt(D / d)
    new: dict[str, torch.Tensor] = {}
    for name, w in state.items():
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            new[name] = _spread(w.float(), heads, d, D, 0).to(w.dtype) * scale
        elif name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
            new[name] = _spread(w.float(), kv, d, D, 0).to(w.dtype)
        elif name.endswith("o_proj.weight"):
            new[name] = _spread(w.float(), heads, d, D, 1).to(w.dtype)
        else:
            new[name] = w
    out.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():  # tokenizer, model card notes: as they are
        if f.is_file() and f.suffix != ".safetensors" and f.name != "config.json":
            shutil.copy(f, out / f.name)
    theta = float(cfg.get("rope_theta", 10000.0))
    cfg.update(head_dim=D, rope_theta=theta ** (D / d))
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in new.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    info = {"head_dim": [d, D], "rope_theta": [theta, cfg["rope_theta"]], "q_scale": scale}
    record = out / "training.json"
    if record.is_file():  # the weights are no longer the training run's alone: say so beside its command
        meta = json.loads(record.read_text())
        meta["widened"] = {"command": command, **info}
        record.write_text(json.dumps(meta, indent=2) + "\n")
    return info


def cmd_widen(args: Any) -> None:
    from ..models.registry import resolve_model

    path, _ = resolve_model(args.model)
    info = widen_heads(path, args.out, args.head_dim, "python -m ponder.train " + " ".join(args.argv))
    print(f"wrote {args.out}: head size {info['head_dim'][0]} -> {info['head_dim'][1]}, rope_theta "
          f"{info['rope_theta'][0]:g} -> {info['rope_theta'][1]:.6g}, q scaled by {info['q_scale']:.6f}")
