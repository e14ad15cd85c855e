"""Every meta-generation strategy on `arith` hard, at N = 16 where N applies: accuracy
with a 95% interval, tokens per problem (policy and scorer apart), and the wall time
per problem, billed and elapsed (the bill must add up to the elapsed time).

    python benchmarks/meta_results.py [--problems 200] [--n 16] [--threads 1] [--only a,b] [--co-budgets 210,420]

The last line is one JSON object: the rows, and "prm_beam_over_best_of_n_time" (the
wall time of PRM beam search at N over best-of-N's, timed A-B-A-B in this run).
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def policy_usage(g, seen: set | None = None) -> dict:
    """Generated and computed tokens of the policy alone (not the scorers): a search's
    tree nodes, or, recursively, the generations in a trace, each counted once. A
    strategy that continues from samples already drawn (compute-optimal's probe, the
    first vote of what follows it) holds shallow copies of them in its own trace: a copy
    shares its ``meta`` with the original, which is how it is known and not counted twice."""
    seen = set() if seen is None else seen
    if id(g.meta) in seen:
        return {"generated_tokens": 0, "computed_tokens": 0}
    seen.add(id(g.meta))
    if "tree" in g.meta:
        return tree_usage(g.meta["tree"])
    if g.trace:
        parts = [policy_usage(c, seen) for c in g.trace]
        return {k: sum(p[k] for p in parts) for k in ("generated_tokens", "computed_tokens")}
    return {"generated_tokens": g.usage.generated_tokens, "computed_tokens": g.usage.computed_tokens}


def tree_usage(tree: dict) -> dict:
    tot = {"generated_tokens": 0, "computed_tokens": 0}
    stack = [tree]
    while stack:
        n = stack.pop()
        for k in tot:
            tot[k] += n["usage"][k]
        stack.extend(n["children"])
    return tot


ORACLES = ("oracle@16", "refine-steps(exact)", "reflexion(exact)")  # read the answer key: not methods
DRAFTED = ("rsd@", "compute-optimal@")  # use the draft model arith-draft (alone it is right on 0.96)


def adaptive_figures(rows: list[dict]) -> dict:
    """Issue 25's figures from the rows of this run:

    * best_at_quarter_tokens: the best accuracy of any method at <= a quarter of
      weighted vote@16's generated tokens per problem (and the same without the draft
      model, which is itself the stronger model here);
    * compute_optimal_minus_best_fixed: compute-optimal fitted at each budget (210, 420)
      minus the best fixed method (not compute-optimal, not an oracle) at no more
      generated tokens than that budget (or than it spent, if it spent more);
    * adaptive_tokens_saved: majority@16's generated tokens over the fewest of an
      adaptive consistency row within 1 point of its accuracy (or above it), votes
      weighted or not, and unweighted alone."""
    by = {r["strategy"]: r for r in rows}
    methods = [r for r in rows if r["strategy"] not in ORACLES]
    out: dict = {}

    def best(rs: list[dict], limit: float) -> dict | None:
        ok = [r for r in rs if r["generated_per_problem"] <= limit + 1e-9]
        return max(ok, key=lambda r: (r["accuracy"], -r["generated_per_problem"])) if ok else None

    if "weighted-majority" in by:
        quarter = by["weighted-majority"]["generated_per_problem"] / 4
        for key, rs in (("best_at_quarter_tokens", methods),
                        ("best_at_quarter_tokens_target_only",
                         [r for r in methods if not r["strategy"].startswith(DRAFTED)])):
            b = best(rs, quarter)
            out[key] = None if b is None else round(b["accuracy"], 4)
            out[key + "_by"] = None if b is None else b["strategy"]
        out["quarter_tokens"] = round(quarter, 1)
    fixed = [r for r in methods if not r["strategy"].startswith("compute-optimal")]
    co = {}
    for r in rows:
        if r["strategy"].startswith("compute-optimal@"):
            b = best(fixed, max(float(r["strategy"].split("@")[1]), r["generated_per_problem"]))
            co[r["strategy"].split("@")[1]] = None if b is None else {
                "minus": round(r["accuracy"] - b["accuracy"], 4), "compute_optimal": r["accuracy"],
                "tokens": r["generated_per_problem"], "best_fixed": b["strategy"], "best_fixed_accuracy": b["accuracy"]}
    if co:
        out["compute_optimal_minus_best_fixed"] = {k: v and v["minus"] for k, v in co.items()}
        out["compute_optimal_detail"] = co
    if "majority" in by:
        m = by["majority"]
        for key, prefix in (("adaptive_tokens_saved", "adaptive"), ("adaptive_unweighted_tokens_saved", "adaptive@")):
            ok = [r for r in rows if r["strategy"].startswith(prefix) and r["accuracy"] >= m["accuracy"] - 0.01]
            b = min(ok, key=lambda r: r["generated_per_problem"]) if ok else None
            out[key] = None if b is None else round(m["generated_per_problem"] / b["generated_per_problem"], 2)
            out[key + "_by"] = None if b is None else b["strategy"]
    return out


def interleaved_time_ratio(make_a, make_b, prompts: list[str], rounds: int = 2) -> tuple[float, list, list]:
    """Wall time of generator A over generator B on the same prompts, timed A-B-A-B in one
    process (the median of each), so that both see the same machine: two rows timed
    minutes apart on a shared machine can differ 3x for reasons of their own. Each run
    gets a fresh generator (``make_*``), so no reward-model cache carries over."""
    import statistics

    ta, tb = [], []
    for _ in range(rounds):
        for make, times in ((make_a, ta), (make_b, tb)):
            gen = make()
            t = time.perf_counter()
            gen.generate_batch(prompts, seed=0)
            times.append(time.perf_counter() - t)
    return statistics.median(ta) / statistics.median(tb), ta, tb


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=200)
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--only", default="", help="comma-separated strategy names")
    ap.add_argument("--timing-problems", type=int, default=50, help="problems for the interleaved PRM beam / "
                    "best-of-N timing")
    ap.add_argument("--dev", type=int, default=60, help="development problems (hard, after the test ones) on which "
                    "compute-optimal fits its policy")
    ap.add_argument("--co-budgets", type=lambda v: [float(x) for x in v.split(",")], default=[210.0, 420.0],
                    help="compute-optimal's budgets, one row each: mean generated tokens per problem on the "
                    "development problems (its probe included)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ponder import strategies
    from ponder.backends.native import NativeLM
    from ponder.evaluate import wilson_interval
    from ponder.params import SamplingParams
    from ponder.scoring.reward import RewardModel
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    hard = task.problems("hard")
    if args.problems + args.dev > len(hard):
        raise SystemExit(f"--problems + --dev must be at most {len(hard)}")
    problems = hard[: args.problems]
    dev = hard[len(hard) - args.dev :]
    prompts = [task.prompt(p) for p in problems]
    lm = NativeLM.from_pretrained("arith")
    N = args.n
    runs = [
        ("greedy", "greedy", {}, SamplingParams(temperature=0, max_tokens=160)),
        ("majority", "majority", {"samples": N}, None),
        ("weighted-majority", "weighted-majority", {"samples": N}, None),
        ("best-of-n", "best-of-n", {"samples": N}, None),
        ("mbr", "mbr", {"samples": N}, None),
        ("prm-beam", "prm-beam", {"samples": N, "beam_width": 4}, None),
        ("dvts", "dvts", {"samples": N, "beam_width": 4}, None),
        ("rebase", "rebase", {"samples": N}, None),
        ("particles", "particles", {"samples": N}, None),
        ("lookahead", "lookahead", {"samples": N, "beam_width": 4, "lookahead": 1}, None),
        ("tot-bfs", "tot-bfs", {"breadth": 4, "k": 4}, None),  # breadth 4 x k 4 is PRM beam search at 16, 4
        ("tot-dfs", "tot-dfs", {"k": 3, "max_expansions": 2 * N}, None),
        ("mcts", "mcts", {"iterations": 2 * N, "value": "both"}, None),
        ("prm-beam+refine", "prm-beam", {"samples": N, "beam_width": 4, "refine": 1}, None),
        ("refine-steps(prm)", "refine-steps", {"rounds": 4}, None),
        ("rejection", "rejection", {"samples": N, "threshold": 0.9, "batch": 4}, None),
        ("best-of-n@8", "best-of-n", {"samples": N // 2}, None),
        ("weighted@8", "weighted-majority", {"samples": N // 2}, None),
        # adaptive meta-generation (issue 25)
        ("adaptive@beta.95", "adaptive-majority", {"samples": N, "batch": 2, "confidence": 0.95}, None),
        ("adaptive@beta.9b1", "adaptive-majority", {"samples": N, "batch": 1, "confidence": 0.9}, None),
        ("adaptive-w@beta.95", "adaptive-majority", {"samples": N, "batch": 1, "confidence": 0.95,
                                                     "weight": "reward"}, None),
        ("adaptive-w@beta.8", "adaptive-majority", {"samples": N, "batch": 1, "confidence": 0.8,
                                                    "weight": "reward"}, None),
        ("deepconf", "deepconf", {"samples": N}, None),
        ("deepconf@keep.5", "deepconf", {"samples": N, "keep": 0.5}, None),  # "deepconf" is keep 0.9, the default
        ("deepconf-online", "deepconf-online", {"samples": N}, None),
        ("spec-rejection@1x.75", "speculative-rejection", {"samples": N, "reject": 0.75, "select": "weighted"}, None),
        ("spec-rejection@4x.3", "speculative-rejection", {"samples": N, "reject": 0.3, "checkpoints": 4,
                                                          "select": "weighted"}, None),
        ("rsd@0.5", "rsd", {"threshold": 0.5}, SamplingParams(temperature=0, max_tokens=160)),
        ("rsd@0.8", "rsd", {"threshold": 0.8}, SamplingParams(temperature=0, max_tokens=160)),
        *((f"compute-optimal@{b:g}", "compute-optimal", {"samples": N, "difficulty": "reward"}, b)
          for b in args.co_budgets),
        ("majority@64", "majority", {"samples": 64}, None),
        # oracles: they read the answer key (upper bounds, not methods)
        ("oracle@16", "oracle", {"samples": N}, None),
        ("refine-steps(exact)", "refine-steps", {"rounds": 4, "scorer": "steps"}, None),
        ("reflexion(exact)", "reflexion", {"trials": 4, "evaluator": "verifier", "attempt_template": "{input}",
                                          "reflect_template": "{input}", "memory_template": "{reflection}"}, None),
    ]
    only = {x for x in args.only.split(",") if x}
    rows = []
    print(f"{'strategy':18s} {'N':>3s} {'accuracy':>8s} {'95% CI':>13s} {'gen/prob':>9s} {'policy':>9s} "
          f"{'scorer':>9s} {'billed s':>9s} {'elapsed s':>9s}")
    for label, name, own, params in runs:
        if only and label not in only:
            continue
        rm = RewardModel.from_pretrained("arith-reward")  # a fresh reward model: no cache from other rows
        budget = params if isinstance(params, float) else None  # compute-optimal's rows carry their budget
        sampling = params if isinstance(params, SamplingParams) else SamplingParams(temperature=args.temperature,
                                                                                     max_tokens=160)
        ctx = strategies.Context(task=task, reward_model=rm)
        gen = strategies.build(name, lm, sampling, dict(own), ctx)
        fitted = None
        if name == "compute-optimal":  # fit the policy on the development problems, within the budget
            # the probe is reward-guided speculative decoding (greedy, threshold 0.5): its answer
            # is one vote of what follows, and its reward says how hard the problem is
            gen.probe, gen.probe_n = strategies.build("rsd", lm, SamplingParams(temperature=0, max_tokens=160),
                                                      {"threshold": 0.5}, ctx), 1
            gen.strategies = {f"{k}@{m}": strategies.build(k, lm, sampling, {"samples": m, **extra}, ctx)
                              for k, m, extra in (("weighted-majority", 4, {}), ("weighted-majority", 8, {}),
                                                  ("weighted-majority", 16, {}), ("best-of-n", 8, {}),
                                                  ("adaptive-majority", 16, {"batch": 1, "weight": "reward",
                                                                             "confidence": 0.95}))}
            t = time.perf_counter()
            fitted = gen.fit([task.prompt(p) for p in dev],
                             lambda prompt, text: task.check_answer(task.problem_of_prompt(prompt), text),
                             budget=budget, bins=(0.05, 0.2, 0.5, 1.0), seed=1)
            print(f"  compute-optimal policy fitted on {len(dev)} dev problems in {time.perf_counter() - t:.0f} s "
                  f"(budget {budget:g} generated tokens): {gen.policy}", flush=True)
        t = time.perf_counter()
        outs = gen.generate_batch(prompts, seed=0)
        elapsed = time.perf_counter() - t
        gens = [o[0] for o in outs]
        correct = sum(task.check_answer(p, g.text) for p, g in zip(problems, gens))
        lo, hi = wilson_interval(correct, len(problems))
        policy = gen_tok = 0
        for g in gens:  # generated tokens from the bill (a scorer generates none); the policy's computed
            policy += policy_usage(g)["computed_tokens"]  # tokens from the tree or trace, without the scorers'
            gen_tok += g.usage.generated_tokens
        total_computed = sum(g.usage.computed_tokens for g in gens)
        billed = sum(g.usage.wall_s for g in gens)
        P = len(problems)
        n_of = own.get("samples", own.get("iterations", own.get("breadth", 1) * own.get("k", 1)))
        row = {"strategy": label, "n": n_of, "accuracy": correct / P,
               "ci95": [round(lo, 4), round(hi, 4)], "generated_per_problem": round(gen_tok / P, 1),
               "policy_computed_per_problem": round(policy / P, 1),
               "scorer_computed_per_problem": round((total_computed - policy) / P, 1),
               "billed_wall_s_per_problem": round(billed / P, 4), "elapsed_s_per_problem": round(elapsed / P, 4)}
        if fitted is not None:
            row["policy"] = gen.policy
            row["chose"] = {k: n for k in ("probe", *gen.strategies)
                            if (n := sum(g.meta.get("chose") == k for g in gens))}
            row["fit"] = fitted
        rows.append(row)
        print(f"{label:18s} {row['n']:3d} {row['accuracy']:8.3f} {lo:6.3f}-{hi:6.3f} {row['generated_per_problem']:9.1f} "
              f"{row['policy_computed_per_problem']:9.1f} {row['scorer_computed_per_problem']:9.1f} "
              f"{row['billed_wall_s_per_problem']:9.3f} {row['elapsed_s_per_problem']:9.3f}", flush=True)
    ratio = None
    if not only or {"prm-beam", "best-of-n"} <= only:  # timed interleaved, not from rows minutes apart

        def make(name, own):
            ctx = strategies.Context(task=task, reward_model=RewardModel.from_pretrained("arith-reward"))
            return lambda: strategies.build(name, lm, SamplingParams(temperature=args.temperature, max_tokens=160),
                                            dict(own), ctx)

        sub = prompts[: args.timing_problems]
        ratio, ta, tb = interleaved_time_ratio(make("prm-beam", {"samples": N, "beam_width": 4}),
                                               make("best-of-n", {"samples": N}), sub)
        print(f"PRM beam / best-of-{N} wall time, A-B-A-B on {len(sub)} problems: {ratio:.2f} "
              f"(PRM beam {', '.join(f'{t:.1f}' for t in ta)} s; best-of-N {', '.join(f'{t:.1f}' for t in tb)} s)")
    from ponder.models.llama_c import cpu_summary

    figures = adaptive_figures(rows)
    print(f"adaptive figures: {json.dumps(figures)}")

    print(json.dumps({**cpu_summary(), "benchmark": "meta_results", "model": "arith", "problems": len(problems), "n": N,
                      "threads": args.threads, "rows": rows,
                      "prm_beam_over_best_of_n_time": None if ratio is None else round(ratio, 3), **figures}))


if __name__ == "__main__":
    main()
