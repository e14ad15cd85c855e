"""A tree-shaped workload, as step-level search makes it: every node's prompt is its
parent's prompt plus one generated step, and every node is expanded into ``--branch``
sampled next steps, ``--depth`` levels deep, for several problems.

Run twice on the shipped target model: through the engine with its radix prefix cache,
and through an engine without one. Prints the tokens the model computed against the
unique tokens of the tree (every distinct prefix counted once; identical sibling steps
sampled side by side count once, so duplicates weigh against the engine; the last token
of each step is counted though never fed to the model), and both wall times.
The last line is one JSON object; ``computed_over_unique`` (goal <= 1.2) is measured
with the cache, ``ratio`` is wall time without the cache over wall time with it.

    python benchmarks/prefix_reuse.py [--problems 8] [--depth 3] [--branch 4] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def run_tree(lm, prompts_ids, depth, branch, seed):
    from ponder.decoding.generate import Sample

    nl = [t for t in range(lm.vocab_size) if lm.decode([t]) == "\n"]
    gen = Sample(lm, temperature=1.0, max_tokens=24, stop_token_ids=nl)
    frontier = [list(p) for p in prompts_ids]
    sequences = [list(p) for p in prompts_ids]
    computed = 0
    t = time.perf_counter()
    for level in range(depth):
        outs = gen.generate_batch(frontier, n=branch, seed=seed + level)
        nxt, seen = [], set()
        for parent, gens in zip(frontier, outs):
            for g in gens:
                computed += g.usage.computed_tokens
                child = parent + g.token_ids
                sequences.append(child)
                # a finished step is expanded further, once: a search merges identical steps
                if g.finish_reason == "stop" and g.stop in nl and tuple(child) not in seen:
                    seen.add(tuple(child))
                    nxt.append(child)
        frontier = nxt
        if not frontier:
            break
    return time.perf_counter() - t, computed, sequences


def unique_tokens(sequences) -> int:
    """Distinct prefixes over all sequences: each token of the tree counted once."""
    seen = set()
    for s in sequences:
        for i in range(1, len(s) + 1):
            seen.add(tuple(s[:i]))
    return len(seen)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="arith")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--depth", type=int, default=3)
    ap.add_argument("--branch", type=int, default=4)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ponder.engine.engine import Engine
    from ponder.engine.engines import engine_for, set_engine
    from ponder.backends.native import NativeLM
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    cached = NativeLM.from_pretrained(args.model)
    plain = NativeLM(cached.model, cached.tokenizer, cached.name)
    set_engine(plain, Engine(plain, prefix_cache=None))
    prompts = [cached.encode(task.prompt(p)) for p in task.problems("hard", args.problems)]
    run_tree(cached, prompts[:1], 1, 2, seed=99)  # warm-up (a different seed: no reuse of the runs below)
    run_tree(plain, prompts[:1], 1, 2, seed=99)
    t_cache, c_cache, seqs = run_tree(cached, prompts, args.depth, args.branch, seed=1)
    t_plain, c_plain, seqs2 = run_tree(plain, prompts, args.depth, args.branch, seed=1)
    same = sorted(map(tuple, seqs)) == sorted(map(tuple, seqs2))
    unique = unique_tokens(seqs)
    pc = engine_for(cached).prefix_cache
    print(f"tree: {len(seqs) - len(prompts)} generated steps over {args.problems} problems, {unique} unique tokens")
    print(f"with the prefix cache:    {c_cache} tokens computed ({c_cache / unique:.3f} per unique token), {t_cache:.2f}s")
    print(f"without the prefix cache: {c_plain} tokens computed ({c_plain / unique:.3f} per unique token), {t_plain:.2f}s")
    print(f"wall time without / with: {t_plain / t_cache:.2f}x; same trees: {same}; cache: {pc}")
    from ponder.models.kernel import cpu_summary

    print(json.dumps({**cpu_summary(), "benchmark": "prefix_reuse", "model": cached.name, "problems": args.problems, "depth": args.depth,
                      "branch": args.branch, "threads": args.threads, "unique_tokens": unique,
                      "computed_with_cache": c_cache, "computed_without_cache": c_plain,
                      "computed_over_unique": round(c_cache / unique, 4),
                      "computed_over_unique_without_cache": round(c_plain / unique, 4),
                      "wall_s_with_cache": round(t_cache, 3), "wall_s_without_cache": round(t_plain, 3),
                      "ratio": round(t_plain / t_cache, 3), "same_trees": same}))


if __name__ == "__main__":
    main()
