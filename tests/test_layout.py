"""The code's shape, as docs/architecture.md promises it: no import cycle between coact's
modules, no function over 80 lines, no file over 600; stages never import the report."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "coact"
STAGE_PACKAGES = ("models", "codes", "sae", "connectors", "linearity", "calibrate", "logic",
                  "block", "evidence", "rundir")  # fmt: skip


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """coact modules `path` imports (at any depth of the file, TYPE_CHECKING included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("coact"):
            out.add(node.module)
            out |= {f"{node.module}.{a.name}" for a in node.names} & known.keys()
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in known}
    return out & known.keys()


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle() -> None:
    known = modules()
    graph = {name: imports(path, known) - {name} for name, path in known.items()}
    assert cycles(graph) == []


def test_the_cycle_finder_finds_one() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_long_function_or_file() -> None:
    long = []
    for path in modules().values():
        text = path.read_text()
        if text.count("\n") > 600:
            long.append(f"{path.name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if size > 80:
                    long.append(f"{path.name}:{node.lineno} {node.name}: {size} lines")
    assert long == []


def test_stages_never_import_the_report_or_the_pipeline() -> None:
    known = modules()
    for name, path in known.items():
        if name.split(".")[1:2] and name.split(".")[1] in STAGE_PACKAGES:
            upward = {
                m for m in imports(path, known) if m.startswith(("coact.report", "coact.pipeline"))
            }
            if name == "coact.rundir.read":  # the reader of a finished run reads the summary
                upward -= {"coact.pipeline.config", "coact.pipeline.summary"}
            assert upward == set(), f"{name} imports {sorted(upward)}"
