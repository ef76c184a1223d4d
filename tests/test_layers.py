"""The package's import graph: one way down through the layers, no cycles, no module too long.

Read from the source with ``ast`` (every ``import``, lazy ones inside functions included), so an
arrow that only runs on one code path still counts: a lazy import back up is still a cycle a
reader has to keep in mind.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pangu_fastkd"

# Bottom first. A unit is a top-level module or subpackage of pangu_fastkd; a unit may import
# units of lower layers only (units of one layer do not import each other). The package's own
# ``__init__`` is its front door: it sits on top and re-exports, and importing it is free.
LAYERS: list[set[str]] = [
    {"_ascend_build", "durable", "distributed"},
    {"_native", "pretrained"},
    {"data"},
    {"ops"},
    {"model", "cache"},
    {"hf"},
    {"backends"},
    {"rollout", "scoring"},
    {"train"},
    {"ascend_smoke"},
    {"__init__"},
]
MAX_LINES = 500


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imported_modules(path: Path, *, type_only: bool = True) -> set[str]:
    """Dotted names of the ``pangu_fastkd`` modules ``path`` imports (``from x import y``
    counts as ``x.y`` when ``y`` is a module file, else as ``x``); ``type_only=False`` leaves
    out the imports under ``if TYPE_CHECKING:``, which never run."""
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path.parent)
    if path.name != "__init__.py" and path.parent == PACKAGE:
        package = "pangu_fastkd"
    found: set[str] = set()
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped = set() if type_only else _type_checking_imports(tree)
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                found.add(submodule if _exists(submodule) else module)
    return {name for name in found if _exists(name)}


def _type_checking_imports(tree: ast.Module) -> set[int]:
    """ids of the import nodes inside ``if TYPE_CHECKING:`` blocks."""
    found: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            for inner in node.body:
                found.update(id(n) for n in ast.walk(inner))
    return found


def _exists(module: str) -> bool:
    if not module.startswith("pangu_fastkd"):
        return False
    path = PACKAGE.parent / Path(*module.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _graph(*, type_only: bool = True) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        module = _module_name(path)
        graph[module] = {m for m in _imported_modules(path, type_only=type_only) if m != module}
    return graph


def _layer(unit: str) -> int:
    for index, layer in enumerate(LAYERS):
        if unit in layer:
            return index
    raise AssertionError(f"pangu_fastkd.{unit} is in no layer of tests/test_layers.py: add it")


def test_every_import_points_down_a_layer() -> None:
    upward = []
    for module, imports in _graph().items():
        for target in imports:
            here, there = _unit(module), _unit(target)
            if here == there or there == "__init__":
                continue
            if _layer(there) >= _layer(here):
                upward.append(f"{module} imports {target}")
    assert not upward, "imports that do not point down a layer:\n" + "\n".join(sorted(upward))


def test_nothing_outside_the_trainer_imports_it() -> None:
    importers = [
        module
        for module, imports in _graph().items()
        if _unit(module) != "train" and any(_unit(t) == "train" for t in imports)
    ]
    assert not importers


def test_no_import_cycle() -> None:
    # Type-only imports are left out: they never run, so they cannot form a cycle at import.
    graph = _graph(type_only=False)
    state: dict[str, int] = {}  # 1 on the stack, 2 done
    stack: list[str] = []
    cycles: list[str] = []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph.get(module, ())):
            # A package's __init__ importing its own submodules is how it exports them.
            if target.startswith(module + "."):
                continue
            if state.get(target) == 1:
                cycles.append(" -> ".join([*stack[stack.index(target) :], target]))
            elif target not in state:
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def _module_id(path: Path) -> str:
    return str(path.relative_to(PACKAGE))


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=_module_id)
def test_module_is_short(path: Path) -> None:
    lines = len(path.read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE.parent)} has {lines} lines"
