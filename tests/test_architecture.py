"""The package's shape (docs/architecture.md): layers that import only downwards, no import
circle, short modules and functions. Read from the source with ``ast``, imports inside
functions included."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mil"

# module (or package prefix) -> layer; a module may import its own layer and those below
LAYERS = {
    "mil.errors": 0,
    "mil.io": 0,
    "mil.registry": 0,
    "mil.schema": 1,
    "mil.reporting": 1,
    "mil.data": 2,
    "mil.losses": 2,
    "mil.metrics": 2,
    "mil.splits": 3,
    "mil.models": 3,
    "mil.plots": 3,
    "mil.tasks": 4,
    "mil.config": 5,
    "mil.results": 6,
    "mil.explain": 7,
    "mil.train.loop": 7,
    "mil.train.diagnostics": 7,
    "mil.train.optim": 7,
    "mil.train.sampling": 7,
    "mil.train.objective": 7,
    "mil.train.closed_form": 7,
    "mil.train.distributed": 7,
    "mil.train.report": 7,
    "mil.train.external_report": 7,
    "mil.train.summary": 8,
    "mil.train.experiment": 9,
    "mil.train.inference": 9,
    "mil.train.runner": 9,
    "mil.train.scoring": 9,
    "mil.train.ensemble": 9,
    "mil.train.selection": 9,
    "mil.train.members": 9,
    "mil.train.replicas": 9,
    "mil.train.refit": 9,
    "mil.train.external_checks": 9,
    "mil.train.gaps": 9,
    "mil.train.search": 9,
    "mil.train": 9,
    "mil.run": 10,
    "mil.compare": 10,
    "mil.check": 10,
    "mil.demo": 10,
    "mil.evaluate": 10,
    "mil.generalization": 10,
    "mil.cli": 11,
    "mil.cli_review": 11,
    "mil.cli_cohorts": 11,
    "mil.__main__": 11,
    "mil": 11,
}
#: 450, not 400: the formatter's output of the larger modules (ruff format, no `# fmt: skip`)
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80
LONG_ALLOWED = {"mil.cli.build_parser"}  # the argument-parser table


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len)
    return LAYERS[best]


def modules() -> dict[str, ast.Module]:
    return {module_name(p): ast.parse(p.read_text()) for p in sorted(ROOT.rglob("*.py"))}


def imports(tree: ast.Module) -> set[str]:
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "mil":
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "mil"}
    return out


#: packages all of whose modules share the package's layer; a module anywhere else (``train/``
#: mixes layers 7 to 9) must be listed in LAYERS by its own name
ONE_LAYER_PACKAGES = (
    "mil.reporting",
    "mil.data",
    "mil.losses",
    "mil.metrics",
    "mil.splits",
    "mil.models",
    "mil.tasks",
    "mil.results",
    "mil.explain",
)


def listed(name: str) -> bool:
    """Whether ``name`` has a layer by its own entry or by a one-layer package's."""
    return name in LAYERS or any(name.startswith(p + ".") for p in ONE_LAYER_PACKAGES)


def test_every_module_has_a_layer():
    unlisted = [name for name in modules() if not listed(name)]
    assert not unlisted, f"modules without a layer in LAYERS (docs/architecture.md): {unlisted}"


def test_an_unlisted_module_is_caught():
    assert not listed("mil.train.new_module") and not listed("mil.new_module")
    assert listed("mil.data.new_reader") and listed("mil.train.runner")


def test_imports_go_down_the_layers_only():
    upward = []
    for name, tree in modules().items():
        for target in imports(tree):
            if target != name and layer(target) > layer(name):
                upward.append(
                    f"{name} (layer {layer(name)}) imports {target} (layer {layer(target)})"
                )
    assert not upward, "\n".join(upward)


def test_no_import_circle():
    graph = {name: {t for t in imports(tree) if t != name} for name, tree in modules().items()}
    # a package's __init__ importing its own submodules is how a package is built, not a circle
    for name in graph:
        graph[name] = {t for t in graph[name] if not t.startswith(name + ".")}
    seen: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        seen[node] = 1
        for nxt in graph.get(node, ()):
            if nxt not in graph:
                continue
            if seen.get(nxt) == 1:
                pytest.fail("import circle: " + " -> ".join([*path[path.index(nxt) :], nxt]))
            if nxt not in seen:
                visit(nxt, [*path, nxt])
        seen[node] = 2

    for name in graph:
        if name not in seen:
            visit(name, [name])


def test_modules_and_functions_are_short():
    long = []
    for path in sorted(ROOT.rglob("*.py")):
        name = module_name(path)
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            long.append(f"{name}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in LONG_ALLOWED:
                    long.append(f"{name}.{node.name}: {n} lines")
    assert not long, "\n".join(long)


def train_imports(tree: ast.Module) -> list[str]:
    """The ``mil.train`` modules that ``tree`` imports, at its top or inside a function."""
    return sorted(t for t in imports(tree) if t == "mil.train" or t.startswith("mil.train."))


def test_explain_imports_nothing_of_train():
    """Heatmaps, review lists and faithfulness curves know no training loop: a fold's model is
    scored by mil.train.scoring, which calls mil.explain, never the reverse."""
    found = {
        name: train_imports(tree)
        for name, tree in modules().items()
        if name.startswith("mil.explain") and train_imports(tree)
    }
    assert not found, f"mil/explain/ modules importing mil.train: {found}"


def test_the_explain_check_catches_an_import_inside_a_function():
    tree = ast.parse("def predict():\n    from mil.train.loop import forward_bags\n")
    assert train_imports(tree) == ["mil.train.loop"]
    assert train_imports(ast.parse("import mil.train\n")) == ["mil.train"]
    assert not train_imports(ast.parse("from mil.data.batch import Bag\n"))


def test_the_layer_test_catches_an_upward_import(tmp_path):
    """The checks above can fail: a data module importing the runner is caught."""
    tree = ast.parse("from mil.train.runner import run_cv\n")
    assert any(layer(t) > layer("mil.data.cohort") for t in imports(tree))


def test_run_cv_leaves_the_callers_torch_state_as_it_was(tmp_path):
    """A notebook that calls run_cv keeps its random stream and thread count."""
    import torch

    from mil.config import config_from_dict
    from mil.train.runner import run_cv
    from tests.conftest import small_config

    raw = small_config(tmp_path, epochs=1, threads=2)
    threads = torch.get_num_threads()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_cv(
        config_from_dict(raw),
        tmp_path / "run",
        folds=[0],
        progress=False,
        log=lambda *a: None,
        n_boot=10,
    )
    assert torch.equal(torch.rand(3), expected)
    assert torch.get_num_threads() == threads


def task_switches(tree: ast.Module, task_names: set[str]) -> list[str]:
    """Where code outside mil/tasks/ asks which task it serves: any use of ``target_kind``, and
    any comparison of a registered task's name with something that names a task (``task_type
    == "survival"``, ``cfg.task.type != "classification"``, ``task.name in (...)``)."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "target_kind":
            found.append(f"line {node.lineno}: .target_kind")
        elif isinstance(node, ast.Name) and node.id == "target_kind":
            found.append(f"line {node.lineno}: target_kind")
        elif isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            names = {
                c.value
                for s in sides
                for c in ast.walk(s)
                if isinstance(c, ast.Constant) and isinstance(c.value, str)
            }
            if names & task_names and any("task" in ast.unparse(s).lower() for s in sides):
                found.append(f"line {node.lineno}: {ast.unparse(node)}")
    return found


def test_no_task_switch_outside_the_tasks():
    """A task owns its targets, strata, linear fit and score reading: no module outside
    ``mil/tasks/`` tests which task it serves (docs/architecture.md)."""
    from mil.tasks import available

    names = set(available())
    found = [
        f"{name}: {where}"
        for name, tree in modules().items()
        if not (name == "mil.tasks" or name.startswith("mil.tasks."))
        for where in task_switches(tree, names)
    ]
    assert not found, "task switches outside mil/tasks/:\n" + "\n".join(found)


def test_the_task_switch_check_catches_one():
    names = {"classification", "survival"}
    for code in (
        'if cfg.task.type == "survival": pass',
        'x = task_type != "classification"',
        "k = cohort.target_kind",
        'if task.name in ("survival", "x"): pass',
    ):
        assert task_switches(ast.parse(code), names), code
    assert not task_switches(ast.parse('if kind == "classification": pass'), names)
