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


def task_label(row: dict[str, Any]) -> str:
    """A stored row's task as the report names it: ``task/level``, or the task alone."""
    return f"{row['task']}/{row['level']}" if row["level"] else row["task"]


COSTS = ("generated_tokens", "computed_tokens", "flops", "wall_s")


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """{task/level: [one summary per (model, strategy, setting)]}, each with the
    per-problem means, and ``frontier`` (``frontier_flops``) True where no other setting
    of the same task, of any model, is at least as accurate for fewer generated tokens
    (FLOPs), or more accurate for as many; ``model_frontier`` (``model_frontier_flops``)
    the same among the settings of its own model."""
    # One row per configuration (its hash covers the seed, the sampling parameters, the
    # settings and the reward model) and model weights: runs that differ in any of them
    # are never pooled into one accuracy with a falsely narrow interval.
    groups: dict[tuple[str, str, str], dict[str, Any]] = {}
    for r in rows:
        key = (task_label(r), r["model_id"], r["config_hash"])
        g = groups.get(key)
        if g is None:
            g = groups[key] = {**{k: r[k] for k in ("task", "level", "model_id", "config_hash", "model", "strategy",
                                                     "setting", "config")}, "n": 0, "correct": 0,
                               **{c: 0.0 for c in COSTS}}
        g["n"] += 1
        g["correct"] += r["correct"]
        for c in COSTS:
            g[c] += r[c]
    return summarise_sums(list(groups.values()))


def summarise_sums(groups: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """``summarise`` from per-configuration sums (``ResultsStore.summary_rows``: task,
    level, model_id, config_hash, model, strategy, setting, config, n, correct and the
    summed costs), so a large store is summarised without reading its rows."""
    out: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for g in groups:
        n, k = g["n"], g["correct"]
        lo, hi = wilson_interval(k, n)
        config = json.loads(g["config"])
        out[task_label(g)].append({
            "model": g["model"], "strategy": g["strategy"], "setting": json.loads(g["setting"]),
            "problems": n, "correct": k, "accuracy": k / n, "ci95": [lo, hi],
            **{c: g[c] / n for c in COSTS},
            "seed": config.get("seed"), "reward_model": config.get("reward_model"), "model_id": g["model_id"],
            "config_hash": g["config_hash"],
        })
    for task, summaries in out.items():
        _name_variants(summaries)
        summaries.sort(key=lambda s: (s["model"], s["strategy"], s["generated_tokens"]))
        for s in summaries:
            for key, cost in (("frontier", "generated_tokens"), ("frontier_flops", "flops")):
                # over every model (a small model's cheap strategy is a way to spend compute
                # too), and within the setting's own model (the viewer's line per model)
                s[key] = not any(o is not s and _dominates(o, s, cost) for o in summaries)
                s["model_" + key] = not any(o is not s and o["model"] == s["model"] and _dominates(o, s, cost)
                                            for o in summaries)
    return dict(out)


def _name_variants(summaries: list[dict[str, Any]]) -> None:
    """``variant``: what tells apart rows that share model, strategy and setting (the
    seed, the reward model, the weights), so the table never shows two equal rows."""
    same: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for s in summaries:
        same[(s["model"], s["strategy"], json.dumps(s["setting"], sort_keys=True))].append(s)
    for group in same.values():
        parts: list[list[str]] = [[] for _ in group]
        if len(group) > 1:
            for key, name in (("seed", "seed"), ("reward_model", "reward"), ("model_id", "weights")):
                if len({str(s[key]) for s in group}) > 1:
                    for p, s in zip(parts, group):
                        v = str(s[key])
                        p.append(f"{name}={v.split(':')[-1][:8] if key != 'seed' else v}")
            if not any(parts):  # differ in sampling parameters shown nowhere else: say the config
                for p, s in zip(parts, group):
                    p.append(f"config={s['config_hash'][:8]}")
        for p, s in zip(parts, group):
            s["variant"] = " ".join(p)


def _dominates(a: dict[str, Any], b: dict[str, Any], cost: str) -> bool:
    """``a`` is at least as accurate for at most the cost, and better in one."""
    return (a["accuracy"] >= b["accuracy"] and a[cost] <= b[cost]
            and (a["accuracy"] > b["accuracy"] or a[cost] < b[cost]))


def _setting_text(setting: dict[str, Any], variant: str = "") -> str:
    return " ".join([*(f"{k}={v}" for k, v in sorted(setting.items())), *([variant] if variant else [])]) or "-"


def markdown(summary: dict[str, list[dict[str, Any]]]) -> str:
    lines = []
    for task, rows in summary.items():
        lines += [f"### {task}", "",
                  "| model | strategy | setting | accuracy | 95% CI | generated/problem | computed/problem | "
                  "FLOPs/problem | wall s/problem | frontier |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for s in rows:
            lo, hi = s["ci95"]
            lines.append(f"| {s['model']} | {s['strategy']} | {_setting_text(s['setting'], s.get('variant', ''))} | "
                         f"{s['accuracy']:.3f} ({s['correct']}/{s['problems']}) | {lo:.3f}-{hi:.3f} | "
                         f"{s['generated_tokens']:.1f} | {s['computed_tokens']:.1f} | {s['flops']:.3g} | "
                         f"{s['wall_s']:.3f} | {'*' if s['frontier'] else ''} |")
        lines.append("")
    return "\n".join(lines)


# the setting that says how much a point spends, for its label (N = 4, 8 iterations, ...)
_SIZE_KEYS = ("samples", "iterations", "num_beams", "particles", "n", "probe_n")
_MARKERS = "osD^vP*Xhp<>"


def size_label(setting: dict[str, Any]) -> str:
    for k in _SIZE_KEYS:
        if k in setting:
            return f"{setting[k]}" if k in ("samples", "n") else f"{setting[k]} {k.replace('_', ' ')}"
    return ""


def _varying_keys(rows: list[dict[str, Any]]) -> dict[str, list[str]]:
    """Per strategy, the settings (other than size and temperature) whose values differ
    between its rows: what a legend must name. A nested setting (``NAME.KEY``) is named
    only when nothing else tells the rows apart."""
    values: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for s in rows:
        values[s["strategy"]].append(s["setting"])
    out = {}
    for strategy, settings in values.items():
        keys = sorted({k for st in settings for k in st} - set(_SIZE_KEYS) - {"temperature"})
        differ = [k for k in keys if len({repr(st.get(k)) for st in settings}) > 1]
        plain = [k for k in differ if "." not in k]
        out[strategy] = plain or differ
    return out


def plot(summary: dict[str, list[dict[str, Any]]], out_dir: str | Path) -> list[Path]:
    """Two PNGs per task (accuracy against generated tokens, and against FLOPs). Each
    point says its size (N, iterations); strategies whose points would coincide are
    drawn a few percent apart along the cost axis with their own markers, so none hides
    another; the legend sits below the axes, off the error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task, rows in summary.items():
        fig, axes = plt.subplots(1, 2, figsize=(12, 5.6))
        # a line joins the settings of one strategy that differ only in size (N,
        # iterations); other differences (a weight, a threshold) are lines of their own
        lines: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
        for s in rows:
            rest = " ".join(f"{k}={v}" for k, v in sorted(s["setting"].items())
                            if k not in _SIZE_KEYS and k != "temperature")
            lines[(s["model"], s["strategy"], rest)].append(s)
        order = sorted(lines)
        one_model = len({m for m, _, _ in lines}) == 1
        varying = _varying_keys(rows)  # strategy -> the keys that tell its lines apart
        for ax, cost, label, flag in ((axes[0], "generated_tokens", "generated tokens per problem", "frontier"),
                                      (axes[1], "flops", "FLOPs per problem", "frontier_flops")):
            for i, (model, strategy, rest) in enumerate(order):
                pts = sorted(lines[(model, strategy, rest)], key=lambda s: s[cost])
                # dodge: each line a little apart in log-x (1.2% a line), centred on the true cost
                shift = 1.0 + 0.012 * (i - (len(order) - 1) / 2)
                x = [max(s[cost], 1e-9) * shift for s in pts]
                y = [s["accuracy"] for s in pts]
                err = [[max(0.0, s["accuracy"] - s["ci95"][0]) for s in pts],
                       [max(0.0, s["ci95"][1] - s["accuracy"]) for s in pts]]
                own = pts[0]["setting"]
                name = " ".join([strategy, *(f"{k}={own.get(k, '-')}" for k in varying[strategy])])
                name = name if one_model else f"{name} ({model})"
                name = name if len(name) <= 56 else name[:53] + "..."  # a long policy stays on the page
                ax.errorbar(x, y, yerr=err, marker=_MARKERS[i % len(_MARKERS)], capsize=3, label=name, alpha=0.9,
                            color=plt.get_cmap("tab20")(i % 20))
                for xi, yi, s in zip(x, y, pts):
                    text = size_label(s["setting"])
                    if text:
                        ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=7)
            front = sorted((s for s in rows if s[flag]), key=lambda s: s[cost])
            if front:
                ax.plot([max(s[cost], 1e-9) for s in front], [s["accuracy"] for s in front], "k--", lw=1,
                        label="frontier (every model)")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("accuracy")
            ax.grid(True, alpha=0.3)
        handles, labels = axes[0].get_legend_handles_labels()
        cols = min(3, len(labels))
        fig.legend(handles, labels, loc="lower center", ncol=cols, fontsize=8, frameon=False)
        fig.suptitle(f"{task}: accuracy against inference compute (labels: N or iterations)")
        fig.tight_layout(rect=(0, 0.06 + 0.035 * ((len(labels) - 1) // cols), 1, 1))
        path = out_dir / f"{task.replace('/', '-')}.png"
        fig.savefig(path, dpi=110, bbox_inches="tight")  # nothing of the legend cut at the edges
        plt.close(fig)
        written.append(path)
    return written


def report(store: ResultsStore, task: str | None = None) -> dict[str, list[dict[str, Any]]]:
    return summarise(store.rows(task))
