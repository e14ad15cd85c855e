"""Controlled generation: each combination against a direct computation of its formula
on the member models' logits (full forward passes, no cache)."""

from __future__ import annotations

import math

import pytest
import torch

from ponder.decoding.controlled import (
    ClassifierFreeGuidance, CombinedLM, ContrastiveDecoding, ProductOfExperts, contrastive_scores,
)
from ponder.decoding.generate import Greedy
from ponder.decoding.common_adapters import SettingError
from ponder.models.loader import load_tokenizer, load_transformer
from ponder.backends.native import NativeLM


@pytest.fixture(scope="module")
def pair(hf_checkpoints):
    lms = []
    for name in ("llama_tied", "qwen2_bias"):
        folder, _ = hf_checkpoints[name]
        lms.append(NativeLM(load_transformer(folder), load_tokenizer(folder), name))
    return lms


def _logp(lm, ids):
    return lm.forward(torch.tensor([ids]), None)[0, -1].log_softmax(-1)


def _manual_greedy(score_fn, prompt_ids, steps):
    ids, out = list(prompt_ids), []
    for _ in range(steps):
        tok = int(score_fn(ids).argmax())
        out.append(tok)
        ids.append(tok)
    return out


def test_contrastive_decoding_equals_the_formula(pair):
    expert, amateur = pair
    alpha, beta = 0.1, 0.5
    prompt = expert.encode("Q: 12+3\n")

    def formula(ids):
        e, a = _logp(expert, ids), _logp(amateur, ids)
        keep = e >= e.max() + math.log(alpha)
        return torch.where(keep, e - beta * a, torch.tensor(float("-inf")))

    (g,) = ContrastiveDecoding(expert, amateur, alpha=alpha, beta=beta, max_tokens=12, ignore_eos=True).generate(prompt)
    assert g.token_ids == _manual_greedy(formula, prompt, 12)
    combined = CombinedLM([expert, amateur], contrastive_scores(alpha, beta))
    first, _ = combined.prefill([prompt])
    assert torch.allclose(first[0], formula(prompt), atol=1e-5)


def test_product_of_experts_equals_the_formula(pair):
    a, b = pair
    w = (1.0, 0.7, -0.4)
    prompt = a.encode("Q: 5-4\n")

    def formula(ids):
        return w[0] * _logp(a, ids) + w[1] * _logp(b, ids) + w[2] * _logp(b, ids)

    (g,) = ProductOfExperts([a, b, b], w, sample=False, max_tokens=12, ignore_eos=True).generate(prompt)
    assert g.token_ids == _manual_greedy(formula, prompt, 12)


def test_classifier_free_guidance_equals_the_formula(pair):
    lm = pair[0]
    prompt = lm.encode("Q: 7+7\n")
    neg = lm.encode("Q:")
    gamma = 2.5

    def formula(ids):
        gen = ids[len(prompt):]
        cond, uncond = _logp(lm, ids), _logp(lm, neg + gen)
        return uncond + gamma * (cond - uncond)

    (g,) = ClassifierFreeGuidance(lm, gamma, negative_prompt="Q:", max_tokens=10, ignore_eos=True).generate(prompt)
    assert g.token_ids == _manual_greedy(formula, prompt, 10)
    # scale 1 is the plain model
    (plain,) = Greedy(lm, max_tokens=10, ignore_eos=True).generate(prompt)
    (one,) = ClassifierFreeGuidance(lm, 1.0, max_tokens=10, ignore_eos=True).generate(prompt)
    assert one.token_ids == plain.token_ids


def test_combined_sampling_batches_and_forks(pair):
    a, b = pair
    gen = ProductOfExperts([a, b], (0.5, 0.5), sample=True, temperature=1.0, max_tokens=8, ignore_eos=True)
    x = gen.generate_batch(["Q: 1\n", "Q: 22+3\n"], n=3, seed=4)
    y = gen.generate_batch(["Q: 1\n", "Q: 22+3\n"], n=3, seed=4)
    assert [[g.token_ids for g in row] for row in x] == [[g.token_ids for g in row] for row in y]
    assert all(len(g.token_ids) == 8 for row in x for g in row)


def test_bad_settings(pair):
    a, b = pair
    with pytest.raises(SettingError, match=r"alpha must be in \(0, 1\]"):
        ContrastiveDecoding(a, b, alpha=0)
    with pytest.raises(SettingError, match="2 weights for 3 models"):
        ProductOfExperts([a, b, b], (1.0, 1.0))
    with pytest.raises(SettingError, match="guidance_scale must be >= 0"):
        ClassifierFreeGuidance(a, -1)
