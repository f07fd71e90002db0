"""
The house rules that code review alone let slip: imports go downward only (`ops` → `modeling` → `trainer` → `tools`),
no import cycle anywhere in the package, modules stay short enough to read in one sitting, and `trl-tidpo --help`
answers without torch. The import graph is read from the source with `ast` (module-level and function-level imports,
relative or absolute), so a lazy import inside a function counts as much as one at the top.
"""

import ast
import subprocess
import sys
from pathlib import Path

import pytest


PACKAGE_DIR = Path(__file__).resolve().parents[1] / "trl_tidpo"
LAYERS = ("ops", "modeling", "trainer", "tools")  # each may import only the ones before it (and itself)
TRAINER_MODULE = "trl_tidpo.trainer.tidpo_trainer"
TRAINER_MAX_LINES = 700
MODULE_MAX_LINES = 500


def module_files() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name, for its `__init__.py`)."""
    modules = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


MODULES = module_files()


def imported_modules(name: str, path: Path) -> set[str]:
    """The package modules that module `name` (at `path`) imports anywhere in its source, resolved to module names:
    `from .x import f` → `<package>.x`; `from . import x` → `<package>.x`; `import trl_tidpo.x.y` → `trl_tidpo.x.y`."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "trl_tidpo")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            if base.split(".")[0] != "trl_tidpo":
                continue
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return found


def import_graph() -> dict[str, set[str]]:
    return {name: {target for target in imported_modules(name, path) if target != name} for name, path in MODULES.items()}


def layer(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in LAYERS else None


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each a cycle or a knot of cycles."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


# -------------------------------------------------------------------------------------------- the graph reader itself


def test_graph_reader_sees_relative_absolute_and_function_level_imports(tmp_path):
    source = tmp_path / "reader.py"
    source.write_text(
        "import os\nfrom .errors import CLIError\nfrom . import loading\nimport trl_tidpo.ops.prior\n"
        "def f():\n    from ..trainer.tidpo_config import TIDPOConfig\n    from trl_tidpo.modeling import anchors\n"
    )
    assert imported_modules("trl_tidpo.tools.reader", source) == {
        "trl_tidpo.tools.errors", "trl_tidpo.tools.loading", "trl_tidpo.ops.prior", "trl_tidpo.trainer.tidpo_config",
        "trl_tidpo.modeling.anchors",
    }  # fmt: skip


def test_cycle_finder_finds_a_three_module_cycle_and_no_false_one():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d"}}
    assert cycles(graph) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []


# -------------------------------------------------------------------------------------------- the rules


def test_imports_only_go_downward_across_layers():
    rank = {name: i for i, name in enumerate(LAYERS)}
    upward = [
        f"{source} imports {target}"
        for source, targets in import_graph().items()
        for target in sorted(targets)
        if layer(source) and layer(target) and rank[layer(target)] > rank[layer(source)]
    ]
    assert upward == [], "imports go ops -> modeling -> trainer -> tools, never back:\n" + "\n".join(upward)


def test_no_import_cycle_in_the_package():
    found = cycles(import_graph())
    assert found == [], "import cycles (each list imports itself around):\n" + "\n".join(map(str, found))


@pytest.mark.parametrize("name", sorted(MODULES), ids=sorted(MODULES))
def test_module_length(name):
    limit = TRAINER_MAX_LINES if name == TRAINER_MODULE else MODULE_MAX_LINES
    lines = len(MODULES[name].read_text(encoding="utf-8").splitlines())
    assert lines <= limit, f"{MODULES[name]} has {lines} lines (the ceiling is {limit}): move a job to its own module"


def test_top_level_help_imports_no_torch():
    """`trl-tidpo --help` (the console entry point's `main`), in a fresh interpreter, answers at once: no torch, and
    none of the libraries that import it."""
    code = (
        "import sys\nfrom trl_tidpo.tools.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "print(sorted(m for m in ('torch', 'trl', 'transformers', 'datasets') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: trl-tidpo" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "[]"
