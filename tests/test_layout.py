"""The house rules, read from the source: which floor may import which, and no import cycles."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _modules(package: str) -> dict[str, Path]:
    found = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, module_level_only: bool) -> set[str]:
    """The modules `path` imports (every import, or only those run when the module is imported)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if module_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


MODULES = {**_modules("tasks"), **_modules("flows"), **_modules("a2k")}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.split(".")[0] in ("tasks", "flows")))
def test_tasks_and_flows_never_import_the_cli_and_tasks_never_import_flows(module):
    imported = {name.split(".")[0] for name in _imports(MODULES[module], module_level_only=False)}
    assert "a2k" not in imported
    if module.startswith("tasks"):
        assert "flows" not in imported


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("tasks") and
                                          not m.endswith("prefect_tasks")))
def test_logic_modules_import_no_prefect_when_imported(module):
    """Only a package's prefect_tasks.py imports Prefect at module level: the plain functions load (and the CLI
    checks its arguments) without it."""
    assert not {n for n in _imports(MODULES[module], module_level_only=True) if n.split(".")[0] == "prefect"}


def test_no_import_cycles_among_the_project_s_modules():
    graph = {m: {n for n in _imports(p, module_level_only=True) if n in MODULES and n != m}
             for m, p in MODULES.items()}
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail("import cycle: " + " -> ".join(path[path.index(n):] + [n]))
            if n not in state:
                visit(n, path + [n])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
