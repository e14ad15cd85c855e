"""Speculative greedy decoding (draft model, and n-gram prompt lookup) against plain
greedy decoding, batch 1, on the ``arith`` test prompts.

All three decode the same prompts in this process, interleaved over rounds; the best
round of each is compared. The outputs must be token-for-token identical (lossless).
The last line is one JSON object: ``ratio`` is the better speedup of the two drafters
(goal >= 1.8), ``acceptance_rate`` that drafter's share of accepted draft tokens.

    python benchmarks/speculative.py [--level hard] [--problems 20] [--draft-tokens 4] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="arith")
    ap.add_argument("--draft-model", default="arith-draft")
    ap.add_argument("--level", default="hard")
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--draft-tokens", default="4")  # the library default; the best of 3, 4 and 5 measured on arith (C kernel)
    ap.add_argument("--rounds", type=int, default=7)  # best of 7 interleaved rounds: steadier on a shared machine
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ponder.decoding.generate import Greedy
    from ponder.decoding.speculative import Speculative
    from ponder.backends.native import NativeLM
    from ponder.tasks.arith import ArithTask

    lm = NativeLM.from_pretrained(args.model)
    draft = NativeLM.from_pretrained(args.draft_model)
    task = ArithTask()
    prompts = [task.prompt(p) for p in task.problems(args.level, args.problems)]
    k = args.draft_tokens if args.draft_tokens == "auto" else int(args.draft_tokens)
    runners = {
        "greedy": Greedy(lm, max_tokens=160),
        "draft": Speculative(lm, draft, num_draft_tokens=k, max_tokens=160),
        "ngram": Speculative(lm, "ngram", num_draft_tokens=k, max_tokens=160),
    }

    def run(name: str):
        t = time.perf_counter()
        outs = [runners[name].generate(p)[0] for p in prompts]  # batch 1, one after another
        return time.perf_counter() - t, outs

    for name in runners:  # warm-up
        run(name)
    best = {name: float("inf") for name in runners}
    identical = True
    acc = {}
    for r in range(args.rounds):
        results = {name: run(name) for name in runners}
        ref = [g.token_ids for g in results["greedy"][1]]
        for name in ("draft", "ngram"):
            outs = results[name][1]
            identical &= [g.token_ids for g in outs] == ref
            acc[name] = sum(g.meta["accepted"] for g in outs) / max(1, sum(g.meta["drafted"] for g in outs))
        for name, (t, _) in results.items():
            best[name] = min(best[name], t)
        print(f"round {r}: " + "   ".join(f"{n} {results[n][0]:.2f}s" for n in runners))
    tokens = sum(len(g.token_ids) for g in results["greedy"][1])
    speed = {name: best["greedy"] / best[name] for name in ("draft", "ngram")}
    winner = max(speed, key=speed.get)
    for name in ("draft", "ngram"):
        print(f"{name:6s}: speedup {speed[name]:.2f}x, acceptance {acc[name]:.3f}")
    print(f"plain greedy {tokens / best['greedy']:.1f} tok/s; outputs identical: {identical}")
    from ponder.models.llama_c import cpu_summary

    print(json.dumps({**cpu_summary(), "benchmark": "speculative", "model": lm.name, "draft_model": draft.name, "level": args.level,
                      "problems": len(prompts), "draft_tokens": args.draft_tokens, "threads": args.threads,
                      "speedup_draft": round(speed["draft"], 3), "speedup_ngram": round(speed["ngram"], 3),
                      "acceptance_draft": round(acc["draft"], 3), "acceptance_ngram": round(acc["ngram"], 3),
                      "best": winner, "ratio": round(speed[winner], 3), "acceptance_rate": round(acc[winner], 3),
                      "identical_outputs": identical}))


if __name__ == "__main__":
    main()
