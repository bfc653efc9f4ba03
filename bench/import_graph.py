"""The import structure of the project, measured from the source (no code is run).

    python bench/import_graph.py [--all] [--json] [--list]

Reads every module of the package ``p2d/`` (with ``--all`` also the scripts of ``bench/`` and
``app.py``; tests are always left out) with Python's ``ast`` and reports:

- ``modules``: the files read (a package's ``__init__.py`` counts as the package);
- ``edges``: distinct (importer, imported) pairs between those modules, imports inside functions
  included; ``from pkg import name`` counts as an edge to ``pkg.name`` when that is a module;
- ``circles``: strongly connected groups of modules (two or more modules that import each other,
  directly or through others), with their members;
- ``layers``: the longest import chain of the circle-free condensation (a module on layer k imports
  only modules below k);
- ``function_level_imports``: ``import`` / ``from ... import`` statements inside a function or class
  body, and how many of them re-import a module that the same file already imports at its top (an
  import under ``if TYPE_CHECKING:`` does not count as one at the top).

With ``--list`` the function-level imports are listed as file:line.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def module_files(everything: bool = False) -> dict[str, Path]:
    files = sorted(ROOT.glob("p2d/**/*.py"))
    if everything:
        files += sorted(ROOT.glob("bench/*.py")) + [ROOT / "app.py"]
    out = {}
    for f in files:
        rel = f.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, modules: dict) -> list[dict]:
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    is_package = path.name == "__init__.py"
    found = []

    def visit(node, inside: bool, typing_only: bool):
        for child in ast.iter_child_nodes(node):
            nested = inside or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda))
            checking = typing_only or (isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test))
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                names = ([(a.name, None) for a in child.names] if isinstance(child, ast.Import)
                         else [(resolve(name, is_package, child), a.name) for a in child.names])
                found.append({"line": child.lineno, "inside": inside, "typing_only": typing_only, "names": names})
            visit(child, nested, checking)

    visit(tree, False, False)
    return found


def target(mod: str, name: str | None, modules: dict) -> str | None:
    """The project module an imported name reaches (None: outside the project)."""
    if name and f"{mod}.{name}" in modules:
        return f"{mod}.{name}"
    while mod:
        if mod in modules:
            return mod
        mod = mod.rpartition(".")[0]
    return None


def strongly_connected(nodes, edges) -> list[list[str]]:
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    sys.setrecursionlimit(10000)

    def connect(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            out.append(sorted(group))

    for v in nodes:
        if v not in index:
            connect(v)
    return out


def measure(everything: bool = False) -> dict:
    modules = module_files(everything)
    edges: dict[str, set[str]] = {m: set() for m in modules}
    inner, reimports, listed = 0, 0, []
    for name, path in modules.items():
        imps = imports_of(name, path, modules)
        top = {mod for i in imps if not i["inside"] and not i["typing_only"] for mod, _ in i["names"]}
        for i in imps:
            for mod, imported in i["names"]:
                t = target(mod, imported, modules)
                if t is not None and t != name:
                    edges[name].add(t)
            if i["inside"]:
                inner += 1
                what = sorted({mod for mod, _ in i["names"]})
                again = any(mod in top for mod in what)
                reimports += again
                listed.append(f"{path.relative_to(ROOT)}:{i['line']} {', '.join(what)}{'  (re-import)' if again else ''}")
    groups = strongly_connected(sorted(modules), edges)
    circles = [g for g in groups if len(g) > 1]
    group_of = {m: tuple(g) for g in groups for m in g}
    layer: dict[tuple, int] = {}

    def depth(g: tuple) -> int:
        if g not in layer:
            layer[g] = 0
            below = {group_of[t] for m in g for t in edges[m]} - {g}
            layer[g] = 1 + max((depth(b) for b in below), default=0)
        return layer[g]

    layers = max(depth(g) for g in map(tuple, groups))
    return {"modules": len(modules), "edges": sum(len(v) for v in edges.values()), "layers": layers,
            "circles": circles, "function_level_imports": inner, "re_imports": reimports, "listed": listed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--all", action="store_true", help="also the scripts of bench/ and app.py")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    p.add_argument("--list", action="store_true", help="list the function-level imports")
    args = p.parse_args()
    m = measure(args.all)
    listed = m.pop("listed")
    if args.json:
        print(json.dumps(m, indent=1))
    else:
        print(f"modules {m['modules']}, edges {m['edges']}, layers {m['layers']}, circles {len(m['circles'])}, "
              f"function-level imports {m['function_level_imports']} ({m['re_imports']} re-imports)")
        for c in m["circles"]:
            print("  circle: " + " <-> ".join(c))
    if args.list:
        print("\n".join(listed))


if __name__ == "__main__":
    main()
