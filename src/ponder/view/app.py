"""The server of `ponder view`: the page with the overview, and on demand a task's
problems and one generation's trace. Read only: the store is opened read-only for each
request, so a sweep may go on writing it and a reload shows its new rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from .data import ViewError, everything, generation, open_store, overview, problems
from .page import error_page, render


def create_app(db: str | Path) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="ponder view", docs_url=None, redoc_url=None, openapi_url=None)
    cached: dict[str, Any] = {}

    def state() -> tuple:
        """What the store is now: its file's and its write-ahead log's size and time (a
        sweep writing it changes one of them)."""
        out = []
        for suffix in ("", "-wal"):
            try:
                st = Path(f"{db}{suffix}").stat()
                out += [st.st_size, st.st_mtime_ns]
            except OSError:
                out += [None, None]
        return tuple(out)

    def summary(store: Any) -> dict[str, Any]:
        """The overview, computed once per state of the store (100,000 rows take 0.2 s to
        add up; the page asks for it on every load)."""
        now = state()
        if cached.get("state") != now:
            cached.update(state=now, overview=overview(store))
        return cached["overview"]

    def with_store(read: Callable[[Any], Any]) -> Any:
        try:
            store = open_store(db)
        except ViewError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        try:
            return JSONResponse(read(store))
        except ViewError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        finally:
            store.close()

    @app.get("/", response_class=HTMLResponse)
    def index() -> Any:
        try:
            store = open_store(db)
        except ViewError as e:
            return HTMLResponse(error_page(str(e)), status_code=404)
        try:
            return HTMLResponse(render({**summary(store), "mode": "serve"}))
        finally:
            store.close()

    @app.get("/api/problems/{task:path}")
    def task_problems(task: str) -> Any:
        def read(store: Any) -> Any:
            tasks = summary(store)["tasks"]
            if task not in tasks:
                raise ViewError(f"the store has no task {task!r}; its tasks: {', '.join(tasks) or 'none'}")
            return problems(store, task, tasks[task]["settings"])
        return with_store(read)

    @app.get("/api/generation/{key}")
    def one(key: str) -> Any:
        return with_store(lambda store: generation(store, key))

    return app


def export(db: str | Path, out: str | Path) -> Path:
    """The page with every problem and generation inline (compressed): one file that
    opens from disk."""
    store = open_store(db)
    try:
        data = {**everything(store), "mode": "export"}
    finally:
        store.close()
    out = Path(out)
    out.write_text(render(data), encoding="utf-8")
    return out
