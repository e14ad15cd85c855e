"""`ponder serve`, `models` and `strategies`."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from . import app, _fail
from .options import REWARD_FORMAT_HELP, _load_reward


@app.command()
def models(as_json: bool = typer.Option(False, "--json"),
           endpoint: Optional[str] = typer.Option(None, "--endpoint", help="Probe an OpenAI-compatible server "
                                                  "(URL[,URL][#MODEL]) and print what it gives: access level, n, "
                                                  "logprobs, prompt scoring, sampling.")) -> None:
    """List the shipped models and their local paths, or what a server gives (--endpoint)."""
    from ..models.config import ModelConfig
    from ..models.registry import SHIPPED, shipped_models

    if endpoint is not None:
        from .. import strategies

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
    from .. import strategies

    for s in strategies.STRATEGIES.values():
        print(f"{s.name:18s} [{s.access} access; settings: {s.describe()}] {s.help}")


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
    from .. import strategies
    from ..server.api import Limits
    from ..server.app import serve as run_server

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
