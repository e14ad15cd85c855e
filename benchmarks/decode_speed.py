"""Native greedy decoding against transformers ``generate`` on the same weights.

Batch 1, 128 new tokens (EOS masked on both sides so the token counts are equal),
the shipped target model by default. Both run in this process, interleaved over
several rounds, and the best round of each is compared, which keeps the ratio honest
on a shared, noisy machine. The last line is one JSON object; ``ratio`` is ponder
tokens/s divided by transformers tokens/s.

    python benchmarks/decode_speed.py [--model arith] [--tokens 128] [--rounds 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="arith")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--prompt", default="Q: 123+456-789+12-345+678\n")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from ponder.decoding.generate import Greedy
    from ponder.backends.native import NativeLM

    hf_logging.set_verbosity_error()
    lm = NativeLM.from_pretrained(args.model)
    hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    ids = lm.encode(args.prompt)
    # EOS is masked until the last token on both sides (min_tokens = min_new_tokens).
    ours = Greedy(lm, max_tokens=args.tokens, min_tokens=args.tokens)
    x = torch.tensor([ids])

    def run_ponder() -> tuple[float, list[int]]:
        t = time.perf_counter()
        (g,) = ours.generate(ids)
        return time.perf_counter() - t, g.token_ids

    def run_hf() -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=args.tokens,
                              min_new_tokens=args.tokens, pad_token_id=lm.eos_token_ids[0])
        return time.perf_counter() - t, out[0, len(ids):].tolist()

    run_ponder(), run_hf()  # warm-up
    best_p = best_h = float("inf")
    same = True
    for r in range(args.rounds):
        tp, a = run_ponder()
        th, b = run_hf()
        same &= a == b
        best_p, best_h = min(best_p, tp), min(best_h, th)
        print(f"round {r}: ponder {args.tokens / tp:7.1f} tok/s   transformers {args.tokens / th:7.1f} tok/s")
    ponder_tps, hf_tps = args.tokens / best_p, args.tokens / best_h
    print(f"ponder {ponder_tps:.1f} tok/s, transformers {hf_tps:.1f} tok/s, ratio {ponder_tps / hf_tps:.2f}x, "
          f"identical tokens: {same}")
    from ponder.models.llama_c import cpu_summary

    print(json.dumps({**cpu_summary(),
        "benchmark": "decode_speed", "model": lm.name, "parameters": lm.num_parameters(), "batch": 1,
        "new_tokens": args.tokens, "threads": args.threads, "ponder_tokens_per_s": round(ponder_tps, 1),
        "hf_tokens_per_s": round(hf_tps, 1), "ratio": round(ponder_tps / hf_tps, 3), "identical_tokens": same,
    }))


if __name__ == "__main__":
    main()
