"""Majority vote and best-of-N (scripted generators for the logic, shipped models end to
end), evaluation metrics, and a training smoke test on a tiny config."""

from __future__ import annotations

import json

import pytest
import torch

from ponder.evaluate import roc_auc, wilson_interval
from ponder.meta.parallel import BestOfN, MajorityVote
from ponder.protocols import GeneratorBase
from ponder.tasks.arith import ArithTask
from ponder.types import Generation, Usage


class Scripted(GeneratorBase):
    """Returns fixed texts in order: meta-generator logic without a model."""

    def __init__(self, texts):
        self.texts = texts

    async def agenerate(self, prompt, n=1, seed=None):
        return [Generation(text=t, token_ids=[1] * (i + 1), usage=Usage(generated_tokens=i + 1, wall_s=0.5))
                for i, t in enumerate(self.texts[:n])]


def test_majority_vote_picks_the_mode_and_sums_usage():
    texts = ["Answer: 3", "Answer: 5", "junk", "Answer: 5", "Answer: 3", "Answer: 5"]
    mv = MajorityVote(Scripted(texts), ArithTask().extract_answer, n=6)
    (g,) = mv.generate("Q")
    assert g.text == "Answer: 5" and g.score == pytest.approx(3 / 6)
    assert g.meta["votes"] == {"3": 2, "5": 3}
    assert len(g.trace) == 6
    assert g.usage.generated_tokens == sum(range(1, 7)) and g.usage.wall_s == pytest.approx(3.0)


def test_majority_tie_goes_to_the_first_reached():
    mv = MajorityVote(Scripted(["Answer: 9", "Answer: 4", "Answer: 4", "Answer: 9"]), ArithTask().extract_answer, n=4)
    assert mv.generate("Q")[0].text == "Answer: 9"


class LengthScorer:
    name = "length"

    def score(self, prompt, completions):
        from ponder.scoring.base import Scores

        return Scores([float(len(c)) for c in completions],
                      Usage(computed_tokens=sum(map(len, completions)), model_calls=len(completions)))


def test_best_of_n_takes_the_highest_score_and_bills_the_scorer():
    bon = BestOfN(Scripted(["a", "abcd", "ab"]), LengthScorer(), n=3)
    (g,) = bon.generate("Q")
    assert g.text == "abcd" and g.score == 4.0
    assert g.usage.computed_tokens == 7 and g.usage.model_calls == 3
    assert [t.score for t in g.trace] == [1.0, 4.0, 2.0]


def test_metric_helpers():
    assert roc_auc([0.9, 0.8, 0.3, 0.1], [True, True, False, False]) == 1.0
    assert roc_auc([0.1, 0.9], [True, False]) == 0.0
    assert roc_auc([0.5, 0.5], [True, False]) == 0.5
    assert roc_auc([0.5], [True]) is None
    lo, hi = wilson_interval(50, 100)
    assert lo == pytest.approx(0.4038, abs=1e-3) and hi == pytest.approx(0.5962, abs=1e-3)


def test_majority_end_to_end_on_the_shipped_model(arith_lm):
    from ponder.decoding.generate import Sample

    task = ArithTask()
    p = task.problems("medium", limit=1)[0]
    mv = MajorityVote(Sample(arith_lm, temperature=0.8, max_tokens=120), task.extract_answer, n=8)
    (g,) = mv.generate(task.prompt(p), seed=1)
    assert len(g.trace) == 8
    assert g.usage == Usage.total(t.usage for t in g.trace)
    assert task.extract_answer(g.text) in g.meta["votes"]


def test_training_smoke(tmp_path, tokenizer_file):
    """A few steps of ponder.train on a tiny config write a checkpoint that both ponder
    and transformers load."""
    from ponder.backends.native import NativeLM
    from ponder.train import main

    out = tmp_path / "m"
    main(["lm", "--out", str(out), "--tokenizer", str(tokenizer_file), "--hidden", "32", "--layers", "1",
          "--heads", "2", "--kv-heads", "1", "--batch", "4", "--steps", "3", "--minutes", "5"])
    meta = json.loads((out / "training.json").read_text())
    assert meta["steps"] == 3
    lm = NativeLM.from_pretrained(str(out))
    assert lm.num_parameters() == meta["parameters"]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in hf.parameters()) == meta["parameters"]


def test_training_with_steps_is_reproducible_bit_for_bit(tmp_path, tokenizer_file):
    """--steps sets the schedule over steps, not over the wall clock: the same command
    twice gives the same weights, and training.json records that command."""
    from safetensors.torch import load_file

    from ponder.train import main

    args = ["--tokenizer", str(tokenizer_file), "--hidden", "32", "--layers", "1", "--heads", "2",
            "--kv-heads", "1", "--batch", "4", "--steps", "20", "--minutes", "0.001"]
    for name in ("a", "b"):
        main(["lm", "--out", str(tmp_path / name), *args])
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((tmp_path / "a" / "training.json").read_text())
    assert meta["steps"] == 20 and meta["reproducible"] is True
    assert meta["command"].startswith("python -m ponder.train lm --out ") and "--steps 20" in meta["command"]
    assert meta["args"]["steps"] == 20


def test_planted_slips_are_the_targets_kinds_and_labelled_by_the_checker(tmp_path):
    """`ponder.train slipped`: with no slip a solution is right in every step; with one,
    the checker finds a wrong step (or a wrong answer) in nearly every solution, and the
    file's labels are the checker's. The kinds planted follow the target's: mostly a
    wrong result, also a term used twice."""
    import random
    from collections import Counter

    from ponder.tasks import arith
    from ponder.train import main
    from ponder.train.reward import slipped_solution

    task, rng = arith.ArithTask(), random.Random(0)
    stream = arith.training_stream(3, [arith.Level("x", 5, 7, 2)])
    wrong, kinds = 0, {"result": 0, "twice": 0}
    for i in range(300):
        q = next(stream)[0]
        p = arith.make_problem(q, str(i))
        clean = slipped_solution(rng, q, 0)
        assert all(task.prefix_correct(p, task.split_steps(clean))) and task.check_answer(p, clean)
        bad = slipped_solution(rng, q, 1)
        steps = task.split_steps(bad)
        wrong += not all(task.prefix_correct(p, steps)) or not task.check_answer(p, bad)
        used = [arith._STEP.match(s) for s in steps]
        named = Counter((m[2], int(m[3])) for m in used)
        kinds["twice"] += any(k > Counter(arith.parse_question(q))[t] for t, k in named.items())
        kinds["result"] += any(int(m[4]) != (int(m[1]) + int(m[3]) if m[2] == "+" else int(m[1]) - int(m[3]))
                               for m in used)
    assert wrong >= 0.9 * 300, wrong  # a "twice" at the first step has nothing to repeat
    assert kinds["result"] > 150 and kinds["twice"] > 20, kinds
    main(["slipped", "--out", str(tmp_path / "s.jsonl"), "--problems", "200", "--seed", "3"])
    rows = [json.loads(x) for x in (tmp_path / "s.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and 60 < sum(not r["correct"] for r in rows) < 140
    for r in rows:
        p = arith.make_problem(r["question"], "x")
        assert r["step_labels"] == task.prefix_correct(p, task.split_steps(r["completion"]))
        assert r["correct"] == task.check_answer(p, r["completion"])


def test_a_deeper_verifier_keeps_the_policy_below_its_added_blocks(tmp_path, tokenizer_file):
    """`ponder.train reward --extra-layers 1 --freeze-backbone --surprisal-weight 1`: the
    checkpoint is one block deeper than its policy, the policy's embeddings and block are
    in it bit for bit, the added block and the head were trained, it loads as a reward
    model with one score per step, and the surprisal head (a training aid) is not saved.
    A surprisal weight without a frozen backbone below added blocks is refused."""
    from safetensors.torch import load_file

    from ponder.errors import SettingError
    from ponder.scoring.reward import RewardModel
    from ponder.train import main

    policy, samples, out = tmp_path / "p", tmp_path / "s.jsonl", tmp_path / "r"
    main(["lm", "--out", str(policy), "--tokenizer", str(tokenizer_file), "--hidden", "32", "--layers", "1",
          "--heads", "2", "--kv-heads", "1", "--batch", "4", "--steps", "3"])
    main(["slipped", "--out", str(samples), "--problems", "40", "--seed", "1"])
    args = ["reward", "--policy", str(policy), "--samples", str(samples), "--out", str(out), "--tokenizer",
            str(tokenizer_file), "--batch", "8", "--steps", "4", "--lr", "0.01"]
    main([*args, "--extra-layers", "1", "--freeze-backbone", "--surprisal-weight", "1"])
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["num_hidden_layers"] == 2 and cfg["num_labels"] == 1
    a, b = load_file(str(policy / "model.safetensors")), load_file(str(out / "model.safetensors"))
    kept = [k for k in a if k.startswith(("model.embed_tokens", "model.layers.0."))]
    assert kept and all(torch.equal(a[k], b[k]) for k in kept)
    assert all(b[k].shape[0] == 1 for k in b if k.startswith("score"))  # the surprisal head is not saved
    assert b["score.weight"].abs().sum() > 0 and "model.layers.1.mlp.down_proj.weight" in b
    rm = RewardModel.from_pretrained(str(out))
    text = "1+2=3\n3+4=7\nAnswer: 7\n"
    assert len(rm.step_scores("Q: 1+2+4\n", [text])[0]) == 2
    for bad in (["--surprisal-weight", "1"], ["--extra-layers", "1", "--surprisal-weight", "1"],
                ["--extra-layers", "-1"], ["--token-weight", "-1"]):
        with pytest.raises(SettingError, match="--surprisal-weight|--extra-layers|--token-weight"):
            main([*args, *bad])


def test_token_labels_teach_the_head_at_every_solution_token(tmp_path, tokenizer_file):
    """`--token-weight`: the head is also taught, at every solution token, whether the text
    so far can still be finished right. The labels are the checker's per character, read
    at each token's last character (a merged token such as "Answer" included); a row whose
    tokens do not decode to its text (a stray byte) gets none. Training with the token loss
    differs from training without it, all else equal."""
    from ponder.scoring.reward import RewardModel
    from ponder.tasks import arith
    from ponder.train import main
    from ponder.train.reward import _token_labels

    policy, samples = tmp_path / "p", tmp_path / "s.jsonl"
    main(["lm", "--out", str(policy), "--tokenizer", str(tokenizer_file), "--hidden", "32", "--layers", "1",
          "--heads", "2", "--kv-heads", "1", "--batch", "4", "--steps", "3"])
    main(["slipped", "--out", str(samples), "--problems", "60", "--seed", "1"])
    rm = RewardModel.from_pretrained("arith-reward")
    question, text = "23+45-17+41", "23+45=68\n68+45=113\nAnswer: 113\n"  # +45 twice: wrong at its "5"
    prompt = f"Q: {question}\n"
    ids, start = rm.layout(prompt, text)[0], len(rm.layout(prompt, "")[0]) - 1
    labels = _token_labels(rm.tokenizer, ArithTask(), question, text, ids, start)
    pieces = [rm.tokenizer.decode([i]) for i in ids[start:]]
    assert "".join(pieces) == text and len(labels) == len(ids) - start
    assert labels.index(0.0) == text.index("68+45") + 4 and not any(labels[labels.index(0.0):])
    stray = text.replace("113", "1\ufffd3")  # what a sampled lone byte decodes to
    assert _token_labels(rm.tokenizer, ArithTask(), question, stray, rm.layout(prompt, stray)[0], start) is None
    common = ["reward", "--policy", str(policy), "--samples", str(samples), "--tokenizer", str(tokenizer_file),
              "--batch", "16", "--steps", "6", "--lr", "0.01", "--seed", "3"]
    main([*common, "--out", str(tmp_path / "with"), "--token-weight", "1"])
    main([*common, "--out", str(tmp_path / "without")])
    a = RewardModel.from_pretrained(str(tmp_path / "with")).model.score.weight
    b = RewardModel.from_pretrained(str(tmp_path / "without")).model.score.weight
    assert a.shape == b.shape == (1, 32) and not torch.equal(a, b)
    assert arith.ArithTask().valid_prefix(arith.make_problem(question, "q"), text)[-1] is False


def test_meta_generators_name_a_bad_argument(arith_lm):
    from ponder.decoding.generate import Sample
    from ponder.errors import SettingError

    task = ArithTask()
    with pytest.raises(SettingError, match="scorer must have score"):
        BestOfN(Sample(arith_lm), None)
    with pytest.raises(SettingError, match="generator must be a ponder generator"):
        MajorityVote(None, task.extract_answer)
    with pytest.raises(SettingError, match="extract_answer must be a callable"):
        MajorityVote(Sample(arith_lm), None)
