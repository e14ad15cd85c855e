"""`ponder eval`: a strategy on a task, accuracy with its interval and the bill."""

from __future__ import annotations

import json
import sys
from typing import Any, List, Optional

import typer

from ..params import SamplingParams
from . import app, _fail
from .options import REWARD_FORMAT_HELP, _load_reward, _merge_sets, _parse_pairs, _parse_sets, _split_sets, with_sampling_params


def _logged_progress(what: str, total: int, advance, live: bool):
    """The progress callback: a live bar on a terminal; elsewhere (logs, CI, a pipe) one line per
    finished chunk on stderr, and a first line as the evaluation starts, which a supervisor can wait on."""
    if live:
        return advance
    done = 0
    print(f"{what}: 0/{total} problems", file=sys.stderr, flush=True)

    def progress(k: int) -> None:
        nonlocal done
        done += k
        advance(k)
        print(f"{what}: {done}/{total} problems", file=sys.stderr, flush=True)
    return progress


@app.command("eval")
@with_sampling_params(defaults={"max_tokens": 160, "seed": 0}, exclude=("n", "logprobs"))
def eval_cmd(
    task: str = typer.Option("arith", "--task", help="A task's name (arith) or a GSM8K- or MATH-style JSONL file."),
    task_option: List[str] = typer.Option([], "--task-option", help="For a JSONL task: question_field=, "
                                          "answer_field=, id_field=, format=gsm8k|math, prompt= (repeatable)."),
    level: Optional[str] = typer.Option(None, "--level", help="The task's level (arith: easy | medium | hard | expert; default hard)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first K problems only (>= 1)."),
    model: str = typer.Option("arith", "--model", "-m"),
    strategy: str = typer.Option("greedy", "--strategy", "-s", help="greedy | sample | majority | best-of-n ..."),
    samples: Optional[int] = typer.Option(None, "--samples", help="Candidates per problem for majority / best-of-n (default 16)."),
    reward_model: Optional[str] = typer.Option(None, "--reward-model", help="Reward model for best-of-n and the searches: a shipped name (arith-reward), a folder, hf:FOLDER or URL#MODEL (vLLM --runner pooling)."),
    reward_format: Optional[str] = typer.Option(None, "--reward-format", help=REWARD_FORMAT_HELP),
    prm: Optional[str] = typer.Option(None, "--prm", help="Also report this PRM's step-score ROC-AUC on the candidates."),
    chunk: int = typer.Option(0, "--chunk", help="Problems per batch (>= 1; 0 = automatic)."),
    set_: List[str] = typer.Option([], "--set", help="Extra strategy setting KEY=VALUE (repeatable)."),
    dtype: str = typer.Option("float32", "--dtype"),
    threads: int = typer.Option(0, "--threads", help="torch threads (>= 1; 0 = leave torch's default)."),
    chat_template: Optional[str] = typer.Option(None, "--chat-template", help="Render the prompt as a user message of a chat model: auto (the model's tokenizer_config.json), a checkpoint folder, a tokenizer_config.json or a Jinja file."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
    params: SamplingParams = None,  # type: ignore[assignment]
) -> None:
    """Evaluate a strategy on a task: accuracy with a 95% CI, total and mean usage."""
    from .. import strategies
    from ..tasks.registry import load_task

    st = _check_eval_flags(limit, samples, chunk, threads, strategy)
    t = load_task(task, **_parse_pairs(task_option, "--task-option"))
    problems = t.problems(level, limit)
    params, sets = _split_sets(params, _parse_sets(set_))
    settings = _merge_sets({"samples": samples}, sets)
    import torch

    if threads:
        torch.set_num_threads(threads)
    from ..evaluate import evaluate

    lm = strategies.load_model(model, "--model", dtype)
    if hasattr(lm, "vocab_size"):
        params.check_for(lm.vocab_size)
    if chat_template is not None:  # the task's prompts become user messages; answers are checked as before
        from ..backends.chat import ChatTemplate
        from ..tasks.base import FormattedTask

        t = FormattedTask(t, ChatTemplate.load(chat_template, lm).prompt_for)
    rm = _load_reward(reward_model, "--reward-model", reward_format)
    prm_model = rm if prm and prm == reward_model else _load_reward(prm, "--prm")
    gen = strategies.build(strategy, lm, params.replace(seed=None), settings, strategies.Context(task=t, reward_model=rm))
    per = getattr(gen, "n", 1) if "samples" in st.settings else 1
    chunk = chunk or max(1, 512 // per)
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    shown_level = level or getattr(t, "default_level", None) or ("hard" if t.name == "arith" else "")
    label = f"{t.name}/{shown_level}" if shown_level else t.name
    console = Console(stderr=True)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, console=console) as bar:
        job = bar.add_task(f"{strategy} on {label}", total=len(problems))
        on_progress = _logged_progress(f"{strategy} on {label}", len(problems), lambda k: bar.advance(job, k),
                                       console.is_terminal)
        res = evaluate(t, gen, problems, chunk=chunk, seed=params.seed, prm=prm_model, on_progress=on_progress)
    res = {"task": t.name, "level": shown_level, "model": lm.name, "strategy": strategy,
           "settings": {**params.to_dict(), **{k: v for k, v in settings.items() if v is not None}},
           "seed": params.seed, **res}
    if as_json:
        print(json.dumps(res))
        return
    _print_eval(res, f"{strategy} on {label}")


def _check_eval_flags(limit: int | None, samples: int | None, chunk: int, threads: int, strategy: str) -> Any:
    """The eval command's numbers and strategy, checked; the strategy's registration."""
    from .. import strategies

    if limit is not None and limit < 1:
        _fail(f"--limit must be >= 1; got {limit}")
    if samples is not None and samples < 1:
        _fail(f"--samples must be >= 1; got {samples}")
    if chunk < 0:
        _fail(f"--chunk must be >= 1 (or 0 for automatic); got {chunk}")
    if threads < 0:
        _fail(f"--threads must be >= 1 (or 0 for torch's default); got {threads}")
    if strategy not in strategies.STRATEGIES:
        _fail(f"--strategy {strategy!r} is unknown; choose one of: {', '.join(strategies.STRATEGIES)}")
    st = strategies.STRATEGIES[strategy]
    if samples is not None and "samples" not in st.settings:
        _fail(f"--samples applies to strategies that draw several candidates (majority, best-of-n, prm-beam, ...); "
              f"not {strategy}")
    return st


def _print_eval(res: dict[str, Any], what: str) -> None:
    lo, hi = res["ci95"]
    print(f"{what}: accuracy {res['accuracy']:.3f} "
          f"(95% CI {lo:.3f}-{hi:.3f}, {res['correct']}/{res['problems']})")
    for key in ("pass_at_n", "majority_of_samples", "prm_step_auc"):
        if key in res and res[key] is not None:
            print(f"  {key}: {res[key]:.3f}")
    u, m = res["usage_total"], res["usage_per_problem"]
    print(f"  usage total: {u['generated_tokens']} generated, {u['computed_tokens']} computed tokens, "
          f"{u['flops']:.3g} FLOPs, {u['wall_s']:.1f}s")
    print(f"  per problem: {m['generated_tokens']:.1f} generated, {m['computed_tokens']:.1f} computed tokens, "
          f"{m['flops']:.3g} FLOPs, {m['wall_s']:.3f}s")
