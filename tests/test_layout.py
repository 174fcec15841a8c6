"""The house's layers: `schemas` and `core` below, the services side by side, `dmd_offline` above them,
the `fallwatch` app shell on top. Checked on the import statements themselves (parsed, never run) and on
what each service's `python -m` entry really loads (in a fresh interpreter)."""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BELOW = ("schemas", "core")
SERVICES = ("producers", "edge_workers", "cloud_workers", "alerting")
PACKAGES = (*BELOW, *SERVICES, "dmd_offline", "fallwatch")
# What each service's entry must not load, beyond the other services, dmd_offline, fallwatch and any benchmark.
FORBIDDEN_THIRD_PARTY = {
    "producers": ("torch", "transformers"),
    "edge_workers": ("mediapipe",),
    "cloud_workers": ("mediapipe",),
    "alerting": ("torch",),
}


def module_files(root: Path) -> dict[str, Path]:
    """Every module of the packages by its dotted name (a package by its own name, for its `__init__`)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            parts = path.relative_to(root).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def first_party_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of the packages that `path` imports anywhere (top level, inside functions, for typing)."""
    imported: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0 and node.module, f"{path}: relative import"
            # `from package import module` names the module; `from module import name` the module itself
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names = [name if name in modules else node.module for name in names]
        else:
            continue
        imported.update(name for name in names if name.split(".")[0] in PACKAGES)
    return imported


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_files(root)
    graph = {name: first_party_imports(path, modules) for name, path in modules.items()}
    unknown = {f"{name} imports {target}" for name, targets in graph.items() for target in targets - modules.keys()}
    assert not unknown, sorted(unknown)
    return graph


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that runs against the layers, as `importer -> imported: why`."""
    found = []
    for importer, targets in sorted(graph.items()):
        package = importer.split(".")[0]
        if package == "schemas":
            allowed: tuple[str, ...] = ("schemas",)
        elif package == "core":
            allowed = BELOW
        elif package in SERVICES:
            allowed = (*BELOW, package)
        elif package == "dmd_offline":
            allowed = (*BELOW, *SERVICES, "dmd_offline")
        else:
            allowed = PACKAGES
        found += [
            f"{importer} -> {target}: {package} may import only {', '.join(allowed)}"
            for target in sorted(targets)
            if target.split(".")[0] not in allowed
        ]
        if importer.endswith(".__main__") and (len(targets) != 1 or next(iter(targets)).split(".")[0] != package):
            found.append(f"{importer} -> {sorted(graph[importer])}: a __main__ runs its own package's entry only")
    return found


def import_circle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        graphlib.TopologicalSorter(graph).prepare()
    except graphlib.CycleError as error:
        return list(error.args[1])
    return None


def test_no_import_circle_between_files() -> None:
    assert import_circle(import_graph(REPO)) is None


def test_imports_run_down_the_layers_only() -> None:
    assert layer_violations(import_graph(REPO)) == []


def test_the_checks_see_a_circle_and_an_upward_import() -> None:
    graph = {"core.a": {"core.b"}, "core.b": {"core.a", "fallwatch.cli"}, "edge_workers.__main__": {"fallwatch.cli"}}
    assert set(import_circle(graph) or []) == {"core.a", "core.b"}
    violations = layer_violations(graph)
    assert len(violations) == 3, violations
    assert violations[0].startswith("core.b -> fallwatch.cli") and violations[1].startswith("edge_workers.__main__ ->")


def test_every_package_has_a_python_dash_m_entry_with_a_main() -> None:
    modules = module_files(REPO)
    for package in (*SERVICES, "dmd_offline", "fallwatch"):
        (entry,) = first_party_imports(modules[f"{package}.__main__"], modules)
        assert "main" in {node.name for node in ast.parse(modules[entry].read_text()).body if hasattr(node, "name")}


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_entry_loads_only_its_own_code(service: str) -> None:
    """`<service>.main` and every module it runs (imported lazily there), in a fresh interpreter."""
    modules = module_files(REPO)
    entry = f"{service}.main"
    wanted = [entry, *sorted(first_party_imports(modules[entry], modules))]
    script = "import importlib, json, sys\nfor name in sys.argv[1:]: importlib.import_module(name)\n"
    script += "print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", script, *wanted], cwd=REPO, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout)
    assert f"{service}.service" in loaded or f"{service}.app" in loaded, "the service itself was loaded"
    others = {*SERVICES, "dmd_offline", "fallwatch"} - {service}
    unwanted = [
        name
        for name in loaded
        if name.split(".")[0] in others
        or name.split(".")[0] in FORBIDDEN_THIRD_PARTY[service]
        or (name.split(".")[0] in PACKAGES and "bench" in name)
    ]
    assert unwanted == []


def long_functions(path: Path, most_lines: int) -> list[str]:
    """The functions and methods of `path` longer than `most_lines`, from their first decorator to their end."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.end_lineno is not None:
            first = min([node.lineno, *(decorator.lineno for decorator in node.decorator_list)])
            if (length := node.end_lineno - first + 1) > most_lines:
                found.append(f"{path.name}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_in_the_services_is_over_60_lines(tmp_path: Path) -> None:
    paths = [path for package in SERVICES for path in sorted((REPO / package).rglob("*.py"))]
    assert paths and [found for path in paths for found in long_functions(path, 60)] == []
    example = tmp_path / "example.py"
    example.write_text("@decorated\ndef f():\n" + "    x = 1\n" * 58 + "\n\ndef g():\n" + "    x = 1\n" * 60)
    assert long_functions(example, 60) == ["example.py:63 g (61 lines)"], "f: 60 lines with its decorator"
