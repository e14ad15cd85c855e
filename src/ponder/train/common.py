"""What both trainings share: the tokenizer, configs, the schedule, checkpoints and
their record."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import torch

from ..models.config import ModelConfig
from ..models.llama import Transformer
from ..tasks import arith

EOS = "<|endoftext|>"
# Qwen2's pre-tokenizer pattern: digits split one by one, so numbers are spelled digit
# by digit (what arithmetic needs) and llama.cpp recognises the pre-tokenizer.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def build_tokenizer(texts: list[str], vocab_size: int = 320):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Every sequence starts with <|endoftext|> as BOS: a fixed anchor for position 0.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{EOS} $A", pair=f"{EOS} $A {EOS} $B", special_tokens=[(EOS, tok.token_to_id(EOS))]
    )
    return tok


def corpus(n: int, seed: int = 0) -> list[str]:
    stream = arith.training_stream(seed)
    return [f"Q: {q}\n{s}" for q, s in (next(stream) for _ in range(n))]


def save_checkpoint(model: Transformer, tok, out: Path, meta: dict | None = None) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    save_file(model.hf_state_dict(), str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(model.cfg.to_hf_dict(), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    if meta is not None:
        (out / "training.json").write_text(json.dumps(meta, indent=2) + "\n")


def make_config(tok, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int | None, reward: bool = False) -> ModelConfig:
    eos = tok.token_to_id(EOS)
    return ModelConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=ffn or int(8 * hidden / 3 / 32 + 0.999) * 32,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        head_dim=hidden // heads,
        rope_theta=10000.0,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
        architecture="LlamaForTokenClassification" if reward else "LlamaForCausalLM",
        num_labels=1 if reward else 0,
    )


def lr_at(progress: float, peak: float, warmup: float = 0.03, floor: float = 0.05) -> float:
    if progress < warmup:
        return peak * progress / warmup
    p = min(1.0, (progress - warmup) / (1 - warmup))
    return peak * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)))


class Schedule:
    """Where a run is in its learning-rate schedule. With ``--steps N`` the schedule runs
    over steps (progress = step / N), so the same command gives the same model on any
    machine; with only ``--minutes`` it runs over the fraction of the time budget spent
    (a run that fits its session, but depends on the machine's speed)."""

    def __init__(self, steps: int, minutes: float) -> None:
        self.steps, self.budget_s, self.t0 = steps, minutes * 60, time.time()

    def progress(self, step: int) -> float:
        if self.steps:
            return step / self.steps
        return (time.time() - self.t0) / self.budget_s

    def done(self, step: int) -> bool:
        if self.steps:
            return step >= self.steps
        return self.progress(step) >= 1


def ints(spec: str) -> list[int]:
    return [int(x) for x in str(spec).split(",") if x.strip()]


def training_record(args, step, t0, loss, cfg) -> dict:
    """training.json: the figures of the run, every argument, and the command that
    reproduces it (bit for bit when it has --steps)."""
    return {
        "kind": args.cmd,
        "command": "python -m ponder.train " + " ".join(getattr(args, "argv", []) or []),
        "reproducible": bool(getattr(args, "steps", 0)),
        "args": {k: v for k, v in vars(args).items() if k != "argv"},
        "parameters": cfg.num_parameters(),
        "steps": step,
        "batch_size": args.batch,
        "peak_lr": args.lr,
        "wall_time_s": round(time.time() - t0, 1),
        "final_loss_ema": None if loss is None else round(loss, 5),
        "threads": args.threads,
        "seed": args.seed,
        "minutes_budget": args.minutes,
        "init": getattr(args, "init", None),
        "operands": [getattr(args, "min_operands", None), getattr(args, "max_operands", None)],
        "digits": getattr(args, "digits", None),
    }


def init_weights(model: Transformer) -> None:
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.data /= math.sqrt(2 * model.cfg.num_hidden_layers)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)


def load_tok(path: str):
    from tokenizers import Tokenizer

    p = Path(path)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


def optimizer_step(model: Transformer, opt: torch.optim.Optimizer, loss: torch.Tensor, ema: float | None) -> float:
    """One update (gradients clipped to norm 1); returns the loss's moving average."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    return loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
