"""How fast `ponder view` draws, measured in headless Chromium (issue 26): the overview
of a 2,600-row store and a search tree of about 500 nodes, each timed by the page
itself from navigation start to the view drawn (inline data parsed, SVG laid out, one
frame painted), served by `ponder view` on loopback.

    python benchmarks/view_speed.py [--db STORE] [--repeats 5]

Without --db it builds its store with a real sweep on the shipped models: 13 settings
x 200 hard problems (2,600 rows) and one PRM beam search at N = 64 (its tree has
about 500 nodes). The last line is one JSON object: "overview_ms" and "tree_ms" (the
medians), "tree_nodes", "rows", and "tree_over_overview" (their ratio, this run).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", help="a store to time (else one is built)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from ponder.sweep.store import ResultsStore
    from ponder.view.browser import chromium, open_view, served

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
    with served(db) as url:
        d = chromium()
        try:
            timings: dict[str, list[float]] = {"overview": [], "tree": []}
            for _ in range(args.repeats):
                timings["overview"].append(open_view(d, url)["at"])
                timings["tree"].append(open_view(d, url + f"#/g/{key}")["at"])
            drawn = len(d.find_elements("css selector", "#tree g.node"))
        finally:
            d.quit()
    over, tree = statistics.median(timings["overview"]), statistics.median(timings["tree"])
    print(f"overview of {len(rows)} rows: {over:.0f} ms (median of {args.repeats}; all {timings['overview']})")
    print(f"tree of {nodes} nodes ({drawn} drawn): {tree:.0f} ms (all {timings['tree']})")
    print(json.dumps({"benchmark": "view_speed", "rows": len(rows), "tree_nodes": nodes, "tree_drawn": drawn,
                      "overview_ms": round(over, 1), "tree_ms": round(tree, 1),
                      "tree_over_overview": round(tree / over, 3)}))


if __name__ == "__main__":
    main()
