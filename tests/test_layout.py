"""The code's shape: imports run one way (no cycle between the repository's modules: hpc_es, the scripts in
tools/ and the examples in configs/, counting imports inside functions too), and the README's Layout section
names every module."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "hpc_es"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    """Import name -> file: hpc_es's modules by their dotted names; the scripts of tools/ and configs/ by their
    file names, the way they import each other (each puts its own folder on sys.path)."""
    names = {_module_name(p): p for p in PKG.rglob("*.py")}
    for folder in (ROOT / "tools", ROOT / "configs"):
        for path in sorted(folder.rglob("*.py")):
            assert path.stem not in names, f"two modules import as {path.stem!r}: {names[path.stem]} and {path}"
            names[path.stem] = path
    return names


def import_graph() -> dict[str, set[str]]:
    """module -> the repository's modules it imports anywhere in its body."""
    names = modules()
    graph: dict[str, set[str]] = {}
    for mod, path in names.items():
        deps: set[str] = set()
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in names)
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative import
                    anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in node.names:  # `from hpc_es import resume` imports the module hpc_es.resume
                    if f"{base}.{a.name}" in names:
                        deps.add(f"{base}.{a.name}")
                    elif base in names:
                        deps.add(base)
        deps.discard(mod)
        graph[mod] = deps
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_in_the_repository() -> None:
    graph = import_graph()
    assert "hpc_es.trainer" in graph and "hpc_es.population" in graph["hpc_es.trainer"]
    assert "bench_lowrank" in graph and {"benchlib", "hpc_es.lowrank"} <= graph["bench_lowrank"]
    assert "hpc_es.tasks" in graph["my_task"]
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph) or [])}"


def test_replay_does_not_import_the_trainer() -> None:
    assert "hpc_es.trainer" not in import_graph()["hpc_es.replay"]


def test_the_readme_layout_lists_every_module() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    layout = readme.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"`(hpc_es/[\w/]+\.py)`", layout))
    modules = {str(p.relative_to(ROOT)) for p in PKG.rglob("*.py")}
    assert not modules - listed, f"modules missing from the README's Layout: {sorted(modules - listed)}"
    assert not listed - modules, f"the README's Layout lists modules that do not exist: {sorted(listed - modules)}"


def test_a_missing_golden_file_fails_unless_regeneration_is_asked_for(tmp_path: Path, monkeypatch) -> None:
    import pytest
    from conftest import UPDATE_GOLDEN, check_golden

    monkeypatch.delenv(UPDATE_GOLDEN, raising=False)
    with pytest.raises(pytest.fail.Exception, match="missing"):
        check_golden("gone.txt", "x", tmp_path)
    assert not (tmp_path / "gone.txt").exists()
    monkeypatch.setenv(UPDATE_GOLDEN, "1")
    check_golden("gone.txt", "x", tmp_path)
    monkeypatch.delenv(UPDATE_GOLDEN)
    check_golden("gone.txt", "x", tmp_path)
    with pytest.raises(AssertionError, match="changed"):
        check_golden("gone.txt", "y", tmp_path)
