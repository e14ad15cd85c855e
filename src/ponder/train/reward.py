"""Reward-model training: sample the target model's own solutions, label them with the
exact checkers, and fit a scalar head (per step and final) on a copy of the target.

Initialising from the target is the usual practice for PRMs (Lightman et al. 2023;
Wang et al. 2024, Math-Shepherd): the backbone already reads arithmetic.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import SettingError
from ..models.config import ModelConfig
from ..models.llama import Transformer
from ..models.loader import load_tokenizer, load_transformer
from ..backends.native import NativeLM
from ..scoring.reward import RewardModel
from ..tasks import arith
from .common import Schedule, lr_at, optimizer_step, save_checkpoint, training_record

# Reward data leans to the harder shapes, where the target errs and labels are mixed.
SAMPLE_LEVELS = [arith.Level(f"rm{n}x{d}", n, n, d) for n in range(3, 7) for d in (1, 2, 2, 2)]


def _levels(args) -> list[arith.Level]:
    """One level per operand count and digit count the flags name."""
    return [arith.Level(f"rm{n}x{d}", n, n, int(d)) for n in range(args.min_operands, args.max_operands + 1)
            for d in str(args.digits).split(",")]


def _labelled(task: arith.ArithTask, problem: arith.Problem, text: str) -> dict:
    """A training row: the solution with the checker's prefix labels and its verdict."""
    return {"question": problem.question, "completion": text,
            "step_labels": task.prefix_correct(problem, task.split_steps(text)),
            "correct": task.check_answer(problem, text)}


def make_samples(args) -> None:
    from ..decoding.generate import Sample

    torch.set_num_threads(args.threads)
    lm = NativeLM(load_transformer(args.policy), load_tokenizer(args.policy), "policy")
    task = arith.ArithTask()
    gen = Sample(lm, temperature=args.temperature, max_tokens=160)
    levels = _levels(args)
    stream = arith.training_stream(10_000 + args.seed, levels or SAMPLE_LEVELS)
    qs = [next(stream)[0] for _ in range(args.problems)]
    t0 = time.time()
    n_ok = n_all = 0
    with open(args.out, "w") as f:
        for i in range(0, len(qs), 32):
            chunk = [arith.make_problem(q, f"rm{i + k}") for k, q in enumerate(qs[i : i + 32])]
            outs = gen.generate_batch([task.prompt(p) for p in chunk], n=args.per_problem, seed=args.seed + i)
            for p, gs in zip(chunk, outs):
                for g in gs:
                    row = _labelled(task, p, g.text)
                    n_ok += row["correct"]
                    n_all += 1
                    f.write(json.dumps(row) + "\n")
            print(f"{i + len(chunk)}/{len(qs)} problems, {n_ok}/{n_all} correct, {time.time() - t0:.0f}s", flush=True)


# The slips the target makes when sampled at expert (200 problems x 16 at T = 0.7, first
# error of each wrong solution): a wrong result 68%, a term used twice 21%, a term not in
# the question (or with its sign flipped) 11%, a term left out 1%.
SLIPS = (("result", 0.68), ("twice", 0.21), ("foreign", 0.10), ("dropped", 0.01))


def slipped_solution(rng: random.Random, question: str, slips: int) -> str:
    """A solution in a random admissible order with ``slips`` of the target's kinds of
    error, each at a random step, carried on as the target carries its own: later steps
    start from the wrong total, and a term used twice leaves one unused. The labels come
    from the task's checker, not from here."""
    terms = arith.parse_question(question)
    total, unused = terms[0][1], [terms[i] for i in arith.random_order(rng, len(terms))]
    at = set(rng.sample(range(len(unused)), min(slips, len(unused))))
    used, lines, step = [], [], 0
    while unused:
        op, b = unused.pop(0)
        kind = rng.choices([k for k, _ in SLIPS], [w for _, w in SLIPS])[0] if step in at else None
        if kind == "twice" and used:
            unused.insert(0, (op, b))
            op, b = rng.choice(used)
            unused.pop(rng.randrange(len(unused)))  # the target then stops one term short
        elif kind == "foreign":  # the term with its sign flipped, or a number near it
            if rng.random() < 0.3:
                op = "-" if op == "+" else "+"
            else:
                b = max(0, b + rng.choice([-10, -1, 1, 10, rng.randint(-20, 20) or 3]))
        elif kind == "dropped":
            step += 1
            continue
        new = total + b if op == "+" else total - b
        if kind == "result":
            new += rng.choice([-100, -10, -10, -2, -1, -1, 1, 1, 2, 10, 10, 100])
        lines.append(f"{total}{op}{b}={new}")
        used.append((op, b))
        total, step = new, step + 1
    return "".join(line + "\n" for line in lines) + f"{arith.ANSWER_PREFIX}{total}\n"


def make_slipped(args) -> None:
    """Labelled solutions with the target's kinds of slip planted (``ponder.train
    slipped``): the target's own samples hold one first error per 14 steps; planted slips
    give the reward model many more, of the same kinds, to learn to check each step from."""
    rng = random.Random(args.seed)
    task = arith.ArithTask()
    levels = _levels(args)
    stream = arith.training_stream(20_000 + args.seed, levels)
    n_ok = 0
    with open(args.out, "w") as f:
        for i in range(args.problems):
            q = next(stream)[0]
            p = arith.make_problem(q, f"slip{i}")
            slips = 0 if rng.random() >= args.rate else (2 if rng.random() < 0.1 else 1)
            row = _labelled(task, p, slipped_solution(rng, q, slips))
            n_ok += row["correct"]
            f.write(json.dumps(row) + "\n")
    print(f"{args.problems} solutions, {n_ok} correct", flush=True)


def _verifier_from(policy: Transformer, extra_layers: int, freeze: bool) -> tuple[Transformer, ModelConfig]:
    """A token-classification copy of the policy, ``extra_layers`` blocks deeper, its head at zero.

    Why deeper: a causal LM forms its prediction of token i in its last block, at position
    i - 1, so no block of the policy's own can compare that prediction with the token that
    came. Blocks added on top read both, and spotting a digit the arithmetic did not predict
    is what checking a step is. They start near the identity (small output projections), so
    training starts from the policy's features; ``freeze`` keeps those features intact."""
    if extra_layers < 0:
        raise SettingError(f"--extra-layers must be >= 0; got {extra_layers}")
    n = policy.cfg.num_hidden_layers
    cfg = replace(policy.cfg, architecture="LlamaForTokenClassification", num_labels=1,
                  num_hidden_layers=n + extra_layers,
                  rope_layers=policy.cfg.rope_layers and (*policy.cfg.rope_layers, *(True,) * extra_layers))
    model = Transformer(cfg)
    sd = {k: v for k, v in policy.state_dict().items() if not k.startswith("lm_head")}
    model.load_state_dict(sd, strict=False)
    for block in model.layers[n:]:
        for name, w in block.named_parameters():
            if w.dim() == 2:  # small, not zero: zero output projections would leave the rest without a gradient
                torch.nn.init.normal_(w, std=0.02 / (math.sqrt(2 * cfg.num_hidden_layers)
                                                     if name.endswith(("o_proj.weight", "down_proj.weight")) else 1))
    torch.nn.init.zeros_(model.score.weight)
    torch.nn.init.zeros_(model.score.bias)
    if freeze:
        for m in [model.embed_tokens, *model.layers[:n]]:
            m.requires_grad_(False)
    return model, cfg


def _surprisal(policy: Transformer, below: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """-log p_policy(token i | tokens < i) at every position i ([B, T], 0 at i = 0, capped at
    8 nats), from the policy's last block's output ``below`` (the frozen verifier's own)."""
    with torch.no_grad():
        lp = torch.log_softmax(policy.logits(policy.norm(below)).float(), -1)  # [B, T, V]
        out = torch.zeros(x.shape)
        out[:, 1:] = -lp[:, :-1].gather(-1, x[:, 1:, None])[..., 0]
    return out.clamp(max=8.0)


def _token_labels(tok, task: arith.ArithTask, question: str, completion: str, ids: list[int],
                  start: int) -> list[float] | None:
    """The checker's verdict at each solution token ``ids[start:]``: can the text up to its
    last character still be finished right (``valid_prefix``)? The EOS takes the last
    character's. None when the tokens do not decode to the text character for character
    (a sampled stray byte decodes to U+FFFD): that row keeps its step labels only."""
    valid = task.valid_prefix(arith.make_problem(question, "row"), completion)
    ends = []
    for i in ids[start:]:
        ends.append((ends[-1] if ends else 0) + len(tok.decode([i])))  # the EOS decodes to ""
    if not ends or ends[-1] != len(completion):
        return None
    return [float(valid[e - 1]) if e else 1.0 for e in ends]


def _batch(batch: list, eos: int) -> tuple[torch.Tensor, ...]:
    """Right-padded ids [B, T]; the read positions (row, column) and their labels; a mask
    [B, T] of the solution's tokens; and the token labels [B, T] with their mask."""
    T = max(len(ids) for ids, *_ in batch)
    x = torch.full((len(batch), T), eos, dtype=torch.long)
    solution = torch.zeros(len(batch), T, dtype=torch.bool)
    dense = torch.zeros(len(batch), T)
    labelled = torch.zeros(len(batch), T, dtype=torch.bool)
    bi, pi, yl = [], [], []
    for i, (ids, pos, lab, start, token_labels) in enumerate(batch):
        x[i, : len(ids)] = torch.tensor(ids)
        solution[i, start : len(ids)] = True
        if token_labels:
            dense[i, start : len(ids)] = torch.tensor(token_labels)
            labelled[i, start : len(ids)] = True
        bi += [i] * len(pos)
        pi += pos
        yl += lab
    return x, torch.tensor(bi), torch.tensor(pi), torch.tensor(yl), solution, (dense, labelled)


def train_reward(args) -> None:
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    tok = load_tokenizer(args.policy)
    policy = load_transformer(args.policy).eval()
    if args.token_weight < 0:
        raise SettingError(f"--token-weight must be >= 0; got {args.token_weight}")
    if args.surprisal_weight < 0 or (args.surprisal_weight and not (args.freeze_backbone and args.extra_layers)):
        raise SettingError("--surprisal-weight must be >= 0, and above 0 it needs --freeze-backbone and "
                           f"--extra-layers >= 1 (the policy's surprisal is read below the added blocks); got "
                           f"{args.surprisal_weight}, --extra-layers {args.extra_layers}")
    model, cfg = _verifier_from(policy, args.extra_layers, args.freeze_backbone)
    model.train()
    # The surprisal head is a training aid: a dense target (every token, not one label per
    # step) for the added blocks' comparison of each token with the policy's prediction.
    # It is not saved; the checkpoint keeps the one step/outcome head.
    aux = torch.nn.Linear(cfg.hidden_size, 1) if args.surprisal_weight else None
    if aux is not None:
        torch.nn.init.zeros_(aux.weight)
        torch.nn.init.zeros_(aux.bias)
    # Several sample files (say one per temperature) are read in the order given.
    rows = [json.loads(x) for path in args.samples for x in Path(path).read_text().splitlines() if x.strip()]
    rng = random.Random(args.seed)
    rm = RewardModel(model, tok, "reward")
    data, task = [], arith.ArithTask()
    for r in rows:
        prompt = f"Q: {r['question']}\n"
        ids, ends, eos_at = rm.layout(prompt, r["completion"])
        labels = r["step_labels"][: len(ends)]
        pos = ends[: len(labels)] + [eos_at]
        start = len(rm.layout(prompt, "")[0]) - 1  # the prompt's ids: that layout ends with an EOS
        dense = _token_labels(tok, task, r["question"], r["completion"], ids, start) if args.token_weight else None
        data.append((ids, pos, [float(x) for x in labels] + [float(r["correct"])], start, dense))
    print(f"{len(data)} labelled samples, {sum(r['correct'] for r in rows)} correct"
          + (f", {sum(d[-1] is not None for d in data)} with token labels" if args.token_weight else ""), flush=True)
    trained = [q for q in model.parameters() if q.requires_grad] + (list(aux.parameters()) if aux is not None else [])
    opt = torch.optim.AdamW(trained, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    t0 = time.time()
    schedule = Schedule(args.steps, args.minutes)
    step, ema = 0, None
    last_save = t0
    n = policy.cfg.num_hidden_layers
    while not schedule.done(step):
        for g in opt.param_groups:
            g["lr"] = lr_at(schedule.progress(step), args.lr)
        x, bi, pi, yl, solution, dense = _batch(rng.sample(data, min(args.batch, len(data))), rm.eos)
        h, hidden = model(x, output_hidden_states=True)
        score = model.logits(h)[..., 0]  # [B, T]
        loss = F.binary_cross_entropy_with_logits(score[bi, pi], yl)
        labels, known = dense
        if args.token_weight and known.any():  # a batch of rows without token labels has none to add
            loss = loss + args.token_weight * F.binary_cross_entropy_with_logits(score[known], labels[known])
        if aux is not None:
            loss = loss + args.surprisal_weight * F.mse_loss(aux(h)[..., 0][solution],
                                                             _surprisal(policy, hidden[n], x)[solution])
        ema = optimizer_step(model, opt, loss, ema)
        step += 1
        if step % 25 == 0:
            print(f"step {step} loss {ema:.4f} t {time.time() - t0:.0f}s", flush=True)
        if time.time() - last_save > args.save_every * 60:
            save_checkpoint(model, tok, Path(args.out), training_record(args, step, t0, ema, cfg))
            last_save = time.time()
    save_checkpoint(model, tok, Path(args.out), training_record(args, step, t0, ema, cfg))
    print(f"done: {step} steps, loss {ema:.4f}", flush=True)
