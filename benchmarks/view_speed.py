"""How fast `ponder view` draws, measured in headless Chromium (issues 26, 33): the
overview of a 2,600-row store and of a 100,000-row one, a search tree of about 500
nodes and one of 20,000, each timed by the page itself from navigation start to the view
drawn (inline data parsed, SVG laid out, one frame painted), served by `ponder view` on
loopback.

    python benchmarks/view_speed.py [--db STORE] [--repeats 5] [--rows 100000] [--tree-nodes 20000]

Without --db it builds its store with a real sweep on the shipped models: 13 settings
x 200 hard problems (2,600 rows) and one PRM beam search at N = 64 (its tree has
about 500 nodes). The large store is that store's rows copied under new problem ids
(traces included) up to --rows, plus one synthetic tree of --tree-nodes nodes. The last
line is one JSON object: "overview_ms" and "tree_ms" (the medians on the real store),
"overview_ms_100k" and "tree_ms_20k" (on the large one; the server keeps an overview per
state of the store, so "overview_first_load_ms_100k" adds the time to add it up), the export's size against the
store's ("export_over_store"), and "tree_over_overview" (their ratio, this run).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# the sweeps' common head: the shipped models on `limit` hard problems
HEAD = """
seed = 0
chunk = 50
reward_model = "arith-reward"
[[model]]
name = "arith"
[[task]]
name = "arith"
level = "hard"
limit = {limit}
"""
SWEEP = HEAD.format(limit=200) + """
[[strategy]]
name = "greedy"
temperature = 0.0
[[strategy]]
name = "majority"
temperature = 0.7
samples = [4, 8, 16]
[[strategy]]
name = "weighted-majority"
temperature = 0.7
samples = [4, 16]
[[strategy]]
name = "best-of-n"
temperature = 0.7
samples = [4, 16]
[[strategy]]
name = "adaptive-majority"
temperature = 0.7
weight = ["none", "reward"]
[[strategy]]
name = "prm-beam"
temperature = 0.7
samples = 4
[[strategy]]
name = "rebase"
temperature = 0.7
samples = 4
[[strategy]]
name = "speculative-rejection"
temperature = 0.7
samples = 8
"""
BIG_TREE = HEAD.format(limit=1) + """
[[strategy]]
name = "prm-beam"
temperature = 1.0
samples = 64
beam_width = 4
"""


def _sweep(toml: str, db: Path, folder: Path, name: str) -> None:
    (folder / name).write_text(toml)
    subprocess.run([sys.executable, "-m", "ponder.cli", "sweep", str(folder / name), "--db", str(db), "--report", ""],
                   check=True, stdout=subprocess.DEVNULL)


def synthetic_tree(n: int, seed: int = 0) -> dict:
    """A search tree of ``n`` nodes shaped like a wide beam search: each node's parent is
    one of the 200 nodes made before it."""
    import random

    rnd = random.Random(seed)
    root = {"id": 0, "step": "", "depth": 0, "terminal": False, "finish": None, "score": None, "visits": 0,
            "value": None, "usage": {}, "drafts": [], "children": []}
    nodes = [root]
    for i in range(1, n):
        parent = nodes[rnd.randrange(max(0, len(nodes) - 200), len(nodes))]
        node = {"id": i, "step": f"{i % 97}+{i % 7}={i % 97 + i % 7}\n", "depth": parent["depth"] + 1,
                "terminal": i % 9 == 0, "finish": "stop", "score": rnd.random(), "visits": 0, "value": None,
                "usage": {}, "drafts": [], "children": [], **({"answer": "1", "correct": i % 2 == 0} if i % 9 == 0 else {})}
        parent["children"].append(node)
        nodes.append(node)
    return root


def enlarge(src: Path, dst: Path, rows: int, tree_nodes: int) -> tuple[int, str]:
    """``dst``: ``src``'s rows copied under new problem ids (and keys) until it holds
    ``rows``, plus one row whose trace is a synthetic tree of ``tree_nodes`` nodes.
    Returns (rows, the big tree's key)."""
    import shutil
    import sqlite3
    import zlib

    shutil.copy(src, dst)
    with sqlite3.connect(dst) as c:
        names = [r[1] for r in c.execute("PRAGMA table_info(results)")]
        have = c.execute("SELECT count(*) FROM results").fetchone()[0]
        base = c.execute("SELECT * FROM results").fetchall()
        copy = 0
        while have < rows - 1:
            copy += 1
            batch = []
            for r in base[: rows - 1 - have]:
                d = dict(zip(names, r))
                d["key"], d["problem_id"] = f"{d['key'][:40]}-c{copy}", f"{d['problem_id']}-c{copy}"
                batch.append(tuple(d[n] for n in names))
            c.executemany(f"INSERT INTO results VALUES ({','.join('?' * len(names))})", batch)
            have += len(batch)
        d = dict(zip(names, base[0]))
        d.update(key="synthetic-tree", problem_id="synthetic-tree", strategy="prm-beam",
                 trace=zlib.compress(json.dumps(synthetic_tree(tree_nodes)).encode()),
                 meta=json.dumps({"best_node": tree_nodes - 1}))
        c.execute(f"INSERT INTO results VALUES ({','.join('?' * len(names))})", tuple(d[n] for n in names))
    return have + 1, "synthetic-tree"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", help="a store to time (else one is built)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--rows", type=int, default=100_000, help="rows of the large store")
    ap.add_argument("--tree-nodes", type=int, default=20_000, help="nodes of the large tree")
    args = ap.parse_args()
    from ponder.sweep.store import ResultsStore
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the Chromium helper the tests use
    from browser import chromium, open_view, served

    folder = Path(tempfile.mkdtemp(prefix="view-speed-"))
    db = Path(args.db) if args.db else folder / "store.sqlite"
    if not args.db:
        t = time.perf_counter()
        _sweep(SWEEP, db, folder, "sweep.toml")
        _sweep(BIG_TREE, db, folder, "tree.toml")
        print(f"built {db} in {time.perf_counter() - t:.0f} s", flush=True)
    store = ResultsStore(db, readonly=True)
    rows = store.rows()
    store.close()

    def size(tree: dict) -> int:
        return 1 + sum(size(c) for c in tree["children"])

    trees = [(size(t), r["key"]) for r in rows if isinstance(t := ResultsStore.trace(r), dict) and "children" in t]
    nodes, key = max(trees)
    large = folder / "large.sqlite"
    t = time.perf_counter()
    n_large, big_key = enlarge(db, large, args.rows, args.tree_nodes)
    print(f"built {large} ({n_large} rows, {large.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - t:.0f} s",
          flush=True)
    export = folder / "view.html"
    subprocess.run([sys.executable, "-m", "ponder.cli", "view", "--db", str(db), "--export", str(export)], check=True,
                   stderr=subprocess.DEVNULL)
    timings: dict[str, list[float]] = {"overview": [], "tree": [], "overview_large": [], "tree_large": []}
    d = chromium()
    try:
        with served(db) as url:
            for _ in range(args.repeats):
                timings["overview"].append(open_view(d, url)["at"])
                timings["tree"].append(open_view(d, url + f"#/g/{key}")["at"])
            drawn = len(d.find_elements("css selector", "#tree g.node"))
        with served(large) as url:
            for _ in range(args.repeats):
                timings["overview_large"].append(open_view(d, url)["at"])
                timings["tree_large"].append(open_view(d, url + f"#/g/{big_key}")["at"])
            drawn_large = len(d.find_elements("css selector", "#tree g.node"))
    finally:
        d.quit()
    med = {k: statistics.median(v) for k, v in timings.items()}
    # the server keeps the overview per state of the store: a first load also pays for adding it up
    from ponder.view.data import open_store, overview

    cold = []
    for _ in range(3):
        st = open_store(large)
        t = time.perf_counter()
        overview(st)
        cold.append(1000 * (time.perf_counter() - t))
        st.close()
    med["overview_compute_large"] = statistics.median(cold)
    print(f"overview of {len(rows)} rows: {med['overview']:.0f} ms (median of {args.repeats}; all {timings['overview']})")
    print(f"tree of {nodes} nodes ({drawn} drawn): {med['tree']:.0f} ms (all {timings['tree']})")
    print(f"overview of {n_large} rows: {med['overview_large']:.0f} ms (all {timings['overview_large']})")
    print(f"  adding up its overview (a first load, or after the store changed): "
          f"{med['overview_compute_large']:.0f} ms more")
    print(f"tree of {args.tree_nodes} nodes ({drawn_large} drawn): {med['tree_large']:.0f} ms "
          f"(all {timings['tree_large']})")
    print(f"export of the {len(rows)}-row store: {export.stat().st_size / 1e6:.1f} MB, the store "
          f"{db.stat().st_size / 1e6:.1f} MB")
    print(json.dumps({"benchmark": "view_speed", "rows": len(rows), "tree_nodes": nodes, "tree_drawn": drawn,
                      "overview_ms": round(med["overview"], 1), "tree_ms": round(med["tree"], 1),
                      "rows_large": n_large, "overview_ms_100k": round(med["overview_large"], 1),
                      "overview_first_load_ms_100k": round(med["overview_large"] + med["overview_compute_large"], 1),
                      "tree_nodes_large": args.tree_nodes, "tree_drawn_large": drawn_large,
                      "tree_ms_20k": round(med["tree_large"], 1),
                      "export_over_store": round(export.stat().st_size / db.stat().st_size, 3),
                      "tree_over_overview": round(med["tree"] / med["overview"], 3)}))


if __name__ == "__main__":
    main()
