"""Time per token of JSON-schema-constrained sampling against unconstrained sampling.

Both sample from the shipped target model in this process, batch 1 (so that rows
finishing at different steps do not blur the figure), interleaved over several rounds;
the best round of each is compared (shared, noisy machine). The constrained
side pays for llguidance's mask at every step (the grammar is compiled once, outside
the timing, as a server would cache it); the unconstrained side is held to a similar
length with min_tokens. The last line is one JSON object; ``ratio`` is constrained
seconds per token divided by unconstrained seconds per token (goal: <= 1.25).

    python benchmarks/constrained_overhead.py [--model arith] [--samples 4] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "op": {"enum": ["add", "sub", "mul"]},
        "terms": {"type": "array", "items": {"type": "integer", "minimum": -99, "maximum": 999}, "maxItems": 6},
        "result": {"type": "integer", "minimum": -1000, "maximum": 1000},
        "check": {"type": "object", "properties": {"ok": {"type": "boolean"}, "steps": {"type": "integer"}},
                  "required": ["ok", "steps"], "additionalProperties": False},
    },
    "required": ["name", "op", "terms", "result", "check"],
    "additionalProperties": False,
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="arith")
    ap.add_argument("--samples", type=int, default=4, help="samples per round, one after another")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--max-tokens", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ponder.decoding.constraints import Grammar
    from ponder.decoding.generate import Sample
    from ponder.backends.native import NativeLM

    lm = NativeLM.from_pretrained(args.model)
    prompt = "Q: 12+7-3\n"
    t = time.perf_counter()
    grammar = Grammar.json_schema(lm, SCHEMA)
    compile_s = time.perf_counter() - t

    def run(constrained: bool, seed: int, min_tokens: int = 0) -> tuple[float, int, list]:
        gen = Sample(lm, max_tokens=args.max_tokens, min_tokens=min_tokens,
                     constraint=grammar.constraint() if constrained else None)
        t0 = time.perf_counter()
        gens = [gen.generate(prompt, seed=seed * 1000 + i)[0] for i in range(args.samples)]
        return time.perf_counter() - t0, sum(len(g.token_ids) for g in gens), gens

    _, n_c, _ = run(True, 0)  # warm-up, and the typical constrained length
    run(False, 0, min_tokens=min(args.max_tokens, n_c // args.samples))
    best_c = best_u = float("inf")
    valid = True
    for r in range(args.rounds):
        tc, nc, gens = run(True, r + 1)
        for g in gens:
            try:
                json.loads(g.text)
            except ValueError:
                valid = valid and g.finish_reason == "length"
        tu, nu, _ = run(False, r + 1, min_tokens=min(args.max_tokens, nc // args.samples))
        best_c, best_u = min(best_c, tc / nc), min(best_u, tu / nu)
        print(f"round {r}: constrained {1e3 * tc / nc:.3f} ms/token ({nc} tokens)   "
              f"unconstrained {1e3 * tu / nu:.3f} ms/token ({nu} tokens)")
    ratio = best_c / best_u
    print(f"constrained {1e3 * best_c:.3f} ms/token, unconstrained {1e3 * best_u:.3f} ms/token, ratio {ratio:.3f}x "
          f"(grammar compiled once in {1e3 * compile_s:.1f} ms)")
    from ponder.models.kernel import cpu_summary

    print(json.dumps({**cpu_summary(),
        "benchmark": "constrained_overhead", "model": lm.name, "samples_per_round": args.samples, "batch": 1,
        "threads": args.threads, "constrained_ms_per_token": round(1e3 * best_c, 4),
        "unconstrained_ms_per_token": round(1e3 * best_u, 4), "ratio": round(ratio, 3),
        "compile_ms": round(1e3 * compile_s, 1), "outputs_valid_json": valid,
    }))


if __name__ == "__main__":
    main()
