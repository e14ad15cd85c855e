"""The arith task: data, splits, checkers, extractor."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from ponder.tasks import arith
from ponder.tasks.arith import ArithTask
from ponder.tasks.base import JsonlTask, Task


def test_task_implements_the_interface():
    assert isinstance(ArithTask(), Task)
    assert isinstance(JsonlTask("x.jsonl"), Task)


def test_solution_format_round_trips():
    text = arith.solution_text("23+45-17+8")
    assert text == "23+45=68\n68-17=51\n51+8=59\nAnswer: 59\n"
    t = ArithTask()
    p = arith.make_problem("23+45-17+8", "x")
    assert p.answer == "59"
    steps = t.split_steps(text)
    assert steps == ["23+45=68", "68-17=51", "51+8=59"]
    assert t.check_steps(p, steps) == [True, True, True]
    assert t.check_answer(p, text)


def test_step_checker_finds_the_first_error_and_what_follows():
    t = ArithTask()
    p = arith.make_problem("23+45-17+8", "x")
    assert t.check_steps(p, ["23+45=68", "68-17=52", "52+8=60"]) == [True, False, False]
    assert t.prefix_correct(p, ["23+45=68", "68-17=52", "52+8=60"]) == [True, False, False]
    assert t.check_steps(p, ["23+45=68", "68+17=85"]) == [True, False]  # wrong operation
    assert t.check_steps(p, ["garbage", "23-17=6"]) == [False, True]  # per-step oracle
    assert t.prefix_correct(p, ["garbage", "23-17=6"]) == [False, False]
    assert t.check_steps(p, ["23+45=68", "68+45=113"]) == [True, False]  # a term used twice
    assert t.check_steps(p, ["23+45=68", "68-17=51", "51+8=59", "59+1=60"]) == [True, True, True, False]
    neg = arith.make_problem("5-80+3", "n")
    assert t.check_steps(neg, ["5-80=-75", "-75+3=-72"]) == [True, True]


def test_valid_prefix_marks_the_character_where_a_solution_first_goes_wrong():
    """The dense labels a verifier can be taught from: per character, can the text so far
    still be finished right? Hand-checked positions, and agreement with the step labels
    at every step line's newline on right, slipped and sampled-looking solutions."""
    import random

    from ponder.train.reward import slipped_solution

    t = ArithTask()
    p = arith.make_problem("23+45-17+8", "x")
    text = "23+45=68\n68+45=113\n"  # a term used twice: wrong at its "4" (no unused term +4x)
    v = t.valid_prefix(p, text)
    assert v.index(False) == text.index("68+45") + 3 and not any(v[v.index(False):])
    wrong_result = "23+45=69\n"
    assert t.valid_prefix(p, wrong_result).index(False) == wrong_result.index("69") + 1  # "6" could still be 68
    right = "23+8=31\n31-17=14\n14+45=59\nAnswer: 59\n"
    assert all(t.valid_prefix(p, right))
    assert t.valid_prefix(p, right + "1")[-1] is False  # nothing follows the answer line
    assert t.valid_prefix(p, "23+45=68\nAnswer: 68\n")[-2] is False  # an answer before every term is used
    rng = random.Random(0)
    for k in range(200):
        q = arith.random_question(rng, rng.randint(2, 7), rng.choice([1, 2]))
        sol = slipped_solution(rng, q, k % 3)
        prob = arith.make_problem(q, "r")
        v = t.valid_prefix(prob, sol)
        ends = [i for i, ch in enumerate(sol) if ch == "\n"]
        steps = t.split_steps(sol)
        assert [v[e] for e in ends[: len(steps)]] == t.prefix_correct(prob, steps)
        assert v[-1] == (all(t.prefix_correct(prob, steps)) and t.check_answer(prob, sol))


def test_terms_may_be_taken_in_any_order():
    t = ArithTask()
    p = arith.make_problem("23+45-17+8", "x")
    steps = ["23+8=31", "31-17=14", "14+45=59"]
    assert t.check_steps(p, steps) == [True, True, True]
    assert t.check_answer(p, "\n".join(steps) + "\nAnswer: 59\n")
    # skipping a term is caught at the answer; starting from another term is not allowed
    assert t.check_steps(p, ["45+23=68"]) == [False]
    assert not t.check_answer(p, "23+45=68\n68+8=76\nAnswer: 76\n")
    rng = random.Random(0)
    orders = {tuple(arith.random_order(rng, 5)) for _ in range(3000)}
    assert len(orders) == 24  # every permutation of the 4 later terms occurs
    for _ in range(50):  # any sampled order solves the problem exactly
        text = arith.solution_text(p.question, rng)
        assert t.check_answer(p, text) and all(t.check_steps(p, t.split_steps(text)))
    with pytest.raises(ValueError, match="permutation"):
        arith.solve_in_order(p.question, [1, 1, 2])


def test_left_to_right_is_the_most_likely_training_order():
    rng = random.Random(1)
    counts: dict[tuple, int] = {}
    for _ in range(4000):
        o = tuple(arith.random_order(rng, 4))
        counts[o] = counts.get(o, 0) + 1
    assert max(counts, key=counts.get) == (1, 2, 3)


@pytest.mark.parametrize(
    "text, want",
    [
        ("1+2=3\nAnswer: 3\n", "3"),
        ("Answer: -42", "-42"),
        ("answer:7\nAnswer: 8", "8"),
        ("1+2=3\n", None),
        ("", None),
        ("Answer: ", None),
        ("\x00\ufffd Answer: 0012 junk", "12"),
        (None, None),
    ],
)
def test_extractor_is_robust(text, want):
    assert ArithTask().extract_answer(text) == want


def test_levels_and_test_sets_are_fixed_and_held_out():
    t = ArithTask()
    for level in ("easy", "medium", "hard"):
        probs = t.problems(level)
        assert len(probs) >= 500
        assert len({p.question for p in probs}) == len(probs)
        assert all(arith.is_held_out(p.question) for p in probs)
        # the shipped file is exactly what the seeded generator makes
        assert [p.question for p in probs] == [p.question for p in arith.generate_test_set(level)]
        assert all(p.answer == str(arith.solve(p.question)[1]) for p in probs)
        lv = arith.LEVELS[level]
        assert all(lv.min_operands <= len(arith.parse_question(p.question)) <= lv.max_operands for p in probs)
    with pytest.raises(ValueError, match="level must be one of"):
        t.problems("impossible")


def test_training_stream_never_yields_a_test_problem():
    test_qs = {p.question for lv in ("easy", "medium", "hard") for p in ArithTask().problems(lv)}
    stream = arith.training_stream(seed=0, block=8)
    seen = [q for q, _ in itertools.islice(stream, 20000)]
    assert not test_qs & set(seen)
    assert not any(arith.is_held_out(q) for q in seen)


def test_generator_is_deterministic():
    a = [next(arith.training_stream(5)) for _ in range(3)]
    b = [next(arith.training_stream(5)) for _ in range(3)]
    assert a == b
    r1, r2 = random.Random(1), random.Random(1)
    assert arith.random_question(r1, 4, 2) == arith.random_question(r2, 4, 2)


def test_jsonl_task_gsm8k_style(tmp_path):
    f = tmp_path / "gsm.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in [
        {"question": "Tom has 3 apples and buys 4.", "answer": "3+4=7\n#### 7"},
        {"question": "2 times 1,000?", "answer": "#### 2,000"},
    ]))
    t = JsonlTask(f)
    probs = t.problems()
    assert [p.answer for p in probs] == ["7", "2000"]
    assert t.check_answer(probs[0], "so 3+4 = 7.\n#### 7")
    assert t.check_answer(probs[1], "The answer is 2,000")
    assert not t.check_answer(probs[0], "no idea")
    assert t.prompt(probs[0]).startswith("Q: Tom")
