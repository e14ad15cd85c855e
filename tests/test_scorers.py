"""Sequence log-probability and LLM-as-judge scorers: hand-computed cases on scripted
models, and the log-probability scorer against the engine's own token log-probs."""

from __future__ import annotations

import asyncio
import math

import pytest

from ponder.errors import SettingError
from ponder.meta.parallel import BestOfN
from ponder.params import SamplingParams
from ponder.protocols import Access, AccessError, GeneratorBase
from ponder.scoring.judge import LLMJudge
from ponder.scoring.logprob import SequenceLogprob
from ponder.types import Generation, Usage


class ScriptedJudge:
    """A text-only backend whose verdict for an answer is looked up by the answer text."""

    name = "judge"
    access = Access.TEXT

    def __init__(self, verdicts):
        self.verdicts, self.asks = verdicts, []

    async def generate(self, prompts, params):
        out = []
        for p in prompts:
            self.asks.append(p)
            answer = p.split("[Answer]\n", 1)[1].split("\n\n", 1)[0]
            replies = self.verdicts[answer]
            out.append([Generation(text=replies[j % len(replies)], token_ids=[1, 2], finish_reason="stop",
                                   usage=Usage(generated_tokens=2, computed_tokens=50, wall_s=0.01))
                        for j in range(params.n)])
        return out


def test_judge_grades_parse_to_unit_scores_and_bill_the_judge():
    judge = ScriptedJudge({"A": [" 8"], "B": [" 1 out of 10"], "C": [" excellent"], "D": [" 11"]})
    s = LLMJudge(judge).score("Q: 3+4\n", ["A", "B", "C", "D"])
    # grade g on 1..10 -> (g - 1) / 9; an unreadable or out-of-range grade scores 0 and is counted
    assert s.values == pytest.approx([7 / 9, 0.0, 0.0, 0.0])
    assert s.meta["unparsed"] == 2
    assert s.usage.generated_tokens == 8 and s.usage.computed_tokens == 200
    assert "[Question]\nQ: 3+4\n\n[Answer]\nA" in judge.asks[0] and "scale of 1 to 10" in judge.asks[0]


def test_judge_averages_several_verdicts():
    judge = ScriptedJudge({"A": ["Grade: 10", "Grade: 4"], "B": ["Grade: 2", "no idea"]})
    s = LLMJudge(judge, samples=2, pattern=r"Grade: (\d+)", params=SamplingParams(temperature=1.0)).score(
        "Q", ["A", "B"])
    assert s.values == pytest.approx([(1.0 + 3 / 9) / 2, 1 / 9])  # B: only the readable verdict counts
    assert s.meta["unparsed"] == 1 and s.usage.generated_tokens == 8


class Fixed(GeneratorBase):
    def __init__(self, texts):
        self.texts = texts

    async def agenerate(self, prompt, n=1, seed=None):
        return [Generation(text=t, token_ids=[1], usage=Usage(generated_tokens=1)) for t in self.texts[:n]]


def test_best_of_n_with_a_judge_runs_inside_the_event_loop():
    # BestOfN.aggregate is synchronous code in a running loop; the judge's async backend
    # must still be driven to completion (run_sync uses a helper thread then).
    judge = ScriptedJudge({"x": ["3"], "y": ["9"], "z": ["5"]})
    g = BestOfN(Fixed(["x", "y", "z"]), LLMJudge(judge), n=3).generate("Q")[0]
    assert g.text == "y" and g.score == pytest.approx(8 / 9)
    assert g.usage.generated_tokens == 3 + 6  # three samples + three two-token verdicts


def test_judge_bad_settings_are_named():
    judge = ScriptedJudge({})
    for kwargs, msg in [(dict(template="no slots"), "template must contain {question}"),
                        (dict(low=5, high=5), "low < high"), (dict(pattern="("), "not a valid regular expression"),
                        (dict(pattern=r"\d+"), "group capturing the grade"), (dict(samples=0), "samples")]:
        with pytest.raises(SettingError, match=msg):
            LLMJudge(judge, **kwargs)


def test_sequence_logprob_matches_the_engines_token_logprobs(arith_lm):
    prompt = "Q: 3+4-2+8\n"
    (g,) = asyncio.run(arith_lm.generate([prompt], SamplingParams(max_tokens=40)))[0]
    text, lps = g.text, g.logprobs
    n_text = len(arith_lm.encode(text, add_special_tokens=False))
    lps = lps[:n_text]  # the generation's logprobs may include the EOS the text omits
    mean = SequenceLogprob(arith_lm, "mean").score(prompt, [text, ""])
    total = SequenceLogprob(arith_lm, "sum").score(prompt, [text])
    assert total.values[0] == pytest.approx(sum(lps), abs=1e-3)
    assert mean.values[0] == pytest.approx(sum(lps) / len(lps), abs=1e-4)
    assert mean.values[1] == -math.inf  # an empty completion says nothing
    n_prompt = len(arith_lm.encode(prompt))
    assert mean.usage.model_calls == 1 and mean.usage.computed_tokens == n_prompt + n_text


def test_sequence_logprob_needs_logprob_access():
    class TextOnly:
        name, access = "remote", Access.TEXT

        async def generate(self, prompts, params):
            return []

    with pytest.raises(AccessError, match="needs logprobs access"):
        SequenceLogprob(TextOnly())
