"""`ponder view` (issue 26) in a real browser: headless Chromium from Debian's packages,
driven by Selenium, over a store a real sweep wrote on the shipped models.

Each view loads with no console error and no failed request; the tree view draws
every stored node and highlights the chosen path; a frontier point opens exactly its
setting's problems with `ponder report`'s counts; the exported file shows the same from
file:// with no server; bad input gets a page that says what is wrong. Screenshots of
every view go to $PONDER_ARTIFACTS (default: the test's temporary folder)."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import zlib
from pathlib import Path

import httpx
import pytest

from ponder.sweep.report import summarise
from ponder.sweep.store import ResultsStore
from ponder.view.browser import available, chromium, open_view, served

SWEEP = """
seed = 0
chunk = 50
reward_model = "arith-reward"
[[model]]
name = "arith"
[[task]]
name = "arith"
level = "hard"
limit = 6
[[strategy]]
name = "greedy"
temperature = 0.0
logprobs = 3
[[strategy]]
name = "majority"
temperature = 0.7
samples = 4
[[strategy]]
name = "prm-beam"
temperature = 0.7
samples = 4
beam_width = 2
[[strategy]]
name = "mcts"
temperature = 0.7
iterations = 4
[[strategy]]
name = "speculative"
temperature = 0.0
num_draft_tokens = 4
record_drafts = true
[[strategy]]
name = "speculative-rejection"
temperature = 0.7
samples = 6
reject = 0.5
"""


def _ponder(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ponder.cli", *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("view")
    (folder / "sweep.toml").write_text(SWEEP)
    db = folder / "results.sqlite"
    r = _ponder("sweep", str(folder / "sweep.toml"), "--db", str(db), "--report", "")
    assert r.returncode == 0, r.stderr
    return db


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    out = Path(os.environ.get("PONDER_ARTIFACTS") or tmp_path_factory.mktemp("view-shots"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def server(store):
    with served(store) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    if not available():
        pytest.fail("these tests need Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    d = chromium()
    yield d
    d.quit()


def _open(d, url: str) -> None:
    """Load ``url`` and wait until the page says it has drawn its view."""
    open_view(d, url)


def _clean(d) -> None:
    """No console error and no failed request on the page."""
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    failed = d.execute_script("return performance.getEntriesByType('resource')"
                              ".filter(e => e.responseStatus >= 400).map(e => e.name)")
    assert not failed, failed


def _rows(db: Path) -> list[dict]:
    s = ResultsStore(db, readonly=True)
    try:
        return s.rows()
    finally:
        s.close()


def _nodes(tree: dict) -> list[dict]:
    out, stack = [], [tree]
    while stack:
        n = stack.pop()
        out.append(n)
        stack.extend(n["children"])
    return out


def _path_ids(tree: dict, target: int) -> list[int]:
    stack = [(tree, [tree["id"]])]
    while stack:
        n, p = stack.pop()
        if n["id"] == target:
            return p
        stack.extend((c, p + [c["id"]]) for c in n["children"])
    return []


def test_every_view_loads_with_no_console_error_or_failed_request(server, store, browser, artifacts):
    rows = _rows(store)
    views = {"overview": "", "problems": "#/problems/arith%2Fhard", "problem": f"#/p/arith%2Fhard/{rows[0]['problem_id']}"}
    for r in rows:  # one generation of each strategy: samples, trees, token level
        views.setdefault(f"generation-{r['strategy']}", f"#/g/{r['key']}")
    for name, frag in views.items():
        _open(browser, server + frag)
        assert not browser.find_elements("id", "error"), (name, browser.find_element("id", "error").text)
        browser.save_screenshot(str(artifacts / f"view-{name}.png"))
        _clean(browser)
    # token level: the text, a span per stored token shaded by its probability
    greedy = [r for r in rows if r["strategy"] == "greedy"][0]
    tokens = ResultsStore.trace(greedy)["tokens"]
    _open(browser, server + f"#/g/{greedy['key']}")
    spans = browser.find_elements("css selector", "#tokens span.tok")
    # the page's data, not a browser's text serialisation (Chromium 156's `.text` drops the newlines of a <pre>)
    shown = [s.get_attribute("textContent") for s in spans]
    assert len(spans) == len(tokens) > 5 and shown == [t["t"] for t in tokens]
    assert "".join(shown).startswith(greedy["text"].strip())
    assert [int(s.get_attribute("data-i")) for s in spans] == list(range(len(tokens)))
    assert all(0 < float(s.get_attribute("data-p")) <= 1 for s in spans)
    assert all(len(t["top"]) == 3 for t in tokens)  # the sweep asked for 3 alternatives a token
    from selenium.webdriver import ActionChains

    ActionChains(browser).move_to_element(spans[2]).perform()
    tip = [d.get_attribute("textContent") for d in browser.find_elements("css selector", "#tooltip > div")]
    assert len(tip) == 4 and tip[0].startswith(json.dumps(tokens[2]["t"]))  # the token, then its 3 alternatives
    # speculative decoding: each round's accepted and rejected drafts and the target's token
    spec = [r for r in rows if r["strategy"] == "speculative"][0]
    rounds = ResultsStore.trace(spec)["rounds"]
    _open(browser, server + f"#/g/{spec['key']}")
    shown = browser.find_elements("css selector", "#drafts .round")
    assert len(shown) == len(rounds) == json.loads(spec["meta"])["rounds"]
    acc = sum(len(r["accepted"]) for r in rounds)
    assert len(browser.find_elements("css selector", "#drafts .acc")) == acc == json.loads(spec["meta"])["accepted"]
    kept = "".join("".join(r["accepted"]) + r["added"] for r in rounds)  # what the rounds emitted spells the text
    assert kept.startswith(spec["text"].strip())
    _open(browser, server + f"#/g/{[r for r in rows if r['strategy'] == 'majority'][0]['key']}")
    samples = browser.find_elements("css selector", "#samples tr.sample")
    assert len(samples) == 4 and len(browser.find_elements("css selector", "#samples tr.chosen")) == 1
    assert "most votes" in browser.find_element("id", "why").text


@pytest.mark.parametrize("strategy", ["prm-beam", "mcts", "speculative-rejection"])
def test_the_tree_draws_every_stored_node_and_the_chosen_path(server, store, browser, strategy):
    for r in [r for r in _rows(store) if r["strategy"] == strategy][:3]:
        tree = ResultsStore.trace(r)
        _open(browser, server + f"#/g/{r['key']}")
        drawn = browser.find_elements("css selector", "#tree g.node")
        assert len(drawn) == len(_nodes(tree)) == int(browser.find_element("id", "tree").get_attribute("data-nodes"))
        chosen = sorted(int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.chosen"))
        best = json.loads(r["meta"])["best_node"]
        assert chosen == sorted(_path_ids(tree, best)) and best in chosen
        # the chosen path spells the stored answer's text (MCTS may finish it with a rollout)
        by_id = {n["id"]: n for n in _nodes(tree)}
        spelled = "".join(by_id[i]["step"] for i in _path_ids(tree, best))
        assert spelled == r["text"] or (strategy == "mcts" and r["text"].startswith(spelled))
        if strategy == "speculative-rejection":
            rejected = [n for n in _nodes(tree) if n["finish"] == "rejected"]
            assert len(browser.find_elements("css selector", "#tree g.node.rejected")) == len(rejected) > 0
        # following the chosen path folds the rest away and keeps the path drawn
        browser.find_element("id", "follow").click()
        still = sorted(int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.chosen"))
        assert still == chosen
        _clean(browser)


def test_a_frontier_point_opens_exactly_its_settings_problems(server, store, browser):
    summary = summarise(_rows(store))["arith/hard"]
    want = {(s["strategy"], s["problems"], s["correct"]) for s in summary}
    _open(browser, server)
    points = browser.find_elements("css selector", ".frontier-svg .point")
    assert len(points) == len(summary)
    seen = set()
    for i in range(len(points)):
        _open(browser, server)
        point = browser.find_elements("css selector", ".frontier-svg .point")[i]
        sid = point.get_attribute("data-setting")
        # a point that falls on another's spot is a ring around it: clicked on its own element
        browser.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", point)
        for _ in range(50):
            if browser.find_elements("id", "summary"):
                break
            time.sleep(0.05)
        box = browser.find_element("id", "summary")
        assert box.get_attribute("data-setting") == sid
        label = box.find_element("tag name", "b").text
        seen.add((label.split("(")[0], int(box.get_attribute("data-problems")), int(box.get_attribute("data-correct"))))
        cells = browser.find_elements("css selector", f"#problems td.cell[data-setting='{sid}']")
        assert len(cells) == int(box.get_attribute("data-problems"))
        assert sum("right" in c.get_attribute("class") for c in cells) == int(box.get_attribute("data-correct"))
        _clean(browser)
    assert seen == want
    # the x axis switches to FLOPs: the same points, the FLOPs frontier marked
    _open(browser, server)
    flops_front = {s["config_hash"][:12] for s in summary if s["frontier_flops"]}
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "cost-arith/hard")).select_by_value("flops")
    points = browser.find_elements("css selector", ".frontier-svg .point")
    assert len(points) == len(summary)
    assert {p.get_attribute("data-setting")[:12] for p in points if p.get_attribute("data-frontier") == "1"} == flops_front
    assert "FLOPs per problem" in browser.find_element("css selector", ".frontier-svg").text
    _clean(browser)


def test_the_exported_file_opens_from_disk_with_the_same_tree(store, browser, tmp_path):
    out = tmp_path / "view.html"
    r = _ponder("view", "--db", str(store), "--export", str(out))
    assert r.returncode == 0 and out.exists(), r.stderr
    row = [r for r in _rows(store) if r["strategy"] == "prm-beam"][0]
    _open(browser, out.as_uri() + f"#/g/{row['key']}")
    assert len(browser.find_elements("css selector", "#tree g.node")) == len(_nodes(ResultsStore.trace(row)))
    _open(browser, out.as_uri())
    assert len(browser.find_elements("css selector", ".frontier-svg .point")) == 6
    _clean(browser)


def test_bad_input_gets_a_clear_page_not_a_stack_trace(store, server, browser, tmp_path):
    # a missing store, a corrupt one, a folder: the command says so before serving
    r = _ponder("view", "--db", str(tmp_path / "nope.sqlite"))
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "corrupt.sqlite").write_bytes(b"this is not sqlite" * 100)
    r = _ponder("view", "--db", str(tmp_path / "corrupt.sqlite"))
    assert r.returncode != 0 and "not a ponder results store" in r.stderr and "Traceback" not in r.stderr
    r = _ponder("view", "--db", str(store), "--export", str(tmp_path))
    assert r.returncode != 0 and "is a folder" in r.stderr
    # an unknown problem, generation or view: a page that says so
    for frag, words in (("#/p/arith%2Fhard/hard-9999", "no problem"), ("#/g/deadbeef", "no stored generation"),
                        ("#/problems/nosuchtask", "no task"), ("#/what/ever", "no view")):
        _open(browser, server + frag)
        assert words in browser.find_element("id", "error").text.lower(), frag
    assert httpx.get(server + "api/generation/deadbeef").status_code == 404
    browser.get_log("browser")  # the unknown generation's 404 was meant: start the log afresh
    # a trace from an older ponder (a shape this one does not draw): shown raw, with a note
    old = tmp_path / "old.sqlite"
    shutil.copy(store, old)
    with sqlite3.connect(old) as c:
        key = c.execute("SELECT key FROM results WHERE strategy = 'prm-beam' LIMIT 1").fetchone()[0]
        c.execute("UPDATE results SET trace = ? WHERE key = ?",
                  (zlib.compress(json.dumps({"nodes": [{"parent": None, "text": "x"}]}).encode()), key))
    out = tmp_path / "old.html"
    assert _ponder("view", "--db", str(old), "--export", str(out)).returncode == 0
    _open(browser, out.as_uri() + f"#/g/{key}")
    assert "older" in browser.find_element("id", "note").text and "nodes" in browser.find_element("id", "raw").text
    _clean(browser)
    # a store deleted under a running server: the page says so
    gone = tmp_path / "gone.sqlite"
    shutil.copy(store, gone)
    with served(gone) as url:
        gone.unlink()
        page = httpx.get(url)
        assert page.status_code == 404 and "does not exist" in page.text and "Traceback" not in page.text


def test_traces_of_served_requests_open_in_the_view(browser, tmp_path):
    """Live: `ponder serve --trace-store FILE` keeps the traces of requests made with
    ponder.trace: true; the response names each output's view id, and `ponder view`
    draws its tree (no accuracy: a live request has no answer key)."""
    from servers import ponder_serve

    traces = tmp_path / "live.sqlite"
    srv = ponder_serve("--reward-model", "arith-reward", "--trace-store", str(traces))
    try:
        r = httpx.post(srv.url + "/completions", timeout=120, json={
            "model": "arith", "prompt": "Q: 3+4-2+8-1\n", "max_tokens": 64, "temperature": 0.7, "seed": 1,
            "ponder": {"strategy": "prm-beam", "settings": {"samples": 4, "beam_width": 2}, "trace": True}})
        assert r.status_code == 200, r.text
        (out,) = r.json()["ponder"]["outputs"]
        plain = httpx.post(srv.url + "/completions", timeout=120, json={
            "model": "arith", "prompt": "Q: 1+2\n", "max_tokens": 32, "ponder": {"strategy": "greedy"}})
        assert plain.status_code == 200 and "view_id" not in plain.json()["ponder"]["outputs"][0]
    finally:
        srv.stop()
    (row,) = _rows(traces)  # only the traced request was kept
    assert row["key"] == out["view_id"] and row["task"] == "serve" and row["strategy"] == "prm-beam"
    html = tmp_path / "live.html"
    assert _ponder("view", "--db", str(traces), "--export", str(html)).returncode == 0
    _open(browser, html.as_uri() + f"#/g/{out['view_id']}")
    assert len(browser.find_elements("css selector", "#tree g.node")) == len(_nodes(ResultsStore.trace(row)))
    assert "not judged" in browser.find_element("css selector", "table.summary").text
    _open(browser, html.as_uri())
    assert not browser.find_elements("css selector", ".frontier-svg")  # no accuracy to plot
    assert "served with trace" in browser.find_element("id", "app").text
    _clean(browser)
