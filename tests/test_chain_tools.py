"""Chains, chain-of-thought, tool use, the calculator and the Python sandbox: scripted
models for the logic, real subprocesses for containment, and the shipped model end to end."""

from __future__ import annotations

import asyncio
import socket
import threading

import pytest

from ponder.decoding.generate import Greedy
from ponder.errors import SettingError
from ponder.meta.chain import ChainOfThought, ToolUse, chain, link, tool_link
from ponder.meta.tools import Calculator, PythonSandbox
from ponder.params import SamplingParams
from ponder.protocols import Access, GeneratorBase
from ponder.tasks.arith import ArithTask
from ponder.types import Generation, Usage

TASK = ArithTask()


# -- calculator -----------------------------------------------------------------------------
def test_calculator_by_hand():
    c = Calculator()
    assert [c(e).output for e in ("3+4*2", "(3+4)*2", "2**10", "7/2", "6/3", "-5//2", "7 % 3")] == \
        ["11", "14", "1024", "3.5", "2", "-3", "1"]
    for expr, msg in [("1/0", "division by zero"), ("__import__('os')", "only numbers"), ("2**100000", "exponent"),
                      ("", "empty"), ("3+", "not an arithmetic expression"), ("'a'*3", "only numbers")]:
        r = c(expr)
        assert not r.ok and msg in r.error, (expr, r)


# -- the sandbox ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sandbox():
    return PythonSandbox(cpu_seconds=1, memory_mb=128, timeout=4, max_output=2000)


def test_sandbox_runs_code_in_a_scratch_directory(sandbox):
    r = sandbox("import os\nopen('out.txt', 'w').write('hi')\nprint(open('out.txt').read(), sum(range(10)))")
    assert r.ok and r.output == "hi 45\n" and r.reason == "ok"
    err = sandbox("1/0")
    assert not err.ok and err.reason == "error" and err.error == "ZeroDivisionError: division by zero"


def test_sandbox_contains_an_infinite_loop(sandbox):
    r = sandbox("while True:\n    pass")
    assert not r.ok and r.reason == "cpu limit" and "CPU time above 1 s" in r.error
    assert r.wall_s < 4


def test_sandbox_contains_a_fork_bomb(sandbox):
    r = sandbox("import os\nwhile True:\n    os.fork()")
    assert not r.ok and r.reason == "blocked" and "starting processes is disabled" in r.error
    for code in ("import subprocess\nsubprocess.run(['sh', '-c', 'echo hi'])", "import os\nos.system('echo hi')",
                 "import multiprocessing as m\np = m.Process(target=print)\np.start()"):
        r = sandbox(code)
        assert r.reason == "blocked" and "hi" not in r.output, (code, r)


def test_sandbox_contains_a_memory_bomb(sandbox):
    for code in ("x = bytearray(10**10)", "x = []\nwhile True:\n    x.append(' ' * 10**6)"):
        r = sandbox(code)
        assert not r.ok and r.reason == "memory limit" and "memory above 128 MB" in r.error, (code, r)


def test_sandbox_has_no_network(sandbox):
    # A real listener on loopback: the sandboxed code must not reach it.
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.settimeout(0.5)
    port = server.getsockname()[1]
    got = []

    def accept():
        try:
            got.append(server.accept())
        except OSError:
            pass

    t = threading.Thread(target=accept)
    t.start()
    r = sandbox(f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')")
    t.join()
    server.close()
    assert not r.ok and r.reason == "blocked" and "network access is disabled" in r.error
    assert got == [] and "connected" not in r.output


def test_sandbox_limits_output_writes_and_wall_time(sandbox):
    r = sandbox("while True:\n    print('x' * 100)")
    assert r.reason == "output limit" and len(r.output) <= 2000
    r = sandbox("open('/tmp/ponder-sandbox-escape.txt', 'w').write('x')")
    assert r.reason == "blocked" and "outside the working directory" in r.error
    r = sandbox("import time\ntime.sleep(60)")  # no CPU used: only the wall clock stops it
    assert r.reason == "timeout" and 3.5 < r.wall_s < 8


def test_sandbox_settings_are_checked():
    for kwargs, msg in [(dict(cpu_seconds=0), "cpu_seconds"), (dict(memory_mb=8), "memory_mb >= 32|memory_mb must"),
                        (dict(timeout=-1), "timeout"), (dict(max_output=0), "max_output")]:
        with pytest.raises(SettingError, match=msg):
            PythonSandbox(**kwargs)
    assert not PythonSandbox()("   ").ok


# -- chains ---------------------------------------------------------------------------------
class Echo(GeneratorBase):
    """Replies with a scripted function of the prompt; bills 3 tokens a call."""

    def __init__(self, reply):
        self.reply, self.prompts = reply, []

    async def agenerate(self, prompt, n=1, seed=None):
        self.prompts.append(prompt)
        return [Generation(text=self.reply(prompt), token_ids=[1, 2, 3], finish_reason="stop",
                           usage=Usage(generated_tokens=3, wall_s=0.5)) for _ in range(n)]


def test_chain_feeds_each_output_into_the_next_prompt():
    plan = Echo(lambda p: "add then subtract")
    solve = Echo(lambda p: "3+4=7\n7-2=5")
    c = chain(link("plan", plan, "{input}Plan:"), link("solution", solve, "{input}Plan: {plan}\n"),
              tool_link("answer", Calculator(), "3+4-2"))
    g = c.generate("Q: 3+4-2\n")[0]
    assert solve.prompts == ["Q: 3+4-2\nPlan: add then subtract\n"]
    assert g.text == "5" and g.meta["state"] == {"plan": "add then subtract", "solution": "3+4=7\n7-2=5", "answer": "5"}
    assert [t.meta["link"] for t in g.trace] == ["plan", "solution", "answer"]
    assert g.usage.generated_tokens == 6 and g.usage.wall_s >= 1.0  # both links, plus the tool's time
    assert chain(link("a", plan), link("b", solve, "{a}"), output="a").generate("x")[0].text == "add then subtract"


def test_bad_chains_are_named():
    g = Echo(lambda p: "")
    with pytest.raises(SettingError, match="uses plan before any link wrote it"):
        chain(link("solve", g, "{input}{plan}"))
    with pytest.raises(SettingError, match="used twice"):
        chain(link("a", g), link("a", g))
    with pytest.raises(SettingError, match="at least one link"):
        chain()
    with pytest.raises(SettingError, match="output must name a link"):
        chain(link("a", g), output="b")
    with pytest.raises(SettingError, match="generator must be a ponder generator"):
        link("a", "not a generator")


def test_chain_of_thought_asks_for_the_answer_only_when_it_cannot_read_one():
    reasoner = Echo(lambda p: "3+4=7 and 7-2=5." if "Q1" in p else "Answer: 9")
    answerer = Echo(lambda p: " 5.")
    cot = ChainOfThought(reasoner, TASK.extract_answer, answer_generator=answerer)
    g1, g2 = cot.generate("Q1\n")[0], cot.generate("Q2\n")[0]
    assert g1.meta["answer"] == "5" and g1.meta["second_call"] and len(g1.trace) == 2
    assert answerer.prompts == ["Q1\nLet's think step by step.\n3+4=7 and 7-2=5.\nTherefore, the answer is"]
    assert g2.meta["answer"] == "9" and not g2.meta["second_call"] and g2.usage.generated_tokens == 3


class ToolWriter:
    """A text-only backend that calls the calculator once, then answers with its output."""

    name, access = "scripted", Access.TEXT

    def __init__(self):
        self.seen = []

    async def generate(self, prompts, params):
        (p,) = prompts
        self.seen.append((p, params.stop))
        if "<output>" not in p:
            return [[Generation(text="I compute <calc>2*(3+4)", token_ids=[1] * 5, finish_reason="stop",
                                stop="</calc>", usage=Usage(generated_tokens=5))]]
        value = p.rsplit("<output>", 1)[1].split("</output>")[0]
        return [[Generation(text=f"Answer: {value}\n", token_ids=[2] * 3, finish_reason="stop",
                            usage=Usage(generated_tokens=3))]]


def test_tool_use_runs_the_call_and_continues():
    lm = ToolWriter()
    g = ToolUse(lm, {"calc": Calculator(), "python": PythonSandbox()}).generate("Q: ")[0]
    assert g.text == "I compute <calc>2*(3+4)</calc>\n<output>14</output>\nAnswer: 14\n"
    assert g.meta["tool_calls"] == 1 and [t.meta.get("tool") for t in g.trace] == [None, "calc", None]
    assert g.usage.generated_tokens == 8 and g.finish_reason == "stop"
    assert "</calc>" in lm.seen[0][1] and "</python>" in lm.seen[0][1]


def test_tool_use_limits_calls():
    class Looper(ToolWriter):
        async def generate(self, prompts, params):
            return [[Generation(text="<calc>1+1", token_ids=[1], finish_reason="stop", stop="</calc>")]]

    g = ToolUse(Looper(), {"calc": Calculator()}, max_calls=2).generate("Q")[0]
    assert g.meta["tool_calls"] == 3 and g.text.count("<output>2</output>") == 2
    assert "no more tool calls (the limit is 2)" in g.text and g.finish_reason == "length"
    with pytest.raises(SettingError, match="tools must map tag names"):
        ToolUse(Looper(), {"bad tag": Calculator()})


# -- end to end on the shipped model --------------------------------------------------------
def test_chain_with_a_sandboxed_checker_on_the_shipped_model(arith_lm):
    # The model solves; sandboxed Python recomputes the question and judges the answer.
    checker = ("q = {input!r}.split('Q: ', 1)[1].strip()\nlines = {solution!r}.strip().splitlines()\n"
               "ans = lines[-1].split('Answer: ')[-1] if lines else ''\nprint('right' if str(eval(q)) == ans else 'wrong')")
    c = chain(link("solution", Greedy(arith_lm, max_tokens=80)), tool_link("check", PythonSandbox(), checker))
    probs = TASK.problems("hard", 6)
    outs = asyncio.run(c.agenerate_many([TASK.prompt(p) for p in probs]))
    for p, (g,) in zip(probs, outs):
        assert g.text.strip() == ("right" if TASK.check_answer(p, g.meta["state"]["solution"]) else "wrong")
        assert g.usage.generated_tokens == g.trace[0].usage.generated_tokens > 0


def test_tool_use_without_calls_is_plain_generation(arith_lm):
    # The arith model writes no tags, so tool use must give exactly what greedy gives.
    prompts = [TASK.prompt(p) for p in TASK.problems("medium", 4)]
    plain = Greedy(arith_lm, max_tokens=80).generate_batch(prompts)
    tooled = asyncio.run(ToolUse(arith_lm, {"calc": Calculator()}, SamplingParams(temperature=0.0, max_tokens=80)).agenerate_many(prompts))
    for (a,), (b,) in zip(plain, tooled):
        assert a.text == b.text and a.token_ids == b.token_ids and b.meta["tool_calls"] == 0
