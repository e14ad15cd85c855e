"""GSM8K- and MATH-style JSONL tasks (files the tests write: nothing is downloaded):
configurable fields, answer extraction, math-verify equivalence, and a sweep of the
shipped model over a JSONL file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from ponder.errors import SettingError
from ponder.tasks.base import JsonlTask, last_boxed, math_equal
from ponder.tasks.registry import load_task


def _write(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return path


def test_gsm8k_rows_with_their_own_field_names(tmp_path):
    f = _write(tmp_path / "gsm.jsonl", [
        {"idx": "a", "q": "Tom has 3 apples and buys 4. How many?", "sol": "3+4=7\n#### 7"},
        {"idx": "b", "q": "1,000 + 234?", "sol": "#### 1,234"},
    ])
    t = load_task(str(f), question_field="q", answer_field="sol", id_field="idx", prompt="Question: {question}\nAnswer:")
    probs = t.problems()
    assert [(p.id, p.answer) for p in probs] == [("a", "7"), ("b", "1234")]
    assert t.prompt(probs[0]) == "Question: Tom has 3 apples and buys 4. How many?\nAnswer:"
    assert t.check_answer(probs[1], "so the total is 1,234.") and not t.check_answer(probs[0], "#### 8")
    with pytest.raises(SettingError, match="needs the fields question and answer"):
        load_task(str(f)).problems()
    with pytest.raises(SettingError, match="does not take"):
        load_task(str(f), colour="red")
    with pytest.raises(SettingError, match="format must be one of gsm8k, math"):
        load_task(str(f), format="latex")


def test_math_rows_are_checked_by_math_verify(tmp_path):
    f = _write(tmp_path / "math.jsonl", [
        {"problem": "What is 1/2 + 1/4?", "solution": "We add: $\\frac{1}{2}+\\frac{1}{4}=\\boxed{\\frac{3}{4}}$."},
        {"problem": "Solve x^2=4, x>0.", "solution": "So $x=\\boxed{2}$."},
        {"problem": "Give the interval.", "solution": "$\\boxed{(0, 1]}$"},
    ])
    t = JsonlTask(f, question_field="problem", answer_field="solution", format="math")
    p = t.problems()
    assert [x.answer for x in p] == ["\\frac{3}{4}", "2", "(0, 1]"]
    assert t.check_answer(p[0], "The sum is $\\boxed{0.75}$")  # equal values in other forms
    assert t.check_answer(p[0], "so the answer is $\\frac{6}{8}$")
    assert not t.check_answer(p[0], "$\\boxed{\\frac{2}{3}}$")
    assert t.check_answer(p[1], "x = 2") and not t.check_answer(p[1], "x = -2")
    assert t.check_answer(p[2], "$\\boxed{(0,1]}$") and not t.check_answer(p[2], "$\\boxed{[0,1]}$")
    assert t.extract_answer("thus \\boxed{\\sqrt{2}} holds") == "\\sqrt{2}"
    assert last_boxed("\\boxed{a{b}c}") == "a{b}c" and last_boxed("no box") is None
    assert math_equal("7", "3+4=7\nAnswer: 7") and not math_equal("7", "")


def test_a_sweep_and_an_eval_over_a_jsonl_task(tmp_path):
    from ponder.tasks.arith import ArithTask

    arith = ArithTask()
    rows = [{"id": p.id, "problem": p.question, "solution": f"... $\\boxed{{{p.answer}}}$"}
            for p in arith.problems("easy", 6)]
    f = _write(tmp_path / "mathstyle.jsonl", rows)
    cfg = tmp_path / "s.toml"
    cfg.write_text(f"""
[[model]]
name = "arith"
[[task]]
name = "{f}"
question_field = "problem"
answer_field = "solution"
format = "math"
[[strategy]]
name = "greedy"
temperature = 0.0
""")
    r = subprocess.run([sys.executable, "-m", "ponder.cli", "sweep", str(cfg), "--db", str(tmp_path / "r.sqlite"),
                        "--report", str(tmp_path / "rep")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "| arith | greedy | temperature=0.0 |" in r.stdout and (tmp_path / "rep" / "mathstyle.png").exists()
    right = int(r.stdout.split("| temperature=0.0 | ")[1].split("(")[1].split("/")[0])
    # the arith model writes "Answer: N" (no \\boxed): math-verify reads the final number
    greedy = subprocess.run([sys.executable, "-m", "ponder.cli", "eval", "--task", str(f), "--task-option",
                             "question_field=problem", "--task-option", "answer_field=solution", "--task-option",
                             "format=math", "--json"], capture_output=True, text=True, timeout=300)
    assert greedy.returncode == 0, greedy.stderr
    assert json.loads(greedy.stdout)["correct"] == right >= 4
