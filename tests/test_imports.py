"""streamkv's imports run one way: the graph of streamkv modules importing streamkv modules (module-level
and function-level imports alike, read from the source with ast) has no cycle, and the bottom layer
(errors, the config schema) imports nothing of streamkv but errors."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "streamkv"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def all_modules() -> dict:
    """streamkv module name -> (file, is_package)."""
    return {module_name(p): (p, p.name == "__init__.py") for p in sorted(PKG.rglob("*.py"))}


def imported(node: ast.AST, here: str, is_pkg: bool, modules: dict) -> set:
    """The streamkv modules one import statement loads: `from a.b import c` is a.b.c when that is a
    module, else a.b (c is a name defined in a.b); relative imports are resolved against `here`."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = here.split(".") if is_pkg else here.split(".")[:-1]
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
    out = set()
    for name in names:
        # `import streamkv.a.b` loads a.b; keep the longest prefix that is a streamkv module
        while name and name not in modules:
            name = name.rpartition(".")[0]
        # Python runs each enclosing package's __init__ first, unless the importer sits inside that package
        # (then the package is already initializing): streamkv.a.b from outside a also loads streamkv.a
        while name and name != "streamkv":  # the top package only holds __version__
            out.add(name)
            name = name.rpartition(".")[0]
            if here == name or here.startswith(name + "."):
                break
    return out


def import_graph() -> dict:
    modules = all_modules()
    graph = {}
    for name, (path, is_pkg) in modules.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in ast.walk(tree):  # every level: module, function, class, if/try blocks
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                edges |= imported(node, name, is_pkg, modules)
        edges.discard(name)
        graph[name] = edges
    return graph


def cycles(graph: dict) -> list:
    """Every strongly connected component with more than one module (Tarjan), each as a sorted tuple."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
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
                out.append(tuple(sorted(comp)))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def path_in(graph: dict, comp: tuple) -> str:
    """One cycle through the component, as `a -> b -> ... -> a`, for the failure message."""
    members, start = set(comp), comp[0]
    prev, todo = {start: None}, [start]
    while todo:
        v = todo.pop(0)
        for w in sorted(graph[v] & members):
            if w == start:
                chain = [v]
                while prev[chain[-1]] is not None:
                    chain.append(prev[chain[-1]])
                return " -> ".join(reversed(chain)) + f" -> {start}"
            if w not in prev:
                prev[w] = v
                todo.append(w)
    return " <-> ".join(comp)


def test_graph_reads_every_module():
    graph = import_graph()
    assert "streamkv.config" in graph and "streamkv.cache.slots" in graph
    assert "streamkv.errors" in graph["streamkv.config"]
    # a from-import of a submodule maps to the submodule, of a name to the module defining it
    assert "streamkv.cache.base" in graph["streamkv.cache"]
    assert "streamkv.backends.families" in graph["streamkv.decoder"]


def test_import_mapping():
    modules = {"streamkv.cache": None, "streamkv.cache.base": None, "streamkv.cache.slots": None,
               "streamkv.errors": None}

    def edges(src, here, is_pkg=False):
        return imported(ast.parse(src).body[0], here, is_pkg, modules)

    # from outside the package its __init__ runs first: an edge to it too
    assert edges("from streamkv.cache import base", "streamkv.errors") == {"streamkv.cache.base", "streamkv.cache"}
    assert edges("from streamkv.cache import CACHES", "streamkv.errors") == {"streamkv.cache"}
    assert edges("import streamkv.cache.slots as s", "streamkv.errors") == {"streamkv.cache.slots", "streamkv.cache"}
    # from inside, only the module
    assert edges("from streamkv.cache import base", "streamkv.cache.slots") == {"streamkv.cache.base"}
    assert edges("from . import base", "streamkv.cache.slots") == {"streamkv.cache.base"}
    assert edges("from .base import CacheManager", "streamkv.cache", is_pkg=True) == {"streamkv.cache.base"}
    assert edges("from ..errors import ConfigError", "streamkv.cache.slots") == {"streamkv.errors"}
    assert edges("import numpy", "streamkv.cache.slots") == set()


def test_cycle_finder_finds_a_cycle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [("a", "b", "c")]
    assert path_in(graph, ("a", "b", "c")) == "a -> b -> c -> a"


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(path_in(graph, c) for c in found)


def test_bottom_layer_imports_only_errors():
    graph = import_graph()
    assert graph["streamkv.errors"] == set()
    assert graph["streamkv.config"] <= {"streamkv.errors"}, sorted(graph["streamkv.config"])


OPTIONAL = ("triton", "liger_kernel")  # the fused kernels' dependencies: a module needing them may be absent


def test_every_module_imports_alone():
    """Each module imports in a fresh interpreter state of streamkv (the order of earlier imports can hide a
    cycle through a package's __init__ that the graph above does not model, e.g. a name used at import time).
    A module that needs an optional dependency which is not installed is skipped."""
    names = [m for m in all_modules() if not m.endswith("__main__")]
    script = (
        "import importlib, sys\n"
        "bad = []\n"
        f"for name in {names!r}:\n"
        "    for m in [m for m in sys.modules if m == 'streamkv' or m.startswith('streamkv.')]:\n"
        "        del sys.modules[m]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ModuleNotFoundError as exc:\n"
        f"        if (exc.name or '').split('.')[0] not in {OPTIONAL!r}:\n"
        "            bad.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "    except Exception as exc:\n"
        "        bad.append(f'{name}: {type(exc).__name__}: {exc}')\n"
        "print('\\n'.join(bad) or 'ok')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout[-3000:] + r.stderr[-3000:]

