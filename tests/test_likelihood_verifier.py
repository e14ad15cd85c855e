"""`ponder.train likelihood-verifier`: a reward model built (not trained) on a checker LM.
Its step score must be the checker's least token log-probability so far (the running min
over the solution), put through a fitted sigmoid: checked against the checker itself, on
solutions with planted slips, batched and alone; bad settings are refused by name."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ponder.errors import SettingError
from ponder.models.registry import resolve_model
from ponder.scoring.reward import RewardModel
from ponder.train import main


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    torch.set_num_threads(1)
    d = tmp_path_factory.mktemp("lv")
    main(["slipped", "--out", str(d / "s.jsonl"), "--problems", "220", "--seed", "3"])
    main(["likelihood-verifier", "--checker", str(resolve_model("arith")[0]), "--samples", str(d / "s.jsonl"),
          "--out", str(d / "rm"), "--per-file", "220", "--build-rows", "120", "--calibration-rows", "60",
          "--lse-steps", "1500", "--threads", "1"])
    rows = [json.loads(x) for x in (d / "s.jsonl").read_text().splitlines()][180:]
    return d, RewardModel.from_pretrained(str(d / "rm")), rows


def _checker_running_min(checker, rm, prompt, text):
    """The checker's least log p(token) over the solution up to each step end (as the blocks compute it)."""
    ids, ends, _ = rm.layout(prompt, text)
    with torch.no_grad():
        lp = torch.log_softmax(checker.logits(checker(torch.tensor([ids])))[0].float(), -1)
    tok = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]  # tok[i - 1] = log p(ids[i])
    start = len(rm.layout(prompt, "")[0]) - 1
    return [tok[start - 1:e].min().item() for e in ends]


def test_the_score_is_the_checkers_running_min_log_probability(built):
    from ponder.models.loader import load_transformer

    d, rm, rows = built
    record = json.loads((d / "rm" / "training.json").read_text())
    assert record["command"].startswith("python -m ponder.train likelihood-verifier --checker ")
    assert record["s_err_max"] < 0.01 and record["logit_err_max"] < 0.5
    checker = load_transformer(resolve_model("arith")[0]).eval()
    got, want = [], []
    for r in rows[:20]:
        prompt = f"Q: {r['question']}\n"
        logits = [math.log(p / (1 - p)) for p in rm.step_scores(prompt, [r["completion"]])[0]]
        got += logits
        want += _checker_running_min(checker, rm, prompt, r["completion"])[:len(logits)]
    got, want = torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64)
    assert len(got) > 60 and want.min() < -3  # slips the checker is sure of, and right steps
    # the head is sigmoid(scale * min + bias): read back in nats through the fitted line
    slope, intercept = torch.linalg.lstsq(torch.stack([want, torch.ones_like(want)], 1), got[:, None]).solution[:, 0]
    assert slope > 0
    err = (got - intercept) / slope - want
    # a soft min (10 per nat) and a logsumexp fitted in 1,500 steps (0.3 nats RMS here; 0.1
    # in the shipped build): within a few tenths of a nat, over a range of 10
    assert torch.corrcoef(torch.stack([got, want]))[0, 1] > 0.98
    assert err.abs().median() < 0.4 and err.abs().quantile(0.9) < 1.0, err


def test_it_tells_planted_slips_from_right_steps_and_batches_as_alone(built):
    from ponder.evaluate import roc_auc

    _, rm, rows = built
    scores, labels = [], []
    for r in rows:
        s = rm.step_scores(f"Q: {r['question']}\n", [r["completion"]])[0]
        scores += list(s[:len(r["step_labels"])])
        labels += r["step_labels"][:len(s)]
    assert 0 < sum(labels) < len(labels)
    assert roc_auc(scores, labels) > 0.95
    prompt = f"Q: {rows[0]['question']}\n"
    texts = [r["completion"] for r in rows[:4]]
    batch = rm.step_scores(prompt, texts)
    for t, s in zip(texts, batch):
        assert max(abs(x - y) for x, y in zip(s, rm.step_scores(prompt, [t])[0])) < 1e-5


def test_bad_settings_are_refused_by_name(built, tmp_path):
    d, _, _ = built
    base = ["likelihood-verifier", "--samples", str(d / "s.jsonl"), "--out", str(tmp_path / "x")]
    arith = str(resolve_model("arith")[0])
    with pytest.raises(SettingError, match="--build-rows must be >= 1"):
        main([*base, "--checker", arith, "--build-rows", "0"])
    with pytest.raises(SettingError, match="need 1000"):
        main([*base, "--checker", arith, "--per-file", "50", "--build-rows", "900", "--calibration-rows", "100"])
    with pytest.raises(SettingError, match="needs an MLP of at least"):
        main([*base, "--checker", str(resolve_model("arith-draft")[0]), "--build-rows", "20", "--calibration-rows", "5"])
