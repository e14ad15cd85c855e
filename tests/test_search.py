"""Contrastive search, DoLa and best-first search: formulas by hand, invariances, and
end-to-end runs on the shipped models."""

from __future__ import annotations

import math

import pytest
import torch

from ponder.decoding.beam import BeamSearch
from ponder.decoding.controlled import DoLa, LayerContrastLM
from ponder.decoding.generate import Greedy
from ponder.decoding.common_adapters import SettingError
from ponder.decoding.token_search import BestFirstSearch, ContrastiveSearch, SearchNode

PROMPT = "Q: 3+4-2+7\n"


def test_contrastive_search_without_penalty_is_greedy(arith_lm):
    g = Greedy(arith_lm, max_tokens=40).generate(PROMPT)[0]
    c = ContrastiveSearch(arith_lm, penalty_alpha=0.0, max_tokens=40).generate(PROMPT)[0]
    assert c.token_ids == g.token_ids


def test_contrastive_search_first_step_by_hand(arith_lm):
    """The first token maximises (1-a) p(v) - a max_j cos(h_v, h_j), computed directly
    with full forward passes (no cache)."""
    ids = arith_lm.encode(PROMPT)
    k, a = 4, 0.6
    with torch.no_grad():
        logits, hidden = arith_lm.forward(torch.tensor([ids]), None, output_hidden_states=True)
        p = logits[0, -1].softmax(-1)
        top_p, top_ids = torch.topk(p, k)
        ctx = torch.nn.functional.normalize(hidden[-1][0], dim=-1)
        scores = []
        for v in top_ids.tolist():
            _, h = arith_lm.forward(torch.tensor([ids + [v]]), None, output_hidden_states=True)
            hv = torch.nn.functional.normalize(h[-1][0, -1], dim=-1)
            scores.append((1 - a) * p[v].item() - a * (ctx @ hv).max().item())
    want = top_ids[int(torch.tensor(scores).argmax())].item()
    got = ContrastiveSearch(arith_lm, top_k=k, penalty_alpha=a, max_tokens=1).generate(PROMPT)[0]
    assert got.token_ids == [want]


def test_dola_scores_match_the_formula(arith_lm):
    ids = arith_lm.encode(PROMPT)
    dola = LayerContrastLM(arith_lm, layers=[0, 1, 2], alpha=0.1)
    got, _ = dola.prefill([ids])
    m = arith_lm.model
    with torch.no_grad():
        _, hidden = arith_lm.forward(torch.tensor([ids]), None, output_hidden_states=True)
        final = m.logits(hidden[-1][0, -1]).log_softmax(-1)
        best, best_jsd = None, -1.0
        for j in [0, 1, 2]:
            q = m.logits(m.norm(hidden[j][0, -1])).log_softmax(-1)
            mid = 0.5 * (final.exp() + q.exp())
            jsd = 0.5 * ((final.exp() * (final - mid.log())).sum() + (q.exp() * (q - mid.log())).sum()).item()
            if jsd > best_jsd:
                best, best_jsd = q, jsd
        plausible = final >= final.max() + math.log(0.1)
        want = torch.where(plausible, final - best, torch.tensor(float("-inf")))
    assert torch.equal(torch.isfinite(got[0]), torch.isfinite(want))
    fin = torch.isfinite(want)
    assert (got[0][fin] - want[fin]).abs().max().item() < 1e-4
    out = DoLa(arith_lm, max_tokens=40).generate(PROMPT)[0]
    assert out.finish_reason == "stop" and "Answer" in out.text
    with pytest.raises(SettingError, match="dola layers"):
        LayerContrastLM(arith_lm, layers=[99])


def test_best_first_finds_a_sequence_at_least_as_likely_as_beam_search(arith_lm):
    for prompt in [PROMPT, "Q: 9-8+1-6-5\n"]:
        bf = BestFirstSearch(arith_lm, expand=3, max_expansions=400, max_tokens=40).generate(prompt, n=2)
        beam = BeamSearch(arith_lm, num_beams=4, length_penalty=0.0, max_tokens=40).generate(prompt)[0]
        assert bf[0].finish_reason == "stop"
        assert sum(bf[0].logprobs) >= sum(beam.logprobs) - 1e-5
        assert bf[0].score >= bf[1].score  # popped in order of the heuristic
        assert bf[0].usage.model_calls > 1 and bf[1].usage.model_calls == 0


def test_best_first_takes_a_pluggable_heuristic(arith_lm):
    seen = []

    def prefer_short_lines(node: SearchNode) -> float:
        seen.append(node.text)
        return node.logprob - 0.5 * node.text.count("\n")

    out = BestFirstSearch(arith_lm, heuristic=prefer_short_lines, max_expansions=200, max_tokens=30).generate(PROMPT)[0]
    assert seen and out.score is not None
    plain = BestFirstSearch(arith_lm, max_expansions=200, max_tokens=30).generate(PROMPT)[0]
    la = BestFirstSearch(arith_lm, lookahead=2, max_expansions=200, max_tokens=30).generate(PROMPT)[0]
    # rollouts are billed: each scored child costs its 2-token lookahead on top
    assert la.usage.computed_tokens > plain.usage.computed_tokens + 2 * plain.usage.generated_tokens
    assert la.usage.model_calls > plain.usage.model_calls
    with pytest.raises(SettingError, match="expand"):
        BestFirstSearch(arith_lm, expand=0)
    short = BestFirstSearch(arith_lm, max_expansions=1, max_tokens=30).generate(PROMPT, n=2)
    assert len(short) == 2 and all(g.finish_reason == "length" and g.meta["complete"] is False for g in short)
    assert short[0].score >= short[1].score  # the best partial sequences, nothing lost
