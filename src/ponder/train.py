"""Train ponder's shipped models on the ``arith`` task, with the native model code.

    python -m ponder.train tokenizer --out DIR
    python -m ponder.train lm --out DIR --hidden 256 --layers 4 --minutes 60
    python -m ponder.train samples --policy DIR --out samples.jsonl --problems 4000
    python -m ponder.train reward --policy DIR --samples samples.jsonl --out DIR --minutes 20

Schedules are time-budgeted: the learning rate follows warm-up then cosine decay over
the fraction of ``--minutes`` elapsed, so a run fits the session it is given. Checkpoints
(Hugging Face format, loadable by transformers) are written every ``--save-every``
minutes and at the end, so an interrupted run still leaves a usable model.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from .models.config import ModelConfig
from .models.llama import Transformer
from .tasks import arith

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


def lm_batch(tok, stream, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, T] and loss weights [B, T]: loss only on the solution and its EOS,
    never on the random question digits, which cannot be predicted."""
    eos = tok.token_to_id(EOS)
    pairs = [next(stream) for _ in range(batch)]
    prompts = tok.encode_batch([f"Q: {q}\n" for q, _ in pairs])
    sols = tok.encode_batch([s for _, s in pairs], add_special_tokens=False)
    seqs, weights = [], []
    for p, s in zip(prompts, sols):
        seqs.append(p.ids + s.ids + [eos])
        weights.append([0] * len(p.ids) + [1] * (len(s.ids) + 1))
    T = max(map(len, seqs))
    ids = torch.full((batch, T), eos, dtype=torch.long)
    w = torch.zeros((batch, T))
    for i, (s, ww) in enumerate(zip(seqs, weights)):
        ids[i, : len(s)] = torch.tensor(s)
        w[i, : len(ww)] = torch.tensor(ww, dtype=torch.float)
    return ids, w


def train_lm(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = _load_tok(args.tokenizer)
    cfg = make_config(tok, args.hidden, args.layers, args.heads, args.kv_heads, args.ffn)
    model = Transformer(cfg)
    _init_weights(model)
    if args.init:  # continue from a checkpoint (a new schedule, a fresh optimiser)
        from .models.loader import load_state_dict

        model.load_hf_state_dict(load_state_dict(Path(args.init)))
        print(f"initialised from {args.init}", flush=True)
    print(f"params: {cfg.num_parameters():,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    levels = [arith.Level(f"train{n}x{d}", n, n, d)
              for n in range(args.min_operands, args.max_operands + 1) for d in _ints(args.digits)]
    stream = arith.training_stream(args.seed + 1, levels, block=args.batch)
    out = Path(args.out)
    t0 = last_save = time.time()
    budget = args.minutes * 60
    step, ema = 0, None
    while True:
        progress = (time.time() - t0) / budget
        if progress >= 1 or (args.steps and step >= args.steps):
            break
        for g in opt.param_groups:
            g["lr"] = lr_at(progress, args.lr)
        ids, w = lm_batch(tok, stream, args.batch)
        h = model(ids[:, :-1])
        logits = model.logits(h)
        loss_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        wt = w[:, 1:].reshape(-1)
        loss = (loss_tok * wt).sum() / wt.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 50 == 0:
            print(f"step {step} loss {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} t {time.time()-t0:.0f}s", flush=True)
        if time.time() - last_save > args.save_every * 60:
            save_checkpoint(model, tok, out, _meta(args, step, t0, ema, cfg))
            if args.keep_checkpoints:  # a history to pick from (e.g. by held-out accuracy)
                save_checkpoint(model, tok, out.with_name(f"{out.name}-step{step}"), _meta(args, step, t0, ema, cfg))
            last_save = time.time()
    save_checkpoint(model, tok, out, _meta(args, step, t0, ema, cfg))
    print(f"done: {step} steps, loss {ema:.4f}, {time.time()-t0:.0f}s", flush=True)


def _ints(spec: str) -> list[int]:
    return [int(x) for x in str(spec).split(",") if x.strip()]


def _meta(args, step, t0, loss, cfg) -> dict:
    return {
        "kind": args.cmd,
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


def _init_weights(model: Transformer) -> None:
    for name, p in model.named_parameters():
        if p.dim() == 2:
            torch.nn.init.normal_(p, std=0.02)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.data /= math.sqrt(2 * model.cfg.num_hidden_layers)
        elif name.endswith("bias"):
            torch.nn.init.zeros_(p)


def _load_tok(path: str):
    from tokenizers import Tokenizer

    p = Path(path)
    return Tokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))


def cmd_tokenizer(args) -> None:
    tok = build_tokenizer(corpus(20000, seed=args.seed), vocab_size=args.vocab_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    print(f"vocab {tok.get_vocab_size()} -> {out/'tokenizer.json'}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m ponder.train", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("tokenizer", help="train the shared BPE tokenizer")
    t.add_argument("--out", required=True)
    t.add_argument("--vocab-size", type=int, default=320)
    t.add_argument("--seed", type=int, default=0)
    for name in ("lm", "reward"):
        p = sub.add_parser(name, help=f"train a {'language' if name == 'lm' else 'reward'} model")
        p.add_argument("--out", required=True)
        p.add_argument("--tokenizer", required=True, help="folder or tokenizer.json")
        p.add_argument("--hidden", type=int, default=256)
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--heads", type=int, default=4)
        p.add_argument("--kv-heads", type=int, default=2)
        p.add_argument("--ffn", type=int, default=None)
        p.add_argument("--batch", type=int, default=64)
        p.add_argument("--lr", type=float, default=2e-3)
        p.add_argument("--minutes", type=float, default=60)
        p.add_argument("--steps", type=int, default=0, help="stop after this many steps (0: time only)")
        p.add_argument("--save-every", type=float, default=5.0, help="minutes between checkpoints")
        p.add_argument("--threads", type=int, default=1)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--keep-checkpoints", action="store_true",
                       help="also keep every checkpoint in OUT-stepN next to OUT")
        p.add_argument("--init", default=None, help="checkpoint folder to start from")
        p.add_argument("--min-operands", type=int, default=2)
        p.add_argument("--max-operands", type=int, default=7)
        p.add_argument("--digits", default="1,2,2,3,3,3",
                       help="operand digit counts to draw from (repeats weight a size)")
        if name == "reward":
            p.add_argument("--policy", required=True, help="target model folder, used to initialise")
            p.add_argument("--samples", required=True, help="labelled samples JSONL")
    s = sub.add_parser("samples", help="sample and label target-model solutions for reward training")
    s.add_argument("--policy", required=True)
    s.add_argument("--out", required=True)
    s.add_argument("--problems", type=int, default=3000)
    s.add_argument("--per-problem", type=int, default=4)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--min-operands", type=int, default=3)
    s.add_argument("--max-operands", type=int, default=6)
    s.add_argument("--digits", default="1,2,2,2")
    args = ap.parse_args(argv)
    if args.cmd == "tokenizer":
        cmd_tokenizer(args)
    elif args.cmd == "lm":
        train_lm(args)
    elif args.cmd == "reward":
        from .train_reward import train_reward

        train_reward(args)
    elif args.cmd == "samples":
        from .train_reward import make_samples

        make_samples(args)


if __name__ == "__main__":
    main()
