"""``arith``: multi-step integer arithmetic, solved one operation per line.

Format (prompt, then the solution the model writes)::

    Q: 23+45-17+8
    23+45=68
    68-17=51
    51+8=59
    Answer: 59

Only ``+`` and ``-``, so every line is one signed term added to the running total, and
every line can be checked exactly: that is the oracle process reward. The first term
starts the total; the other terms may be taken **in any order** (the reference solution
goes left to right). That is deliberate: with a single admissible order a solver's
errors are systematic, and sampling many solutions and voting (self-consistency) can
only match greedy decoding, because the answer distribution's mode is reached by the
same per-step argmax. With many orders, independent paths err independently, as in
the chains of thought that self-consistency was built for (Wang et al., 2023).
Difficulty is the number of operations and the operand size.

Held-out problems are defined by a hash of the question (1 in ``HELD_OUT_MODULUS``),
so the training stream can exclude every test problem of every level, including
levels added later, without storing a list.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..errors import SettingError
from .base import Problem

HELD_OUT_MODULUS = 16
ANSWER_PREFIX = "Answer: "


@dataclass(frozen=True)
class Level:
    name: str
    min_operands: int
    max_operands: int
    digits: int  # operands are drawn uniformly from [0, 10**digits)


# easy to hard: one-digit operands, difficulty by the number of operations. `expert`
# (two-digit operands) was chosen after training so that the shipped target errs on
# about half of it greedily, leaving search room to buy accuracy (see MODEL.md).
LEVELS: dict[str, Level] = {
    "easy": Level("easy", 3, 4, 1),
    "medium": Level("medium", 5, 6, 1),
    "hard": Level("hard", 7, 8, 1),
    "expert": Level("expert", 7, 8, 2),
}
TEST_SET_SIZE = 500
# Named, disjoint splits of each level's 500 held-out problems (by position in the shipped
# file): `test` is what results are reported on, `fit` what a policy is fitted or a
# setting chosen on (compute-optimal's policies, thresholds). No number in the README
# comes from a problem that also chose a setting.
SPLITS: dict[str, tuple[int, int]] = {"test": (0, 400), "fit": (400, 500)}
TEST_SEEDS = {"easy": 1001, "medium": 1002, "hard": 1003, "expert": 1004}


def is_held_out(question: str) -> bool:
    h = hashlib.sha256(question.encode()).digest()
    return int.from_bytes(h[:4], "big") % HELD_OUT_MODULUS == 0


def random_question(rng: random.Random, n_operands: int, digits: int) -> str:
    hi = 10**digits - 1
    parts = [str(rng.randint(0, hi))]
    for _ in range(n_operands - 1):
        parts.append(rng.choice("+-") + str(rng.randint(0, hi)))
    return "".join(parts)


_TERM = re.compile(r"([+-]?)(\d+)")


def parse_question(question: str) -> list[tuple[str, int]]:
    """'23+45-17' -> [('+', 23), ('+', 45), ('-', 17)]."""
    terms = [(s or "+", int(d)) for s, d in _TERM.findall(question.replace(" ", ""))]
    if not terms:
        raise ValueError(f"not an arith question: {question!r}")
    return terms


def solve(question: str) -> tuple[list[str], int]:
    """The reference solution: one line per operation, and the answer."""
    terms = parse_question(question)
    total = terms[0][1]
    lines = []
    for op, b in terms[1:]:
        new = total + b if op == "+" else total - b
        lines.append(f"{total}{op}{b}={new}")
        total = new
    return lines, total


def solve_in_order(question: str, order: list[int]) -> tuple[list[str], int]:
    """A solution taking the terms after the first in ``order`` (indices into the
    question's terms, a permutation of 1..n-1)."""
    terms = parse_question(question)
    if sorted(order) != list(range(1, len(terms))):
        raise ValueError(f"order must be a permutation of 1..{len(terms) - 1}; got {order}")
    total = terms[0][1]
    lines = []
    for i in order:
        op, b = terms[i]
        new = total + b if op == "+" else total - b
        lines.append(f"{total}{op}{b}={new}")
        total = new
    return lines, total


def random_order(rng: random.Random, n_terms: int, p_leftmost: float = 0.5) -> list[int]:
    """Training orders: at each step take the leftmost unused term with probability
    ``p_leftmost``, otherwise any unused term uniformly. Left to right stays the single
    most likely order (what greedy decoding follows); samples spread over the others."""
    left = list(range(1, n_terms))
    order = []
    while left:
        k = 0 if rng.random() < p_leftmost else rng.randrange(len(left))
        order.append(left.pop(k))
    return order


def solution_text(question: str, rng: random.Random | None = None) -> str:
    """The solution text: left to right, or in a random admissible order given ``rng``."""
    if rng is None:
        lines, ans = solve(question)
    else:
        lines, ans = solve_in_order(question, random_order(rng, len(parse_question(question))))
    return "".join(line + "\n" for line in lines) + f"{ANSWER_PREFIX}{ans}\n"


def make_problem(question: str, pid: str, level: str | None = None) -> Problem:
    _, ans = solve(question)
    return Problem(id=pid, question=question, answer=str(ans), meta={"level": level} if level else {})


def training_stream(seed: int, levels: list[Level] | None = None, block: int = 1, any_order: bool = True):
    """Endless (question, solution) pairs for training, never a held-out question.

    Levels are drawn in blocks of ``block`` consecutive problems, so a training batch
    holds problems of one shape and pads little. Solutions take the terms in random
    admissible orders (see ``random_order``) unless ``any_order`` is False.
    """
    rng = random.Random(seed)
    levels = levels or TRAIN_LEVELS
    while True:
        lv = rng.choice(levels)
        made = 0
        while made < block:
            q = random_question(rng, rng.randint(lv.min_operands, lv.max_operands), lv.digits)
            if is_held_out(q):
                continue
            made += 1
            yield q, solution_text(q, rng if any_order else None)


# Training covers every operand count and size the test levels use; bigger operands are
# drawn more often because that is where the model has the most to learn.
TRAIN_LEVELS = [Level(f"train{n}x{d}", n, n, d) for n in range(2, 8) for d in (1, 2, 2, 3, 3, 3)]


def generate_test_set(level: str, n: int = TEST_SET_SIZE, seed: int | None = None) -> list[Problem]:
    lv = LEVELS[level]
    rng = random.Random(TEST_SEEDS[level] if seed is None else seed)
    seen: set[str] = set()
    out: list[Problem] = []
    attempts = 0
    while len(out) < n:
        attempts += 1
        if attempts > 10_000 * n:
            raise ValueError(f"level {level!r} has too few distinct held-out problems for {n}")
        q = random_question(rng, rng.randint(lv.min_operands, lv.max_operands), lv.digits)
        if q in seen or not is_held_out(q):
            continue
        seen.add(q)
        out.append(make_problem(q, f"{level}-{len(out):04d}", level))
    return out


_STEP = re.compile(r"^\s*(-?\d+)\s*([+-])\s*(\d+)\s*=\s*(-?\d+)\s*$")
_ANSWER = re.compile(r"answer\s*:?\s*(-?\d+)", re.IGNORECASE)


class ArithTask:
    """The ``arith`` task: exact answer checker, exact step checker, robust extractor."""

    name = "arith"
    levels = tuple(LEVELS)

    def __init__(self, data_dir: str | Path | None = None) -> None:
        self._data_dir = Path(data_dir) if data_dir else None

    def _data_path(self, level: str) -> Path:
        if self._data_dir is not None:
            return self._data_dir / f"arith_{level}.jsonl"
        return Path(str(resources.files("ponder.tasks") / "data" / f"arith_{level}.jsonl"))

    def problems(self, level: str | None = None, limit: int | None = None, split: str | None = None) -> list[Problem]:
        """A level's held-out problems: all 500, or the named ``split`` (``SPLITS``)."""
        level = "hard" if level is None else level
        if split is not None and split not in SPLITS:
            raise SettingError(f"split must be one of {', '.join(SPLITS)}; got {split!r}", "split")
        if level not in LEVELS:
            raise SettingError(f"level must be one of {', '.join(LEVELS)}; got {level!r}", "level")
        if limit is not None and (not isinstance(limit, int) or limit < 1):
            raise SettingError(f"limit must be an integer >= 1; got {limit!r}", "limit")
        path = self._data_path(level)
        if path.exists():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            probs = [Problem(r["id"], r["question"], str(r["answer"]), {"level": level}) for r in rows]
        else:  # the generator is deterministic, so this equals the shipped file
            probs = generate_test_set(level)
        if split is not None:
            lo, hi = SPLITS[split]
            probs = probs[lo:hi]
        return probs[:limit] if limit else probs

    def prompt(self, problem: Problem) -> str:
        return f"Q: {problem.question}\n"

    def problem_of_prompt(self, prompt: str) -> Problem:
        """The problem a prompt asks (its first line, ``Q: question``): arith needs no
        answer key, the question is its own (what exact verifiers read)."""
        first = (prompt or "").split("\n", 1)[0]
        if not first.startswith("Q: "):
            raise SettingError(f"not an arith prompt (it starts with 'Q: '): {first[:40]!r}")
        question = first[3:].strip()
        try:
            _, answer = solve(question)
        except ValueError:
            raise SettingError(f"not an arith question: {question[:40]!r}") from None
        return Problem(id="prompt", question=question, answer=str(answer))

    def extract_answer(self, completion: str) -> str | None:
        """The number on the last 'Answer:' line; None if there is none (never raises)."""
        found = _ANSWER.findall(completion or "")
        return str(int(found[-1])) if found else None

    def check_answer(self, problem: Problem, completion: str) -> bool:
        got = self.extract_answer(completion)
        return got is not None and got == str(int(problem.answer))

    def split_steps(self, completion: str) -> list[str]:
        """The operation lines of a solution, up to (not including) the answer line."""
        steps = []
        for line in (completion or "").split("\n"):
            if _ANSWER.search(line):
                break
            if line.strip():
                steps.append(line)
        return steps

    def check_steps(self, problem: Problem, steps: list[str]) -> list[bool]:
        """Is each step right? A step ``a op b = c`` is right when ``a`` is the running
        total, ``op b`` is one of the question's terms not used yet, and ``c = a op b``.
        Each step is judged on the state the correct reading of the steps before it
        leaves (a term named by a step is used up, and the total moves by its true
        value), so one slip does not make every later step wrong; ``prefix_correct``
        is what carries an error forward."""
        terms = parse_question(problem.question)
        total = terms[0][1]
        unused = [(op, b) for op, b in terms[1:]]
        ok: list[bool] = []
        for line in steps:
            m = _STEP.match(line)
            if m is None:
                ok.append(False)
                continue
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            term_ok = (op, b) in unused
            ok.append(term_ok and a == total and c == (a + b if op == "+" else a - b))
            if term_ok:
                unused.remove((op, b))
                total = total + b if op == "+" else total - b
        return ok

    def prefix_correct(self, problem: Problem, steps: list[str]) -> list[bool]:
        """Oracle PRM labels: is the solution correct up to and including step t?"""
        out, good = [], True
        for s in self.check_steps(problem, steps):
            good = good and s
            out.append(good)
        return out

    def valid_prefix(self, problem: Problem, completion: str) -> list[bool]:
        """Per character of ``completion``: can the text up to and including it still be
        finished as a right solution, written as the task writes one? The dense form of
        ``prefix_correct``, which it equals at each step line's "\\n": it marks the
        character where a solution first goes wrong (a reused term's last digit, a
        result's first wrong digit), so a verifier can be taught at that token."""
        terms = parse_question(problem.question)
        total, unused = terms[0][1], list(terms[1:])

        def lines_next() -> dict[str, tuple[str, int] | None]:
            """Every right next line, and the term it uses (None: the answer line)."""
            if not unused:
                return {f"{ANSWER_PREFIX}{total}\n": None}
            return {f"{total}{op}{b}={total + b if op == '+' else total - b}\n": (op, b) for op, b in unused}

        out: list[bool] = []
        line, nexts, good = "", lines_next(), True
        for ch in completion:
            if good:
                line += ch
                good = any(n.startswith(line) for n in nexts)
                if good and ch == "\n":  # a whole right line: step past it
                    term = nexts[line]
                    if term is None:
                        nexts = {}  # nothing follows the answer line
                    else:
                        unused.remove(term)
                        total = total + term[1] if term[0] == "+" else total - term[1]
                        nexts = lines_next()
                    line = ""
            out.append(good)
        return out

def write_test_sets(out_dir: str | Path) -> None:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for level in LEVELS:
        with open(out_dir / f"arith_{level}.jsonl", "w") as f:
            for p in generate_test_set(level):
                f.write(json.dumps({"id": p.id, "question": p.question, "answer": p.answer}) + "\n")
