"""Adaptive consistency (issue 25): the stopping rules computed by hand, a scripted
policy that stops exactly where the rule says and is billed for exactly what it drew,
the weighted variant, and seeded runs on the shipped model (alone = batched)."""

from __future__ import annotations

import asyncio
import math
import re

import pytest

from ponder.errors import SettingError
from ponder.meta.adaptive import AdaptiveVote, beta_above_half, dirichlet_leader
from ponder.scoring.base import Scores
from ponder.types import Generation, Usage


def _answer(text: str) -> str | None:
    m = re.search(r"Answer: (\S+)", text)
    return m[1] if m else None


class Scripted:
    """A policy that answers from a script, 10 tokens a sample; records the calls."""

    def __init__(self, answers):
        self.answers, self.calls = list(answers), []

    async def agenerate(self, prompt, n=1, seed=None):
        self.calls.append(n)
        out = []
        for _ in range(n):
            a = self.answers.pop(0)
            out.append(Generation(text=f"Answer: {a}\n" if a is not None else "no idea\n", token_ids=[],
                                  finish_reason="stop", usage=Usage(generated_tokens=10, computed_tokens=10)))
        return out


class ScriptedScorer:
    def __init__(self, table):
        self.table = table

    def score(self, prompt, completions):
        vals = [self.table[_answer(c)] for c in completions]
        return Scores(vals, Usage(computed_tokens=3 * len(vals)))


@pytest.mark.parametrize("a, b", [(0, 0), (3, 0), (4, 0), (5, 2), (9, 6), (12, 3)])
def test_the_beta_rule_against_the_binomial_identity(a, b):
    # for integer votes, P(Beta(a+1, b+1) > 1/2) = P(Binomial(a+b+1, 1/2) <= a)
    exact = sum(math.comb(a + b + 1, k) for k in range(a + 1)) / 2 ** (a + b + 1)
    assert beta_above_half(a, b) == pytest.approx(exact, abs=1e-6)


def test_the_dirichlet_rule_is_seeded_and_sensible():
    assert dirichlet_leader([10.0]) > 0.99
    assert dirichlet_leader([3.0, 3.0]) < 0.6
    assert dirichlet_leader([5.0, 1.0], seed=3) == dirichlet_leader([5.0, 1.0], seed=3)


def test_it_stops_exactly_where_the_rule_says_and_bills_what_it_drew():
    # three agreeing votes: P = 15/16 = 0.9375 < 0.95, go on; four: 31/32 = 0.969, stop
    pol = Scripted(["7"] * 16)
    (g,) = asyncio.run(AdaptiveVote(pol, _answer, n=16, batch=1, confidence=0.95).agenerate("q"))
    assert g.meta["samples_drawn"] == 4 and g.meta["stopped_by"] == "beta" and _answer(g.text) == "7"
    assert g.usage.generated_tokens == 40 and len(g.trace) == 4 and pol.calls == [1, 1, 1, 1]
    assert g.meta["confidence"] == pytest.approx(31 / 32, abs=1e-6)
    # a split vote never settles: all n are drawn
    pol = Scripted(["7", "8"] * 8)
    (g,) = asyncio.run(AdaptiveVote(pol, _answer, n=16, batch=4).agenerate("q"))
    assert g.meta["samples_drawn"] == 16 and g.meta["stopped_by"] == "max_samples" and pol.calls == [4] * 4
    assert g.usage.generated_tokens == 160
    # unanswered samples do not vote: 7, none, 7, 7, 7 -> four votes settle it at the fifth
    pol = Scripted(["7", None, "7", "7", "7", "7"])
    (g,) = asyncio.run(AdaptiveVote(pol, _answer, n=6, batch=1).agenerate("q"))
    assert g.meta["samples_drawn"] == 5


def test_the_window_rule_stops_when_a_window_agrees():
    pol = Scripted(["7", "8", "7", "7", "9", "9"])
    (g,) = asyncio.run(AdaptiveVote(pol, _answer, n=6, batch=2, rule="window").agenerate("q"))
    assert g.meta["samples_drawn"] == 4 and _answer(g.text) == "7" and g.meta["stopped_by"] == "window"


def test_weighted_votes_settle_by_reward():
    # 7 is rated 0.9, 8 is rated 0.1
    table = {"7": 0.9, "8": 0.1}
    pol = Scripted(["7", "8", "7", "7", "7", "7"])
    gen = AdaptiveVote(pol, _answer, n=6, batch=1, weight="reward", scorer=ScriptedScorer(table))
    (g,) = asyncio.run(gen.agenerate("q"))
    script = ["7", "8", "7", "7", "7", "7"]

    def p_after(k):  # the answers' shares of the weight, times the k samples
        w = {x: sum(table[a] for a in script[:k] if a == x) for x in ("7", "8")}
        return beta_above_half(*sorted((v * k / sum(w.values()) for v in w.values()), reverse=True))

    expect = next(k for k in range(1, 7) if p_after(k) >= 0.95)
    assert expect == 4  # unweighted, 7 8 7 7 would need a fifth 7 (3 against 1: P = 0.81)
    assert g.meta["samples_drawn"] == expect and _answer(g.text) == "7" and gen.strategy == "adaptive-weighted"
    assert g.usage.computed_tokens == 10 * expect + 3 * expect  # the samples' and the scorer's


@pytest.mark.parametrize("kw, msg", [({"n": 0}, "samples"), ({"batch": 0}, "batch"), ({"rule": "vibes"}, "rule"),
                                     ({"confidence": 1.0}, "confidence"), ({"weight": "reward"}, "scorer"),
                                     ({"rule": "window", "batch": 1}, "window")])
def test_bad_settings_are_named(kw, msg):
    with pytest.raises(SettingError, match=msg):
        AdaptiveVote(Scripted([]), _answer, **kw)


def test_seeded_on_the_shipped_model_alone_equals_batched(arith_lm):
    from ponder import strategies
    from ponder.params import SamplingParams
    from ponder.tasks.registry import load_task

    task = load_task("arith")
    prompts = [task.prompt(p) for p in task.problems("medium", 4)]
    gen = strategies.build("adaptive-majority", arith_lm, SamplingParams(temperature=0.7, max_tokens=120),
                           {"samples": 12, "batch": 3}, strategies.Context(task=task))
    batched = gen.generate_batch(prompts, seed=5)
    alone = [gen.generate_batch([p], seed=5)[0] for p in prompts]
    assert [(o[0].text, o[0].meta["samples_drawn"]) for o in batched] == [(o[0].text, o[0].meta["samples_drawn"])
                                                                           for o in alone]
    assert any(o[0].meta["samples_drawn"] < 12 for o in batched)  # medium problems settle early
    assert all(o[0].usage.generated_tokens == sum(t.usage.generated_tokens for t in o[0].trace) for o in batched)


# -- DeepConf offline (confidence-filtered voting) ------------------------------------------
def test_token_and_group_confidence_by_hand():
    from ponder.meta.deepconf import group_confidences, token_confidences, trace_confidence

    tops = [{1: math.log(0.5), 2: math.log(0.5)}, {1: math.log(0.9), 2: math.log(0.1)}, {1: -1.0, 2: -3.0}]
    c = token_confidences(tops)
    assert c == pytest.approx([math.log(2), -(math.log(0.9) + math.log(0.1)) / 2, 2.0])
    assert group_confidences([1.0, 2.0, 3.0, 4.0], 2) == [1.5, 2.5, 3.5]
    assert group_confidences([1.0, 2.0], 4) == [1.5]  # shorter than the window: one group
    assert trace_confidence(tops, window=2, measure="lowest") == pytest.approx(min((c[0] + c[1]) / 2, (c[1] + c[2]) / 2))
    assert trace_confidence(tops, window=2, measure="tail") == pytest.approx((c[1] + c[2]) / 2)


class ScriptedConf:
    """Samples whose every token has the given top-2 log-probabilities."""

    def __init__(self, traces):
        self.traces = traces

    async def agenerate(self, prompt, n=1, seed=None):
        return [Generation(text=f"Answer: {a}\n", token_ids=[], finish_reason="stop", top_logprobs=[dict(t)] * 5,
                           usage=Usage(generated_tokens=5)) for a, t in self.traces[:n]]


def test_confident_traces_outvote_the_rest():
    from ponder.meta.deepconf import ConfidenceVote

    sure, unsure = {1: -0.01, 2: -6.0}, {1: -0.7, 2: -0.7}  # confidences 3.005 and 0.7
    traces = [("8", unsure)] * 3 + [("7", sure)] * 2
    (g,) = ConfidenceVote(ScriptedConf(traces), _answer, n=5, keep=0.4).generate("q")
    assert _answer(g.text) == "7" and g.meta["kept"] == [3, 4] and g.usage.generated_tokens == 25
    (g,) = ConfidenceVote(ScriptedConf(traces), _answer, n=5, keep=1.0).generate("q")
    assert _answer(g.text) == "7"  # all vote, weighted: 2 x 3.005 against 3 x 0.7
    with pytest.raises(SettingError, match="top-k log-probabilities"):
        ConfidenceVote(Scripted(["7"] * 4), _answer, n=4).generate("q")
    with pytest.raises(SettingError, match="keep"):
        ConfidenceVote(ScriptedConf(traces), _answer, keep=0)


# -- DeepConf online: traces stopped mid-generation ------------------------------------------
def test_online_traces_stop_where_the_rule_says_and_are_billed_what_they_generated(arith_lm):
    from ponder import strategies
    from ponder.meta.deepconf import stopped_at, trace_confidence
    from ponder.params import SamplingParams
    from ponder.tasks.registry import load_task

    task = load_task("arith")
    prompts = [task.prompt(p) for p in task.problems("hard", 6)]
    gen = strategies.build("deepconf-online", arith_lm, SamplingParams(temperature=0.7, max_tokens=160),
                           {"samples": 10, "warmup": 4, "keep": 0.25, "window": 8, "consensus": 1.0},
                           strategies.Context(task=task))
    outs = gen.generate_batch(prompts, seed=3)
    stopped = 0
    for (g,) in outs:
        thr = g.meta["threshold"]
        assert g.usage.generated_tokens == sum(len(t.token_ids) for t in g.trace)  # billed what was generated
        assert g.usage.generated_tokens == sum(t.usage.generated_tokens for t in g.trace)
        for j, t in enumerate(g.trace):
            at = g.meta["stopped_at"][j]
            if j < 4:  # warm-up traces run whole
                assert at is None
                continue
            assert at == stopped_at(t.top_logprobs, thr, 8)  # the processor's decision = the rule on the trace
            if at is not None:  # ended by a forced EOS at exactly that step, and it does not vote
                stopped += 1
                assert len(t.token_ids) == at + 1 and t.token_ids[-1] in arith_lm.eos_token_ids
                assert t.finish_reason == "stop"
            else:  # not stopped: confident enough, or ended before a full window
                assert len(t.token_ids) < 8 or trace_confidence(t.top_logprobs, 8, "lowest") >= thr
    assert stopped >= 3  # keep=0.25 sets a high threshold: many traces are cut
    # seeded: alone = batched
    alone = [gen.generate_batch([p], seed=3)[0][0] for p in prompts[:2]]
    assert [(a.text, a.meta["stopped_at"]) for a in alone] == [(o[0].text, o[0].meta["stopped_at"]) for o in outs[:2]]


def test_compute_optimal_counts_the_probe_as_the_first_samples():
    """Compute-optimal selection over votes (issue 25): the probe's samples are the
    vote's first samples, so majority@8 after a 4-sample probe draws 4 more, not 8, and
    the bill is the 8 samples once."""
    from ponder.meta.compute_optimal import ComputeOptimal
    from ponder.meta.parallel import MajorityVote

    pol = Scripted(["1", "2", "3", "1"] + ["1", "1", "2", "1"])
    vote = MajorityVote(pol, _answer, n=8)
    co = ComputeOptimal(pol, _answer, {"vote": vote}, policy="0.25:probe,1:vote", probe_n=4)
    (g,) = co.generate("Q", seed=0)
    assert pol.calls == [4, 4] and g.meta["chose"] == "vote" and g.meta["difficulty"] == 0.5
    assert g.usage.generated_tokens == 80 and _answer(g.text) == "1"
    # adaptive consistency continues from the probe too, and stops at once if it is settled
    pol = Scripted(["7"] * 6)
    ada = AdaptiveVote(pol, _answer, n=16, batch=2, confidence=0.95)
    co = ComputeOptimal(pol, _answer, {"ada": ada}, policy="1:ada", probe_n=6)
    (g,) = co.generate("Q", seed=0)
    assert pol.calls == [6] and g.usage.generated_tokens == 60 and g.trace[-1].meta["samples_drawn"] == 6


def test_compute_optimal_fit_prices_a_continuation_beyond_the_probe():
    from ponder.meta.compute_optimal import ComputeOptimal
    from ponder.meta.parallel import MajorityVote

    class Endless(Scripted):
        async def agenerate(self, prompt, n=1, seed=None):
            self.answers = ["5"] * n
            return await super().agenerate(prompt, n, seed)

    pol = Endless([])
    co = ComputeOptimal(pol, _answer, {"m8": MajorityVote(pol, _answer, n=8)}, probe_n=4)
    rows = co.fit(["Q1", "Q2"], lambda p, t: _answer(t) == "5", budget=100)
    # every probe agrees (difficulty 0): the probe costs 40 a problem, majority@8 80 in all (not 120)
    assert rows[0]["candidates"]["probe"]["cost"] == 40 and rows[0]["candidates"]["m8"]["cost"] == 80
    assert rows[0]["chose"] == "probe"


def test_later_batches_are_served_from_the_prompts_cached_prefix(arith_lm):
    """Adding samples to a problem (adaptive consistency's next batch) keeps the shared
    prompt in the engine's prefix cache: only the first batch computes the prompt."""
    from ponder import strategies
    from ponder.engine.engines import clear_prefix_caches
    from ponder.params import SamplingParams
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    prompt = task.prompt(task.problems("hard")[3])
    n_prompt = len(arith_lm.encode(prompt))
    assert n_prompt >= 16  # a prefix is reused from one block (16 tokens) on
    clear_prefix_caches()
    gen = strategies.build("adaptive-majority", arith_lm, SamplingParams(temperature=0.7, max_tokens=160),
                           {"samples": 8, "batch": 2, "confidence": 0.99}, strategies.Context(task=task))
    (g,) = gen.generate(prompt, seed=0)
    first, *later = g.trace
    assert len(g.trace) > 2 and first.usage.computed_tokens == n_prompt + first.usage.generated_tokens - 1
    for s in g.trace[2:]:  # the batches after the first: their tokens only, the prompt is cached
        assert s.usage.computed_tokens <= s.usage.generated_tokens
