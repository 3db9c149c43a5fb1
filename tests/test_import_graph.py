"""The layers of DESIGN.md hold in the import graph (static `import` statements of src/posttrain), and the graph has
no cycle, between modules or between packages."""

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "posttrain"
# What the pure layers may use besides themselves and the standard library: the tensor / numeric libraries, the
# error types, the registry and pydantic (hyperparameter declarations), nothing that trains, samples or logs.
PURE_ALLOWED = {
    "algos": ("torch", "pydantic", "posttrain.algos", "posttrain.errors", "posttrain.registry"),
    "science": ("numpy", "scipy", "posttrain.science", "posttrain.errors"),
}
THIRD_PARTY_FORBIDDEN_IN_PURE = ("transformers", "rich", "typer", "ray", "vllm", "matplotlib")


def imports_of(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
    return names


def modules() -> dict[str, set[str]]:
    return {str(p.relative_to(SRC.parent)): imports_of(p) for p in SRC.rglob("*.py")}


def test_pure_layers_import_nothing_above_them():
    import sys

    stdlib = sys.stdlib_module_names
    bad = []
    for file, names in modules().items():
        layer = file.split("/")[1]
        if layer not in PURE_ALLOWED:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in stdlib or top == "__future__":
                continue
            if not name.startswith(PURE_ALLOWED[layer]) or top in THIRD_PARTY_FORBIDDEN_IN_PURE:
                bad.append((file, name))
    assert bad == []


def test_nothing_imports_the_recipes_but_the_runner_and_the_cli():
    # posttrain/stages.py finds the built-in stages by listing the package (importlib), the plugin mechanism by
    # which the top layer registers itself; no module imports a recipe by name except the CLI and the runner.
    allowed = {"posttrain/cli.py", "posttrain/runner.py"}
    bad = [(file, name) for file, names in modules().items() for name in names
           if name.startswith("posttrain.recipes") and file not in allowed and not file.startswith("posttrain/recipes/")]
    assert bad == []


def test_only_dist_may_import_ray():
    bad = [(file, name) for file, names in modules().items() for name in names
           if name.split(".")[0] == "ray" and not file.startswith("posttrain/dist/")]
    assert bad == []


# ----- cycles ------------------------------------------------------------------------------------------------
# What runs at import: the module's own statements (inside if/try/with/class bodies too), not function bodies and
# not `if TYPE_CHECKING:` blocks. An import inside a function (the registries' lazy built-ins) is not an edge.


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in SRC.rglob("*.py")}


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_time_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(statements: list[ast.stmt]) -> None:
        for node in statements:
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            if isinstance(node, ast.Import | ast.ImportFrom):
                found.append(node)
            elif isinstance(node, ast.If) and _type_checking(node.test):
                visit(node.orelse)
            else:  # a statement holding statements: if, try, with, for, while, class, match
                for block in ("body", "orelse", "finalbody"):
                    inner = getattr(node, block, None)
                    if isinstance(inner, list):
                        visit(inner)
                for clause in (*getattr(node, "handlers", ()), *getattr(node, "cases", ())):
                    visit(clause.body)

    visit(tree.body)
    return found


def _resolve(name: str) -> str | None:
    """The posttrain module an imported name lives in (`posttrain.a.b.attr` -> `posttrain.a.b`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def import_graph() -> dict[str, dict[str, str]]:
    """{module: {posttrain module it imports at import time: "file:line" of the import}}."""
    graph: dict[str, dict[str, str]] = {}
    for name, path in MODULES.items():
        edges: dict[str, str] = {}
        for node in import_time_imports(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the module's package, level - 1 packages up
                    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                    base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
                targets = [f"{base}.{a.name}" for a in node.names]  # a submodule, or an attribute of base
            for target in targets:
                module = _resolve(target)
                if module and module != name:
                    edges.setdefault(module, f"{path.relative_to(SRC.parent)}:{node.lineno}")
        graph[name] = edges
    return graph


def package_of(module: str) -> str:
    """posttrain.data.samplers -> posttrain.data; a top-level module (posttrain.cli) is its own."""
    return ".".join(module.split(".")[:2])


def package_graph() -> dict[str, dict[str, str]]:
    graph: dict[str, dict[str, str]] = {}
    for module, edges in import_graph().items():
        out = graph.setdefault(package_of(module), {})
        for target, where in sorted(edges.items()):
            if package_of(target) != package_of(module):
                out.setdefault(package_of(target), where)
    return graph


def cycles(graph: dict[str, dict[str, str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (Tarjan), each as its edges "a -> b (file:line)"."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def connect(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, {}):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                members = set(component)
                found.append([f"{a} -> {b} ({graph[a][b]})" for a in sorted(members)
                              for b in sorted(graph.get(a, {})) if b in members])

    for v in sorted(graph):
        if v not in index:
            connect(v)
    return found


def test_no_import_cycle_between_modules():
    assert cycles(import_graph()) == []


def test_no_import_cycle_between_packages():
    # packages are the folders under posttrain/ (data, envs, train, ...) and its top-level modules (cli, runner, ...)
    assert cycles(package_graph()) == []


def test_the_cycle_check_sees_cycles_and_skips_what_does_not_run_at_import():
    assert cycles({"a": {"b": "a.py:1"}, "b": {"c": "b.py:1"}, "c": {"a": "c.py:1"}, "d": {"a": "d.py:1"}}) == [
        ["a -> b (a.py:1)", "b -> c (b.py:1)", "c -> a (c.py:1)"]]
    graph = import_graph()
    assert "posttrain.config.schema" in graph["posttrain.config.load"]  # from a module
    assert "posttrain.config.load" in graph["posttrain.config"]  # a package's __init__ importing its modules
    # train/protocol.py imports the Learner's types under `if TYPE_CHECKING:` only
    assert "posttrain.train.learner" not in graph["posttrain.train.protocol"]
    # config/schema.py imports the stages inside a validator only (a function body)
    assert "posttrain.stages" not in graph["posttrain.config.schema"]
    assert package_of("posttrain.data.samplers") == "posttrain.data" and package_of("posttrain.cli") == "posttrain.cli"


def test_ruff_lints_the_dist_package():
    # ruff's default exclude list skips every directory named "dist"; pyproject.toml anchors it to the root's
    import tomllib

    exclude = tomllib.loads((SRC.parents[1] / "pyproject.toml").read_text())["tool"]["ruff"]["exclude"]
    assert "dist" not in exclude and "./dist" in exclude


def test_the_graph_is_checked_at_all():
    # guards against a broken walk that would make the tests above vacuous
    found = modules()
    assert len(found) > 50
    assert "posttrain.algos.inputs" in found["posttrain/algos/advantages.py"]
    assert any(name.startswith("posttrain.recipes") for name in found["posttrain/stages.py"]) is False
