"""Generative verifiers (GenPRM, ThinkPRM): a critique, then P(yes) / (P(yes) + P(no))
at the verdict token, checked against transformers' own distribution at that token.

The verifier here is the shipped ``arith`` model: asked a question, its "critique" is
its own solution, its cue is ``Answer: `` and its verdict token is the answer's first
character (yes: an odd digit, no: an even one). What it judges does not matter to the
test: the score must be the recipe's formula on the model's real distribution.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest
import torch

from ponder.errors import SettingError
from ponder.scoring.generative import GENERATIVE, GenerativeVerifier, generative_format

ODD, EVEN = ("1", "3", "5", "7", "9"), ("0", "2", "4", "6", "8")
FMT = replace(GENERATIVE["genprm"], template="{question}\n{solution}", cue="Answer: ", yes=ODD, no=EVEN, top_k=20,
              max_tokens=96)


@pytest.fixture(scope="module")
def hf_arith():
    from transformers import AutoModelForCausalLM

    from ponder.models.registry import resolve_model

    return AutoModelForCausalLM.from_pretrained(str(resolve_model("arith")[0]), torch_dtype=torch.float32).eval()


def oracle(hf, tok, text: str, fmt=FMT) -> float:
    """The recipe by hand: transformers' next-token distribution after ``text``, its
    top-k, and the yes words' share of the yes and no words' mass."""
    ids = tok.encode(text).ids
    with torch.no_grad():
        logp = torch.log_softmax(hf(torch.tensor([ids])).logits[0, -1].double(), -1)
    top = torch.topk(logp, fmt.top_k)
    p_yes = p_no = 0.0
    for lp, i in zip(top.values.tolist(), top.indices.tolist()):
        w = tok.decode([i], skip_special_tokens=False).strip()
        p_yes += torch.tensor(lp).exp().item() if w in fmt.yes else 0.0
        p_no += torch.tensor(lp).exp().item() if w in fmt.no else 0.0
    return p_yes / (p_yes + p_no)


def test_the_verdict_is_the_formula_on_the_models_distribution(arith_lm, hf_arith):
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    v = GenerativeVerifier(arith_lm, FMT)
    checked = 0
    for p in task.problems("hard")[:6]:
        prompt = task.prompt(p)
        got = v.score(prompt, ["", "9+9=18"])
        assert got.meta["unparsed"] == 0 and got.usage.generated_tokens > 0
        for sol, value, critique in zip(["", "9+9=18"], got.values, got.meta["critiques"]):
            want = oracle(hf_arith, arith_lm.tokenizer, v.ask(prompt, sol) + critique + FMT.cue)
            assert value == pytest.approx(want, rel=1e-4, abs=1e-7)
            checked += 1
    assert checked == 12


def test_each_step_is_the_verdict_on_its_cut_and_is_judged_once(arith_lm):
    v = GenerativeVerifier(arith_lm, FMT)
    prompt, solution = "Q: 3+4-2+8\n", "3+4=7\n7-2=5\n5+8=13\n"
    first = v.score_steps(prompt, [solution], aggregation="min")
    assert len(first.steps[0]) == 3 and first.values[0] == min(first.steps[0])
    cuts = v.score(prompt, ["3+4=7", "3+4=7\n7-2=5", "3+4=7\n7-2=5\n5+8=13"])
    assert cuts.values == first.steps[0] and cuts.usage.generated_tokens == 0  # all remembered
    again = v.prm("last").score(prompt, [solution, solution + "13+1=14\n"])
    assert again.values[0] == first.steps[0][-1] and len(again.steps[1]) == 4
    many = v.score_steps_many([(prompt, [solution]), ("Q: 1+1\n", ["1+1=2\n"])], aggregation="mean")
    assert many[0].values[0] == pytest.approx(sum(first.steps[0]) / 3) and many[1].usage.generated_tokens > 0
    v.clear_cache()
    assert v.score(prompt, ["3+4=7"]).usage.generated_tokens > 0


def test_an_unreadable_verdict_scores_unparsed_and_is_counted(arith_lm):
    never = replace(FMT, cue="Zq", max_tokens=8)  # the critique never writes the cue
    got = GenerativeVerifier(arith_lm, never).score("Q: 3+4\n", ["", "3+4=7"])
    assert got.values == [0.5, 0.5] and got.meta["unparsed"] == 2
    # forced (ThinkPRM): the cue is appended, but neither word is in the top-1
    forced = replace(FMT, cue="Zq", force=True, top_k=1, yes=("Yes",), no=("No",), unparsed=0.25, max_tokens=8)
    got = GenerativeVerifier(arith_lm, forced).score("Q: 3+4\n", ["3+4=7"])
    assert got.values == [0.25] and got.meta["unparsed"] == 1


def test_formats_and_settings_are_checked(arith_lm):
    f = generative_format("thinkprm:yes=Y|y,no=N,top_k=5,cue=\\nVerdict: ")
    assert f.yes == ("Y", "y") and f.no == ("N",) and f.top_k == 5 and f.cue == "\nVerdict: " and f.force
    assert f.name == "thinkprm:yes=Y|y,no=N,top_k=5,cue=\\nVerdict: "
    assert generative_format("qwen-prm") is None
    for spec, match in [("genprm:colour=red", "overrides are key=value"), ("genprm:top_k=many", "integer"),
                        ("genprm:yes=A,no=A", "disjoint"), ("genprm:top_k=0", "top_k must be"),
                        ("genprm:unparsed=2", "unparsed must be"), ("genprm:cue=", "needs a cue")]:
        with pytest.raises(SettingError, match=match):
            GenerativeVerifier(arith_lm, spec)
    with pytest.raises(SettingError, match="must be one of genprm, thinkprm"):
        GenerativeVerifier(arith_lm, "qwen-prm")


def test_the_command_line_and_a_sweep_name_a_generative_verifier(tmp_path):
    spec = "genprm:cue=Answer: ,yes=1|3|5|7|9,no=0|2|4|6|8,force=1,max_tokens=40"
    out = subprocess.run([sys.executable, "-m", "ponder.cli", "score", "--reward-model", "arith", "--reward-format",
                          spec, "--prompt", "Q: 3+4-2\\n", "--completion", "3+4=7\\n7-2=5\\nAnswer: 5", "--json"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["format"] == spec and len(got["steps"]) == 3 and got["unparsed"] == 0
    assert all(0 < s < 1 for s in got["steps"]) and got["score"] == min(got["steps"])

    from ponder import strategies
    from ponder.sweep.run import verifier_identity

    a = strategies.load_reward_model("arith", fmt=spec)
    b = strategies.load_reward_model("arith", fmt=spec.replace("max_tokens=40", "max_tokens=41"))
    c = strategies.load_reward_model("arith-draft", fmt=spec)
    ids = {verifier_identity(x, "arith") for x in (a, b, c)}
    assert len(ids) == 3  # another recipe or another model: results never mix
    with pytest.raises(SettingError, match="--reward-model.*completions endpoint"):
        strategies.load_reward_model("http://127.0.0.1:9/v1/chat/completions#arith", fmt="genprm")
