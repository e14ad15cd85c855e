"""The transformers adapter (``HFLM``): every token-level algorithm on transformers'
own model and KV cache, checked against ponder's native model (itself checked
against transformers in test_model_vs_hf.py)."""

from __future__ import annotations

import re

import pytest
import torch

from ponder.backends.hf import HFCache, HFLM
from ponder.backends.native import NativeLM
from ponder.decoding.beam import BeamSearch
from ponder.decoding.constraints import Grammar
from ponder.decoding.generate import Greedy, Sample
from ponder.decoding.speculative import Speculative
from ponder.errors import SettingError
from ponder.models.loader import load_tokenizer, load_transformer
from ponder.tasks.arith import ArithTask


@pytest.fixture(scope="module")
def hf_lm():
    return HFLM.from_pretrained("arith")


@pytest.fixture(scope="module")
def prompts():
    task = ArithTask()
    return [task.prompt(p) for p in task.problems("medium", 12)]


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.shape == b.shape
    assert (a - b).abs().max().item() < 2e-4


def test_logits_match_the_native_model_through_every_cache_operation(hf_lm, arith_lm):
    """Ragged prefill, steps, fork, per-row truncation, reorder, rows joining and
    leaving: the same logits as the native model's cache after the same operations."""
    h, n = hf_lm, arith_lm
    ps = [h.encode("Q: 12+3-4\n"), h.encode("Q: 7-8+1-2+3-9\n"), h.encode("Q: 1\n")]
    (lh, ch), (ln, cn) = h.prefill(ps), n.prefill(ps)
    _close(lh, ln)
    for _ in range(4):
        t = ln.argmax(-1)
        lh, ln = h.step(t, ch), n.step(t, cn)
        _close(lh, ln)
    ops = [("fork", [2, 0, 1, 1]), ("truncate_", torch.tensor([2, 0, 3, 1])), ("reorder_", [3, 3, 0, 1]),
           ("truncate_", 1), ("keep_rows_", [0, 2, 3])]
    for op, arg in ops:
        if op == "fork":
            ch, cn = ch.fork(arg), cn.fork(arg)
        else:
            getattr(ch, op)(arg), getattr(cn, op)(arg)
        assert ch.lengths.tolist() == cn.lengths.tolist()
        t = torch.arange(5, 5 + ch.batch_size)
        _close(h.step(t, ch), n.step(t, cn))
    (lh2, ch2), (ln2, cn2) = h.prefill([h.encode("Q: 2+2\n")]), n.prefill([h.encode("Q: 2+2\n")])
    ch.append_(ch2), cn.append_(cn2)
    t = torch.arange(7, 7 + ch.batch_size)
    _close(h.step(t, ch), n.step(t, cn))
    # several new tokens per row at once, a different number per row (speculation's verify pass)
    ids = torch.tensor([[4, 5, 6], [7, 8, 9], [3, 3, 3], [5, 6, 7]])
    num = torch.tensor([3, 1, 2, 3])
    _close(h.forward(ids, ch, num, last_only=True), n.forward(ids, cn, num, last_only=True))
    assert ch.lengths.tolist() == cn.lengths.tolist()


def test_truncation_crops_transformers_cache(hf_lm):
    _, c = hf_lm.prefill([hf_lm.encode("Q: 1+2\n")] * 2)
    cols = c.columns
    c.truncate_(torch.tensor([2, 3]))
    assert c.columns == cols - 2 and c.dc.get_seq_length() == cols - 2 and c.lengths.tolist() == [cols - 2, cols - 3]
    with pytest.raises(ValueError, match="cannot truncate"):
        c.truncate_(cols)


def test_greedy_and_scores_equal_the_native_model(hf_lm, arith_lm, prompts):
    want = Greedy(arith_lm, max_tokens=80).generate_batch(prompts)
    got = Greedy(hf_lm, max_tokens=80).generate_batch(prompts)
    assert [g[0].token_ids for g in got] == [w[0].token_ids for w in want]
    assert got[0][0].text.endswith("\n") and "Answer:" in got[0][0].text
    for (g,), (w,) in zip(got, want):
        assert g.logprobs == pytest.approx(w.logprobs, abs=1e-3)
    # the TextLM / LogprobsLM methods come from the same engine
    import asyncio

    s_h = asyncio.run(hf_lm.score(prompts[0], ["3+4=7\n"]))
    s_n = asyncio.run(arith_lm.score(prompts[0], ["3+4=7\n"]))
    assert s_h[0] == pytest.approx(s_n[0], abs=1e-4)


def test_sampling_is_seeded_and_batches_like_single_requests(hf_lm, prompts):
    a = Sample(hf_lm, temperature=0.8, top_p=0.95, max_tokens=60).generate(prompts[0], n=4, seed=7)
    b = Sample(hf_lm, temperature=0.8, top_p=0.95, max_tokens=60).generate(prompts[0], n=4, seed=7)
    assert [x.token_ids for x in a] == [x.token_ids for x in b]
    assert len({tuple(x.token_ids) for x in a}) > 1
    many = Sample(hf_lm, temperature=0.8, max_tokens=60).generate_batch(prompts[:3], n=2, seed=3)
    alone = [Sample(hf_lm, temperature=0.8, max_tokens=60).generate(p, n=2, seed=3) for p in prompts[:3]]
    assert [[x.token_ids for x in gs] for gs in many] == [[x.token_ids for x in gs] for gs in alone]


def test_beam_search_equals_the_native_model(hf_lm, arith_lm):
    for prompt in ("Q: 3+4-2+7\n", "Q: 9-8+1-6-5\n"):
        want = BeamSearch(arith_lm, num_beams=4, max_tokens=30).generate(prompt, n=4)
        got = BeamSearch(hf_lm, num_beams=4, max_tokens=30).generate(prompt, n=4)
        assert [g.token_ids for g in got] == [w.token_ids for w in want]
        assert [g.score for g in got] == pytest.approx([w.score for w in want], abs=1e-3)


def test_speculation_on_transformers_is_token_identical_to_greedy(hf_lm, prompts):
    draft = HFLM.from_pretrained("arith-draft")
    plain = Greedy(hf_lm, max_tokens=80).generate_batch(prompts[:6])
    for d in (draft, "ngram"):
        spec = Speculative(hf_lm, d, num_draft_tokens=3, max_tokens=80)
        out = spec.generate_batch(prompts[:6])
        assert [o[0].token_ids for o in out] == [p[0].token_ids for p in plain]
        assert sum(o[0].meta["accepted"] for o in out) > 0
    # a native draft for a transformers target: the same tokenizer, the same answers
    out = Speculative(hf_lm, NativeLM.from_pretrained("arith-draft"), num_draft_tokens=4, max_tokens=80).generate(prompts[0])
    assert out[0].token_ids == plain[0][0].token_ids


def test_constrained_decoding_on_transformers(hf_lm):
    rx = r"-?[0-9]{1,2}([+-][0-9]){1,3}=-?[0-9]{1,3}"
    g = Grammar.regex(hf_lm, rx)
    gens = Sample(hf_lm, temperature=1.5, max_tokens=40, constraint=g.constraint()).generate("Q: 5-2+8\n", n=20, seed=1)
    assert all(re.fullmatch(rx, x.text) for x in gens)


@pytest.mark.parametrize("name", ["llama_gqa", "qwen2_bias"])
def test_random_checkpoints_of_other_shapes(hf_checkpoints, name):
    """Not only the shipped model: an untied, grouped-query Llama-3-scaled checkpoint
    and a Qwen2 with q/k/v biases give the native model's greedy tokens (both read the
    same folder)."""
    folder, _ = hf_checkpoints[name]
    h = HFLM.from_pretrained(str(folder))
    n = NativeLM(load_transformer(folder), load_tokenizer(folder), "tiny")
    ps = [f"Q: {i}+{i * 7 % 13}\n" for i in range(6)]
    want = Greedy(n, max_tokens=16, ignore_eos=True).generate_batch(ps)
    got = Greedy(h, max_tokens=16, ignore_eos=True).generate_batch(ps)
    assert [g[0].token_ids for g in got] == [w[0].token_ids for w in want]


def test_strategies_and_load_model_take_an_hf_prefix(prompts):
    from ponder import strategies
    from ponder.params import SamplingParams

    lm = strategies.load_model("hf:arith", "--model")
    assert isinstance(lm, HFLM) and lm.flops(10, 0) > 0
    gen = strategies.build("majority", lm, SamplingParams(temperature=0.7, max_tokens=80), {"samples": 4},
                           strategies.Context(task=ArithTask()))
    (g,) = gen.generate(prompts[0], seed=0)
    assert g.usage.generated_tokens > 0 and g.meta.get("strategy") == "majority"
    with pytest.raises(SettingError, match="not a causal language model"):
        strategies.load_model("hf:arith-reward", "--model")
    with pytest.raises(SettingError, match="--model"):
        strategies.load_model("hf:/no/such/folder", "--model")


def test_an_empty_cache_and_bad_rows():
    c = HFCache(2)
    assert c.batch_size == 2 and c.columns == 0 and c.nbytes_used() == 0
    c.truncate_(0)
    with pytest.raises(ValueError):
        c.truncate_(1)
