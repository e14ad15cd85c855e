"""The three access levels: NativeLM implements all of them; algorithms refuse a
backend below the level they need, naming it."""

from __future__ import annotations

import asyncio
import math

import pytest
import torch

from ponder.decoding.beam import BeamSearch
from ponder.decoding.generate import Greedy, Sample
from ponder.params import SamplingParams
from ponder.protocols import Access, AccessError, Cache, LogitsLM, LogprobsLM, TextLM, require_access
from ponder.types import Generation


class TextOnly:
    """A scripted text-only backend (what a chat API without logprobs gives)."""

    name = "scripted"
    access = Access.TEXT

    async def generate(self, prompts, params):
        return [[Generation(text=f"{p}!", token_ids=[]) for _ in range(params.n)] for p in prompts]


def test_native_lm_is_every_level(arith_lm):
    assert isinstance(arith_lm, TextLM) and isinstance(arith_lm, LogprobsLM) and isinstance(arith_lm, LogitsLM)
    assert isinstance(arith_lm.new_cache(1, 8), Cache)
    for level in Access:
        require_access(arith_lm, level, "anything")


def test_text_only_backend_is_refused_by_logits_algorithms():
    lm = TextOnly()
    assert isinstance(lm, TextLM) and not isinstance(lm, LogitsLM)
    require_access(lm, Access.TEXT, "majority vote")
    for make, name in ((lambda: Greedy(lm), "Greedy"), (lambda: BeamSearch(lm), "beam search")):
        with pytest.raises(AccessError, match=f"{name} needs logits access, but model 'scripted' only gives text"):
            make()


def test_a_backend_claiming_a_level_it_lacks_is_named():
    class Liar(TextOnly):
        access = Access.LOGITS

    with pytest.raises(AccessError, match="lacks .*prefill.* of the LogitsLM protocol"):
        require_access(Liar(), Access.LOGITS, "beam search")


def test_generate_with_params_equals_the_generators(arith_lm):
    prompts = ["Q: 3+4-2\n", "Q: 9-8+7\n"]
    greedy = asyncio.run(arith_lm.generate(prompts, SamplingParams(temperature=0, max_tokens=40)))
    assert [g[0].text for g in greedy] == [Greedy(arith_lm, max_tokens=40).generate(p)[0].text for p in prompts]
    params = SamplingParams(temperature=0.8, top_p=0.9, n=3, seed=5, max_tokens=40, stop=("Answer",))
    sampled = asyncio.run(arith_lm.generate(prompts, params))
    want = Sample(arith_lm, temperature=0.8, top_p=0.9, max_tokens=40, stop=["Answer"]).generate_batch(prompts, 3, 5)
    assert [[g.token_ids for g in gs] for gs in sampled] == [[g.token_ids for g in gs] for gs in want]
    assert all(len(gs) == 3 and all("Answer" not in g.text for g in gs) for gs in sampled)


def test_top_logprobs_are_the_models_own(arith_lm):
    (g,), = asyncio.run(arith_lm.generate(["Q: 3+4\n"], SamplingParams(temperature=0, max_tokens=6, logprobs=3)))
    assert len(g.top_logprobs) == len(g.token_ids)
    ids = arith_lm.encode("Q: 3+4\n")
    for t, (tok, top) in enumerate(zip(g.token_ids, g.top_logprobs)):
        lp = arith_lm.forward(torch.tensor([ids + g.token_ids[:t]]), None)[0, -1].log_softmax(-1)
        want = dict(zip(*[x.tolist() for x in reversed(lp.topk(3))]))
        assert set(top) == set(want) and all(math.isclose(top[k], want[k], abs_tol=1e-4) for k in top)
        assert tok == max(top, key=top.get)  # greedy picked the most likely
        assert g.logprobs[t] == pytest.approx(top[tok], abs=1e-5)


def test_score_gives_each_continuation_tokens_logprob(arith_lm):
    prompt = "Q: 3+4\n"
    text = Greedy(arith_lm, max_tokens=20).generate(prompt)[0]
    (scored, empty) = asyncio.run(arith_lm.score(prompt, [text.text, ""]))
    assert empty == []
    assert scored[: len(text.logprobs) - 1] == pytest.approx(text.logprobs[:-1], abs=1e-4)  # the EOS is not in text


def test_every_strategy_reports_its_registry_name(arith_lm):
    """One name everywhere: the registry, Generation.meta["strategy"] and results."""
    from ponder import strategies
    from ponder.scoring.reward import RewardModel
    from ponder.tasks.arith import ArithTask

    ctx = strategies.Context(task=ArithTask(), reward_model=RewardModel.from_pretrained("arith-reward"))
    own = {"majority": {"samples": 2}, "best-of-n": {"samples": 2}, "product": {"models": "arith-draft"},
           "weighted-majority": {"samples": 2}, "mbr": {"samples": 2}, "rejection": {"samples": 2},
           "oracle": {"samples": 2}, "usc": {"samples": 2}, "prm-beam": {"samples": 2, "beam_width": 2},
           "dvts": {"samples": 2, "beam_width": 2}, "rebase": {"samples": 2}, "particles": {"samples": 2},
           "mcts": {"iterations": 3}, "lookahead": {"samples": 2, "beam_width": 2, "lookahead": 1},
           "tot-bfs": {"breadth": 1, "k": 2}, "tot-dfs": {"k": 2, "max_expansions": 3},
           "smc": {"particles": 2}, "best-first": {"max_expansions": 8}}
    for name in strategies.STRATEGIES:
        gen = strategies.build(name, arith_lm, SamplingParams(max_tokens=8), own.get(name, {}), ctx)
        (g,) = gen.generate("Q: 3+4\n", seed=0)
        assert g.meta["strategy"] == name, (name, g.meta)


def test_meta_generators_run_on_a_text_only_backend():
    """Majority vote needs only text from its policy: a scripted text-only backend."""
    from ponder.decoding.text import TextGenerator
    from ponder.meta.parallel import MajorityVote

    class Scripted(TextOnly):
        async def generate(self, prompts, params):
            answers = ["7", "7", "8", "7", "9"]
            return [[Generation(text=f"...\nAnswer: {answers[i % 5]}\n", token_ids=[]) for i in range(params.n)]
                    for _ in prompts]

    extract = lambda text: text.rsplit("Answer: ", 1)[-1].strip() or None  # noqa: E731
    (g,) = MajorityVote(TextGenerator(Scripted()), extract, n=5).generate("Q: 3+4\n", seed=0)
    assert g.meta["votes"] == {"7": 3, "8": 1, "9": 1} and g.text.endswith("Answer: 7\n") and len(g.trace) == 5
    with pytest.raises(Exception, match="seed must be"):
        TextGenerator(Scripted()).generate("x", seed=-1)
