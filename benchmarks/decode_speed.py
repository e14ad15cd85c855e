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


def race(lm, hf, ids: list[int], tokens: int, rounds: int, say: bool = True) -> tuple[float, float, bool]:
    """Batch-1 greedy decoding of ``tokens`` tokens after ``ids`` by ponder (``lm``) and
    by transformers' ``generate`` (``hf``), EOS masked on both sides until the last
    token (min_tokens = min_new_tokens) so the counts are equal; after a warm-up,
    ``rounds`` interleaved rounds. Returns (ponder's best seconds, transformers' best
    seconds, whether every round gave identical tokens)."""
    from ponder.decoding.generate import Greedy

    ours = Greedy(lm, max_tokens=tokens, min_tokens=tokens)
    x = torch.tensor([ids])

    def run_ponder() -> tuple[float, list[int]]:
        t = time.perf_counter()
        (g,) = ours.generate(ids)
        return time.perf_counter() - t, g.token_ids

    def run_hf() -> tuple[float, list[int]]:
        t = time.perf_counter()
        with torch.inference_mode():
            out = hf.generate(x, attention_mask=torch.ones_like(x), do_sample=False, max_new_tokens=tokens,
                              min_new_tokens=tokens, pad_token_id=lm.eos_token_ids[0])
        return time.perf_counter() - t, out[0, len(ids):].tolist()

    run_ponder(), run_hf()  # warm-up
    best_p = best_h = float("inf")
    same = True
    for r in range(rounds):
        tp, a = run_ponder()
        th, b = run_hf()
        same &= a == b
        best_p, best_h = min(best_p, tp), min(best_h, th)
        if say:
            print(f"round {r}: ponder {tokens / tp:7.1f} tok/s   transformers {tokens / th:7.1f} tok/s", flush=True)
    return best_p, best_h, same


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

    from ponder.backends.native import NativeLM

    hf_logging.set_verbosity_error()
    lm = NativeLM.from_pretrained(args.model)
    hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    ids = lm.encode(args.prompt)
    best_p, best_h, same = race(lm, hf, ids, args.tokens, args.rounds)
    ponder_tps, hf_tps = args.tokens / best_p, args.tokens / best_h
    print(f"ponder {ponder_tps:.1f} tok/s, transformers {hf_tps:.1f} tok/s, ratio {ponder_tps / hf_tps:.2f}x, "
          f"identical tokens: {same}")
    from ponder.models.kernel import cpu_summary

    print(json.dumps({**cpu_summary(),
        "benchmark": "decode_speed", "model": lm.name, "parameters": lm.num_parameters(), "batch": 1,
        "new_tokens": args.tokens, "threads": args.threads, "ponder_tokens_per_s": round(ponder_tps, 1),
        "hf_tokens_per_s": round(hf_tps, 1), "ratio": round(ponder_tps / hf_tps, 3), "identical_tokens": same,
    }))


if __name__ == "__main__":
    main()
