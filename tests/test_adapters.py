"""The further adapters and history processors: transformers' processors of the same
name on random logits and histories (to 1e-5), hand-computed cases, state hooks."""

from __future__ import annotations

import math

import pytest
import torch

from ponder.decoding.adapters import (
    Epsilon, Eta, FrequencyPenalty, LogitBias, MinTokens, NoRepeatNGram, PresencePenalty,
    RepetitionPenalty, SequenceBias, TopNSigma, Typical, bad_words,
)
from ponder.decoding.adapters import make_processors
from ponder.decoding.common_adapters import SettingError, chain

V = 40


def _same(a, b):
    assert torch.equal(torch.isinf(a), torch.isinf(b))
    fin = torch.isfinite(a)
    assert torch.allclose(a[fin], b[fin], atol=1e-5)


def _data(seed, T=12):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(4, V, generator=g) * 2.5
    hist = torch.randint(0, V, (4, T), generator=g)
    return hist, logits


@pytest.mark.parametrize("seed", range(4))
def test_against_transformers(seed):
    from transformers.generation import logits_process as lp

    hist, x = _data(seed)
    cases = [
        (Typical(0.5), lp.TypicalLogitsWarper(0.5)), (Typical(0.95), lp.TypicalLogitsWarper(0.95)),
        (Epsilon(0.02), lp.EpsilonLogitsWarper(0.02)), (Epsilon(0.3), lp.EpsilonLogitsWarper(0.3)),
        (Eta(0.02), lp.EtaLogitsWarper(0.02)), (Eta(0.2), lp.EtaLogitsWarper(0.2)),
        (RepetitionPenalty(1.3), lp.RepetitionPenaltyLogitsProcessor(1.3)),
        (RepetitionPenalty(0.7), lp.RepetitionPenaltyLogitsProcessor(0.7)),
        (NoRepeatNGram(2), lp.NoRepeatNGramLogitsProcessor(2)), (NoRepeatNGram(3), lp.NoRepeatNGramLogitsProcessor(3)),
        (NoRepeatNGram(1), lp.NoRepeatNGramLogitsProcessor(1)),
        (SequenceBias({(5,): 2.0, (hist[0, -1].item(), 7): -3.0}),
         lp.SequenceBiasLogitsProcessor([[[5], 2.0], [[hist[0, -1].item(), 7], -3.0]])),
        (bad_words([[9], [hist[1, -2].item(), hist[1, -1].item(), 11]]),
         lp.NoBadWordsLogitsProcessor([[9], [hist[1, -2].item(), hist[1, -1].item(), 11]], eos_token_id=0)),
    ]
    for ours, theirs in cases:
        _same(ours(hist, x.clone()), theirs(hist, x.clone()))


def test_min_tokens_against_transformers():
    from transformers.generation import logits_process as lp

    hist, x = _data(9, T=5)
    ours = MinTokens(3, [0, 1])
    theirs = lp.MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=5, min_new_tokens=3, eos_token_id=[0, 1])
    for step in range(5):
        _same(ours(hist, x.clone()), theirs(hist, x.clone()))
        tok = torch.randint(2, V, (4,))
        ours.accept(tok)
        hist = torch.cat([hist, tok[:, None]], 1)


def test_padding_in_history_is_ignored():
    hist = torch.tensor([[-1, -1, 3], [2, 2, 3]])
    x = torch.ones(2, 5)
    out = RepetitionPenalty(2.0)(hist, x)
    assert out[0].tolist() == [1, 1, 1, 0.5, 1]
    assert out[1].tolist() == [1, 1, 0.5, 0.5, 1]
    assert NoRepeatNGram(2)(torch.tensor([[-1, 3, 4, 3]]), torch.zeros(1, 5))[0].tolist() == [0, 0, 0, 0, -math.inf]


def test_top_n_sigma_hand_computed():
    x = torch.tensor([[0.0, 1.0, 2.0, 3.0, 10.0]])
    # mean 3.2, std (population) = sqrt(mean((x-3.2)^2)) = sqrt(12.56) ~ 3.544
    out = TopNSigma(1.0)(None, x)  # keep x >= 10 - 3.544 = 6.456
    assert torch.isfinite(out).tolist() == [[False, False, False, False, True]]
    out = TopNSigma(3.0)(None, x)  # keep x >= 10 - 10.63: everything
    assert torch.isfinite(out).all()


def test_logit_bias_hand_computed():
    out = LogitBias({1: 5.0, 3: -1.5})(None, torch.zeros(2, 4))
    assert out.tolist() == [[0, 5, 0, -1.5]] * 2
    with pytest.raises(ValueError, match="outside the vocabulary"):
        LogitBias({9: 1.0})(None, torch.zeros(1, 4))


def test_frequency_and_presence_penalties_fork_and_rollback():
    f, p = FrequencyPenalty(0.5), PresencePenalty(1.0)
    c = chain(f, p)
    x = torch.zeros(2, 4)
    c(None, x)
    c.accept(torch.tensor([1, 2]))
    c.accept(torch.tensor([1, 3]))
    assert c(None, x).tolist() == [[0, -2.0, 0, 0], [0, 0, -1.5, -1.5]]
    forked = c.fork([1, 1, 0])
    assert forked(None, torch.zeros(3, 4)).tolist() == [[0, 0, -1.5, -1.5], [0, 0, -1.5, -1.5], [0, -2.0, 0, 0]]
    c.rollback(1)
    assert c(None, x).tolist() == [[0, -1.5, 0, 0], [0, 0, -1.5, 0]]
    c.reset()
    assert c(None, x).tolist() == [[0, 0, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize(
    "make, bad, phrase",
    [
        (Typical, 0.0, r"typical_p must be in \(0, 1\]"), (Epsilon, 1.0, r"epsilon must be in \[0, 1\)"),
        (Eta, -0.1, r"eta must be in \[0, 1\)"), (TopNSigma, -1.0, "top_n_sigma must be >= 0"),
        (RepetitionPenalty, 0.0, "repetition_penalty must be > 0"), (NoRepeatNGram, -2, "no_repeat_ngram_size"),
        (FrequencyPenalty, 3.0, r"frequency_penalty must be in \[-2, 2\]"),
        (PresencePenalty, -2.5, r"presence_penalty must be in \[-2, 2\]"),
    ],
)
def test_invalid_settings_name_the_legal_range(make, bad, phrase):
    with pytest.raises(SettingError, match=phrase):
        make(bad)


@pytest.mark.parametrize("proc", [Typical(1.0), Epsilon(0.0), Eta(0.0), TopNSigma(0.0), RepetitionPenalty(1.0),
                                  NoRepeatNGram(0), LogitBias({}), SequenceBias({}), FrequencyPenalty(0.0),
                                  PresencePenalty(0.0), MinTokens(0, [0])])
def test_settings_that_do_nothing_are_the_identity(proc):
    assert proc.is_identity and chain(proc).is_identity


def test_processors_run_in_generation(arith_lm):
    """End to end on the shipped model: no-repeat-3-gram forbids every trigram that
    ends in a generated token from having occurred before (the prompt repeats a lot)."""
    from ponder.decoding.generate import Sample

    prompt = "Q: 1+1+1+1+1+1\n"
    p_len = len(arith_lm.encode(prompt))
    gen = Sample(arith_lm, temperature=1.0, processors=[NoRepeatNGram(3)], max_tokens=60)
    for g in gen.generate(prompt, n=3, seed=0):
        ids = arith_lm.encode(prompt) + g.token_ids
        for end in range(p_len, len(ids)):
            tri = tuple(ids[end - 2 : end + 1])
            earlier = {tuple(ids[j - 2 : j + 1]) for j in range(2, end)}
            assert tri not in earlier


def test_mirostat_v2_hand_computed_and_state():
    from ponder.decoding.adapters import MirostatV2

    m = MirostatV2(tau=1.0, eta=0.5)
    # probabilities 1/2, 1/4, 1/8, 1/8 -> surprisals 1, 2, 3, 3 bits; mu starts at 2*tau = 2
    x = torch.tensor([[0.5, 0.25, 0.125, 0.125]]).log()
    assert torch.isfinite(m(None, x)).tolist() == [[True, True, False, False]]
    m.accept(torch.tensor([1]))  # surprisal 2: mu = 2 - 0.5 * (2 - 1) = 1.5
    assert m._mu.tolist() == [1.5]
    assert torch.isfinite(m(None, x)).tolist() == [[True, False, False, False]]
    f = m.fork([0, 0])
    m.rollback(1)
    assert m._mu.tolist() == [2.0] and f._mu.tolist() == [1.5, 1.5]
    with pytest.raises(SettingError, match="tau must be > 0"):
        MirostatV2(tau=0)


def test_mirostat_v1_estimates_zipf_and_picks_k():
    from ponder.decoding.adapters import MirostatV1

    V = 1000
    p = 1.0 / torch.arange(1, V + 1, dtype=torch.float64) ** 2  # Zipf, s = 2
    x = (p / p.sum()).log().float()[None]
    m = MirostatV1(tau=3.0, eta=0.1)
    # s_hat = 2, eps = 1, mu = 6: k = (2^6 / (1 - 1/V))^(1/2) = 8.004 -> 8
    kept = torch.isfinite(m(None, x))
    assert kept.sum().item() == 8 and kept[0, :8].all()
    trunc = p[:8] / p[:8].sum()
    m.accept(torch.tensor([2]))
    want = 6 - 0.1 * (-math.log2(trunc[2].item()) - 3.0)
    assert m._mu.item() == pytest.approx(want, rel=1e-5)
    m.rollback(1)
    assert m._mu.item() == 6.0
    with pytest.raises(SettingError, match="mirostat_version"):
        make_processors(mirostat_tau=3.0, mirostat_version=3)


def test_stateful_processors_start_fresh_on_every_request(arith_lm):
    """min_tokens holds EOS back on the second request exactly as on the first."""
    from ponder.decoding.generate import Greedy

    gen = Greedy(arith_lm, max_tokens=40, min_tokens=30)
    a = gen.generate("Q: 1+2\n")[0]
    b = gen.generate("Q: 1+2\n")[0]
    assert len(a.token_ids) >= 30 and a.token_ids == b.token_ids


def test_logit_bias_comes_before_the_repetition_penalty_as_in_transformers():
    # a seen token at logit 2.0, bias +1, penalty 1.3: transformers gives (2 + 1) / 1.3
    hist = torch.tensor([[3]])
    x = torch.zeros(1, V)
    x[0, 3] = 2.0
    out = make_processors(logit_bias={3: 1.0}, repetition_penalty=1.3)(hist, x)
    assert out[0, 3].item() == pytest.approx(3.0 / 1.3)


@pytest.mark.parametrize("settings", [
    dict(logit_bias={3: 1.0, 7: -2.0}, repetition_penalty=1.3),
    dict(logit_bias={1: 0.5}, repetition_penalty=0.8, temperature=0.7, top_k=10),
    dict(logit_bias={5: 3.0}, repetition_penalty=1.2, no_repeat_ngram_size=2, top_p=0.9),
    dict(logit_bias={2: -1.0, 9: 2.0}, repetition_penalty=1.5, bad_words_ids=[[4], [6, 8]], min_p=0.05,
         temperature=1.3),
    dict(repetition_penalty=1.1, min_tokens=20, typical_p=0.8, logit_bias={0: 1.5}),
    dict(logit_bias={11: 2.5}, epsilon=0.01, top_k=20, top_p=0.95, temperature=0.9),
])
def test_whole_chain_matches_transformers(settings):
    """The whole chain at once, in transformers' order: sequence bias, repetition
    penalty, no-repeat-n-gram, bad words, min new tokens, then the warpers."""
    from transformers.generation import logits_process as lp

    eos = 0
    for seed in range(3):
        hist, x = _data(seed)
        prompt_len = 4  # min_tokens counts generated tokens: the history's last 8 are generated
        # transformers' processors in transformers' order
        hf_order = [
            ("logit_bias", lambda v: lp.SequenceBiasLogitsProcessor({(k,): b for k, b in v.items()})),
            ("repetition_penalty", lp.RepetitionPenaltyLogitsProcessor),
            ("no_repeat_ngram_size", lp.NoRepeatNGramLogitsProcessor),
            ("bad_words_ids", lambda v: lp.NoBadWordsLogitsProcessor(v, eos_token_id=eos)),
            ("min_tokens", lambda v: lp.MinNewTokensLengthLogitsProcessor(prompt_len, v, eos_token_id=eos)),
            ("temperature", lp.TemperatureLogitsWarper), ("top_k", lp.TopKLogitsWarper),
            ("top_p", lp.TopPLogitsWarper), ("min_p", lp.MinPLogitsWarper), ("typical_p", lp.TypicalLogitsWarper),
            ("epsilon", lp.EpsilonLogitsWarper),
        ]
        hf = [make(settings[k]) for k, make in hf_order if k in settings]
        want = lp.LogitsProcessorList(hf)(hist, x.clone())
        ours = make_processors(stop_token_ids=[eos], **settings)
        if "min_tokens" in settings:
            for t in hist[:, prompt_len:].T:
                ours.accept(t)
        _same(ours(hist, x.clone()), want)
