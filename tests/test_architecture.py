"""The package's map (docs/architecture.md) holds: rooms by concern, imports only downward.

Reads the source, imports nothing: a new import that points up a floor, a function-level
import without a comment saying why, or a new module at the top of trainer/ fails here.
"""

import ast
import pathlib
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = ROOT / "trainer"
# Lowest first; a module may import its own floor and the floors below it. The ground is
# TensorFlow-free (compat is the one module of it that imports TensorFlow, for everyone).
FLOORS = [
    ("ground", ["trainer", "trainer.errors", "trainer.compat", "trainer.config",
                "trainer.registry", "trainer.models"]),
    ("runtime", ["trainer.runtime"]),
    ("data", ["trainer.data"]),
    ("core", ["trainer.core"]),
    ("outputs", ["trainer.outputs"]),
    ("loop", ["trainer.loop"]),
    ("tools", ["trainer.tools"]),
    ("job", ["trainer.job"]),
    ("cli", ["trainer.cli", "trainer.launch"]),
]


def _module(path: pathlib.Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name[: -len(".__init__")] if name.endswith(".__init__") else name


def _floor(module: str) -> int:
    best = None
    for index, (_, prefixes) in enumerate(FLOORS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (
                    best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    assert best is not None, f"{module} is on no floor of FLOORS"
    return best[0]


def _imports(path: pathlib.Path):
    """(line, imported trainer module, inside a function) for each import in ``path``."""
    tree = ast.parse(path.read_text())
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside.update(id(n) for n in ast.walk(node) if n is not node)
    package = _module(path) if path.name == "__init__.py" else _module(path).rpartition(".")[0]
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names]
        for name in names:
            yield node.lineno, name, id(node) in inside


def _resolve(name: str, modules) -> str:
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name


MODULES = {_module(p): p for p in PACKAGE.rglob("*.py")}


def test_imports_only_point_down():
    upward = []
    for module, path in MODULES.items():
        for line, name, _ in _imports(path):
            target = _resolve(name, MODULES)
            if not target or target == "trainer" or module.startswith(target + "."):
                continue  # Not ours, the lazy public package, or a module's own package.
            if _floor(target) > _floor(module):
                upward.append(f"{path.relative_to(ROOT)}:{line} imports {target} "
                              f"({FLOORS[_floor(target)][0]} is above {FLOORS[_floor(module)][0]})")
    assert not upward, "\n".join(upward)


def test_function_level_imports_say_why():
    bare = []
    for module, path in MODULES.items():
        lines = path.read_text().split("\n")
        for line, _, in_function in _imports(path):
            if not in_function:
                continue
            here, above = lines[line - 1], lines[line - 2].strip()
            if "#" not in here and not above.startswith(("#", "from ", "import ")):
                bare.append(f"{path.relative_to(ROOT)}:{line}: {here.strip()}")
    assert not bare, "function-level imports without a comment saying why:\n" + "\n".join(bare)


def test_few_modules_at_the_top_and_every_room_says_what_it_holds():
    top = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert len(top) <= 8, top
    for init in PACKAGE.rglob("__init__.py"):
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} has no docstring"


def test_no_import_circles():
    tool = ROOT.parent / "shared" / "tools" / "import_circles.py"
    if not tool.is_file():
        pytest.skip("../shared/tools/import_circles.py is not beside this checkout")
    result = subprocess.run([sys.executable, str(tool)], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout


def test_public_api_resolves_and_data_is_a_subpackage():
    code = ("import trainer, sys; assert 'tensorflow' not in sys.modules; "
            "names = [getattr(trainer, n) for n in trainer.__all__]; "
            "print(trainer.data.from_arrays.__module__, len(names))")
    result = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True,
                            text=True, timeout=120, env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["trainer.data", str(len(__import__("trainer").__all__))]
