"""The import graph, read from the sources (imports inside functions included).

Dependencies point one way, launch.py -> search -> sketch_core; no module imports
itself back through others; the core never imports Ray, Optuna or pydantic, and
argparse only in its command-line modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sketch_core", "search")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    mods = {"launch": ROOT / "launch.py"}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[_module_name(path)] = path
    return mods


def _imports(name: str, path: Path) -> set[str]:
    """Every module ``name`` imports anywhere in its source, absolute names."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            # "from pkg import sub" may name a submodule
            out.update(f"{mod}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) \
                in ("import_module", "__import__") and node.args and isinstance(node.args[0], ast.Constant):
            out.add(str(node.args[0].value))
    return out


def _graph() -> dict[str, set[str]]:
    mods = _sources()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for imp in _imports(name, path):
            # the longest project module that the import names
            parts = imp.split(".")
            for k in range(len(parts), 0, -1):
                cand = ".".join(parts[:k])
                if cand in mods and cand != name:
                    deps.add(cand)
                    break
        graph[name] = deps
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
            # a package's __init__ re-exporting its submodules is not a circle
            if n.startswith(d + ".") or d.startswith(n + "."):
                continue
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state:
                found = visit(d)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_reader_finds_a_known_import():
    graph = _graph()
    assert "sketch_core.pruning.fd" in graph["sketch_core.pruning.prune"]
    assert "search.experiment.config" in graph["search.run.ray_driver"]


def test_no_import_circle():
    assert _cycle(_graph()) is None, f"import circle: {' -> '.join(_cycle(_graph()) or [])}"


def test_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_dependencies_point_one_way():
    for name, deps in _graph().items():
        if name.startswith("sketch_core"):
            bad = sorted(d for d in deps if d.startswith("search") or d == "launch")
            assert not bad, f"{name} imports {bad}"
        if name.startswith("search"):
            assert "launch" not in deps, f"{name} imports launch"


def test_core_stays_free_of_search_libraries():
    for name, path in _sources().items():
        if not name.startswith("sketch_core"):
            continue
        tops = {imp.split(".")[0] for imp in _imports(name, path)}
        assert not tops & {"ray", "optuna", "pydantic"}, f"{name} imports {tops & {'ray', 'optuna', 'pydantic'}}"
        if not name.startswith("sketch_core.cli"):
            assert "argparse" not in tops, f"{name} imports argparse outside sketch_core.cli"


def _function_lines(path: Path, name: str) -> int:
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            return node.end_lineno - start + 1
    raise AssertionError(f"{path.name} defines no {name}()")


def test_the_training_loop_and_the_search_driver_read_in_one_screen():
    assert _function_lines(ROOT / "sketch_core" / "training" / "loop.py", "fit") <= 60
    assert _function_lines(ROOT / "search" / "run" / "ray_driver.py", "run_search") <= 60
