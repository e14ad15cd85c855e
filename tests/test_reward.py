"""The shipped reward model: format (transformers loads it), PRM/ORM scores, best-of-N."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from ponder.scoring.reward import RewardModel
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


@pytest.fixture(scope="module")
def target_samples():
    """The target model's own solutions to held-out problems, labelled by the checkers:
    what the reward model is for."""
    from ponder.decoding.generate import Sample
    from ponder.backends.native import NativeLM

    task = ArithTask()
    probs = task.problems("expert", limit=64)  # where the target errs (it is right on all of hard)
    gen = Sample(NativeLM.from_pretrained("arith"), temperature=0.7, max_tokens=160)
    outs = gen.generate_batch([task.prompt(p) for p in probs], n=8, seed=0)
    return task, probs, outs


def test_step_scores_separate_right_from_wrong_steps(rm, target_samples):
    from ponder.evaluate import roc_auc

    task, probs, outs = target_samples
    scores, labels = [], []
    for p, gens in zip(probs, outs):
        texts = [g.text for g in gens]
        for text, steps in zip(texts, rm.step_scores(task.prompt(p), texts)):
            assert len(steps) == len(task.split_steps(text))  # one score per step, none for the answer
            scores += steps
            labels += task.prefix_correct(p, task.split_steps(text))
    assert 0 < sum(labels) < len(labels)
    # measured 0.811 here (0.826 over 200 problems x 16): moderate at two digits, see MODEL.md
    assert roc_auc(scores, labels) >= 0.75


def test_outcome_scores_pick_right_answers(rm, target_samples):
    task, probs, outs = target_samples
    good, bad, best_right, any_right = [], [], 0, 0
    for p, gens in zip(probs, outs):
        texts = [g.text for g in gens]
        scored = [s for s, _ in rm.score_completions(task.prompt(p), texts)]
        ok = [task.check_answer(p, t) for t in texts]
        good += [s for s, y in zip(scored, ok) if y]
        bad += [s for s, y in zip(scored, ok) if not y]
        any_right += any(ok)
        best_right += ok[max(range(len(texts)), key=scored.__getitem__)]
    # measured on these 64 expert problems: right answers 0.383 on average, wrong 0.225
    assert good and bad and sum(good) / len(good) > sum(bad) / len(bad) + 0.1
    # best-of-8 finds half of the right answers there are (27 of 54 problems here; 0.485
    # vs pass@16 0.92 over 200): with ~54 solvable problems the binomial spread is ~0.07,
    # so 0.35 sits ~2 sigma under the measured rate
    assert best_right >= 0.35 * any_right


def test_reward_model_errors_are_clear():
    from ponder.backends.native import NativeLM

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
    for key in ("majority_of_samples", "pass_at_n", "accuracy"):  # k of 6 problems
        assert round(res[key] * 6, 9) == int(round(res[key] * 6))
    assert res["prm_steps_scored"] > 0
    # 4 samples per problem plus the reward model's reading of each
    assert res["usage_total"]["model_calls"] >= 6 * 4


def test_widening_the_heads_keeps_the_scores_and_says_so(rm, tmp_path):
    """`ponder.train widen-heads` (for vLLM's CPU attention): the shipped reward model,
    its heads widened 64 -> 80, scores every step and outcome as before (within float32
    rounding), and the copy's training.json records the widening beside the run's command;
    a head size not above the model's is refused, naming the size."""
    from ponder.errors import SettingError
    from ponder.models.registry import resolve_model
    from ponder.train import main
    from ponder.train.widen import widen_heads

    out = tmp_path / "wide"
    main(["widen-heads", "--model", "arith-reward", "--head-dim", "80", "--out", str(out)])
    wide = RewardModel.from_pretrained(str(out))
    assert json.loads((out / "config.json").read_text())["head_dim"] == 80
    prompt = "Q: 12+34-5+67\n"
    texts = ["12+34=46\n46-5=41\n41+67=108\nAnswer: 108\n", "12+34=46\n46-5=42\n42+67=109\nAnswer: 109\n"]
    for a, b in zip(rm.step_scores(prompt, texts), wide.step_scores(prompt, texts)):
        assert len(a) == len(b) == 3 and max(abs(x - y) for x, y in zip(a, b)) < 1e-5
    assert max(abs(x - y) for x, y in zip(rm.score(prompt, texts).values, wide.score(prompt, texts).values)) < 1e-5
    record = json.loads((out / "training.json").read_text())
    assert record["command"] == json.loads((resolve_model("arith-reward")[0] / "training.json").read_text())["command"]
    assert record["widened"]["head_dim"] == [64, 80]
    assert record["widened"]["command"].startswith("python -m ponder.train widen-heads --model arith-reward")
    with pytest.raises(SettingError, match="above the model's head size 64"):
        widen_heads(resolve_model("arith-reward")[0], tmp_path / "narrow", 64)
