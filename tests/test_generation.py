"""Greedy and sampling on the native engine: seeds, stop strings, streaming, n, usage."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ponder.decoding.generate import Greedy, Options, Sample, pick_sample
from ponder.decoding.common_adapters import SettingError
from ponder.types import Usage

PROMPT = "Q: 3+4-2\n"
SOLUTION = "3+4=7\n7-2=5\nAnswer: 5\n"


def test_greedy_solves_an_easy_problem(arith_lm):
    (g,) = Greedy(arith_lm, max_tokens=64).generate(PROMPT)
    assert g.text == SOLUTION
    assert g.finish_reason == "stop" and g.stop == arith_lm.eos_token_ids[0]
    assert len(g.logprobs) == len(g.token_ids)
    assert all(lp <= 0 for lp in g.logprobs)


def test_pick_sample_inverts_the_cdf_hand_computed():
    """p = (0.1, 0.2, 0.7): cdf (0.1, 0.3, 1.0); a draw u picks the first token whose cdf
    exceeds u; a zero-probability token is never picked, not even by u = 0."""
    logits = torch.tensor([0.1, 0.2, 0.7]).log().expand(6, 3)
    u = torch.tensor([0.0, 0.05, 0.1, 0.29, 0.31, 0.999], dtype=torch.float64)
    assert pick_sample(logits, u).tolist() == [0, 0, 1, 1, 2, 2]
    banned = torch.tensor([[float("-inf"), 0.0, 0.0]])
    assert pick_sample(banned, torch.zeros(1, dtype=torch.float64)).tolist() == [1]


def test_sampling_follows_the_model_distribution(arith_lm):
    """4000 one-token samples of one request (all on one physical row, each drawing from
    its own stream) follow softmax(logits / T): a chi-squared test at the 99.9% level."""
    T, n = 2.0, 4000
    ids = arith_lm.encode("Q: 7")
    logits, _ = arith_lm.prefill([ids], capacity=len(ids) + 1)
    law = (logits[0].double() / T).softmax(-1)
    gens = Sample(arith_lm, temperature=T, max_tokens=1).generate(ids, n=n, seed=3)
    counts = torch.bincount(torch.tensor([g.token_ids[0] for g in gens]), minlength=law.shape[0]).double()
    big = law * n >= 5  # rarer tokens are pooled into one cell
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([law[big] * n, (law[~big].sum() * n)[None]])
    chi2 = float(((obs - exp) ** 2 / exp).sum())
    dof = len(obs) - 1
    bound = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3  # Wilson-Hilferty
    assert dof >= 5 and chi2 < bound, (chi2, bound, dof)


def test_seeded_sampling_reproduces_exactly(arith_lm):
    s = Sample(arith_lm, temperature=1.3, top_k=50, top_p=0.95, max_tokens=40)
    a = s.generate("Q: 512-256+128-64\n", n=4, seed=7)
    b = s.generate("Q: 512-256+128-64\n", n=4, seed=7)
    c = s.generate("Q: 512-256+128-64\n", n=4, seed=8)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    # the second call reuses the first's prompt KV from the prefix cache: equal to float noise
    for x, y in zip(a, b):
        assert x.logprobs == pytest.approx(y.logprobs, abs=1e-5)
    assert [g.token_ids for g in a] != [g.token_ids for g in c]
    assert len({tuple(g.token_ids) for g in a}) > 1  # the n samples differ from each other


def test_seeded_request_is_the_same_alone_or_in_a_batch(arith_lm):
    s = Sample(arith_lm, temperature=1.5, max_tokens=30)
    alone = s.generate("Q: 7+8\n", n=2, seed=3)
    batch = s.generate_batch(["Q: 99-98+97\n", "Q: 7+8\n", "Q: 1\n"], n=2, seed=3)[1]
    assert [g.token_ids for g in alone] == [g.token_ids for g in batch]


def test_batch_equals_single_under_greedy(arith_lm):
    prompts = ["Q: 5\n", "Q: 123-456+789-12\n", "Q: 40+2\n"]
    g = Greedy(arith_lm, max_tokens=60)
    batched = g.generate_batch(prompts)
    for p, (b,) in zip(prompts, batched):
        (s,) = g.generate(p)
        assert s.token_ids == b.token_ids
        assert s.logprobs == pytest.approx(b.logprobs, abs=1e-5)


def test_stop_string_spanning_two_tokens(arith_lm):
    (full,) = Greedy(arith_lm, max_tokens=64).generate(PROMPT)
    toks = [arith_lm.decode([t]) for t in full.token_ids]
    assert toks[:4] == ["3", "+", "4", "="]  # one token per character here
    stop = "+4="  # spelled by three tokens: '+', '4', '='
    (g,) = Greedy(arith_lm, max_tokens=64, stop=[stop]).generate(PROMPT)
    assert g.text == "3" and g.finish_reason == "stop" and g.stop == stop
    assert stop not in g.text
    # a stop string across a line break: '7', '\n' and '7' are separate tokens
    (g2,) = Greedy(arith_lm, max_tokens=64, stop=["7\n7"]).generate(PROMPT)
    assert g2.text == "3+4=" and g2.stop == "7\n7"


def test_earliest_stop_string_wins(arith_lm):
    (g,) = Greedy(arith_lm, max_tokens=64, stop=["Answer", "\n"]).generate(PROMPT)
    assert g.text == "3+4=7" and g.stop == "\n"


def test_stop_token_ids_and_max_tokens(arith_lm):
    nl = arith_lm.encode("\n", add_special_tokens=False)[0]
    (g,) = Greedy(arith_lm, max_tokens=64, stop_token_ids=[nl]).generate(PROMPT)
    assert g.token_ids[-1] == nl and g.stop == nl and g.text == "3+4=7\n"
    (g,) = Greedy(arith_lm, max_tokens=3).generate(PROMPT)
    assert g.finish_reason == "length" and len(g.token_ids) == 3 and g.text == "3+4"


def test_streaming_yields_text_as_it_comes_and_hides_stop_strings(arith_lm):
    gen = Greedy(arith_lm, max_tokens=64, stop=["Answer"])
    events = list(gen.stream(PROMPT))
    assert len(events) > 5 and sum(bool(e.text) for e in events) > 5
    streamed = "".join(e.text for e in events)
    final = events[-1].generation
    assert final is not None and streamed == final.text == "3+4=7\n7-2=5\n"
    assert all("Answer"[:3] not in e.text for e in events)


def test_async_stream_and_concurrent_requests(arith_lm):
    gen = Greedy(arith_lm, max_tokens=64)

    async def run():
        parts = [ev.text async for ev in gen.astream(PROMPT)]
        many = await asyncio.gather(gen.agenerate(PROMPT), gen.agenerate("Q: 1+1\n"))
        return "".join(parts), many

    text, many = asyncio.run(run())
    assert text == many[0][0].text
    assert many[1][0].text.endswith("Answer: 2\n")


def test_n_samples_share_the_prompt_in_the_bill(arith_lm):
    gens = Sample(arith_lm, max_tokens=20).generate(PROMPT, n=4, seed=0)
    prompt_len = len(arith_lm.encode(PROMPT))
    total = Usage.total(g.usage for g in gens)
    assert total.prompt_tokens == 4 * prompt_len
    # the prompt is computed once, less what the prefix cache already held; samples share
    # a row until they differ, so every distinct generated prefix is computed once (the
    # last token of an output is never fed back)
    reused = gens[0].meta.get("prefix_cache_hit_tokens", 0)
    fed = {tuple(g.token_ids[:i]) for g in gens for i in range(1, len(g.token_ids))}
    assert total.computed_tokens == prompt_len - reused + len(fed)
    assert total.generated_tokens == sum(len(g.token_ids) for g in gens)
    assert total.flops > 0 and total.wall_s > 0


def test_usage_is_additive():
    a = Usage(1, 2, 3, 4, 5.0, 6.0)
    b = Usage(10, 20, 30, 40, 50.0, 60.0)
    assert a + b == Usage(11, 22, 33, 44, 55.0, 66.0)
    assert sum([a, b]) == a + b == Usage.total([a, b])


@pytest.mark.parametrize(
    "kwargs, phrase",
    [
        (dict(max_tokens=0), "max_tokens must be an integer >= 1"),
        (dict(stop=[""]), "stop strings must be non-empty"),
        (dict(stop_token_ids=[-3]), "stop_token_ids"),
    ],
)
def test_bad_options(kwargs, phrase):
    with pytest.raises(SettingError, match=phrase):
        Options(**kwargs)


def test_bad_requests(arith_lm):
    g = Greedy(arith_lm)
    with pytest.raises(SettingError, match="prompt is empty"):
        g.generate("")
    with pytest.raises(SettingError, match="n must be an integer >= 1"):
        g.generate("Q: 1\n", n=0)
    with pytest.raises(SettingError, match="temperature"):
        Sample(arith_lm, temperature=-1)


def test_user_processor_per_request(arith_lm):
    """A plain callable that bans the digit 4 changes that request only."""
    four = arith_lm.encode("4", add_special_tokens=False)[0]

    def ban_four(tokens, logits):
        logits = logits.clone()
        logits[:, four] = float("-inf")
        return logits

    (g,) = Sample(arith_lm, temperature=0.01, processors=[ban_four], max_tokens=30).generate(PROMPT, seed=0)
    assert four not in g.token_ids
    (h,) = Greedy(arith_lm, max_tokens=30).generate(PROMPT)
    assert four in h.token_ids


def test_kv_cache_fork_reorder_truncate(arith_lm):
    ids = arith_lm.encode("Q: 10+20+30\n10+20=30\n")
    logits, cache = arith_lm.prefill([ids])
    forked = cache.fork([0, 0, 0])
    assert forked.batch_size == 3 and forked.lengths.tolist() == [len(ids)] * 3
    nxt = torch.tensor([5, 6, 7])
    a = arith_lm.step(nxt, forked)
    # roll back the last token on every row and recompute: same logits
    forked.truncate_(1)
    b = arith_lm.step(nxt, forked)
    assert torch.allclose(a, b, atol=1e-5)
    forked.reorder_([2, 2, 0])
    c = arith_lm.step(torch.tensor([1, 1, 1]), forked)
    assert torch.allclose(c[0], c[1]) and not torch.allclose(c[0], c[2])
    # per-row rollback to the prompt gives the prompt's next-token logits back
    forked.truncate_(torch.tensor([2, 2, 2]))
    d = arith_lm.forward(torch.tensor([[ids[-1]]] * 3), _drop_last(forked))[:, 0]
    assert torch.allclose(d, logits.expand(3, -1), atol=1e-4)


def _drop_last(cache):
    cache.truncate_(1)
    return cache


def _valid(cache, row):
    """Row ``row``'s valid KV, every layer: [(k, v) over layers]."""
    n = int(cache.lengths[row])
    return [(k[row, :n].clone(), v[row, :n].clone()) for k, v in zip(cache.k, cache.v)]


def test_kv_cache_moves_rows_in_place_and_appends_into_spare_rows():
    """reorder_ inside the allocation rewrites only rows that change (any order, forks
    and retirements alike) and equals a copy of the source rows' valid slots; append_
    writes joining rows into spare rows without reallocating; decoding on top agrees."""
    from ponder.models.kv_cache import KVCache

    torch.manual_seed(0)
    cache = KVCache(2, 6, 2, 4, capacity=10)
    for t in cache.k + cache.v:
        t.normal_()
    cache.lengths = torch.tensor([3, 7, 1, 10, 5, 2])
    before = [_valid(cache, b) for b in range(6)]
    store = cache._k_rows[0].data_ptr()
    for order in ([0, 1, 3, 4, 5], [1, 1, 0, 3, 3], [4, 0, 2]):  # retire; fork; permute
        cache.reorder_(order)
        assert cache._k_rows[0].data_ptr() == store  # no new allocation
        before = [before[i] for i in order]
        assert cache.batch_size == len(order)
        for b, rows in enumerate(before):
            for (k, v), (k2, v2) in zip(rows, _valid(cache, b)):
                assert torch.equal(k, k2) and torch.equal(v, v2)
    joining = KVCache(2, 2, 2, 4, capacity=6)
    for t in joining.k + joining.v:
        t.normal_()
    joining.lengths = torch.tensor([6, 4])
    expected = before + [_valid(joining, 0), _valid(joining, 1)]
    cache.append_(joining)  # 3 + 2 rows fit in the 6 allocated
    assert cache._k_rows[0].data_ptr() == store and cache.batch_size == 5
    cache.append_(joining)  # 7 rows do not: one move to a larger allocation
    expected += expected[-2:]
    assert cache._k_rows[0].shape[0] >= 7 and cache.batch_size == 7
    for b, rows in enumerate(expected):
        for (k, v), (k2, v2) in zip(rows, _valid(cache, b)):
            assert torch.equal(k, k2) and torch.equal(v, v2)
    cache.reorder_([0] * 12)  # more rows than allocated: a new allocation with headroom
    assert cache.batch_size == 12 and cache._k_rows[0].shape[0] >= 12
    assert all(torch.equal(a[0], b[0]) for b_ in range(12) for a, b in zip(expected[0], _valid(cache, b_)))


def test_batch_after_retirements_and_joins_decodes_as_fresh_rows(arith_lm):
    """Rows moved in place (a retirement) and rows appended into spare rows decode
    exactly as a freshly prefilled batch would."""
    prompts = [arith_lm.encode(p) for p in ("Q: 1+2\n", "Q: 12-3+4\n", "Q: 5+5+5\n", "Q: 9-8\n")]
    _, cache = arith_lm.prefill(prompts[:3], capacity=32)
    cache.reorder_([0, 2])  # row 1 retires; row 2 moves into its place
    _, extra = arith_lm.prefill(prompts[3:], capacity=16)
    cache.append_(extra)  # joins into the spare row
    nxt = torch.tensor([5, 6, 7])
    got = arith_lm.step(nxt, cache)
    _, fresh = arith_lm.prefill([prompts[0], prompts[2], prompts[3]], capacity=32)
    want = arith_lm.step(nxt, fresh)
    assert torch.allclose(got, want, atol=1e-5)
