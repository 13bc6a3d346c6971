"""The import contracts, read from the source (AST), nothing imported or run:

- a harness (anything under harnesses/ and tests/harnesses/) uses the lab through lab.sdk only;
- the runner never imports the agents or the loop (directly, or through what it imports);
- lab.stats imports nothing of the lab but lab.records;
- no import cycle among the lab's modules at module level.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from conftest import REPO

LAB = REPO / "lab"
HARNESS_FOLDERS = (REPO / "harnesses", REPO / "tests" / "harnesses")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(LAB.rglob("*.py"))}


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imported(path: Path, importer: str | None = None, module_level_only: bool = False) -> set[str]:
    """Every module the file names in an import (for `from X import y`: X, and X.y where that is
    a module of the lab); with module_level_only, leave out imports inside functions and classes."""
    tree = ast.parse(path.read_text(), str(path))
    nodes = []
    if module_level_only:
        stack = list(tree.body)
        while stack:
            node = stack.pop()
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                continue
            nodes.append(node)
            for field in ("body", "orelse", "finalbody", "handlers"):
                stack.extend(getattr(node, field, []) or [])
    else:
        nodes = list(ast.walk(tree))
    out = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(importer, node) if importer else node.module or ""
            submodules = {f"{base}.{alias.name}" for alias in node.names} & set(MODULES)
            out.update(submodules)
            if len(submodules) < len(node.names):  # names defined in `base` itself (`from . import clock`
                out.add(base)                      # takes only the submodule from the package)
    return out


def lab_graph(module_level_only: bool) -> dict[str, set[str]]:
    return {name: {m for m in imported(path, name, module_level_only) if m in MODULES and m != name}
            for name, path in MODULES.items()}


def reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    """What importing `start` imports: its edges, and the packages (__init__) of every module reached."""
    seen, todo = set(), [start]
    while todo:
        name = todo.pop()
        parents = [name.rsplit(".", k)[0] for k in range(1, name.count("."))]
        for nxt in [*graph.get(name, ()), *parents]:
            if nxt not in seen and nxt in MODULES:
                seen.add(nxt)
                todo.append(nxt)
    return seen


# --- harnesses: lab.sdk only -------------------------------------------------------------------
LAB_IMPORT_IN_TEXT = re.compile(r"^\s*(?:from\s+(lab(?:\.\w+)*)\s+import\s+(\([^)]*\)|[\w, ]+)|import\s+(lab(?:\.\w+)*))",
                                re.M)


def _sdk_names() -> set[str]:
    init = ast.parse((LAB / "__init__.py").read_text())
    names = set()
    for node in ast.walk(init):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets):
            names = {elt.value for elt in node.value.elts}
    return names - {name.rpartition(".")[2] for name in MODULES} | {"sdk"}


def harness_files() -> list[Path]:
    return sorted(p for folder in HARNESS_FOLDERS for p in folder.rglob("*")
                  if p.suffix in (".py", ".sh") and "__pycache__" not in p.parts)


def test_harnesses_use_the_lab_through_lab_sdk_only():
    """Also in code a harness runs from a string or a shell script (a profiler's driver, setup.sh)."""
    allowed_from_lab = _sdk_names()
    bad = []
    for path in harness_files():
        text = path.read_text()
        found = [(m[1] or m[3], m[2]) for m in LAB_IMPORT_IN_TEXT.finditer(text)]
        if path.suffix == ".py":
            for node in ast.walk(ast.parse(text, str(path))):
                if isinstance(node, ast.Import):
                    found += [(a.name, "") for a in node.names if a.name.split(".")[0] == "lab"]
                elif isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").split(".")[0] == "lab":
                    found.append((node.module, ",".join(a.name for a in node.names)))
        for module, names in found:
            if module == "lab.sdk":
                continue
            wanted = {n.strip(" ()") for n in names.split(",") if n.strip(" ()")}
            if module == "lab" and wanted and wanted <= allowed_from_lab:
                continue
            bad.append(f"{path.relative_to(REPO)}: {module} {sorted(wanted) or ''}")
    assert not bad, "harnesses import the lab through lab.sdk only:\n" + "\n".join(sorted(set(bad)))


def test_the_sdk_is_what_harnesses_need():
    """Every name a harness imports from lab.sdk is there (a typo or a removed name fails here,
    not in a harness's slow tests)."""
    sdk = ast.parse((LAB / "sdk.py").read_text())
    exported = next({elt.value for elt in node.value.elts} for node in ast.walk(sdk)
                    if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "__all__" for t in node.targets))
    missing = []
    for path in harness_files():
        for m in LAB_IMPORT_IN_TEXT.finditer(path.read_text()):
            if m[1] == "lab.sdk":
                missing += [f"{path.relative_to(REPO)}: {n}" for n in re.split(r"[,\s()]+", m[2])
                            if n and n not in exported]
    assert not missing, missing


# --- the lab's own layers ---------------------------------------------------------------------
def test_the_runner_never_imports_the_agents_or_the_loop():
    forbidden = {m for m in MODULES if m.startswith("lab.agents") or m in ("lab.loop", "lab.parallel")}
    direct = {m for m in imported(MODULES["lab.runner"], "lab.runner") if m in MODULES}
    assert not direct & forbidden, sorted(direct & forbidden)
    through = reachable(lab_graph(module_level_only=True), "lab.runner")
    assert not through & forbidden, sorted(through & forbidden)


def test_stats_imports_nothing_of_the_lab_but_records():
    of_the_lab = {m for m in imported(MODULES["lab.stats"], "lab.stats") if m.split(".")[0] == "lab"}
    assert of_the_lab <= {"lab.records"}, sorted(of_the_lab)


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_at_module_level():
    assert _cycles(lab_graph(module_level_only=True)) == []


def test_no_import_cycles_through_lazy_imports_either():
    """A function-level import is for an optional package or a heavy module, never to hide a
    cycle (lab.envs.docker and lab.publish once imported each other that way)."""
    assert _cycles(lab_graph(module_level_only=False)) == []


@pytest.mark.parametrize("graph, expected", [
    ({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]),
    ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
])
def test_the_cycle_finder_finds_cycles(graph, expected):
    assert _cycles(graph) == expected


def test_the_parser_sees_lazy_and_relative_imports(tmp_path):
    """The contracts rest on `imported`: a relative import resolves to the lab's module, and a lazy
    one counts except for module_level_only."""
    lazy = {m for m in imported(MODULES["lab.envs.docker"], "lab.envs.docker") if m in MODULES}
    assert {"lab.errors", "lab.extras", "lab.harness", "lab.envs.base"} <= lazy
    top = imported(MODULES["lab.evaluate"], "lab.evaluate", module_level_only=True)
    assert "lab.stats" in top and "lab.envs" in top
