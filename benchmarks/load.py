"""Load on ``ponder serve``: C concurrent clients for D seconds on loopback, each sending
one request after another, cycling through six kinds: a short sampled completion, a
long greedy one, a streamed one (SSE), a chat completion constrained to a JSON schema,
and two server-side strategies (majority vote over 4 samples, PRM beam search by
``arith-reward``). Every answer is checked (status 200, the body parses, the JSON
answer matches the schema, a stream ends with [DONE]); anything else is an error.

It reports errors (goal 0), p50 and p99 latency per kind and over all, generated
tokens/s (the server's usage; a stream counts its chunks), and the server's peak RSS
(VmHWM), which the engine's caps bound (a 256 MiB radix prefix cache, rows by a KV
budget). The last line is one JSON object. A shortened run is a test
(tests/e2e/test_remote.py::test_load_has_no_errors).

    python benchmarks/load.py [--clients 64] [--duration 60] [--threads 1]
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

KINDS = ("short", "long", "stream", "json", "majority", "prm-beam")
SCHEMA = {"type": "object", "properties": {"answer": {"type": "integer", "minimum": -999, "maximum": 999}},
          "required": ["answer"], "additionalProperties": False}


def _request(kind: str, prompt: str, seed: int) -> tuple[str, dict]:
    base = {"model": "arith", "seed": seed}
    if kind == "short":
        return "/completions", {**base, "prompt": prompt, "max_tokens": 16, "temperature": 0.7}
    if kind == "long":
        return "/completions", {**base, "prompt": prompt, "max_tokens": 160, "temperature": 0}
    if kind == "stream":
        return "/completions", {**base, "prompt": prompt, "max_tokens": 160, "temperature": 0.7, "stream": True}
    if kind == "json":
        return "/chat/completions", {**base, "messages": [{"role": "user", "content": prompt}], "max_tokens": 40,
                                     "temperature": 0.7, "response_format": {
                                         "type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}}}
    settings = {"samples": 4} if kind == "majority" else {"samples": 4, "beam_width": 2}
    return "/completions", {**base, "prompt": prompt, "max_tokens": 160, "temperature": 0.7,
                            "ponder": {"strategy": kind, "settings": settings}}


async def _one(client, url: str, kind: str, prompt: str, seed: int) -> tuple[int, str | None]:
    """(generated tokens, error or None) of one request."""
    path, body = _request(kind, prompt, seed)
    if body.get("stream"):
        chunks, done = 0, False
        async with client.stream("POST", url + path, json=body) as r:
            if r.status_code != 200:
                return 0, f"{kind}: HTTP {r.status_code} {(await r.aread())[:200]!r}"
            async for line in r.aiter_lines():
                if line == "data: [DONE]":
                    done = True
                elif line.startswith("data: "):
                    data = json.loads(line[6:])
                    chunks += sum(1 for c in data.get("choices", []) if c.get("text"))
        return chunks, None if done else f"{kind}: stream ended without [DONE]"
    r = await client.post(url + path, json=body)
    if r.status_code != 200:
        return 0, f"{kind}: HTTP {r.status_code} {r.text[:200]!r}"
    data = r.json()
    if kind == "json":
        content = data["choices"][0]["message"]["content"]
        try:
            answer = json.loads(content)
            if set(answer) != {"answer"} or not isinstance(answer["answer"], int):
                return 0, f"json: {content!r} does not match the schema"
        except ValueError:
            return 0, f"json: {content!r} is not JSON"
    elif not data["choices"][0]["text"] and kind != "short":
        return 0, f"{kind}: empty text"
    return int(data["usage"]["completion_tokens"]), None


async def _client(i: int, url: str, prompts: list[str], deadline: float, log: list) -> None:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0, connect=10.0)) as client:
        k = 0
        while time.monotonic() < deadline:
            kind = KINDS[(i + k) % len(KINDS)]
            prompt = prompts[(i * 7 + k) % len(prompts)]
            t0 = time.monotonic()
            try:
                tokens, err = await _one(client, url, kind, prompt, seed=i * 1000 + k)
            except Exception as e:  # a dropped connection, a bad body: an error, counted
                tokens, err = 0, f"{kind}: {type(e).__name__}: {e}"
            log.append((kind, time.monotonic() - t0, tokens, err))
            k += 1


def run_load(url: str, clients: int, duration: float) -> dict:
    """Drive the server at ``url`` (.../v1); the figures of the run (no RSS)."""
    from ponder.tasks.registry import load_task

    task = load_task("arith")
    prompts = [task.prompt(p) for p in task.problems("hard", 50)]
    log: list = []

    async def main() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(_client(i, url, prompts, t0 + duration, log) for i in range(clients)))
        return time.monotonic() - t0

    wall = asyncio.run(main())
    lat = sorted(x[1] for x in log)

    def pct(xs: list[float], q: float) -> float:
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else 0.0

    per_kind = {}
    for kind in KINDS:
        xs = sorted(x[1] for x in log if x[0] == kind)
        per_kind[kind] = {"requests": len(xs), "p50_s": pct(xs, 0.5), "p99_s": pct(xs, 0.99)}
    errors = [x[3] for x in log if x[3]]
    return {"clients": clients, "duration_s": round(wall, 1), "requests": len(log), "errors": len(errors),
            "error_examples": errors[:5], "p50_s": round(statistics.median(lat), 3) if lat else 0.0,
            "p99_s": pct(lat, 0.99), "tok_s": round(sum(x[2] for x in log) / wall, 1), "per_kind": per_kind}


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--duration", type=float, default=60.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ponder.models.kernel import cpu_summary
    from servers import ponder_serve

    srv = ponder_serve("--reward-model", "arith-reward", threads=args.threads)
    try:
        idle = peak_rss_mib(srv.proc.pid)
        out = run_load(srv.url, args.clients, args.duration)
        out.update(peak_rss_mib=peak_rss_mib(srv.proc.pid), rss_after_start_mib=idle)
    finally:
        srv.stop()
    for kind, f in out["per_kind"].items():
        print(f"{kind:9s} {f['requests']:5d} requests  p50 {f['p50_s']:.3f} s  p99 {f['p99_s']:.3f} s")
    print(f"{out['requests']} requests in {out['duration_s']} s from {args.clients} clients: {out['errors']} errors, "
          f"p50 {out['p50_s']:.3f} s, p99 {out['p99_s']:.3f} s, {out['tok_s']:.0f} generated tok/s, "
          f"peak RSS {out['peak_rss_mib']} MiB (after start {idle} MiB)")
    print(json.dumps({**cpu_summary(), "threads": args.threads, **out}))


if __name__ == "__main__":
    main()
