"""The package layout is the architecture (docs/architecture.md): every import points down a wing, no two modules
import each other, and only the command line parses flags.

Reads every module under ``finesteer/`` with `ast` (nothing is imported or run), so it also checks another checkout:
``FINESTEER_ARCH_ROOT=/path/to/checkout pytest tests/test_architecture.py``.
"""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

ROOT = Path(os.environ.get("FINESTEER_ARCH_ROOT", Path(__file__).resolve().parents[1]))
PACKAGE = "finesteer"

# Wings (folders under finesteer/; `top`: the modules directly in it), bottom to top, with the wings each may import (besides itself, finesteer_kernels and outside packages).
# serving/ (the vLLM plugin) sits beside patching/; interop/ reads the layer finder in patching/.
MAY_IMPORT = {
    "top": set(),
    "patching": {"top"},
    "serving": {"top", "patching"},
    "interop": {"top", "patching"},
    "fitting": {"top", "patching", "interop"},
    "studies": {"top", "patching", "interop", "fitting"},
    "cli": {"top", "patching", "serving", "interop", "fitting", "studies"},
}
NO_ARGPARSE = ("top", "patching", "serving", "interop", "fitting", "studies")  # flags are parsed in cli/ only


def module_files(root: Path = ROOT) -> dict:
    """``{dotted module name: path}`` of every module under ``root/finesteer``."""
    out = {}
    for path in sorted((root / PACKAGE).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def wing_of(module: str):
    """The wing a module belongs to: its folder under ``finesteer/``, ``top`` for the modules directly in it, None
    for a folder that is no wing (a new folder must be given a place in `MAY_IMPORT`)."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in MAY_IMPORT:
        return parts[1]
    return "top" if len(parts) <= 2 else None


def imports_of(module: str, path: Path, known: dict) -> list:
    """``[(imported module, line)]`` of every import in the file (function-level ones too), relative imports resolved
    and ``from package import submodule`` counted as an import of the submodule."""
    is_package = path.name == "__init__.py"
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((sub if sub in known else target, node.lineno))
    return found


def import_graph(root: Path = ROOT) -> dict:
    """``{module: {imported module: first line}}`` for every module under ``root/finesteer``, all imports kept."""
    known = module_files(root)
    graph = {}
    for module, path in known.items():
        edges = {}
        for target, line in imports_of(module, path, known):
            edges.setdefault(target, line)
        graph[module] = edges
    return graph


def _internal(target: str) -> bool:
    return target == PACKAGE or target.startswith(PACKAGE + ".")


def upward_imports(graph: dict) -> list:
    problems = []
    for module, edges in sorted(graph.items()):
        wing = wing_of(module)
        if wing is None:
            problems.append(f"{module}: in no wing (folders: {', '.join(w for w in MAY_IMPORT if w != 'top')})")
            continue
        for target, line in sorted(edges.items()):
            if not _internal(target):
                continue
            other = wing_of(target)
            if other is not None and other != wing and other not in MAY_IMPORT[wing]:
                problems.append(f"{module} (wing {wing}) imports {target} (wing {other}) at line {line}")
    return problems


def cycles(graph: dict) -> list:
    """Strongly connected groups of more than one module (Tarjan), each as a sorted list."""
    internal = {m: [t for t in edges if t in graph and t != m] for m, edges in graph.items()}
    index, low, on_stack, stack, groups = {}, {}, set(), [], []

    def visit(node):
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in internal[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                group.append(top)
                if top == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(internal):
        if node not in index:
            visit(node)
    return groups


def cycle_problems(graph: dict) -> list:
    problems = []
    for group in cycles(graph):
        pairs = [(a, b) for a in group for b in group if a < b and b in graph[a] and a in graph[b]]
        problems += [f"{a} and {b} import each other (lines {graph[a][b]} and {graph[b][a]})" for a, b in pairs]
        problems.append("import cycle: " + " <-> ".join(group))
    return problems


def argparse_problems(graph: dict) -> list:
    return [f"{module} (wing {wing_of(module)}) imports argparse at line {edges['argparse']}"
            for module, edges in sorted(graph.items()) if "argparse" in edges and wing_of(module) in NO_ARGPARSE]


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_wings_hold_every_module(graph):
    assert len(graph) > 20  # the root points at a checkout
    assert not upward_imports(graph), "imports that point up (or sideways) a wing:\n" + "\n".join(upward_imports(graph))


def test_no_two_modules_import_each_other(graph):
    problems = cycle_problems(graph)
    assert not problems, "\n".join(problems)


def test_only_the_command_line_parses_flags(graph):
    problems = argparse_problems(graph)
    assert not problems, "\n".join(problems)


def test_the_checks_catch_what_they_should():
    """The rules on a made-up graph: an upward import, a cycle of two and of three, argparse in fitting."""
    made_up = {
        "finesteer": {},
        "finesteer.steerer": {"finesteer.fitting.fit": 3},
        "finesteer.fitting.fit": {"finesteer.fitting.gates": 1, "argparse": 2},
        "finesteer.fitting.gates": {"finesteer.fitting.fit": 4},
        "finesteer.studies.a": {"finesteer.studies.b": 1},
        "finesteer.studies.b": {"finesteer.studies.c": 1},
        "finesteer.studies.c": {"finesteer.studies.a": 1, "finesteer.cli.main": 9},
        "finesteer.cli.main": {"finesteer.studies.a": 1, "finesteer.serving.plugin": 2},
        "finesteer.serving.plugin": {"finesteer.patching.patch": 1, "finesteer.interop.interchange": 5},
        "finesteer.patching.patch": {},
        "finesteer.interop.interchange": {"finesteer.patching.patch": 1},
        "finesteer.stray.module": {},
    }
    assert upward_imports(made_up) == [
        "finesteer.serving.plugin (wing serving) imports finesteer.interop.interchange (wing interop) at line 5",
        "finesteer.steerer (wing top) imports finesteer.fitting.fit (wing fitting) at line 3",
        "finesteer.stray.module: in no wing (folders: patching, serving, interop, fitting, studies, cli)",
        "finesteer.studies.c (wing studies) imports finesteer.cli.main (wing cli) at line 9",
    ]
    problems = cycle_problems(made_up)
    assert "finesteer.fitting.fit and finesteer.fitting.gates import each other (lines 1 and 4)" in problems
    assert any(p.startswith("import cycle: ") and "finesteer.studies.b" in p and "finesteer.cli.main" in p
               for p in problems)
    assert argparse_problems(made_up) == ["finesteer.fitting.fit (wing fitting) imports argparse at line 2"]


def test_relative_imports_resolve(tmp_path):
    (tmp_path / "finesteer" / "fitting").mkdir(parents=True)
    (tmp_path / "finesteer" / "__init__.py").write_text("from .steerer import Steerer\n")
    (tmp_path / "finesteer" / "steerer.py").write_text("")
    (tmp_path / "finesteer" / "fitting" / "__init__.py").write_text("")
    (tmp_path / "finesteer" / "fitting" / "data.py").write_text("")
    (tmp_path / "finesteer" / "fitting" / "fit.py").write_text(
        "from ..steerer import Steerer\nfrom . import data as d\n\ndef f():\n    from finesteer.fitting.data import x\n")
    graph = import_graph(tmp_path)
    assert graph["finesteer"] == {"finesteer.steerer": 1}
    assert graph["finesteer.fitting.fit"] == {"finesteer.steerer": 1, "finesteer.fitting.data": 2}
