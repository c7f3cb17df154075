"""The import rules of ARCHITECTURE.md, checked on the source: layers and framework rooms."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "platform" / "lmaas"

# lowest layer first; a module may import only from its own layer or below
LAYERS = {
    "__init__": 0,
    "config": 0,
    "errors": 0,
    "storage": 0,
    "db": 0,
    "cluster": 0,
    "models": 1,
    "data": 1,
    "registry": 2,
    "auth": 2,
    "train": 3,
    "compress": 3,
    "serve": 3,
    "ops": 3,
    "batch": 3,
    "cli": 4,
}
# framework imports allowed only in these rooms (first component of the module path)
ROOMS = {
    "ray.serve": {"serve"},
    "ray.train": {"train", "compress"},
    "ray.tune": {"train"},
    "ray.data": {"data", "train", "batch"},
    "fsspec": {"storage"},
    "s3fs": {"storage"},
    "fastapi": {"serve"},
    "typer": {"cli"},
}
NEVER_TOGETHER = [("train", "serve"), ("serve", "train")]


def room_of(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0].removesuffix(".py")


def imports_of(path: Path) -> list[tuple[str, int]]:
    """Every absolute module name a file imports (from-imports resolved), with its line."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = path.relative_to(PACKAGE.parent).with_suffix("").parts[: -node.level]
                module = ".".join(base + ((node.module,) if node.module else ()))
            else:
                module = node.module or ""
            found.append((module, node.lineno))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names]
    return found


SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_every_top_level_module_has_a_layer():
    unknown = {room_of(p) for p in SOURCES} - set(LAYERS)
    assert not unknown, f"add these to LAYERS (and ARCHITECTURE.md): {sorted(unknown)}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_respect_layers_and_rooms(path: Path):
    room = room_of(path)
    problems = []
    for module, line in imports_of(path):
        parts = module.split(".")
        if parts[0] == "lmaas" and len(parts) > 1 and parts[1] in LAYERS:
            target = parts[1]
            if LAYERS[target] > LAYERS[room]:
                problems.append(f"line {line}: {room} (L{LAYERS[room]}) imports {module} (L{LAYERS[target]})")
            if (room, target) in NEVER_TOGETHER:
                problems.append(f"line {line}: {room} must not import {target}")
        for framework, allowed in ROOMS.items():
            if (module == framework or module.startswith(framework + ".")) and room not in allowed:
                problems.append(f"line {line}: {module} is imported outside {sorted(allowed)}")
    assert not problems, "\n".join(problems)


def test_platform_is_a_source_root_not_a_package():
    assert not (PACKAGE.parent / "__init__.py").exists()


def test_the_checker_catches_violations(tmp_path: Path):
    """The rules above would fail on a bad import (guards against a checker that checks nothing)."""
    bad = PACKAGE / "storage.py"
    imports = dict.fromkeys(m for m, _ in imports_of(bad))
    assert "fsspec" in imports
    fake = tmp_path / "lmaas"
    (fake / "data").mkdir(parents=True)
    (fake / "data" / "x.py").write_text("from lmaas.serve import engine\nimport fsspec\nfrom ..registry import store\n")
    globals_backup = globals()["PACKAGE"]
    globals()["PACKAGE"] = fake
    try:
        with pytest.raises(AssertionError) as info:
            test_imports_respect_layers_and_rooms(fake / "data" / "x.py")
    finally:
        globals()["PACKAGE"] = globals_backup
    message = str(info.value)
    assert "imports lmaas.serve" in message
    assert "fsspec is imported outside" in message
    assert "imports lmaas.registry" in message


def test_serve_engine_imports_neither_ray_nor_http():
    """The engine runs inside a Serve replica but knows nothing of Ray or HTTP (vLLM-backed engines share the seam)."""
    problems = [
        f"{path.relative_to(PACKAGE)} line {line}: {module}"
        for path in sorted((PACKAGE / "serve" / "engine").rglob("*.py"))
        for module, line in imports_of(path)
        if module.split(".")[0] in {"ray", "fastapi", "starlette", "uvicorn"}
    ]
    assert not problems, "\n".join(problems)


def import_graph(root: Path) -> dict[str, dict[str, int]]:
    """Each module of the package at `root` -> {module of that package it imports: line}, function-level (lazy) imports included.

    `from a.b import c` imports module `a.b.c` where that is a module, else module `a.b` (the longest prefix that is one).
    """
    def name(path: Path) -> str:
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name(path): path for path in sorted(root.rglob("*.py"))}
    graph: dict[str, dict[str, int]] = {}
    for module, path in modules.items():
        edges = graph[module] = {}
        for imported, line in imports_of(path):
            parts = imported.split(".")
            target = next((".".join(parts[:n]) for n in range(len(parts), 0, -1) if ".".join(parts[:n]) in modules), None)
            if target is not None and target != module:
                edges[target] = min(line, edges.get(target, line))
    return graph


def find_cycle(graph: dict[str, dict[str, int]]) -> list[str]:
    """One import cycle of `graph` as [a, b, ..., a], or [] when every import goes one way."""
    on_path: list[str] = []
    done: set[str] = set()

    def visit(module: str) -> list[str]:
        on_path.append(module)
        for target in sorted(graph.get(module, {})):
            if target in on_path:
                return on_path[on_path.index(target):] + [target]
            if target not in done and (cycle := visit(target)):
                return cycle
        on_path.pop()
        done.add(module)
        return []

    for module in sorted(graph):
        if module not in done and (cycle := visit(module)):
            return cycle
    return []


def describe_cycle(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return "import cycle:\n" + "\n".join(f"  {a} (line {graph[a][b]}) imports {b}" for a, b in itertools.pairwise(cycle))


def test_serve_imports_go_one_way():
    """No import cycle among `lmaas.serve`'s modules, counting imports inside functions: options < replica < ingress < app < deployments.

    A lazy import still makes a circle (it only moves the failure from import time to call time, and
    the modules can no longer be read, or tested, one without the other). Break one properly: move
    the code to the module that owns it, or pass the dependency in as an argument.
    """
    graph = import_graph(PACKAGE / "serve")
    assert graph.get("lmaas.serve.deployments"), "the graph lost the serve modules"
    cycle = find_cycle(graph)
    assert not cycle, describe_cycle(graph, cycle)


def test_the_cycle_finder_sees_lazy_imports(tmp_path: Path):
    fake = tmp_path / "lmaas"
    (fake / "serve").mkdir(parents=True)
    (fake / "serve" / "__init__.py").write_text("")
    (fake / "serve" / "low.py").write_text("def f():\n    from lmaas.serve.high import g\n")
    (fake / "serve" / "high.py").write_text("from lmaas.serve import low\nfrom .low import f\n")
    (fake / "serve" / "leaf.py").write_text("import lmaas.serve.low\n")
    globals_backup = globals()["PACKAGE"]
    globals()["PACKAGE"] = fake
    try:
        graph = import_graph(fake / "serve")
    finally:
        globals()["PACKAGE"] = globals_backup
    assert graph["lmaas.serve.leaf"] == {"lmaas.serve.low": 1}
    assert find_cycle(graph) == ["lmaas.serve.high", "lmaas.serve.low", "lmaas.serve.high"]
    assert "lmaas.serve.low (line 2) imports lmaas.serve.high" in describe_cycle(graph, find_cycle(graph))
    del graph["lmaas.serve.low"]["lmaas.serve.high"]
    assert find_cycle(graph) == []
