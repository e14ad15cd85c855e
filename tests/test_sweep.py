"""``ponder sweep`` and ``ponder report``: a sweep killed with SIGKILL at several points
resumes to exactly the uninterrupted results without recomputing anything; the
report's numbers against a hand-computed table; bad sweep files are named."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

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
        return {r["key"]: (r["text"], r["correct"], r["generated_tokens"], r["computed_tokens"], r["flops"],
                           r["strategy"], r["setting"]) for r in s.rows()}


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


def test_the_frontier_ranges_over_every_model(tmp_path):
    """A small model's greedy that beats the big model's vote at a tenth of the tokens
    takes the vote off the frontier; each model keeps its own frontier too."""
    with ResultsStore(tmp_path / "r.sqlite") as s:
        s.add([_row("a1", "greedy", "{}", 0, 10, 100.0), _row("a2", "greedy", "{}", 1, 10, 100.0),
               _row("b1", "vote", '{"n":4}', 1, 40, 400.0), _row("b2", "vote", '{"n":4}', 0, 40, 400.0),
               _row("c1", "vote", '{"n":16}', 1, 160, 1600.0), _row("c2", "vote", '{"n":16}', 1, 160, 1600.0),
               *({**_row(k, "greedy", "{}", c, 12, 20.0, model="small"), "model_id": "y"}
                 for k, c in (("s1", 1), ("s2", 0)))])
        (rows,) = summarise(s.rows()).values()
    by = {(r["model"], r["strategy"], json.dumps(r["setting"])): r for r in rows}
    g, v4, v16 = by[("m", "greedy", "{}")], by[("m", "vote", '{"n": 4}')], by[("m", "vote", '{"n": 16}')]
    small = by[("small", "greedy", "{}")]
    # tokens: greedy 10 (0.5) dominates small's 12 (0.5) and vote@4; vote@16 is the only way to 1.0
    assert [g["frontier"], v4["frontier"], v16["frontier"], small["frontier"]] == [True, False, True, False]
    # FLOPs: small's 20 (0.5) takes greedy's place
    assert [g["frontier_flops"], small["frontier_flops"], v16["frontier_flops"]] == [False, True, True]
    # within each model
    assert g["model_frontier_flops"] and small["model_frontier"] and small["model_frontier_flops"]
    assert not v4["model_frontier"]


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
    assert r.returncode == 2 and "majorty" in r.stderr and str(ok) in r.stderr
    assert not (tmp_path / "y.sqlite").exists()  # refused before the store was opened: no empty store, no session
    r = subprocess.run([sys.executable, "-m", "ponder.cli", "report", "--db", str(tmp_path / "none.sqlite")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "does not exist" in r.stderr


def test_a_configurations_bill_does_not_depend_on_what_ran_before(tmp_path):
    """Greedy after majority in one process found majority's samples in the prefix
    cache (65.3 against 52.4 computed tokens a problem): each chunk starts with empty
    caches, so the same configuration is billed the same whatever its neighbours."""
    from ponder.sweep.run import sweep

    base = {"seed": 0, "chunk": 4, "reward_model": "arith-reward", "model": [{"name": "arith"}],
            "task": [{"name": "arith", "level": "hard", "limit": 8}]}
    alone = parse_config({**base, "strategy": [{"name": "greedy"}, {"name": "prm-beam", "temperature": 0.7,
                                                                     "samples": 4}]})
    after = parse_config({**base, "strategy": [{"name": "majority", "temperature": 0.7, "samples": 4},
                                               {"name": "best-of-n", "temperature": 0.7, "samples": 4},
                                               {"name": "prm-beam", "temperature": 0.7, "samples": 4},
                                               {"name": "greedy"}]})
    bills = []
    for cfg, name in ((alone, "a"), (after, "b")):
        with ResultsStore(tmp_path / f"{name}.sqlite") as st:
            sweep(cfg, st)
            bills.append({(r["strategy"], r["problem_id"]): (r["computed_tokens"], r["flops"], r["text"])
                          for r in st.rows() if r["strategy"] in ("greedy", "prm-beam")})
    assert bills[0] == bills[1]  # greedy and PRM beam: the same texts, computed tokens and FLOPs


def _as_nobody(cmd, env=None):
    """Run ``cmd`` as an unprivileged user where we are root (root writes through any
    permission), so a read-only file or folder is read-only for it."""
    import shutil

    env = {**os.environ, **(env or {})}
    if os.geteuid() == 0 and shutil.which("setpriv"):
        cmd = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_a_read_only_store_is_reported_and_refused_for_sweeping_by_name(tmp_path):
    import shutil
    import stat
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="ponder-ro-"))
    try:
        os.chmod(folder, 0o777)
        db = folder / "r.sqlite"
        with ResultsStore(db) as s:
            s.add([_row("a1", "greedy", "{}", 1, 10, 100.0), _row("a2", "greedy", "{}", 0, 20, 200.0)])
        cfg = folder / "sweep.toml"
        cfg.write_text(SWEEP.replace("limit = 8", "limit = 1"))
        env = {"PONDER_CACHE_DIR": str(folder / "cache"), "HOME": str(folder)}
        os.chmod(db, 0o444)  # a read-only file in a writable folder
        r = _as_nobody([sys.executable, "-m", "ponder.cli", "report", "--db", str(db), "--out", ""], env)
        assert r.returncode == 0 and "| m | greedy |" in r.stdout, r.stderr
        assert not list(folder.glob("r.sqlite-*")), list(folder.iterdir())  # no -wal or -shm left beside it
        os.chmod(db, 0o644)  # a writable store in a read-only folder: report reads it, leaving nothing
        os.chmod(folder, 0o555)
        for who in (_as_nobody, lambda cmd, env: subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                                                                   env={**os.environ, **env})):
            r = who([sys.executable, "-m", "ponder.cli", "report", "--db", str(db), "--out", ""], env)
            assert r.returncode == 0 and "| m | greedy |" in r.stdout, r.stderr
        assert not list(folder.glob("r.sqlite-*")), list(folder.iterdir())
        os.chmod(folder, 0o777)
        os.chmod(db, 0o444)
        r = _as_nobody([sys.executable, "-m", "ponder.cli", "sweep", str(cfg), "--db", str(db), "--report", ""], env)
        assert r.returncode == 2 and "read-only" in r.stderr and "Traceback" not in r.stderr, r.stderr
        os.chmod(folder, 0o555)  # and a read-only folder: report still reads it
        r = _as_nobody([sys.executable, "-m", "ponder.cli", "report", "--db", str(db), "--out", ""], env)
        assert r.returncode == 0 and "| m | greedy |" in r.stdout, r.stderr
        os.chmod(db, 0o644)
        r = _as_nobody([sys.executable, "-m", "ponder.cli", "sweep", str(cfg), "--db", str(folder / "new.sqlite"),
                        "--report", ""], env)
        assert r.returncode == 2 and "read-only" in r.stderr and "Traceback" not in r.stderr, r.stderr
    finally:
        os.chmod(folder, stat.S_IRWXU)
        shutil.rmtree(folder, ignore_errors=True)


def test_another_programs_database_is_refused_untouched(tmp_path):
    other = tmp_path / "app.sqlite"
    with sqlite3.connect(other) as c:
        c.execute("CREATE TABLE users (name TEXT)")
    before = other.read_bytes()
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(SWEEP)
    r = subprocess.run(_sweep_cmd(cfg, other), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "another program's SQLite database" in r.stderr and "users" in r.stderr
    assert other.read_bytes() == before and not Path(f"{other}-wal").exists()
    with sqlite3.connect(other) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "delete"
    r = subprocess.run([sys.executable, "-m", "ponder.cli", "report", "--db", str(other), "--out", ""],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "another program's" in r.stderr


def test_report_keeps_configurations_apart(tmp_path):
    """Rows that differ in seed, reward model or weights are separate rows, never one
    pooled accuracy over twice the problems."""
    rows = []
    for seed in (0, 1):
        for rm in ("sha256:aaaa", "sha256:bbbb"):
            for i in range(3):
                r = _row(f"{seed}{rm}{i}", "best-of-n", '{"samples":4}', i % 2, 10, 1.0)
                r["config_hash"] = f"h{seed}{rm}"
                r["config"] = json.dumps({"seed": seed, "reward_model": rm})
                r["problem_id"] = str(i)
                rows.append(r)
    with ResultsStore(tmp_path / "r.sqlite") as s:
        s.add(rows)
        summary = summarise(s.rows())
    (out,) = summary.values()
    assert len(out) == 4 and all(x["problems"] == 3 for x in out)
    assert sorted(x["variant"] for x in out) == ["seed=0 reward=aaaa", "seed=0 reward=bbbb", "seed=1 reward=aaaa",
                                                 "seed=1 reward=bbbb"]
    md = markdown(summary)
    assert "samples=4 seed=0 reward=aaaa" in md


def test_two_sweeps_on_one_store_the_second_is_refused(tmp_path):
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(SWEEP.replace("limit = 8", "limit = 100").replace("samples = [4, 8]", "samples = [16, 32]"))
    db = tmp_path / "r.sqlite"
    first = subprocess.Popen(_sweep_cmd(cfg, db), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while _count(db) == 0 and time.time() < deadline and first.poll() is None:
            time.sleep(0.05)
        assert first.poll() is None, "the first sweep ended before the second could start"
        r = subprocess.run(_sweep_cmd(cfg, db), capture_output=True, text=True, timeout=120)
        assert r.returncode == 2 and "another ponder sweep" in r.stderr and f"pid {first.pid}" in r.stderr, r.stderr
    finally:
        first.kill()  # SIGKILL: the flock goes with the process, no stale lock
        first.wait(60)
    with ResultsStore(db) as s:
        s.claim()  # free again


def test_ctrl_c_says_the_results_are_saved(tmp_path):
    # The interrupted sweep is far larger than what it has done when its first result is stored (100 problems,
    # up to 32 samples each), so no machine is fast enough to finish it between that event and the signal.
    big = tmp_path / "big.toml"
    big.write_text(SWEEP.replace("limit = 8", "limit = 100").replace("samples = [4, 8]", "samples = [16, 32]"))
    db = tmp_path / "r.sqlite"
    p = subprocess.Popen(_sweep_cmd(big, db), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as a terminal's Ctrl-C
    deadline = time.time() + 120
    while _count(db) == 0 and time.time() < deadline and p.poll() is None:
        time.sleep(0.02)
    assert p.poll() is None, "the sweep ended before its first result was stored"
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    assert "saved in" in err and "rerun the same command to resume" in err and "Traceback" not in err, err
    saved = _count(db)
    assert 1 <= saved < 300
    # Resuming the first 2 problems of the same grid: what the interrupted run stored is read, not recomputed.
    small = tmp_path / "small.toml"
    small.write_text(big.read_text().replace("limit = 100", "limit = 2"))
    r = subprocess.run(_sweep_cmd(small, db), capture_output=True, text=True, timeout=600)
    m = re.search(r"(\d+) problems computed, (\d+) already in", r.stderr)
    assert r.returncode == 0 and m, r.stderr
    assert int(m[1]) + int(m[2]) == 2 * 3 and int(m[2]) >= 1, r.stderr


def test_the_progress_line_keeps_its_count_in_80_columns():
    import io

    from rich.console import Console

    from ponder.cli.results import sweep_progress

    buf = io.StringIO()
    console = Console(file=buf, width=80, force_terminal=True, color_system=None)
    with sweep_progress(console) as (bar, update):
        update({"done": 1234, "total": 2600, "correct": 500, "scored": 1000,
                "run": 'prm-beam {"beam_width":4,"max_tokens":160,"samples":16,"temperature":0.7}'})
        bar.refresh()
    out = buf.getvalue()
    assert "1234/2600" in out and "acc 0.500" in out


def test_the_plot_labels_sizes_and_separates_coinciding_points(tmp_path):
    from ponder.sweep.report import plot, size_label

    assert size_label({"samples": 16}) == "16" and size_label({"iterations": 8}) == "8 iterations"
    rows = [_row(f"{s}{i}", s, '{"samples":4}', 1, 210, 100.0) for s in ("majority", "best-of-n") for i in range(2)]
    with ResultsStore(tmp_path / "r.sqlite") as st:
        st.add(rows)
        (path,) = plot(summarise(st.rows()), tmp_path / "out")
    assert path.stat().st_size > 10_000


def test_the_readme_table_is_written_from_the_store(tmp_path):
    """scripts/readme-table.py writes the table between the README's markers from the store
    alone (one row per setting, as the report), and --check says when a hand edit strays."""
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(SWEEP)
    db = tmp_path / "r.sqlite"
    assert subprocess.run(_sweep_cmd(cfg, db), capture_output=True, timeout=600).returncode == 0
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\n<!-- sweep-table -->\nold\n<!-- /sweep-table -->\n\nafter\n")
    script = Path(__file__).resolve().parents[1] / "scripts" / "readme-table.py"
    run = [sys.executable, str(script), "--db", str(db), "--readme", str(readme), "--config", str(cfg)]
    assert subprocess.run(run, capture_output=True, text=True).returncode == 0
    text = readme.read_text()
    rows = [x for x in text.splitlines() if x.startswith("| ") and not x.startswith("| strategy")]
    with ResultsStore(db) as s:
        summary = summarise(s.rows())["arith/hard"]
    assert len(rows) == len(summary) == 3 and "old" not in text and text.endswith("after\n")
    for srow in summary:
        assert any(f"{srow['accuracy']:.3f}" in r and f"{srow['generated_tokens']:.1f}" in r for r in rows)
    assert [r.split(" | ")[0] for r in rows] == ["| greedy", "| majority", "| majority"]  # the sweep file's order
    assert subprocess.run(run + ["--check"], capture_output=True).returncode == 0
    readme.write_text(text.replace(rows[0], rows[0].replace("| greedy", "| greedy (edited)")))
    assert subprocess.run(run + ["--check"], capture_output=True).returncode == 1


def test_sweep_errors_name_keys_not_flags(tmp_path):
    """A strategy's error in a sweep file speaks of the file's keys (reward_model, scorer),
    not the command line's flags."""
    cfg = tmp_path / "bad.toml"
    cfg.write_text('seed = 0\n[[model]]\nname = "arith"\n[[task]]\nname = "arith"\nlevel = "hard"\nlimit = 2\n'
                   '[[strategy]]\nname = "prm-beam"\nsamples = 4\n')
    r = subprocess.run(_sweep_cmd(cfg, tmp_path / "r.sqlite"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "reward_model" in r.stderr and 'scorer = "steps"' in r.stderr, r.stderr
    assert "--reward-model" not in r.stderr and "--set" not in r.stderr and "--strategy" not in r.stderr


def test_a_strategy_can_run_on_some_of_the_models():
    from ponder.sweep.run import prepare

    raw = {"model": [{"name": "arith"}, {"name": "arith-draft"}], "task": [{"name": "arith", "limit": 2}],
           "strategy": [{"name": "greedy"}, {"name": "majority", "samples": 4, "temperature": 0.7,
                                             "models": ["arith-draft"]}]}
    runs = [(r[0], r[5].strategy) for r in prepare(parse_config(raw)).runs]
    assert runs == [("arith", "greedy"), ("arith-draft", "greedy"), ("arith-draft", "majority")]
    raw["strategy"][1]["models"] = ["arith-big"]
    with pytest.raises(SettingError, match="models must name"):
        parse_config(raw)
