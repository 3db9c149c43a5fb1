"""The layers of DESIGN.md hold in the import graph (static `import` statements of src/posttrain)."""

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


def test_the_graph_is_checked_at_all():
    # guards against a broken walk that would make the tests above vacuous
    found = modules()
    assert len(found) > 50
    assert "posttrain.algos.inputs" in found["posttrain/algos/advantages.py"]
    assert any(name.startswith("posttrain.recipes") for name in found["posttrain/stages.py"]) is False
