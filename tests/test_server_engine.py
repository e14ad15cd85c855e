"""What a server needs of the engine: a failing request fails alone, cancellation frees
rows and KV, async callers never block the loop, the context is enforced, invalid
logits are refused, and the wall-time bill adds up to the call's elapsed time."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from ponder.decoding.generate import Greedy, Sample
from ponder.engine.engine import Engine, FifoAdmission, Request
from ponder.engine.engines import engine_for, set_engine
from ponder.errors import InvalidLogitsError, RequestCancelled, SettingError
from ponder.meta.parallel import MajorityVote
from ponder.backends.native import NativeLM
from ponder.tasks.arith import ArithTask

PROMPTS = ["Q: 1+2+3\n", "Q: 9-8+7-6+5-4+3\n", "Q: 4+4\n", "Q: 5+5-2+8-1\n"]


@pytest.fixture()
def lm(arith_lm):
    return NativeLM(arith_lm.model, arith_lm.tokenizer, "arith")


def test_a_processor_that_raises_fails_only_its_request(lm):
    calls = {"n": 0}

    def boom(tokens, logits):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("processor exploded")
        return logits

    good = Greedy(lm, max_tokens=30)
    bad = Greedy(lm, processors=[boom], max_tokens=30)
    want = {p: good.generate(p)[0].token_ids for p in PROMPTS}
    got, errors = {}, []

    def run(gen, p):
        try:
            got[p] = gen.generate(p)[0].token_ids
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=run, args=(good, p)) for p in PROMPTS]
    threads.append(threading.Thread(target=run, args=(bad, "Q: 7+7\n")))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 1 and "processor exploded" in str(errors[0])
    assert got == want  # every other request finished, unchanged
    assert engine_for(lm).running == 0 and engine_for(lm).live_kv_bytes() == 0


def test_failure_inside_one_batched_call_leaves_the_engine_usable(lm):
    eng = engine_for(lm)
    with pytest.raises(InvalidLogitsError, match="LogitBias"):
        Greedy(lm, logit_bias={t: float("-inf") for t in range(lm.vocab_size)}, max_tokens=5).generate("Q: 1+1\n")
    assert eng.running == 0
    assert Greedy(lm, max_tokens=20).generate("Q: 1+1\n")[0].text.startswith("1+1=2")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_and_inf_logits_are_refused_not_sampled(lm, bad):
    def poison(tokens, logits):
        logits = logits.clone()
        logits[:, 5] = bad
        return logits

    for gen in (Greedy(lm, processors=[poison], max_tokens=5), Sample(lm, processors=[poison], max_tokens=5)):
        with pytest.raises(InvalidLogitsError, match="poison|FunctionProcessor"):
            gen.generate("Q: 1+1\n", seed=0)


def test_sampling_with_every_token_masked_is_an_error(lm):
    with pytest.raises(InvalidLogitsError, match="every token masked"):
        Sample(lm, logit_bias={t: float("-inf") for t in range(lm.vocab_size)}, max_tokens=5).generate("Q: 1\n", seed=0)


def test_cancelling_agenerate_withdraws_the_request_and_frees_its_kv(lm):
    eng = engine_for(lm)
    gen = Sample(lm, max_tokens=400, ignore_eos=True)
    assert eng.live_kv_bytes() == 0

    async def main():
        task = asyncio.create_task(gen.agenerate("Q: 1+2\n", n=8, seed=0))
        while eng.live_kv_bytes() == 0:  # wait until it decodes
            await asyncio.sleep(0.005)
        steps = eng.steps
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return steps

    t0 = time.perf_counter()
    steps = asyncio.run(main())
    assert time.perf_counter() - t0 < 5
    assert eng.live_kv_bytes() == 0 and eng.running == 0
    assert eng.steps - steps < 300  # it did not decode its 400 tokens


def test_abandoned_async_stream_is_withdrawn(lm):
    eng = engine_for(lm)
    gen = Greedy(lm, max_tokens=400, ignore_eos=True)

    async def main():
        n = 0
        agen = gen.astream("Q: 1+2\n")
        async for _ in agen:
            n += 1
            if n == 5:
                break
        await agen.aclose()
        return n

    assert asyncio.run(main()) == 5
    assert eng.running == 0 and eng.live_kv_bytes() == 0


def test_astream_does_not_block_the_event_loop(lm):
    gen = Greedy(lm, max_tokens=120, ignore_eos=True)

    async def main():
        ticks = 0
        done = asyncio.Event()

        async def ticker():
            nonlocal ticks
            while not done.is_set():
                ticks += 1
                await asyncio.sleep(0.001)

        t = asyncio.create_task(ticker())
        text = ""
        async for ev in gen.astream("Q: 9-8+7\n"):
            text += ev.text
        done.set()
        await t
        return ticks, text

    ticks, text = asyncio.run(main())
    assert text == gen.generate("Q: 9-8+7\n")[0].text
    assert ticks >= 3


def test_cancel_event_raises_request_cancelled(lm):
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RequestCancelled):
        Greedy(lm, max_tokens=50).generate_batch(["Q: 1+1\n"], cancel=cancel)
    assert engine_for(lm).running == 0


def test_context_length_is_enforced(lm):
    ctx = lm.context_length
    gen = Greedy(lm, max_tokens=1_000_000_000, ignore_eos=True)
    with pytest.raises(SettingError, match="context of 512"):
        gen.generate(list(range(10, 20)) * 60)  # 600 tokens
    with pytest.raises(SettingError, match="context"):
        gen.generate("1+" * 100_000)
    prompt = [lm.encode("Q: 1+2\n")[0]] + [10] * 500
    (g,) = gen.generate(prompt)
    assert g.finish_reason == "length" and len(prompt) + len(g.token_ids) == ctx


def test_admission_holds_requests_within_the_kv_budget(lm):
    per = lm.kv_bytes_per_token
    prompt = lm.encode("Q: 1+2+3\n")
    eng = set_engine(lm, Engine(lm, admission=FifoAdmission(max_rows=64, max_kv_bytes=per * (len(prompt) + 20) * 2)))
    from ponder.decoding.generate import Options, pick_greedy
    from ponder.processor import Chain

    reqs = [Request(prompt, 1, pick_greedy, Chain(), Options(max_tokens=20, ignore_eos=True), 0) for _ in range(5)]
    eng.submit(reqs)
    eng.step()
    assert eng.running == 5
    for _ in eng.run(reqs):
        pass
    assert all(r.done and r.error is None for r in reqs) and eng.peak_rows == 2
    with pytest.raises(SettingError, match="max_rows"):
        FifoAdmission(max_rows=0)


def test_numpy_backend_takes_many_samples_of_a_long_prompt(arith_lm):
    lm = NativeLM(arith_lm.model, arith_lm.tokenizer, "arith", backend="numpy")
    assert not lm.reads_shared_prefix
    prompt = "Q: " + "+".join(["1"] * 80) + "\n"
    assert len(lm.encode(prompt)) >= 128
    outs = Sample(lm, max_tokens=8).generate(prompt, n=3, seed=0)
    assert len(outs) == 3


@pytest.mark.parametrize("bad", [{"seed": "abc"}, {"seed": 1.5}, {"seed": -1}, {"seed": 2**63}])
def test_bad_seeds_name_the_argument(lm, bad):
    with pytest.raises(SettingError, match="seed"):
        Greedy(lm, max_tokens=4).generate("Q: 1\n", **bad)


def test_bad_prompts_name_the_problem(lm):
    gen = Greedy(lm, max_tokens=4)
    with pytest.raises(SettingError, match="prompt"):
        gen.generate(None)
    with pytest.raises(SettingError, match="Unicode"):
        gen.generate("Q: \ud800\n")
    with pytest.raises(SettingError, match="token ids"):
        gen.generate([1, 49.5])
    with pytest.raises(SettingError, match="token ids"):
        gen.generate([1, 10**6])
    with pytest.raises(SettingError, match="stop_token_ids"):
        Greedy(lm, max_tokens=4, stop_token_ids=[10**6]).generate("Q: 1\n")


def _elapsed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def test_wall_time_bill_sums_to_elapsed_time(lm):
    task = ArithTask()
    prompts = [task.prompt(p) for p in task.problems("hard", 40)]
    gen = Sample(lm, temperature=0.8, max_tokens=160)
    gen.generate(prompts[0], n=2, seed=0)  # warm-up
    # a batch
    dt, outs = _elapsed(lambda: gen.generate_batch(prompts, n=16, seed=1))
    billed = sum(g.usage.wall_s for gs in outs for g in gs)
    assert billed == pytest.approx(dt, rel=0.05)
    # sequential calls, each on its own: up to one scheduler wake-up of the engine's thread
    # (a few ms on a loaded 2-core machine) is outside the bill
    for p in prompts[:8]:
        dt, gs = _elapsed(lambda: gen.generate(p, n=16, seed=2))
        assert sum(g.usage.wall_s for g in gs) == pytest.approx(dt, rel=0.05, abs=0.01)
    # a meta-generator: its one output carries the bill of its samples and its vote
    vote = MajorityVote(gen, task.extract_answer, n=16)
    dt, outs = _elapsed(lambda: vote.generate_batch(prompts, seed=3))
    assert sum(gs[0].usage.wall_s for gs in outs) == pytest.approx(dt, rel=0.05)


def test_a_stream_finalised_mid_step_does_not_deadlock(lm):
    """The garbage collector may finalise an abandoned stream's generator on the thread
    that is mid-step under the engine's lock (a server hang found under load): its
    withdrawal waits for the next step instead of for the lock, and nothing leaks."""
    eng = engine_for(lm)
    gen = Greedy(lm, max_tokens=400, ignore_eos=True)
    it = gen.stream("Q: 1+2\n")
    for _, _ in zip(range(3), it):
        pass
    assert eng.running == 1
    done = threading.Event()

    def finalise_under_lock():
        with eng._lock:  # as mid-step
            it.close()  # runs the generator's finally: the withdrawal
        done.set()

    t = threading.Thread(target=finalise_under_lock, daemon=True)
    t.start()
    assert done.wait(10), "withdrawing under the engine's lock deadlocked"
    assert gen.generate("Q: 4+4\n")[0].text  # the next step drops the withdrawn request
    assert eng.running == 0 and eng.live_kv_bytes() == 0
