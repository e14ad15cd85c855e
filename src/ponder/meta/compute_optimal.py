"""Compute-optimal selection (Snell et al. 2024, "Scaling LLM test-time compute
optimally can be more effective than scaling model parameters").

The best way to spend test-time compute depends on how hard the problem is: on easy
problems a few samples already agree and more search buys nothing, on hard ones a
verifier-guided search pays. So each problem is first *probed*: a few samples whose
agreement rate (or a reward model's confidence in them) estimates its difficulty in
[0, 1]. A *policy* maps difficulty bins to a strategy: ``"probe"`` (answer from the
probes, by majority or by the reward model; nothing more is spent) or one of the
given strategies.

``fit`` chooses the policy from a development set, as the paper does: it runs the probe
and every candidate on the development problems, and in each difficulty bin picks the
most accurate candidate whose mean cost per problem (generated tokens or FLOPs, the
probe's included) stays within the budget. ``meta["difficulty"]`` and
``meta["chose"]`` report the choice per problem.
"""

from __future__ import annotations

import asyncio
import copy
from collections import Counter
from typing import Any, Callable, Sequence

from ..errors import SettingError
from ..protocols import IndependentRuns
from ..types import Generation, Usage
from .parallel import majority_index

PROBE = "probe"
COSTS = ("generated_tokens", "computed_tokens", "flops")


def agreement(answers: Sequence[str | None]) -> float:
    """The share of samples that give the most common answer (no answer never agrees)."""
    counts = Counter(a for a in answers if a is not None)
    return max(counts.values()) / len(answers) if counts and answers else 0.0


def parse_policy(policy: Any) -> list[tuple[float, str]]:
    """``[(upper bound, name), ...]`` or ``"0.25:probe,0.5:best-of-n,1:prm-beam"``: a
    problem of difficulty d goes to the first bin whose bound is >= d; the last bound
    must be 1."""
    if isinstance(policy, str):
        items = []
        for part in policy.split(","):
            bound, sep, name = part.partition(":")
            try:
                items.append((float(bound), name.strip()))
            except ValueError:
                raise SettingError(f"policy must be BOUND:STRATEGY,... (e.g. 0.25:probe,1:prm-beam); got {part!r}") \
                    from None
            if not sep or not name.strip():
                raise SettingError(f"policy must be BOUND:STRATEGY,... (e.g. 0.25:probe,1:prm-beam); got {part!r}")
        policy = items
    try:
        out = [(float(b), str(n)) for b, n in policy]
    except (TypeError, ValueError):
        raise SettingError(f"policy must be a list of (difficulty bound, strategy); got {policy!r}") from None
    bounds = [b for b, _ in out]
    if not out or bounds != sorted(bounds) or len(set(bounds)) != len(bounds) or bounds[-1] != 1.0 or bounds[0] < 0:
        raise SettingError(f"policy bounds must rise strictly within [0, 1] and end at 1; got {bounds}")
    return out


def _allocate(rows: list[dict[str, Any]], budget_total: float) -> list[str]:
    """The candidate per bin that maximises right answers with total cost within
    ``budget_total``: every assignment is tried (bins x candidates is small), else
    the cheapest everywhere."""
    import itertools

    names = list(rows[0]["candidates"])
    filled = [r for r in rows if r["problems"]]
    best: tuple[float, float, tuple[str, ...]] | None = None
    if len(names) ** len(filled) <= 200_000:
        for combo in itertools.product(names, repeat=len(filled)):
            right = sum(r["candidates"][n]["_right"] for r, n in zip(filled, combo))
            spent = sum(r["candidates"][n]["_cost"] for r, n in zip(filled, combo))
            if spent <= budget_total + 1e-9 and (best is None or (right, -spent) > (best[0], best[1])):
                best = (right, -spent, combo)
    chosen = iter(best[2]) if best is not None else iter(PROBE for _ in filled)
    out, last = [], PROBE
    for r in rows:  # an empty bin takes the choice of the bin below it
        last = next(chosen) if r["problems"] else last
        out.append(last)
    return out


class ComputeOptimal(IndependentRuns):
    """Probe with ``probe_n`` samples from ``probe``, estimate difficulty, run the
    strategy the policy names for that difficulty. ``strategies`` maps names to
    generators; ``difficulty`` is "agreement" (1 - agreement of the probes' answers;
    the probe's own answer is their majority) or "reward" (1 - the best ``scorer``
    score among the probes, the reward model's confidence; the probe's answer is that
    best probe)."""

    strategy = "compute-optimal"
    overlapping_bills = True

    def __init__(self, probe: Any, extract_answer: Callable[[str], str | None], strategies: dict[str, Any],
                 policy: Any = None, probe_n: int = 4, difficulty: str = "agreement", scorer: Any = None) -> None:
        if not callable(getattr(probe, "agenerate", None)):
            raise SettingError(f"probe must be a ponder generator (with agenerate); got {probe!r}")
        if not callable(extract_answer):
            raise SettingError(f"extract_answer must be a callable (text -> answer or None); got {extract_answer!r}")
        if not isinstance(strategies, dict) or not strategies:
            raise SettingError("strategies must map at least one name to a generator")
        for name, g in strategies.items():
            if name == PROBE or not callable(getattr(g, "agenerate", None)):
                raise SettingError(f"strategy {name!r} must be a ponder generator, under a name other than {PROBE!r}")
        if not isinstance(probe_n, int) or isinstance(probe_n, bool) or probe_n < 1:
            raise SettingError(f"probe_n must be an integer >= 1; got {probe_n!r}")
        if difficulty not in ("agreement", "reward"):
            raise SettingError(f"difficulty must be agreement or reward; got {difficulty!r}")
        if difficulty == "reward" and not callable(getattr(scorer, "score", None)):
            raise SettingError("difficulty=reward needs a scorer (a reward model) with score(prompt, completions)")
        self.probe, self.extract_answer, self.strategies = probe, extract_answer, dict(strategies)
        self.probe_n, self.difficulty, self.scorer = probe_n, difficulty, scorer
        names = [PROBE, *self.strategies]
        self.policy = parse_policy(policy if policy is not None else [(1.0, names[-1])])
        bad = [n for _, n in self.policy if n not in names]
        if bad:
            raise SettingError(f"policy names {bad[0]!r}; the strategies are {', '.join(names)}")

    def choose(self, difficulty: float) -> str:
        return next(name for bound, name in self.policy if difficulty <= bound + 1e-12)

    async def estimate(self, prompt: str, seed: int | None) -> tuple[float, list[Generation], Usage]:
        """(difficulty, the probe samples, what scoring them cost). With a reward
        scorer each probe carries its score."""
        probes = await self.probe.agenerate(prompt, n=self.probe_n, seed=seed)
        if self.difficulty == "agreement":
            return 1.0 - agreement([self.extract_answer(g.text) for g in probes]), probes, Usage()
        scores = await asyncio.to_thread(self.scorer.score, prompt, [g.text for g in probes])
        for g, v in zip(probes, scores.values):
            g.score = float(v)
        return 1.0 - max(scores.values), probes, scores.usage

    def probe_answer(self, probes: list[Generation]) -> Generation:
        """The probes' answer: their majority, or, when they were scored, the best."""
        if self.difficulty == "reward":
            return max(probes, key=lambda g: g.score)
        i = majority_index([self.extract_answer(g.text) for g in probes])
        return probes[0 if i is None else i]

    async def run(self, name: str, prompt: str, probes: list[Generation], seed: int | None) -> tuple[Generation, Usage]:
        """Strategy ``name`` on ``prompt`` after the probe: (its answer, what it cost
        beyond the probe and its scoring). A strategy that can continue from samples
        already drawn (``acontinue``: votes, best-of-N, adaptive consistency) counts the
        probes as its first samples, so the probe is not paid for twice."""
        gen = self.strategies[name]
        if callable(getattr(gen, "acontinue", None)):
            out = await gen.acontinue(prompt, [copy.copy(g) for g in probes], seed)
            return out, out.usage - Usage.total(g.usage for g in probes)
        (out,) = await gen.agenerate(prompt, n=1, seed=seed)
        return out, out.usage

    async def _once(self, prompt: str, seed: int | None) -> Generation:
        d, probes, scored = await self.estimate(prompt, seed)
        chose = self.choose(d)
        spent = Usage.total(g.usage for g in probes) + scored
        if chose == PROBE:
            best, trace = self.probe_answer(probes), list(probes)
        else:
            best, more = await self.run(chose, prompt, probes, None if seed is None else seed + 1)
            trace, spent = [*probes, best], spent + more
        return Generation(text=best.text, token_ids=best.token_ids, logprobs=best.logprobs,
                          finish_reason=best.finish_reason, usage=spent, score=best.score, trace=trace,
                          meta={"strategy": self.strategy, "difficulty": round(d, 4), "chose": chose})


    async def afit(self, prompts: Sequence[str], is_correct: Callable[[str, str], bool], budget: float,
                   bins: Sequence[float] = (0.0, 0.25, 0.5, 1.0), cost: str = "generated_tokens",
                   seed: int = 0) -> list[dict[str, Any]]:
        """Choose the policy on development ``prompts`` (``is_correct(prompt, text)``
        judges an answer): one candidate (the probe or a strategy) per bin of
        difficulty, the assignment that answers most development problems right while
        their mean ``cost`` (probe included) stays within ``budget``; so easy bins may
        spend less and hard ones more, as in Snell et al. Ties go to the cheaper; an
        empty bin takes the choice of the bin below it. Sets ``self.policy`` and returns one row
        per bin with every candidate's accuracy and cost."""
        if cost not in COSTS:
            raise SettingError(f"cost must be one of {', '.join(COSTS)}; got {cost!r}")
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or budget <= 0:
            raise SettingError(f"budget (mean {cost} per problem) must be > 0; got {budget!r}")
        if not prompts:
            raise SettingError("fit needs at least one development prompt")
        bounds = parse_policy([(b, PROBE) for b in bins])
        est = await asyncio.gather(*(self.estimate(p, seed + 7_919 * i) for i, p in enumerate(prompts)))
        probe_cost = [getattr(Usage.total(g.usage for g in pr) + u, cost) for _, pr, u in est]
        runs: dict[str, list[Generation]] = {PROBE: [self.probe_answer(pr) for _, pr, _ in est]}
        extra: dict[str, list[float]] = {PROBE: [0.0] * len(prompts)}  # cost beyond the probe's
        for name in self.strategies:
            outs = await asyncio.gather(*(self.run(name, p, est[i][1], seed + 7_919 * i + 1)
                                          for i, p in enumerate(prompts)))
            runs[name], extra[name] = [g for g, _ in outs], [getattr(u, cost) for _, u in outs]
        if sum(probe_cost) / len(probe_cost) > budget:
            raise SettingError(f"budget {budget:g} is below what the probe alone costs ({sum(probe_cost) / len(probe_cost):.0f} "
                               f"{cost} per problem with probe_n={self.probe_n}); raise the budget or lower probe_n")
        rows, lo = [], -1.0
        for bound, _ in bounds:
            idx = [i for i, (d, _, _) in enumerate(est) if lo < d <= bound + 1e-12]
            row: dict[str, Any] = {"bin": [max(lo, 0.0), bound], "problems": len(idx), "candidates": {}}
            for name, gens in runs.items():
                total_cost = sum(probe_cost[i] + extra[name][i] for i in idx)
                right = sum(is_correct(prompts[i], gens[i].text) for i in idx)
                row["candidates"][name] = {"accuracy": round(right / len(idx), 4) if idx else 0.0,
                                           "cost": round(total_cost / len(idx), 1) if idx else 0.0,
                                           "_right": right, "_cost": total_cost}
            rows.append(row)
            lo = bound
        choice = _allocate(rows, budget * len(prompts))
        policy = []
        for row, name in zip(rows, choice):
            row["chose"] = name
            for c in row["candidates"].values():
                c.pop("_right"), c.pop("_cost")
            policy.append((row["bin"][1], name))
        self.policy = policy
        return rows

    def fit(self, prompts: Sequence[str], is_correct: Callable[[str, str], bool], budget: float,
            **kw: Any) -> list[dict[str, Any]]:
        return asyncio.run(self.afit(prompts, is_correct, budget, **kw))
