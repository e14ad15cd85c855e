"""`ponder generate` (streamed or JSON) and `ponder score` (a verifier on one solution)."""

from __future__ import annotations

import json
import sys
from typing import Any, List, Optional

import typer

from ..params import SamplingParams
from . import app, _fail
from .options import REWARD_FORMAT_HELP, _load_reward, _merge_sets, _parse_sets, _split_sets, _unescape, with_sampling_params


# -- commands -------------------------------------------------------------------------------
@app.command()
@with_sampling_params(defaults={"max_tokens": 128})
def generate(
    prompt: str = typer.Argument(..., help="The prompt text."),
    model: str = typer.Option("arith", "--model", "-m", help="A shipped model's name or a local checkpoint folder."),
    strategy: str = typer.Option("greedy", "--strategy", "-s", help="greedy | sample | ... (see `ponder strategies`)."),
    num_beams: Optional[int] = typer.Option(None, "--num-beams", help="Beams for the beam strategies (>= 1)."),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", help="Beam score = sum logprob / length**L."),
    early_stopping: bool = typer.Option(False, "--early-stopping", help="Beam search stops once num_beams hypotheses are finished."),
    num_beam_groups: Optional[int] = typer.Option(None, "--num-beam-groups", help="Groups for diverse beam search."),
    diversity_penalty: Optional[float] = typer.Option(None, "--diversity-penalty", help="Diverse beam search penalty (>= 0)."),
    reward_model: Optional[str] = typer.Option(None, "--reward-model", help="Reward model for reward-guided / smc / best-of-n: a shipped name (arith-reward), a folder, hf:FOLDER or URL#MODEL (vLLM --runner pooling)."),
    reward_format: Optional[str] = typer.Option(None, "--reward-format", help=REWARD_FORMAT_HELP),
    json_schema: Optional[str] = typer.Option(None, "--json-schema", help="Constrain the output to this JSON schema (a file path or inline JSON)."),
    regex: Optional[str] = typer.Option(None, "--regex", help="Constrain the output to match this regex."),
    grammar: Optional[str] = typer.Option(None, "--grammar", help="Constrain the output to this Lark grammar file (llguidance dialect)."),
    choice: List[str] = typer.Option([], "--choice", help="Constrain the output to one of these strings (repeatable)."),
    speculative: Optional[str] = typer.Option(None, "--speculative", help="draft (with --draft-model) or ngram (prompt lookup): lossless speculative decoding."),
    draft_model: str = typer.Option("arith-draft", "--draft-model", help="Draft model for --speculative draft."),
    draft_tokens: str = typer.Option("5", "--draft-tokens", help="Tokens drafted per step (1-64), or auto (adaptive)."),
    set_: List[str] = typer.Option([], "--set", help="Extra strategy setting KEY=VALUE (repeatable)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Render the prompt as a user message of a chat model: auto (the model's tokenizer_config.json), a checkpoint folder, a tokenizer_config.json or a Jinja file."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    raw: bool = typer.Option(False, "--raw", help="Take PROMPT literally (do not read \\n and \\t as escapes)."),
    params: SamplingParams = None,  # type: ignore[assignment]  (the flags above it, validated)
) -> None:
    """Generate text from PROMPT, streaming it as it comes. The escapes \\n and \\t in
    PROMPT become a newline and a tab (shells do not do it inside quotes) unless --raw."""
    from .. import strategies

    if not raw:
        prompt = _unescape(prompt)
    if not prompt:
        _fail("PROMPT is empty; give some text to continue")
    params, sets = _split_sets(params, _parse_sets(set_))
    flags: dict[str, Any] = dict(num_beams=num_beams, length_penalty=length_penalty,
                                 early_stopping=early_stopping or None, num_beam_groups=num_beam_groups,
                                 diversity_penalty=diversity_penalty, json_schema=json_schema, regex=regex,
                                 grammar=grammar, choice=list(choice) or None)
    settings = _merge_sets(flags, sets)
    if speculative is not None:
        strategy, params = _speculative_flags(speculative, strategy, draft_model, draft_tokens, params, settings)
    lm = strategies.load_model(model, "--model", dtype)
    if hasattr(lm, "vocab_size"):
        params.check_for(lm.vocab_size)
    if chat_template is not None:
        from ..backends.chat import ChatTemplate

        prompt = ChatTemplate.load(chat_template, lm).prompt_for(prompt)
    rm = _load_reward(reward_model, "--reward-model", reward_format)
    gen = strategies.build(strategy, lm, params.replace(n=1, seed=None), settings, strategies.Context(reward_model=rm))
    if as_json:
        gens = gen.generate_batch([prompt], n=params.n, seed=params.seed)[0]
        from ..types import Usage

        print(json.dumps({
            "model": lm.name, "strategy": strategy, "prompt": prompt, "params": params.to_dict(),
            "generations": [g.to_dict() for g in gens],
            "usage": Usage.total(g.usage for g in gens).to_dict(),
        }))
        return
    _print_generations(gen, prompt, params.n, params.seed)


def _speculative_flags(speculative: str, strategy: str, draft_model: str, draft_tokens: str, params: SamplingParams,
                       settings: dict[str, Any]) -> tuple[str, SamplingParams]:
    """--speculative draft|ngram as the speculative strategy's settings (into
    ``settings``); greedy's temperature 0 kept."""
    if speculative not in ("draft", "ngram"):
        _fail(f"--speculative takes 'draft' or 'ngram'; got {speculative!r}")
    if strategy not in ("greedy", "sample"):
        _fail("--speculative works with --strategy greedy or sample")
    if draft_tokens != "auto" and not (draft_tokens.isdigit() and 1 <= int(draft_tokens) <= 64):
        _fail(f"--draft-tokens takes an integer in [1, 64] or 'auto'; got {draft_tokens!r}")
    settings.update(draft_model="ngram" if speculative == "ngram" else draft_model,
                    num_draft_tokens=draft_tokens if draft_tokens == "auto" else int(draft_tokens))
    return "speculative", params.replace(temperature=0.0) if strategy == "greedy" else params


def _print_generations(gen: Any, prompt: str, n: int, seed: int | None) -> None:
    """Stream one generation as it comes (where the strategy streams), else print each."""
    if n == 1 and hasattr(gen, "stream"):
        last = "\n"
        for ev in gen.stream(prompt, seed=seed):
            if ev.text:
                sys.stdout.write(ev.text)
                sys.stdout.flush()
                last = ev.text
        if not last.endswith("\n"):
            sys.stdout.write("\n")
        return
    if n == 1:
        text = gen.generate_batch([prompt], n=1, seed=seed)[0][0].text
        sys.stdout.write(text if text.endswith("\n") else text + "\n")
        return
    for i, g in enumerate(gen.generate_batch([prompt], n=n, seed=seed)[0]):
        print(f"--- {i} ({g.finish_reason}) ---")
        print(g.text)


@app.command("score")
def score_cmd(
    reward_model: str = typer.Option(..., "--reward-model", help="A shipped name, a checkpoint folder, hf:FOLDER, or "
                                     "URL[,URL]#MODEL (vLLM --runner pooling)."),
    prompt: str = typer.Option(..., "--prompt", help="The question, as the policy saw it."),
    completion: str = typer.Option(..., "--completion", help="The solution to score."),
    reward_format: Optional[str] = typer.Option(None, "--reward-format", help=REWARD_FORMAT_HELP),
    aggregation: str = typer.Option("min", "--aggregation", help="A process model's one score from its steps: min, "
                                    "product, last or mean."),
    raw: bool = typer.Option(False, "--raw", help="Take the texts literally (do not read \\n and \\t as escapes)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object: steps, score, format."),
) -> None:
    """Score one solution with a verifier: each step's score and the solution's.

    A process model's score is the aggregation of its steps (min by default); an outcome
    model gives one score and no steps; ponder's own format gives its outcome score."""
    from ..scoring.base import AGGREGATIONS, aggregate

    if aggregation not in AGGREGATIONS:
        _fail(f"--aggregation must be one of {', '.join(AGGREGATIONS)}; got {aggregation!r}")
    if not raw:
        prompt, completion = _unescape(prompt), _unescape(completion)
    if not completion.strip():
        _fail("--completion is empty: give the solution to score")
    rm = _load_reward(reward_model, "--reward-model", reward_format)
    fmt = rm.fmt
    scored = rm.score_steps(prompt, [completion]) if fmt.process else None
    steps = scored.steps[0] if scored is not None else []
    if fmt.name == "ponder" or not fmt.process:
        scored = rm.score(prompt, [completion])
        score = scored.values[0]
    else:
        score = aggregate(steps, aggregation, empty=0.0)
    unparsed = scored.meta.get("unparsed")  # a generative verifier's unreadable verdicts
    if as_json:
        print(json.dumps({"steps": steps, "score": score, "format": fmt.name,
                          "aggregation": aggregation if fmt.process and fmt.name != "ponder" else None,
                          **({"unparsed": unparsed} if unparsed is not None else {})}))
        return
    for k, v in enumerate(steps, 1):
        print(f"step {k}: {v:.6f}")
    how = ("outcome" if fmt.name == "ponder" or not fmt.process else aggregation + " of the steps")
    print(f"score ({how}, {fmt.name} format): {score:.6f}")
    if unparsed:
        print(f"{unparsed} verdict(s) could not be read and scored {rm.fmt.unparsed} (see --reward-format)")
