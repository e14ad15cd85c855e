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


def test_step_and_outcome_scores_track_correctness(rm):
    task = ArithTask()
    good, bad_last, bad_first = [], [], []
    for p in task.problems("medium", limit=30):
        prompt = task.prompt(p)
        right = arith.solution_text(p.question)
        lines = right.split("\n")
        # corrupt the result of the first step
        first = lines[0].rsplit("=", 1)
        wrong_first = "\n".join([f"{first[0]}={int(first[1]) + 7}"] + lines[1:])
        wrong_answer = right.replace(f"Answer: {p.answer}", f"Answer: {int(p.answer) + 10}")
        (s_good, _), (s_bad, _) = rm.score_completions(prompt, [right, wrong_answer])
        good.append(s_good)
        bad_last.append(s_bad)
        steps = rm.step_scores(prompt, [right, wrong_first])
        assert len(steps[0]) == len(task.split_steps(right))
        assert all(0.0 <= s <= 1.0 for s in steps[0])
        bad_first.append(steps[1][0] < steps[0][0])
    assert sum(good) / len(good) > sum(bad_last) / len(bad_last) + 0.2
    assert sum(bad_first) >= 0.8 * len(bad_first)


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
