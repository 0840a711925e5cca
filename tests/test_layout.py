"""The code's structure, read from the sources with ``ast`` (nothing is imported).

- Dependencies point one way: launch.py -> search -> sketch_core; inside search the
  subpackages are layered results < propose < experiment < run < cli.
- No import circle, counting imports inside functions and a package's ``__init__``
  with its own modules (parent and child are not exempt).
- The core never imports Ray, Optuna or pydantic, and argparse only in its cli/.
- An import inside a function is for an optional or heavy package only (or for a
  project module that imports one), and a comment on its line says why.
- No function in sketch_core/ or search/ is longer than 60 lines.
- Dominance and hypervolume are computed in search/results/pareto.py alone.
"""

from __future__ import annotations

import ast
import re
from functools import lru_cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sketch_core", "search")
HEAVY = {"torch", "ray", "onnx", "onnxruntime", "onnxscript", "matplotlib", "torch_pruning", "pyarrow",
         "scipy", "sklearn", "torchvision", "tensorboard", "PIL", "tqdm", "sqlalchemy"}
SEARCH_LAYERS = ("search.results", "search.propose", "search.experiment", "search.run",
                 "search.cli")
MAX_LINES = 60


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@lru_cache(maxsize=None)
def _sources() -> dict[str, Path]:
    mods = {"launch": ROOT / "launch.py"}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            mods[_module_name(path)] = path
    return mods


@lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def _target(node: ast.Import | ast.ImportFrom, package: str) -> list[str]:
    """The absolute module names an import statement names (``from pkg import sub`` may
    name a submodule, so both are listed)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        base = package.split(".")
        base = base[: len(base) - node.level + 1]
        mod = ".".join(base + ([node.module] if node.module else []))
    else:
        mod = node.module or ""
    return [mod] + [f"{mod}.{alias.name}" for alias in node.names]


def _imports(name: str, path: Path, local: bool | None = None) -> list[tuple[str, ast.AST]]:
    """(module, statement) of every import in ``name``'s source; ``local`` True: only
    those inside functions, False: only module-level ones, None: all."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    inside: set[int] = set()
    for fn in ast.walk(_tree(path)):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = []
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if local is None or (id(node) in inside) == local:
                out += [(mod, node) for mod in _target(node, package)]
        elif isinstance(node, ast.Call) and local is not True and getattr(
                node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__") \
                and node.args and isinstance(node.args[0], ast.Constant):
            out.append((str(node.args[0].value), node))
    return out


def _project(imp: str, mods: dict[str, Path], own: str) -> str | None:
    """The longest project module an imported name names (None: not the project's)."""
    parts = imp.split(".")
    for k in range(len(parts), 0, -1):
        cand = ".".join(parts[:k])
        if cand in mods and cand != own:
            return cand
    return None


@lru_cache(maxsize=None)
def _graph(local: bool | None = None) -> dict[str, frozenset[str]]:
    mods = _sources()
    graph = {}
    for name, path in mods.items():
        deps = {_project(imp, mods, name) for imp, _ in _imports(name, path, local)}
        graph[name] = frozenset(d for d in deps if d)
    return graph


def _cycle(graph: dict[str, frozenset[str] | set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph.get(n, ())):
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


def _layer(name: str) -> int | None:
    for i, prefix in enumerate(SEARCH_LAYERS):
        if name == prefix or name.startswith(prefix + "."):
            return i
    return None


# ---------------------------------------------------------------- the readers themselves


def test_reader_finds_known_imports_local_ones_included():
    graph = _graph()
    assert "sketch_core.pruning.fd" in graph["sketch_core.pruning.prune"]
    assert "search.experiment.config" in graph["search.run.ray_driver"]
    assert "sketch_core.errors" in graph["launch"]


def test_cycle_finder_finds_one_and_a_parent_child_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"p": {"p.c"}, "p.c": {"p"}}) == ["p", "p.c", "p"]


# ---------------------------------------------------------------- the rules


def test_no_import_circle():
    found = _cycle(_graph())
    assert found is None, f"import circle: {' -> '.join(found)}"


def test_dependencies_point_one_way():
    for name, deps in _graph().items():
        if name.startswith("sketch_core"):
            bad = sorted(d for d in deps if d.startswith("search") or d == "launch")
            assert not bad, f"{name} imports {bad}"
        if name.startswith("search"):
            assert "launch" not in deps, f"{name} imports launch"
            mine = _layer(name)
            if mine is None:
                continue
            up = sorted(d for d in deps if (_layer(d) or -1) > mine)
            assert not up, f"{name} imports {up}, a layer above it ({' < '.join(SEARCH_LAYERS)})"


def test_core_stays_free_of_search_libraries():
    for name, path in _sources().items():
        if not name.startswith("sketch_core"):
            continue
        tops = {imp.split(".")[0] for imp, _ in _imports(name, path)}
        assert not tops & {"ray", "optuna", "pydantic"}, f"{name} imports {tops & {'ray', 'optuna', 'pydantic'}}"
        if not name.startswith("sketch_core.cli"):
            assert "argparse" not in tops, f"{name} imports argparse outside sketch_core.cli"


@lru_cache(maxsize=None)
def _heavy_pulled(name: str) -> frozenset:
    """The heavy packages that importing project module ``name`` imports (module level,
    through any chain of project modules)."""
    mods, seen, todo, found = _sources(), set(), [name], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        for imp, _ in _imports(n, mods[n], local=False):
            if imp.split(".")[0] in HEAVY | {"optuna"}:
                found.add(imp.split(".")[0])
        todo += list(_graph(local=False)[n])
    return frozenset(found)


def test_imports_inside_functions_are_for_heavy_packages_and_say_so():
    """A function-local import must defer a heavy or optional package that the module
    does not already import at its top (else it defers nothing), with a comment."""
    mods, bad = _sources(), []
    for name, path in mods.items():
        lines = path.read_text().splitlines()
        already = _heavy_pulled(name)
        for imp, node in _imports(name, path, local=True):
            top = "tensorboard" if imp.startswith("torch.utils.tensorboard") else imp.split(".")[0]
            target = _project(imp, mods, name)
            if top in PACKAGES and target is None:
                continue  # "from pkg import sub": the submodule is the import that counts
            pulled = _heavy_pulled(target) if target is not None else (
                {top} & (HEAVY | {"optuna"}))
            heavy = bool(set(pulled) - already)
            said = "#" in lines[node.lineno - 1] or "#" in lines[getattr(node, "end_lineno", node.lineno) - 1]
            if not heavy or not said:
                why = ("defers nothing the module does not import already" if not heavy
                       else "no comment says why")
                shown = target or top
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {shown} ({why})")
    assert not bad, "function-local imports:\n" + "\n".join(sorted(set(bad)))


def _functions(path: Path):
    for node in ast.walk(_tree(path)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            yield node.name, node.lineno, node.end_lineno - start + 1


def test_no_function_is_longer_than_a_screen():
    long = [f"{path.relative_to(ROOT)}:{line} {fn} ({n} lines)"
            for name, path in _sources().items() if name != "launch"
            for fn, line, n in _functions(path) if n > MAX_LINES]
    assert not long, f"functions over {MAX_LINES} lines:\n" + "\n".join(long)


_PARETO_NAMES = re.compile(r"dominat|hypervolume|pareto_front|nondominated|non_dominated", re.I)


def test_dominance_and_hypervolume_live_in_pareto_only():
    owner = ROOT / "search" / "results" / "pareto.py"
    files = [p for pkg in PACKAGES + ("benchmarks",) for p in sorted((ROOT / pkg).rglob("*.py"))]
    found = []
    for path in files:
        if path == owner:
            continue
        for fn, line, _ in _functions(path):
            # a DataFrame view that calls the rule is named for the frame it returns
            if _PARETO_NAMES.search(fn) and path.name != "dataframe.py":
                found.append(f"{path.relative_to(ROOT)}:{line} defines {fn}")
        text = path.read_text()
        if "_hypervolume" in text and "optuna" in text:
            found.append(f"{path.relative_to(ROOT)} reaches into optuna._hypervolume")
    assert not found, "\n".join(found)


def test_the_pareto_rule_is_not_recoded_in_the_dataframe_views():
    text = (ROOT / "search" / "results" / "dataframe.py").read_text()
    for fn, body in re.findall(r"def (\w+)\(.*?\n((?:    .*\n|\n)*)", text):
        if _PARETO_NAMES.search(fn):
            assert re.search(r"front_indices|front_mask|hypervolume_of_loss|pareto_front\(", body), fn


@pytest.mark.parametrize("module", ["sketch_core.models.cifar_resnet", "search.run.trial"])
def test_every_module_says_what_it_owns(module):
    doc = ast.get_docstring(_tree(_sources()[module]))
    assert doc and len(doc.splitlines()) >= 1


def test_every_module_has_a_docstring():
    missing = [name for name, path in _sources().items() if not ast.get_docstring(_tree(path))]
    assert not missing, f"modules without a docstring: {missing}"


# the entries that receive a search config, and the retrain's one resolution of it
_CONFIG_ENTRIES = {"run_search", "run_local", "retrain_experiment", "_job"}


def test_below_the_entry_no_function_takes_the_whole_config():
    """Proposing, running and reading results receive resolved objects (the plan, the
    trial setup, the retrain job), not the SearchConfig."""
    takers = []
    for pkg in ("propose", "run", "results"):
        for path in sorted((ROOT / "search" / pkg).rglob("*.py")):
            for node in ast.walk(_tree(path)):
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
                if node.name not in _CONFIG_ENTRIES and any(
                        a.annotation is not None and "SearchConfig" in ast.unparse(a.annotation)
                        for a in args):
                    takers.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not takers, "take the whole SearchConfig:\n" + "\n".join(takers)
