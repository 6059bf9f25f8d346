"""The shape of the code, checked: what a newcomer relies on to find their way.

- every metric's `producer` is the module that really builds it (one hop from the series);
- no import circles between the daemon's modules, lazy imports included;
- no function over 60 lines;
- the README's "Development" map names every room of the tree, and nothing that is not there.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from exporter.metrics import CATALOGUE

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = (ROOT / "exporter", ROOT / "pgpressure-sqlalchemy" / "src" / "pgpressure_sqlalchemy")
MAX_FUNCTION_LINES = 60


def _modules(package: Path) -> dict[str, Path]:
    base = package.parent
    return {
        ".".join(path.relative_to(base).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted(package.rglob("*.py"))
    }


@pytest.mark.parametrize("spec", list(CATALOGUE.values()), ids=lambda s: s.name)
def test_every_metric_names_the_module_that_builds_it(spec):
    module = importlib.import_module(spec.producer)
    source = Path(module.__file__).read_text()
    catalogue = vars(importlib.import_module("exporter.metrics"))
    constant = next(name for name, value in catalogue.items() if value is spec)
    assert re.search(rf"\b{constant}\b", source), f"{spec.producer} does not build {spec.name}"


def _imports(path: Path, name: str) -> set[str]:
    """Every module of ours that `path` imports, at the top or inside a function."""
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}
    return found


def test_no_import_circles():
    modules: dict[str, Path] = {}
    for package in PACKAGES:
        modules |= _modules(package)
    graph = {name: _imports(path, name) & modules.keys() - {name} for name, path in modules.items()}
    # A package's __init__ importing its own modules is not a circle.
    graph = {
        name: {dep for dep in deps if not (name.startswith(dep + ".") and dep in modules)}
        for name, deps in graph.items()
    }
    circles: list[list[str]] = []

    def visit(node: str, trail: list[str]) -> None:
        for dep in sorted(graph[node]):
            if dep in trail:
                circles.append([*trail[trail.index(dep) :], dep])
            elif dep not in done:
                visit(dep, [*trail, dep])
        done.add(node)

    done: set[str] = set()
    for name in sorted(graph):
        if name not in done:
            visit(name, [name])
    assert not circles, "import circles:\n" + "\n".join(" -> ".join(c) for c in circles)


def test_no_function_is_longer_than_sixty_lines():
    long: list[str] = []
    for package in PACKAGES:
        for path in sorted(package.rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > MAX_FUNCTION_LINES:
                        where = path.relative_to(ROOT)
                        long.append(f"{where}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, "\n".join(long)


def _development_map() -> list[str]:
    """The paths the README's "Development" block names: a line at the left margin is a
    top-level entry, one indented by two spaces is inside the entry above it, and deeper
    indented lines continue a description."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Development") :]
    block = re.search(r"```\n(.*?)```", section, re.S).group(1)
    paths, parent = [], ""
    for line in block.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        entry = line.split()[0]
        if indent == 0:
            parent = entry
            paths.append(entry)
        elif indent == 2:
            paths.append(parent + entry)
    return paths


def test_the_readme_map_matches_the_tree():
    paths = _development_map()
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"the README's map names what is not in the tree: {missing}"
    rooms = {f"exporter/{d.name}/" for d in (ROOT / "exporter").iterdir() if d.is_dir()}
    rooms -= {"exporter/__pycache__/"}
    assert rooms <= set(paths), f"rooms missing from the README's map: {rooms - set(paths)}"
