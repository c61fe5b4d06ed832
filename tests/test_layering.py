"""The package's import graph, read from the source: layers point one way, nothing forms a cycle,
and an import inside a function says why it is there.

The layers, bottom to top: ``cam`` (attribution maths, pure torch) and ``pseudo`` (maps to label
maps) know nothing of what sits above them; ``models`` (LightningModules) never reach for the
stages; ``stages`` never reach for the pipeline or the command line. A module importing its own
package's ``__init__`` counts as a cycle too: it only works by import order.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "wsss"

# importer prefix -> the wsss prefixes it may import (None: anything not forbidden below)
ALLOWED = {
    "wsss.cam": ("wsss.cam",),
    "wsss.pseudo": ("wsss.cam", "wsss.pseudo", "wsss.label_maps", "wsss.images"),
}
# importer prefix -> the wsss prefixes it must not import
FORBIDDEN = {
    "wsss.models": ("wsss.stages", "wsss.pipeline", "wsss.cli"),
    "wsss.data": ("wsss.models", "wsss.stages", "wsss.pipeline", "wsss.cli", "wsss.tracking"),
    "wsss.metrics": ("wsss.models", "wsss.stages", "wsss.pipeline", "wsss.cli", "wsss.data"),
    "wsss.viz": ("wsss.models", "wsss.stages", "wsss.pipeline", "wsss.cli"),
    # the config's checks may ask wsss.models.backbones which layers a backbone has
    "wsss.config": ("wsss.stages", "wsss.pipeline", "wsss.cli", "wsss.tracking"),
    "wsss.tracking": ("wsss.stages", "wsss.pipeline", "wsss.cli"),
    "wsss.distributed": ("wsss.stages", "wsss.pipeline", "wsss.cli", "wsss.tracking"),
    "wsss.stages": ("wsss.pipeline", "wsss.cli"),
    "wsss.pipeline": ("wsss.cli",),
}
# words that say why an import sits inside a function (on its line or the line above)
REASONS = ("heavy", "optional", "cycle", "lazy", "only when", "extra")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE_ROOT.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_package(name: str) -> bool:
    return (PACKAGE_ROOT.parent / Path(*name.split(".")) / "__init__.py").is_file()


MODULES = {module_name(p): p for p in sorted(PACKAGE_ROOT.rglob("*.py"))}


def resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module an ``ImportFrom`` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    base = importer.split(".")
    if not is_package(importer):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str) -> list[tuple[str, ast.stmt, bool]]:
    """(imported wsss module, statement, at module level) for every import in a module. ``from
    package import submodule`` counts as an import of the submodule."""
    tree = ast.parse(MODULES[name].read_text())
    top_level = {id(node) for node in tree.body}
    for node in tree.body:  # imports under `if TYPE_CHECKING:` never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            top_level.update(id(child) for child in node.body)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            source = resolve(name, node)
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source
                for a in node.names
            ]
        for target in dict.fromkeys(targets):
            found.append((target, node, id(node) in top_level))
    return found


def type_checking_only(name: str) -> set[int]:
    tree = ast.parse(MODULES[name].read_text())
    ids = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(child) for child in ast.walk(node))
    return ids


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def internal_edges() -> dict[str, set[str]]:
    """Module-level imports between wsss modules (what runs when a module is imported)."""
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for name in MODULES:
        skipped = type_checking_only(name)
        for target, node, top in imports_of(name):
            if top and id(node) not in skipped and target in MODULES and target != name:
                edges[name].add(target)
    return edges


def test_the_graph_is_read_from_every_module():
    assert len(MODULES) > 40 and "wsss.cam" in MODULES and "wsss.cli" in MODULES
    edges = internal_edges()
    assert "wsss.cam" in edges["wsss.cli"] or any(edges.values())


@pytest.mark.parametrize("importer", sorted(MODULES))
def test_layers_point_down(importer):
    skipped = type_checking_only(importer)
    wrong = []
    for target, node, _ in imports_of(importer):
        if not target.startswith("wsss") or id(node) in skipped:
            continue
        for prefix, allowed in ALLOWED.items():
            if under(importer, prefix) and not any(under(target, a) for a in allowed):
                wrong.append(
                    f"{importer}:{node.lineno} imports {target} ({prefix} may import only {allowed})"
                )
        for prefix, forbidden in FORBIDDEN.items():
            if under(importer, prefix) and any(under(target, f) for f in forbidden):
                wrong.append(f"{importer}:{node.lineno} imports {target} ({prefix} sits below it)")
    assert not wrong, "\n".join(wrong)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the list of modules around it, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_no_import_cycle():
    edges = internal_edges()
    # a submodule that imports its own package's __init__ closes a loop through it
    for name in MODULES:
        for parent in [".".join(name.split(".")[:i]) for i in range(1, name.count(".") + 1)]:
            if parent in edges and name in edges[parent] and parent in edges[name]:
                raise AssertionError(f"{name} imports its own package {parent}, which imports it")
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_imports_inside_functions_say_why():
    unexplained = []
    for name, path in MODULES.items():
        lines = path.read_text().splitlines()
        for target, node, top in imports_of(name):
            if top:
                continue
            # the import's own lines, the imports and `try:` grouped above it, and the line above those
            start = node.lineno - 1
            while start > 0 and lines[start - 1].strip().startswith(
                ("import ", "from ", "try:", "#")
            ):
                start -= 1
            around = " ".join(lines[max(0, start - 1) : node.end_lineno]).lower()
            if "#" not in around or not any(reason in around for reason in REASONS):
                unexplained.append(
                    f"{name}:{node.lineno} imports {target} inside a function without saying why "
                    f"(a comment with one of {REASONS})"
                )
    assert not unexplained, "\n".join(unexplained)
