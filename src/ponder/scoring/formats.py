"""Reward-model formats: how a public verifier reads a solution, declared once each.

A format says how a completion is split into steps, how prompt and steps are laid out
(plain text, a chat, one chat turn per step), where the head is read (a marker after
each step, each step's last token, the last token) and how the head's output becomes a
score. Each preset follows its model card exactly (sources in
``shared/docs/reward-models.md``); the in-process engine, transformers (``hf:``) and a
vLLM pooling server all read a format the same way.

| format | head | read at | score |
|---|---|---|---|
| ponder | token, 1 label | each line's end; an EOS after the text (outcome) | sigmoid |
| qwen-prm | Linear-ReLU-Linear (``score.0``/``score.2``), 2 labels | each ``<extra_0>`` of the card's chat | softmax[1] |
| qwen-orm | the same MLP, 1 label | the last token of the card's chat | raw |
| math-shepherd | the LM head's rows of ``+`` and ``-`` | each step tag ``ки`` | softmax(+, -)[+] |
| rlhflow | the same rows | the token that predicts each assistant ``+`` | softmax(+, -)[+] |
| skywork-prm | ``v_head.summary``, 1 output | the ``\\n`` after each step | sigmoid |
| token-prm | token, 2 labels (PURE) | a ``\\n`` after each step | p1 - p0 |
| trl-prm | token, 2 labels (TRL) | a ``\\n\\n`` after each step | p1 |
| step-tag | the LM head's rows of good and bad | a tag appended after each step | softmax(good, bad)[good] |
| seq-rm | sequence, 1 label | the last token of the chat | raw |

This module imports nothing heavy: the renderer needs a ``tokenizers`` tokenizer and,
for chat layouts, the checkpoint's chat template, both given to it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any, Sequence

from ..errors import SettingError
from .base import split_spec

# ponder's own format: the final answer line is read by the outcome score, not as a step
_ANSWER_LINE = re.compile(r"^\s*(answer\b|####)", re.IGNORECASE)
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class RewardFormat:
    name: str
    kind: str  # "process": a score per step; "outcome": one score per solution
    split: str  # steps are the completion split on this (empty ones dropped)
    layout: str  # "plain": prompt + steps; "chat": system?/user/assistant; "turns": one user turn per step
    head: str  # "token" | "mlp" | "value" | "lm_rows" | "seq"
    score: str  # "sigmoid" | "softmax1" | "p1_minus_p0" | "p1" | "raw" | "two_way"
    marker: str | None = None  # put after each step and read there (None: read each step's last token)
    labels: int = 1  # the head's outputs
    system: str | None = None  # the chat's system message
    joiner: str = ""  # whole: what joins the prompt and the steps (Math-Shepherd: " ")
    whole: bool = False  # plain: the card tokenises its text whole and finds the markers by id
    prompt_end: str = ""  # plain: the prompt ends with this, once (Skywork: "\n")
    good: str = "+"  # lm_rows: the tokens whose logits are compared
    bad: str = "-"
    card: str = ""

    @property
    def process(self) -> bool:
        return self.kind == "process"


PONDER = RewardFormat("ponder", "process", "\n", "plain", "token", "sigmoid",
                      card="ponder's own: LlamaForTokenClassification, 1 label, read at each line's end and at an "
                           "EOS after the solution")
PRESETS: dict[str, RewardFormat] = {f.name: f for f in (
    PONDER,
    RewardFormat("qwen-prm", "process", "\n\n", "chat", "mlp", "softmax1", marker="<extra_0>", labels=2,
                 system=QWEN_SYSTEM, card="Qwen/Qwen2.5-Math-PRM-7B (make_step_rewards)"),
    RewardFormat("qwen-orm", "outcome", "\n\n", "chat", "mlp", "raw", labels=1, system=QWEN_SYSTEM,
                 card="Qwen/Qwen2.5-Math-RM-72B"),
    RewardFormat("math-shepherd", "process", "\n", "plain", "lm_rows", "two_way", marker="ки", joiner=" ", whole=True,
                 card="peiyi9979/math-shepherd-mistral-7b-prm: question + ' ' + '\\n'.join(step + ' ки')"),
    RewardFormat("rlhflow", "process", "\n", "turns", "lm_rows", "two_way",
                 card="RLHFlow/Llama3.1-8B-PRM-*: one user turn per step, each answered '+'"),
    RewardFormat("skywork-prm", "process", "\n", "plain", "value", "sigmoid", marker="\n", prompt_end="\n",
                 card="Skywork/Skywork-o1-Open-PRM-Qwen-2.5: bos + problem + '\\n', each step + '\\n'"),
    RewardFormat("token-prm", "process", "\n\n", "plain", "token", "p1_minus_p0", marker="\n", labels=2,
                 card="jinachris/PURE-PRM-7B: a '\\n' after each step, p1 - p0"),
    RewardFormat("trl-prm", "process", "\n\n", "plain", "token", "p1", marker="\n\n", labels=2,
                 card="TRL PRMs (e.g. HuggingFaceH4/Qwen2.5-Math-1.5B-Instruct-PRM-0.2): '\\n\\n' after each step, p1"),
    RewardFormat("step-tag", "process", "\n", "plain", "lm_rows", "two_way", marker="ки",
                 card="any causal LM read at a tag token appended after each step: softmax(good, bad)[good]; "
                      "name the tokens: step-tag:marker=#,good=+,bad=-"),
    RewardFormat("seq-rm", "outcome", "\n\n", "chat", "seq", "raw", labels=1,
                 card="Skywork-Reward-V2, Llama-3.1 RMs: *ForSequenceClassification read at the last token"),
)}


# what `NAME:key=value,...` may change in a preset (a verifier trained with its own tokens)
OVERRIDABLE = ("marker", "good", "bad", "split", "system")


def preset(name: Any, where: str = "--reward-format") -> RewardFormat:
    """A preset by name, optionally with overrides: ``step-tag:marker=#,good=+,bad=-``
    (``\\n`` spells a newline). The overridden format is named by the whole spec, so
    results read with other tokens never mix with the preset's."""
    if isinstance(name, RewardFormat):
        return name
    base = name.partition(":")[0] if isinstance(name, str) else name
    if not isinstance(base, str) or base not in PRESETS:
        from .generative import GENERATIVE

        raise SettingError(f"{where} must be one of {', '.join([*PRESETS, *GENERATIVE])}; got {name!r}",
                           "reward_format")
    _, changes = split_spec(name, OVERRIDABLE, where)
    return replace(PRESETS[base], name=name, **changes) if changes else PRESETS[base]


def detect(config: dict[str, Any], where: str = "") -> RewardFormat:
    """The format a checkpoint's config.json says (``architectures``, ``num_labels``), or
    a SettingError asking for --reward-format where it cannot tell (a causal LM is the
    backbone of Math-Shepherd and of RLHFlow alike)."""
    arch = (config.get("architectures") or [""])[0]
    labels = config.get("num_labels") or len(config.get("id2label") or {}) or None
    if arch == "Qwen2ForProcessRewardModel":
        return PRESETS["qwen-prm"]
    if arch == "Qwen2ForRewardModel":
        return PRESETS["qwen-orm"]
    if arch.endswith("ForPrmModel") or "v_head" in str(config.get("auto_map", "")):
        return PRESETS["skywork-prm"]
    if arch.endswith("ForTokenClassification"):
        if (labels or 2) == 1:
            return PONDER
        return PRESETS["token-prm"]  # PURE's reading; a TRL PRM is named with --reward-format trl-prm
    if arch.endswith("ForSequenceClassification"):
        return PRESETS["seq-rm"]
    raise SettingError(f"{where or 'the checkpoint'} is not a reward model by its config ({arch or 'no architecture'}"
                       f"): a causal-LM verifier (math-shepherd, rlhflow) is named with --reward-format "
                       f"({', '.join(PRESETS)})", "reward_format")


def score_of(fmt: RewardFormat, row: Sequence[float]) -> float:
    """The format's score from the head's outputs at one position (logits, not yet mapped)."""
    if fmt.score == "sigmoid":
        x = float(row[0])
        return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    if fmt.score == "raw":
        return float(row[0])
    if fmt.score in ("softmax1", "p1", "two_way", "p1_minus_p0"):
        a, b = float(row[0]), float(row[1])
        m = max(a, b)
        ea, eb = math.exp(a - m), math.exp(b - m)
        p0, p1 = ea / (ea + eb), eb / (ea + eb)
        if fmt.score == "two_way":  # (good, bad): the good one's share
            return p0
        return p1 - p0 if fmt.score == "p1_minus_p0" else p1
    raise SettingError(f"unknown score map {fmt.score!r}")


@dataclass
class Layout:
    """One solution as the verifier reads it: token ids, the position of each step's
    score (empty for an outcome format), and where the outcome score is read (None for a
    process format, which aggregates its steps)."""

    ids: list[int]
    steps: list[int]
    outcome: int | None


class Renderer:
    """Lays a (prompt, completion) out for a format, with the verifier's own tokenizer
    (a ``tokenizers.Tokenizer``) and, for chat layouts, its chat template
    (``ponder.backends.chat.ChatTemplate``). Steps are the completion split on the
    format's separator, empty ones dropped; a step's own copy of the marker is removed,
    so that it cannot be read as another step's end."""

    def __init__(self, fmt: RewardFormat, tokenizer: Any, template: Any = None, context: int | None = None) -> None:
        self.fmt, self.tok, self.template, self.context = fmt, tokenizer, template, context
        if fmt.name == "ponder":
            raise SettingError("ponder's own format is laid out by RewardModel.layout")
        if fmt.layout in ("chat", "turns") and (template is None or getattr(template, "source", None) is None):
            raise SettingError(f"the {fmt.name} format lays the solution out as a chat: the verifier's folder needs "
                               "its chat template (chat_template.jinja or tokenizer_config.json)", "reward_model")
        # a marker found by its id in a rendered text must be one token; one appended after
        # each step (PURE's "\n", TRL's "\n\n") may be several, read at its last
        appended = fmt.layout == "plain" and not fmt.whole
        self.marker_ids = (list(tokenizer.encode(fmt.marker, add_special_tokens=False).ids) if appended
                           else [self._one(fmt.marker, "its step marker")]) if fmt.marker else []
        if fmt.marker and not self.marker_ids:
            raise SettingError(f"the {fmt.name} format's marker {fmt.marker!r} is no token at all", "reward_format")
        self.marker_id = self.marker_ids[-1] if self.marker_ids else None
        self.good_id = self._one(fmt.good, "the good label") if fmt.head == "lm_rows" else None
        self.bad_id = self._one(fmt.bad, "the bad label") if fmt.head == "lm_rows" else None

    def _one(self, text: str, what: str) -> int:
        """The one token ``text`` is, as the cards look it up (its encoding without
        special tokens; on SentencePiece vocabularies that is the ``▁``-prefixed piece)."""
        ids = self.tok.encode(text, add_special_tokens=False).ids
        if len(ids) != 1:
            raise SettingError(f"the {self.fmt.name} format reads {what} {text!r}, which is {len(ids)} tokens for this "
                               "verifier's tokenizer; it must be exactly one token (is this the right --reward-format?)",
                               "reward_format")
        return ids[0]

    def steps(self, completion: str) -> list[str]:
        out = [p for p in completion.split(self.fmt.split) if p.strip()]
        if self.fmt.marker and self.fmt.marker.strip():
            out = [p.replace(self.fmt.marker, "") for p in out]
        return [p for p in out if p.strip()]

    def _encode(self, text: str, special: bool) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=special).ids)

    def layout(self, prompt: str, completion: str) -> Layout:
        fmt = self.fmt
        steps = self.steps(completion)
        if fmt.layout == "plain":
            out = self._plain(prompt, steps, completion)
        elif fmt.layout == "chat":
            out = self._chat(prompt, steps, completion)
        else:
            out = self._turns(prompt, steps)
        if self.context is not None and len(out.ids) > self.context:
            raise SettingError(f"this solution is {len(out.ids)} tokens as the verifier reads it, past its context of "
                               f"{self.context}: a verifier cannot score what it cannot read; shorten the solution or "
                               "use a verifier with a longer context", "reward_model")
        return out

    def _plain(self, prompt: str, steps: list[str], completion: str) -> Layout:
        fmt = self.fmt
        if fmt.prompt_end:
            prompt = prompt.rstrip(fmt.prompt_end) + fmt.prompt_end
        if fmt.whole:
            # the card's text, tokenised whole (so the tag merges with its space as the card's does;
            # Math-Shepherd: question + " " + "\n".join(step + " ки")), read where the ids are the tag's
            text = prompt + fmt.joiner + fmt.split.join(f"{s} {fmt.marker}" for s in steps)
            ids = self._encode(text, True)
            reads = [i for i, t in enumerate(ids) if t == self.marker_id]
            if len(reads) != len(steps):
                raise SettingError(f"the {fmt.name} layout holds {len(reads)} step tags for {len(steps)} steps: the "
                                   "prompt holds the tag, or the tag does not stay one token beside a space",
                                   "reward_model")
            return Layout(ids, reads, None)
        # the others append ids piece by piece, as their cards do: each read position is exact
        ids = self._encode(prompt, True)
        reads: list[int] = []
        for step in steps:
            ids += self._encode(step, False) + self.marker_ids  # no marker: read at the step's last token
            reads.append(len(ids) - 1)
        return Layout(ids, reads, None)

    def _chat(self, prompt: str, steps: list[str], completion: str) -> Layout:
        fmt = self.fmt
        msgs = ([{"role": "system", "content": fmt.system}] if fmt.system else []) + [{"role": "user", "content": prompt}]
        body = "".join(s + fmt.marker for s in steps) if fmt.marker else completion
        text = self.template.render_closed(msgs + [{"role": "assistant", "content": body}])
        ids = self._encode(text, True)
        if fmt.marker:
            reads = [i for i, t in enumerate(ids) if t == self.marker_id]
            if len(reads) != len(steps):
                raise SettingError(f"the {fmt.name} layout put {len(reads)} step markers for {len(steps)} steps: the "
                                   "chat template or the prompt holds the marker", "reward_model")
            return Layout(ids, reads, None)
        return Layout(ids, [], len(ids) - 1)

    def _turns(self, prompt: str, steps: list[str]) -> Layout:
        """One user turn per step (the first: prompt + " " + step), each answered "+";
        read where the assistant's "+" is predicted: the last token of the conversation
        rendered up to that turn's generation prompt."""
        msgs: list[dict[str, str]] = []
        reads: list[int] = []
        for k, step in enumerate(steps):
            msgs.append({"role": "user", "content": (prompt + " " + step) if k == 0 else step})
            upto = self._encode(self.template.render(msgs, add_generation_prompt=True), True)
            reads.append(len(upto) - 1)
            msgs.append({"role": "assistant", "content": self.fmt.good})
        if not msgs:
            return Layout(self._encode(prompt, True), [], None)
        ids = self._encode(self.template.render_closed(msgs), True)
        return Layout(ids, reads, None)


def ponder_layout(encode: Any, prompt: str, completion: str, eos: int) -> Layout:
    """Ponder's own layout: prompt + each line (its "\\n" included) + an EOS; a step is
    a finished line that is not the answer line; the outcome is read at the EOS."""
    ids = list(encode(prompt, True))
    ends = []
    lines = completion.split("\n")
    for k, line in enumerate(lines):
        piece = line + ("\n" if k < len(lines) - 1 else "")
        if not piece:
            continue
        ids += encode(piece, False)
        if line.strip() and k < len(lines) - 1 and not _ANSWER_LINE.match(line):
            ends.append(len(ids) - 1)
    ids.append(eos)
    return Layout(ids, ends, len(ids) - 1)
