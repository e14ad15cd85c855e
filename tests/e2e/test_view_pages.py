"""`ponder view` in a real browser, the pages of one generation and of a sweep: the
question, gold answer and judged path ends; find, filter, fold and replay; MCTS edges,
RSD rewrites, DeepConf stops, compute-optimal's policy and probe; the overview's
frontiers per model; the problems table's state in the URL; a JSONL task; a big tree.
Fixtures: tests/conftest.py (one sweep store, server and Chromium a session)."""


from __future__ import annotations

import json
import shutil
import sqlite3
import time
import zlib

from ponder.meta.search.base import tree_nodes
from ponder.sweep.report import summarise
from ponder.sweep.store import ResultsStore
from browser import open_view, served
from viewing import assert_clean, click_on, drawn_ids, first_row, path_ids, ponder_cli, stored_rows


def test_every_generation_shows_its_question_gold_answer_and_judged_path_ends(server, store, browser):
    from ponder.tasks.arith import ArithTask

    task = ArithTask()
    problems = {p.id: p for p in task.problems("expert")}
    for strategy in ("prm-beam", "majority", "greedy"):
        r = first_row(store, strategy)
        p = problems[r["problem_id"]]
        assert r["question"] == task.prompt(p) and r["gold"] == str(p.answer)  # stored with the row
        open_view(browser, server + f"#/g/{r['key']}")
        q = browser.find_element("css selector", "#question pre").get_attribute("textContent")
        assert q == task.prompt(p), strategy
        assert browser.find_element("css selector", "#gold code").get_attribute("textContent") == str(p.answer)
    # a tree: every finished path end marked right or wrong by the task's checker, on its whole path
    r = first_row(store, "prm-beam")
    p, tree = problems[r["problem_id"]], ResultsStore.trace(r)
    open_view(browser, server + f"#/g/{r['key']}")
    by_id = {n["id"]: n for n in tree_nodes(tree)}

    def path_text(i):
        return "".join(by_id[j]["step"] for j in path_ids(tree, i))

    ends = [n for n in tree_nodes(tree) if n["terminal"] and not n["children"]]
    assert ends and all(n["correct"] == task.check_answer(p, path_text(n["id"])) for n in ends)
    right = {int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.right")}
    wrong = {int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.wrong")}
    assert right == {n["id"] for n in ends if n["correct"]} and wrong == {n["id"] for n in ends if not n["correct"]}
    # a node shows its whole path: the solution so far, not only its step
    leaf = ends[0]["id"]
    click_on(browser, browser.find_element("css selector", f"#tree g.node[data-id='{leaf}']"))
    assert browser.find_element("css selector", "#detail pre.path").get_attribute("textContent") == path_text(leaf)
    # the root: the question itself
    click_on(browser, browser.find_element("css selector", f"#tree g.node[data-id='{tree['id']}']"))
    assert browser.find_element("css selector", "#detail pre.path").get_attribute("textContent") == task.prompt(p)
    assert_clean(browser)


def test_find_filter_fold_and_replay_a_search(server, store, browser):
    r = first_row(store, "prm-beam")
    tree = ResultsStore.trace(r)
    nodes = tree_nodes(tree)
    open_view(browser, server + f"#/g/{r['key']}")
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
    assert sorted(drawn_ids(browser)) == sorted([tree["id"]] + [c["id"] for c in tree["children"]])
    browser.find_element("id", "unfold").click()  # expand all
    assert len(drawn_ids(browser)) == len(nodes)
    # replay: the first k + 1 nodes the search made (a child is always made after its parent)
    order = sorted(n["id"] for n in nodes)
    for k in (0, 3, len(order) // 2, len(order) - 1):
        browser.execute_script("const e = document.querySelector('input.replay'); e.value = arguments[0];"
                               "e.dispatchEvent(new Event('input'))", k)
        assert sorted(drawn_ids(browser)) == order[: k + 1], k
    assert_clean(browser)


def test_mcts_edges_rsd_rewrites_and_deepconf_stops_are_shown(server, store, browser):
    r = first_row(store, "mcts")
    open_view(browser, server + f"#/g/{r['key']}")
    labels = [e.get_attribute("textContent") for e in browser.find_elements("css selector", "#tree text.edge-label")]
    assert labels and all(t.startswith("N ") and " Q " in t for t in labels)
    for r in [r for r in stored_rows(store) if r["strategy"] == "rsd"]:
        rewritten = {n["id"] for n in tree_nodes(ResultsStore.trace(r)) if n.get("drafts")}
        open_view(browser, server + f"#/g/{r['key']}")
        shown = {int(e.get_attribute("data-id")) for e in browser.find_elements("css selector", "#tree g.node.rewritten")}
        assert shown == rewritten
    assert any(n.get("drafts") for r in stored_rows(store) if r["strategy"] == "rsd" for n in tree_nodes(ResultsStore.trace(r)))
    for r in [r for r in stored_rows(store) if r["strategy"] == "deepconf-online"][:4]:
        meta = json.loads(r["meta"])
        open_view(browser, server + f"#/g/{r['key']}")
        heads = [h.get_attribute("textContent") for h in browser.find_elements("css selector", "#samples th")]
        assert "stopped at" in heads and "confidence" in heads
        stopped = browser.find_elements("css selector", "#samples tr.stopped")
        assert len(stopped) == meta["stopped"] == sum(a is not None for a in meta["stopped_at"])
        assert len(meta["confidence"]) == len(ResultsStore.trace(r))
    assert_clean(browser)


def test_compute_optimal_says_which_policy_ran_and_draws_the_probe(server, store, browser):
    for r in [r for r in stored_rows(store) if r["strategy"] == "compute-optimal"][:6]:
        meta, trace = json.loads(r["meta"]), ResultsStore.trace(r)
        open_view(browser, server + f"#/g/{r['key']}")
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
    assert_clean(browser)


def test_the_overview_draws_cost_truly_and_a_frontier_per_model(server, store, browser):
    summary = summarise(stored_rows(store))["arith/expert"]
    open_view(browser, server)
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
    assert_clean(browser)


def test_the_problems_table_keeps_its_state_in_the_url(server, store, browser):
    from selenium.webdriver.support.ui import Select

    summary = summarise(stored_rows(store))["arith/expert"]
    open_view(browser, server + "#/problems/arith%2Fexpert")
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
                           link[0].get_attribute("href").split("#", 1)[1] if link else f"/g/{stored_rows(store)[0]['key']}")
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
    open_view(browser, server)
    point = browser.find_elements("css selector", ".frontier-svg .point")[0]
    sid = point.get_attribute("data-setting")
    click_on(browser, point)
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
    assert_clean(browser)


def test_no_bookkeeping_in_meta_and_a_served_overview_reads_no_trace(server, store, browser, tmp_path):
    for r in {r["strategy"]: r for r in stored_rows(store)}.values():
        open_view(browser, server + f"#/g/{r['key']}")
        assert "prefix_cache_hit_tokens" not in browser.find_element("id", "app").get_attribute("textContent")
    broken = tmp_path / "broken.sqlite"
    shutil.copy(store, broken)
    with sqlite3.connect(broken) as c:  # every trace unreadable: the overview and the problems do not read them
        c.execute("UPDATE results SET trace = x'00', text = ''")
    with served(broken) as url:
        open_view(browser, url)
        assert len(browser.find_elements("css selector", ".frontier-svg .point")) == len(summarise(stored_rows(store))["arith/expert"])
        open_view(browser, url + "#/problems/arith%2Fexpert")
        assert int(browser.find_element("id", "summary").get_attribute("data-problems")) == 6
        assert_clean(browser)


def test_a_jsonl_task_shows_its_samples_answers_and_votes(browser, tmp_path):
    rows = [{"question": q, "answer": f"#### {a}"} for q, a in (("3+4-2", 5), ("1+2+3", 6), ("9-4+1", 6))]
    data = tmp_path / "mine.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = tmp_path / "sweep.toml"
    cfg.write_text(f'seed = 0\n[[model]]\nname = "arith"\n[[task]]\nname = "{data}"\nprompt = "Q: {{question}}\\n"\n'
                   '[[strategy]]\nname = "majority"\ntemperature = 0.7\nsamples = 4\n')
    db = tmp_path / "r.sqlite"
    assert ponder_cli("sweep", str(cfg), "--db", str(db), "--report", "").returncode == 0
    out = tmp_path / "v.html"
    assert ponder_cli("view", "--db", str(db), "--export", str(out)).returncode == 0
    r = stored_rows(db)[0]
    open_view(browser, out.as_uri() + f"#/g/{r['key']}")
    cells = browser.find_elements("css selector", "#samples tr.sample td:nth-child(2)")
    assert len(cells) == 4 and all(c.get_attribute("textContent") for c in cells)
    votes = browser.find_elements("css selector", "#samples tr.sample td:nth-child(4)")
    assert all(v.get_attribute("textContent") for v in votes)
    assert browser.find_element("css selector", "#gold code").get_attribute("textContent") == r["gold"]
    assert_clean(browser)


def test_a_port_in_use_is_one_line(store):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = ponder_cli("view", "--db", str(store), "--port", str(port))
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
        open_view(browser, url + f"#/g/{key}")
        assert len(drawn_ids(browser)) == 5000
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
        assert_clean(browser)
