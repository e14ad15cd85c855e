"""The shipped models, which live inside the package (nothing is downloaded)."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import CheckpointError

SHIPPED = {
    "arith": "target model for the arith task",
    "arith-draft": "draft model for arith (speculative and contrastive decoding)",
    "arith-reward": "reward model for arith: per-step (PRM) and final (ORM) scores",
}


def models_dir() -> Path:
    return Path(str(resources.files("ponder") / "assets" / "models"))


def shipped_models() -> dict[str, Path]:
    root = models_dir()
    return {name: root / name for name in SHIPPED if (root / name / "config.json").exists()}


def resolve_model(name_or_path: str) -> tuple[Path, str]:
    """A shipped model's name or a local checkpoint folder -> (folder, display name)."""
    shipped = shipped_models()
    if name_or_path in shipped:
        return shipped[name_or_path], name_or_path
    p = Path(name_or_path).expanduser()
    if p.is_dir() and (p / "config.json").exists():
        return p, p.name
    known = ", ".join(shipped) or "(none installed)"
    if p.exists():
        raise CheckpointError(f"{name_or_path!r} has no config.json; give a Hugging Face checkpoint folder")
    raise CheckpointError(f"{name_or_path!r} is neither a shipped model ({known}) nor a local checkpoint folder")
