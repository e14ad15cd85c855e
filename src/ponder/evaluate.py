"""Evaluate a strategy on a task: accuracy with a confidence interval, and the bill.

When the strategy samples several candidates per problem (its generations carry a
``trace``), the same candidates also give the oracle coverage (pass@N: any candidate
right), the majority vote over them, and, with a process reward model, the ROC-AUC of
its step scores against the exact step labels. One sampling run measures all of them.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

from .tasks.base import Problem
from .meta.parallel import SampleThenAggregate, majority_index
from .types import Generation, Usage


def wilson_interval(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for a binomial proportion k/n."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, centre - half), min(1.0, centre + half))


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Probability that a random positive outscores a random negative (ties count ½)."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    if not pos or not neg:
        return None
    # Rank-based (Mann-Whitney U), O(n log n).
    allv = sorted((s, y) for s, y in zip(scores, labels))
    rank_sum, i = 0.0, 0
    while i < len(allv):
        j = i
        while j < len(allv) and allv[j][0] == allv[i][0]:
            j += 1
        avg_rank = (i + 1 + j) / 2
        rank_sum += avg_rank * sum(1 for k in range(i, j) if allv[k][1])
        i = j
    u = rank_sum - len(pos) * (len(pos) + 1) / 2
    return u / (len(pos) * len(neg))


def evaluate(
    task: Any,
    generator: Any,
    problems: Sequence[Problem],
    chunk: int = 32,
    seed: int = 0,
    prm: Any = None,
    on_progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    correct = 0
    usage = Usage()
    covered = voted = 0
    traced = False
    # pass@N and the vote over candidates mean something only where the trace holds the
    # candidates (parallel methods); a chain's or a refinement's trace holds its calls
    candidates = isinstance(generator, SampleThenAggregate)
    step_scores: list[float] = []
    step_labels: list[bool] = []
    records = []
    for start in range(0, len(problems), chunk):
        batch = problems[start : start + chunk]
        prompts = [task.prompt(p) for p in batch]
        outs = generator.generate_batch(prompts, n=1, seed=seed + start)
        for p, prompt, gens in zip(batch, prompts, outs):
            g: Generation = gens[0]
            ok = task.check_answer(p, g.text)
            correct += ok
            usage = usage + g.usage
            cands = (g.trace if candidates else None) or [g]
            if candidates and g.trace:
                traced = True
                covered += any(task.check_answer(p, c.text) for c in cands)
                i = majority_index([task.extract_answer(c.text) for c in cands])
                voted += i is not None and task.check_answer(p, cands[i].text)
            if prm is not None:
                texts = [c.text for c in cands]
                for c_text, sc in zip(texts, prm.step_scores(prompt, texts)):
                    labels = task.check_steps(p, task.split_steps(c_text))
                    if labels is None:
                        continue
                    prefix, good = [], True
                    for lab in labels:
                        good = good and lab
                        prefix.append(good)
                    step_scores += sc[: len(prefix)]
                    step_labels += prefix[: len(sc)]
            records.append({"id": p.id, "correct": bool(ok), "answer": task.extract_answer(g.text)})
        if on_progress:
            on_progress(len(batch))
    n = len(problems)
    lo, hi = wilson_interval(correct, n)
    out: dict[str, Any] = {
        "problems": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "ci95": [lo, hi],
        "usage_total": usage.to_dict(),
        "usage_per_problem": usage.scaled(1 / n).to_dict() if n else Usage().to_dict(),
    }
    if traced:
        out["pass_at_n"] = covered / n
        out["majority_of_samples"] = voted / n
    if prm is not None:
        out["prm_step_auc"] = roc_auc(step_scores, step_labels)
        out["prm_steps_scored"] = len(step_scores)
    return out
