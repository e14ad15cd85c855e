"""The page: one HTML document with its style, script and data inline, so the served
page and the exported file are the same and neither asks for anything else.

An exported file holds every problem and trace. They are gzip-compressed and base64'd
into a script element of their own, and the page reads them with the browser's
``DecompressionStream``: a 4,800-row store's traces are several times smaller so."""

from __future__ import annotations

import base64
import gzip
import html
import json
from importlib import resources
from typing import Any
from urllib.parse import quote

TEMPLATE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>ponder view</title>
<style>{css}</style></head>
<body><header><a href="#/"><b>ponder view</b></a><a href="#/">overview</a>{links}<span class="store">{store}</span></header>
<main id="app"></main><div id="tooltip" class="tooltip"></div>
<script id="ponder-data" type="application/json">{data}</script>
<script id="ponder-packed" type="application/octet-stream">{packed}</script>
<script>{js}</script></body></html>
"""


def _static(name: str) -> str:
    return resources.files("ponder.view").joinpath("static", name).read_text(encoding="utf-8")


def _inline_json(obj: Any) -> str:
    # inside <script>, "</" would end the element: escape it (and the other HTML-significant
    # characters) so any text in a trace is inert
    return (json.dumps(obj, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")
            .replace("&", "\\u0026"))


def task_href(task: str) -> str:
    """The link to a task's problems: the task URL-encoded (it may hold '/', '#', '?'),
    then HTML-escaped for the attribute."""
    return html.escape("#/problems/" + quote(task, safe=""), quote=True)


def render(data: dict[str, Any]) -> str:
    """The page for ``data`` (``overview()`` plus ``mode``: "serve" or "export"; an
    export also has ``problems`` and ``generations``, which go in compressed)."""
    light = {k: v for k, v in data.items() if k not in ("problems", "generations")}
    heavy = {k: data[k] for k in ("problems", "generations") if k in data}
    packed = base64.b64encode(gzip.compress(json.dumps(heavy, separators=(",", ":")).encode(), 6,
                                            mtime=0)).decode() if heavy else ""
    links = "".join(f'<a href="{task_href(t)}">{html.escape(t)} problems</a>' for t in data.get("tasks", {}))
    return TEMPLATE.format(css=_static("view.css"), js=_static("view.js"), data=_inline_json(light), links=links,
                           store=html.escape(str(data.get("store", ""))), packed=packed)


def error_page(message: str, status_hint: str = "") -> str:
    """A page for what cannot be shown at all (no store, a corrupt one): what and what to do."""
    return ("<!doctype html><html><head><meta charset='utf-8'><link rel='icon' href='data:,'><title>ponder view: "
            f"cannot open the store</title><style>{_static('view.css')}</style></head><body><header><b>ponder view</b>"
            f"</header><main><div class='error' id='error'><h2>Cannot open the store</h2><p>{html.escape(message)}</p>"
            f"{('<p>' + html.escape(status_hint) + '</p>') if status_hint else ''}</div></main></body></html>")
