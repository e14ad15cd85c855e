"""What the `ponder view` browser tests share: the small sweep they store, and helpers
to run the CLI, check a page is clean and read the store."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from ponder.sweep.store import ResultsStore

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


def ponder_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ponder.cli", *args], capture_output=True, text=True, timeout=600, **kw)


def assert_clean(d) -> None:
    """No console error and no failed request on the page."""
    errors = [e for e in d.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors
    failed = d.execute_script("return performance.getEntriesByType('resource')"
                              ".filter(e => e.responseStatus >= 400).map(e => e.name)")
    assert not failed, failed


def stored_rows(db: Path) -> list[dict]:
    with ResultsStore(db, readonly=True) as s:
        return s.rows()


def path_ids(tree: dict, target: int) -> list[int]:
    stack = [(tree, [tree["id"]])]
    while stack:
        n, p = stack.pop()
        if n["id"] == target:
            return p
        stack.extend((c, p + [c["id"]]) for c in n["children"])
    return []


def drawn_ids(d) -> list[int]:
    return [int(e.get_attribute("data-id")) for e in d.find_elements("css selector", "#tree g.node")]


def click_on(d, element) -> None:
    """A click on the element itself (an SVG dot or a ring around another point)."""
    d.execute_script("arguments[0].dispatchEvent(new MouseEvent('click', {bubbles: true}))", element)


def first_row(store, strategy: str, model: str = "arith") -> dict:
    return [r for r in stored_rows(store) if r["strategy"] == strategy and r["model"] == model][0]
