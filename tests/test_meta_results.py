"""benchmarks/meta_results.py reads bills honestly: a compute-optimal row's policy tokens
are its bill's (the probe, which its continuation holds as its first vote, counted once),
and the PRM beam / best-of-N time ratio is timed interleaved."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from meta_results import interleaved_time_ratio, policy_usage  # noqa: E402


@pytest.fixture(scope="module")
def co_outputs():
    from ponder import strategies
    from ponder.backends.native import NativeLM
    from ponder.params import SamplingParams
    from ponder.scoring.reward import RewardModel
    from ponder.tasks.arith import ArithTask

    task, lm = ArithTask(), NativeLM.from_pretrained("arith")
    ctx = strategies.Context(task=task, reward_model=RewardModel.from_pretrained("arith-reward"))
    gen = strategies.build("compute-optimal", lm, SamplingParams(temperature=0.7, max_tokens=160),
                           {"samples": 16, "difficulty": "reward", "policy": "0.3:probe,1:majority",
                            "majority.samples": 4}, ctx)
    gen.probe, gen.probe_n = strategies.build("rsd", lm, SamplingParams(temperature=0, max_tokens=160),
                                              {"threshold": 0.5}, ctx), 1
    return [o[0] for o in gen.generate_batch([task.prompt(p) for p in task.problems("expert")[:6]], seed=0)]


def test_a_compute_optimal_rows_policy_tokens_are_its_bill(co_outputs):
    chose = {g.meta["chose"] for g in co_outputs}
    assert "majority" in chose, chose  # a continuation from the probe, which holds it as its first vote
    for g in co_outputs:
        pu = policy_usage(g)
        assert pu["generated_tokens"] == g.usage.generated_tokens, (g.meta["chose"], pu, g.usage)
        assert pu["computed_tokens"] <= g.usage.computed_tokens  # the rest is the scorer's


def test_the_time_ratio_is_timed_interleaved():
    order = []

    class Fake:
        def __init__(self, name):
            self.name = name

        def generate_batch(self, prompts, seed=0):
            order.append(self.name)

    ratio, ta, tb = interleaved_time_ratio(lambda: Fake("a"), lambda: Fake("b"), ["x"], rounds=2)
    assert order == ["a", "b", "a", "b"] and len(ta) == len(tb) == 2 and ratio > 0


def test_the_figures_range_over_every_model_by_hand():
    from meta_results import adaptive_figures, paired_bootstrap

    def row(name, acc_right, tokens, flops, **extra):
        return {"strategy": name, "accuracy": sum(acc_right) / len(acc_right), "generated_per_problem": tokens,
                "flops_per_problem": flops, "_right": acc_right, **extra}

    rows = [row("greedy", [1, 0, 0, 0], 50, 100), row("weighted-majority", [1, 1, 1, 0], 800, 1600),
            row("majority", [1, 1, 0, 0], 800, 1200),
            row("arith-draft:greedy", [1, 1, 0, 0], 50, 20),  # the cheap model's greedy is a fixed strategy too
            row("arith-draft:majority@4", [1, 1, 1, 0], 200, 80),
            row("compute-optimal@200", [1, 1, 1, 1], 190, 300, budget=200.0)]
    f = adaptive_figures(rows)
    assert f["best_at_quarter_tokens"] == 1.0 and f["best_at_quarter_tokens_by"] == "compute-optimal@200"
    assert f["best_at_quarter_tokens_target_only"] == 0.25 and f["quarter_tokens"] == 200
    assert f["best_at_quarter_flops"] == 1.0  # 300 FLOPs <= 400
    assert f["headroom"] == 0.75 and f["headroom_by"] == "compute-optimal@200"
    d = f["compute_optimal_detail"]["200"]
    assert d["best_fixed"] == "arith-draft:majority@4" and f["compute_optimal_minus_best_fixed"]["200"] == 0.25
    assert d["ci95"][0] <= 0.25 <= d["ci95"][1]
    # at equal FLOPs (300): the draft's majority@4 (80) again
    assert f["compute_optimal_detail_flops"]["200"]["best_fixed"] == "arith-draft:majority@4"
    # the paired bootstrap: identical vectors give [0, 0]; a sure win gives [1, 1]
    assert paired_bootstrap([1, 0, 1], [1, 0, 1]) == [0.0, 0.0] and paired_bootstrap([1, 1], [0, 0]) == [1.0, 1.0]
