"""The rooms keep their shape: no import cycle inside radcache (function-level imports
included), imports flow one way (embeddings never imports service or clients; clients
never import torch), and no module grows past the size docs/ARCHITECTURE.md allows."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {
    "embeddings": "radcache.embeddings",
    "service": "radcache.service",
    "clients": "radcache.clients",
}
MAX_LINES = 500
# Modules allowed past MAX_LINES; docs/ARCHITECTURE.md says why for each.
LARGE: set[str] = set()


def _modules() -> dict[str, Path]:
    out: dict[str, Path] = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports when it runs: top level and inside functions, not
    under ``if TYPE_CHECKING`` (those never run)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return found


GRAPH = {
    name: {m for m in _imports(name, path) if m in MODULES and m != name}
    for name, path in MODULES.items()
}


def _cycle() -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state and (found := walk(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(GRAPH):
        if start not in state and (found := walk(start)):
            return found
    return None


def test_modules_are_found() -> None:
    assert "radcache.service.intake" in MODULES and "radcache.embeddings.pipeline" in MODULES
    assert "radcache.embeddings.errors" in GRAPH["radcache.service.problems"]


def test_no_import_cycle() -> None:
    cycle = _cycle()
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_the_checker_sees_a_cycle_through_a_function_level_import(tmp_path: Path) -> None:
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("from . import b\n")
    b.write_text("def f():\n    from .a import x\n")
    assert "pkg.b" in _imports("pkg.a", a) and "pkg.a" in _imports("pkg.b", b)


def test_imports_flow_one_way() -> None:
    wrong = [
        f"{name} imports {m}"
        for name, path in MODULES.items()
        for m in _imports(name, path)
        if (
            name.startswith("radcache.embeddings")
            and m.startswith(("radcache.service", "radcache.clients"))
        )
        or (name.startswith("radcache.clients") and m.split(".")[0] in ("torch", "transformers"))
        or (name.startswith("radcache.clients") and m.startswith("radcache.service"))
    ]
    assert not wrong, "\n".join(wrong)


def test_routes_import_dependencies_not_the_app() -> None:
    routes = [n for n in MODULES if n.startswith("radcache.service.routes")]
    assert routes
    assert not [n for n in routes if "radcache.service.app" in _imports(n, MODULES[n])]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_size(name: str) -> None:
    lines = len(MODULES[name].read_text().splitlines())
    assert lines <= MAX_LINES or name in LARGE, f"{name}: {lines} lines (> {MAX_LINES})"


def test_no_two_modules_share_a_name_across_packages() -> None:
    """A module name means one concept. The HTTP routes and CLI commands are named after
    the concept they serve (``routes.search`` serves ``embeddings.search``); elsewhere the
    same name twice is a collision, unless it is the same concept (the service's settings
    extend the library's)."""
    same_concept = {"settings", "_common"}
    layers = ("radcache.service.routes.", "radcache.service.cli.")
    seen: dict[str, list[str]] = {}
    for name, path in MODULES.items():
        leaf = name.rsplit(".", 1)[-1]
        if path.name != "__init__.py" and leaf not in same_concept and not name.startswith(layers):
            seen.setdefault(leaf, []).append(name)
    clashes = {k: v for k, v in seen.items() if len(v) > 1}
    assert not clashes, clashes
