"""Reward-guided token decoding (FUDGE-style) and sequential Monte Carlo steering."""

from __future__ import annotations

import pytest
import torch

from ponder.decoding.generate import Greedy
from ponder.decoding.guided import SMC, RewardGuidance, ess, reward_prefix_scorer, systematic_resample
from ponder.decoding.common_adapters import SettingError

PROMPT = "Q: 3+4-2+7\n"


def test_reward_guidance_reweights_only_the_top_candidates(arith_lm):
    ids = arith_lm.encode(PROMPT)
    logits, _ = arith_lm.prefill([ids])
    top = torch.topk(logits[0], 4).indices.tolist()
    favourite = top[2]  # the third most likely token

    def scorer(seqs):  # log P(a | prefix): 0 for the favourite, -50 for anything else
        return torch.tensor([0.0 if s[-1] == favourite else -50.0 for s in seqs])

    g = RewardGuidance(scorer, top_k=4, weight=1.0)
    out = g(torch.tensor([ids]), logits)
    finite = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert sorted(finite) == sorted(top)
    for v in top:  # logit + weight * log P
        want = logits[0, v] + (0.0 if v == favourite else -50.0)
        assert out[0, v].item() == pytest.approx(want.item(), abs=1e-4)
    first = Greedy(arith_lm, max_tokens=1, processors=[RewardGuidance(scorer, top_k=4)]).generate(PROMPT)[0]
    assert first.token_ids == [favourite]
    assert RewardGuidance(scorer, weight=0.0).is_identity
    with pytest.raises(SettingError, match="top_k"):
        RewardGuidance(scorer, top_k=0)


def test_reward_guided_decoding_with_the_shipped_reward_model(arith_lm):
    from ponder.scoring.reward import RewardModel

    rm = RewardModel.from_pretrained("arith-reward")
    guide = RewardGuidance(reward_prefix_scorer(rm), top_k=3, weight=2.0)
    out = Greedy(arith_lm, max_tokens=60, processors=[guide]).generate(PROMPT)[0]
    assert out.finish_reason == "stop" and "Answer:" in out.text and guide.calls >= 3 * len(out.token_ids)


def test_ess_and_systematic_resampling():
    assert ess(torch.zeros(8, dtype=torch.float64)) == pytest.approx(8.0)
    assert ess(torch.tensor([0.0, -1e9, -1e9, -1e9], dtype=torch.float64)) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(3)
    log_w = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log()
    for _ in range(2000):
        for j in systematic_resample(log_w, g):
            counts[j] += 1
    freq = counts / counts.sum()
    assert torch.allclose(freq, torch.tensor([0.5, 0.3, 0.2]), atol=0.02)


def test_smc_with_a_flat_potential_is_plain_sampling(arith_lm):
    flat = lambda seqs: torch.zeros(len(seqs))
    smc = SMC(arith_lm, flat, num_particles=6, max_tokens=40)
    gens, log_w, usage, resamples = smc.run(arith_lm.encode(PROMPT), seed=3)
    assert resamples == 0 and torch.allclose(log_w, torch.zeros(6, dtype=torch.float64))
    again, _, _, _ = smc.run(arith_lm.encode(PROMPT), seed=3)
    assert [g.token_ids for g in gens] == [g.token_ids for g in again]  # seeded
    assert usage.computed_tokens > 0


def test_smc_steers_towards_the_potential(arith_lm):
    """Target p(y)·φ(y) with φ forbidding lines that start with the greedy first token:
    after resampling every surviving particle avoids it."""
    ids = arith_lm.encode(PROMPT)
    greedy_first = Greedy(arith_lm, max_tokens=1).generate(PROMPT)[0].token_ids[0]
    phi = lambda seqs: torch.tensor([-30.0 if s[len(ids)] == greedy_first else 0.0 for s in seqs])
    smc = SMC(arith_lm, phi, num_particles=16, temperature=3.0, max_tokens=12, boundary="tokens", every=1)
    gens, log_w, _, resamples = smc.run(ids, seed=0)
    assert resamples >= 1
    w = (log_w - torch.logsumexp(log_w, 0)).exp()
    mass_on_forbidden = sum(float(w[i]) for i, g in enumerate(gens) if g.token_ids[0] == greedy_first)
    assert mass_on_forbidden < 1e-6
    best = smc.generate(PROMPT, n=2, seed=0)
    assert best[0].token_ids[0] != greedy_first and best[0].score >= best[1].score
    with pytest.raises(SettingError, match="num_particles"):
        SMC(arith_lm, phi, num_particles=0)
    with pytest.raises(SettingError, match="n must be"):
        smc.generate(PROMPT, n=17)
