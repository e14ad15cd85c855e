"""The server of `ponder view`: the page and, on demand, one generation's trace. Read
only: the store is opened read-only for each request, so a sweep may go on writing it
and a reload shows its new rows."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .data import ViewError, generation, open_store, overview
from .page import error_page, render


def create_app(db: str | Path) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import HTMLResponse, JSONResponse

    app = FastAPI(title="ponder view", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/", response_class=HTMLResponse)
    def index() -> Any:
        try:
            store = open_store(db)
        except ViewError as e:
            return HTMLResponse(error_page(str(e)), status_code=404)
        try:
            return HTMLResponse(render({**overview(store), "mode": "serve"}))
        finally:
            store.close()

    @app.get("/api/generation/{key}")
    def one(key: str) -> Any:
        try:
            store = open_store(db)
        except ViewError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        try:
            return JSONResponse(generation(store, key))
        except ViewError as e:
            return JSONResponse({"error": str(e)}, status_code=404)
        finally:
            store.close()

    return app


def export(db: str | Path, out: str | Path) -> Path:
    """The page with every generation inline: one file that opens from disk."""
    from .data import all_generations

    store = open_store(db)
    try:
        rows = store.rows()  # read once: the overview and every generation come from them
        data = {**overview(store, rows), "mode": "export", "generations": all_generations(rows)}
    finally:
        store.close()
    out = Path(out)
    out.write_text(render(data), encoding="utf-8")
    return out
