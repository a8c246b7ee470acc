"""The test suite's own layout (issue 24, point 4): tests/unit is fast and in-process, tests/e2e holds what runs real
commands, no test module imports another, and every test module sits in one of the two folders."""

from __future__ import annotations

import ast
import os

import pytest
from support import REPO_ROOT

TESTS = os.path.join(REPO_ROOT, "tests")
# what starts a process: the module, its calls, and the deepspeed launcher by name
PROCESS_MODULES = {"subprocess", "multiprocessing", "pty"}
LAUNCHERS = ("deepspeed", "torchrun", "srun", "sbatch")
PROCESS_CALLS = {"Popen", "system", "popen", "spawnv", "spawnl", "execv", "execl", "fork", "startfile"}


def python_files(folder: str = TESTS) -> list[str]:
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d not in ("__pycache__", ".pytest_cache")]
        found += [os.path.join(root, f) for f in files if f.endswith(".py")]
    return sorted(found)


def names_of_test_modules(files) -> set[str]:
    return {os.path.basename(f)[:-3] for f in files if os.path.basename(f).startswith("test_")} | {"conftest"}


def imported_tests(source: str, test_names: set[str]) -> list[str]:
    """The test modules (or conftest) that `source` imports, anywhere in it (inside functions too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names = (
            [a.name for a in node.names]
            if isinstance(node, ast.Import)
            else [node.module or ""]
            if isinstance(node, ast.ImportFrom)
            else []
        )
        found += [n for n in names if n.split(".")[0] in test_names]
    return found


def process_helpers(support_source: str) -> set[str]:
    """The functions of tests/support.py that start a process, directly or through each other."""
    tree = ast.parse(support_source)
    functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
    calls = {name: {x.id for x in ast.walk(fn) if isinstance(x, ast.Name)} for name, fn in functions.items()}
    named = {name for name, fn in functions.items() if any(isinstance(x, ast.Constant) and x.value in LAUNCHERS for x in ast.walk(fn))}
    starting = {name for name, used in calls.items() if used & PROCESS_MODULES} | named
    while True:
        more = {name for name, used in calls.items() if used & starting} - starting
        if not more:
            return starting
        starting |= more


def starts_processes(source: str, helpers: set[str]) -> list[str]:
    """Why `source` would start a process: an import of subprocess & co., Popen/os.system-style calls, the deepspeed
    launcher named as a command, or a tests/support.py helper that runs a command."""
    reasons = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            reasons += [f"imports {a.name}" for a in node.names if a.name.split(".")[0] in PROCESS_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = (node.module or "").split(".")[0]
            if module in PROCESS_MODULES:
                reasons.append(f"imports from {module}")
            if module == "support":
                reasons += [f"uses support.{a.name} (runs a command)" for a in node.names if a.name in helpers]
        elif isinstance(node, ast.Attribute) and node.attr in PROCESS_CALLS:
            reasons.append(f"calls .{node.attr}")
        elif isinstance(node, ast.Constant) and node.value in LAUNCHERS:
            reasons.append(f"names the {node.value!r} launcher")
    return reasons


def test_no_test_module_imports_another():
    files = python_files()
    names = names_of_test_modules(files)
    offenders = {os.path.relpath(f, REPO_ROOT): imported_tests(open(f).read(), names) for f in files}
    offenders = {f: found for f, found in offenders.items() if found}
    assert not offenders, f"test modules import other test modules (move shared code to tests/support.py or a conftest): {offenders}"


def test_nothing_under_tests_unit_starts_a_process():
    helpers = process_helpers(open(os.path.join(TESTS, "support.py")).read())
    assert {"run", "launcher", "deepspeed_recipe"} <= helpers  # the check below knows the helpers that run commands
    # tests/conftest.py's fixtures serve tests/unit too, so they may not start processes either
    files = python_files(os.path.join(TESTS, "unit")) + [os.path.join(TESTS, "conftest.py")]
    files.remove(os.path.abspath(__file__))  # this file names the launchers as data
    offenders = {os.path.relpath(f, REPO_ROOT): starts_processes(open(f).read(), helpers) for f in files}
    offenders = {f: why for f, why in offenders.items() if why}
    assert not offenders, f"tests/unit must stay in-process (move these to tests/e2e): {offenders}"


def test_every_test_module_is_in_unit_or_e2e_under_its_own_name():
    modules = [f for f in python_files() if os.path.basename(f).startswith("test_")]
    folders = {os.path.relpath(os.path.dirname(f), TESTS) for f in modules}
    assert folders == {"unit", "e2e"}, f"test modules outside tests/unit and tests/e2e: {sorted(folders - {'unit', 'e2e'})}"
    names = [os.path.basename(f) for f in modules]
    assert len(names) == len(set(names)), f"two test modules share a name (pytest's prepend import mode needs unique ones): {names}"


@pytest.mark.parametrize(
    "source, found",
    [
        ("from test_train_e2e import BIN\n", ["test_train_e2e"]),
        ("def f():\n    import test_recipes\n", ["test_recipes"]),
        ("from conftest import shared_data_path\n", ["conftest"]),
        ("from support import BIN\nimport torch\n", []),
    ],
)
def test_the_import_rule_sees_imports_anywhere(source, found):
    assert imported_tests(source, {"test_train_e2e", "test_recipes", "conftest"}) == found


@pytest.mark.parametrize(
    "source, fragment",
    [
        ("import subprocess\n", "imports subprocess"),
        ("def f():\n    from subprocess import run\n", "imports from subprocess"),
        ("import os\nos.system('ls')\n", "calls .system"),
        ("import psutil\npsutil.Popen(['ls'])\n", "calls .Popen"),
        ("cmd = [os.path.join(BIN, 'deepspeed'), '--num_gpus', '2']\n", "'deepspeed' launcher"),
        ("from support import run_log as run\n", "support.run_log"),
        ("from support import BIN, launcher\n", "support.launcher"),
    ],
)
def test_the_process_rule_sees_every_way_of_starting_one(source, fragment):
    helpers = process_helpers(open(os.path.join(TESTS, "support.py")).read())
    reasons = starts_processes(source, helpers)
    assert any(fragment in r for r in reasons), reasons
    assert starts_processes("import torch\nfrom support import BIN, tiny_teacher\nx = torch.ones(2)\n", helpers) == []
