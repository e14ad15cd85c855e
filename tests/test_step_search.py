"""Step-level search: hand-checked logic on a scripted text-only policy and scorer, the
tree as JSON, and end to end on the shipped models (PRM and exact step checker)."""

from __future__ import annotations

import asyncio
import json

import pytest

from ponder.errors import SettingError
from ponder.meta.search.base import tree_nodes
from ponder.meta.search.beam import PRMBeamSearch
from ponder.meta.search.dvts import DVTS
from ponder.meta.search.lookahead import LookaheadSearch
from ponder.meta.search.mcts import MCTS
from ponder.meta.search.tot import TreeOfThoughtsBFS, TreeOfThoughtsDFS
from ponder.meta.search.particles import ParticleFilter
from ponder.meta.search.rebase import REBASE, allocate
from ponder.params import SamplingParams
from ponder.protocols import Access
from ponder.scoring.base import Scores
from ponder.tasks.arith import ArithTask
from ponder.types import Generation, Usage

TASK = ArithTask()
# the scripted world: from each path, the steps the policy may write next (in turn)
STEPS = {
    "": ["a\n", "b\n", "c\n"],
    "a\n": ["a1\n", "a2\n"], "b\n": ["b1\n", "Answer: B\n"], "c\n": ["Answer: C\n"],
    "a\na1\n": ["Answer: A1\n"], "a\na2\n": ["Answer: A2\n"], "b\nb1\n": ["Answer: B1\n"],
}
VALUE = {"a\n": 0.9, "b\n": 0.5, "c\n": 0.1, "a1\n": 0.3, "a2\n": 0.8, "b1\n": 0.6, "Answer: B\n": 0.4,
         "Answer: C\n": 0.2, "Answer: A1\n": 0.3, "Answer: A2\n": 0.95, "Answer: B1\n": 0.7}


class Policy:
    """A text-only backend that writes the scripted steps, stopping at the delimiter."""

    name = "scripted"
    access = Access.TEXT

    def __init__(self):
        self.requests = 0

    async def generate(self, prompts, params):
        self.requests += 1
        out = []
        for p in prompts:
            path = p.split("\n", 1)[1]  # after the question line
            options = STEPS[path]
            gens = []
            for j in range(params.n):
                step = options[(j + params.seed) % len(options)]
                gens.append(Generation(text=step.rstrip("\n"), token_ids=[1], finish_reason="stop", stop="\n",
                                       usage=Usage(generated_tokens=1, wall_s=0.01)))
            out.append(gens)
        return out


class StepValues:
    name = "values"

    def score_steps(self, prompt, completions):
        steps = [[VALUE[s + "\n"] for s in c.split("\n") if s] for c in completions]
        return Scores([s[-1] for s in steps], Usage(model_calls=len(completions)), steps)


def test_prm_beam_keeps_the_best_paths():
    pol = Policy()
    g = PRMBeamSearch(pol, StepValues(), n=4, beam_width=2).generate("Q: x\n", seed=0)[0]
    # depth 1: a b c a (n=4); keep the 2 best open (a, a) -> each expands into a1, a2
    # depth 2: a1 a2 a1 a2 -> keep a2 a2 -> Answer: A2 twice: 2 finished ... until 4 finished
    assert g.text == "a\na2\nAnswer: A2\n" and g.score == pytest.approx(0.95)
    tree = json.loads(json.dumps(g.meta["tree"]))  # the trace is JSON
    assert [c["step"] for c in tree["children"]] == ["a\n", "b\n", "c\n", "a\n"]
    assert g.usage.generated_tokens == g.meta["nodes"] and g.usage.model_calls > 0


def test_dvts_subtrees_are_independent_greedy_beams():
    g = DVTS(Policy(), StepValues(), n=4, beam_width=2).generate("Q: x\n", seed=0)[0]
    tree = g.meta["tree"]
    assert g.meta["subtrees"] == 2 and [c["step"] for c in tree["children"]] == ["a\n", "b\n"]
    # subtree a: a1 (0.3) vs a2 (0.8) -> a2 -> Answer: A2; subtree b: b1 (0.6) vs Answer: B (0.4) -> b1 -> Answer: B1
    assert g.text == "a\na2\nAnswer: A2\n"
    b = tree["children"][1]
    kids = {c["step"]: c for c in b["children"]}
    assert set(kids) == {"b1\n", "Answer: B\n"} and kids["b1\n"]["children"] and not kids["Answer: B\n"]["children"]


def test_rebase_allocates_the_budget_by_softmax_of_scores():
    assert allocate([0.9, 0.5, 0.1], 10, 0.1) == [10, 0, 0]
    assert allocate([0.5, 0.5], 3, 1.0) == [2, 1] and sum(allocate([0.3, 0.2, 0.9, 0.1], 7, 0.5)) == 7
    g = REBASE(Policy(), StepValues(), n=3, temperature=0.1).generate("Q: x\n", seed=0)[0]
    assert g.text == "a\na2\nAnswer: A2\n"
    w = REBASE(Policy(), StepValues(), n=3, select="weighted", extract=lambda t: t.split()[-1]).generate("Q: x\n", seed=0)[0]
    assert w.text.endswith("Answer: A2\n")


def test_mcts_finds_the_best_valued_path_and_counts_visits():
    g = MCTS(Policy(), StepValues(), iterations=40, width=3, c=0.5).generate("Q: x\n", seed=0)[0]
    assert g.text == "a\na2\nAnswer: A2\n"
    tree = g.meta["tree"]
    assert sum(c["visits"] for c in tree["children"]) == 40  # every iteration backed up through one child
    a = next(c for c in tree["children"] if c["step"] == "a\n")
    assert a["visits"] == max(c["visits"] for c in tree["children"])  # the best first step is visited most
    with pytest.raises(SettingError, match="needs rollout_scorer"):
        MCTS(Policy(), StepValues(), value="rollout")
    with pytest.raises(SettingError, match="value must be one of prm, rollout, both"):
        MCTS(Policy(), StepValues(), value="mean")


def test_particle_filter_resamples_towards_high_values():
    g = ParticleFilter(Policy(), StepValues(), n=6, temperature=0.05).generate("Q: x\n", seed=0)[0]
    assert g.text == "a\na2\nAnswer: A2\n"
    tree = g.meta["tree"]
    a = [c for c in tree["children"] if c["step"] == "a\n"]
    rest = [c for c in tree["children"] if c["step"] != "a\n"]
    # all six particles went on from the best first step; the weak first steps died out
    assert sum(len(c["children"]) for c in a) == 6 and not any(c["children"] for c in rest)


def test_lookahead_values_a_step_by_where_its_greedy_rollout_ends():
    pol = Policy()
    g = LookaheadSearch(pol, StepValues(), n=3, beam_width=3, lookahead=1).generate("Q: x\n", seed=0)[0]
    first = {c["step"]: c for c in g.meta["tree"]["children"]}
    # the scripted greedy rollout writes each path's first option: a -> a1 (0.3), b -> b1 (0.6); c -> Answer: C (0.2)
    assert first["a\n"]["score"] == pytest.approx(0.3) and first["b\n"]["score"] == pytest.approx(0.6)
    assert first["c\n"]["score"] == pytest.approx(0.2)
    # the rollouts' tokens are billed to the nodes they valued, though their steps are not in the tree
    assert first["a\n"]["usage"]["generated_tokens"] > 1
    with pytest.raises(SettingError, match="lookahead must be an integer >= 0"):
        LookaheadSearch(pol, StepValues(), lookahead=-1)


def test_tree_of_thoughts_bfs_and_dfs():
    g = TreeOfThoughtsBFS(Policy(), StepValues(), breadth=2, k=2).generate("Q: x\n", seed=0)[0]
    assert g.text == "a\na2\nAnswer: A2\n"
    d = TreeOfThoughtsDFS(Policy(), StepValues(), k=3, threshold=0.5).generate("Q: x\n", seed=0)[0]
    assert d.text == "a\na2\nAnswer: A2\n" and d.meta["found"] is True
    assert d.meta["expansions"] == 3  # root, a, a2: the best-first dive, no backtracking needed
    e = TreeOfThoughtsDFS(Policy(), StepValues(), k=3, threshold=0.99).generate("Q: x\n", seed=0)[0]
    assert e.meta["found"] is False  # nothing clears the bar: every state pruned, the best seen returned
    with pytest.raises(SettingError, match="breadth must be an integer >= 1"):
        TreeOfThoughtsBFS(Policy(), StepValues(), breadth=0)


def test_bad_search_settings():
    with pytest.raises(SettingError, match="beam_width must be an integer >= 1"):
        PRMBeamSearch(Policy(), StepValues(), beam_width=0)
    with pytest.raises(SettingError, match="beam_width must be <= n"):
        DVTS(Policy(), StepValues(), n=2, beam_width=4)
    with pytest.raises(SettingError, match="scorer must have score_steps"):
        PRMBeamSearch(Policy(), None)
    with pytest.raises(SettingError, match="temperature"):
        REBASE(Policy(), StepValues(), temperature=0)
    with pytest.raises(SettingError, match="max_depth"):
        REBASE(Policy(), StepValues(), max_depth=0)


def test_a_step_budget_below_one_step_is_named(arith_lm):
    from ponder.scoring.verifiers import StepVerifier

    search = PRMBeamSearch(arith_lm, StepVerifier(TASK), n=4, beam_width=2,
                           params=SamplingParams(temperature=0.8, max_tokens=2))
    with pytest.raises(SettingError, match="max_tokens=2 is below one step"):
        search.generate(TASK.prompt(TASK.problems("hard", 1)[0]), seed=0)


@pytest.mark.parametrize("algo", [PRMBeamSearch, DVTS, REBASE, ParticleFilter, LookaheadSearch])
def test_search_on_the_shipped_models_with_a_prm(arith_lm, algo):
    from ponder.engine.engines import engine_for
    from ponder.scoring.reward import RewardModel
    from ponder.scoring.verifiers import StepVerifier

    problems = TASK.problems("hard", 4)
    params = SamplingParams(temperature=0.8, max_tokens=24)
    search = algo(arith_lm, RewardModel.from_pretrained("arith-reward").prm("last"), n=8, params=params)
    outs = search.generate_batch([TASK.prompt(p) for p in problems], seed=1)
    again = search.generate_batch([TASK.prompt(p) for p in problems], seed=1)
    assert [o[0].text for o in outs] == [o[0].text for o in again]  # seeded: the same trees
    for p, (g,) in zip(problems, outs):
        assert TASK.extract_answer(g.text) is not None and g.meta["nodes"] >= 8
        # the tree's steps were prefilled mostly from the prefix cache: computed << requested
        requested = sum(n["usage"]["prompt_tokens"] + n["usage"]["generated_tokens"] for n in tree_nodes(g.meta["tree"]))
        computed = sum(n["usage"]["computed_tokens"] for n in tree_nodes(g.meta["tree"]))
        assert computed < 0.5 * requested, (computed, requested)
    # with the exact step checker as the scorer, the search finds right answers
    exact = algo(arith_lm, StepVerifier(TASK), n=8, params=params)
    right = sum(TASK.check_answer(p, g[0].text) for p, g in zip(problems, exact.generate_batch(
        [TASK.prompt(p) for p in problems], seed=1)))
    assert right >= 3



def test_mcts_on_the_shipped_models_with_a_rollout_verifier(arith_lm):
    from ponder.scoring.reward import RewardModel
    from ponder.scoring.verifiers import AnswerVerifier

    problems = TASK.problems("hard", 3)
    search = MCTS(arith_lm, RewardModel.from_pretrained("arith-reward").prm(), iterations=12, width=2, value="both",
                  rollout_scorer=AnswerVerifier(TASK), params=SamplingParams(temperature=0.8, max_tokens=24))
    outs = search.generate_batch([TASK.prompt(p) for p in problems], seed=2)
    for p, (g,) in zip(problems, outs):
        assert TASK.extract_answer(g.text) is not None
        # the rollouts are in the tree, on the nodes they valued: the tree holds every token billed
        nodes = list(tree_nodes(g.meta["tree"]))
        assert g.usage.generated_tokens == sum(n["usage"]["generated_tokens"] for n in nodes)
        rolled = [r for n in nodes for r in n.get("rollouts", [])]
        assert rolled and all(r["generated_tokens"] > 0 and r["text"] for r in rolled)
    assert sum(TASK.check_answer(p, g[0].text) for p, g in zip(problems, outs)) >= 2


def test_mcts_defaults_answer_hard_problems_and_say_when_no_path_finished(arith_lm):
    """With a reward model, MCTS values nodes by PRM and rollout by default (a PRM-only
    tree answered 5.5% of hard problems at 16 iterations); a PRM-only tree that finishes
    no path says so in its result."""
    from ponder import strategies
    from ponder.scoring.reward import RewardModel

    rm = RewardModel.from_pretrained("arith-reward")
    problems = TASK.problems("hard", 8)
    gen = strategies.build("mcts", arith_lm, SamplingParams(temperature=0.7), {}, strategies.Context(TASK, rm))
    assert gen.value == "both"
    outs = gen.generate_batch([TASK.prompt(p) for p in problems], seed=0)
    assert all(TASK.extract_answer(o[0].text) is not None for o in outs)
    assert sum(TASK.check_answer(p, o[0].text) for p, o in zip(problems, outs)) >= 5
    prm_only = strategies.build("mcts", arith_lm, SamplingParams(temperature=0.7), {"value": "prm", "iterations": 3},
                                strategies.Context(TASK, rm))
    (g,), = prm_only.generate_batch([TASK.prompt(problems[0])], seed=0)
    assert g.finish_reason == "length" and "no path reached an answer" in g.meta["no_finished_path"]


def test_a_search_calls_bills_sum_to_its_elapsed_time(arith_lm):
    """Concurrent searches overlap (scoring on one thread, the engine on another): the
    call's bills are scaled to its elapsed time instead of counting overlaps twice."""
    import time

    from ponder.scoring.reward import RewardModel

    prompts = [TASK.prompt(p) for p in TASK.problems("hard", 6)]
    search = DVTS(arith_lm, RewardModel.from_pretrained("arith-reward").prm(), n=4, beam_width=2,
                  params=SamplingParams(temperature=0.8, max_tokens=24))
    t = time.perf_counter()
    outs = search.generate_batch(prompts, seed=3)
    elapsed = time.perf_counter() - t
    assert sum(g[0].usage.wall_s for g in outs) == pytest.approx(elapsed, rel=0.05)


def test_tree_of_thoughts_on_the_shipped_models(arith_lm):
    from ponder.scoring.reward import RewardModel
    from ponder.scoring.verifiers import StepVerifier

    problems = TASK.problems("hard", 4)
    prompts = [TASK.prompt(p) for p in problems]
    params = SamplingParams(temperature=0.8, max_tokens=24)
    prm = RewardModel.from_pretrained("arith-reward").prm("last")
    bfs = TreeOfThoughtsBFS(arith_lm, prm, breadth=2, k=3, params=params)
    outs = bfs.generate_batch(prompts, seed=4)
    assert [o[0].text for o in outs] == [o[0].text for o in bfs.generate_batch(prompts, seed=4)]  # seeded
    for (g,) in outs:
        assert TASK.extract_answer(g.text) is not None and g.meta["nodes"] >= 6
        requested = sum(n["usage"]["prompt_tokens"] + n["usage"]["generated_tokens"] for n in tree_nodes(g.meta["tree"]))
        computed = sum(n["usage"]["computed_tokens"] for n in tree_nodes(g.meta["tree"]))
        assert computed < 0.5 * requested, (computed, requested)
    # depth first with the exact step checker: it prunes every wrong step, so what it finds is right
    # (the checker does not read the answer line itself, hence "nearly")
    dfs = TreeOfThoughtsDFS(arith_lm, StepVerifier(TASK), k=3, threshold=0.5, max_expansions=24, params=params)
    outs = dfs.generate_batch(prompts, seed=4)
    found = [g.meta["found"] for (g,) in outs]
    right = [TASK.check_answer(p, g.text) for p, (g,) in zip(problems, outs)]
    assert sum(found) >= 3 and sum(f and r for f, r in zip(found, right)) >= sum(found) - 1
    assert all(g.meta["expansions"] <= 24 for (g,) in outs)


def test_reward_guided_speculative_decoding_rewrites_only_low_scored_draft_steps():
    """RSD (Liao et al. 2025): the draft writes each step; a step scored below the
    threshold is written again by the target; bills add both models' tokens."""
    from ponder.meta.search.rsd import RewardGuidedSpeculative

    class Fixed:  # always the first scripted option (draft) or the best-valued one (target)
        name, access = "fixed", Access.TEXT

        def __init__(self, pick, tokens):
            self.pick, self.tokens, self.calls = pick, tokens, 0

        async def generate(self, prompts, params):
            self.calls += 1
            path = prompts[0].split("\n", 1)[1]
            step = self.pick(STEPS[path])
            return [[Generation(text=step.rstrip("\n"), token_ids=[1] * self.tokens, finish_reason="stop", stop="\n",
                                usage=Usage(generated_tokens=self.tokens))]]

    draft = Fixed(lambda opts: opts[-1], 1)  # c, then Answer: C (0.1, 0.2)
    target = Fixed(lambda opts: max(opts, key=lambda s: VALUE[s]), 10)  # a, a2, Answer: A2
    rsd = RewardGuidedSpeculative(target, StepValues(), draft, threshold=0.5, params=SamplingParams(temperature=0.7))
    (g,) = rsd.generate("Q: ?\n", seed=0)
    # every draft step scored < 0.5 except a2's ... the draft writes "c" (0.1): rewritten to "a" (0.9);
    # from "a" the draft writes "a2" (0.8): kept; then "Answer: A2" (0.95): kept
    assert g.text == "a\na2\nAnswer: A2\n" and g.meta["rewritten"] == 1 and g.meta["accepted"] == 2
    assert target.calls == 1 and draft.calls == 3
    assert g.usage.generated_tokens == 3 * 1 + 1 * 10  # three draft steps, one target step
    tree = g.meta["tree"]
    assert tree["children"][0]["step"] == "a\n" and tree["children"][0]["drafts"][0]["step"] == "c\n"
    with pytest.raises(SettingError, match="threshold"):
        RewardGuidedSpeculative(target, StepValues(), draft, threshold=2)


def test_a_search_is_billed_the_same_alone_batched_and_again(arith_lm):
    """PRM beam search's computed tokens varied by up to 4% between identical runs (issue
    24): concurrent problems reused each other's first prompt tokens in an order the
    threads decided, and the scorer split a search's paths across batches by arrival.
    Now a problem's bill is the same run again, alone, or among others."""
    from ponder import strategies
    from ponder.scoring.reward import RewardModel
    from ponder.sweep.run import fresh_caches

    rm = RewardModel.from_pretrained("arith-reward")
    prompts = [TASK.prompt(p) for p in TASK.problems("hard", 6)]
    gen = strategies.build("prm-beam", arith_lm, SamplingParams(temperature=0.7), {"samples": 4},
                           strategies.Context(TASK, rm))

    def bills(groups):
        out = []
        for group in groups:
            fresh_caches(rm)
            out += [(o[0].text, o[0].usage.computed_tokens, o[0].usage.flops) for o in gen.generate_batch(group, seed=0)]
        return out

    together = bills([prompts])
    assert bills([prompts]) == together
    assert bills([[p] for p in prompts]) == together


def test_speculative_rejection_stops_the_lowest_scored_paths_at_its_checkpoint():
    """Speculative Rejection (Sun et al. 2024): N paths; after the first step the
    ``reject`` fraction scored lowest stop for good; the rest run to the end, unscored
    until they finish. The bill is every step written plus every scoring pass."""
    from ponder.meta.search.speculative_rejection import SpeculativeRejection

    pol = Policy()
    sr = SpeculativeRejection(pol, StepValues(), n=4, reject=0.5, checkpoints=1)
    (g,) = sr.generate("Q: x\n", seed=0)
    tree = g.meta["tree"]
    first = [(c["step"], c["finish"], len(c["children"])) for c in tree["children"]]
    # first steps a b c a (0.9 0.5 0.1 0.9): half stop, c and b; the two a's go on
    assert first == [("a\n", "delimiter", 1), ("b\n", "rejected", 0), ("c\n", "rejected", 0), ("a\n", "delimiter", 1)]
    assert g.meta["rejected"] == [{"depth": 1, "stopped": 2, "below": 0.5}]
    # the survivors: a -> a1 -> Answer: A1 (0.3), a -> a2 -> Answer: A2 (0.95)
    assert g.text == "a\na2\nAnswer: A2\n" and g.score == pytest.approx(0.95) and g.meta["finished"] == 2
    assert g.usage.generated_tokens == 4 + 2 + 2 == g.meta["nodes"]
    # scored: the 4 first steps at the checkpoint, then only the 2 finished paths (not a1, a2)
    assert g.usage.model_calls == 4 + 2
    # rejecting nothing is best-of-N over the same paths: all four finish
    (full,) = SpeculativeRejection(Policy(), StepValues(), n=4, reject=0.0).generate("Q: x\n", seed=0)
    assert full.meta["finished"] == 4 and full.meta["rejected"] == []
    assert full.usage.generated_tokens > g.usage.generated_tokens


def test_speculative_rejection_settings_and_weighted_selection():
    from ponder.meta.search.speculative_rejection import SpeculativeRejection

    for bad in ({"reject": 1.0}, {"reject": -0.1}, {"n": 0}, {"checkpoints": 0}, {"keep_min": 5},
                {"select": "vote"}, {"select": "weighted"}):
        with pytest.raises(SettingError):
            SpeculativeRejection(Policy(), StepValues(), **{"n": 4, **bad})
    sr = SpeculativeRejection(Policy(), StepValues(), n=4, reject=0.75, keep_min=2)
    (g,) = sr.generate("Q: x\n", seed=0)
    assert g.meta["rejected"][0]["stopped"] == 2  # 3 of 4 would go, but 2 must stay
    # weighted: the answers' summed final scores decide (A2 0.95 against A1 0.3)
    w = SpeculativeRejection(Policy(), StepValues(), n=4, reject=0.5, select="weighted",
                             extract_answer=TASK.extract_answer)
    assert w.generate("Q: x\n", seed=0)[0].text == "a\na2\nAnswer: A2\n"


def test_speculative_rejection_on_the_shipped_models(arith_lm):
    """On the shipped models: seeded runs reproduce alone and batched, a rejected path
    writes no step after its checkpoint, and the tree's tokens are the bill's."""
    from ponder import strategies
    from ponder.scoring.reward import RewardModel

    rm = RewardModel.from_pretrained("arith-reward")
    probs = TASK.problems("hard", 6)
    prompts = [TASK.prompt(p) for p in probs]
    gen = strategies.build("speculative-rejection", arith_lm, SamplingParams(temperature=0.7, max_tokens=64),
                           {"samples": 8, "reject": 0.5, "checkpoints": 2}, strategies.Context(TASK, rm))
    batched = [o[0] for o in gen.generate_batch(prompts, seed=0)]
    alone = [gen.generate(p, seed=0)[0] for p in prompts]
    assert [g.text for g in batched] == [g.text for g in alone]
    assert [g.usage.generated_tokens for g in batched] == [g.usage.generated_tokens for g in alone]
    for g in batched:
        nodes = tree_nodes(g.meta["tree"])
        rejected = [n for n in nodes if n["finish"] == "rejected"]
        assert len(rejected) == sum(r["stopped"] for r in g.meta["rejected"]) > 0
        assert all(not n["children"] and n["depth"] <= 2 for n in rejected)
        assert sum(n["usage"]["generated_tokens"] for n in nodes) == g.usage.generated_tokens
    assert sum(TASK.check_answer(p, g.text) for p, g in zip(probs, batched)) >= 3


def test_step_level_rejection_and_votes_over_it_on_the_shipped_models(arith_lm):
    """Step-level rejection sampling is a ToT-DFS setting (one proposal a state, a step
    valued below refine_threshold redrawn in place, at most ``refine`` times); a vote over
    such searches is composed by the registry (majority over=tot-dfs). The vote counts
    exactly the searches run by hand at the same seeds, and bills their sum; every kept
    step clears the bar or spent all its redraws; and the compute-optimal probe, a search
    of the same kind, is the first vote of an adaptive vote over searches, not paid twice."""
    from ponder import strategies
    from ponder.meta.parallel import majority_index
    from ponder.scoring.reward import RewardModel

    ctx = strategies.Context(task=TASK, reward_model=RewardModel.from_pretrained("arith-reward"))
    params = SamplingParams(temperature=0.7, max_tokens=160)
    steps = {"k": 1, "refine": 3, "refine_threshold": 0.95}
    over = {"over": "tot-dfs", **{f"over.{k}": v for k, v in steps.items()}}
    vote = strategies.build("majority", arith_lm, params, {"samples": 3, **over}, ctx)
    alone = strategies.build("tot-dfs", arith_lm, params, dict(steps), ctx)
    for problem in TASK.problems("expert", 3, split="test"):
        prompt = TASK.prompt(problem)
        (g,) = vote.generate(prompt, seed=3)
        by_hand = alone.generate(prompt, n=3, seed=3)
        assert [t.text for t in g.trace] == [s.text for s in by_hand]
        assert g.text == by_hand[majority_index([TASK.extract_answer(s.text) for s in by_hand])].text
        assert g.usage.generated_tokens == sum(s.usage.generated_tokens for s in by_hand)
        for s in by_hand:
            kept = tree_nodes(s.meta["tree"])[1:]
            assert kept and all(n["score"] >= 0.95 or len(n["drafts"]) == 3 for n in kept)
            redrawn = sum(len(n["drafts"]) for n in kept)
            assert s.meta["nodes"] == len(kept) and len(kept) + redrawn >= s.meta["expansions"]
    co = strategies.build("compute-optimal", arith_lm, params, {
        "probe": 1, "difficulty": "reward", "probe_with": "tot-dfs", **{f"probe_with.{k}": v for k, v in steps.items()},
        "policy": "1:adaptive-majority", "adaptive-majority.samples": 3, "adaptive-majority.batch": 1,
        **{f"adaptive-majority.{k}": v for k, v in over.items()}}, ctx)
    (g,) = co.generate(TASK.prompt(TASK.problems("expert", 1, split="test")[0]), seed=5)
    probe, voted = g.trace[0], g.trace[-1]
    assert g.meta["chose"] == "adaptive-majority" and 1 <= voted.meta["samples_drawn"] <= 3
    assert voted.trace[0].text == probe.text  # the probe is the first vote
    assert g.usage.generated_tokens == sum(t.usage.generated_tokens for t in voted.trace)
