"""Multi-step decoding: a lone greedy row decodes several tokens per call into the C
kernel, token-identical (and bill-identical) to one step per token, wherever the row
ends: EOS or a stop token inside a call, max_tokens landing mid-call, min_tokens, a
stop string in the text (then the bill keeps the tokens computed past it), streams."""

from __future__ import annotations

import pytest

from ponder.decoding.generate import Greedy
from ponder.engine.engine import Engine
from ponder.engine.engines import engine_for
from ponder.tasks.arith import ArithTask

TASK = ArithTask()
PROMPTS = [TASK.prompt(p) for p in TASK.problems("hard", 12)]


def _run(lm, monkeypatch, multi: int, prompts=PROMPTS, cold: bool = True, **options):
    """Each prompt alone; ``cold``: without the prefix cache, so that both runs bill
    their prompts alike."""
    monkeypatch.setattr(Engine, "MULTI_STEP", multi)
    eng = engine_for(lm)
    if cold:
        monkeypatch.setattr(eng, "prefix_cache", None)
    before = eng.multi_step_calls
    outs = [Greedy(lm, **options).generate(p)[0] for p in prompts]  # one at a time: a lone row
    return outs, eng.multi_step_calls - before


def _same(a, b):
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    assert [g.finish_reason for g in a] == [g.finish_reason for g in b]
    assert [g.stop for g in a] == [g.stop for g in b]
    assert [g.text for g in a] == [g.text for g in b]
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
        assert (x.usage.generated_tokens, x.usage.computed_tokens, x.usage.model_calls, x.usage.flops) == \
               (y.usage.generated_tokens, y.usage.computed_tokens, y.usage.model_calls, y.usage.flops)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 4, 5, 9, 17, 33, 160])
@pytest.mark.parametrize("multi", [3, 16])
def test_multi_step_equals_one_step_per_token(arith_lm, monkeypatch, max_tokens, multi):
    """EOS lands inside a call (the answers end after ~50 tokens), and max_tokens lands
    mid-call, at a call's end, or before the first call."""
    plain, calls = _run(arith_lm, monkeypatch, 0, max_tokens=max_tokens)
    assert calls == 0
    fast, calls = _run(arith_lm, monkeypatch, multi, max_tokens=max_tokens)
    _same(fast, plain)
    assert calls > 0 or max_tokens < 3
    if max_tokens == 160:
        assert all(g.finish_reason == "stop" for g in fast)


def test_a_stop_token_inside_a_call(arith_lm, monkeypatch):
    newline = arith_lm.encode("\n", add_special_tokens=False)[-1]
    plain, _ = _run(arith_lm, monkeypatch, 0, max_tokens=80, stop_token_ids=[newline])
    fast, calls = _run(arith_lm, monkeypatch, 16, max_tokens=80, stop_token_ids=[newline])
    _same(fast, plain)
    assert calls > 0 and all(g.stop == newline and g.finish_reason == "stop" for g in fast)


def test_min_tokens_bans_eos_inside_calls(arith_lm, monkeypatch):
    plain, _ = _run(arith_lm, monkeypatch, 0, max_tokens=90, min_tokens=70)
    fast, calls = _run(arith_lm, monkeypatch, 16, max_tokens=90, min_tokens=70)
    _same(fast, plain)
    assert calls > 0 and all(len(g.token_ids) >= 70 for g in fast)
    ignored, _ = _run(arith_lm, monkeypatch, 16, max_tokens=40, ignore_eos=True)
    assert all(len(g.token_ids) == 40 for g in ignored)


@pytest.mark.parametrize("stop", [["Answer"], ["=5\n", "=1\n"], ["\n"]])
def test_stop_strings_inside_a_call(arith_lm, monkeypatch, stop):
    """A stop string is found in the text after the call; the tokens past it are
    dropped and not billed, so the bill equals the step path's (a bill must not depend on
    whether a request was alone in the batch). Text, tokens, finish reason and the stop
    string equal the step path's."""
    plain, _ = _run(arith_lm, monkeypatch, 0, max_tokens=80, stop=stop)
    fast, calls = _run(arith_lm, monkeypatch, 16, max_tokens=80, stop=stop)
    assert calls > 0
    assert [g.token_ids for g in fast] == [g.token_ids for g in plain]
    assert [(g.text, g.finish_reason, g.stop) for g in fast] == [(g.text, g.finish_reason, g.stop) for g in plain]
    assert any(g.stop in stop for g in fast)
    for f, p in zip(fast, plain):
        assert f.logprobs == pytest.approx(p.logprobs, abs=1e-5)
        assert f.usage.generated_tokens == p.usage.generated_tokens
        assert f.usage.computed_tokens == p.usage.computed_tokens and f.usage.flops == p.usage.flops


def test_streams_and_batches(arith_lm, monkeypatch):
    """A stream gets the same events as one step per token (a call's tokens arrive
    together), never past a stop string; several rows in the batch keep to one step
    per token, and give each row's lone tokens."""
    def streamed(multi):
        monkeypatch.setattr(Engine, "MULTI_STEP", multi)
        eng = engine_for(arith_lm)
        monkeypatch.setattr(eng, "prefix_cache", None)
        before = eng.multi_step_calls
        gen = Greedy(arith_lm, max_tokens=80, stop=["Answer"])
        return [[(ev.token_id, ev.text) for ev in gen.stream(p)] for p in PROMPTS[:4]], eng.multi_step_calls - before

    (plain, _), (fast, calls) = streamed(0), streamed(16)
    assert calls > 0 and fast == plain  # an event per token, the same text released at each
    assert all("Answer" not in "".join(t for _, t in x) for x in fast)
    monkeypatch.setattr(Engine, "MULTI_STEP", 16)
    batch = Greedy(arith_lm, max_tokens=80).generate_batch(PROMPTS)
    alone, _ = _run(arith_lm, monkeypatch, 16, max_tokens=80)
    assert [b[0].token_ids for b in batch] == [g.token_ids for g in alone]


def test_the_prefix_cache_reads_what_a_multi_step_call_wrote(arith_lm, monkeypatch):
    """A finished row's KV goes into the prefix cache; a prompt that extends the first
    output reuses it, and gives what a cold model gives."""
    (g,), _ = _run(arith_lm, monkeypatch, 16, prompts=PROMPTS[:1], cold=False, max_tokens=20)
    follow = PROMPTS[0] + g.text
    warm, _ = _run(arith_lm, monkeypatch, 16, prompts=[follow], cold=False, max_tokens=30)
    cold, _ = _run(arith_lm, monkeypatch, 0, prompts=[follow], max_tokens=30)
    assert warm[0].meta.get("prefix_cache_hit_tokens", 0) > len(arith_lm.encode(PROMPTS[0]))
    assert warm[0].token_ids == cold[0].token_ids
