"""Batch-1 greedy decoding of a model of SmolLM-135M's shape, ponder against
transformers, and against the memory-bandwidth limit measured in the same run.

The model: a Llama with SmolLM-135M's dimensions (576 hidden, 1536 FFN, 30 layers, 9
query and 3 KV heads, tied embeddings), random weights (seeded), and the shipped
tokenizer (vocabulary 264, so 106M parameters rather than 135M), built with
transformers and saved to a temporary folder; both sides load that folder. Nothing is
downloaded.

The limit: at batch 1 every weight is read once per token, so a token takes at least
(weight bytes) / (memory bandwidth). The bandwidth is a torch copy of a 512 MiB buffer
into another whose pages were touched first, counted as bytes read plus bytes written
(STREAM's convention), on the same number of threads. ``over_limit`` is ponder's time
per token over that bound (1.0 would be the bound itself).

For each thread count (1 and 2), both decode the same prompt, interleaved over
rounds; the best round of each is compared. The last line is one JSON object: main
keys ``ratio_2_threads`` (ponder tokens/s over transformers', goal >= 1.5) and
``over_limit_2_threads`` (goal <= 1.25).

    python benchmarks/large_model.py [--tokens 48] [--rounds 3] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch

SMOLLM_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                   num_key_value_heads=3, max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5,
                   tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)


def build(folder: Path) -> None:
    """A random Llama of SmolLM-135M's shape, saved with the shipped tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ponder.models.registry import resolve_model

    arith, _ = resolve_model("arith")
    tok = arith / "tokenizer.json"
    vocab = json.loads(tok.read_text())["model"]["vocab"]
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), **SMOLLM_135M)).eval()
    model.save_pretrained(folder)
    shutil.copy(tok, folder / "tokenizer.json")


def copy_bandwidth(threads: int, mib: int = 512, repeats: int = 5) -> float:
    """Bytes per second moved by a large copy (read + write), best of ``repeats``."""
    torch.set_num_threads(threads)
    n = mib * 2**20 // 4
    src = torch.ones(n)
    dst = torch.zeros(n)  # pages touched: the copy measures bandwidth, not page faults
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t)
    return 2 * n * 4 / best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="1,2")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from decode_speed import race  # the same race as decode_speed.py's (this folder is on sys.path)

    from ponder.backends.native import NativeLM
    from ponder.models.kernel import cpu_summary

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cpu = cpu_summary()
    print(f"cpu: {cpu}", flush=True)
    folder = Path(tempfile.mkdtemp(prefix="ponder-smollm-shape-"))
    try:
        build(folder)
        lm = NativeLM.from_pretrained(folder)
        hf = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
        params = lm.num_parameters()
        # every weight matrix is read once per token; the embedding lookup reads one row,
        # but tied embeddings are read whole as the output head
        weight_bytes = params * 4
        print(f"model: {params / 1e6:.1f}M parameters, {weight_bytes / 2**20:.0f} MiB of float32 weights read per token; "
              f"ponder runs it on {lm.backend_in_use}", flush=True)
        ids = lm.encode("Q: 123+456-789+12-345+678\n")
        result = {**cpu, "benchmark": "large_model", "parameters": params, "weight_mib": round(weight_bytes / 2**20),
                  "new_tokens": args.tokens, "backend": lm.backend_in_use}
        for threads in [int(t) for t in args.threads.split(",")]:
            bw = copy_bandwidth(threads)
            torch.set_num_threads(threads)
            best_p, best_h, same = race(lm, hf, ids, args.tokens, args.rounds, say=False)
            ms_p, ms_h = 1e3 * best_p / args.tokens, 1e3 * best_h / args.tokens
            limit_ms = 1e3 * weight_bytes / bw
            print(f"{threads} thread(s): ponder {ms_p:.1f} ms/token, transformers {ms_h:.1f} ms/token "
                  f"({ms_h / ms_p:.2f}x); copy bandwidth {bw / 1e9:.1f} GB/s -> bound {limit_ms:.1f} ms/token, "
                  f"ponder at {ms_p / limit_ms:.2f}x the bound; identical tokens: {same}", flush=True)
            result.update({f"ponder_ms_{threads}": round(ms_p, 2), f"hf_ms_{threads}": round(ms_h, 2),
                           f"ratio_{threads}_threads": round(ms_h / ms_p, 3),
                           f"copy_gb_s_{threads}": round(bw / 1e9, 2), f"limit_ms_{threads}": round(limit_ms, 2),
                           f"over_limit_{threads}_threads": round(ms_p / limit_ms, 3),
                           f"identical_tokens_{threads}": same})
        print(json.dumps(result))
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
