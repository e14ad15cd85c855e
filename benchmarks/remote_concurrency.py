"""64 requests of the `arith` hard prompts through ``OpenAILM`` at a concurrency limit
of 64 against a limit of 1, against ``ponder serve`` and against the real vLLM engine
(CPU build) serving the same shipped model, each started here on loopback.

Greedy, 160 tokens at most (the model stops at its answer, about 50 tokens), the same
prompts for both servers; generated tokens are the servers' own usage counts. After a
warm-up at each limit, each server runs the limit-1 pass and the limit-64 pass three
times each (the median is reported); the in-process engine likewise. The last line is one JSON object: ``ratio`` is ponder serve's throughput at 64
over its throughput at 1 (goal >= 10, which needs continuous batching), ``in_process_ratio``
the same 64 requests on the in-process engine all at once over one at a time (no HTTP:
the ceiling of any server's ratio over this engine on this machine), ``server_over_in_process``
ponder serve's throughput at 64 over the in-process engine's (goal >= 0.8), ``vllm_ratio``
the same for vLLM, ``ponder_over_vllm_throughput`` the two servers' tokens/s at 64.

    python benchmarks/remote_concurrency.py [--requests 64] [--threads 1] [--skip-vllm]

vLLM comes from the venv that ``bash scripts/vllm-venv.sh`` makes (or $PONDER_VLLM_PYTHON).
``--threads`` sets ponder serve's torch threads (and this client's); vLLM's CPU
backend binds its own OpenMP threads (all cores, its default).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


REPEATS = 3  # measured passes per setting; the median is reported (the machine is shared and noisy)


def run(url: str, prompts: list[str], limit: int, tokenizer: str) -> dict:
    """One warm-up pass at this limit (connections, the server's threads, its KV
    allocation and prefix cache), then the median of REPEATS passes."""
    from ponder.backends.openai import OpenAILM
    from ponder.params import SamplingParams

    lm = OpenAILM(url, tokenizer=tokenizer, max_concurrency=limit)
    params = SamplingParams(temperature=0.0, max_tokens=160)
    asyncio.run(lm.generate(prompts if limit > 1 else prompts[:2], params))  # warm-up
    walls = []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        outs = asyncio.run(lm.generate(prompts, params))
        walls.append(time.perf_counter() - t0)
    wall = statistics.median(walls)
    tokens = sum(g.usage.generated_tokens for o in outs for g in o)
    return {"limit": limit, "wall_s": round(wall, 3), "tokens": tokens, "tok_s": round(tokens / wall, 1),
            "texts": [o[0].text for o in outs]}


def peak_rows(url: str) -> int | None:
    """The most rows ponder serve's engine ran at once (its /health says); None for
    another server. Below the request count, requests finished before later ones
    arrived: the client and the server share this machine's cores."""
    import httpx

    try:
        return httpx.get(url.rsplit("/v1", 1)[0] + "/health").json()["engine"]["peak_rows"]
    except (httpx.HTTPError, KeyError, TypeError, ValueError):
        return None


def measure(name: str, start, stop, prompts: list[str], tokenizer: str) -> dict:
    t0 = time.perf_counter()
    srv = start()
    print(f"{name}: up in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        one = run(srv.url, prompts, 1, tokenizer)
        print(f"{name} limit 1:  {one['tokens']} tokens in {one['wall_s']:.2f} s = {one['tok_s']:.0f} tok/s", flush=True)
        many = run(srv.url, prompts, len(prompts), tokenizer)
        print(f"{name} limit {len(prompts)}: {many['tokens']} tokens in {many['wall_s']:.2f} s = "
              f"{many['tok_s']:.0f} tok/s", flush=True)
        many["peak_rows"] = peak_rows(srv.url)
    finally:
        stop(srv)
    same = sum(a == b for a, b in zip(one["texts"], many["texts"]))
    print(f"{name}: {same}/{len(prompts)} answers identical at both limits; ratio {many['tok_s'] / one['tok_s']:.2f}",
          flush=True)
    return {"one": one, "many": many, "identical": same}


def in_process_ceiling(prompts: list[str]) -> dict:
    """The same 64 greedy requests on the in-process engine, one at a time against all
    at once: the most any server over this engine can gain from concurrency here."""
    from ponder.backends.native import NativeLM
    from ponder.decoding.generate import Greedy

    gen = Greedy(NativeLM.from_pretrained("arith"), max_tokens=160)
    gen.generate_batch(prompts)  # warm-up, as the servers get
    ones, manys = [], []
    for _ in range(REPEATS):
        t0 = time.perf_counter()
        one = sum(gen.generate_batch([p])[0][0].usage.generated_tokens for p in prompts)
        t1 = time.perf_counter()
        many = sum(o[0].usage.generated_tokens for o in gen.generate_batch(prompts))
        t2 = time.perf_counter()
        ones.append(t1 - t0), manys.append(t2 - t1)
    out = {"tok_s_1": round(one / statistics.median(ones), 1), "tok_s_64": round(many / statistics.median(manys), 1)}
    out["ratio"] = round(out["tok_s_64"] / out["tok_s_1"], 2)
    print(f"in-process engine: {out['tok_s_1']:.0f} tok/s one at a time, {out['tok_s_64']:.0f} all at once; "
          f"ratio {out['ratio']:.2f} (the ceiling of a server's ratio on this machine)", flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--skip-vllm", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ponder.models.kernel import cpu_summary
    from ponder.tasks.registry import load_task
    from servers import ARITH, ponder_serve, stop_vllm, vllm_serve

    task = load_task("arith")
    prompts = [task.prompt(p) for p in task.problems("hard", args.requests)]
    cpu = cpu_summary()
    print(f"cpu: {cpu}", flush=True)

    p = measure("ponder serve", lambda: ponder_serve(threads=args.threads), lambda s: s.stop(), prompts, str(ARITH))
    ceiling = in_process_ceiling(prompts)
    out = {**cpu, "requests": args.requests, "threads": args.threads,
           "ponder_tok_s_1": p["one"]["tok_s"], "ponder_tok_s_64": p["many"]["tok_s"],
           "ratio": round(p["many"]["tok_s"] / p["one"]["tok_s"], 2),
           "in_process_ratio": ceiling["ratio"], "in_process_tok_s_64": ceiling["tok_s_64"],
           "server_over_in_process": round(p["many"]["tok_s"] / ceiling["tok_s_64"], 2),
           "ponder_peak_rows": p["many"]["peak_rows"]}
    if not args.skip_vllm:
        v = measure("vLLM", vllm_serve, stop_vllm, prompts, str(ARITH))
        out.update(vllm_tok_s_1=v["one"]["tok_s"], vllm_tok_s_64=v["many"]["tok_s"],
                   vllm_ratio=round(v["many"]["tok_s"] / v["one"]["tok_s"], 2),
                   ponder_over_vllm_throughput=round(p["many"]["tok_s"] / v["many"]["tok_s"], 2),
                   same_greedy_answers=sum(a == b for a, b in zip(p["many"]["texts"], v["many"]["texts"])))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
