"""N samples of one prompt through the engine (one request, n = N) against N sequential
single requests, on the shipped target model.

Both sides run through the same engine and sample the same number of tokens (EOS held
back until ``--tokens``), interleaved over rounds; the best round of each is compared.
The last line is one JSON object; ``ratio`` is batched tokens/s over sequential tokens/s
(goal: >= 8 at N = 16). ``forward_ratio`` is the same comparison for the model's forward
passes alone (N one-row steps against one N-row step, no engine): the ceiling that the
hardware sets, since the engine's per-step work is the same or more for N rows.

    python benchmarks/parallel_samples.py [--n 16] [--tokens 64] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="arith")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", default="Q: 3+4-2+7-5+1-8+9\n")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ponder.decoding.generate import Sample
    from ponder.backends.native import NativeLM

    lm = NativeLM.from_pretrained(args.model)
    gen = Sample(lm, temperature=1.0, max_tokens=args.tokens, min_tokens=args.tokens)

    def batched(seed: int) -> tuple[float, int]:
        t = time.perf_counter()
        out = gen.generate(args.prompt, n=args.n, seed=seed)
        return time.perf_counter() - t, sum(len(g.token_ids) for g in out)

    def sequential(seed: int) -> tuple[float, int]:
        t = time.perf_counter()
        toks = sum(len(gen.generate(args.prompt, n=1, seed=seed * 1000 + i)[0].token_ids) for i in range(args.n))
        return time.perf_counter() - t, toks

    prompt = lm.encode(args.prompt)

    def forward_steps(rows: int) -> float:
        """Seconds per decode step of ``rows`` rows: the forward pass alone."""
        logits, cache = lm.prefill([prompt] * rows, capacity=len(prompt) + args.tokens + 1)
        tok = logits.argmax(-1)
        t = time.perf_counter()
        for _ in range(args.tokens):
            lm.step(tok, cache)
        return (time.perf_counter() - t) / args.tokens

    batched(0), sequential(0), forward_steps(1), forward_steps(args.n)  # warm-up
    best_b = best_s = 0.0
    step_1 = step_n = float("inf")
    for r in range(args.rounds):
        tb, nb = batched(r + 1)
        ts, ns = sequential(r + 1)
        best_b, best_s = max(best_b, nb / tb), max(best_s, ns / ts)
        step_1, step_n = min(step_1, forward_steps(1)), min(step_n, forward_steps(args.n))
        print(f"round {r}: batched {nb / tb:8.1f} tok/s   sequential {ns / ts:8.1f} tok/s")
    ratio = best_b / best_s
    forward_ratio = args.n * step_1 / step_n
    print(f"forward passes alone: 1 row {step_1 * 1e3:.3f} ms, {args.n} rows {step_n * 1e3:.3f} ms per step: "
          f"{forward_ratio:.2f}x the tokens/s")
    print(f"N={args.n}: batched {best_b:.1f} tok/s, sequential {best_s:.1f} tok/s, ratio {ratio:.2f}x")
    from ponder.models.kernel import cpu_summary

    print(json.dumps({**cpu_summary(), "benchmark": "parallel_samples", "model": lm.name, "n": args.n, "tokens_per_sample": args.tokens,
                      "threads": args.threads, "batched_tokens_per_s": round(best_b, 1),
                      "sequential_tokens_per_s": round(best_s, 1), "forward_ms_1_row": round(step_1 * 1e3, 4),
                      f"forward_ms_{args.n}_rows": round(step_n * 1e3, 4), "forward_ratio": round(forward_ratio, 3),
                      "ratio": round(ratio, 3)}))


if __name__ == "__main__":
    main()
