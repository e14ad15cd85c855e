"""What `ponder view` shows, read from a results store: the frontier per task (the
numbers of `ponder report`), one cell per (problem, setting), and each row's trace.
Plain data (JSON-able dicts), so the served page and the exported file show the same.

The served overview reads only what it shows: per-configuration sums that SQLite adds
up (no trace, no text), so it loads in the same time for 4,800 rows or 100,000. A
task's problems table and a generation's trace are read when the page asks for them.

A trace is one of the shapes ponder writes: a step-level search's tree (a dict with
``children``), a parallel method's samples (a list of ``{text, score, usage, meta}``),
or a token-level row's tokens (``{tokens: [{t, lp, top?}], rounds?}``). The sweep
stores, beside them, what a page cannot work out without the task: the question (the
prompt), the gold answer, each sample's and path end's answer and whether it is right,
and which sample the strategy returned. Rows of an older ponder lack these; the page
falls back to the task's extractor where this ponder knows the task. Anything else
(a trace from an older ponder) is returned as it is, marked ``"kind": "unknown"``,
and the page shows it raw with a note instead of failing.
"""

from __future__ import annotations

import functools
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ..errors import SettingError
from ..sweep.report import summarise_sums, task_label
from ..sweep.store import ResultsStore

LIVE = "serve"  # the task of requests `ponder serve --trace-store` kept
# meta a page does not show: the engine's bookkeeping, not the strategy's decisions
HIDDEN_META = ("votes", "prefix_cache_hit_tokens", "tree", "strategy")


class ViewError(SettingError):
    """A store or an item the page cannot show, with what to do about it."""


def open_store(path: str | Path) -> ResultsStore:
    """The store, read-only; a missing or corrupt file is a ViewError that says so."""
    try:
        return ResultsStore(path, readonly=True)
    except SettingError as e:
        raise ViewError(str(e).replace("ponder sweep first (or give --db)",
                                       "ponder sweep first, or give ponder view --db STORE")) from None


def _setting_label(strategy: str, setting: dict[str, Any], variant: str = "") -> str:
    inner = ", ".join(f"{k}={v}" for k, v in sorted(setting.items()) if k != "temperature")
    return f"{strategy}({inner})" + (f" [{variant}]" if variant else "")


def _short_label(strategy: str, setting: dict[str, Any], variant: str = "") -> str:
    """A label that fits a menu or a column head: long values (a compute-optimal policy)
    cut to 24 characters; the full label is in ``label``."""
    def cut(v: Any) -> str:
        v = str(v)
        return v if len(v) <= 24 else v[:23] + "\u2026"
    inner = ", ".join(f"{k}={cut(v)}" for k, v in sorted(setting.items()) if k != "temperature")
    return f"{strategy}({inner})" + (f" [{variant}]" if variant else "")


def setting_id(s: dict[str, Any]) -> str:
    return f"{s['config_hash'][:12]}-{s['model_id'][-8:]}" if s.get("model_id") else s["config_hash"][:12]


def overview(store: ResultsStore) -> dict[str, Any]:
    """The frontier of every task: per task its settings with the report's numbers and
    frontier flags (by generated tokens and by FLOPs), from SQLite's sums alone."""
    groups = store.summary_rows()
    tasks: dict[str, Any] = {}
    for task, settings in summarise_sums(groups).items():
        out = []
        for s in settings:
            out.append({"id": setting_id(s), "model": s["model"], "strategy": s["strategy"], "setting": s["setting"],
                        "label": _setting_label(s["strategy"], s["setting"], s.get("variant", "")),
                        "short": _short_label(s["strategy"], s["setting"], s.get("variant", "")),
                        "problems": s["problems"], "correct": s["correct"], "accuracy": s["accuracy"],
                        "ci95": s["ci95"], "generated_tokens": s["generated_tokens"],
                        "computed_tokens": s["computed_tokens"], "flops": s["flops"], "wall_s": s["wall_s"],
                        "frontier": s["frontier"], "frontier_flops": s["frontier_flops"],
                        "model_frontier": s["model_frontier"], "model_frontier_flops": s["model_frontier_flops"],
                        "config_hash": s["config_hash"], "model_id": s["model_id"]})
        if task == LIVE:  # served requests have no answer key: nothing to be right or wrong about
            for o in out:
                o.update(accuracy=None, ci95=None, correct=None, frontier=False, frontier_flops=False,
                         model_frontier=False, model_frontier_flops=False)
        tasks[task] = {"settings": out, "judged": task != LIVE}
    return {"tasks": tasks, "store": str(store.path), "rows": sum(g["n"] for g in groups)}


def problems(store: ResultsStore, task: str, settings: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    """One task's problems table: per problem its cells (one per setting: right or
    wrong, answer, tokens, the generation's key) and how far its samples agree."""
    if "/" in task:
        name, level = task.rsplit("/", 1)
    else:
        name, level = task, ""
    if settings is None:
        settings = (overview(store)["tasks"].get(task) or {}).get("settings", [])
    ids = {(s["config_hash"], s["model_id"]): s["id"] for s in settings}
    rows = store.cells(name, level)
    if not rows and "/" in task:  # a task whose own name holds a slash, with no level
        name, level = task, ""
        rows = store.cells(name, level)
    asked = store.questions(name, level)
    per_problem: dict[str, dict[str, dict[str, Any]]] = defaultdict(dict)
    answers: dict[str, list[str]] = defaultdict(list)
    votes: dict[str, Counter] = defaultdict(Counter)
    for r in rows:
        sid = ids.get((r["config_hash"], r["model_id"]))
        if sid is None:
            continue
        per_problem[r["problem_id"]][sid] = {
            "key": r["key"], "correct": None if task == LIVE else bool(r["correct"]), "answer": r["answer"],
            "generated_tokens": r["generated_tokens"]}
        if r["answer"] is not None:
            answers[r["problem_id"]].append(str(r["answer"]))
        meta = _loads(r["meta"], {})  # only majority's (the query leaves the others out)
        if isinstance(meta.get("votes"), dict):
            votes[r["problem_id"]].update({str(a): int(v) for a, v in meta["votes"].items()
                                           if isinstance(v, (int, float))})
    out = []
    for pid, cells in per_problem.items():
        v = votes.get(pid)
        if v and sum(v.values()):  # the samples' agreement, where majority vote kept its votes
            agreement = max(v.values()) / sum(v.values())
        else:  # else how far the settings' final answers agree
            a = answers.get(pid, [])
            agreement = max(Counter(a).values()) / len(cells) if a else 0.0
        question, gold = asked.get(pid, (None, None))
        out.append({"id": pid, "agreement": round(agreement, 4), "cells": cells, "question": question, "gold": gold})
    out.sort(key=lambda p: _natural(p["id"]))
    return out


def _natural(s: str) -> tuple:
    import re

    return tuple((0, int(x), "") if x.isdigit() else (1, 0, x) for x in re.split(r"(\d+)", s))


def _loads(text: Any, default: Any) -> Any:
    try:
        return json.loads(text) if text else default
    except (TypeError, ValueError):
        return default


def generation(store: ResultsStore, key: str) -> dict[str, Any]:
    """One stored generation with its trace, shaped for the page."""
    cur = store.conn.execute("SELECT * FROM results WHERE key = ?", (key,))
    names = [d[0] for d in cur.description]
    found = cur.fetchone()
    if found is None:
        raise ViewError(f"no stored generation has the id {key!r}; open the problems table to pick one")
    return shaped(dict(zip(names, found)))


def shaped(r: dict[str, Any]) -> dict[str, Any]:
    """A stored row (``ResultsStore.rows``) shaped for the page: its trace read and
    told apart (tree, samples, tokens, or a shape this ponder does not draw)."""
    try:
        trace = ResultsStore.trace(r)
    except Exception as e:  # a damaged row: say so, keep the rest of the page
        trace, damaged = None, f"its trace could not be read ({type(e).__name__}: {e})"
    else:
        damaged = None
    task = task_label(r)
    meta = _loads(r["meta"], {})
    out = {"key": r["key"], "task": task, "problem_id": r["problem_id"], "strategy": r["strategy"],
           "setting": _loads(r["setting"], {}), "model": r["model"], "answer": r["answer"],
           "correct": None if task == LIVE else bool(r["correct"]), "score": r["score"], "text": r["text"],
           "question": r.get("question"), "gold": r.get("gold"),
           "usage": {k: r[k] for k in ("prompt_tokens", "generated_tokens", "computed_tokens", "model_calls",
                                       "flops", "wall_s")},
           "meta": meta, "kind": "none", "trace": trace}
    if "prefix_cache_hit_tokens" in meta:  # the engine's bookkeeping: part of the bill, not of the decision
        out["usage"]["prefix_cache_hit_tokens"] = meta["prefix_cache_hit_tokens"]
    if damaged:
        out["kind"], out["note"] = "unknown", damaged
    elif trace is None:
        out["kind"] = "none"
    elif isinstance(trace, dict) and isinstance(trace.get("tokens"), list):
        out["kind"] = "tokens"
    elif _is_tree(trace):
        out["kind"] = "tree"
        out["chosen_path"] = _path_to(trace, meta.get("best_node"))
    elif isinstance(trace, list) and all(isinstance(s, dict) and "text" in s for s in trace):
        out["kind"] = "samples"
        marked = [i for i, s in enumerate(trace) if s.get("chosen")]
        # a row of an older ponder did not mark its chosen sample: matched by text
        out["chosen"] = marked[0] if marked else next((i for i, s in enumerate(trace) if s["text"] == r["text"]), None)
        out["chosen_by"] = "id" if marked else "text"
        extract = None if all("answer" in s for s in trace) else _extractor(r["task"])
        for s in trace:
            if "answer" not in s:
                s["answer"] = extract(s["text"]) if extract else None
            probe = (s.get("meta") or {}).get("tree")
            if _is_tree(probe):  # a probe's search (compute-optimal): drawn as a tree of its own
                s["tree"] = probe
                s["chosen_path"] = _path_to(probe, s["meta"].get("best_node"))
                s["meta"] = {k: v for k, v in s["meta"].items() if k != "tree"}
    else:
        out["kind"], out["note"] = "unknown", ("this trace has a shape this ponder does not draw (written by an "
                                               "older or newer ponder?); it is shown as stored")
    return out


@functools.lru_cache(maxsize=16)
def _extractor(task: str) -> Any:
    """The task's answer extractor, if this ponder knows the task (for rows of an older
    ponder, which did not store each sample's answer)."""
    from ..tasks.registry import load_task

    try:
        return load_task(task).extract_answer
    except Exception:
        return None


def _is_tree(t: Any) -> bool:
    return isinstance(t, dict) and isinstance(t.get("children"), list) and "id" in t


def _path_to(tree: dict[str, Any], node_id: Any) -> list[int]:
    """The ids from the root to ``node_id`` (empty if it is not in the tree)."""
    stack = [(tree, [tree["id"]])]
    while stack:
        n, path = stack.pop()
        if n.get("id") == node_id:
            return path
        stack.extend((c, path + [c.get("id")]) for c in n.get("children", []) if isinstance(c, dict))
    return []


def everything(store: ResultsStore) -> dict[str, Any]:
    """The overview, every task's problems and every generation shaped for the page:
    what an exported file holds."""
    data = overview(store)
    data["problems"] = {t: problems(store, t, v["settings"]) for t, v in data["tasks"].items()}
    data["generations"] = {}
    cur = store.conn.execute("SELECT * FROM results ORDER BY rowid")
    names = [d[0] for d in cur.description]
    for found in cur:
        r = dict(zip(names, found))
        data["generations"][r["key"]] = shaped(r)
    return data
