"""incr_cli's modules import one way: no cycles, and no module imports a layer above its own. Every import
counts, inside functions and under TYPE_CHECKING too."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import incr_cli

PACKAGE = Path(incr_cli.__file__).resolve().parent

# From the top: the commands, the engine that runs a training, the methods, and what they are built on.
# A module may import its own layer or any layer below it (a cycle inside a layer is caught separately).
LAYERS = [
    ("commands", {"cli", "__main__", "train", "precheck", "inference", "report"}),
    # the run: its config's schema and checks, building, the task loop, results, checkpoints, live logging
    (
        "engine",
        {"config", "engine", "run_setup", "run_checkpoints", "results", "task_checks", "build", "loggers"},
    ),
    ("strategies", {"strategies"}),
    # what methods and the engine are built on; console, plots, run_figures and estimate print, draw and time
    (
        "parts",
        {
            "step",
            "evaluation",
            "data",
            "models",
            "memory",
            "metrics",
            "checkpoint",
            "distributed",
            "console",
            "plots",
            "run_figures",
            "estimate",
        },
    ),
    ("utilities", {"errors", "files", "faults"}),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["incr_cli", *parts])


def imports() -> dict[str, set[str]]:
    """Each module of incr_cli -> the incr_cli modules it imports anywhere in its file."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: from the package, up level - 1
                    base = ".".join(
                        [*package.split(".")[: len(package.split(".")) - node.level + 1], base]
                    ).strip(".")
                # `from incr_cli import checkpoint` imports the module incr_cli.checkpoint
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def layer(module: str) -> int:
    first = module.split(".")[1] if "." in module else ""
    for rank, (_, members) in enumerate(LAYERS):
        if first in members:
            return rank
    raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it where it belongs")


def test_no_module_imports_a_layer_above_its_own():
    graph = imports()
    upward = [
        f"{a} ({LAYERS[layer(a)][0]}) imports {b} ({LAYERS[layer(b)][0]})"
        for a, targets in graph.items()
        for b in targets
        if a != "incr_cli" and b != "incr_cli" and layer(b) < layer(a)
    ]
    assert not upward, "\n".join(sorted(upward))


def test_there_is_no_import_cycle():
    graph = imports()
    graph.pop("incr_cli", None)  # the package's __init__ only holds the version
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif target not in state:
                visit(target, [*path, target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert not cycles, "\n".join(cycles)


def test_the_check_finds_a_cycle_and_an_upward_import(tmp_path, monkeypatch):
    # The checks above can fail: a tiny package with both faults.
    package = tmp_path / "incr_cli"
    (package / "strategies").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "errors.py").write_text("from incr_cli.engine import Run\n")
    (package / "engine.py").write_text("def f():\n    from incr_cli import errors\n")
    (package / "strategies" / "__init__.py").write_text("")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", package)
    graph = imports()
    assert graph["incr_cli.errors"] == {"incr_cli.engine"} and graph["incr_cli.engine"] == {"incr_cli.errors"}
    assert layer("incr_cli.engine") < layer("incr_cli.errors")
