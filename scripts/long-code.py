"""Print what is too long to read at once: functions over 80 lines and files over 450
lines in src/ (the C kernel excepted). Exit status 1 if any, so CI can hold the line.

    python scripts/long-code.py [--functions 80] [--files 450]
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def long_functions(path: Path, limit: int) -> list[tuple[int, str, int]]:
    """(line, qualified name, length) of each function longer than ``limit`` lines."""
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def walk(node: ast.AST, prefix: str) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                name = f"{prefix}{child.name}"
                if not isinstance(child, ast.ClassDef):
                    n = child.end_lineno - child.lineno + 1
                    if n > limit:
                        out.append((child.lineno, name, n))
                walk(child, name + ".")

    walk(tree, "")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--functions", type=int, default=80)
    ap.add_argument("--files", type=int, default=450)
    args = ap.parse_args()
    found = 0
    for path in sorted((ROOT / "src").rglob("*.py")):
        rel = path.relative_to(ROOT)
        lines = len(path.read_text().splitlines())
        if lines > args.files:
            print(f"file     {rel}: {lines} lines")
            found += 1
        for line, name, n in long_functions(path, args.functions):
            print(f"function {rel}:{line} {name}: {n} lines")
            found += 1
    print(f"{found} over the limits (functions > {args.functions} lines, files > {args.files} lines)")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
