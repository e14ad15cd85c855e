"""Every meta-generation strategy on an `arith` level's test split, at N = 16 where N
applies, on the target `arith` and (fixed strategies) the draft `arith-draft`: accuracy
with a 95% interval, tokens and FLOPs per problem (policy and scorer apart), and the
wall time per problem, billed and elapsed (the bill must add up to the elapsed time).
Compute-optimal selection is fitted on the level's fit split (disjoint) within a
quarter and a half of weighted vote@16's tokens, choosing among every model's strategies.

    python benchmarks/meta_results.py [--level hard] [--problems 200] [--n 16] [--threads 1] [--only a,b]

The last line is one JSON object: the rows, the figures (best_at_quarter_tokens,
headroom, compute_optimal_minus_best_fixed with paired bootstrap intervals, over every
model) and "prm_beam_over_best_of_n_time" (timed A-B-A-B in this run).
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
    from ponder.meta.search.base import tree_nodes

    nodes = tree_nodes(tree)
    return {k: sum(n["usage"][k] for n in nodes) for k in ("generated_tokens", "computed_tokens")}


ORACLES = ("oracle@16", "refine-steps(exact)", "reflexion(exact)")  # read the answer key: not methods
DRAFTED = ("rsd@", "compute-optimal@", "arith-draft:")  # use the draft model arith-draft


def paired_bootstrap(a: list[int], b: list[int], rounds: int = 2000, seed: int = 0) -> list[float]:
    """95% interval of mean(a) - mean(b) over the same problems, resampled in pairs."""
    import random

    rng, n = random.Random(seed), len(a)
    diffs = sorted(sum(a[i] - b[i] for i in idx) / n
                   for idx in ([rng.randrange(n) for _ in range(n)] for _ in range(rounds)))
    return [round(diffs[int(0.025 * rounds)], 4), round(diffs[int(0.975 * rounds) - 1], 4)]


# step-level rejection sampling as a ToT-DFS setting: one proposal a state, a step valued
# below 0.95 redrawn in place (at most 10 times), a state below 0.5 pruned
STEP_REJECTION = {"k": 1, "refine": 10, "refine_threshold": 0.95}
OVER_STEPS = {"over": "tot-dfs", **{f"over.{k}": v for k, v in STEP_REJECTION.items()}}
# the votes over such searches: (strategy, at most m searches, its settings); fixed rows and
# compute-optimal candidates alike
STEP_VOTES = [("majority", m, {"samples": m, **OVER_STEPS}) for m in (3, 5)] + [
    ("adaptive-majority", m, {"samples": m, "batch": 1, "confidence": c, **OVER_STEPS})
    for m, c in ((3, 0.8), (5, 0.8), (8, 0.9))]


def adaptive_figures(rows: list[dict]) -> dict:
    """The issues' figures from the rows of this run, every model's rows included:

    * best_at_quarter_tokens (_flops): the best accuracy of any method at <= a quarter of
      weighted vote@16's generated tokens (FLOPs) per problem;
    * headroom: the best method within weighted vote@16's tokens (16 samples' worth)
      minus the target's greedy accuracy;
    * compute_optimal_minus_best_fixed: each compute-optimal row (fitted within a
      budget) minus the best fixed method of any model (not compute-optimal, not an
      oracle) at no more generated tokens than the budget (or than it spent, if more),
      with a paired bootstrap interval; ..._flops the same at no more FLOPs;
    * adaptive_tokens_saved: majority@16's generated tokens over the fewest of an
      adaptive consistency row within 1 point of its accuracy (or above it)."""
    by = {r["strategy"]: r for r in rows}
    methods = [r for r in rows if r["strategy"] not in ORACLES]
    out: dict = {}

    def best(rs: list[dict], limit: float, cost: str = "generated_per_problem") -> dict | None:
        ok = [r for r in rs if r[cost] <= limit * (1 + 1e-9)]
        return max(ok, key=lambda r: (r["accuracy"], -r[cost])) if ok else None

    if "weighted-majority" in by:
        w = by["weighted-majority"]
        for key, cost in (("best_at_quarter_tokens", "generated_per_problem"), ("best_at_quarter_flops", "flops_per_problem")):
            b = best(methods, w[cost] / 4, cost)
            out[key] = None if b is None else round(b["accuracy"], 4)
            out[key + "_by"] = None if b is None else b["strategy"]
        t = best([r for r in methods if not r["strategy"].startswith(DRAFTED)], w["generated_per_problem"] / 4)
        out["best_at_quarter_tokens_target_only"] = None if t is None else round(t["accuracy"], 4)
        out["quarter_tokens"] = round(w["generated_per_problem"] / 4, 1)
        if "greedy" in by:
            h = best(methods, w["generated_per_problem"])
            out["headroom"] = round(h["accuracy"] - by["greedy"]["accuracy"], 4)
            out["headroom_by"] = h["strategy"]
    fixed = [r for r in methods if not r["strategy"].startswith("compute-optimal")]
    co, co_flops = {}, {}
    for r in rows:
        if not r["strategy"].startswith("compute-optimal@"):
            continue
        name = r["strategy"].split("@")[1]
        for into, cost, limit in ((co, "generated_per_problem", max(r["budget"], r["generated_per_problem"])),
                                  (co_flops, "flops_per_problem", r["flops_per_problem"])):
            b = best(fixed, limit, cost)
            into[name] = None if b is None else {
                "minus": round(r["accuracy"] - b["accuracy"], 4), "ci95": paired_bootstrap(r["_right"], b["_right"]),
                "compute_optimal": r["accuracy"], "tokens": r["generated_per_problem"], "flops": r["flops_per_problem"],
                "best_fixed": b["strategy"], "best_fixed_accuracy": b["accuracy"]}
    if co:
        out["compute_optimal_minus_best_fixed"] = {k: v and v["minus"] for k, v in co.items()}
        out["compute_optimal_detail"] = co
        out["compute_optimal_minus_best_fixed_flops"] = {k: v and v["minus"] for k, v in co_flops.items()}
        out["compute_optimal_detail_flops"] = co_flops
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
    ap.add_argument("--level", default="expert", help="arith level (the README's main sweep level)")
    ap.add_argument("--draft", default="arith-draft", help="the other model whose fixed strategies and compute-optimal "
                    "candidates join the target's ('' for none)")
    ap.add_argument("--dev", type=int, default=100, help="problems of the level's fit split on which compute-optimal "
                    "fits its policy (never the test split's)")
    ap.add_argument("--co-budgets", default="quarter,half",
                    help="compute-optimal's budgets, one row each: generated tokens per problem, or quarter/half of "
                    "weighted vote@N's on the test problems (run first)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from ponder import strategies
    from ponder.backends.native import NativeLM
    from ponder.evaluate import wilson_interval
    from ponder.params import SamplingParams
    from ponder.scoring.reward import RewardModel
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    problems = task.problems(args.level, split="test")[: args.problems]  # the named splits: disjoint
    dev = task.problems(args.level, split="fit")[: args.dev]
    prompts = [task.prompt(p) for p in problems]
    lm = NativeLM.from_pretrained("arith")
    draft = NativeLM.from_pretrained(args.draft) if args.draft else None
    N = args.n
    greedy = SamplingParams(temperature=0, max_tokens=160)
    # the draft's fixed strategies: a cheap model's vote is a way to spend compute too
    drafted = [] if draft is None else [
        (f"{args.draft}:greedy", "greedy", {}, greedy), (f"{args.draft}:majority@4", "majority", {"samples": 4}, None),
        (f"{args.draft}:majority@{N}", "majority", {"samples": N}, None),
        (f"{args.draft}:weighted@4", "weighted-majority", {"samples": 4}, None),
        (f"{args.draft}:weighted@{N}", "weighted-majority", {"samples": N}, None),
        (f"{args.draft}:best-of-n@{N}", "best-of-n", {"samples": N}, None)]
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
        # step-level rejection: ToT-DFS with one proposal a state, each step redrawn in place
        # until the PRM values it >= 0.95 (at most 10 redraws), and votes over such searches
        # (settings chosen on the fit split)
        ("step-rejection", "tot-dfs", dict(STEP_REJECTION), None),
        *((f"step-rejection:{k.replace('-majority', '')}@{m}", k, settings, None) for k, m, settings in STEP_VOTES),
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
        *drafted,
        *((f"compute-optimal@{b}", "compute-optimal", {"samples": N, "difficulty": "reward"}, b)
          for b in args.co_budgets.split(",")),
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
        budget = params if isinstance(params, str) else None  # compute-optimal's rows carry their budget
        sampling = params if isinstance(params, SamplingParams) else SamplingParams(temperature=args.temperature,
                                                                                     max_tokens=160)
        ctx = strategies.Context(task=task, reward_model=rm)
        on = draft if label.startswith(f"{args.draft}:") and draft is not None else lm
        gen = strategies.build(name, on, sampling, dict(own), ctx)
        fitted = None
        if name == "compute-optimal":  # fit the policy on the fit split, within the budget
            if budget in ("quarter", "half"):
                w = next((r for r in rows if r["strategy"] == "weighted-majority"), None)
                if w is None:
                    raise SystemExit("--co-budgets quarter/half needs the weighted-majority row in this run")
                budget = w["generated_per_problem"] / (4 if budget == "quarter" else 2)
            budget = float(budget)
            # the probe is one step-level rejection search: its answer is the first vote of the
            # votes over such searches that may follow, and its reward says how hard the problem is
            gen.probe, gen.probe_n = strategies.build("tot-dfs", lm, sampling, dict(STEP_REJECTION), ctx), 1
            # (label prefix, model, strategy, its n, its settings): the target's searches and
            # votes (ToT-DFS and rejection sampling too: the best fixed rows at 1/4 and 1/2)
            cands = [("", lm, k, m, {"samples": m, **extra}) for k, m, extra in (
                ("weighted-majority", 4, {}), ("weighted-majority", 8, {}), ("weighted-majority", 16, {}),
                ("best-of-n", 4, {}), ("best-of-n", 8, {}), ("rebase", 4, {}), ("prm-beam", 4, {"beam_width": 4}),
                ("adaptive-majority", 16, {"batch": 1, "weight": "reward", "confidence": 0.95}),
                ("rejection", 16, {"threshold": 0.9, "batch": 4}))]
            cands.append(("", lm, "tot-dfs", 3, {"k": 3, "max_expansions": 2 * args.n}))
            cands += [("step-rejection:", lm, k, m, settings) for k, m, settings in STEP_VOTES]
            if draft is not None:  # every model's strategies are candidates
                cands += [(f"{args.draft}:", draft, k, m, {} if k == "greedy" else {"samples": m}) for k, m in (
                    ("greedy", 1), ("majority", 4), ("majority", 16), ("weighted-majority", 4), ("weighted-majority", 16))]
            gen.strategies = {f"{pre}{k}@{m}": strategies.build(k, model, greedy if k == "greedy" else sampling,
                                                               settings, ctx)
                              for pre, model, k, m, settings in cands}
            t = time.perf_counter()
            fitted = gen.fit([task.prompt(p) for p in dev],
                             lambda prompt, text: task.check_answer(task.problem_of_prompt(prompt), text),
                             budget=budget, bins=(0.05, 0.2, 0.5, 1.0), seed=1)
            print(f"  compute-optimal policy fitted on {len(dev)} fit-split problems in {time.perf_counter() - t:.0f} s "
                  f"(budget {budget:g} generated tokens): {gen.policy}", flush=True)
        t = time.perf_counter()
        outs = gen.generate_batch(prompts, seed=0)
        elapsed = time.perf_counter() - t
        gens = [o[0] for o in outs]
        right = [int(task.check_answer(p, g.text)) for p, g in zip(problems, gens)]
        correct = sum(right)
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
               "billed_wall_s_per_problem": round(billed / P, 4), "elapsed_s_per_problem": round(elapsed / P, 4),
               "flops_per_problem": sum(g.usage.flops for g in gens) / P, "_right": right}
        if budget is not None:
            row["budget"] = round(budget, 1)
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
    from ponder.models.kernel import cpu_summary

    figures = adaptive_figures(rows)
    print(f"adaptive figures: {json.dumps(figures)}")

    for r in rows:
        r["right"] = "".join(map(str, r.pop("_right")))  # per problem, for paired comparisons afterwards
    print(json.dumps({**cpu_summary(), "benchmark": "meta_results", "model": "arith", "draft": args.draft,
                      "level": args.level, "split": "test", "problems": len(problems), "fit_problems": len(dev), "n": N,
                      "threads": args.threads, "rows": rows,
                      "prm_beam_over_best_of_n_time": None if ratio is None else round(ratio, 3), **figures}))


if __name__ == "__main__":
    main()
