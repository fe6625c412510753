"""The package's layers run one way: faces -> tools -> engine -> base, with no import cycle, counting the
imports inside functions. docs/architecture.md describes the same map.

Read with `ast` from the source (nothing is imported), so a bad arrow fails here before it can hide behind
a function-local import."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("trainer", "networks")

BASE, ENGINE, TOOLS, FACES = 0, 1, 2, 3
LAYER_NAMES = {BASE: "base", ENGINE: "engine", TOOLS: "tools", FACES: "faces"}
# Most specific first: a file takes the layer of the first prefix it starts with.
LAYERS = (
    ("trainer/models/families.py", BASE), ("trainer/models/tokenizer.py", BASE),
    ("trainer/config/", BASE), ("trainer/errors.py", BASE), ("trainer/files.py", BASE),
    ("trainer/interrupts.py", BASE), ("trainer/paths.py", BASE), ("trainer/presets.py", BASE), ("trainer/demo.py", BASE),
    ("trainer/__init__.py", BASE),
    ("trainer/data/", ENGINE), ("trainer/models/", ENGINE), ("trainer/network/", ENGINE),
    ("trainer/train/", ENGINE), ("networks/", ENGINE),
    ("trainer/tools/", TOOLS),
    ("trainer/cli.py", FACES), ("trainer/console.py", FACES), ("trainer/__main__.py", FACES),
    ("trainer/gui/", FACES),
)
LAZY_MARK = "lazy:"  # the one-line reason a function-local import of our own modules needs


def layer_of(path: str) -> int:
    for prefix, layer in LAYERS:
        if path == prefix or (prefix.endswith("/") and path.startswith(prefix)):
            return layer
    raise AssertionError(f"{path} is in no layer: add it to LAYERS in tests/test_layers.py and to "
                         "docs/architecture.md")


def module_files(root: Path = ROOT) -> dict[str, str]:
    """Dotted module name -> repo-relative path, for every .py file of our packages."""
    found = {}
    for package in PACKAGES:
        for file in sorted((root / package).rglob("*.py")):
            rel = file.relative_to(root).as_posix()
            name = rel[:-3].replace("/", ".")
            found[name.removesuffix(".__init__")] = rel
    return found


def _targets(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, modules: dict) -> set[str]:
    if isinstance(node, ast.Import):
        return {modules[a.name] for a in node.names if a.name in modules}
    base = node.module or ""
    if node.level:
        parts = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
        base = ".".join(parts + ([node.module] if node.module else []))
    found = set()
    for alias in node.names:
        if f"{base}.{alias.name}" in modules:
            found.add(modules[f"{base}.{alias.name}"])
        elif base in modules:
            found.add(modules[base])
    return found


def import_arrows(root: Path = ROOT) -> list[tuple[str, str, int, bool, str]]:
    """(from file, to file, line, inside a function, the import's line and the one above) for every import
    of our own modules, module-level or not."""
    modules = module_files(root)
    arrows = []
    for module, rel in modules.items():
        source = (root / rel).read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source, filename=rel)
        local = {id(n) for fn in ast.walk(tree) if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom))}
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                context = "\n".join(lines[max(0, node.lineno - 2):node.end_lineno])
                for target in _targets(node, module, rel.endswith("__init__.py"), modules):
                    if target != rel:
                        arrows.append((rel, target, node.lineno, id(node) in local, context))
    return arrows


def forbidden_arrows(arrows) -> list[str]:
    bad = []
    for source, target, line, _, _ in arrows:
        if layer_of(target) > layer_of(source):
            bad.append(f"{source}:{line} ({LAYER_NAMES[layer_of(source)]}) imports {target} "
                       f"({LAYER_NAMES[layer_of(target)]})")
        elif target == "trainer/cli.py" and source != "trainer/__main__.py":
            bad.append(f"{source}:{line} imports trainer/cli.py: nothing but __main__ may (use trainer.console)")
    return bad


def unexplained_local_imports(arrows) -> list[str]:
    return [f"{source}:{line} imports {target} inside a function without a '# {LAZY_MARK} <reason>' comment"
            for source, target, line, local, context in arrows if local and LAZY_MARK not in context]


def cycles(arrows) -> list[list[str]]:
    """Strongly connected groups of more than one file (Tarjan's algorithm)."""
    graph: dict[str, set[str]] = {}
    for source, target, *_ in arrows:
        graph.setdefault(source, set()).add(target)
        graph.setdefault(target, set())
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return groups


def test_every_file_has_a_layer():
    for rel in module_files().values():
        layer_of(rel)


def test_imports_run_from_faces_to_tools_to_engine_to_base():
    assert forbidden_arrows(import_arrows()) == []


def test_no_import_cycle_counting_imports_inside_functions():
    assert cycles(import_arrows()) == []


def test_function_local_imports_of_our_modules_say_why():
    assert unexplained_local_imports(import_arrows()) == []


def write_package(root: Path, files: dict[str, str]) -> Path:
    for rel, text in {"trainer/__init__.py": "", "networks/__init__.py": "", **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text, encoding="utf-8")
    return root


@pytest.mark.parametrize("bad, finds", [
    ({"trainer/config/args.py": "from trainer.train.optim import build_optimizer\n",
      "trainer/train/optim.py": "build_optimizer = 1\n"}, "forbidden"),
    ({"trainer/train/loop.py": "def f():\n    from trainer.train import build\n",
      "trainer/train/build.py": "from trainer.train.loop import f\n"}, "cycle"),
    ({"trainer/train/run.py": "def f():\n    from trainer.train.loop import train\n",
      "trainer/train/loop.py": "train = 1\n"}, "unexplained"),
    ({"trainer/tools/bench.py": "from trainer.cli import main\n", "trainer/cli.py": "main = 1\n"}, "forbidden"),
])
def test_the_checks_catch_a_bad_import(tmp_path, bad, finds):
    root = write_package(tmp_path, bad)
    arrows = import_arrows(root)
    found = {"forbidden": forbidden_arrows(arrows), "cycle": cycles(arrows),
             "unexplained": unexplained_local_imports(arrows)}
    assert found[finds], f"the {finds} check missed {bad}"
    explained = write_package(tmp_path / "ok", {"trainer/train/run.py": (
        "def f():\n    # lazy: the command starts before torch is imported\n    from trainer.train.loop import train\n"),
        "trainer/train/loop.py": "train = 1\n"})
    assert unexplained_local_imports(import_arrows(explained)) == []
