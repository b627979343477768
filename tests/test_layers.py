"""The folders of restorer/ are its layers (restorer/__init__.py: LAYERS, lowest first): every import,
lazy ones inside functions included, runs from a module to its own folder or to a lower layer, and
no modules import each other in a circle."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

from helpers import REPO
from restorer import LAYERS


def module_name(root: Path, path: Path) -> str:
    parts = path.relative_to(root).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(root: Path) -> dict[str, set[str]]:
    """Each module of root/restorer -> the restorer modules it imports (`from restorer.train import
    checks` imports restorer.train.checks; `from restorer.data import jpeg` the module jpeg)."""
    modules = {module_name(root, p): p for p in (root / "restorer").rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names if a.name.split(".")[0] == "restorer"}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").split(".")[0] == "restorer":
                found |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
        graph[name] = found - {name}
    return graph


def folder(module: str) -> str | None:
    """A module's folder under restorer/ (its layer's), or None for restorer/__init__ and __main__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else None


def layer_problems(root: Path) -> list[str]:
    rank = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    graph = imports(root)
    problems = []
    for module, targets in sorted(graph.items()):
        mine = folder(module)
        if mine is not None and mine not in rank:
            problems.append(f"{module}: folder {mine} is in no layer of restorer.LAYERS")
            continue
        for target in sorted(targets):
            theirs = folder(target)
            if mine is None or theirs == mine:
                continue
            if theirs is None or rank.get(theirs, len(rank)) >= rank[mine]:
                problems.append(f"{module} imports {target}: not a lower layer")
    return problems + [f"a circle: {' -> '.join(c)}" for c in cycles(graph)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One circle through each module that is on one (depth first, from the modules in order)."""
    found, state = [], {}  # state: 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circle = path[path.index(nxt):]
                first = circle.index(min(circle))  # said from its first module in order, wherever it was met
                found.append(circle[first:] + circle[:first] + [circle[first]])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def test_every_import_runs_down_the_layers_and_none_in_a_circle():
    assert layer_problems(REPO) == []
    graph = imports(REPO)
    assert sum(map(len, graph.values())) > 100  # (the walk found the imports: lazy ones included)
    assert "restorer.train.checks" in graph["restorer.train.loop"]  # `from restorer.train import checks`


def test_an_import_up_a_layer_beside_it_or_in_a_circle_is_found(tmp_path):
    shutil.copytree(REPO / "restorer", tmp_path / "restorer", ignore=shutil.ignore_patterns("__pycache__"))

    def add(module: str, line: str) -> None:
        path = tmp_path / "restorer" / module
        path.write_text(path.read_text() + f"\n\ndef _added():\n    {line}\n")

    add("data/stream.py", "from restorer.tools import runs")  # up, lazily
    add("models/common.py", "import restorer.data.jpeg")  # beside: data and models are one layer
    add("base/fileio.py", "from restorer.base.urls import mask_secrets")  # a circle in one folder:
    add("base/urls.py", "from restorer.base import fileio")  # fileio -> urls -> fileio
    assert layer_problems(tmp_path) == [
        "restorer.data.stream imports restorer.tools.runs: not a lower layer",
        "restorer.models.common imports restorer.data.jpeg: not a lower layer",
        "a circle: restorer.base.fileio -> restorer.base.urls -> restorer.base.fileio",
    ]


def test_no_function_is_over_60_lines_or_takes_over_8_parameters():
    """Small functions with few inputs: a longer one is split, more inputs become an option object."""
    found = []
    for path in sorted((REPO / "restorer").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                a = node.args
                params = [*a.posonlyargs, *a.args, *a.kwonlyargs, *filter(None, (a.vararg, a.kwarg))]
                params = [p for p in params if p.arg not in ("self", "cls")]
                lines = node.end_lineno - node.lineno + 1
                if lines > 60 or len(params) > 8:
                    found.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {lines} lines, {len(params)} parameters")
    assert found == []


def test_the_readmes_layout_shows_the_folders_there_are():
    readme = (REPO / "README.md").read_text()
    tree = readme[readme.index("## Layout"):readme.index("## Tests and benchmarks")]
    folders = sorted(p.name for p in (REPO / "restorer").iterdir() if (p / "__init__.py").is_file())
    data = sorted(p.name for p in (REPO / "restorer").iterdir()  # folders of files, no code: weights/
                  if p.is_dir() and not any(p.rglob("*.py")) and p.name != "__pycache__")
    shown = sorted(line.split()[0].rstrip("/") for line in tree.splitlines() if line.startswith("  ") and
                   line.split() and line.split()[0].endswith("/"))
    assert shown == sorted(folders + data) and sorted(name for layer in LAYERS for name in layer) == folders
