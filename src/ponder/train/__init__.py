"""Train ponder's shipped models on the ``arith`` task, with the native model code.

    python -m ponder.train tokenizer --out DIR
    python -m ponder.train lm --out DIR --hidden 256 --layers 4 --minutes 60
    python -m ponder.train samples --policy DIR --out samples.jsonl --problems 4000
    python -m ponder.train slipped --out slipped.jsonl --problems 20000
    python -m ponder.train reward --policy DIR --samples samples.jsonl --out DIR --minutes 20
    python -m ponder.train likelihood-verifier --checker DIR --samples samples.jsonl --out DIR
    python -m ponder.train widen-heads --model arith-reward --head-dim 32 --out DIR

The learning rate follows warm-up then cosine decay. With ``--steps N`` it runs over
the N steps, so the same command gives the same weights on any machine (the shipped
models' cards give their commands); with only ``--minutes`` it runs over the fraction
of the time budget spent, so a run fits the session it is given. Checkpoints
(Hugging Face format, loadable by transformers) are written every ``--save-every``
minutes and at the end, so an interrupted run still leaves a usable model.
"""

from __future__ import annotations

import argparse
import sys


def _reward_flags(p: argparse.ArgumentParser) -> None:
    """What a reward model trains from, and how deep it reads the policy."""
    p.add_argument("--policy", required=True, help="the language model whose embeddings and blocks the reward model starts from: the target, or one trained further")
    p.add_argument("--samples", required=True, nargs="+", help="labelled samples JSONL (one or more files)")
    p.add_argument("--extra-layers", type=int, default=0,
                   help="blocks added on top of the policy's (>= 0), starting near the identity: depth "
                        "to compare each token with the policy's prediction of it")
    p.add_argument("--freeze-backbone", action="store_true",
                   help="keep the policy's embeddings and blocks fixed; train the added blocks, "
                        "the final norm and the head")
    p.add_argument("--surprisal-weight", type=float, default=0.0,
                   help="weight (>= 0) of a second, dense target while training: the policy's "
                        "surprisal of every solution token (needs --freeze-backbone, --extra-layers)")
    p.add_argument("--token-weight", type=float, default=0.0,
                   help="weight (>= 0) of a dense second loss: at every solution token, can the text so far still be "
                        "finished right (the checker's verdict to the character), through the same head")


def _likelihood_verifier_flags(sub) -> None:
    v = sub.add_parser("likelihood-verifier", help="build (not train) a reward model whose score is a checker LM's "
                       "least token log-probability so far, then fit its head's scale on labelled samples")
    v.add_argument("--checker", required=True, help="the checker LM's checkpoint folder")
    v.add_argument("--samples", required=True, nargs="+", help="labelled samples JSONL (as `samples` writes)")
    v.add_argument("--out", required=True)
    v.add_argument("--per-file", type=int, default=1500, help="rows read from the start of each samples file")
    v.add_argument("--build-rows", type=int, default=1200, help="rows the built blocks are fitted on")
    v.add_argument("--calibration-rows", type=int, default=300, help="the next rows: the head's scale and bias")
    v.add_argument("--lse-steps", type=int, default=15000, help="Adam steps fitting the logsumexp units")
    v.add_argument("--threads", type=int, default=2)


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
        p.add_argument("--steps", type=int, default=0, help="train this many steps, the schedule over steps (reproducible); 0: over --minutes")
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
            _reward_flags(p)
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
    c = sub.add_parser("slipped", help="correct solutions with the target's kinds of slip planted, labelled, for "
                       "reward training")
    c.add_argument("--out", required=True)
    c.add_argument("--problems", type=int, default=20000)
    c.add_argument("--rate", type=float, default=0.5, help="share of solutions with a slip planted")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--min-operands", type=int, default=4)
    c.add_argument("--max-operands", type=int, default=8)
    c.add_argument("--digits", default="1,2")
    _likelihood_verifier_flags(sub)
    w = sub.add_parser("widen-heads", help="widen a checkpoint's attention heads (same outputs), e.g. to a head "
                       "size vLLM's CPU attention takes")
    w.add_argument("--model", required=True, help="a shipped model's name or a checkpoint folder")
    w.add_argument("--head-dim", type=int, required=True)
    w.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    if args.cmd == "widen-heads":
        from .widen import cmd_widen

        return cmd_widen(args)
    if args.cmd == "likelihood-verifier":
        from .likelihood_verifier import cmd_likelihood_verifier

        return cmd_likelihood_verifier(args)
    if args.cmd in ("tokenizer", "lm"):
        from .lm import cmd_tokenizer, train_lm

        (cmd_tokenizer if args.cmd == "tokenizer" else train_lm)(args)
    else:
        from .reward import make_samples, make_slipped, train_reward

        {"reward": train_reward, "samples": make_samples, "slipped": make_slipped}[args.cmd](args)
