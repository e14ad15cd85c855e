"""Processors: hand-computed tiny distributions, transformers' warpers, and validation."""

from __future__ import annotations

import math

import pytest
import torch

from ponder.decoding.adapters import make_processors
from ponder.decoding.common_adapters import Chain, MinP, SettingError, Temperature, TopK, TopP, chain

NEG = float("-inf")


def logits_of(probs):
    return torch.tensor([probs]).log()


def kept(out):
    return torch.isfinite(out[0]).tolist()


def test_temperature_hand_computed():
    x = torch.tensor([[0.0, math.log(2.0), math.log(4.0)]])
    p = Temperature(0.5)(None, x).softmax(-1)[0]
    # softmax(log([1, 2, 4]) / 0.5) = [1, 4, 16] / 21
    assert torch.allclose(p, torch.tensor([1, 4, 16]) / 21.0, atol=1e-6)


def test_top_k_hand_computed():
    x = logits_of([0.1, 0.4, 0.2, 0.3])
    assert kept(TopK(2)(None, x)) == [False, True, False, True]
    assert kept(TopK(10)(None, x)) == [True] * 4


def test_top_p_hand_computed():
    x = logits_of([0.1, 0.4, 0.2, 0.3])
    # sorted: .4 .3 .2 .1; cumulative .4 .7 .9 1.0 -> p=0.6 keeps {.4, .3}
    assert kept(TopP(0.6)(None, x)) == [False, True, False, True]
    # p=0.75 needs .4+.3+.2
    assert kept(TopP(0.75)(None, x)) == [False, True, True, True]
    # p tiny: the top token always survives
    assert kept(TopP(0.01)(None, x)) == [False, True, False, False]


def test_min_p_hand_computed():
    x = logits_of([0.1, 0.4, 0.2, 0.3])
    # threshold 0.45 * 0.4 = 0.18: keep .4 .2 .3
    assert kept(MinP(0.45)(None, x)) == [False, True, True, True]
    assert kept(MinP(0.9)(None, x)) == [False, True, False, False]


@pytest.mark.parametrize("proc", [Temperature(1.0), TopK(0), TopP(1.0), MinP(0.0)])
def test_settings_that_do_nothing_are_the_identity(proc):
    x = torch.randn(3, 17)
    assert proc.is_identity
    assert torch.equal(proc(None, x), x)
    assert Chain(proc).is_identity


@pytest.mark.parametrize(
    "make, bad, phrase",
    [
        (Temperature, 0.0, "temperature must be > 0"),
        (Temperature, -1.0, "temperature must be > 0"),
        (Temperature, float("nan"), "temperature must be > 0"),
        (TopK, -1, "top_k must be an integer >= 0"),
        (TopK, 2.5, "top_k must be an integer >= 0"),
        (TopP, 0.0, r"top_p must be in \(0, 1\]"),
        (TopP, 1.5, r"top_p must be in \(0, 1\]"),
        (MinP, -0.1, r"min_p must be in \[0, 1\]"),
        (MinP, 2.0, r"min_p must be in \[0, 1\]"),
    ],
)
def test_invalid_settings_name_the_legal_range(make, bad, phrase):
    with pytest.raises(SettingError, match=phrase):
        make(bad)


def _hf():
    from transformers.generation.logits_process import (
        MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper,
    )

    return TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper, MinPLogitsWarper


@pytest.mark.parametrize("seed", range(5))
def test_against_transformers_warpers(seed):
    T, K, P, M = _hf()
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 300, generator=g) * 3
    ids = torch.randint(0, 300, (4, 7), generator=g)
    cases = [
        (Temperature(0.7), T(0.7)), (Temperature(1.9), T(1.9)),
        (TopK(1), K(1)), (TopK(13), K(13)), (TopK(299), K(299)),
        (TopP(0.3), P(0.3)), (TopP(0.9), P(0.9)), (TopP(0.999), P(0.999)),
        (MinP(0.05), M(0.05)), (MinP(0.3), M(0.3)),
    ]
    for ours, theirs in cases:
        a, b = ours(ids, x.clone()), theirs(ids, x.clone())
        assert torch.equal(torch.isinf(a), torch.isinf(b)), ours
        fin = torch.isfinite(a)
        assert torch.allclose(a[fin], b[fin], atol=1e-5), ours


def test_chain_is_a_processor_and_equals_manual_loop():
    T, K, P, M = _hf()
    x = torch.randn(3, 50) * 2
    c = make_processors(temperature=0.8, top_k=20, top_p=0.9, min_p=0.02)
    manual = x.clone()
    for p in (Temperature(0.8), TopK(20), TopP(0.9), MinP(0.02)):
        manual = p(None, manual)
    assert torch.equal(c(None, x), manual)
    # chain of chains flattens; identity members vanish
    cc = chain(c, Temperature(1.0), lambda t, l: l + 0)
    assert len(cc.processors) == 5
    hf = x.clone()
    for w in (T(0.8), K(20), P(0.9), M(0.02)):
        hf = w(None, hf)
    fin = torch.isfinite(hf)
    assert torch.equal(fin, torch.isfinite(cc(None, x)))
    assert torch.allclose(cc(None, x)[fin], hf[fin], atol=1e-5)


def test_user_callable_must_keep_shape():
    c = chain(lambda t, l: l[:, :3])
    with pytest.raises(SettingError, match="shape"):
        c(None, torch.zeros(2, 5))
    with pytest.raises(SettingError, match="callable"):
        chain(42)
