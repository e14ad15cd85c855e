"""`ponder view` (issue 26) in a real browser: headless Chromium from Debian's packages,
driven by Selenium, over a store a real sweep wrote on the shipped models.

Each view loads with no console error and no failed request; the tree view draws
every stored node and highlights the chosen path; a frontier point opens exactly its
setting's problems with `ponder report`'s counts; the exported file shows the same from
file:// with no server; bad input gets a page that says what is wrong. Screenshots of
every view go to $PONDER_ARTIFACTS (default: the test's temporary folder)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
import zlib

import httpx
import pytest

from ponder.meta.search.base import tree_nodes
from ponder.sweep.report import summarise
from ponder.sweep.store import ResultsStore
from browser import open_view, served
from viewing import assert_clean, path_ids, ponder_cli, stored_rows


def test_every_view_loads_with_no_console_error_or_failed_request(server, store, browser, artifacts):
    rows = stored_rows(store)
    views = {"overview": "", "problems": "#/problems/arith%2Fexpert", "problem": f"#/p/arith%2Fexpert/{rows[0]['problem_id']}"}
    for r in rows:  # one generation of each strategy: samples, trees, token level
        views.setdefault(f"generation-{r['strategy']}", f"#/g/{r['key']}")
    for name, frag in views.items():
        open_view(browser, server + frag)
        assert not browser.find_elements("id", "error"), (name, browser.find_element("id", "error").text)
        browser.save_screenshot(str(artifacts / f"view-{name}.png"))
        assert_clean(browser)
    # token level: the text, a span per stored token shaded by its probability
    greedy = [r for r in rows if r["strategy"] == "greedy"][0]
    tokens = ResultsStore.trace(greedy)["tokens"]
    open_view(browser, server + f"#/g/{greedy['key']}")
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
    open_view(browser, server + f"#/g/{spec['key']}")
    shown = browser.find_elements("css selector", "#drafts .round")
    assert len(shown) == len(rounds) == json.loads(spec["meta"])["rounds"]
    acc = sum(len(r["accepted"]) for r in rounds)
    assert len(browser.find_elements("css selector", "#drafts .acc")) == acc == json.loads(spec["meta"])["accepted"]
    kept = "".join("".join(r["accepted"]) + r["added"] for r in rounds)  # what the rounds emitted spells the text
    assert kept.startswith(spec["text"].strip())
    open_view(browser, server + f"#/g/{[r for r in rows if r['strategy'] == 'majority'][0]['key']}")
    samples = browser.find_elements("css selector", "#samples tr.sample")
    assert len(samples) == 4 and len(browser.find_elements("css selector", "#samples tr.chosen")) == 1
    assert "most votes" in browser.find_element("id", "why").text


@pytest.mark.parametrize("strategy", ["prm-beam", "mcts", "speculative-rejection"])
def test_the_tree_draws_every_stored_node_and_the_chosen_path(server, store, browser, strategy):
    for r in [r for r in stored_rows(store) if r["strategy"] == strategy][:3]:
        tree = ResultsStore.trace(r)
        open_view(browser, server + f"#/g/{r['key']}")
        drawn = browser.find_elements("css selector", "#tree g.node")
        assert len(drawn) == len(tree_nodes(tree)) == int(browser.find_element("id", "tree").get_attribute("data-nodes"))
        chosen = sorted(int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.chosen"))
        best = json.loads(r["meta"])["best_node"]
        assert chosen == sorted(path_ids(tree, best)) and best in chosen
        # the chosen path spells the stored answer's text (MCTS may finish it with a rollout)
        by_id = {n["id"]: n for n in tree_nodes(tree)}
        spelled = "".join(by_id[i]["step"] for i in path_ids(tree, best))
        assert spelled == r["text"] or (strategy == "mcts" and r["text"].startswith(spelled))
        if strategy == "speculative-rejection":
            rejected = [n for n in tree_nodes(tree) if n["finish"] == "rejected"]
            assert len(browser.find_elements("css selector", "#tree g.node.rejected")) == len(rejected) > 0
        # following the chosen path folds the rest away and keeps the path drawn
        browser.find_element("id", "follow").click()
        still = sorted(int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.chosen"))
        assert still == chosen
        assert_clean(browser)


def test_a_frontier_point_opens_exactly_its_settings_problems(server, store, browser):
    summary = summarise(stored_rows(store))["arith/expert"]
    want = {(s["strategy"], s["problems"], s["correct"]) for s in summary}
    open_view(browser, server)
    points = browser.find_elements("css selector", ".frontier-svg .point")
    assert len(points) == len(summary)
    seen = set()
    for i in range(len(points)):
        open_view(browser, server)
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
        assert_clean(browser)
    assert seen == want
    # the x axis switches to FLOPs: the same points, the FLOPs frontier marked
    open_view(browser, server)
    flops_front = {s["config_hash"][:12] for s in summary if s["frontier_flops"]}
    from selenium.webdriver.support.ui import Select

    Select(browser.find_element("id", "cost-arith/expert")).select_by_value("flops")
    points = browser.find_elements("css selector", ".frontier-svg .point")
    assert len(points) == len(summary)
    assert {p.get_attribute("data-setting")[:12] for p in points if p.get_attribute("data-frontier") == "1"} == flops_front
    assert "FLOPs per problem" in browser.find_element("css selector", ".frontier-svg").text
    assert_clean(browser)


def test_the_exported_file_opens_from_disk_with_the_same_tree(store, browser, tmp_path):
    out = tmp_path / "view.html"
    r = ponder_cli("view", "--db", str(store), "--export", str(out))
    assert r.returncode == 0 and out.exists(), r.stderr
    row = [r for r in stored_rows(store) if r["strategy"] == "prm-beam"][0]
    open_view(browser, out.as_uri() + f"#/g/{row['key']}")
    assert len(browser.find_elements("css selector", "#tree g.node")) == len(tree_nodes(ResultsStore.trace(row)))
    open_view(browser, out.as_uri())
    assert len(browser.find_elements("css selector", ".frontier-svg .point")) == len(summarise(stored_rows(store))["arith/expert"])
    assert_clean(browser)
    # the traces go in compressed: the file is not several times the store (it was 3.4x)
    assert out.stat().st_size < 1.5 * store.stat().st_size, (out.stat().st_size, store.stat().st_size)


def test_bad_input_gets_a_clear_page_not_a_stack_trace(store, server, browser, tmp_path):
    # a missing store, a corrupt one, a folder: the command says so before serving
    r = ponder_cli("view", "--db", str(tmp_path / "nope.sqlite"))
    assert r.returncode != 0 and "does not exist" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "corrupt.sqlite").write_bytes(b"this is not sqlite" * 100)
    r = ponder_cli("view", "--db", str(tmp_path / "corrupt.sqlite"))
    assert r.returncode != 0 and "not a ponder results store" in r.stderr and "Traceback" not in r.stderr
    r = ponder_cli("view", "--db", str(store), "--export", str(tmp_path))
    assert r.returncode != 0 and "is a folder" in r.stderr
    # an unknown problem, generation or view: a page that says so
    for frag, words in (("#/p/arith%2Fexpert/expert-9999", "no problem"), ("#/g/deadbeef", "no stored generation"),
                        ("#/problems/nosuchtask", "no task"), ("#/what/ever", "no view")):
        open_view(browser, server + frag)
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
    assert ponder_cli("view", "--db", str(old), "--export", str(out)).returncode == 0
    open_view(browser, out.as_uri() + f"#/g/{key}")
    assert "older" in browser.find_element("id", "note").text and "nodes" in browser.find_element("id", "raw").text
    assert_clean(browser)
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
    (row,) = stored_rows(traces)  # only the traced request was kept
    assert row["key"] == out["view_id"] and row["task"] == "serve" and row["strategy"] == "prm-beam"
    html = tmp_path / "live.html"
    assert ponder_cli("view", "--db", str(traces), "--export", str(html)).returncode == 0
    open_view(browser, html.as_uri() + f"#/g/{out['view_id']}")
    assert len(browser.find_elements("css selector", "#tree g.node")) == len(tree_nodes(ResultsStore.trace(row)))
    assert "not judged" in browser.find_element("css selector", "table.summary").text
    # the served prompt is kept with the trace and shown as the question
    assert row["question"] == "Q: 3+4-2+8-1\n"
    assert browser.find_element("css selector", "#question pre").get_attribute("textContent") == row["question"]
    open_view(browser, html.as_uri())
    assert not browser.find_elements("css selector", ".frontier-svg")  # no accuracy to plot
    assert "served with trace" in browser.find_element("id", "app").text
    assert_clean(browser)


# -- what a researcher needs (issue 33) ------------------------------------------------------
