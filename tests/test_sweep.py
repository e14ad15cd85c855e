"""``ponder sweep`` and ``ponder report``: a sweep killed with SIGKILL at several points
resumes to exactly the uninterrupted results without recomputing anything; the
report's numbers against a hand-computed table; bad sweep files are named."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from ponder.errors import SettingError
from ponder.evaluate import wilson_interval
from ponder.sweep.report import markdown, summarise
from ponder.sweep.run import parse_config
from ponder.sweep.store import ResultsStore

SWEEP = """
seed = 3
chunk = 1
[[model]]
name = "arith"
[[task]]
name = "arith"
level = "hard"
limit = 8
[[strategy]]
name = "greedy"
temperature = 0.0
[[strategy]]
name = "majority"
temperature = 0.7
samples = [4, 8]
"""
ROWS = 8 * 3


def _sweep_cmd(cfg, db):
    return [sys.executable, "-m", "ponder.cli", "sweep", str(cfg), "--db", str(db), "--report", ""]


def _count(db):
    if not db.exists():
        return 0
    try:
        with sqlite3.connect(str(db), timeout=5) as c:
            return c.execute("SELECT COUNT(*) FROM results").fetchone()[0]
    except sqlite3.OperationalError:  # the table is not there yet
        return 0


def _results(db):
    with ResultsStore(db) as s:
        return {r["key"]: (r["text"], r["correct"], r["generated_tokens"], r["strategy"], r["setting"])
                for r in s.rows()}


def test_a_killed_sweep_resumes_to_the_same_results_and_recomputes_nothing(tmp_path):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(SWEEP)
    whole = tmp_path / "whole.sqlite"
    r = subprocess.run(_sweep_cmd(cfg, whole), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert f"{ROWS} problems computed, 0 already" in r.stderr

    db = tmp_path / "killed.sqlite"
    kills, seen = [], 0
    while len(kills) < 6:
        p = subprocess.Popen(_sweep_cmd(cfg, db), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline:
            n = _count(db)
            if n > seen:  # a chunk was committed since the last kill: kill mid-sweep
                os.kill(p.pid, signal.SIGKILL)
                p.wait()
                kills.append(n)
                seen = n
                break
            time.sleep(0.002)
        if p.poll() is None:
            p.kill()
        if seen >= ROWS:
            break
    assert len(kills) >= 5, kills  # killed at five or more points, each after new rows
    r = subprocess.run(_sweep_cmd(cfg, db), capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    assert _results(db) == _results(whole)  # the same texts, answers and bills as one uninterrupted run
    with ResultsStore(db) as s:
        sessions = s.sessions()
    # every problem was computed exactly once over all the sessions, the killed ones included
    assert sum(x["computed"] for x in sessions) == ROWS
    # a rerun is all cache hits
    r = subprocess.run(_sweep_cmd(cfg, db), capture_output=True, text=True, timeout=600)
    assert f"0 problems computed, {ROWS} already" in r.stderr


def _row(key, strategy, setting, correct, gen, flops, wall=0.5, task="t", level="", model="m"):
    return {"key": key, "config_hash": strategy + setting, "config": "{}", "model": model, "model_id": "x",
            "task": task, "level": level, "strategy": strategy, "setting": setting, "problem_id": key,
            "answer": None, "correct": correct, "score": None, "text": "", "prompt_tokens": 0,
            "generated_tokens": gen, "computed_tokens": gen + 1, "model_calls": 1, "flops": flops, "wall_s": wall,
            "meta": "{}", "trace": None, "created": 0.0}


def test_report_numbers_by_hand(tmp_path):
    with ResultsStore(tmp_path / "r.sqlite") as s:
        s.add([_row("a1", "greedy", "{}", 1, 10, 100.0), _row("a2", "greedy", "{}", 0, 20, 200.0),
               _row("b1", "vote", '{"n":4}', 1, 40, 400.0), _row("b2", "vote", '{"n":4}', 1, 60, 600.0),
               _row("c1", "vote", '{"n":8}', 1, 100, 1000.0), _row("c2", "vote", '{"n":8}', 1, 120, 1200.0),
               _row("d1", "slow", "{}", 0, 30, 50.0), _row("d2", "slow", "{}", 1, 30, 50.0)])
        summary = summarise(s.rows())
    (rows,) = summary.values()
    by = {(r["strategy"], json.dumps(r["setting"])): r for r in rows}
    g = by[("greedy", "{}")]
    assert g["accuracy"] == 0.5 and g["generated_tokens"] == 15 and g["computed_tokens"] == 16
    assert g["flops"] == 150 and g["wall_s"] == 0.5 and g["ci95"] == list(wilson_interval(1, 2))
    v4, v8, slow = by[("vote", '{"n": 4}')], by[("vote", '{"n": 8}')], by[("slow", "{}")]
    assert v4["accuracy"] == 1.0 and v4["generated_tokens"] == 50
    # by tokens: greedy (15) and vote n=4 (50, 100%) are the frontier; n=8 costs more for no gain;
    # slow (30 tokens, 50%) is beaten by greedy's 50% at 15
    assert [g["frontier"], v4["frontier"], v8["frontier"], slow["frontier"]] == [True, True, False, False]
    # by FLOPs slow is the cheapest (50): it joins the frontier and greedy (150, 50%) leaves it
    assert [g["frontier_flops"], v4["frontier_flops"], slow["frontier_flops"]] == [False, True, True]
    md = markdown(summary)
    assert "| m | vote | n=4 | 1.000 (2/2) |" in md and "| 50.0 | 51.0 | 500 | 0.500 | * |" in md


def test_bad_sweep_files_are_named(tmp_path):
    for raw, msg in [
        ({"model": [{"name": "arith"}], "task": [{"name": "arith"}], "strategy": [{"name": "greedy"}], "oops": 1},
         "unknown key"),
        ({"task": [{"name": "arith"}], "strategy": [{"name": "greedy"}]}, r"\[\[model\]\]"),
        ({"model": [{"name": "arith"}], "task": [{"name": "arith", "limit": 0}], "strategy": [{"name": "greedy"}]},
         "limit must be an integer >= 1"),
        ({"model": [{"name": "arith"}], "task": [{"name": "arith"}], "strategy": [{"name": "majority", "samples": []}]},
         "samples = \\[\\] gives no setting"),
        ({"model": [{"name": "arith"}], "task": [{"name": "arith"}], "strategy": [{"name": "greedy"}], "chunk": 0},
         "chunk"),
    ]:
        with pytest.raises(SettingError, match=msg):
            parse_config(raw)
    bad = tmp_path / "bad.toml"
    bad.write_text("[[model]\nname=")
    r = subprocess.run([sys.executable, "-m", "ponder.cli", "sweep", str(bad), "--db", str(tmp_path / "x.sqlite")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: sweep file") and "not TOML" in r.stderr
    ok = tmp_path / "typo.toml"
    ok.write_text(SWEEP.replace('name = "majority"', 'name = "majorty"'))
    r = subprocess.run([sys.executable, "-m", "ponder.cli", "sweep", str(ok), "--db", str(tmp_path / "y.sqlite")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "majorty" in r.stderr and _count(tmp_path / "y.sqlite") == 0  # refused up front
    r = subprocess.run([sys.executable, "-m", "ponder.cli", "report", "--db", str(tmp_path / "none.sqlite")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr
