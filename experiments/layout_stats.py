"""The package's shape in numbers (issue 29): top-level modules, lines per layer, import
cycles, imports against the layer order, function-level imports, largest files.

    PYTHONPATH=$PWD python experiments/layout_stats.py            # this tree
    git worktree add /tmp/old <commit> && PYTHONPATH=/tmp/old python experiments/layout_stats.py

The import graph is grimp's (import-linter's engine): module-level and function-level
imports alike. The layer of a module is decided by its name, for the old layout's names
too, so the same script counts a tree before and after the move.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
from collections import Counter, defaultdict
from pathlib import Path

import grimp

PKG = "vpt_dml"
COMMANDS = {"run", "embed", "export", "retrieve", "index", "evaluate", "compare", "report"}
GROUND = {"errors", "distributed", "checkpoints"}
METHOD_PKGS = {"models", "losses", "data", "evaluation"}
METHOD_TOP = {"module", "optim", "train", "protocol"}
# the old layout's run machinery at the top level
OLD_RING = {
    "run_folder",
    "cluster",
    "watchdog",
    "checkpoint_io",
    "results",
    "summary",
    "resume",
    "provenance",
    "completion",
    "config_checks",
    "callbacks",
}
ORDER = ["ground", "method", "runs", "tools", "commands"]


def layer(module: str) -> str:
    parts = module.split(".")[1:]
    if not parts:
        return "package"
    head = parts[0]
    if head in GROUND:
        return "ground"
    if head in METHOD_PKGS or head in METHOD_TOP:
        return "method"
    if head == "runs" or head in OLD_RING:
        return "runs"
    if head in ("serving", "reporting"):
        return "tools"
    if head in COMMANDS:
        return "commands"
    return "other"


def strongly_connected(nodes, edges) -> list[list[str]]:
    """Tarjan's algorithm; components of more than one module are import cycles."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(nodes):
        if v not in index:
            visit(v)
    return out


def short(m: str) -> str:
    return m[len(PKG) + 1 :] or PKG


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--top", type=int, default=12, help="how many of the largest files to list")
    args = ap.parse_args()
    root = Path(importlib.util.find_spec(PKG).submodule_search_locations[0])
    graph = grimp.build_graph(PKG)
    modules = sorted(m for m in graph.modules if m.startswith(PKG))

    def path_of(m: str) -> Path:
        rel = Path(*m.split(".")[1:])
        return root / rel / "__init__.py" if (root / rel).is_dir() else root / f"{rel}.py"

    lines = {m: len(path_of(m).read_text().splitlines()) for m in modules}
    top = sorted(p.stem for p in root.glob("*.py") if p.stem != "__init__")
    commands = [t for t in top if t in COMMANDS]
    print(f"package: {root}")
    print(f"top-level modules: {len(top)} ({len(commands)} commands): {' '.join(top)}")

    per_layer = Counter()
    for m, n in lines.items():
        per_layer[layer(m)] += n
    total = sum(per_layer.values())
    print(f"lines: {total}")
    for name in ORDER + ["package", "other"]:
        if per_layer[name]:
            print(f"  {name:9s} {per_layer[name]:6d}  {100 * per_layer[name] / total:5.1f}%")
    data = sum(n for m, n in lines.items() if m.split(".")[1:2] == ["data"])
    science = per_layer["method"] - data  # model, losses, step, metrics (the "method")
    print(f"  method without data/: {science} ({100 * science / total:.1f}%); data/: {data}")

    edges: dict[str, set[str]] = defaultdict(set)
    function_level = []
    for m in modules:
        for imported in graph.find_modules_directly_imported_by(m):
            if not imported.startswith(PKG) or imported == m:
                continue
            edges[m].add(imported)
            for d in graph.get_import_details(importer=m, imported=imported):
                if d["line_contents"] != d["line_contents"].lstrip() or _in_function(
                    path_of(m), d["line_number"]
                ):
                    function_level.append((m, imported, d["line_number"]))
    arrows = sum(len(v) for v in edges.values())
    cycles = strongly_connected(modules, edges)
    print(f"import arrows (module to module): {arrows}")
    print(f"import cycles (strongly connected groups of modules): {len(cycles)}")
    for c in cycles:
        print("  " + " <-> ".join(short(x) for x in c))

    rank = {name: i for i, name in enumerate(ORDER)}
    upward, sideways = [], []
    for m, targets in sorted(edges.items()):
        for t in sorted(targets):
            a, b = layer(m), layer(t)
            if a in rank and b in rank and rank[b] > rank[a]:
                upward.append((m, t))
            elif a == b == "commands" and t.split(".")[1] != m.split(".")[1]:
                sideways.append((m, t))
    print(f"imports against the layer order ({' < '.join(ORDER)}): {len(upward)}")
    for m, t in upward:
        print(f"  {short(m)} -> {short(t)}  ({layer(m)} -> {layer(t)})")
    print(f"a command importing another command: {len(sideways)}")
    for m, t in sideways:
        print(f"  {short(m)} -> {short(t)}")
    print(f"function-level imports inside {PKG}: {len(function_level)}")
    for m, t, n in sorted(function_level):
        print(f"  {short(m)}:{n} -> {short(t)}")

    print(f"largest files (of {len(lines)}):")
    for m, n in sorted(lines.items(), key=lambda kv: -kv[1])[: args.top]:
        print(f"  {n:5d}  {path_of(m).relative_to(root.parent)}")
    over = [m for m, n in lines.items() if n > 400]
    print(f"modules over 400 lines: {len(over)} {' '.join(short(m) for m in sorted(over))}")


_FUNCS: dict[Path, list[tuple[int, int]]] = {}


def _in_function(path: Path, line: int) -> bool:
    if path not in _FUNCS:
        tree = ast.parse(path.read_text())
        _FUNCS[path] = [
            (n.lineno, n.end_lineno or n.lineno)
            for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
    return any(a <= line <= b for a, b in _FUNCS[path])


if __name__ == "__main__":
    main()
