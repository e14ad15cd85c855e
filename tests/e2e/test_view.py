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

from ponder.meta.search.base import tree_nodes
from ponder.sweep.report import summarise
from ponder.sweep.store import ResultsStore
from browser import available, chromium, open_view, served

SWEEP = """
seed = 0
chunk = 50
reward_model = "arith-reward"
[[model]]
name = "arith"
[[task]]
name = "arith"
level = "expert"
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
[[strategy]]
name = "deepconf-online"
temperature = 0.7
samples = 6
warmup = 2
keep = 0.5
[[strategy]]
name = "rsd"
temperature = 0.0
threshold = 0.8
[[strategy]]
name = "compute-optimal"
temperature = 0.7
probe = 1
probe_with = "rsd"
"probe_with.threshold" = 0.5
"probe_with.temperature" = 0.0
difficulty = "reward"
policy = "0.25:probe,1:majority"
"majority.samples" = 3
"""
# the same grid on the draft model too: a store with two models on one task
TWO_MODELS = SWEEP.replace('[[model]]\nname = "arith"\n', '[[model]]\nname = "arith"\n[[model]]\nname = "arith-draft"\n')


def _ponder(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ponder.cli", *args], capture_output=True, text=True, timeout=600, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("view")
    (folder / "sweep.toml").write_text(TWO_MODELS)
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
    views = {"overview": "", "problems": "#/problems/arith%2Fexpert", "problem": f"#/p/arith%2Fexpert/{rows[0]['problem_id']}"}
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
        assert len(drawn) == len(tree_nodes(tree)) == int(browser.find_element("id", "tree").get_attribute("data-nodes"))
        chosen = sorted(int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.chosen"))
        best = json.loads(r["meta"])["best_node"]
        assert chosen == sorted(_path_ids(tree, best)) and best in chosen
        # the chosen path spells the stored answer's text (MCTS may finish it with a rollout)
        by_id = {n["id"]: n for n in tree_nodes(tree)}
        spelled = "".join(by_id[i]["step"] for i in _path_ids(tree, best))
        assert spelled == r["text"] or (strategy == "mcts" and r["text"].startswith(spelled))
        if strategy == "speculative-rejection":
            rejected = [n for n in tree_nodes(tree) if n["finish"] == "rejected"]
            assert len(browser.find_elements("css selector", "#tree g.node.rejected")) == len(rejected) > 0
        # following the chosen path folds the rest away and keeps the path drawn
        browser.find_element("id", "follow").click()
        still = sorted(int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.chosen"))
        assert still == chosen
        _clean(browser)


def test_a_frontier_point_opens_exactly_its_settings_problems(server, store, browser):
    summary = summarise(_rows(store))["arith/expert"]
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

    Select(browser.find_element("id", "cost-arith/expert")).select_by_value("flops")
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
    assert len(browser.find_elements("css selector", "#tree g.node")) == len(tree_nodes(ResultsStore.trace(row)))
    _open(browser, out.as_uri())
    assert len(browser.find_elements("css selector", ".frontier-svg .point")) == len(summarise(_rows(store))["arith/expert"])
    _clean(browser)
    # the traces go in compressed: the file is not several times the store (it was 3.4x)
    assert out.stat().st_size < 1.5 * store.stat().st_size, (out.stat().st_size, store.stat().st_size)


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
    for frag, words in (("#/p/arith%2Fexpert/expert-9999", "no problem"), ("#/g/deadbeef", "no stored generation"),
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
    assert len(browser.find_elements("css selector", "#tree g.node")) == len(tree_nodes(ResultsStore.trace(row)))
    assert "not judged" in browser.find_element("css selector", "table.summary").text
    # the served prompt is kept with the trace and shown as the question
    assert row["question"] == "Q: 3+4-2+8-1\n"
    assert browser.find_element("css selector", "#question pre").get_attribute("textContent") == row["question"]
    _open(browser, html.as_uri())
    assert not browser.find_elements("css selector", ".frontier-svg")  # no accuracy to plot
    assert "served with trace" in browser.find_element("id", "app").text
    _clean(browser)


# -- what a researcher needs (issue 33) ------------------------------------------------------
def _click(d, element) -> None:
    """A click on the element itself (an SVG dot or a ring around another point)."""
    d.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", element)


def _first(store, strategy: str, model: str = "arith") -> dict:
    return [r for r in _rows(store) if r["strategy"] == strategy and r["model"] == model][0]


def _drawn(d) -> list[int]:
    return [int(e.get_attribute("data-id")) for e in d.find_elements("css selector", "#tree g.node")]


def test_every_generation_shows_its_question_gold_answer_and_judged_path_ends(server, store, browser):
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    problems = {p.id: p for p in task.problems("expert")}
    for strategy in ("prm-beam", "majority", "greedy"):
        r = _first(store, strategy)
        p = problems[r["problem_id"]]
        assert r["question"] == task.prompt(p) and r["gold"] == str(p.answer)  # stored with the row
        _open(browser, server + f"#/g/{r['key']}")
        q = browser.find_element("css selector", "#question pre").get_attribute("textContent")
        assert q == task.prompt(p), strategy
        assert browser.find_element("css selector", "#gold code").get_attribute("textContent") == str(p.answer)
    # a tree: every finished path end marked right or wrong by the task's checker, on its whole path
    r = _first(store, "prm-beam")
    p, tree = problems[r["problem_id"]], ResultsStore.trace(r)
    _open(browser, server + f"#/g/{r['key']}")
    by_id = {n["id"]: n for n in tree_nodes(tree)}

    def path_text(i):
        return "".join(by_id[j]["step"] for j in _path_ids(tree, i))

    ends = [n for n in tree_nodes(tree) if n["terminal"] and not n["children"]]
    assert ends and all(n["correct"] == task.check_answer(p, path_text(n["id"])) for n in ends)
    right = {int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.right")}
    wrong = {int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.wrong")}
    assert right == {n["id"] for n in ends if n["correct"]} and wrong == {n["id"] for n in ends if not n["correct"]}
    # a node shows its whole path: the solution so far, not only its step
    leaf = ends[0]["id"]
    _click(browser, browser.find_element("css selector", f"#tree g.node[data-id='{leaf}']"))
    assert browser.find_element("css selector", "#detail pre.path").get_attribute("textContent") == path_text(leaf)
    # the root: the question itself
    _click(browser, browser.find_element("css selector", f"#tree g.node[data-id='{tree['id']}']"))
    assert browser.find_element("css selector", "#detail pre.path").get_attribute("textContent") == task.prompt(p)
    _clean(browser)


def test_find_filter_fold_and_replay_a_search(server, store, browser):
    r = _first(store, "prm-beam")
    tree = ResultsStore.trace(r)
    nodes = tree_nodes(tree)
    _open(browser, server + f"#/g/{r['key']}")
    box = browser.find_element("css selector", "input.node-search")
    box.send_keys("Answer")
    hits = {int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.hit")}
    assert hits == {n["id"] for n in nodes if "answer" in n["step"].lower()} and hits
    box.clear()
    browser.execute_script("const e = document.querySelector('input.max-depth'); e.value = '1';"
                           "e.dispatchEvent(new Event('input'))")
    dim = {int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.dim")}
    assert dim == {n["id"] for n in nodes if n["depth"] > 1}
    browser.find_element("css selector", "button.collapse-all").click()
    assert sorted(_drawn(browser)) == sorted([tree["id"]] + [c["id"] for c in tree["children"]])
    browser.find_element("id", "unfold").click()  # expand all
    assert len(_drawn(browser)) == len(nodes)
    # replay: the first k + 1 nodes the search made (a child is always made after its parent)
    order = sorted(n["id"] for n in nodes)
    for k in (0, 3, len(order) // 2, len(order) - 1):
        browser.execute_script("const e = document.querySelector('input.replay'); e.value = arguments[0];"
                               "e.dispatchEvent(new Event('input'))", k)
        assert sorted(_drawn(browser)) == order[: k + 1], k
    _clean(browser)


def test_mcts_edges_rsd_rewrites_and_deepconf_stops_are_shown(server, store, browser):
    r = _first(store, "mcts")
    _open(browser, server + f"#/g/{r['key']}")
    labels = [e.get_attribute("textContent") for e in browser.find_elements("css selector", "#tree text.edge-label")]
    assert labels and all(t.startswith("N ") and " Q " in t for t in labels)
    for r in [r for r in _rows(store) if r["strategy"] == "rsd"]:
        rewritten = {n["id"] for n in tree_nodes(ResultsStore.trace(r)) if n.get("drafts")}
        _open(browser, server + f"#/g/{r['key']}")
        shown = {int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.rewritten")}
        assert shown == rewritten
    assert any(n.get("drafts") for r in _rows(store) if r["strategy"] == "rsd" for n in tree_nodes(ResultsStore.trace(r)))
    for r in [r for r in _rows(store) if r["strategy"] == "deepconf-online"][:4]:
        meta = json.loads(r["meta"])
        _open(browser, server + f"#/g/{r['key']}")
        heads = [h.get_attribute("textContent") for h in browser.find_elements("css selector", "#samples th")]
        assert "stopped at" in heads and "confidence" in heads
        stopped = browser.find_elements("css selector", "#samples tr.stopped")
        assert len(stopped) == meta["stopped"] == sum(a is not None for a in meta["stopped_at"])
        assert len(meta["confidence"]) == len(ResultsStore.trace(r))
    _clean(browser)


def test_compute_optimal_says_which_policy_ran_and_draws_the_probe(server, store, browser):
    for r in [r for r in _rows(store) if r["strategy"] == "compute-optimal"][:6]:
        meta, trace = json.loads(r["meta"]), ResultsStore.trace(r)
        _open(browser, server + f"#/g/{r['key']}")
        why = browser.find_element("id", "why")
        want = 0 if meta["chose"] == "probe" else len(trace) - 1  # marked by identity when stored
        assert [i for i, s in enumerate(trace) if s.get("chosen")] == [want]
        assert why.get_attribute("data-by") == "id" and int(why.get_attribute("data-chosen")) == want
        text = why.get_attribute("textContent")
        assert ("from the probe" in text) if meta["chose"] == "probe" else (f"ran {meta['chose']}" in text), text
        assert "difficulty" in text
        # the probe's search is drawn as a tree, not dumped as JSON
        probe_tree = trace[0]["meta"]["tree"]
        assert int(browser.find_element("id", "tree").get_attribute("data-nodes")) == len(tree_nodes(probe_tree))
        assert '"children"' not in browser.find_element("id", "app").get_attribute("textContent")
    _clean(browser)


def test_the_overview_draws_cost_truly_and_a_frontier_per_model(server, store, browser):
    summary = summarise(_rows(store))["arith/expert"]
    _open(browser, server)
    for cost in ("generated_tokens", "flops"):
        if cost == "flops":
            from selenium.webdriver.support.ui import Select

            Select(browser.find_element("id", "cost-arith/expert")).select_by_value("flops")
        pts = browser.find_elements("css selector", ".frontier-svg .point")
        assert len(pts) == len(summary)
        # x is the cost: ordering points by their cost orders them on the screen (no nudging)
        xs = sorted((float(p.get_attribute("data-x")), browser.execute_script(
            "const b = arguments[0].getBBox(); return b.x + b.width / 2", p)) for p in pts)
        assert all(b[1] >= a[1] - 0.01 for a, b in zip(xs, xs[1:])), xs
    lines = browser.find_elements("css selector", ".frontier-svg polyline.frontier-line")
    front = {}
    for s in summary:
        front.setdefault(s["model"], []).append(s["model_frontier_flops"])
    assert {e.get_attribute("data-model") for e in lines} == {m for m, f in front.items() if sum(f) > 1}
    named = {e.get_attribute("textContent") for e in browser.find_elements("css selector", ".frontier-svg .frontier-model")}
    assert named == {"arith", "arith-draft"}
    # budgets on the points; a colour per strategy, all different
    budgets = [e.get_attribute("textContent") for e in browser.find_elements("css selector", ".frontier-svg text.budget")]
    assert "N=4" in budgets and "it=4" in budgets
    colours = [e.get_attribute("style") for e in browser.find_elements("css selector", ".legend i")]
    assert len(colours) == len({s["strategy"] for s in summary}) == len(set(colours))
    # the table: a model column, and the frontier by tokens and by FLOPs
    table = browser.find_element("id", "settings-arith/expert")
    assert table.find_elements("tag name", "th")[0].get_attribute("textContent") == "model"
    from ponder.view.data import setting_id

    by_id = {setting_id(s): s for s in summary}
    for tr in table.find_elements("css selector", "tr[data-setting]"):
        s = by_id[tr.get_attribute("data-setting")]
        cell = tr.find_element("css selector", "td.frontier-cell").get_attribute("textContent")
        assert ("tokens" in cell) == s["frontier"] and ("FLOPs" in cell) == s["frontier_flops"]
    _clean(browser)


def test_the_problems_table_keeps_its_state_in_the_url(server, store, browser):
    from selenium.webdriver.support.ui import Select

    summary = summarise(_rows(store))["arith/expert"]
    _open(browser, server + "#/problems/arith%2Fexpert")
    ids = [o.get_attribute("value") for o in browser.find_elements("css selector", "#setting-a option")]
    Select(browser.find_element("id", "setting-a")).select_by_index(1)
    Select(browser.find_element("id", "setting-b")).select_by_index(len(ids) - 1)
    Select(browser.find_element("id", "relation")).select_by_value("wa")
    Select(browser.find_element("id", "sort")).select_by_value("hard")
    shown = browser.find_element("id", "summary").get_attribute("data-shown")
    url = browser.current_url
    assert f"a={ids[1]}" in url and f"b={ids[-1]}" in url and "rel=wa" in url and "sort=hard" in url
    link = browser.find_elements("css selector", "#problems td.cell a")
    browser.execute_script("window.ponderRendered = null; location.hash = arguments[0]",
                           link[0].get_attribute("href").split("#", 1)[1] if link else f"/g/{_rows(store)[0]['key']}")
    for _ in range(200):  # the generation, opened within the page
        if browser.execute_script("return window.ponderRendered && window.ponderRendered.view") == "g":
            break
        time.sleep(0.05)
    browser.back()
    for _ in range(200):
        if browser.find_elements("id", "summary"):
            break
        time.sleep(0.05)
    assert Select(browser.find_element("id", "setting-a")).first_selected_option.get_attribute("value") == ids[1]
    assert Select(browser.find_element("id", "setting-b")).first_selected_option.get_attribute("value") == ids[-1]
    assert Select(browser.find_element("id", "relation")).first_selected_option.get_attribute("value") == "wa"
    assert browser.find_element("id", "summary").get_attribute("data-shown") == shown
    # a long label (compute-optimal's policy) does not widen the menus or the page
    assert browser.execute_script("return document.getElementById('setting-a').offsetWidth") <= 420
    assert browser.execute_script("return document.scrollingElement.scrollWidth <= window.innerWidth + 1")
    # a frontier point compares with the most accurate other setting of its model, not an arbitrary one
    _open(browser, server)
    point = browser.find_elements("css selector", ".frontier-svg .point")[0]
    sid = point.get_attribute("data-setting")
    _click(browser, point)
    for _ in range(100):
        if browser.find_elements("id", "summary"):
            break
        time.sleep(0.05)
    from ponder.view.data import setting_id

    s = [x for x in summary if setting_id(x) == sid][0]
    others = [x for x in summary if x is not s and x["model"] == s["model"]]
    best = max(others, key=lambda x: (x["accuracy"], -x["generated_tokens"]))
    assert browser.find_element("id", "summary").get_attribute("data-b") == setting_id(best)
    # the header's link to a task's problems is URL-encoded, and opens them
    link = browser.find_element("css selector", "header a[href^='#/problems/']")
    assert browser.execute_script("return arguments[0].getAttribute('href')", link) == "#/problems/arith%2Fexpert"
    link.click()
    for _ in range(100):
        if browser.find_elements("id", "summary") or browser.find_elements("id", "error"):
            break
        time.sleep(0.05)
    assert not browser.find_elements("id", "error")
    _clean(browser)


def test_no_bookkeeping_in_meta_and_a_served_overview_reads_no_trace(server, store, browser, tmp_path):
    for r in {r["strategy"]: r for r in _rows(store)}.values():
        _open(browser, server + f"#/g/{r['key']}")
        assert "prefix_cache_hit_tokens" not in browser.find_element("id", "app").get_attribute("textContent")
    broken = tmp_path / "broken.sqlite"
    shutil.copy(store, broken)
    with sqlite3.connect(broken) as c:  # every trace unreadable: the overview and the problems do not read them
        c.execute("UPDATE results SET trace = x'00', text = ''")
    with served(broken) as url:
        _open(browser, url)
        assert len(browser.find_elements("css selector", ".frontier-svg .point")) == len(summarise(_rows(store))["arith/expert"])
        _open(browser, url + "#/problems/arith%2Fexpert")
        assert int(browser.find_element("id", "summary").get_attribute("data-problems")) == 6
        _clean(browser)


def test_a_jsonl_task_shows_its_samples_answers_and_votes(browser, tmp_path):
    rows = [{"question": q, "answer": f"#### {a}"} for q, a in (("3+4-2", 5), ("1+2+3", 6), ("9-4+1", 6))]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'seed = 0\n[[model]]\nname = "arith"\n[[task]]\nname = "{data}"\nprompt = "Q: {{question}}\\n"\n'
                   '[[strategy]]\nname = "majority"\ntemperature = 0.7\nsamples = 4\n')
    db = tmp_path / "r.sqlite"
    assert _ponder("sweep", str(cfg), "--db", str(db), "--report", "").returncode == 0
    out = tmp_path / "v.html"
    assert _ponder("view", "--db", str(db), "--export", str(out)).returncode == 0
    r = _rows(db)[0]
    _open(browser, out.as_uri() + f"#/g/{r['key']}")
    cells = browser.find_elements("css selector", "#samples tr.sample td:nth-child(2)")
    assert len(cells) == 4 and all(c.get_attribute("textContent") for c in cells)
    votes = browser.find_elements("css selector", "#samples tr.sample td:nth-child(4)")
    assert all(v.get_attribute("textContent") for v in votes)
    assert browser.find_element("css selector", "#gold code").get_attribute("textContent") == r["gold"]
    _clean(browser)


def test_a_port_in_use_is_one_line(store):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = _ponder("view", "--db", str(store), "--port", str(port))
    lines = [x for x in r.stderr.strip().splitlines() if x.strip()]
    assert r.returncode == 2 and len(lines) == 1 and "already in use" in lines[0] and "--port" in lines[0], r.stderr


def _synthetic_tree(n: int, seed: int = 0) -> dict:
    import random

    rnd = random.Random(seed)
    root = {"id": 0, "step": "", "depth": 0, "terminal": False, "finish": None, "score": None, "visits": 0,
            "value": None, "usage": {}, "drafts": [], "children": []}
    nodes = [root]
    for i in range(1, n):
        parent = nodes[rnd.randrange(max(1, len(nodes) - 200), len(nodes))] if i > 1 else root
        node = {"id": i, "step": f"{i}+1={i + 1}\n", "depth": parent["depth"] + 1, "terminal": False, "finish": "stop",
                "score": rnd.random(), "visits": 0, "value": None, "usage": {}, "drafts": [], "children": []}
        parent["children"].append(node)
        nodes.append(node)
    return root


def test_a_big_tree_fits_and_labels_appear_as_you_zoom(store, browser, tmp_path):
    big = tmp_path / "big.sqlite"
    shutil.copy(store, big)
    tree = _synthetic_tree(5000)
    with sqlite3.connect(big) as c:
        key = c.execute("SELECT key FROM results WHERE strategy = 'prm-beam' LIMIT 1").fetchone()[0]
        c.execute("UPDATE results SET trace = ?, meta = ? WHERE key = ?",
                  (zlib.compress(json.dumps(tree).encode()), json.dumps({"best_node": 4999}), key))
    with served(big) as url:
        _open(browser, url + f"#/g/{key}")
        assert len(_drawn(browser)) == 5000
        time.sleep(0.2)
        inside = browser.execute_script("""
            const r = document.getElementById('tree').getBoundingClientRect();
            return [...document.querySelectorAll('#tree g.node .shape')].every((e) => {
              const b = e.getBoundingClientRect(), x = b.x + b.width / 2, y = b.y + b.height / 2;
              return x >= r.left - 1 && x <= r.right + 1 && y >= r.top - 1 && y <= r.bottom + 1; });""")
        assert inside  # fit uses width and height: every node is in the box
        assert browser.find_element("id", "tree").get_attribute("data-labels") == "0"  # too dense to read
        for _ in range(25):  # zoom in about the chosen node: labels appear
            browser.execute_script("""const s = document.getElementById('tree');
                const b = s.querySelector('g.node.chosen .shape').getBoundingClientRect();
                s.dispatchEvent(new WheelEvent('wheel', {deltaY: -100, clientX: b.x + b.width / 2,
                                                         clientY: b.y + b.height / 2, bubbles: true}));""")
        time.sleep(0.2)
        assert int(browser.find_element("id", "tree").get_attribute("data-labels")) > 0
        _clean(browser)
