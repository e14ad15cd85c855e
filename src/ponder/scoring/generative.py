"""Generative verifiers: a language model writes a critique, then a verdict, and the
score is the verdict's probability, P(yes) / (P(yes) + P(no)), read from the top-k
log-probabilities at the verdict token.

* GenPRM (Zhao et al. 2025, RyanLiu112/GenPRM ``get_reward_score``): the critique ends
  in ``\\boxed{Yes}`` or ``\\boxed{No}``; the score is read at the token after
  ``\\boxed{``; a critique with no verdict scores 0.5.
* ThinkPRM (Khalifa et al. 2025, mukhal/ThinkPRM ``prm/thinkprm_api.py``): after the
  verification chain of thought, ``"\\nIs the solution correct? "`` is appended and the
  normalised probability of ``yes`` among ``yes, no`` is the score.

Both are one recipe with two settings: the ``cue`` after which the verdict comes, and
whether the cue is appended when the critique does not write it (``force``). The
critique is generated with the cue as a stop string; a second one-token call on
prompt + critique + cue returns the verdict's top-k distribution (on a server with
prefix caching, or ponder's engine, that call recomputes nothing but its last token).
So the verifier needs only text and top-k log-probabilities: any OpenAI-compatible
completions endpoint, or a local model. A verdict that cannot be read (no cue, or
neither word among the top-k) scores ``unparsed`` and is counted in ``Scores.meta``.

As a process reward model, step k's value is the verdict on the solution cut after
step k (each distinct cut is judged once per verifier: a search asks again and again).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..errors import SettingError
from ..params import SamplingParams
from ..protocols import Access, require_access
from ..types import Usage
from .base import ProcessReward, Scores, aggregate, run_sync, split_spec


@dataclass(frozen=True)
class VerdictFormat:
    name: str
    template: str  # {question}, {solution}: what the verifier is asked (rendered as its chat's user turn)
    cue: str  # the verdict token follows this
    force: bool  # append the cue when the critique ends without it (ThinkPRM) or score `unparsed` (GenPRM)
    yes: tuple[str, ...]
    no: tuple[str, ...]
    split: str = "\n"  # a process verifier's steps
    top_k: int = 20
    unparsed: float = 0.5
    max_tokens: int = 1024  # the critique's length
    card: str = ""

    @property
    def process(self) -> bool:  # a verdict on each cut of the solution: a PRM (and an ORM on the whole)
        return True


GENERATIVE: dict[str, VerdictFormat] = {f.name: f for f in (
    VerdictFormat(
        "genprm",
        "Question: {question}\n\nSolution:\n{solution}\n\nReview and critique the solution step by step, then give "
        "your judgement of whether it is correct as **Judgement**: $\\boxed{{Yes}}$ or $\\boxed{{No}}$.",
        cue="\\boxed{", force=False, yes=("Yes",), no=("No",),
        card="GenPRM: the verdict after \\boxed{, P(Yes)/(P(Yes)+P(No)) from the top-20, 0.5 if unparsed"),
    VerdictFormat(
        "thinkprm",
        "You are given a math problem and a proposed step-by-step solution:\n\n[Math Problem]\n\n{question}\n\n"
        "[Solution]\n\n{solution}\n\nReview and critique each step in the proposed solution to determine whether "
        "each step is correct. If the solution is incomplete, only verify the provided steps.",
        cue="\nIs the solution correct? ", force=True, yes=("yes", "Yes"), no=("no", "No"),
        card="ThinkPRM: 'Is the solution correct? ' appended, P(yes)/(P(yes)+P(no))"),
)}


def generative_format(spec: Any) -> VerdictFormat | None:
    """The generative format ``spec`` names (``genprm``, ``thinkprm``, with optional
    overrides ``NAME:cue=Answer: ,yes=5,no=4,top_k=264``), or None if it names none."""
    if isinstance(spec, VerdictFormat):
        return spec
    if not isinstance(spec, str):
        return None
    name = spec.partition(":")[0]
    if name not in GENERATIVE:
        return None
    _, raw = split_spec(spec, ("cue", "yes", "no", "top_k", "max_tokens", "unparsed", "split", "force"),
                        empty_ok=True, hint=" (yes/no words joined by '|')")
    if not raw:
        return GENERATIVE[name]
    changes: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("yes", "no"):
            changes[key] = tuple(w for w in value.split("|") if w)
        elif key in ("top_k", "max_tokens"):
            changes[key] = _int(value, key)
        elif key == "unparsed":
            changes[key] = _float(value, key)
        elif key == "force":
            changes[key] = value.lower() in ("1", "true", "yes")
        else:
            changes[key] = value
    return replace(GENERATIVE[name], name=spec, **changes)


def _int(value: str, key: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise SettingError(f"--reward-format: {key} must be an integer; got {value!r}", "reward_format") from None


def _float(value: str, key: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise SettingError(f"--reward-format: {key} must be a number; got {value!r}", "reward_format") from None


CHAT_REFUSED = ("a generative verifier continues its own critique with the cue: give the completions endpoint "
                "(the URL without /chat/completions)")


class GenerativeVerifier:
    """A generative verifier over ``lm`` (an in-process model or an OpenAI-compatible
    completions endpoint). ``chat``: the verifier's ``ChatTemplate`` (its folder's),
    which renders the question as a user turn; None lays the template out as plain text."""

    def __init__(self, lm: Any, fmt: VerdictFormat | str = "genprm", chat: Any = None, aggregation: str = "min",
                 name: str | None = None) -> None:
        require_access(lm, Access.LOGPROBS, "a generative verifier (it reads the verdict's top-k log-probabilities)")
        f = generative_format(fmt)
        if f is None:
            raise SettingError(f"a generative verifier's format must be one of {', '.join(GENERATIVE)}; got {fmt!r}",
                               "reward_format")
        if not f.cue:
            raise SettingError("a generative verifier needs a cue: the text its verdict token follows", "reward_format")
        if not f.yes or not f.no or set(f.yes) & set(f.no):
            raise SettingError(f"yes {f.yes!r} and no {f.no!r} must be non-empty and disjoint", "reward_format")
        if not 1 <= f.top_k <= 10_000:
            raise SettingError(f"top_k must be in [1, 10000]; got {f.top_k}", "reward_format")
        if not 0.0 <= f.unparsed <= 1.0:
            raise SettingError(f"unparsed must be in [0, 1]; got {f.unparsed}", "reward_format")
        if f.max_tokens < 1:
            raise SettingError(f"max_tokens (the critique's length) must be >= 1; got {f.max_tokens}", "reward_format")
        if getattr(lm, "chat", False):
            raise SettingError(CHAT_REFUSED, "reward_model")
        if not hasattr(lm, "decode") and getattr(lm, "tokenizer", None) is None and getattr(lm, "tokens_as_ids", False):
            raise SettingError(f"{getattr(lm, 'endpoint', 'the server')} names top-k tokens by id: the verifier needs its "
                               "tokenizer to read them (name a shipped model or local folder after '#', or set "
                               "PONDER_REWARD_TOKENIZER to its folder)", "reward_model")
        aggregate([], aggregation)  # validates the name
        self.lm, self.fmt, self.chat, self.aggregation = lm, f, chat, aggregation
        self.name = name or f"{getattr(lm, 'name', 'lm')}/{f.name}"
        # (question, solution) -> (score, unparsed, the critique)
        self._memo: dict[tuple[str, str], tuple[float, bool, str]] = {}
        self._lock = threading.Lock()

    # -- the recipe ----------------------------------------------------------------------
    def ask(self, question: str, solution: str) -> str:
        """What the verifier is given: the template, as its chat's user turn if it has one."""
        text = self.fmt.template.format(question=question.strip(), solution=solution.strip())
        if self.chat is not None and getattr(self.chat, "source", None) is not None:
            return self.chat.render([{"role": "user", "content": text}], add_generation_prompt=True)
        return text

    def _word(self, key: Any) -> str | None:
        """A top-k entry's token as text (an id decoded by the verifier's tokenizer)."""
        if isinstance(key, str):
            return key
        if hasattr(self.lm, "decode"):
            return self.lm.decode([key], skip_special_tokens=False)
        tok = getattr(self.lm, "tokenizer", None)
        return tok.decode([key], skip_special_tokens=False) if tok is not None else None

    def verdict(self, top: dict[Any, float] | None) -> float | None:
        """P(yes) / (P(yes) + P(no)) over the top-k entries whose token, stripped, is a
        yes or a no word (several spellings add up); None if neither is among them."""
        p_yes = p_no = 0.0
        for key, lp in (top or {}).items():
            word = self._word(key)
            if word is None:
                continue
            word = word.strip()
            if word in self.fmt.yes:
                p_yes += math.exp(lp)
            elif word in self.fmt.no:
                p_no += math.exp(lp)
        return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else None

    async def _judge(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[float, bool, str]], Usage]:
        """Judge each (question, solution): critique up to the cue, then the verdict.
        Returns (score, unparsed, critique) per pair, and the bill."""
        asks = [self.ask(q, s) for q, s in pairs]
        critique = SamplingParams(temperature=0.0, max_tokens=self.fmt.max_tokens, stop=(self.fmt.cue,))
        gens = [g[0] for g in await self.lm.generate(asks, critique)]
        usage = Usage.total(g.usage for g in gens)
        cued = [i for i, g in enumerate(gens) if self.fmt.force or (g.finish_reason == "stop" and g.stop == self.fmt.cue)]
        out = [(self.fmt.unparsed, True, g.text) for g in gens]
        if cued:
            read = SamplingParams(temperature=0.0, max_tokens=1, logprobs=self.fmt.top_k)
            verdicts = await self.lm.generate([asks[i] + gens[i].text + self.fmt.cue for i in cued], read)
            for i, v in zip(cued, verdicts):
                usage = usage + v[0].usage
                p = self.verdict(v[0].top_logprobs[0] if v[0].top_logprobs else None)
                if p is not None:
                    out[i] = (p, False, gens[i].text)
        return out, usage

    async def _judged(self, pairs: list[tuple[str, str]]) -> tuple[list[tuple[float, bool, str]], Usage]:
        """``_judge`` over the pairs not judged before (each distinct pair once); every
        pair's (score, unparsed, critique), and the bill of what was judged now."""
        with self._lock:
            new = list(dict.fromkeys(p for p in pairs if p not in self._memo))
        usage = Usage()
        if new:
            got, usage = await self._judge(new)
            with self._lock:
                self._memo.update(zip(new, got))
        with self._lock:
            return [self._memo[p] for p in pairs], usage

    @staticmethod
    def _meta(got: list[tuple[float, bool, str]]) -> dict[str, Any]:
        return {"unparsed": sum(u for _, u, _ in got), "critiques": [c for _, _, c in got]}

    # -- the scorer contract ---------------------------------------------------------------
    def score(self, prompt: str, completions: Sequence[str]) -> Scores:
        """Outcome: one verdict on each whole solution."""
        got, usage = run_sync(self._judged([(prompt, c) for c in completions]))
        return Scores([v for v, _, _ in got], usage, meta=self._meta(got))

    def cuts(self, completion: str) -> list[str]:
        """The solution cut after each of its steps."""
        steps = [s for s in completion.split(self.fmt.split) if s.strip()]
        return [self.fmt.split.join(steps[: k + 1]) for k in range(len(steps))]

    async def _steps(self, prompt: str, completions: Sequence[str], aggregation: str) -> Scores:
        cuts = [self.cuts(c) for c in completions]
        got, usage = await self._judged([(prompt, c) for cs in cuts for c in cs])
        steps, k = [], 0
        for cs in cuts:
            steps.append([v for v, _, _ in got[k : k + len(cs)]])
            k += len(cs)
        values = [aggregate(s, aggregation, empty=0.0) for s in steps]
        return Scores(values, usage, steps, meta=self._meta(got))

    def score_steps(self, prompt: str, completions: Sequence[str], aggregation: str | None = None) -> Scores:
        """Process: step k's value is the verdict on the solution cut after step k."""
        return run_sync(self._steps(prompt, completions, aggregation or self.aggregation))

    def score_steps_many(self, requests: Sequence[tuple[str, Sequence[str]]],
                         aggregation: str | None = None) -> list[Scores]:
        """Several problems' paths at once (their critiques run concurrently, so the
        engine or the server batches them), each billed its own."""
        import asyncio

        how = aggregation or self.aggregation

        async def run() -> list[Scores]:
            return list(await asyncio.gather(*(self._steps(p, cs, how) for p, cs in requests)))

        return run_sync(run())

    def prm(self, aggregation: str = "last") -> ProcessReward:
        """This verifier as a step scorer whose ``score`` aggregates the steps."""
        return ProcessReward(self, aggregation)

    def clear_cache(self) -> None:
        with self._lock:
            self._memo.clear()
