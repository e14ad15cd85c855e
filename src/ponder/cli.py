"""The ``ponder`` command: generate, eval, sweep, report, models, strategies.

The token-level flags are not written here: they are derived from ``SamplingParams``'
fields (their names, defaults, legal ranges and help), so the CLI, the library and the
server cannot drift apart. Every bad input gets one line naming the argument and
exit status 2; Ctrl-C exits with 130.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
import os
import sys
from dataclasses import fields
from typing import Any, Callable, List, Optional

import typer
from typer import Abort, Exit

from .errors import BackendError, InvalidLogitsError, SettingError
from .protocols import AccessError
from .params import SamplingParams, field_help

# click's base exception, whichever click typer runs on (its own vendored copy in newer
# releases, the click package before): found through typer's public BadParameter.
ClickException = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="ponder: inference-time algorithms for language models.",
)


class CliError(Exception):
    """An error to report as one line and exit status 2."""


def _fail(msg: str) -> None:
    raise CliError(msg)


# -- flags from SamplingParams -----------------------------------------------------------------
def _flag_type(name: str, default: Any) -> tuple[Any, Any]:
    """(annotation, CLI default) of a SamplingParams field."""
    if name == "logit_bias":
        return Optional[str], None  # JSON on the command line
    if name in ("stop", "bad_words"):
        return List[str], []
    if name == "stop_token_ids":
        return List[int], []
    if name == "seed":
        return Optional[int], default
    return type(default), default


def with_sampling_params(defaults: dict[str, Any] | None = None, exclude: tuple[str, ...] = ()) -> Callable:
    """Give a command one flag per ``SamplingParams`` field (``--top-p``, ``--seed``...)
    and hand it the validated ``params``."""
    defaults = defaults or {}

    def deco(fn: Callable) -> Callable:
        sig = inspect.signature(fn)
        added, names = [], []
        for f in fields(SamplingParams):
            if f.name in exclude:
                continue
            help_, legal, alias = field_help(f.name)
            ann, default = _flag_type(f.name, defaults.get(f.name, SamplingParams.default(f.name)))
            flags = ["--" + f.name.replace("_", "-")] + ([alias] if alias else [])
            opt = typer.Option(default, *flags, help=f"{help_} [{legal}]")
            added.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=ann))
            names.append(f.name)

        @functools.wraps(fn)
        def wrapper(**kw: Any) -> Any:
            raw = {k: kw.pop(k) for k in names}
            return fn(params=_params_from_flags(raw, defaults), **kw)

        wrapper.__signature__ = sig.replace(parameters=[p for p in sig.parameters.values() if p.name != "params"] + added)
        wrapper.__annotations__ = {**{k: v for k, v in fn.__annotations__.items() if k != "params"},
                                   **{p.name: p.annotation for p in added}}
        return wrapper

    return deco


def _params_from_flags(raw: dict[str, Any], defaults: dict[str, Any]) -> SamplingParams:
    raw = dict(raw)
    if raw.get("logit_bias") is not None:
        try:
            bias = json.loads(raw["logit_bias"])
            raw["logit_bias"] = {int(k): float(v) for k, v in bias.items()}
        except (ValueError, AttributeError, TypeError):
            _fail('--logit-bias takes a JSON object of token id to bias, e.g. \'{"17": -100}\'')
    else:
        raw.pop("logit_bias", None)
    return SamplingParams(**raw)


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        if "=" not in kv:
            _fail(f"--set takes KEY=VALUE; got {kv!r}")
        k, v = kv.split("=", 1)
        key = k.strip().replace("-", "_")
        if not key:
            _fail(f"--set takes KEY=VALUE; got {kv!r}")
        try:
            out[key] = json.loads(v)
        except json.JSONDecodeError:
            out[key] = v
    return out


def _merge_sets(flags: dict[str, Any], sets: dict[str, Any]) -> dict[str, Any]:
    """A command's named flags and its ``--set`` pairs, one value per setting: a setting
    given both ways is an error naming both spellings."""
    both = [k for k, v in flags.items() if v is not None and k in sets]
    if both:
        _fail(f"{both[0]} is given twice: --{both[0].replace('_', '-')} and --set {both[0]}=...; give it once")
    return {**{k: v for k, v in flags.items() if v is not None or k not in sets}, **sets}


def _parse_pairs(pairs: list[str], flag: str) -> dict[str, str]:
    out = {}
    for kv in pairs:
        k, sep, v = kv.partition("=")
        if not sep or not k.strip():
            _fail(f"{flag} takes KEY=VALUE; got {kv!r}")
        out[k.strip()] = v
    return out


def _split_sets(params: SamplingParams, sets: dict[str, Any]) -> tuple[SamplingParams, dict[str, Any]]:
    """``--set`` may also give a SamplingParams field; it is validated like a flag."""
    fields_ = {k: sets.pop(k) for k in list(sets) if k in SamplingParams.__dataclass_fields__}
    return (params.replace(**fields_) if fields_ else params), sets


# -- loading --------------------------------------------------------------------------------
def _unescape(text: str) -> str:
    """The escapes \\n and \\t a shell argument spells, as the characters they stand for."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def _load_reward(name: str | None, flag: str, fmt: str | None = None):
    """A verifier by spec (a shipped name, a folder, hf:FOLDER, URL#MODEL), in ``fmt``."""
    if not name:
        return None
    from .strategies import load_reward_model

    try:
        return load_reward_model(name, flag, fmt)
    except SettingError as e:
        _fail(str(e))


REWARD_FORMAT_HELP = ("The verifier's format (ponder, qwen-prm, qwen-orm, math-shepherd, rlhflow, skywork-prm, "
                      "token-prm, trl-prm, step-tag, seq-rm; generative: genprm, thinkprm), with overrides as "
                      "NAME:key=value,... (step-tag:marker=#,good=+,bad=-); default: what its config.json says. "
                      "A URL needs it unless its #MODEL is a local folder or shipped name.")


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
    from . import strategies

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
        from .backends.chat import ChatTemplate

        prompt = ChatTemplate.load(chat_template, lm).prompt_for(prompt)
    rm = _load_reward(reward_model, "--reward-model", reward_format)
    gen = strategies.build(strategy, lm, params.replace(n=1, seed=None), settings, strategies.Context(reward_model=rm))
    if as_json:
        gens = gen.generate_batch([prompt], n=params.n, seed=params.seed)[0]
        from .types import Usage

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
    from .scoring.base import AGGREGATIONS, aggregate

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


@app.command("eval")
@with_sampling_params(defaults={"max_tokens": 160, "seed": 0}, exclude=("n", "logprobs"))
def eval_cmd(
    task: str = typer.Option("arith", "--task", help="A task's name (arith) or a GSM8K- or MATH-style JSONL file."),
    task_option: List[str] = typer.Option([], "--task-option", help="For a JSONL task: question_field=, "
                                          "answer_field=, id_field=, format=gsm8k|math, prompt= (repeatable)."),
    level: Optional[str] = typer.Option(None, "--level", help="The task's level (arith: easy | medium | hard; default hard)."),
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
    from . import strategies
    from .tasks.registry import load_task

    st = _check_eval_flags(limit, samples, chunk, threads, strategy)
    t = load_task(task, **_parse_pairs(task_option, "--task-option"))
    problems = t.problems(level, limit)
    params, sets = _split_sets(params, _parse_sets(set_))
    settings = _merge_sets({"samples": samples}, sets)
    import torch

    if threads:
        torch.set_num_threads(threads)
    from .evaluate import evaluate

    lm = strategies.load_model(model, "--model", dtype)
    if hasattr(lm, "vocab_size"):
        params.check_for(lm.vocab_size)
    if chat_template is not None:  # the task's prompts become user messages; answers are checked as before
        from .backends.chat import ChatTemplate
        from .tasks.base import FormattedTask

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
    from . import strategies

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


@app.command()
def models(as_json: bool = typer.Option(False, "--json"),
           endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Probe an OpenAI-compatible server "
                                                  "(URL[,URL][#MODEL]) and print what it gives: access level, n, "
                                                  "logprobs, prompt scoring, sampling.")) -> None:
    """List the shipped models and their local paths, or what a server gives (--endpoint)."""
    from .models.config import ModelConfig
    from .models.registry import SHIPPED, shipped_models

    if endpoint is not None:
        from . import strategies

        caps = strategies.load_endpoint(endpoint, "--endpoint").capabilities()
        if as_json:
            print(json.dumps(caps))
        else:
            for k, v in caps.items():
                print(f"{k:15s} {v}")
        return

    rows = []
    for name, path in shipped_models().items():
        cfg = ModelConfig.from_file(path / "config.json")
        rows.append({"name": name, "path": str(path), "parameters": cfg.num_parameters(),
                     "kind": "reward" if cfg.is_reward_model else "causal-lm", "description": SHIPPED[name]})
    if as_json:
        print(json.dumps(rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("name", "kind", "parameters", "path")
    for r in rows:
        table.add_row(r["name"], r["kind"], f"{r['parameters']:,}", r["path"])
    Console().print(table)


@app.command("strategies")
def list_strategies() -> None:
    """List the strategies that --strategy accepts."""
    from . import strategies

    for s in strategies.STRATEGIES.values():
        own = ", ".join(s.settings) or "-"
        print(f"{s.name:18s} [{s.access} access; settings: {own}] {s.help}")


@app.command()
def sweep(
    config: Optional[str] = typer.Argument(None, help="A sweep file (TOML); default: the shipped sweep of arith hard."),
    db: Optional[str] = typer.Option(None, "--db", help="The results store (SQLite); default: the file's db, "
                                     "else ponder-results.sqlite."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Cap every task at its first K problems (>= 1)."),
    threads: int = typer.Option(1, "--threads", help="torch threads (>= 1)."),
    out: Optional[str] = typer.Option("ponder-report", "--report", help="Write the report (report.md, report.json, "
                                      "plots) to this folder after the sweep; '' to skip."),
) -> None:
    """Run a grid of strategies x settings x tasks x models into the results store;
    rerunning resumes and recomputes nothing that was stored."""
    from rich.console import Console

    from .sweep.run import default_config_path, load_config
    from .sweep.store import ResultsStore

    if limit is not None and limit < 1:
        _fail(f"--limit must be >= 1; got {limit}")
    if threads < 1:
        _fail(f"--threads must be >= 1; got {threads}")
    import torch

    torch.set_num_threads(threads)
    cfg = load_config(config or default_config_path())
    if limit is not None:
        for t in cfg.tasks:
            t["limit"] = min(limit, t.get("limit") or limit)
    from .sweep.run import prepare
    from .sweep.run import sweep as run_sweep

    prepared = prepare(cfg)  # every model, task and run checked before the store is opened
    store = ResultsStore(db or cfg.db or "ponder-results.sqlite")
    store.claim()  # before the progress bar: a refusal is one line
    with sweep_progress(Console(stderr=True)) as (bar, progress):
        try:
            counts = run_sweep(prepared, store, " ".join(sys.argv), on_progress=progress)
        except KeyboardInterrupt:
            bar.stop()
            saved = sum(s["computed"] for s in store.sessions()[-1:])
            store.close()
            print(f"interrupted: {saved} results of this run are saved in {store.path} (every finished chunk); "
                  "rerun the same command to resume from there", file=sys.stderr)
            sys.stderr.flush()
            os._exit(130)  # not sys.exit: the engine's worker threads would finish their chunk first
    print(f"sweep: {counts['computed']} problems computed, {counts['cached']} already in {store.path}",
          file=sys.stderr)
    _print_report(store, out or None, configs=counts["configs"])  # this sweep's rows, not all the store's


@app.command()
def serve(
    model: str = typer.Option("arith", "--model", "-m", help="A shipped model's name or a local checkpoint folder."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PONDER_API_KEY",
                                          help="Require Authorization: Bearer KEY (or set PONDER_API_KEY)."),
    reward_model: Optional[str] = typer.Option(None, "--reward-model", help="Reward model the strategies may use: a shipped name (arith-reward), a folder, hf:FOLDER or URL#MODEL (vLLM --runner pooling)."),
    reward_format: Optional[str] = typer.Option(None, "--reward-format", help=REWARD_FORMAT_HELP),
    task: Optional[str] = typer.Option("arith", "--task", help="Task whose answer format voting strategies read (ponder.task overrides)."),
    max_tokens: int = typer.Option(4096, "--max-tokens-limit", help="Largest max_tokens a request may ask (also capped by the context)."),
    max_n: int = typer.Option(64, "--max-n", help="Largest number of generations a request may ask or spend: n, and n times a strategy's samples, beams, particles or iterations."),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", help="Largest request body."),
    max_inflight: int = typer.Option(256, "--max-inflight", help="Requests served at once; beyond, 429 with Retry-After."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16."),
    trace_store: Optional[str] = typer.Option(None, "--trace-store", help="Keep the traces of requests made with "
                                              "ponder.trace: true in this results store, for ponder view --db."),
) -> None:
    """Serve MODEL over the OpenAI API (/v1/completions, /v1/chat/completions, /v1/models,
    /health), with continuous batching and every strategy through the `ponder` field."""
    from . import strategies
    from .server.api import Limits
    from .server.app import serve as run_server

    for flag, v, lo in (("--port", port, 1), ("--max-tokens-limit", max_tokens, 1), ("--max-n", max_n, 1),
                        ("--max-body-bytes", max_body_bytes, 1024), ("--max-inflight", max_inflight, 1)):
        if v < lo or (flag == "--port" and v > 65535):
            _fail(f"{flag} must be >= {lo}{' and <= 65535' if flag == '--port' else ''}; got {v}")
    lm = strategies.load_model(model, "--model", dtype)
    if not hasattr(lm, "engine") and not hasattr(lm, "vocab_size"):
        _fail("--model: ponder serve runs a model in-process; give a shipped name or a checkpoint folder")
    rm = _load_reward(reward_model, "--reward-model", reward_format)
    print(f"ponder serve: {lm.name} on http://{host}:{port}/v1", file=sys.stderr)
    run_server(lm, host=host, port=port, reward_model=rm, task=task, api_key=api_key or None,
               limits=Limits(max_tokens=max_tokens, max_n=max_n, max_body_bytes=max_body_bytes,
                             max_inflight=max_inflight), trace_store=trace_store)


@contextlib.contextmanager
def sweep_progress(console: Any) -> Any:
    """The sweep's progress line: the run's name, cut to what the terminal leaves after
    the accuracy, the bar, the count and the ETA (in 80 columns the count used to be
    cut off). Gives (progress, update(state))."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn("{task.description}"), BarColumn(bar_width=None if console.width > 100 else 10),
                   MofNCompleteColumn(), TextColumn("ETA"), TimeRemainingColumn(), transient=True, console=console)
    room = max(12, console.width - 50)  # accuracy 10, bar 10, count up to 11 ("1200/2600"), ETA 12, gaps 5
    with bar:
        job = bar.add_task("sweep", total=None)

        def update(st: dict) -> None:
            acc = st["correct"] / st["scored"] if st["scored"] else 0.0
            name = st["run"] if len(st["run"]) <= room else st["run"][: room - 1] + "…"
            bar.update(job, total=st["total"], completed=st["done"], description=f"{name:{room}s} acc {acc:.3f}")

        yield bar, update


@app.command()
def report(
    db: str = typer.Option("ponder-results.sqlite", "--db", help="The results store a sweep wrote."),
    out: Optional[str] = typer.Option("ponder-report", "--out", help="Folder for report.md, report.json and the "
                                      "plots; '' to print only."),
    task: Optional[str] = typer.Option(None, "--task", help="Only this task (its name, e.g. arith)."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON instead of markdown."),
) -> None:
    """Tables and plots of quality against compute, from the store alone (nothing is recomputed)."""
    from .sweep.store import ResultsStore

    _print_report(ResultsStore(db, readonly=True), out or None, task, as_json)


@app.command()
def view(
    db: str = typer.Option("ponder-results.sqlite", "--db", help="The results store a sweep wrote."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to bind (127.0.0.1: this machine only)."),
    port: int = typer.Option(8100, "--port", help="TCP port."),
    export: Optional[str] = typer.Option(None, "--export", help="Write the page, every trace inline, to this HTML "
                                         "file (it opens from disk, no server) instead of serving it."),
) -> None:
    """A web page over the store: the frontier, the problems, each generation's samples or search tree."""
    from pathlib import Path

    from .view.app import create_app, export as write_export
    from .view.data import open_store

    if not 1 <= port <= 65535:
        _fail(f"--port must be >= 1 and <= 65535; got {port}")
    open_store(db).close()  # a missing or corrupt store is said now, not on the first page load
    if export:
        out = Path(export)
        if out.is_dir():
            _fail(f"--export {export} is a folder; give a file name (e.g. view.html)")
        try:
            path = write_export(db, out)
        except OSError as e:
            _fail(f"--export {export} cannot be written ({e.strerror})")
        print(f"ponder view: wrote {path} ({path.stat().st_size / 1e6:.1f} MB); open it in a browser", file=sys.stderr)
        return
    import socket

    import uvicorn

    try:  # a port already in use: one line that says what to change, not uvicorn's Errno
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((host, port))
    except OSError as e:
        import errno

        if e.errno == errno.EADDRINUSE:
            _fail(f"--port {port}: the port is already in use on {host} (another ponder view?); give another --port")
        _fail(f"--host {host} --port {port}: cannot listen there ({e.strerror})")
    print(f"ponder view: {db} on http://{host}:{port}/", file=sys.stderr)
    uvicorn.run(create_app(db), host=host, port=port, log_level="warning")


def _print_report(store: Any, out: Optional[str], task: Optional[str] = None, as_json: bool = False,
                  configs: Optional[set] = None) -> None:
    from pathlib import Path

    from .sweep.report import markdown, plot, summarise

    summary = summarise([r for r in store.rows(task) if configs is None or r["config_hash"] in configs])
    if not summary:
        _fail(f"the store {store.path} holds no results" + (f" for task {task}" if task else ""))
    text = markdown(summary)
    print(json.dumps(summary) if as_json else text)
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "report.md").write_text(text)
        (folder / "report.json").write_text(json.dumps(summary, indent=1))
        try:
            pngs = plot(summary, folder)
        except ImportError:
            print(f"report written to {folder} (no plots: pip install matplotlib)", file=sys.stderr)
        else:
            print(f"report written to {folder}: report.md, report.json, {', '.join(p.name for p in pngs)}",
                  file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    try:
        rc = app(args=argv, standalone_mode=False)
        if rc == 130:  # typer hands back Ctrl-C as an exit code when not standalone
            print("error: interrupted", file=sys.stderr)
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except Exit as e:
        sys.exit(e.exit_code)
    except (Abort, KeyboardInterrupt):
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    except ClickException as e:
        param = getattr(e, "param", None)
        msg = e.format_message()
        opts = getattr(param, "opts", None) if param is not None else None
        where = f"{'/'.join(opts)}: " if opts and opts[0] not in msg else ""
        if msg:
            print(f"error: {where}{msg}", file=sys.stderr)
        sys.exit(2)
    except (CliError, SettingError, InvalidLogitsError, AccessError) as e:
        flag = _flag_for(argv, getattr(e, "setting", None))
        where = f"{flag}: " if flag and flag.split(" ")[0] not in str(e) else ""
        print(f"error: {where}{e}", file=sys.stderr)
        sys.exit(2)
    except BackendError as e:  # a server failed after the bounded retries: not the user's input
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except BrokenPipeError:
        sys.exit(0)


def _flag_for(argv: list[str] | None, setting: str | None) -> str | None:
    """The command-line flag that sets ``setting`` in the command being run (``--top-k``,
    ``--level``), or ``--set NAME`` for a strategy's own setting; None when it has none."""
    if not setting:
        return None
    args = sys.argv[1:] if argv is None else argv
    try:
        import typer.main

        group = typer.main.get_command(app)
        cmd = next((group.commands[a] for a in args if a in getattr(group, "commands", {})), None)
    except Exception:  # naming the flag is a courtesy; the error itself is printed regardless
        return None
    if cmd is None:
        return None
    opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
    flag = "--" + setting.replace("_", "-")
    if flag in opts:
        return flag
    return f"--set {setting}" if "--set" in opts else None


if __name__ == "__main__":
    main()
