"""The shipped reward model: format (transformers loads it), PRM/ORM scores, best-of-N."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ponder.scoring.reward import RewardModel
from ponder.tasks import arith
from ponder.tasks.arith import ArithTask


@pytest.fixture(scope="module")
def rm():
    return RewardModel.from_pretrained("arith-reward")


def test_transformers_loads_the_reward_model_and_agrees(rm):
    from transformers import AutoModelForTokenClassification

    from ponder.models.registry import resolve_model

    path, _ = resolve_model("arith-reward")
    hf = AutoModelForTokenClassification.from_pretrained(path).eval()
    ids, ends, eos_at = rm.layout("Q: 12+34-5\n", "12+34=46\n46-5=41\nAnswer: 41\n")
    x = torch.tensor([ids])
    with torch.no_grad():
        ref = hf(x).logits[0, :, 0]
    ours = rm.model.logits(rm.model(x))[0, :, 0]
    assert (ref - ours).abs().max().item() < 1e-4
    assert len(ends) == 2 and eos_at == len(ids) - 1
    # scoring is billed: tokens read, one call, FLOPs and its share of the wall time
    ((score, usage),) = rm.score_completions("Q: 12+34-5\n", ["12+34=46\n46-5=41\nAnswer: 41\n"])
    assert 0.0 <= score <= 1.0
    assert usage.computed_tokens == len(ids) and usage.model_calls == 1 and usage.flops > 0 and usage.wall_s > 0


def _corruptions(limit=30):
    task = ArithTask()
    for p in task.problems("medium", limit=limit):
        right = arith.solution_text(p.question)
        lines = right.split("\n")
        first = lines[0].rsplit("=", 1)
        wrong_first = "\n".join([f"{first[0]}={int(first[1]) + 7}"] + lines[1:])
        wrong_answer = right.replace(f"Answer: {p.answer}", f"Answer: {int(p.answer) + 10}")
        yield task, p, task.prompt(p), right, wrong_first, wrong_answer


@pytest.mark.xfail(strict=True, reason="known shortfall: the shipped arith-reward misses a corrupted first "
                   "step about half the time (issue 3 stays open)")
def test_step_scores_catch_a_wrong_first_step(rm):
    caught = 0
    for task, p, prompt, right, wrong_first, _ in _corruptions():
        steps = rm.step_scores(prompt, [right, wrong_first])
        assert len(steps[0]) == len(task.split_steps(right))  # one score per step, none for the answer
        assert all(0.0 <= s <= 1.0 for s in steps[0])
        caught += steps[1][0] < steps[0][0]
    assert caught >= 24  # of 30


@pytest.mark.xfail(strict=True, reason="known shortfall: the shipped arith-reward's outcome score barely "
                   "separates a right final answer from a wrong one (issue 3 stays open)")
def test_outcome_score_prefers_the_right_answer(rm):
    good, bad = [], []
    for _, _, prompt, right, _, wrong_answer in _corruptions():
        (s_good, _), (s_bad, _) = rm.score_completions(prompt, [right, wrong_answer])
        good.append(s_good)
        bad.append(s_bad)
    assert sum(good) / len(good) > sum(bad) / len(bad) + 0.2


def test_reward_model_errors_are_clear():
    from ponder.models.native import NativeLM

    lm = NativeLM.from_pretrained("arith")
    with pytest.raises(ValueError, match="not a reward model"):
        RewardModel(lm.model, lm.tokenizer, "arith")


def test_eval_best_of_n_with_prm_auc():
    r = subprocess.run(
        [sys.executable, "-m", "ponder.cli", "eval", "--level", "medium", "--limit", "6", "--strategy", "best-of-n",
         "--samples", "4", "--temperature", "1.0", "--reward-model", "arith-reward", "--prm", "arith-reward", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    assert res["problems"] == 6
    assert 0 <= res["majority_of_samples"] <= res["pass_at_n"] <= 1
    assert res["accuracy"] <= res["pass_at_n"]
    assert res["prm_steps_scored"] > 0
    # 4 samples per problem plus the reward model's reading of each
    assert res["usage_total"]["model_calls"] >= 6 * 4
