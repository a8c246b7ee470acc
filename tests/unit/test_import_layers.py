"""The import structure is the architecture: no import circles (imports inside functions count too), and no module
imports from a layer above its own job. Computed from the source with `ast`, nothing imported."""

from __future__ import annotations

import ast
import io
import os
import tokenize

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PACKAGES = ("kd_common", "data_prep", "distill", "launch")
# lowest first: a module may import from its own layer and the layers before it
LAYERS = (
    "kd_common",
    "data_prep",
    "distill.model_outputs",
    "distill.models",
    "distill.objective",
    "distill.config",
    "distill.data",
    "distill.checkpoints",
    "distill.teachers",
    "distill.train",
    "distill.cache",
    "distill.prune",
    "distill.tools",
    "distill.cli",
    "distill.__main__",
    "distill",
    "launch",
)


def modules() -> dict[str, str]:
    found = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    module = os.path.relpath(path, REPO)[:-3].replace(os.sep, ".")
                    found[module[: -len(".__init__")] if module.endswith(".__init__") else module] = path
    return found


def import_graph() -> dict[str, set[str]]:
    """module -> the first-party modules it imports, at module level or inside a function."""
    mods = modules()

    def resolve(name: str):
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                if target and target != module:
                    graph[module].add(target)
    return graph


def strongly_connected(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iteratively: the components of more than one module (the import circles)."""
    index, low, stack, on_stack, found, counter = {}, {}, [], set(), [], [0]
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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
    return found


def layer_of(module: str) -> int:
    best = max((layer for layer in LAYERS if module == layer or module.startswith(layer + ".")), key=len)
    return LAYERS.index(best)


def test_the_strongly_connected_components_finder_finds_a_circle():
    assert strongly_connected({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert strongly_connected({"a": {"b"}, "b": set()}) == []


def test_layers_order_the_jobs():
    assert (
        layer_of("distill.train.trainer") > layer_of("distill.models.build") > layer_of("data_prep.manifest") > layer_of("kd_common.errors")
    )
    assert layer_of("distill.tools.export") > layer_of("distill.train.engine") and layer_of("launch.slurm_env") == len(LAYERS) - 1


def test_no_import_circles():
    assert strongly_connected(import_graph()) == []


def test_no_module_imports_from_a_layer_above_its_own():
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in import_graph().items()
        for target in targets
        if layer_of(target) > layer_of(module)
    )
    assert upward == []


def imports_without_a_reason(source: str) -> list[int]:
    """Line numbers of imports inside a function with no comment on their first line or on a comment line right above
    (a comment line above a block of consecutive imports covers the block)."""
    commented, comment_only = set(), set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            commented.add(token.start[0])
            if not token.line[: token.start[1]].strip():
                comment_only.add(token.start[0])
    tree = ast.parse(source)
    inner = {
        node.lineno: node.end_lineno
        for function in ast.walk(tree)
        if isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef))
        for node in ast.walk(function)
        if isinstance(node, (ast.Import, ast.ImportFrom))
    }
    ends = {end: start for start, end in inner.items()}

    def has_reason(line: int) -> bool:
        if line in commented or line - 1 in comment_only:
            return True
        return line - 1 in ends and has_reason(ends[line - 1])  # the import above, in the same block, has one

    return sorted(line for line in inner if not has_reason(line))


def test_the_reason_finder_finds_an_import_without_a_reason():
    source = (
        "def f():\n"
        "    import json\n"  # 2: no reason
        "    import torch  # heavy: torch\n"
        "    # heavy: the block below\n"
        "    import deepspeed\n"
        "    from transformers import (\n"
        "        AutoConfig,\n"
        "    )\n"
        "\n"
        "    import numpy\n"  # 10: a blank line ends the block
        "import os\n"
    )
    assert imports_without_a_reason(source) == [2, 10]


def test_every_import_inside_a_function_says_why():
    """Imports inside functions are only for start-up cost (heavy third-party modules), and each says so."""
    missing = []
    for module, path in sorted(modules().items()):
        relative = os.path.relpath(path, REPO)
        source = open(path, encoding="utf-8").read()
        missing += [f"{relative}:{line}" for line in imports_without_a_reason(source)]
    assert missing == [], "import inside a function without a reason comment (move it to the top, or say what start-up it spares)"
