"""What `ponder view` shows, read from a results store: the frontier per task (the
numbers of `ponder report`), one row per (problem, setting), and each row's trace.
Plain data (JSON-able dicts), so the served page and the exported file show the same.

A trace is one of the shapes ponder writes: a step-level search's tree (a dict with
``children``), a parallel method's samples (a list of ``{text, score, usage, meta}``),
or a token-level row's tokens (``{tokens: [{t, lp, top?}], rounds?}``).
Anything else (a trace from an older ponder) is returned as it is, marked
``"kind": "unknown"``, and the page shows it raw with a note instead of failing.
"""

from __future__ import annotations

import functools
import json
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ..errors import SettingError
from ..sweep.report import summarise, task_label
from ..sweep.store import ResultsStore

LIVE = "serve"  # the task of requests `ponder serve --trace-store` kept


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


def overview(store: ResultsStore, rows: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Everything but the traces: per task the settings (with the report's numbers and
    frontier flags) and per row what the problems table needs. ``rows``: the store's,
    if the caller has read them already."""
    rows = store.rows() if rows is None else rows
    summary = summarise(rows)
    tasks: dict[str, Any] = {}
    by_config: dict[tuple[str, str], str] = {}
    for task, settings in summary.items():
        out = []
        for s in settings:
            sid = f"{s['config_hash'][:12]}-{s['model_id'][-8:]}" if s.get("model_id") else s["config_hash"][:12]
            by_config[(task, s["config_hash"], s["model_id"])] = sid
            out.append({"id": sid, "model": s["model"], "strategy": s["strategy"], "setting": s["setting"],
                        "label": _setting_label(s["strategy"], s["setting"], s.get("variant", "")),
                        "problems": s["problems"], "correct": s["correct"], "accuracy": s["accuracy"],
                        "ci95": s["ci95"], "generated_tokens": s["generated_tokens"],
                        "computed_tokens": s["computed_tokens"], "flops": s["flops"], "wall_s": s["wall_s"],
                        "frontier": s["frontier"], "frontier_flops": s["frontier_flops"]})
        if task == LIVE:  # served requests have no answer key: nothing to be right or wrong about
            for o in out:
                o.update(accuracy=None, ci95=None, correct=None, frontier=False, frontier_flops=False)
        tasks[task] = {"settings": out, "problems": [], "judged": task != LIVE}
    per_problem: dict[str, dict[str, dict[str, Any]]] = defaultdict(lambda: defaultdict(dict))
    answers: dict[tuple[str, str], list[str]] = defaultdict(list)
    votes: dict[tuple[str, str], Counter] = defaultdict(Counter)
    for r in rows:
        task = task_label(r)
        sid = by_config[(task, r["config_hash"], r["model_id"])]
        per_problem[task][r["problem_id"]][sid] = {
            "key": r["key"], "correct": None if task == LIVE else bool(r["correct"]), "answer": r["answer"],
            "generated_tokens": r["generated_tokens"]}
        if r["answer"] is not None:
            answers[(task, r["problem_id"])].append(str(r["answer"]))
        meta = _loads(r["meta"], {}) if r["strategy"] == "majority" else {}  # only majority's votes are read
        if isinstance(meta.get("votes"), dict):
            votes[(task, r["problem_id"])].update({str(a): int(v) for a, v in meta["votes"].items()
                                                  if isinstance(v, (int, float))})
    for task, problems in per_problem.items():
        for pid, cells in problems.items():
            v = votes.get((task, pid))
            if v and sum(v.values()):  # the samples' agreement, where majority vote kept its votes
                agreement = max(v.values()) / sum(v.values())
            else:  # else how far the settings' final answers agree
                a = answers.get((task, pid), [])
                agreement = max(Counter(a).values()) / len(cells) if a else 0.0
            tasks[task]["problems"].append({"id": pid, "agreement": round(agreement, 4), "cells": cells})
        tasks[task]["problems"].sort(key=lambda p: _natural(p["id"]))
    return {"tasks": tasks, "store": str(store.path), "rows": len(rows)}


def _natural(s: str) -> tuple:
    import re

    return tuple(int(x) if x.isdigit() else x for x in re.split(r"(\d+)", s))


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
    out = {"key": r["key"], "task": task, "problem_id": r["problem_id"], "strategy": r["strategy"],
           "setting": _loads(r["setting"], {}), "model": r["model"], "answer": r["answer"],
           "correct": None if task == LIVE else bool(r["correct"]), "score": r["score"], "text": r["text"],
           "usage": {k: r[k] for k in ("prompt_tokens", "generated_tokens", "computed_tokens", "model_calls",
                                       "flops", "wall_s")},
           "meta": _loads(r["meta"], {}), "kind": "none", "trace": trace}
    if damaged:
        out["kind"], out["note"] = "unknown", damaged
    elif trace is None:
        out["kind"] = "none"
    elif isinstance(trace, dict) and isinstance(trace.get("tokens"), list):
        out["kind"] = "tokens"
    elif _is_tree(trace):
        out["kind"] = "tree"
        out["chosen_path"] = _path_to(trace, out["meta"].get("best_node"))
    elif isinstance(trace, list) and all(isinstance(s, dict) and "text" in s for s in trace):
        out["kind"] = "samples"
        out["chosen"] = next((i for i, s in enumerate(trace) if s["text"] == r["text"]), None)
        extract = _extractor(r["task"])
        for s in trace:
            s["answer"] = extract(s["text"]) if extract else None
    else:
        out["kind"], out["note"] = "unknown", ("this trace has a shape this ponder does not draw (written by an "
                                               "older or newer ponder?); it is shown as stored")
    return out


@functools.lru_cache(maxsize=16)
def _extractor(task: str) -> Any:
    """The task's answer extractor, if this ponder knows the task (else the page shows
    the samples without their answers)."""
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


def all_generations(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Every row shaped for the page, by key (for the exported file)."""
    return {r["key"]: shaped(r) for r in rows}
