"""Chained meta-generation: one generation feeds the next prompt.

* ``chain(link(...), tool_link(...), ...)``: a fixed pipeline. Each link fills its
  template from the state (``{input}``, the original prompt, and every earlier link's
  output by name) and calls a generator or a tool; a chain is itself a generator, so
  it can be voted over or searched. (Chains of prompts in the sense of Wu et al. 2022's
  AI Chains; the state is a plain dict, so a chain is easy to test link by link.)
* ``ChainOfThought``: zero-shot chain-of-thought with answer extraction (Kojima et al.
  2022): reason after a cue, and if no answer can be read from the reasoning, ask once
  more with an answer trigger.
* ``ToolUse``: the model writes a call (``<calc>2*(3+4)</calc>``, or ``<python>...
  </python>``); generation stops at the closing tag, the tool runs, its result is
  appended (``<output>14</output>``) and generation continues (Toolformer's inline
  calls, Schick et al. 2023; program-aided LMs, Gao et al. 2023). It needs only a
  ``TextLM``: the call's end is a stop string.

Every output's usage is the sum of its links' (tools bill their wall time), and its
trace holds each link's generation, so the bill is honest.
"""

from __future__ import annotations

import asyncio
import re
import string
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from ..errors import SettingError
from ..params import SamplingParams
from ..protocols import Access, IndependentRuns, require_access
from ..types import Generation, Usage
from .tools import ToolResult


@dataclass(frozen=True)
class Link:
    """One step of a chain: fill ``template`` from the state, then call ``generator``
    (a generation) or ``tool`` (a ToolResult); the output goes to ``state[name]``."""

    name: str
    template: str
    generator: Any = None
    tool: Callable[[str], ToolResult] | None = None


def _fields(template: str) -> set[str]:
    if not isinstance(template, str):
        raise SettingError(f"a template must be a string; got {template!r}")
    try:
        return {f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(template) if f}
    except ValueError as e:
        raise SettingError(f"template {template!r} is not a valid format string: {e}") from None


def check_template(template: str, allowed: set[str], name: str) -> None:
    """A format-string template may use only ``allowed`` fields (named, not positional)."""
    unknown = _fields(template) - allowed
    if unknown or "{}" in template:
        raise SettingError(f"{name} uses {', '.join(sorted(unknown)) or 'a positional field {}'}; "
                           f"it may use {', '.join('{' + a + '}' for a in sorted(allowed))}")


def link(name: str, generator: Any, template: str = "{input}") -> Link:
    """A link that generates: its prompt is ``template`` filled from the state."""
    if not (callable(getattr(generator, "agenerate", None))):
        raise SettingError(f"link {name!r}: generator must be a ponder generator (with agenerate); got {generator!r}")
    _fields(template)
    return Link(name, template, generator=generator)


def tool_link(name: str, tool: Callable[[str], ToolResult], template: str) -> Link:
    """A link that runs a tool on ``template`` filled from the state (its text output)."""
    if not callable(tool):
        raise SettingError(f"link {name!r}: tool must be a callable text -> ToolResult; got {tool!r}")
    _fields(template)
    return Link(name, template, tool=tool)


def tool_generation(result: ToolResult, name: str) -> Generation:
    """A tool's result as a Generation, so that it sits in a trace and bills its time."""
    return Generation(text=result.text(), token_ids=[], finish_reason="stop" if result.ok else "error",
                      usage=Usage(wall_s=result.wall_s), meta={"tool": name, "ok": result.ok, "reason": result.reason})


class Chain(IndependentRuns):
    """Run ``links`` in order; the result is the last link's output (or the link named
    ``output``), with ``meta["state"]`` holding every link's text."""

    strategy = "chain"
    overlapping_bills = True

    def __init__(self, links: Sequence[Link], output: str | None = None) -> None:
        if not links:
            raise SettingError("a chain needs at least one link")
        names = ["input"]
        for ln in links:
            if not isinstance(ln, Link):
                raise SettingError(f"chain links are made with link() or tool_link(); got {ln!r}")
            if ln.name in names:
                raise SettingError(f"link name {ln.name!r} is used twice (or is the reserved name 'input')")
            unknown = _fields(ln.template) - set(names)
            if unknown:
                raise SettingError(f"link {ln.name!r} uses {', '.join(sorted(unknown))} before any link wrote it; "
                                   f"known so far: {', '.join(names)}")
            names.append(ln.name)
        if output is not None and output not in names[1:]:
            raise SettingError(f"output must name a link ({', '.join(names[1:])}); got {output!r}")
        self.links, self.output = list(links), output or links[-1].name

    async def _once(self, prompt: str, seed: int | None) -> Generation:
        state: dict[str, str] = {"input": prompt}
        trace: list[Generation] = []
        for i, ln in enumerate(self.links):
            text = ln.template.format(**state)
            if ln.tool is not None:
                result = await asyncio.to_thread(ln.tool, text)
                g = tool_generation(result, ln.name)
            else:
                (g,) = await ln.generator.agenerate(text, n=1, seed=None if seed is None else seed + 7_919 * i)
            g.meta.setdefault("link", ln.name)
            trace.append(g)
            state[ln.name] = g.text
        out = trace[[ln.name for ln in self.links].index(self.output)]
        return Generation(text=out.text, token_ids=out.token_ids, logprobs=out.logprobs,
                          finish_reason=out.finish_reason, usage=Usage.total(g.usage for g in trace), trace=trace,
                          meta={"strategy": self.strategy, "state": {k: v for k, v in state.items() if k != "input"}})



def chain(*links: Link, output: str | None = None) -> Chain:
    """``chain(link("plan", gen, "{input}Plan:"), link("answer", gen, "{input}{plan}\\nAnswer:"))``."""
    return Chain(links, output)


class ChainOfThought(IndependentRuns):
    """Zero-shot chain-of-thought (Kojima et al. 2022): ``prompt + cue`` -> reasoning;
    the answer is ``extract_answer(reasoning)``, or, if it finds none, the answer to a
    second call ``prompt + cue + reasoning + trigger``. ``meta["answer"]`` holds it."""

    strategy = "cot"
    overlapping_bills = True

    def __init__(self, generator: Any, extract_answer: Callable[[str], str | None],
                 cue: str = "Let's think step by step.\n", trigger: str = "\nTherefore, the answer is",
                 answer_generator: Any = None) -> None:
        for role, g in (("generator", generator), ("answer_generator", answer_generator)):
            if g is not None and not callable(getattr(g, "agenerate", None)):
                raise SettingError(f"{role} must be a ponder generator (with agenerate); got {g!r}")
        if not callable(extract_answer):
            raise SettingError(f"extract_answer must be a callable (text -> answer or None); got {extract_answer!r}")
        self.generator, self.extract_answer, self.cue, self.trigger = generator, extract_answer, cue, trigger
        self.answer_generator = answer_generator or generator

    async def _once(self, prompt: str, seed: int | None) -> Generation:
        (reasoning,) = await self.generator.agenerate(prompt + self.cue, n=1, seed=seed)
        trace, answer = [reasoning], self.extract_answer(reasoning.text)
        text = reasoning.text
        if answer is None:
            (g,) = await self.answer_generator.agenerate(prompt + self.cue + reasoning.text + self.trigger, n=1,
                                                          seed=None if seed is None else seed + 1)
            trace.append(g)
            first = re.search(r"\S+", g.text)
            answer = self.extract_answer(self.trigger.strip() + g.text) or (first[0].rstrip(".") if first else None)
            text = reasoning.text + self.trigger + g.text
        return Generation(text=text, token_ids=reasoning.token_ids, logprobs=reasoning.logprobs,
                          finish_reason=trace[-1].finish_reason, usage=Usage.total(g.usage for g in trace), trace=trace,
                          meta={"strategy": self.strategy, "answer": answer, "second_call": len(trace) > 1})



class ToolUse(IndependentRuns):
    """Generation with inline tool calls. ``tools`` maps a tag to a tool: the model
    writes ``<tag>input</tag>``; at the closing tag (a stop string) the tool runs on the
    input and ``<output>result</output>`` is appended to the text; generation goes on
    until it ends for another reason or ``max_calls`` calls were made (then a call is
    answered with an error saying so). ``lm`` needs only text access."""

    strategy = "tool-use"
    overlapping_bills = True

    def __init__(self, lm: Any, tools: dict[str, Callable[[str], ToolResult]], params: SamplingParams | None = None,
                 max_calls: int = 4) -> None:
        require_access(lm, Access.TEXT, "tool use")
        if not tools or not all(isinstance(k, str) and re.fullmatch(r"[A-Za-z_][\w-]*", k) for k in tools):
            raise SettingError(f"tools must map tag names (letters, digits, _ or -) to tools; got {list(tools or {})!r}")
        bad = [k for k, t in tools.items() if not callable(t)]
        if bad:
            raise SettingError(f"tool {bad[0]!r} must be a callable text -> ToolResult")
        if not isinstance(max_calls, int) or isinstance(max_calls, bool) or max_calls < 0:
            raise SettingError(f"max_calls must be an integer >= 0; got {max_calls!r}")
        if params is not None and not isinstance(params, SamplingParams):
            raise SettingError(f"params must be a SamplingParams; got {type(params).__name__}")
        self.lm, self.tools, self.max_calls = lm, dict(tools), max_calls
        self.params = params or SamplingParams()
        self.closers = tuple(f"</{k}>" for k in self.tools)

    async def _once(self, prompt: str, seed: int | None) -> Generation:
        text, trace, calls = "", [], 0
        budget = self.params.max_tokens
        while True:
            params = self.params.replace(n=1, seed=None if seed is None else seed + 7_919 * len(trace),
                                         stop=tuple(self.params.stop) + self.closers, max_tokens=max(1, budget))
            (g,) = (await self.lm.generate([prompt + text], params))[0]
            g.meta.setdefault("link", "model")
            trace.append(g)
            text += g.text
            budget -= len(g.token_ids)
            tag = g.stop[2:-1] if isinstance(g.stop, str) and g.stop in self.closers else None
            opened = text.rfind(f"<{tag}>") if tag else -1
            if tag is None or opened < 0 or budget <= 0:
                if tag is not None:
                    text += g.stop  # a closing tag without its opening one stays as text
                break
            arg = text[opened + len(tag) + 2:]
            if calls >= self.max_calls:
                result = ToolResult(False, "", f"no more tool calls (the limit is {self.max_calls})", "error")
            else:
                result = await asyncio.to_thread(self.tools[tag], arg)
            calls += 1
            trace.append(tool_generation(result, tag))
            text += f"</{tag}>\n<output>{result.text()}</output>\n"
            if calls > self.max_calls:
                break
        model_out = [g for g in trace if "tool" not in g.meta]
        finish = "length" if budget <= 0 or calls > self.max_calls else model_out[-1].finish_reason
        return Generation(text=text, token_ids=[t for g in model_out for t in g.token_ids], finish_reason=finish,
                          usage=Usage.total(g.usage for g in trace), trace=trace,
                          meta={"strategy": self.strategy, "tool_calls": calls})

