"""Speculative decoding: lossless under greedy and under sampling."""

from __future__ import annotations

import pytest
import torch

from ponder.decoding.generate import Greedy
from ponder.decoding.common_adapters import SettingError
from ponder.decoding.speculative import Speculative
from ponder.models.loader import load_tokenizer, load_transformer
from ponder.backends.native import NativeLM


@pytest.fixture(scope="module")
def models(hf_checkpoints):
    out = {}
    for name in ("llama_gqa", "qwen2_bias", "llama_tied"):
        folder, _ = hf_checkpoints[name]
        out[name] = NativeLM(load_transformer(folder), load_tokenizer(folder), name)
    return out


def test_speculative_greedy_equals_greedy_on_50_prompts(models):
    target, draft = models["llama_gqa"], models["llama_tied"]
    prompts = [f"Q: {i}+{i * 7 % 13}-{i % 5}\n" for i in range(50)]
    plain = Greedy(target, max_tokens=20).generate_batch(prompts)
    spec = Speculative(target, draft, num_draft_tokens=3, max_tokens=20)
    for p, (g,) in zip(prompts, plain):
        (s,) = spec.generate(p)
        assert s.token_ids == g.token_ids
        assert s.logprobs == pytest.approx(g.logprobs, abs=1e-4)


def test_draft_equal_to_target_accepts_every_draft(models):
    lm = models["qwen2_bias"]
    for k in (1, 4):
        (s,) = Speculative(lm, lm, num_draft_tokens=k, max_tokens=24, ignore_eos=True,
                           draft_weights="float32").generate("Q: 12+3\n")
        assert s.meta["acceptance_rate"] == 1.0 and s.meta["drafted"] > 0
        (s,) = Speculative(lm, lm, num_draft_tokens=k, temperature=1.0, max_tokens=24, ignore_eos=True).generate("Q: 1\n", seed=3)
        assert s.meta["acceptance_rate"] == pytest.approx(1.0)


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_speculative_sampling_reproduces_the_target_distribution(models, drafter):
    """χ² test (fixed seed) on the first two tokens, with top-k 4 so that the support is
    small: the empirical joint law of (x1, x2) matches p(x1)·p(x2 | x1) of the target.
    The n-gram drafter's proposals are point masses (the prompt repeats, so it always
    finds one)."""
    target = models["llama_gqa"]
    draft = models["qwen2_bias"] if drafter == "model" else "ngram"
    prompt = target.encode("Q: 5\n" if drafter == "model" else "Q: 5\nQ: 5\nQ: 5")
    spec = Speculative(target, draft, num_draft_tokens=2, temperature=1.0, top_k=4, max_tokens=2, ignore_eos=True)
    n = 3000
    gens = spec.generate(prompt, n=n, seed=1234)
    counts: dict[tuple[int, int], int] = {}
    for g in gens:
        counts[tuple(g.token_ids)] = counts.get(tuple(g.token_ids), 0) + 1
    # exact target law
    from ponder.decoding.adapters import make_processors

    proc = make_processors(top_k=4)
    p1 = proc(None, target.forward(torch.tensor([prompt]), None)[:, -1]).softmax(-1)[0]
    law = {}
    for x1 in torch.nonzero(p1 > 0)[:, 0].tolist():
        p2 = proc(None, target.forward(torch.tensor([prompt + [x1]]), None)[:, -1]).softmax(-1)[0]
        for x2 in torch.nonzero(p2 > 0)[:, 0].tolist():
            law[(x1, x2)] = float(p1[x1] * p2[x2])
    assert set(counts) <= set(law)
    chi2 = sum((counts.get(c, 0) - n * pr) ** 2 / (n * pr) for c, pr in law.items())
    dof = len(law) - 1
    # 99.9% quantile of chi2 with 15 dof is 37.7; allow for any dof up to 15 by Wilson-Hilferty
    z = 3.09
    bound = dof * (1 - 2 / (9 * dof) + z * (2 / (9 * dof)) ** 0.5) ** 3
    assert chi2 < bound, (chi2, bound, dof)
    # and the draft is really different from the target (the test is not vacuous)
    acc = sum(g.meta["accepted"] for g in gens) / sum(g.meta["drafted"] for g in gens)
    assert acc < 0.95


def test_draft_weights_change_acceptance_never_the_output(arith_lm):
    """The draft's matrices in bfloat16 (the default: half the bytes per draft step) or
    float32: the same greedy output as plain greedy either way, on every path (the
    one-call loop, round by round, batched); an unknown type is refused."""
    draft = NativeLM.from_pretrained("arith-draft")
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    prompts = [task.prompt(p) for p in task.problems("expert", 12)]
    plain = [g[0].token_ids for g in Greedy(arith_lm, max_tokens=120).generate_batch(prompts)]
    rates = {}
    for weights in ("bfloat16", "float32"):
        for record in (False, True):  # record_drafts takes the round-at-a-time path
            spec = Speculative(arith_lm, draft, max_tokens=120, draft_weights=weights, record_drafts=record)
            outs = [spec.generate(p)[0] for p in prompts]
            assert [g.token_ids for g in outs] == plain
            rates[weights, record] = sum(g.meta["accepted"] for g in outs) / sum(g.meta["drafted"] for g in outs)
        batched = Speculative(arith_lm, draft, max_tokens=120, draft_weights=weights).generate_batch(prompts)
        assert [g[0].token_ids for g in batched] == plain
    assert rates["bfloat16", False] == pytest.approx(rates["bfloat16", True])  # both paths draft with the same copy
    assert rates["float32", False] == pytest.approx(rates["float32", True])
    assert abs(rates["bfloat16", False] - rates["float32", False]) < 0.05 and rates["bfloat16", False] > 0.7
    with pytest.raises(SettingError, match="draft_weights must be one of float32, bfloat16"):
        Speculative(arith_lm, draft, draft_weights="fp8")


def test_ngram_and_adaptive_speculation_equal_greedy_on_the_shipped_model(arith_lm):
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    prompts = [task.prompt(p) for p in task.problems("medium", 50)]
    plain = Greedy(arith_lm, max_tokens=80).generate_batch(prompts)
    ngram = Speculative(arith_lm, "ngram", num_draft_tokens=3, max_tokens=80)
    auto = Speculative(arith_lm, NativeLM.from_pretrained("arith-draft"), num_draft_tokens="auto", max_tokens=80)
    drafted = accepted = 0
    for i, (p, (g,)) in enumerate(zip(prompts, plain)):
        (s,) = ngram.generate(p)
        assert s.token_ids == g.token_ids
        drafted, accepted = drafted + s.meta["drafted"], accepted + s.meta["accepted"]
        if i < 10:
            (a,) = auto.generate(p)
            assert a.token_ids == g.token_ids and a.meta["accepted"] > 0
    assert drafted > 0 and accepted > 0


def test_speculation_composes_with_processors_and_grammars(arith_lm):
    import re

    from ponder.decoding.constraints import Grammar

    draft = NativeLM.from_pretrained("arith-draft")
    prompt = "Q: 3+4-2+7-5+1\n"
    want = Greedy(arith_lm, max_tokens=50, repetition_penalty=1.3, no_repeat_ngram_size=4).generate(prompt)[0]
    for d in (draft, "ngram"):
        got = Speculative(arith_lm, d, max_tokens=50, repetition_penalty=1.3, no_repeat_ngram_size=4).generate(prompt)[0]
        assert got.token_ids == want.token_ids
    rx = r"[0-9]\+[0-9]=[0-9]{1,2}\n[0-9]{1,2}-[0-9]=[0-9]"
    g = Grammar.regex(arith_lm, rx)
    plain = Greedy(arith_lm, max_tokens=30, constraint=g.constraint()).generate(prompt)[0]
    for d in (draft, "ngram"):
        out = Speculative(arith_lm, d, max_tokens=30, processors=[g.constraint()]).generate(prompt)[0]
        assert re.fullmatch(rx, out.text) and out.token_ids == plain.token_ids
        samples = Speculative(arith_lm, d, temperature=1.0, max_tokens=30, processors=[g.constraint()]).generate(prompt, n=5, seed=2)
        assert all(re.fullmatch(rx, x.text) for x in samples)


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_batched_speculation_equals_each_row_alone(arith_lm, drafter):
    """Prompts x n samples speculated together: greedy equals plain greedy, and a seeded
    sampled row gives exactly what it gives alone (it draws in the same order)."""
    from ponder.decoding.generate import row_generator
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    prompts = [task.prompt(p) for p in task.problems("hard", 6)]
    draft = NativeLM.from_pretrained("arith-draft") if drafter == "model" else "ngram"
    plain = Greedy(arith_lm, max_tokens=100).generate_batch(prompts)
    spec = Speculative(arith_lm, draft, num_draft_tokens=3, max_tokens=100).generate_batch(prompts)
    assert [g[0].token_ids for g in spec] == [g[0].token_ids for g in plain]
    assert all(g[0].meta["batch"] == 6 for g in spec)
    sampler = Speculative(arith_lm, draft, num_draft_tokens=3, temperature=1.0, max_tokens=100)
    together = sampler.generate_batch(prompts[:3], n=2, seed=9)
    for p, outs in zip(prompts[:3], together):
        for j, g in enumerate(outs):
            alone = sampler._speculate([(arith_lm.encode(p), row_generator(9, j))])[0]
            assert g.token_ids == alone.token_ids


def test_bad_settings(models):
    lm = models["llama_gqa"]
    with pytest.raises(SettingError, match="num_draft_tokens must be an integer >= 1"):
        Speculative(lm, lm, num_draft_tokens=0)
    with pytest.raises(SettingError, match="'ngram'"):
        Speculative(lm, "lookup")
    with pytest.raises(SettingError, match="temperature must be >= 0"):
        Speculative(lm, lm, temperature=-1)


def test_greedy_draft_in_one_call_equals_k_steps(arith_lm):
    """The C kernel's fused drafting is the manual loop: feed, argmax, feed it, ...
    with the same tokens and the same cache afterwards (neither feeds the last draft)."""
    prompt = arith_lm.encode("Q: 123+45-6\n")
    _, fused = arith_lm.prefill([prompt[:-3]])
    _, manual = arith_lm.prefill([prompt[:-3]])
    feed = prompt[-3:]
    tokens = arith_lm.greedy_draft(feed, 5, fused)
    assert tokens is not None and len(tokens) == 5
    expected, ids = [], feed
    for _ in range(5):
        lg = arith_lm.forward(torch.tensor([ids]), manual)[0, -1]
        expected.append(int(lg.argmax()))
        ids = [expected[-1]]
    assert tokens == expected
    assert fused.lengths.tolist() == manual.lengths.tolist() == [len(prompt) + 4]
    n = int(fused.lengths[0])
    for a, b in zip(fused.k + fused.v, manual.k + manual.v):
        assert torch.allclose(a[:, :n], b[:, :n], atol=1e-5)
    assert NativeLM(arith_lm.model, arith_lm.tokenizer, backend="torch").greedy_draft(feed, 2, fused) is None
    with pytest.raises(ValueError, match="token ids must be in"):
        arith_lm.greedy_draft([arith_lm.vocab_size], 2, fused)
    assert fused.lengths.tolist() == [n]  # nothing was fed


def test_greedy_round_in_one_call_equals_draft_then_verify(arith_lm):
    """The kernel's whole greedy round against its parts: greedy drafts, one target pass,
    the longest agreeing prefix, raw log-probabilities, and both caches rolled back."""
    draft = NativeLM.from_pretrained("arith-draft")
    prompt = arith_lm.encode("Q: 123+45-6+78\n")
    seen = set()
    for cut in range(3, 12):  # different pending points give different acceptance lengths
        head, pending = prompt[:-cut], prompt[-cut:-cut + 1] if cut > 1 else prompt[-1:]
        _, t1 = arith_lm.prefill([head])
        _, d1 = draft.prefill([head])
        _, t2 = arith_lm.prefill([head])
        _, d2 = draft.prefill([head])
        a, xs, best, lps = arith_lm.greedy_round(draft, pending, pending, 4, t1, d1)
        assert xs == draft.greedy_draft(pending, 4, d2)
        lg = arith_lm.forward(torch.tensor([pending + xs]), t2)[0]  # [5, V]
        ref_best = lg.argmax(-1).tolist()
        ref_a = next((j for j in range(4) if xs[j] != ref_best[j]), 4)
        assert (a, best) == (ref_a, ref_best)
        ref_lp = lg.log_softmax(-1).gather(-1, torch.tensor(ref_best)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(lps), ref_lp, atol=1e-5)
        assert t1.lengths.tolist() == [len(head) + 1 + a]
        assert d1.lengths.tolist() == [len(head) + 1 + min(a, 3)]
        seen.add(a)
    assert len(seen) > 1  # both accepted and rejected drafts were exercised
    with pytest.raises(ValueError, match="token ids must be in"):
        arith_lm.greedy_round(draft, [arith_lm.vocab_size], [1], 2, *[m.prefill([[1, 2]])[1] for m in (arith_lm, draft)])


def test_one_round_function_for_one_row_and_many(arith_lm):
    """The batched path adapts k with "auto" (it used to stay at 4) and bills draft
    tokens at the draft's FLOPs (it used to bill them at the target's)."""
    prompts = ["Q: 3+4-2+8-1\n", "Q: 9-8+7-6\n", "Q: 5+5-2\n"]
    auto = Speculative(arith_lm, arith_lm, num_draft_tokens="auto", max_tokens=100)  # a draft that is always right
    outs = [g[0] for g in auto.generate_batch(prompts)]
    assert all(g.meta["batch"] == 3 and g.meta["acceptance_rate"] == 1.0 for g in outs)
    assert max(g.meta["drafted"] / g.meta["rounds"] for g in outs) > 4  # k grew past its start
    from ponder.backends.native import NativeLM

    spec = Speculative(arith_lm, NativeLM.from_pretrained("arith-draft"), num_draft_tokens=4, max_tokens=60)
    together = [g[0] for g in spec.generate_batch(prompts)]
    for p, g in zip(prompts, together):
        alone = spec.generate(p)[0]
        assert g.token_ids == alone.token_ids
        assert g.usage.flops == pytest.approx(alone.usage.flops, rel=0.15)
        # every computed token billed at its own model's FLOPs: far below the target's rate for all
        assert g.usage.flops < arith_lm.flops(g.usage.computed_tokens, len(arith_lm.encode(p))) * 0.9


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_whole_decodes_in_one_call_equal_greedy_at_every_budget(arith_lm, drafter):
    """A lone greedy row speculates round after round inside the C kernel: the budget
    landing mid-round, EOS or a stop token inside a round, all give plain greedy's
    tokens, finish reasons and log-probabilities."""
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    prompts = [task.prompt(p) for p in task.problems("hard", 6)]
    draft = NativeLM.from_pretrained("arith-draft") if drafter == "model" else "ngram"
    newline = arith_lm.encode("\n", add_special_tokens=False)[-1]
    for opts in ({"max_tokens": m} for m in (1, 2, 3, 5, 8, 17, 40, 160)):
        for extra in ({}, {"stop_token_ids": [newline]}):
            o = {**opts, **extra}
            want = [Greedy(arith_lm, **o).generate(p)[0] for p in prompts]
            for k in (4, "auto"):
                got = [Speculative(arith_lm, draft, num_draft_tokens=k, **o).generate(p)[0] for p in prompts]
                assert [g.token_ids for g in got] == [w.token_ids for w in want], (o, k)
                assert [(g.finish_reason, g.stop) for g in got] == [(w.finish_reason, w.stop) for w in want]
                for g, w in zip(got, want):
                    assert g.logprobs == pytest.approx(w.logprobs, abs=1e-4)
                    assert g.usage.generated_tokens == len(g.token_ids)


def test_ngram_lookup_stops_drafting_where_drafts_do_not_pay(arith_lm):
    """On arith the lookup's drafts are rarely right (about 1 in 10): the row soon
    decodes plainly, drafting again only to probe; on answers that repeat their prompt
    it keeps drafting and most drafts are accepted."""
    import random

    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    spec = Speculative(arith_lm, "ngram", num_draft_tokens=4, max_tokens=160)
    outs = [spec.generate(task.prompt(p))[0] for p in task.problems("hard", 20)]
    drafted, rounds = sum(g.meta["drafted"] for g in outs), sum(g.meta["rounds"] for g in outs)
    assert drafted < rounds  # at k = 4, drafting every round would draft about 4 per round
    rng = random.Random(0)
    copying = []
    for _ in range(10):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        copying.append(f"Q: {a}" + f"+{b}-{b}" * 4 + f"\n{a}+{b}={a + b}\n{a + b}-{b}={a}\n")
    outs = [spec.generate(p)[0] for p in copying]
    acc = sum(g.meta["accepted"] for g in outs) / sum(g.meta["drafted"] for g in outs)
    assert acc > 0.5 and sum(g.meta["drafted"] for g in outs) > 2 * sum(g.meta["rounds"] for g in outs)
    plain = [Greedy(arith_lm, max_tokens=160).generate(p)[0] for p in copying]
    assert [g.token_ids for g in outs] == [p.token_ids for p in plain]
