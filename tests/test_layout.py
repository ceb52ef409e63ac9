"""The package's shape: no import cycle (function-level and type-checking imports included),
no module over 600 lines, no class over 400, the public API exactly as documented, one
source for the version.

An edge a -> b of the import graph means that module a imports module b (``from pkg import
name`` points at ``pkg.name`` when that is a module, else at ``pkg``). A package's
``__init__`` that re-exports its submodules is an edge from the package to each of them;
the parent package Python initialises before a submodule is not an edge, so that re-export
alone is not a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

import gsam_monitor

ROOT = Path(gsam_monitor.__file__).resolve().parent
REPO = ROOT.parent
MAX_MODULE_LINES = 600
MAX_CLASS_LINES = 400
# What users import from the top level (docs/architecture.md, "Layout"): the monitor, the accumulators, the
# metrics module, the sinks and their protocol; not internals such as MardiaAccumulator.
PUBLIC_API = set(
    "GSAMMonitor CollectOptions WindowOptions ComputeOptions AlertRule MonitorError LayerStats ReservoirSample "
    "memory_report metrics Sink TensorBoardSink WandbSink JsonlSink LoggingSink".split()
)


def _modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package under its own name)."""
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules that ``name`` imports anywhere in its source (module level,
    functions, ``if TYPE_CHECKING:`` blocks)."""
    package = name if _is_package(name, modules) else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            for alias in node.names:
                sub = f"{source}.{alias.name}"
                found.add(sub if sub in modules else source)
    return {m for m in found if m in modules and m != name}


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as a closed path ``[a, b, ..., a]``, or ``None`` (iterative DFS)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if state.get(start):
            continue
        path = [start]
        stack = [iter(sorted(graph[start]))]
        state[start] = 1
        while stack:
            nxt = next(stack[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                stack.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            elif not state.get(nxt):
                state[nxt] = 1
                path.append(nxt)
                stack.append(iter(sorted(graph.get(nxt, ()))))
    return None


def test_the_cycle_finder_finds_a_cycle_and_accepts_a_dag() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"x": {"x"}}) == ["x", "x"]


def test_import_edges_resolve_submodules_relative_imports_and_function_level_imports(tmp_path: Path) -> None:
    modules = _modules()
    graph = _graph(modules)
    assert "gsam_monitor.stats.layer_stats" in graph["gsam_monitor.stats"]  # a re-export
    assert "gsam_monitor.analysis.distributions" in graph["gsam_monitor.analysis"]  # from .distributions
    assert "gsam_monitor.metrics" in graph["gsam_monitor.monitor.report"]  # from gsam_monitor import metrics
    # A function-level import counts as much as one at module level.
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from gsam_monitor.sinks import keys\n    import gsam_monitor.stats\n")
    probe = {**modules, "gsam_monitor.probe": source}
    assert _imports("gsam_monitor.probe", source, probe) == {"gsam_monitor.sinks.keys", "gsam_monitor.stats"}


def _package_imports(path: Path) -> set[str]:
    """The ``gsam_monitor`` modules a file names in its imports (for ``from m import x``: ``m``)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
    return {name for name in names if name == "gsam_monitor" or name.startswith("gsam_monitor.")}


def test_every_import_of_the_package_names_one_of_its_modules() -> None:
    # A stale path (a module moved away) must fail here, not be found in another checkout
    # of the package that an editable install happens to put on the path.
    modules = _modules()
    files = sorted({*ROOT.rglob("*.py"), *(p for d in ("tests", "examples", "benchmarks", "scripts")
                                            for p in (REPO / d).rglob("*.py"))})
    stale = {f"{path.relative_to(REPO)}: {name}" for path in files for name in _package_imports(path)
             if name not in modules}
    assert not stale, "imports of modules the package does not have: " + ", ".join(sorted(stale))


def test_the_package_has_no_import_cycle() -> None:
    cycle = find_cycle(_graph(_modules()))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_and_classes_stay_small(name: str) -> None:
    path = _modules()[name]
    text = path.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has over {MAX_MODULE_LINES} lines"
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, ast.ClassDef):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= MAX_CLASS_LINES, f"{name}.{node.name} has {lines} lines (over {MAX_CLASS_LINES})"


def test_the_public_api_is_exactly_the_documented_names() -> None:
    assert set(gsam_monitor.__all__) == PUBLIC_API
    assert len(gsam_monitor.__all__) == len(PUBLIC_API)
    for name in PUBLIC_API:
        assert getattr(gsam_monitor, name) is not None
    assert not hasattr(gsam_monitor, "MardiaAccumulator")  # eval internals stay out of the top level


def test_the_version_has_one_source() -> None:
    from setuptools.config.pyprojecttoml import read_configuration

    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert "version" not in project and "version" in project["dynamic"]
    # setuptools reads it from gsam_monitor.__version__: the package and its metadata agree.
    assert read_configuration(REPO / "pyproject.toml")["project"]["version"] == gsam_monitor.__version__
