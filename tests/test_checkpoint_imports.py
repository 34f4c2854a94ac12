"""The checkpoint package imports itself as a tree: the run-directory protocol (``directory``)
depends on nothing but ``integrity``, the readers and stores build on it, and no module reaches
back up. Imports are read with ``ast`` (function-level ones included, since a lazy import is
still a dependency), and every module imports on its own in a fresh interpreter."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "megatron_llama.checkpoint"
PKG_DIR = ROOT / "megatron_llama" / "checkpoint"
MODULES = sorted(p.stem for p in PKG_DIR.glob("*.py"))  # "__init__" is the package itself


def _edges(module: str) -> set[str]:
    """Sibling modules (or ``__init__``) that ``module`` imports anywhere in its source."""
    tree = ast.parse((PKG_DIR / f"{module}.py").read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE:
                    out.add("__init__")
                elif alias.name.startswith(PACKAGE + "."):
                    out.add(alias.name.split(".")[2])
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:
                base = node.module
            elif node.level == 0 and node.module and (node.module == PACKAGE or node.module.startswith(PACKAGE + ".")):
                base = node.module[len(PACKAGE) + 1:] or None
            else:
                continue
            if base:  # from .x import y / from megatron_llama.checkpoint.x import y
                out.add(base.split(".")[0])
            else:  # from . import x: a submodule, or a name of the package
                out.update(a.name if a.name in MODULES else "__init__" for a in node.names)
    out.discard(module)
    return out


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        path.pop()
        return None
    return next((c for n in sorted(graph) if n not in state and (c := visit(n))), None)


def _closure(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for m in graph[todo.pop()]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return seen


def test_the_import_graph_is_acyclic():
    graph = {m: _edges(m) for m in MODULES}
    assert graph["resharded"] >= {"directory", "optimizer_state"}, graph  # the parser sees real edges
    cycle = _cycle(graph)
    assert cycle is None, "import cycle in megatron_llama/checkpoint: " + " -> ".join(cycle)
    # nothing below the package's own __init__ imports it (that would be a cycle through it)
    assert all("__init__" not in deps for m, deps in graph.items() if m != "__init__"), graph
    # the run-directory protocol knows no converter and no store
    assert _closure(graph, "directory") <= {"integrity", "crc32"}, graph["directory"]


def test_the_cycle_finder_finds_the_old_circle():
    old = {"directory": {"integrity", "resharded"}, "resharded": {"optimizer_state", "directory"},
           "optimizer_state": {"directory"}, "integrity": set()}
    assert _cycle(old) in (["directory", "resharded", "directory"],
                           ["directory", "resharded", "optimizer_state", "directory"])


def _import_alone(module: str) -> tuple[str, int, str]:
    name = PACKAGE if module == "__init__" else f"{PACKAGE}.{module}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), DS_ACCELERATOR="cpu")
    res = subprocess.run([sys.executable, "-c", f"import {name}"], env=env, capture_output=True, text=True,
                         timeout=300)
    return module, res.returncode, res.stderr[-2000:]


def test_each_module_imports_alone_in_a_fresh_interpreter():
    with ThreadPoolExecutor(2) as pool:  # two at a time: each import of torch is one core
        results = list(pool.map(_import_alone, MODULES))
    failed = [(m, err) for m, code, err in results if code != 0]
    assert not failed, failed
