"""Parallel meta-generators and scorers: hand-computed cases on scripted models, and
end to end on the shipped models."""

from __future__ import annotations

import math

import torch

import pytest

from ponder.errors import SettingError
from ponder.meta.parallel import (
    BestOfN, MajorityVote, MinimumBayesRisk, OracleSampling, RejectionSampling, UniversalSelfConsistency,
    WeightedMajorityVote, pass_at_k,
)
from ponder.protocols import GeneratorBase
from ponder.scoring.base import Scores, aggregate
from ponder.scoring.utility import bleu, chrf, edit_similarity, exact_match, utility_named
from ponder.scoring.verifiers import AnswerVerifier, StepVerifier
from ponder.tasks.arith import ArithTask
from ponder.types import Generation, Usage

TASK = ArithTask()


class Queue(GeneratorBase):
    """Hands out scripted samples in order across calls (with their logprobs)."""

    def __init__(self, texts, logprobs=None):
        self.texts, self.logprobs, self.calls = list(texts), logprobs, 0

    async def agenerate(self, prompt, n=1, seed=None):
        self.calls += 1
        out = []
        for _ in range(n):
            i = len(self.texts) - len([t for t in self.texts if t is not None])
            k = next(j for j, t in enumerate(self.texts) if t is not None)
            text, self.texts[k] = self.texts[k], None
            lp = None if self.logprobs is None else self.logprobs[k]
            out.append(Generation(text=text, token_ids=[1, 2], logprobs=lp, usage=Usage(generated_tokens=2, wall_s=0.1)))
        return out


class TableScorer:
    """Scores texts from a table; bills one model call per text."""

    name = "table"

    def __init__(self, table):
        self.table = table

    def score(self, prompt, completions):
        return Scores([self.table[c] for c in completions], Usage(model_calls=len(completions), computed_tokens=10))


def test_aggregations_by_hand():
    s = [0.9, 0.5, 0.8]
    assert aggregate(s, "last") == 0.8 and aggregate(s, "min") == 0.5
    assert aggregate(s, "product") == pytest.approx(0.36) and aggregate(s, "mean") == pytest.approx(2.2 / 3)
    assert aggregate([], "min", empty=0.0) == 0.0
    with pytest.raises(SettingError, match="aggregation must be one of last, min, product, mean"):
        aggregate(s, "max")


def test_pass_at_k_by_hand():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 0, 2) == 0.0 and pass_at_k(3, 3, 1) == 1.0 and pass_at_k(5, 4, 2) == 1.0
    with pytest.raises(SettingError):
        pass_at_k(3, 4, 1)


def test_arith_verifiers_by_hand():
    prompt = "Q: 3+4-2\n"
    good, wrong_step, wrong_answer = "3+4=7\n7-2=5\nAnswer: 5\n", "3+4=8\n8-2=6\nAnswer: 6\n", "3+4=7\n7-2=5\nAnswer: 4\n"
    s = AnswerVerifier(TASK).score(prompt, [good, wrong_step, wrong_answer])
    assert s.values == [1.0, 0.0, 0.0]
    st = StepVerifier(TASK).score_steps(prompt, [good, wrong_step, "3+4=7\n7-3=4\n"])
    assert st.steps == [[1.0, 1.0], [0.0, 0.0], [1.0, 0.0]] and st.values == [1.0, 0.0, 0.0]
    assert StepVerifier(TASK, aggregation="mean").score(prompt, ["3+4=7\n7-3=4\n"]).values == [0.5]
    with pytest.raises(SettingError, match="not an arith prompt"):
        AnswerVerifier(TASK).score("hello", [good])


def test_reward_model_as_orm_and_prm():
    from ponder.scoring.reward import RewardModel

    rm = RewardModel.from_pretrained("arith-reward")
    prompt, texts = "Q: 12+34-5\n", ["12+34=46\n46-5=41\nAnswer: 41\n", "12+34=47\n47-5=42\nAnswer: 42\n"]
    orm = rm.score(prompt, texts)
    assert orm.values == pytest.approx([s for s, _ in rm.score_completions(prompt, texts)])
    assert all(0 <= v <= 1 for v in orm.values) and orm.usage.computed_tokens > 0
    prm = rm.score_steps(prompt, texts)
    assert prm.steps == rm.step_scores(prompt, texts) and len(prm.steps[0]) == 2
    for how in ("last", "min", "product", "mean"):
        assert rm.prm(how).score(prompt, texts).values == pytest.approx([aggregate(s, how) for s in prm.steps])
    with pytest.raises(SettingError):
        rm.prm("median")


def test_utilities_by_hand():
    assert edit_similarity("abc", "abd") == pytest.approx(2 / 3)
    assert bleu("the cat sat on the mat", "the cat sat on the mat") == pytest.approx(1.0)
    assert 0 < chrf("abcdef", "abcxef") < 1
    em = exact_match(TASK.extract_answer)
    assert em("x\nAnswer: 5", "y\nAnswer: 5") == 1.0 and em("Answer: 5", "Answer: 6") == 0.0 and em("?", "?") == 0.0
    assert utility_named("edit") is edit_similarity
    with pytest.raises(SettingError, match="utility must be one of"):
        utility_named("rouge")


def test_weighted_vote_by_reward_and_by_logprob():
    texts = ["Answer: 3", "Answer: 5", "Answer: 5", "Answer: 3", "Answer: 5"]
    table = {"Answer: 3": 0.9, "Answer: 5": 0.2}
    (plain,) = MajorityVote(Queue(texts), TASK.extract_answer, n=5).generate("Q")
    assert plain.text == "Answer: 5"  # 3 votes to 2
    (g,) = WeightedMajorityVote(Queue(texts), TASK.extract_answer, TableScorer(table), n=5).generate("Q")
    assert g.text == "Answer: 3" and g.meta["votes"] == {"3": 1.8, "5": pytest.approx(0.6)}  # 1.8 > 0.6
    assert g.score == pytest.approx(1.8 / 2.4)
    assert g.usage.model_calls == 5 and g.usage.generated_tokens == 10  # the scorer is billed too
    lps = [[-0.1, -0.1], [-2.0, -2.0], [-2.0, -2.0], [-0.1, -0.1], [-2.0, -2.0]]
    (h,) = WeightedMajorityVote(Queue(texts, lps), TASK.extract_answer, n=5, weight="logprob").generate("Q")
    assert h.text == "Answer: 3" and h.meta["votes"]["3"] == pytest.approx(2 * math.exp(-0.1))
    with pytest.raises(SettingError, match="weight must be one of reward, logprob"):
        WeightedMajorityVote(Queue(texts), TASK.extract_answer, TableScorer(table), weight="votes")
    with pytest.raises(SettingError, match="scorer must have score"):
        WeightedMajorityVote(Queue(texts), TASK.extract_answer, None)


def test_majority_normaliser_merges_equivalent_answers():
    texts = ["A: 1,000", "A: 1000", "A: 999"]
    (g,) = MajorityVote(Queue(texts), lambda t: t[3:], n=3, normalize=lambda a: a.replace(",", "")).generate("Q")
    assert g.meta["votes"] == {"1000": 2, "999": 1} and g.text == "A: 1,000"


def test_mbr_picks_the_highest_mean_utility():
    # exact match on the answer, by hand: samples 1 and 2 agree with one other of three (1/3), 0 and 3 with none
    (g,) = MinimumBayesRisk(Queue(["A: 1", "A: 2", "A: 2", "A: 3"]), exact_match(lambda t: t[3:]), n=4).generate("Q")
    assert g.text == "A: 2" and [t.score for t in g.trace] == pytest.approx([0, 1 / 3, 1 / 3, 0])
    # edit similarity: the mean against the others, as rapidfuzz computes it
    texts = ["the cat sat", "the cat sat down", "a dog ran"]
    (h,) = MinimumBayesRisk(Queue(texts), edit_similarity, n=3).generate("Q")
    mean = [sum(edit_similarity(texts[i], texts[j]) for j in range(3) if j != i) / 2 for i in range(3)]
    assert [t.score for t in h.trace] == pytest.approx(mean) and h.text == texts[mean.index(max(mean))]


def test_rejection_sampling_stops_at_the_first_accepted():
    texts = ["a", "b", "c", "d", "e", "f"]
    gen = Queue(texts)
    (g,) = RejectionSampling(gen, TableScorer({"a": 0.1, "b": 0.2, "c": 0.9, "d": 0.95, "e": 0.0, "f": 0.0}),
                             threshold=0.8, n=6, batch=2).generate("Q")
    assert g.text == "c" and g.meta["samples_drawn"] == 4 and gen.calls == 2  # two batches of two
    (h,) = RejectionSampling(Queue(["a", "b", "c"]), TableScorer({"a": 0.3, "b": 0.5, "c": 0.1}), threshold=0.8,
                             n=3, batch=2).generate("Q")
    assert h.text == "b" and h.meta["verified"] is False and h.meta["samples_drawn"] == 3  # none passed: the best


def test_oracle_sampling_reports_coverage_and_pass_at_k():
    prompt = "Q: 3+4\n"
    texts = ["3+4=8\nAnswer: 8\n", "3+4=6\nAnswer: 6\n", "3+4=7\nAnswer: 7\n", "3+4=7\nAnswer: 7\n"]
    (g,) = OracleSampling(Queue(texts), AnswerVerifier(TASK), n=4, batch=4).generate(prompt)
    assert g.meta["verified"] and g.meta["first_verified"] == 2 and g.text == texts[2]
    assert g.meta["pass_at_k"] == {1: pytest.approx(0.5), 2: pytest.approx(1 - 1 / 6), 4: 1.0}


def test_universal_self_consistency_follows_the_judge():
    class Judge(GeneratorBase):
        seen = []

        async def agenerate(self, prompt, n=1, seed=None):
            self.seen.append(prompt)
            return [Generation(text="The most consistent response is Response 2", token_ids=[1], usage=Usage(generated_tokens=1))]

    judge = Judge()
    (g,) = UniversalSelfConsistency(Queue(["x", "y", "z"]), n=3, judge=judge).generate("Q: what?")
    assert g.text == "y" and g.meta["chosen"] == 1 and "Response 3: z" in judge.seen[0]
    assert g.usage.generated_tokens == 2 * 3 + 1


def test_bad_settings_are_named():
    with pytest.raises(SettingError, match="n \\(samples per problem\\) must be an integer >= 1"):
        BestOfN(Queue([]), TableScorer({}), n=0)
    with pytest.raises(SettingError, match="batch must be"):
        OracleSampling(Queue([]), AnswerVerifier(TASK), batch=0)
    with pytest.raises(SettingError, match="template must contain"):
        UniversalSelfConsistency(Queue([]), template="no slots")


def test_weighted_vote_and_oracle_on_the_shipped_models(arith_lm):
    from ponder.decoding.generate import Sample
    from ponder.scoring.reward import RewardModel

    rm = RewardModel.from_pretrained("arith-reward")
    problems = TASK.problems("hard", 12)
    prompts = [TASK.prompt(p) for p in problems]
    sampler = Sample(arith_lm, temperature=0.7, max_tokens=160)
    wv = WeightedMajorityVote(sampler, TASK.extract_answer, rm, n=8).generate_batch(prompts, seed=0)
    mv = MajorityVote(sampler, TASK.extract_answer, n=8).generate_batch(prompts, seed=0)
    for (w,), (m,) in zip(wv, mv):
        assert [t.token_ids for t in w.trace] == [t.token_ids for t in m.trace]  # the same samples, seeded
        assert w.usage.computed_tokens > m.usage.computed_tokens  # plus the reward model's reading
    oracle = OracleSampling(sampler, AnswerVerifier(TASK), n=16, batch=4).generate_batch(prompts, seed=0)
    covered = sum(o[0].meta["verified"] for o in oracle)
    correct = sum(TASK.check_answer(p, o[0].text) for p, o in zip(problems, oracle))
    assert covered == correct and covered >= 9  # pass@16 on hard is ~96%


def test_prm_scoring_reuses_the_kv_of_earlier_steps():
    """Scoring step k+1 of a path computes only its new tokens; values equal a fresh read."""
    from ponder.scoring.reward import RewardModel

    rm = RewardModel.from_pretrained("arith-reward")
    fresh = RewardModel(rm.model, rm.tokenizer, "fresh", prefix_cache=False)
    prompt = "Q: 3+4-2+8\n"
    paths = ["3+4=7\n", "3+4=7\n7-2=5\n", "3+4=7\n7-2=5\n5+8=13\n", "3+4=7\n7-2=5\n5+8=13\nAnswer: 13\n"]
    calls = [rm.score_steps(prompt, [p]) for p in paths]
    for p, got in zip(paths, calls):
        ids, ends, _ = rm.layout(prompt, p)
        want = torch.sigmoid(fresh.token_logits([ids])[0][ends]).tolist()
        assert got.steps[0] == pytest.approx(want, abs=1e-5)
    # each later call computed about one step's tokens (plus the EOS the layout appends), not the whole path
    step_tokens = [len(rm.layout(prompt, b)[0]) - len(rm.layout(prompt, a)[0]) for a, b in zip(paths, paths[1:])]
    # (the answer line is not a step: its call reads nothing new)
    assert [c.usage.computed_tokens for c in calls[1:]] == [step_tokens[0] + 1, step_tokens[1] + 1, 0]
    assert calls[0].usage.computed_tokens == len(rm.layout(prompt, paths[0])[0])
    again = rm.score_steps(prompt, paths[:3])
    assert again.usage.computed_tokens == 0 and again.steps[2] == calls[2].steps[0]  # all remembered


def test_step_tag_format_matches_a_hand_computation(hf_checkpoints):
    """Math-Shepherd's reading with the user's own tokens (the step-tag format, named
    with overrides) on a tiny random causal LM: p(good) over {good, bad} at each tag."""
    from ponder.backends.native import NativeLM
    from ponder.models.loader import load_tokenizer, load_transformer
    from ponder.scoring.reward import RewardModel

    folder, hf = hf_checkpoints["llama_tied"]
    lm = NativeLM(load_transformer(folder), load_tokenizer(folder), "tiny")
    prm = RewardModel.from_pretrained(folder, fmt="step-tag:marker=#,good=+,bad=-")
    assert prm.fmt.name == "step-tag:marker=#,good=+,bad=-"
    tag, good, bad = (lm.encode(t, add_special_tokens=False)[0] for t in "#+-")
    prompt, completion = "Q: 3+4-2\n", "3+4=7\n7-2=5\n"
    got = prm.score_steps(prompt, [completion, ""], aggregation="min")
    ids = lm.encode(prompt) + lm.encode("3+4=7", add_special_tokens=False) + [tag]
    first = len(ids) - 1
    ids += lm.encode("7-2=5", add_special_tokens=False) + [tag]
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0]
    want = [torch.softmax(logits[t, [good, bad]], -1)[0].item() for t in (first, len(ids) - 1)]
    assert got.steps[0] == pytest.approx(want, abs=1e-5) and got.steps[1] == []
    assert got.values[0] == pytest.approx(min(want), abs=1e-5)
    with pytest.raises(SettingError, match="exactly one token"):
        RewardModel.from_pretrained(folder, fmt="step-tag:marker=#,good=Answer: 42")
    with pytest.raises(SettingError, match="overrides are key=value"):
        RewardModel.from_pretrained(folder, fmt="step-tag:colour=red")
    with pytest.raises(SettingError, match="genprm, thinkprm"):
        RewardModel.from_pretrained(folder, fmt="shepherd")


def test_two_label_token_classification_prm(tmp_path, tokenizer_file):
    """ponder's head format with two labels (bad, good): a step's value is the softmax's
    "good" probability, checked on a tiny random checkpoint built by transformers. A
    two-label token classifier reads as a PURE PRM by its config (token-prm), so ponder's
    own reading of it is named."""
    from transformers import LlamaConfig, LlamaForTokenClassification

    from conftest import TINY, _save
    from ponder.scoring.reward import RewardModel
    from ponder.train.common import load_tok

    torch.manual_seed(5)
    cfg = LlamaConfig(vocab_size=load_tok(str(tokenizer_file)).get_vocab_size(), num_labels=2, **TINY)
    hf = LlamaForTokenClassification(cfg).eval()
    folder = _save(hf, tmp_path / "prm2", tokenizer_file)
    assert RewardModel.from_pretrained(str(folder)).fmt.name == "token-prm"
    rm = RewardModel.from_pretrained(str(folder), fmt="ponder")
    prompt, completion = "Q: 3+4-2\n", "3+4=7\n7-2=5\nAnswer: 5\n"
    got = rm.score_steps(prompt, [completion])
    ids, ends, eos = rm.layout(prompt, completion)
    with torch.no_grad():
        p_good = hf(torch.tensor([ids])).logits[0].softmax(-1)[:, 1]
    assert got.steps[0] == pytest.approx(p_good[ends].tolist(), abs=1e-5)
    assert rm.score(prompt, [completion]).values[0] == pytest.approx(p_good[eos].item(), abs=1e-5)


def test_mbr_rejection_and_usc_on_the_shipped_models(arith_lm):
    from ponder.decoding.generate import Sample
    from ponder.scoring.reward import RewardModel

    rm = RewardModel.from_pretrained("arith-reward")
    problems = TASK.problems("hard", 8)
    prompts = [TASK.prompt(p) for p in problems]
    sampler = Sample(arith_lm, temperature=0.7, max_tokens=160)
    mbr = MinimumBayesRisk(sampler, utility_named("exact", TASK.extract_answer), n=8).generate_batch(prompts, seed=0)
    mv = MajorityVote(sampler, TASK.extract_answer, n=8).generate_batch(prompts, seed=0)
    for (b,), (m,) in zip(mbr, mv):
        # with exact-match utility, MBR is majority vote: the same answer from the same samples
        assert TASK.extract_answer(b.text) == TASK.extract_answer(m.text)
        assert b.usage.generated_tokens == sum(t.usage.generated_tokens for t in b.trace)
    rej = RejectionSampling(sampler, rm, n=16, threshold=0.9, batch=4).generate_batch(prompts, seed=0)
    for (g,) in rej:
        drawn = len(g.trace)
        assert drawn % 4 == 0 and drawn <= 16
        assert (g.score >= 0.9) == g.meta["verified"] and (drawn == 16 or g.meta["verified"])
    assert sum(TASK.check_answer(p, g[0].text) for p, g in zip(problems, rej)) >= 6
    # USC's prompt holds every sample: two arith samples fit the 512-token context; the
    # arith model is no judge, so its verdict is unreadable and the first sample stands
    usc = UniversalSelfConsistency(sampler, n=2, template="{responses}\nThe most consistent response is Response")
    for (g,) in usc.generate_batch(prompts[:3], seed=0):
        assert g.meta["chosen"] in (None, 0, 1) and g.text in [t.text for t in g.trace]
        assert g.usage.generated_tokens > sum(t.usage.generated_tokens for t in g.trace)  # the verdict is billed
