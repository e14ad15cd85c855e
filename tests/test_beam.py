"""The beam family against transformers (the oracle) and against theory."""

from __future__ import annotations

import itertools

import pytest
import torch

from ponder.decoding.beam import BeamSample, BeamSearch, StochasticBeamSearch
from ponder.decoding.common_adapters import SettingError
from ponder.models.loader import load_tokenizer, load_transformer
from ponder.backends.native import NativeLM

PROMPTS = ["Q: 3+4-2+7\n", "Q: 9-8+1-6-5\n", "Q: 1+"]
SETTINGS = [(1.0, False), (0.5, True), (2.0, "never"), (-1.0, False)]


def _hf_beams(hf, ids, k, lp, es, max_new, **extra):
    out = hf.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long), num_beams=k,
                      num_return_sequences=k, length_penalty=lp, early_stopping=es, max_new_tokens=max_new,
                      do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0, **extra)
    seqs = []
    for row in out.sequences[:, len(ids):].tolist():
        if 0 in row:  # EOS = pad = 0: keep the EOS, drop the padding after it
            row = row[: row.index(0) + 1]
        seqs.append(row)
    return seqs, out.sequences_scores.tolist()


def _assert_same(gens, seqs, scores):
    assert [g.token_ids for g in gens] == seqs
    for g, s in zip(gens, scores):
        # float32 sums of ~60 log-probs: two correct implementations differ by ~1e-6 relative
        assert g.score == pytest.approx(s, rel=1e-5, abs=1e-4)


@pytest.fixture(scope="module")
def hf_arith():
    from transformers import AutoModelForCausalLM

    from ponder.models.registry import resolve_model

    path, _ = resolve_model("arith")
    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


@pytest.mark.parametrize("k", [2, 4, 8])
def test_beam_search_equals_transformers_on_the_shipped_model(arith_lm, hf_arith, k):
    for prompt, (lp, es) in itertools.product(PROMPTS, SETTINGS):
        ids = arith_lm.encode(prompt)
        gens = BeamSearch(arith_lm, num_beams=k, length_penalty=lp, early_stopping=es, max_tokens=24).generate(prompt, n=k)
        _assert_same(gens, *_hf_beams(hf_arith, ids, k, lp, es, 24))


@pytest.mark.parametrize("k", [2, 4, 8])
def test_beam_search_equals_transformers_on_a_random_llama(hf_checkpoints, k):
    folder, hf = hf_checkpoints["llama_gqa"]
    lm = NativeLM(load_transformer(folder), load_tokenizer(folder), "tiny")
    torch.manual_seed(k)
    for _ in range(2):
        ids = torch.randint(1, lm.vocab_size, (7,)).tolist()
        for lp, es in SETTINGS[:2]:
            gens = BeamSearch(lm, num_beams=k, length_penalty=lp, early_stopping=es, max_tokens=12).generate(ids, n=k)
            _assert_same(gens, *_hf_beams(hf, ids, k, lp, es, 12))


def test_beam_search_with_history_processors_equals_transformers(arith_lm, hf_arith):
    prompt = PROMPTS[0]
    ids = arith_lm.encode(prompt)
    gens = BeamSearch(arith_lm, num_beams=4, repetition_penalty=1.3, no_repeat_ngram_size=3, min_tokens=5,
                      max_tokens=24).generate(prompt, n=4)
    _assert_same(gens, *_hf_beams(hf_arith, ids, 4, 1.0, False, 24, repetition_penalty=1.3,
                                  no_repeat_ngram_size=3, min_new_tokens=5))


def test_one_beam_is_greedy_and_beams_carry_their_own_logprobs(arith_lm):
    from ponder.decoding.generate import Greedy

    prompt = PROMPTS[1]
    g = Greedy(arith_lm, max_tokens=40).generate(prompt)[0]
    b = BeamSearch(arith_lm, num_beams=1, max_tokens=40).generate(prompt)[0]
    assert b.token_ids == g.token_ids
    assert b.logprobs == pytest.approx(g.logprobs, abs=1e-5)
    assert b.score == pytest.approx(sum(g.logprobs) / len(g.logprobs), abs=1e-5)
    best = BeamSearch(arith_lm, num_beams=4, max_tokens=40).generate(prompt, n=4)
    assert best[0].usage.computed_tokens > 0 and all(x.usage.computed_tokens == 0 for x in best[1:])
    assert [x.score for x in best] == sorted((x.score for x in best), reverse=True)


def test_beam_sampling_is_seeded_and_cold_beam_sampling_is_beam_search(arith_lm):
    prompt = PROMPTS[0]
    a = BeamSample(arith_lm, num_beams=4, temperature=1.5, max_tokens=24).generate(prompt, n=4, seed=3)
    b = BeamSample(arith_lm, num_beams=4, temperature=1.5, max_tokens=24).generate(prompt, n=4, seed=3)
    assert [g.token_ids for g in a] == [g.token_ids for g in b]
    cold = BeamSample(arith_lm, num_beams=4, temperature=1e-4, max_tokens=24).generate(prompt, n=4, seed=0)
    exact = BeamSearch(arith_lm, num_beams=4, max_tokens=24).generate(prompt, n=4)
    # the best beam agrees; the spares differ, since underflow leaves ties among zeros
    assert cold[0].token_ids == exact[0].token_ids


def test_diverse_beam_groups_start_apart(arith_lm):
    prompt = "Q: 5+"
    plain = BeamSearch(arith_lm, num_beams=2, max_tokens=6).generate(prompt, n=2)
    same = BeamSearch(arith_lm, num_beams=4, num_beam_groups=2, max_tokens=6).generate(prompt, n=4)
    # without a penalty both groups are the same 2-beam search
    a, b = plain[0].token_ids, plain[1].token_ids
    assert [g.token_ids for g in same] == [a, a, b, b]
    div = BeamSearch(arith_lm, num_beams=4, num_beam_groups=2, diversity_penalty=50.0, max_tokens=6).generate(prompt, n=4)
    first = [{g.token_ids[0] for g in div if g.meta["group"] == i} for i in (0, 1)]
    assert first[0] and first[1] and not first[0] & first[1]  # group 2 may not reuse group 1's first tokens


def _sequence_probs(lm, prompt_ids, temperature):
    """Exact probabilities of every 2-token continuation under the tempered model."""
    V = lm.vocab_size
    with torch.no_grad():
        l1 = lm.forward(torch.tensor([prompt_ids]), None)[0, -1]
        p1 = (l1 / temperature).log_softmax(-1)  # [V]
        ids = torch.tensor([prompt_ids + [t] for t in range(V)])
        l2 = lm.forward(ids, None)[:, -1]
        p2 = (l2 / temperature).log_softmax(-1)  # [V, V]
    return (p1[:, None] + p2).exp().reshape(-1).double()  # [V*V]


def test_stochastic_beam_search_samples_without_replacement(arith_lm):
    """Kool et al. 2019: with all sequences of one length, the K beams are a sample
    without replacement. Inclusion probability for K = 2:
    P(s in S) = p_s + sum_{t != s} p_t * p_s / (1 - p_t)."""
    T = 1.0

    def inclusion(prompt):
        p = _sequence_probs(arith_lm, arith_lm.encode(prompt), T)
        ratio = p / (1 - p)
        return p + p * (ratio.sum() - ratio)

    # the prompt whose 4th most likely sequence is most uncertain: the test has power
    prompt = max(["Q: ", "Q: 7-", "Q: 4+5", "Q: 8-"], key=lambda q: torch.sort(inclusion(q), descending=True).values[3])
    incl = inclusion(prompt)
    top = torch.argsort(incl, descending=True)[:4].tolist()
    assert 0.05 < incl[top[-1]] < 0.95
    sbs = StochasticBeamSearch(arith_lm, num_beams=2, temperature=T, max_tokens=2, ignore_eos=True)
    runs = 600
    hits = {s: 0 for s in top}
    V = arith_lm.vocab_size
    for seed in range(runs):
        gens = sbs.generate(prompt, n=2, seed=seed)
        keys = [g.token_ids[0] * V + g.token_ids[1] for g in gens]
        assert len(set(keys)) == 2  # without replacement
        for s in top:
            hits[s] += s in keys
    for s in top:
        q = float(incl[s])
        sd = (q * (1 - q) / runs) ** 0.5
        assert abs(hits[s] / runs - q) < 4 * sd + 1e-3, (s, hits[s] / runs, q)


def test_beam_settings_are_validated(arith_lm):
    with pytest.raises(SettingError, match="num_beams"):
        BeamSearch(arith_lm, num_beams=0)
    with pytest.raises(SettingError, match="early_stopping"):
        BeamSearch(arith_lm, early_stopping="sometimes")
    with pytest.raises(SettingError, match="divides"):
        BeamSearch(arith_lm, num_beams=4, num_beam_groups=3)
    with pytest.raises(SettingError, match="length_penalty"):
        BeamSearch(arith_lm, length_penalty=float("nan"))
    with pytest.raises(SettingError, match="does not take"):
        BeamSearch(arith_lm, temperature=0.5)
    with pytest.raises(SettingError, match="<= num_beams"):
        BeamSearch(arith_lm, num_beams=2).generate("Q: 1+1", n=3)
    with pytest.raises(SettingError, match="empty"):
        BeamSearch(arith_lm).generate("")
