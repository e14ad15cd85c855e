"""``ponder report``: quality against compute, from the results store alone.

Per task, one row per (model, strategy, setting): accuracy with its 95% Wilson
interval, and per problem the mean generated tokens, computed tokens, FLOPs and wall
time. The compute-optimal frontier marks the settings that no other setting beats on
accuracy at equal or lower cost (generated tokens). Plots (matplotlib): accuracy
against generated tokens and against FLOPs, log x, one line per strategy with error
bars, the frontier dashed. Nothing is recomputed: a report runs again in seconds.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from ..evaluate import wilson_interval
from .store import ResultsStore

COLUMNS = ("model", "strategy", "setting", "problems", "correct", "accuracy", "ci95", "generated_tokens",
           "computed_tokens", "flops", "wall_s")


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{task/level: [one summary per (model, strategy, setting)]}, each with the
    per-problem means, and ``frontier`` (``frontier_flops``) True where no other setting
    of the same task and model is at least as accurate for fewer generated tokens
    (FLOPs), or more accurate for as many."""
    groups: dict[tuple[str, str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        task = f"{r['task']}/{r['level']}" if r["level"] else r["task"]
        groups[(task, r["model"], r["strategy"], r["setting"])].append(r)
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for (task, model, strategy, setting), rs in groups.items():
        n = len(rs)
        k = sum(r["correct"] for r in rs)
        lo, hi = wilson_interval(k, n)
        out[task].append({
            "model": model, "strategy": strategy, "setting": json.loads(setting), "problems": n, "correct": k,
            "accuracy": k / n, "ci95": [lo, hi],
            **{c: sum(r[c] for r in rs) / n for c in ("generated_tokens", "computed_tokens", "flops", "wall_s")},
        })
    for task, summaries in out.items():
        summaries.sort(key=lambda s: (s["model"], s["strategy"], s["generated_tokens"]))
        for s in summaries:
            for key, cost in (("frontier", "generated_tokens"), ("frontier_flops", "flops")):
                s[key] = not any(o is not s and o["model"] == s["model"] and _dominates(o, s, cost) for o in summaries)
    return dict(out)


def _dominates(a: dict[str, Any], b: dict[str, Any], cost: str) -> bool:
    """``a`` is at least as accurate for at most the cost, and better in one."""
    return (a["accuracy"] >= b["accuracy"] and a[cost] <= b[cost]
            and (a["accuracy"] > b["accuracy"] or a[cost] < b[cost]))


def _setting_text(setting: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in sorted(setting.items())) or "-"


def markdown(summary: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for task, rows in summary.items():
        lines += [f"### {task}", "",
                  "| model | strategy | setting | accuracy | 95% CI | generated/problem | computed/problem | "
                  "FLOPs/problem | wall s/problem | frontier |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in rows:
            lo, hi = s["ci95"]
            lines.append(f"| {s['model']} | {s['strategy']} | {_setting_text(s['setting'])} | "
                         f"{s['accuracy']:.3f} ({s['correct']}/{s['problems']}) | {lo:.3f}-{hi:.3f} | "
                         f"{s['generated_tokens']:.1f} | {s['computed_tokens']:.1f} | {s['flops']:.3g} | "
                         f"{s['wall_s']:.3f} | {'*' if s['frontier'] else ''} |")
        lines.append("")
    return "\n".join(lines)


def plot(summary: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> list[Path]:
    """Two PNGs per task (accuracy against generated tokens, and against FLOPs)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task, rows in summary.items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
        for ax, cost, label, flag in ((axes[0], "generated_tokens", "generated tokens per problem", "frontier"),
                                      (axes[1], "flops", "FLOPs per problem", "frontier_flops")):
            lines: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
            for s in rows:
                lines[(s["model"], s["strategy"])].append(s)
            for (model, strategy), pts in sorted(lines.items()):
                pts = sorted(pts, key=lambda s: s[cost])
                x = [max(s[cost], 1e-9) for s in pts]
                y = [s["accuracy"] for s in pts]
                err = [[max(0.0, s["accuracy"] - s["ci95"][0]) for s in pts], [max(0.0, s["ci95"][1] - s["accuracy"]) for s in pts]]
                name = strategy if len({m for m, _ in lines}) == 1 else f"{strategy} ({model})"
                ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
            front = sorted((s for s in rows if s[flag]), key=lambda s: s[cost])
            if front:
                ax.plot([max(s[cost], 1e-9) for s in front], [s["accuracy"] for s in front], "k--", lw=1,
                        label="compute-optimal frontier")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy")
            ax.grid(True, alpha=0.3)
        axes[0].legend(fontsize=8, loc="lower right")
        fig.suptitle(f"{task}: accuracy against inference compute")
        fig.tight_layout()
        path = out_dir / f"{task.replace('/', '-')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def report(store: ResultsStore, task: str | None = None) -> dict[str, list[dict[str, Any]]]:
    return summarise(store.rows(task))
