"""A strategy is declared once: one ``register(...)`` call, and the CLI (``ponder
strategies``, ``--set`` checks), the sweep's key (the verifier's identity when it scores)
and ``ponder serve --max-n`` (its budget counted) all see it. Nothing else is edited."""

from __future__ import annotations

import pytest

from ponder import strategies
from ponder.errors import SettingError
from ponder.params import SamplingParams
from ponder.strategies.core import ALL_ADAPTERS, Setting, Strategy, register, samples


def _vote(lm, p, s, ctx):
    from ponder.meta.parallel import WeightedMajorityVote

    return WeightedMajorityVote(strategies.build("sample", lm, p, {}, ctx), ctx.task.extract_answer, ctx.reward_model,
                                n=s["samples"])


@pytest.fixture
def declared():
    register(Strategy("test-vote", _vote, "a vote declared by a test", (samples(6), Setting(
        "margin", float, "a setting the factory ignores", lo=0.0, hi=1.0)), adapters=ALL_ADAPTERS, meta=True,
        access="text", needs=("task",), scored=True))
    yield strategies.STRATEGIES["test-vote"]
    del strategies.STRATEGIES["test-vote"]


def test_the_cli_lists_and_checks_it(declared):
    from typer.testing import CliRunner

    from ponder.cli import app

    out = CliRunner().invoke(app, ["strategies"]).output
    assert "test-vote" in out and "samples (an integer >= 1, default 6)" in out and "margin (a number in [0, 1])" in out
    from ponder.backends.native import NativeLM
    from ponder.tasks.arith import ArithTask

    from ponder.scoring.reward import RewardModel

    lm = NativeLM.from_pretrained("arith")
    ctx = strategies.Context(task=ArithTask(), reward_model=RewardModel.from_pretrained("arith-reward"))
    for bad, said in (({"samples": 0}, "samples (candidates per problem) must be an integer >= 1; got 0"),
                      ({"margin": 2}, "margin (a setting the factory ignores) must be a number in [0, 1]; got 2"),
                      ({"samples": "many"}, "must be an integer >= 1"), ({"colour": 1}, "does not take colour")):
        with pytest.raises(SettingError, match=said.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
            strategies.build("test-vote", lm, SamplingParams(temperature=0.7), bad, ctx)
    assert strategies.build("test-vote", lm, SamplingParams(temperature=0.7), {}, ctx).n == 6  # the declared default


def test_the_sweep_key_holds_the_verifier_because_it_scores(declared):
    from ponder.sweep.run import parse_config, prepare

    raw = {"reward_model": "arith-reward", "model": [{"name": "arith"}], "task": [{"name": "arith", "limit": 2}],
           "strategy": [{"name": "test-vote", "temperature": 0.7, "samples": 2}, {"name": "majority", "samples": 2,
                                                                                 "temperature": 0.7}]}
    runs = prepare(parse_config(raw)).runs
    config = {r[5].strategy: r[7] for r in runs}
    assert config["test-vote"]["reward_model"] is not None  # scored: another verifier is another result
    assert config["majority"]["reward_model"] is None
    declared.scored = False
    assert prepare(parse_config(raw)).runs[0][7]["reward_model"] is None


def test_ponder_serve_counts_its_budget(declared):
    from fastapi.testclient import TestClient

    from ponder.backends.native import NativeLM
    from ponder.server.api import Limits
    from ponder.server.app import create_app
    from ponder.scoring.reward import RewardModel

    app = create_app(NativeLM.from_pretrained("arith"), reward_model=RewardModel.from_pretrained("arith-reward"),
                     limits=Limits(max_n=8))
    with TestClient(app) as client:
        def ask(settings, n=1):
            return client.post("/v1/completions", json={"prompt": "Q: 3+4\n", "max_tokens": 32, "temperature": 0.7,
                                                        "n": n, "ponder": {"strategy": "test-vote",
                                                                           "settings": settings}})
        assert ask({}).status_code == 200  # its default, 6, is within 8
        r = ask({}, n=2)  # 6 x 2
        assert r.status_code == 400 and "6 samples per output x n=2" in r.text and "--max-n" in r.text
        r = ask({"samples": 9})
        assert r.status_code == 400 and "9 samples" in r.text
        # nested: majority over beam search at 16 beams spends 16 per output
        r = client.post("/v1/completions", json={"prompt": "Q: 3+4\n", "max_tokens": 32, "temperature": 0.7,
                                                 "ponder": {"strategy": "majority", "task": "arith", "settings": {
                                                     "samples": 2, "over": "beam-sample", "over.num_beams": 16}}})
        assert r.status_code == 400 and "16 beam-sample.num_beams" in r.text, r.text


def test_the_readme_sweep_builds_every_run_and_its_policies_name_candidates_on_the_draft(tmp_path):
    """The default sweep (the README's main command) parses and builds every generator,
    compute-optimal's fitted policies with the candidates they name; a policy may name
    NAME#TAG candidates, one on arith-draft (NAME#TAG.model)."""
    from ponder.strategies.core import spend
    from ponder.sweep.run import default_config_path, load_config, prepare

    cfg = load_config(default_config_path())
    assert cfg.tasks[0]["level"] == "expert" and cfg.tasks[0]["split"] == "test"
    runs = prepare(cfg).runs
    assert {r[0] for r in runs} == {"arith", "arith-draft"}
    co = [r for r in runs if r[5].strategy == "compute-optimal"]
    assert len(co) == 2
    for run in co:
        named = {step.split(":")[1] for step in run[5].settings["policy"].split(",")} - {"probe"}
        assert named == set(run[6].strategies)
    text = default_config_path().read_text()
    head = text[: text.index("[[strategy]]")]
    (tmp_path / "draft.toml").write_text(head + """
[[strategy]]
name = "compute-optimal"
models = ["arith"]
temperature = 0.7
probe = 1
policy = "0.5:weighted-majority#draft,1:weighted-majority"
"weighted-majority#draft.samples" = 4
"weighted-majority#draft.model" = "arith-draft"
"weighted-majority.samples" = 8
""")
    (gen,) = [r[6] for r in prepare(load_config(tmp_path / "draft.toml")).runs]
    assert set(gen.strategies) == {"weighted-majority", "weighted-majority#draft"}
    assert gen.strategies["weighted-majority#draft"].generator.lm.name == "arith-draft"
    assert gen.strategies["weighted-majority"].generator.lm.name == "arith"
    settings = {"policy": "0.5:majority#big,1:majority", "majority#big.samples": 12, "majority.samples": 4}
    assert spend("compute-optimal", settings) == (12, "majority#big.samples")
