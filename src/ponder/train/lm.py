"""Train the tokenizer and the language models (the policy and its draft)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..models.llama import Transformer
from ..tasks import arith
from .common import EOS, Schedule, optimizer_step, build_tokenizer, corpus, init_weights, ints, load_tok, lr_at, make_config, save_checkpoint, training_record


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
    tok = load_tok(args.tokenizer)
    cfg = make_config(tok, args.hidden, args.layers, args.heads, args.kv_heads, args.ffn)
    model = Transformer(cfg)
    init_weights(model)
    if args.init:  # continue from a checkpoint (a new schedule, a fresh optimiser)
        from ..models.loader import load_state_dict

        model.load_hf_state_dict(load_state_dict(Path(args.init)))
        print(f"initialised from {args.init}", flush=True)
    print(f"params: {cfg.num_parameters():,}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.1)
    levels = [arith.Level(f"train{n}x{d}", n, n, d)
              for n in range(args.min_operands, args.max_operands + 1) for d in ints(args.digits)]
    stream = arith.training_stream(args.seed + 1, levels, block=args.batch)
    out = Path(args.out)
    t0 = last_save = time.time()
    schedule = Schedule(args.steps, args.minutes)
    step, ema = 0, None
    while not schedule.done(step):
        for g in opt.param_groups:
            g["lr"] = lr_at(schedule.progress(step), args.lr)
        ids, w = lm_batch(tok, stream, args.batch)
        h = model(ids[:, :-1])
        logits = model.logits(h)
        loss_tok = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none")
        wt = w[:, 1:].reshape(-1)
        loss = (loss_tok * wt).sum() / wt.sum()
        ema = optimizer_step(model, opt, loss, ema)
        step += 1
        if step % 50 == 0:
            print(f"step {step} loss {ema:.4f} lr {opt.param_groups[0]['lr']:.2e} t {time.time()-t0:.0f}s", flush=True)
        if time.time() - last_save > args.save_every * 60:
            save_checkpoint(model, tok, out, training_record(args, step, t0, ema, cfg))
            if args.keep_checkpoints:  # a history to pick from (e.g. by held-out accuracy)
                save_checkpoint(model, tok, out.with_name(f"{out.name}-step{step}"), training_record(args, step, t0, ema, cfg))
            last_save = time.time()
    save_checkpoint(model, tok, out, training_record(args, step, t0, ema, cfg))
    print(f"done: {step} steps, loss {ema:.4f}, {time.time()-t0:.0f}s", flush=True)


def cmd_tokenizer(args) -> None:
    tok = build_tokenizer(corpus(20000, seed=args.seed), vocab_size=args.vocab_size)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    print(f"vocab {tok.get_vocab_size()} -> {out/'tokenizer.json'}")


