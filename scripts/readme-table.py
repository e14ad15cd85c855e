"""The README's main table, written from the store that the README's main command fills
(`ponder sweep` into ponder-results.sqlite), never by hand: the table between the
markers ``<!-- sweep-table -->`` and ``<!-- /sweep-table -->`` is replaced with what the
store gives, row for row what `ponder report` prints.

    python scripts/readme-table.py [--db ponder-results.sqlite] [--readme README.md] [--check]

``--check`` changes nothing and exits 1 when the README's table is not what the store gives.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

START, END = "<!-- sweep-table -->", "<!-- /sweep-table -->"


def _setting(s: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(s["setting"].items()) if k != "temperature") + (
        f" [{s['variant']}]" if s.get("variant") else "")


def table(db: str | Path, order: list[str] | None = None) -> str:
    """The markdown table of every setting in the store (one task: the first), in the sweep
    file's order of strategies, then by generated tokens."""
    from ponder.sweep.report import summarise
    from ponder.sweep.store import ResultsStore

    store = ResultsStore(db, readonly=True)
    try:
        summary = summarise(store.rows())
    finally:
        store.close()
    if not summary:
        raise SystemExit(f"{db} holds no results: run the README's main command first")
    lines = []
    for task, settings in summary.items():
        models = {s["model"] for s in settings}
        rank = {name: i for i, name in enumerate(order or [])}
        settings = sorted(settings, key=lambda s: (s["model"], rank.get(s["strategy"], len(rank)), s["generated_tokens"]))
        head = (["model"] if len(models) > 1 else []) + ["strategy", "setting", "accuracy (95% CI)", "right",
                                                          "generated tokens/problem", "FLOPs/problem", "wall s/problem",
                                                          "frontier (by)"]
        lines += [f"**{task}** ({settings[0]['problems']} problems)", "", "| " + " | ".join(head) + " |",
                  "|" + "---|" * len(head)]
        for s in settings:
            lo, hi = s["ci95"]
            front = ", ".join(x for x, on in (("tokens", s["frontier"]), ("FLOPs", s["frontier_flops"])) if on)
            cells = ([s["model"]] if len(models) > 1 else []) + [
                s["strategy"], _setting(s), f"{s['accuracy']:.3f} ({lo:.3f}-{hi:.3f})", f"{s['correct']}/{s['problems']}",
                f"{s['generated_tokens']:.1f}", f"{s['flops']:.3g}", f"{s['wall_s']:.3f}", front]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def strategy_order(config: Path) -> list[str]:
    import tomllib

    return [s["name"] for s in tomllib.loads(config.read_text()).get("strategy", [])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--db", default="ponder-results.sqlite")
    ap.add_argument("--readme", default="README.md")
    ap.add_argument("--config", default=None, help="the sweep file, for the order of strategies (default: ponder's)")
    ap.add_argument("--check", action="store_true", help="only say whether the README's table is the store's")
    args = ap.parse_args()
    from ponder.sweep.run import default_config_path

    order = strategy_order(Path(args.config) if args.config else default_config_path())
    readme = Path(args.readme)
    text = readme.read_text()
    if START not in text or END not in text:
        raise SystemExit(f"{readme} has no {START} ... {END} markers to write the table between")
    before, rest = text.split(START, 1)
    _, after = rest.split(END, 1)
    new = before + START + "\n" + table(args.db, order) + END + after
    if args.check:
        same = new == text
        print("the README's table is the store's" if same else "the README's table differs from the store's")
        sys.exit(0 if same else 1)
    readme.write_text(new)
    print(f"wrote the table of {args.db} into {readme}")


if __name__ == "__main__":
    main()
