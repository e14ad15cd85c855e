"""Time and KV memory against the number of samples N (1 to 64) of one 480-token prompt (480 + 32 generated fill the shipped model's 512-position context).

Each N is one request through the engine (the prompt is prefilled once and forked), on
the shipped target model, after a warm-up. Prints a table and writes a PNG plot.
KV memory is reported three ways: the prefix cache's store (the shared prompt, kept
once), the running batch's peak (each row holds its own copy of the prompt's KV: this
is what grows with N), and the unique tokens' KV (what a paged, shared-prefix layout
would hold). The last line is one JSON object with the series and
``time_ratio_64_over_1`` (sublinear if far below 64).

    python benchmarks/scaling.py [--prompt-tokens 480] [--tokens 32] [--out scaling.png] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="arith")
    ap.add_argument("--prompt-tokens", type=int, default=480)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--ns", default="1,2,4,8,16,32,64")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="scaling.png")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ponder.decoding.generate import Sample
    from ponder.engine.engine import Engine
    from ponder.engine.engines import engine_for, set_engine
    from ponder.backends.native import NativeLM

    base = NativeLM.from_pretrained(args.model)
    text = "".join(f"Q: {i % 9}+{(i * 7) % 9}-{(i * 5) % 9}\n" for i in range(400))
    prompt = base.encode(text)[: args.prompt_tokens]
    per_token = 2 * base.cfg.num_hidden_layers * base.cfg.num_key_value_heads * base.cfg.head_dim * 4
    rows = []
    for n in [int(x) for x in args.ns.split(",")]:
        lm = NativeLM(base.model, base.tokenizer, base.name)  # a fresh engine and prefix cache per N
        eng = set_engine(lm, Engine(lm))
        gen = Sample(lm, max_tokens=args.tokens, min_tokens=args.tokens)
        gen.generate(prompt[:16], n=n, seed=0)  # warm-up on another prompt
        t = time.perf_counter()
        outs = gen.generate(prompt, n=n, seed=1)
        dt = time.perf_counter() - t
        unique = len(prompt) + sum(len(g.token_ids) for g in outs)
        rows.append({"n": n, "seconds": round(dt, 4), "tokens_per_s": round(n * args.tokens / dt, 1),
                     "prefix_store_bytes": eng.prefix_cache.nbytes, "batch_peak_kv_bytes": eng.peak_kv_bytes,
                     "unique_token_kv_bytes": unique * per_token,
                     "computed_tokens": sum(g.usage.computed_tokens for g in outs)})
        r = rows[-1]
        print(f"N={n:3d}  {dt:7.3f}s  {r['tokens_per_s']:8.1f} tok/s  prefix store {r['prefix_store_bytes'] / 2**20:6.2f} MiB  "
              f"batch peak KV {r['batch_peak_kv_bytes'] / 2**20:7.2f} MiB  unique-token KV {r['unique_token_kv_bytes'] / 2**20:6.2f} MiB  "
              f"computed {r['computed_tokens']}")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        ns = [r["n"] for r in rows]
        fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
        a.plot(ns, [r["seconds"] for r in rows], "o-", label="measured")
        a.plot(ns, [rows[0]["seconds"] * n for n in ns], "--", label="linear in N")
        a.set(xscale="log", yscale="log", xlabel="samples N", ylabel="seconds", title=f"{args.tokens} tokens per sample")
        a.legend()
        b.plot(ns, [r["batch_peak_kv_bytes"] / 2**20 for r in rows], "o-", label="running batch (peak)")
        b.plot(ns, [r["prefix_store_bytes"] / 2**20 for r in rows], "s-", label="prefix cache store")
        b.plot(ns, [r["unique_token_kv_bytes"] / 2**20 for r in rows], "^-", label="unique tokens")
        b.set(xscale="log", xlabel="samples N", ylabel="KV MiB", title=f"{len(prompt)}-token shared prompt")
        b.legend()
        fig.tight_layout()
        fig.savefig(args.out, dpi=100)
        print(f"plot: {args.out}")
    except ImportError:
        print("matplotlib is not installed: no plot")
    from ponder.models.kernel import cpu_summary

    print(json.dumps({**cpu_summary(), "benchmark": "scaling", "model": base.name, "prompt_tokens": len(prompt), "tokens": args.tokens,
                      "threads": args.threads, "rows": rows,
                      "time_ratio_64_over_1": round(rows[-1]["seconds"] / rows[0]["seconds"], 3)}))


if __name__ == "__main__":
    main()
