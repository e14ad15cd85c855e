"""`ponder sweep`, `report` and `view`: the results store filled, summarised and shown."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import Any, Optional

import typer

from . import app, _fail


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

    from ..sweep.run import default_config_path, load_config
    from ..sweep.store import ResultsStore

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
    from ..sweep.run import prepare
    from ..sweep.run import sweep as run_sweep

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
    from ..sweep.store import ResultsStore

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

    from ..view.app import create_app, export as write_export
    from ..view.data import open_store

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

    from ..sweep.report import markdown, plot, summarise

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
