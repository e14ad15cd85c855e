"""Speculative greedy decoding (draft model, and n-gram prompt lookup) against plain
greedy decoding, batch 1, on the ``arith`` test prompts.

All three decode the same prompts in this process, interleaved over rounds; the best
round of each is compared. The outputs must be token-for-token identical (lossless).
n-gram lookup also runs on a copying set (``copying_prompts``: answers that repeat
spans of their prompts), against plain greedy on the same prompts.
The last line is one JSON object: ``ratio`` is the better speedup of the two drafters
on arith (goal >= 1.8), ``acceptance_rate`` that drafter's share of accepted draft
tokens; ``speedup_ngram`` (goal >= 1.0) and ``speedup_ngram_copying`` (goal >= 1.5).

    python benchmarks/speculative.py [--level hard] [--problems 20] [--draft-tokens 5] [--rounds 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def copying_prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts whose answers repeat long spans of the prompt (as summaries, code edits
    and retrieval-augmented answers do): where prompt lookup should pay. The shipped
    model answers one question per prompt and stops at its answer (asked the same
    question twice, it says nothing), so the copying is within one answer: an
    alternating question a+b-b+b-... whose first worked cycle is in the prompt, which
    the model's continuation then repeats line for line."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        out.append(f"Q: {a}" + f"+{b}-{b}" * 4 + f"\n{a}+{b}={a + b}\n{a + b}-{b}={a}\n")
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="arith")
    ap.add_argument("--draft-model", default="arith-draft")
    ap.add_argument("--level", default="hard")
    ap.add_argument("--problems", type=int, default=20)
    ap.add_argument("--draft-tokens", default="5")  # the library default: k + 1 = 6 fills the kernel's 6-row tile
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
    problems = task.problems(args.level, args.problems)
    prompts = [task.prompt(p) for p in problems]
    copying = copying_prompts(args.problems)
    k = args.draft_tokens if args.draft_tokens == "auto" else int(args.draft_tokens)
    runners = {
        "greedy": Greedy(lm, max_tokens=160),
        "draft": Speculative(lm, draft, num_draft_tokens=k, max_tokens=160),
        "ngram": Speculative(lm, "ngram", num_draft_tokens=k, max_tokens=160),
    }
    plan = [("arith", "greedy", prompts), ("arith", "draft", prompts), ("arith", "ngram", prompts),
            ("copying", "greedy", copying), ("copying", "ngram", copying)]

    def run(name: str, ps: list[str]):
        t = time.perf_counter()
        outs = [runners[name].generate(p)[0] for p in ps]  # batch 1, one after another
        return time.perf_counter() - t, outs

    for _, name, ps in plan:  # warm-up
        run(name, ps)
    best = {(s, n): float("inf") for s, n, _ in plan}
    identical = True
    acc = {}
    for r in range(args.rounds):
        results = {(s, n): run(n, ps) for s, n, ps in plan}  # interleaved: every round runs all of them
        for s, n, _ in plan:
            if n == "greedy":
                continue
            outs = results[(s, n)][1]
            identical &= [g.token_ids for g in outs] == [g.token_ids for g in results[(s, "greedy")][1]]
            acc[(s, n)] = sum(g.meta["accepted"] for g in outs) / max(1, sum(g.meta["drafted"] for g in outs))
        for key, (t, _) in results.items():
            best[key] = min(best[key], t)
        print(f"round {r}: " + "   ".join(f"{s}/{n} {results[(s, n)][0]:.2f}s" for s, n, _ in plan))
    tokens = sum(len(g.token_ids) for g in results[("arith", "greedy")][1])
    speed = {key: best[(key[0], "greedy")] / best[key] for key in best if key[1] != "greedy"}
    winner = max(("draft", "ngram"), key=lambda n: speed[("arith", n)])
    for (s, n), x in speed.items():
        print(f"{s:8s} {n:6s}: speedup {x:.2f}x, acceptance {acc[(s, n)]:.3f}")
    print(f"plain greedy {tokens / best[('arith', 'greedy')]:.1f} tok/s on arith; outputs identical: {identical}")
    from ponder.models.kernel import cpu_summary

    print(json.dumps({**cpu_summary(), "benchmark": "speculative", "model": lm.name, "draft_model": draft.name, "level": args.level,
                      "problems": len(prompts), "draft_tokens": args.draft_tokens, "threads": args.threads,
                      "speedup_draft": round(speed[("arith", "draft")], 3),
                      "speedup_ngram": round(speed[("arith", "ngram")], 3),
                      "speedup_ngram_copying": round(speed[("copying", "ngram")], 3),
                      "acceptance_draft": round(acc[("arith", "draft")], 3),
                      "acceptance_ngram": round(acc[("arith", "ngram")], 3),
                      "acceptance_ngram_copying": round(acc[("copying", "ngram")], 3),
                      "best": winner, "ratio": round(speed[("arith", winner)], 3),
                      "acceptance_rate": round(acc[("arith", winner)], 3), "identical_outputs": identical}))


if __name__ == "__main__":
    main()
