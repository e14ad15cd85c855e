"""The README's pictures of `ponder view`, made by the code: the overview of a store and
the PRM beam search tree of a problem that weighted vote got right and PRM beam search
got wrong (where a person would look first).

    python scripts/view-screenshots.py --db ponder-results.sqlite --out docs/figures
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="ponder-results.sqlite")
    ap.add_argument("--out", default="docs/figures")
    args = ap.parse_args()
    from ponder.sweep.store import ResultsStore
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the Chromium helper the tests use
    from browser import chromium, open_view, served

    store = ResultsStore(args.db, readonly=True)
    rows = store.rows()
    store.close()
    right = {(r["problem_id"]) for r in rows if r["strategy"] == "weighted-majority" and r["correct"]}
    beams = [r for r in rows if r["strategy"] == "prm-beam" and r["trace"] is not None]
    if not beams:
        raise SystemExit("the store has no PRM beam search row to draw")
    lost = [r for r in beams if not r["correct"] and r["problem_id"] in right]
    pick = max(lost or beams, key=lambda r: (json.loads(r["setting"]).get("samples", 0), r["generated_tokens"]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with served(args.db) as url:
        d = chromium(1400, 1250)
        try:
            open_view(d, url)
            d.save_screenshot(str(out / "view-overview.png"))
            open_view(d, url + f"#/g/{pick['key']}")
            d.execute_script("document.querySelector('.tree-wrap').scrollIntoView()")
            d.find_element("id", "follow").click()  # the chosen path, the rest folded (their counts shown)
            d.find_element("id", "fit").click()
            best = json.loads(pick["meta"]).get("best_node")  # show the chosen path's last step in the panel
            d.execute_script("const n = document.querySelector(`#tree g.node[data-id='${arguments[0]}']`);"
                             "if (n) n.dispatchEvent(new MouseEvent('click', {bubbles: true}));", best)
            time.sleep(0.3)
            d.save_screenshot(str(out / "view-tree.png"))
        finally:
            d.quit()
    print(f"wrote {out / 'view-overview.png'} and {out / 'view-tree.png'} (problem {pick['problem_id']}, "
          f"prm-beam {pick['setting']}, {'wrong' if not pick['correct'] else 'right'})")


if __name__ == "__main__":
    main()
