"""Where `ponder serve --trace-store FILE` keeps the traces of requests made with
``ponder.trace: true``: rows of a results store (task "serve", one per output, keyed by
the response id and output index), so `ponder view --db FILE` opens them as it opens a
sweep's. Live requests have no answer key: their rows are marked unjudged
(``meta.unjudged``) and the page shows no accuracy for them.

SQLite connections belong to one thread: every write runs on this writer's own thread,
off the event loop, and a write that fails is logged, never failing the request."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
from pathlib import Path
from typing import Any

from ..sweep.store import ResultsStore, canonical, digest, row

log = logging.getLogger("ponder.serve")


class TraceWriter:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="ponder-traces")
        self.store: ResultsStore | None = None
        # open (and check) the store now, on the writer's thread: a bad path fails at start
        self.pool.submit(self._open).result()

    def _open(self) -> None:
        self.store = ResultsStore(self.path)

    def _write(self, rows: list[dict[str, Any]]) -> None:
        assert self.store is not None
        self.store.add(rows)

    async def write(self, response_id: str, model: str, strategy: str, settings: dict[str, Any],
                    extract: Any, outs: list[Any], questions: list[str] | None = None) -> list[str]:
        """Store each output of one response, with the prompt it answered (``questions``,
        one per output); returns their keys (the view's ids). No answer key: each
        sample's and path end's answer is kept (``extract``), none is judged."""
        config = {"strategy": strategy, "settings": settings, "source": "serve"}
        chash = digest(canonical(config))
        judge = (lambda text: (extract(text), None)) if extract is not None else (lambda text: (None, None))
        rows = []
        for i, g in enumerate(outs):
            answer = extract(g.text) if extract is not None else None
            g.meta = {**g.meta, "unjudged": True}
            rows.append(row(f"{response_id}-{i}", chash, config, model, model, "serve", "", strategy, settings,
                            f"{response_id}-{i}", g, answer, False, judge=judge,
                            question=questions[i] if questions and i < len(questions) else None))
        try:
            await asyncio.get_running_loop().run_in_executor(self.pool, self._write, rows)
        except Exception as e:  # the answer is already computed: keep it, say what was lost
            log.warning("could not store the traces of %s in %s: %s", response_id, self.path, e)
            return []
        return [r["key"] for r in rows]

    def close(self) -> None:
        if self.store is not None:
            self.pool.submit(self.store.close).result()
        self.pool.shutdown()
