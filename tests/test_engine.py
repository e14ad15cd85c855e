"""The batching engine and the radix prefix cache."""

from __future__ import annotations

import threading

import pytest
import torch

from ponder.decoding.generate import Greedy, Options, Sample, pick_greedy, pick_sample
from ponder.decoding.adapters import make_processors
from ponder.decoding.common_adapters import Chain
from ponder.engine.engine import Engine, Request
from ponder.engine.engines import engine_for
from ponder.engine.prefix_cache import RadixCache
from ponder.backends.native import NativeLM

PROMPTS = ["Q: 1+2+3\n", "Q: 9-8+7-6+5-4+3\n", "Q: 4\n", "Q: 5+5-2+8-1\n3+", "Q: 2-9\n"]


@pytest.fixture()
def fresh_lm(arith_lm):
    """The shipped model with its own engine (no state shared with other tests)."""
    return NativeLM(arith_lm.model, arith_lm.tokenizer, "arith")


def _req(lm, prompt, n=1, sample=False, seed=0, max_tokens=48):
    procs = make_processors(temperature=1.3) if sample else Chain()
    return Request(lm.encode(prompt), n, pick_sample if sample else pick_greedy, procs,
                   Options(max_tokens=max_tokens), seed)


def _drain(engine, reqs):
    for _ in engine.run(reqs):
        pass
    return [r.outputs for r in reqs]


def test_requests_joining_mid_flight_equal_single_runs(fresh_lm):
    lm = fresh_lm
    singles = [_drain(Engine(lm, prefix_cache=None), [_req(lm, p)])[0][0] for p in PROMPTS]
    eng = Engine(lm, prefix_cache=None)
    first = [_req(lm, PROMPTS[1])]
    eng.submit(first)
    for _ in range(5):  # the first request decodes alone for 5 steps
        eng.step()
    later = [_req(lm, p) for p in PROMPTS[:1] + PROMPTS[2:]]
    eng.submit(later[:2])
    eng.step()
    eng.step()
    outs = _drain(eng, first + later)  # the rest join two steps later still
    got = [outs[1][0], outs[0][0], outs[2][0], outs[3][0], outs[4][0]]
    assert eng.peak_rows >= 3
    for s, g in zip(singles, got):
        assert g.token_ids == s.token_ids
        assert g.logprobs == pytest.approx(s.logprobs, abs=1e-5)


def test_seeded_samples_are_the_same_alone_or_joining_a_batch(fresh_lm):
    lm = fresh_lm
    alone = _drain(Engine(lm, prefix_cache=None), [_req(lm, PROMPTS[0], n=3, sample=True, seed=11)])[0]
    eng = Engine(lm, prefix_cache=None)
    other = [_req(lm, PROMPTS[1], n=2, sample=True, seed=5)]
    eng.submit(other)
    eng.step()
    eng.step()
    mine = [_req(lm, PROMPTS[0], n=3, sample=True, seed=11)]
    joined = _drain(eng, other + mine)[1]
    assert [g.token_ids for g in joined] == [g.token_ids for g in alone]


def test_concurrent_callers_share_forward_passes(fresh_lm):
    lm = fresh_lm
    gen = Greedy(lm, max_tokens=40)
    want = {p: gen.generate(p)[0].token_ids for p in PROMPTS}
    got: dict[str, list[int]] = {}
    steps_before = engine_for(lm).steps

    def call(p):
        got[p] = gen.generate(p)[0].token_ids

    threads = [threading.Thread(target=call, args=(p,)) for p in PROMPTS]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == want
    # five requests of up to 40 tokens in fewer steps than running them one by one
    assert engine_for(lm).steps - steps_before < sum(len(w) for w in want.values())


def test_prefix_cache_hits_show_in_the_bill_and_do_not_change_outputs(fresh_lm):
    lm = fresh_lm
    shared = "Q: 9-8+7-6+5-4+3\n9-8=1\n1+7=8\n"
    plain = Greedy(lm, max_tokens=30)
    no_cache = _drain(Engine(lm, prefix_cache=None), [_req(lm, shared, max_tokens=30)])[0][0]
    a = plain.generate(shared)[0]
    b = plain.generate(shared + "8-6=2\n")[0]  # a longer prompt whose head was computed before
    n_shared = len(lm.encode(shared))
    assert a.token_ids == no_cache.token_ids
    assert b.meta["prefix_cache_hit_tokens"] >= n_shared  # prompt and the generated continuation
    assert b.usage.computed_tokens < len(lm.encode(shared + "8-6=2\n")) + len(b.token_ids) - 1 - n_shared + 1
    pc = engine_for(lm).prefix_cache
    assert pc.stats.tokens_reused > 0 and pc.nbytes == pc.tokens * pc.bytes_per_token


def test_radix_tree_splits_shares_and_evicts_lru():
    L, H, D = 2, 1, 2
    pc = RadixCache(L, H, D, max_tokens=10)

    def kv(ids):  # a recognisable KV: the token id everywhere
        t = torch.tensor(ids, dtype=torch.float32)[None, :, None, None].expand(L, len(ids), H, D).clone()
        return t, -t

    assert pc.insert([1, 2, 3, 4], *kv([1, 2, 3, 4])) == 4
    assert pc.insert([1, 2, 7], *kv([1, 2, 7])) == 1  # shares [1, 2]: one new token
    assert pc.tokens == 5
    m, k, v = pc.lookup([1, 2, 7, 9])
    assert m == 3 and k[0, :, 0, 0].tolist() == [1, 2, 7] and torch.equal(v, -k)
    m, _, _ = pc.lookup([1, 2, 3, 4, 5], limit=2)
    assert m == 2
    pc.insert([5, 6, 7, 8], *kv([5, 6, 7, 8]))  # 9 tokens
    pc.lookup([5, 6])  # touch: [1,2,...] is now least recently used
    pc.insert([9, 9, 9], *kv([9, 9, 9]))  # 12 > 10: evict LRU leaves
    assert pc.tokens <= 10 and pc.stats.tokens_evicted >= 2
    assert pc.match_length([5, 6, 7, 8]) == 4 and pc.match_length([9, 9, 9]) == 3
    with pytest.raises(ValueError, match="tokens or in bytes"):
        RadixCache(L, H, D, max_tokens=1, max_bytes=1)


def test_outputs_stay_right_after_eviction(fresh_lm):
    from ponder.engine.prefix_cache import RadixCache

    lm = fresh_lm
    tiny = RadixCache.for_model(lm.model.cfg, max_tokens=40)
    eng = Engine(lm, prefix_cache=tiny)
    ref = Engine(lm, prefix_cache=None)
    for p in PROMPTS * 2:
        got = _drain(eng, [_req(lm, p, max_tokens=30)])[0][0]
        want = _drain(ref, [_req(lm, p, max_tokens=30)])[0][0]
        assert got.token_ids == want.token_ids
        assert tiny.tokens <= 40
    assert tiny.stats.tokens_evicted > 0 and tiny.stats.tokens_reused > 0


def test_n_samples_compute_the_prompt_once_and_memory_grows_with_unique_tokens(fresh_lm):
    lm = fresh_lm
    eng = Engine(lm, prefix_cache=RadixCache.for_model(lm.model.cfg))
    out = _drain(eng, [_req(lm, PROMPTS[1], n=8, sample=True, seed=1, max_tokens=20)])[0]
    prompt = len(lm.encode(PROMPTS[1]))
    # samples share a physical row until they differ: every distinct prefix is computed once
    fed = {tuple(g.token_ids[:i]) for g in out for i in range(1, len(g.token_ids))}
    assert sum(g.usage.computed_tokens for g in out) == prompt + len(fed)
    assert len(fed) < sum(len(g.token_ids) - 1 for g in out)  # some samples did share
    pc = eng.prefix_cache
    unique = {tuple(lm.encode(PROMPTS[1]) + g.token_ids[:-1]) for g in out}
    # stored tokens: the prompt once, plus each distinct continuation's own tokens
    assert pc.tokens <= prompt + sum(len(u) - prompt for u in unique)
    assert eng.peak_kv_bytes > 0


def test_long_shared_prompts_are_kept_once(fresh_lm):
    """n samples of a long prompt read one copy of its KV (cascade attention), and decode
    exactly as with a copy per row."""
    lm = fresh_lm
    text = "".join(f"Q: {i % 9}+{(i * 7) % 9}-{(i * 5) % 9}\n" for i in range(40))
    prompt = lm.encode(text)[:200]
    outs, peaks = [], []
    for threshold in (10**9, 100):  # never share / share prompts of 100+ tokens
        eng = Engine(lm, prefix_cache=None, share_prompts_from=threshold)
        reqs = [Request(prompt, 6, pick_sample, make_processors(temperature=3.0), Options(max_tokens=16), 4),
                _req(lm, "Q: 3+4\n", max_tokens=16)]  # a short prompt in the same batch is not shared
        outs.append(_drain(eng, reqs))
        peaks.append(eng.peak_kv_bytes)
    (a_long, a_short), (b_long, b_short) = outs
    assert [g.token_ids for g in a_long] == [g.token_ids for g in b_long]
    assert a_short[0].token_ids == b_short[0].token_ids
    for g, h in zip(a_long, b_long):
        assert g.logprobs == pytest.approx(h.logprobs, abs=1e-4)
    assert len({tuple(g.token_ids) for g in a_long}) > 1  # the samples did diverge
    assert peaks[1] < peaks[0] / 2  # one copy of the prompt instead of one per diverged row
