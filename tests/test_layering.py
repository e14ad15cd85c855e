"""Imports point down only, for every module of the package:

    cli > server, view > sweep > strategies, evaluate, train > meta > scoring > backends > decoding > engine
        > models > tasks > types, protocols, params, processor, errors

(function-level imports included), and no two modules import each other, directly
or through others. No edge runs up. Backends sit above decoding: an in-process model's
TextLM face (``generate``) runs the token-level sampler, and the engine and the sampler
read a model only through the protocols (``prefill``, ``step``, ``forward``)."""

from __future__ import annotations

import ast
from pathlib import Path

import ponder

ROOT = Path(ponder.__file__).parent
RANK = {
    "errors": 0, "types": 0, "processor": 0, "params": 0, "protocols": 0,
    "tasks": 1, "models": 2, "engine": 3, "decoding": 4, "backends": 5, "scoring": 6, "meta": 7,
    "strategies": 8, "evaluate": 8, "train": 8, "sweep": 9, "server": 10, "view": 10, "cli": 11,
}
# (importer, imported): why the edge exists (none)
ALLOWED_UP: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    out = {}
    for f in ROOT.rglob("*.py"):
        rel = f.relative_to(ROOT).with_suffix("")
        parts = [p for p in rel.parts if p != "__init__"] if rel.name == "__init__" else list(rel.parts)
        if rel.name == "__init__":
            parts = list(rel.parts[:-1])
        out[".".join(["ponder", *parts])] = f
    return out


def _imports(name: str, path: Path) -> set[str]:
    """Every ponder module ``name`` imports, at any depth of its code."""
    is_pkg = path.name == "__init__.py"
    pkg = name.split(".") if is_pkg else name.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("ponder")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg[: len(pkg) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("ponder"):
                continue
            found.add(mod)
            for a in node.names:  # `from . import strategies` imports a module
                found.add(f"{mod}.{a.name}")
    mods = _modules()
    return {m for m in found if m in mods and m != name}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "ponder"


def test_every_module_has_a_layer():
    units = {_unit(m) for m in _modules()} - {"ponder", "assets"}
    assert units <= set(RANK), f"modules without a layer: {units - set(RANK)}"


def test_imports_point_down_only():
    bad = []
    for name, path in _modules().items():
        if _unit(name) not in RANK:
            continue
        for dep in _imports(name, path):
            a, b = RANK[_unit(name)], RANK.get(_unit(dep), -1)
            if b > a or (b == a and _unit(name) != _unit(dep) and a != 0):
                if (name, dep) not in ALLOWED_UP:
                    bad.append(f"{name} -> {dep}")
    assert not bad, "imports pointing up or sideways:\n" + "\n".join(sorted(bad))


def test_no_import_cycles():
    mods = _modules()
    graph = {name: {d for d in _imports(name, p) if (name, d) not in ALLOWED_UP} for name, p in mods.items()}
    # a module importing its own package's __init__ is not a cycle of code
    for name in graph:
        graph[name] = {d for d in graph[name] if not name.startswith(d + ".")}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in graph.get(n, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in graph:
        if n not in state:
            visit(n)


def test_the_bottom_layer_imports_nothing_heavy():
    import subprocess
    import sys

    code = ("import sys, ponder.types, ponder.protocols, ponder.params, ponder.processor, ponder.errors; "
            "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'tokenizers') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.strip() == "[]", r.stdout + r.stderr


def test_import_ponder_is_light_and_names_the_first_program():
    import subprocess
    import sys

    code = ("import sys, ponder; heavy = [m for m in ('torch', 'numpy') if m in sys.modules]; "
            "names = [getattr(ponder, n) for n in ponder.__all__]; print(heavy, len(names))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.stdout.split("]")[0] == "[" and r.returncode == 0, r.stdout + r.stderr
    import ponder

    lm = ponder.load_model("arith")
    gen = ponder.build("majority", lm, ponder.SamplingParams(temperature=0.7, max_tokens=160), {"samples": 4},
                       ponder.Context(task=ponder.load_task("arith")))
    (best,) = gen.generate("Q: 3+4-2\n", seed=0)
    assert best.text.endswith("Answer: 5\n") and best.usage.generated_tokens > 0
