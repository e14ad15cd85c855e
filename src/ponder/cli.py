"""The ``ponder`` command: generate, eval, models."""

from __future__ import annotations

import json
import sys
from typing import Any, Optional

import typer
from typer import Abort, Exit

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


def _load_lm(model: str, dtype: str):
    from .models.native import NativeLM

    try:
        return NativeLM.from_pretrained(model, dtype=dtype)
    except ValueError as e:
        _fail(str(e))


def _parse_sets(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for kv in pairs:
        if "=" not in kv:
            _fail(f"--set takes KEY=VALUE; got {kv!r}")
        k, v = kv.split("=", 1)
        try:
            out[k.strip().replace("-", "_")] = json.loads(v)
        except json.JSONDecodeError:
            out[k.strip().replace("-", "_")] = v
    return out


def _settings(strategy: str, temperature, top_k, top_p, min_p, max_tokens, stop, sets, **more) -> dict[str, Any]:
    from .decoding.processors import ADAPTER_DEFAULTS

    s: dict[str, Any] = {"max_tokens": max_tokens, "stop": list(stop) if stop else None}
    adapters = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    **{k: more.pop(k) for k in list(more) if k in ADAPTER_DEFAULTS})
    if strategy != "greedy":
        s.update(adapters)
    else:
        changed = ["--" + k.replace("_", "-") for k, v in adapters.items() if v != ADAPTER_DEFAULTS[k]]
        if changed:
            _fail(f"{', '.join(changed)} only apply to sampling strategies; use --strategy sample")
    s.update({k: v for k, v in more.items() if v is not None})
    s.update(_parse_sets(sets))
    return s


def _history_settings(lm_encode, repetition_penalty, frequency_penalty, presence_penalty, no_repeat_ngram,
                      min_tokens, logit_bias, bad_words) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if repetition_penalty != 1.0:
        out["repetition_penalty"] = repetition_penalty
    if frequency_penalty:
        out["frequency_penalty"] = frequency_penalty
    if presence_penalty:
        out["presence_penalty"] = presence_penalty
    if no_repeat_ngram:
        out["no_repeat_ngram_size"] = no_repeat_ngram
    if min_tokens:
        out["min_tokens"] = min_tokens
    if logit_bias:
        try:
            out["logit_bias"] = {int(k): float(v) for k, v in json.loads(logit_bias).items()}
        except (ValueError, AttributeError, TypeError):
            _fail('--logit-bias takes a JSON object of token id to bias, e.g. \'{"17": -100}\'')
    if bad_words:
        out["bad_words_ids"] = [lm_encode(w) for w in bad_words]
    return out


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt text."),
    model: str = typer.Option("arith", "--model", "-m", help="A shipped model's name or a local checkpoint folder."),
    strategy: str = typer.Option("greedy", "--strategy", "-s", help="greedy | sample | ... (see `ponder strategies`)."),
    max_tokens: int = typer.Option(128, "--max-tokens", help="Most tokens to generate (>= 1)."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (> 0)."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus mass in (0, 1] (1 = off)."),
    min_p: float = typer.Option(0.0, "--min-p", help="Min-p in [0, 1] (0 = off)."),
    n: int = typer.Option(1, "--n", help="Number of outputs (>= 1)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed; the same seed gives the same output."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable); not included in the output."),
    typical_p: float = typer.Option(1.0, "--typical-p", help="Typical sampling mass in (0, 1] (1 = off)."),
    epsilon: float = typer.Option(0.0, "--epsilon", help="Epsilon sampling cut-off in [0, 1) (0 = off)."),
    eta: float = typer.Option(0.0, "--eta", help="Eta sampling in [0, 1) (0 = off)."),
    top_n_sigma: float = typer.Option(0.0, "--top-n-sigma", help="Top-n-sigma, n >= 0 (0 = off)."),
    mirostat: int = typer.Option(0, "--mirostat", help="Mirostat version 1 or 2 (0 = off); target surprise --mirostat-tau."),
    mirostat_tau: float = typer.Option(5.0, "--mirostat-tau", help="Mirostat target surprise in bits (> 0)."),
    mirostat_eta: float = typer.Option(0.1, "--mirostat-eta", help="Mirostat learning rate in (0, 1]."),
    repetition_penalty: float = typer.Option(1.0, "--repetition-penalty", help="> 0 (1 = off)."),
    frequency_penalty: float = typer.Option(0.0, "--frequency-penalty", help="In [-2, 2] (0 = off)."),
    presence_penalty: float = typer.Option(0.0, "--presence-penalty", help="In [-2, 2] (0 = off)."),
    no_repeat_ngram: int = typer.Option(0, "--no-repeat-ngram", help="Ban repeated n-grams of this size (0 = off)."),
    min_tokens: int = typer.Option(0, "--min-tokens", help="Generate at least this many tokens before EOS."),
    logit_bias: Optional[str] = typer.Option(None, "--logit-bias", help='JSON {"token_id": bias}.'),
    bad_words: list[str] = typer.Option([], "--bad-words", help="Text never to generate (repeatable)."),
    num_beams: Optional[int] = typer.Option(None, "--num-beams", help="Beams for the beam strategies (>= 1; default 4)."),
    length_penalty: Optional[float] = typer.Option(None, "--length-penalty", help="Beam score = sum logprob / length**L (default 1)."),
    early_stopping: bool = typer.Option(False, "--early-stopping", help="Beam search stops once num_beams hypotheses are finished."),
    num_beam_groups: Optional[int] = typer.Option(None, "--num-beam-groups", help="Groups for diverse beam search."),
    diversity_penalty: Optional[float] = typer.Option(None, "--diversity-penalty", help="Diverse beam search penalty (>= 0)."),
    reward_model: Optional[str] = typer.Option(None, "--reward-model", help="Reward model for reward-guided / smc / best-of-n (e.g. arith-reward)."),
    json_schema: Optional[str] = typer.Option(None, "--json-schema", help="Constrain the output to this JSON schema (a file path or inline JSON)."),
    regex: Optional[str] = typer.Option(None, "--regex", help="Constrain the output to match this regex."),
    grammar: Optional[str] = typer.Option(None, "--grammar", help="Constrain the output to this Lark grammar file (llguidance dialect)."),
    choice: list[str] = typer.Option([], "--choice", help="Constrain the output to one of these strings (repeatable)."),
    token_healing: bool = typer.Option(False, "--token-healing", help="Back off the prompt's last token and let the model re-spell it."),
    speculative: Optional[str] = typer.Option(None, "--speculative", help="draft (with --draft-model) or ngram (prompt lookup): lossless speculative decoding."),
    draft_model: str = typer.Option("arith-draft", "--draft-model", help="Draft model for --speculative draft."),
    draft_tokens: str = typer.Option("4", "--draft-tokens", help="Tokens drafted per step (>= 1), or auto (adaptive)."),
    set_: list[str] = typer.Option([], "--set", help="Extra strategy setting KEY=VALUE (repeatable)."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of streaming text."),
    raw: bool = typer.Option(False, "--raw", help="Take PROMPT literally (do not read \\n and \\t as escapes)."),
) -> None:
    """Generate text from PROMPT, streaming it as it comes. The escapes \\n and \\t in
    PROMPT become a newline and a tab (shells do not do it inside quotes) unless --raw."""
    from . import strategies

    if not raw:
        prompt = prompt.replace("\\n", "\n").replace("\\t", "\t")
    if not prompt:
        _fail("PROMPT is empty; give some text to continue")
    if n < 1:
        _fail(f"--n must be >= 1; got {n}")
    if speculative is not None:
        if speculative not in ("draft", "ngram"):
            _fail(f"--speculative takes 'draft' or 'ngram'; got {speculative!r}")
        if strategy not in ("greedy", "sample"):
            _fail("--speculative works with --strategy greedy or sample")
        if draft_tokens != "auto" and not (draft_tokens.isdigit() and int(draft_tokens) >= 1):
            _fail(f"--draft-tokens takes an integer >= 1 or 'auto'; got {draft_tokens!r}")
        k = json.dumps(draft_tokens) if draft_tokens == "auto" else draft_tokens
        dm = "ngram" if speculative == "ngram" else draft_model
        set_ = list(set_) + [f"draft_model={json.dumps(dm)}", f"num_draft_tokens={k}"]
        if strategy == "greedy":
            set_.append("temperature=0")
        strategy = "speculative"
    lm = _load_lm(model, dtype)
    history = _history_settings(lambda w: lm.encode(w, add_special_tokens=False), repetition_penalty,
                                frequency_penalty, presence_penalty, no_repeat_ngram, min_tokens, logit_bias, bad_words)
    settings = _settings(strategy, temperature, top_k, top_p, min_p, max_tokens, stop, set_, typical_p=typical_p,
                         epsilon=epsilon, eta=eta, top_n_sigma=top_n_sigma, num_beams=num_beams,
                         **(dict(mirostat_tau=mirostat_tau, mirostat_eta=mirostat_eta, mirostat_version=mirostat)
                            if mirostat else {}),
                         length_penalty=length_penalty, early_stopping=early_stopping or None,
                         num_beam_groups=num_beam_groups, diversity_penalty=diversity_penalty,
                         json_schema=json_schema, regex=regex, grammar=grammar, choice=list(choice) or None,
                         token_healing=token_healing or None, **history)
    rm = None
    if reward_model:
        from .scoring.reward import RewardModel

        try:
            rm = RewardModel.from_pretrained(reward_model)
        except ValueError as e:
            _fail(f"--reward-model: {e}")
    gen = strategies.build(strategy, lm, settings, strategies.Context(reward_model=rm))
    if as_json:
        gens = gen.generate_batch([prompt], n=n, seed=seed)[0]
        from .types import Usage

        print(json.dumps({
            "model": lm.name, "strategy": strategy, "prompt": prompt,
            "generations": [g.to_dict() for g in gens],
            "usage": Usage.total(g.usage for g in gens).to_dict(),
        }))
        return
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


@app.command("eval")
def eval_cmd(
    task: str = typer.Option("arith", "--task", help="Task name (arith) or a GSM8K-style JSONL file."),
    level: str = typer.Option("hard", "--level", help="arith level: easy | medium | hard."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate the first K problems only."),
    model: str = typer.Option("arith", "--model", "-m"),
    strategy: str = typer.Option("greedy", "--strategy", "-s", help="greedy | sample | majority | best-of-n ..."),
    samples: int = typer.Option(16, "--samples", help="Candidates per problem for majority / best-of-n."),
    temperature: float = typer.Option(1.0, "--temperature"),
    top_k: int = typer.Option(0, "--top-k"),
    top_p: float = typer.Option(1.0, "--top-p"),
    min_p: float = typer.Option(0.0, "--min-p"),
    max_tokens: int = typer.Option(160, "--max-tokens"),
    reward_model: Optional[str] = typer.Option(None, "--reward-model", help="Reward model for best-of-n (e.g. arith-reward)."),
    prm: Optional[str] = typer.Option(None, "--prm", help="Also report this PRM's step-score ROC-AUC on the candidates."),
    seed: int = typer.Option(0, "--seed"),
    chunk: int = typer.Option(0, "--chunk", help="Problems per batch (0 = automatic)."),
    set_: list[str] = typer.Option([], "--set", help="Extra strategy setting KEY=VALUE (repeatable)."),
    dtype: str = typer.Option("float32", "--dtype"),
    threads: int = typer.Option(0, "--threads", help="torch threads (0 = leave torch's default)."),
    as_json: bool = typer.Option(False, "--json", help="Print the results as one JSON object."),
) -> None:
    """Evaluate a strategy on a task: accuracy with a 95% CI, total and mean usage."""
    import torch

    from . import strategies
    from .evaluate import evaluate
    from .scoring.reward import RewardModel
    from .tasks.arith import ArithTask
    from .tasks.base import JsonlTask

    if threads:
        torch.set_num_threads(threads)
    if limit is not None and limit < 1:
        _fail(f"--limit must be >= 1; got {limit}")
    if samples < 1:
        _fail(f"--samples must be >= 1; got {samples}")
    if task == "arith":
        t = ArithTask()
        try:
            problems = t.problems(level, limit)
        except ValueError as e:
            _fail(f"--level: {e}")
    elif task.endswith(".jsonl"):
        t = JsonlTask(task)
        problems = t.problems(limit=limit)
    else:
        _fail(f"--task must be 'arith' or a .jsonl file; got {task!r}")
    settings = _settings(strategy, temperature, top_k, top_p, min_p, max_tokens, [], set_)
    if strategies.STRATEGIES.get(strategy) and strategies.STRATEGIES[strategy].meta:
        settings["samples"] = samples
    lm = _load_lm(model, dtype)
    rm = RewardModel.from_pretrained(reward_model) if reward_model else None
    prm_model = rm if prm and prm == reward_model else (RewardModel.from_pretrained(prm) if prm else None)
    gen = strategies.build(strategy, lm, settings, strategies.Context(task=t, reward_model=rm))
    per = samples if strategies.STRATEGIES[strategy].meta else 1
    chunk = chunk or max(1, 512 // per)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  transient=True, console=__import__("rich.console").console.Console(stderr=True)) as bar:
        job = bar.add_task(f"{strategy} on {t.name}/{level}", total=len(problems))
        res = evaluate(t, gen, problems, chunk=chunk, seed=seed, prm=prm_model,
                       on_progress=lambda k: bar.advance(job, k))
    res = {"task": t.name, "level": level, "model": lm.name, "strategy": strategy,
           "settings": {k: v for k, v in settings.items() if v is not None}, "seed": seed, **res}
    if as_json:
        print(json.dumps(res))
        return
    lo, hi = res["ci95"]
    print(f"{strategy} on {t.name}/{level}: accuracy {res['accuracy']:.3f} "
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
def models(as_json: bool = typer.Option(False, "--json")) -> None:
    """List the shipped models and their local paths."""
    from .models.config import ModelConfig
    from .models.registry import SHIPPED, shipped_models

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
        print(f"{s.name:12s} {s.help}")


def main(argv: list[str] | None = None) -> None:
    from .decoding.processors import SettingError

    try:
        app(args=argv, standalone_mode=False)
    except Exit as e:
        sys.exit(e.exit_code)
    except Abort:
        sys.exit(130)
    except ClickException as e:
        param = getattr(e, "param", None)
        msg = e.format_message()
        opts = getattr(param, "opts", None) if param is not None else None
        where = f"{'/'.join(opts)}: " if opts and opts[0] not in msg else ""
        if msg:
            print(f"error: {where}{msg}", file=sys.stderr)
        sys.exit(2)
    except (CliError, SettingError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
