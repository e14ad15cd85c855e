"""The results store: one SQLite file holding every generation a sweep computed.

Each row is one (configuration, model, task, problem): the answer, whether it is
right, its score, its usage (generated, computed and prompt tokens, model calls,
FLOPs, wall time), the exact configuration (JSON), the model's identity (a hash of
its weights, or its endpoint and name) and, compressed, its trace (a search's tree).
Rows are keyed by a hash of configuration, model and problem, so a repeated run is a
cache hit. Writes go in transactions (a chunk of problems at a time) with SQLite's
write-ahead log: a sweep killed at any point loses at most the chunk in flight, and
rerunning it recomputes nothing that was committed.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..errors import SettingError

SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    key TEXT PRIMARY KEY,
    config_hash TEXT NOT NULL,
    config TEXT NOT NULL,
    model TEXT NOT NULL,
    model_id TEXT NOT NULL,
    task TEXT NOT NULL,
    level TEXT NOT NULL,
    strategy TEXT NOT NULL,
    setting TEXT NOT NULL,
    problem_id TEXT NOT NULL,
    answer TEXT,
    correct INTEGER NOT NULL,
    score REAL,
    text TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    generated_tokens INTEGER NOT NULL,
    computed_tokens INTEGER NOT NULL,
    model_calls INTEGER NOT NULL,
    flops REAL NOT NULL,
    wall_s REAL NOT NULL,
    meta TEXT NOT NULL,
    trace BLOB,
    created REAL NOT NULL,
    question TEXT,
    gold TEXT
);
CREATE INDEX IF NOT EXISTS results_by_config ON results (config_hash);
CREATE TABLE IF NOT EXISTS sessions (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    started REAL NOT NULL,
    command TEXT NOT NULL,
    computed INTEGER NOT NULL DEFAULT 0,
    cached INTEGER NOT NULL DEFAULT 0
);
"""


def canonical(obj: Any) -> str:
    """JSON with sorted keys and no spaces: equal configurations give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def digest(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()


def weights_id(folder: str | Path) -> str:
    """A model's identity: the SHA-256 of its config and weight files (so a retrained
    model with the same name is a different model to the store)."""
    folder = Path(folder)
    files = sorted([*folder.glob("*.safetensors"), *folder.glob("config.json"), *folder.glob("tokenizer.json")])
    if not files:
        raise SettingError(f"{folder} holds no config.json or *.safetensors to identify the model by")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return "sha256:" + h.hexdigest()[:32]


class ResultsStore:
    """``ResultsStore(path)`` opens (or creates) the store for writing;
    ``ResultsStore(path, readonly=True)`` opens an existing one for reading only
    (``ponder report``), which works on a read-only file or folder too.

    Nothing is changed in a file before it is known to be a ponder store (or empty): a
    typo'd path or another program's SQLite file is refused as it was found, never
    switched to WAL or given ponder's tables. A store that cannot be written is refused
    for writing with what to change, not with a traceback mid-sweep."""

    TABLES = {"results", "sessions"}

    def __init__(self, path: str | Path, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        if self.path.exists() and self.path.is_dir():
            raise SettingError(f"--db {self.path} is a directory; give a file name (e.g. results.sqlite)")
        if readonly:
            self.conn = self._open_readonly()
            return
        self._check_writable()
        try:
            self.conn = sqlite3.connect(str(self.path), timeout=30)
            self._check_is_store(self.conn)
            self.conn.execute("PRAGMA journal_mode=WAL")
            self.conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a commit survives a killed process
            self.conn.executescript(SCHEMA)
            self._add_new_columns()
        except sqlite3.OperationalError as e:
            raise SettingError(f"--db {self.path} cannot be written ({e}); check its permissions and free "
                               "space, or give another --db") from None
        except sqlite3.DatabaseError as e:
            raise SettingError(f"--db {self.path} is not a ponder results store ({e})") from None

    # columns later ponders added, with their type: a store from an earlier ponder gains them
    # (empty for its old rows) when it is opened for writing
    NEW_COLUMNS = {"question": "TEXT", "gold": "TEXT"}

    def _add_new_columns(self) -> None:
        have = {r[1] for r in self.conn.execute("PRAGMA table_info(results)")}
        with self.conn:
            for name, kind in self.NEW_COLUMNS.items():
                if name not in have:
                    self.conn.execute(f"ALTER TABLE results ADD COLUMN {name} {kind}")

    def _check_writable(self) -> None:
        folder = self.path.parent if str(self.path.parent) else Path(".")
        if self.path.exists():
            if not os.access(self.path, os.W_OK):
                raise SettingError(f"--db {self.path} is read-only: a sweep writes its results there; make it "
                                   "writable or give another --db (ponder report reads a read-only store)")
        elif folder.exists() and not folder.is_dir():
            raise SettingError(f"--db {self.path}: {folder} is not a folder")
        probe = folder
        while not probe.exists():  # the first folder that exists must let us create what is missing
            probe = probe.parent
        if not os.access(probe, os.W_OK | os.X_OK):
            raise SettingError(f"--db {self.path}: the folder {probe} is read-only, and a sweep needs to write the "
                               "store and its journal there; give --db in a writable folder")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SettingError(f"--db {self.path}: cannot make its folder ({e})") from None

    def _check_is_store(self, conn: sqlite3.Connection) -> None:
        """Refuse another program's database before touching it."""
        try:
            names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except sqlite3.DatabaseError as e:
            conn.close()
            raise SettingError(f"--db {self.path} is not a ponder results store ({e})") from None
        if names and not self.TABLES <= names:
            conn.close()
            raise SettingError(f"--db {self.path} is another program's SQLite database (tables: "
                               f"{', '.join(sorted(names))}), not a ponder results store; give another --db")

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise SettingError(f"--db {self.path} does not exist; run ponder sweep first (or give --db)")
        if not os.access(self.path, os.R_OK):
            raise SettingError(f"--db {self.path} cannot be read (permissions)")
        uri = self.path.resolve().as_uri()
        last: Exception | None = None
        # mode=ro reads a WAL store that a sweep may be writing, but it makes -wal and -shm
        # files beside the store, which it cannot remove. A store whose file or folder is
        # read-only (by its permission bits, whoever we are) cannot be being written: it is
        # opened immutable, which touches nothing. Where mode=ro cannot make its files
        # (a read-only folder), immutable is tried next.
        folder = self.path.resolve().parent
        frozen = not (self.path.stat().st_mode & 0o222) or not (folder.stat().st_mode & 0o222)
        for opts in (("immutable=1",) if frozen else ("mode=ro", "immutable=1")):
            try:
                conn = sqlite3.connect(f"{uri}?{opts}", uri=True, timeout=30)
            except sqlite3.DatabaseError as e:
                last = e
                continue
            try:
                names = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
                conn.execute("SELECT count(*) FROM results").fetchone() if self.TABLES <= names else None
            except sqlite3.DatabaseError as e:  # e.g. "attempt to write a readonly database": try the next way
                conn.close()
                last = e
                continue
            self._check_is_store(conn)  # another program's database: refused by name
            return conn
        raise SettingError(f"--db {self.path} is not a ponder results store, or cannot be read ({last})")

    def close(self) -> None:
        self.conn.close()
        lock = getattr(self, "_lock", None)
        if lock is not None:
            lock.close()  # releases the flock
            self._lock = None

    def claim(self) -> None:
        """Take the store for one sweep: a second sweep on the same store would compute
        every problem the first has not committed yet, all over again. The lock is an
        flock on ``STORE.lock``, which the system releases when the process ends however
        it ends (a SIGKILLed sweep leaves no stale lock behind). Claiming twice is one claim."""
        import fcntl

        if getattr(self, "_lock", None) is not None:
            return
        lock = open(f"{self.path}.lock", "a+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            who = lock.read().strip() or "another process"
            lock.close()
            raise SettingError(f"another ponder sweep ({who}) is writing to {self.path}; wait for it to finish "
                               "(then rerun: this one resumes from what it stored), or give another --db") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}")
        lock.flush()
        self._lock = lock

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- writing ----------------------------------------------------------------------------
    def start_session(self, command: str) -> int:
        with self.conn:
            cur = self.conn.execute("INSERT INTO sessions (started, command) VALUES (?, ?)", (time.time(), command))
        return int(cur.lastrowid)

    def add(self, rows: Sequence[dict[str, Any]], session: int | None = None, cached: int = 0) -> None:
        """Insert ``rows`` (see ``row``) in one transaction, and count them (and any
        cache hits) against ``session``."""
        with self.conn:
            self.conn.executemany(f"INSERT OR REPLACE INTO results ({', '.join(ROW_FIELDS)}) "
                                  f"VALUES ({', '.join(':' + f for f in ROW_FIELDS)})",
                                  [{"question": None, "gold": None, **r} for r in rows])
            if session is not None:
                self.conn.execute("UPDATE sessions SET computed = computed + ?, cached = cached + ? WHERE id = ?",
                                  (len(rows), cached, session))

    # -- reading ----------------------------------------------------------------------------
    def done(self, keys: Iterable[str]) -> set[str]:
        keys = list(keys)
        out: set[str] = set()
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            q = f"SELECT key FROM results WHERE key IN ({','.join('?' * len(part))})"
            out |= {k for (k,) in self.conn.execute(q, part)}
        return out

    def rows(self, task: str | None = None) -> list[dict[str, Any]]:
        """Every stored result (``trace`` left compressed), optionally of one task."""
        cur = self.conn.execute("SELECT * FROM results" + (" WHERE task = ?" if task else "") + " ORDER BY rowid",
                                (task,) if task else ())
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur]

    def summary_rows(self) -> list[dict[str, Any]]:
        """One row per (task, level, model, configuration) with the sums ``summarise``
        needs (``n``, ``correct`` and the cost columns summed): what the report and the
        view's overview show, computed by SQLite without reading any trace or text."""
        cur = self.conn.execute(
            "SELECT task, level, model_id, config_hash, MIN(model) AS model, MIN(strategy) AS strategy, "
            "MIN(setting) AS setting, MIN(config) AS config, COUNT(*) AS n, SUM(correct) AS correct, "
            "SUM(generated_tokens) AS generated_tokens, SUM(computed_tokens) AS computed_tokens, "
            "SUM(flops) AS flops, SUM(wall_s) AS wall_s FROM results "
            "GROUP BY task, level, model_id, config_hash ORDER BY MIN(rowid)")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur]

    def cells(self, task: str, level: str) -> list[dict[str, Any]]:
        """What the problems table of one task shows, per stored row: no trace, no text."""
        cur = self.conn.execute(
            "SELECT key, model_id, config_hash, problem_id, correct, answer, generated_tokens, strategy, "
            "CASE WHEN strategy = 'majority' THEN meta END AS meta FROM results WHERE task = ? AND level = ? "
            "ORDER BY rowid", (task, level))
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur]

    def questions(self, task: str, level: str) -> dict[str, tuple[str | None, str | None]]:
        """{problem id: (question, gold answer)} of one task, where the rows kept them
        (a store from an older ponder has neither: {})."""
        try:
            cur = self.conn.execute("SELECT problem_id, MAX(question), MAX(gold) FROM results WHERE task = ? AND "
                                    "level = ? GROUP BY problem_id", (task, level))
        except sqlite3.OperationalError:  # no such column: an older store, opened read-only
            return {}
        return {pid: (q, g) for pid, q, g in cur}

    def sessions(self) -> list[dict[str, Any]]:
        cur = self.conn.execute("SELECT * FROM sessions ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur]

    @staticmethod
    def trace(row: dict[str, Any]) -> Any:
        """A stored row's trace, decompressed (None if it had none)."""
        return None if row.get("trace") is None else json.loads(zlib.decompress(row["trace"]))


ROW_FIELDS = ("key", "config_hash", "config", "model", "model_id", "task", "level", "strategy", "setting",
              "problem_id", "answer", "correct", "score", "text", "prompt_tokens", "generated_tokens",
              "computed_tokens", "model_calls", "flops", "wall_s", "meta", "trace", "created", "question", "gold")

Judge = Callable[[str], "tuple[str | None, bool | None]"]  # a text -> (its answer, right?); None: not judged


def row(key: str, config_hash: str, config: dict[str, Any], model: str, model_id: str, task: str, level: str,
        strategy: str, setting: dict[str, Any], problem_id: str, generation: Any, answer: str | None,
        correct: bool, decode: Callable[[list[int]], str] | None = None, question: str | None = None,
        gold: str | None = None, judge: Judge | None = None) -> dict[str, Any]:
    """A store row from one generation. Its trace: a search's tree, a meta-generator's
    samples, or (a token-level generation, given ``decode``) each token's text and
    log-probability, with the top alternatives where they were asked for.

    ``question`` (the prompt) and ``gold`` (the reference answer) are kept beside it, and
    ``judge`` marks, in the trace, each sample's answer and whether it is right, and
    each path end of a tree likewise (by the text of its whole path): so a page shows
    them without knowing the task. The sample the strategy returned is marked
    ``chosen`` by identity (its tokens are the returned output's), not by its text."""
    u = generation.usage
    trace = None
    if "tree" in generation.meta:
        trace = generation.meta["tree"]
        if judge is not None:
            trace = _judged_tree(trace, judge)
    elif generation.trace:
        trace = []
        for g in generation.trace:
            s = {"text": g.text, "score": g.score, "usage": g.usage.to_dict(), "meta": _jsonable(g.meta)}
            if judge is not None:
                s["answer"], s["correct"] = judge(g.text)
                if isinstance(s["meta"].get("tree"), dict):  # a probe's search tree (compute-optimal)
                    s["meta"]["tree"] = _judged_tree(s["meta"]["tree"], judge)
            trace.append(s)
        i = _chosen_index(generation)
        if i is not None:
            trace[i]["chosen"] = True
    elif decode is not None and generation.logprobs and len(generation.logprobs) == len(generation.token_ids):
        tops = generation.top_logprobs or [None] * len(generation.token_ids)
        trace = {"tokens": [{"t": decode([t]), "lp": round(float(lp), 5),
                             **({"top": [[decode([int(a)]), round(float(b), 5)] for a, b in top.items()]}
                                if top else {})}
                            for t, lp, top in zip(generation.token_ids, generation.logprobs, tops)]}
        if generation.meta.get("draft_rounds"):  # speculative decoding: what each round drafted and kept
            trace["rounds"] = [{"accepted": [decode([t]) for t in xs[:a]], "rejected": [decode([t]) for t in xs[a:]],
                                "added": decode([new])} for xs, a, new in generation.meta["draft_rounds"]]
    meta = {k: v for k, v in generation.meta.items() if k not in ("tree", "draft_rounds")}
    return {"key": key, "config_hash": config_hash, "config": canonical(config), "model": model, "model_id": model_id,
            "task": task, "level": level, "strategy": strategy, "setting": canonical(setting),
            "problem_id": problem_id, "answer": answer, "correct": int(bool(correct)), "score": generation.score,
            "text": generation.text, "prompt_tokens": u.prompt_tokens, "generated_tokens": u.generated_tokens,
            "computed_tokens": u.computed_tokens, "model_calls": u.model_calls, "flops": float(u.flops),
            "wall_s": float(u.wall_s), "meta": canonical(_jsonable(meta)),
            "trace": None if trace is None else zlib.compress(canonical(trace).encode(), 6), "created": time.time(),
            "question": question, "gold": None if gold is None else str(gold)}


def _chosen_index(generation: Any) -> int | None:
    """Which sample of the trace the strategy returned: the one whose token list *is* the
    output's (strategies return the chosen sample's tokens), the last such (compute-
    optimal's trace ends with what its policy ran, which may have chosen the probe it
    continued from: that is the probe's list too), else the first with the same tokens
    and text; None if the output is none of them (e.g. a refinement's rewrite)."""
    for i in range(len(generation.trace) - 1, -1, -1):
        if generation.trace[i].token_ids is generation.token_ids:
            return i
    for i, g in enumerate(generation.trace):
        if g.text == generation.text and list(g.token_ids) == list(generation.token_ids):
            return i
    return None


def _judged_tree(tree: dict[str, Any], judge: Judge) -> dict[str, Any]:
    """A copy of ``tree`` whose path ends (terminal nodes, and leaves a search stopped)
    carry ``answer`` and ``correct``: the judge's reading of the whole path's text."""
    import copy

    tree = copy.deepcopy(tree)
    stack = [(tree, "")]
    while stack:
        node, before = stack.pop()
        text = before + (node.get("step") or "")
        kids = node.get("children") or []
        if not kids and node is not tree:  # a path end: judged if it finished, else it has no answer
            node["answer"], node["correct"] = judge(text) if node.get("terminal") else (None, None)
        stack.extend((c, text) for c in kids if isinstance(c, dict))
    return tree


def _jsonable(obj: Any) -> Any:
    return json.loads(json.dumps(obj, default=str))
