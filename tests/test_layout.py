"""The shape of the package: what the method modules import, that every named option has one
list of allowed values behind both the checks and the code, that the wheel ships every config
group, and that the library example of docs/library.md runs as written."""

from __future__ import annotations

import ast
import importlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import distillrun_here

from distillrun import choices
from distillrun.core import models, train
from distillrun.errors import UserError
from distillrun.method import augment
from distillrun.method.ensemble import combine
from distillrun.stages import STAGES, config_name, module_name

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ["reproduce", "reproduce_specialists"]
# the library half of the package: no Hydra, no command line
LIBRARY = sorted(
    f"distillrun.{p.parent.name}.{p.stem}"
    for sub in ("method", "core")
    for p in (ROOT / "distillrun" / sub).glob("*.py")
    if p.stem != "__init__"
)


def test_the_method_modules_import_no_hydra_and_no_cli_code() -> None:
    assert "distillrun.method.losses" in LIBRARY and "distillrun.core.train" in LIBRARY
    modules = ", ".join(LIBRARY)
    code = (
        f"import sys, {modules}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'hydra' or m in "
        "('distillrun.cli', 'distillrun.config', 'distillrun.console') "
        "or m.startswith(('distillrun.stages.', 'distillrun.integrations.', "
        "'distillrun.tools.'))]\n"
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_distillrun_does_not_import_torch() -> None:
    code = "import sys, distillrun; print('torch' in sys.modules, distillrun.load_model.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "distillrun.core.models"]


def test_each_table_of_functions_has_exactly_the_allowed_names() -> None:
    assert tuple(train.OPTIMIZERS) == choices.OPTIMIZERS
    assert tuple(train.SCHEDULES) == choices.SCHEDULES
    assert tuple(train.AUTOCAST) == choices.PRECISIONS
    assert tuple(sorted(models.BUILDERS)) == choices.MODELS  # the names the configs choose
    assert tuple(sorted(augment.BUILDERS)) == choices.AUGMENTATIONS
    logits = torch.randn(3, 4, 5)
    for method in choices.ENSEMBLES:
        assert combine(logits, method).shape == (4, 5)
    with pytest.raises(ValueError, match="arithmetic or geometric"):
        combine(logits, "median")


def test_the_continuous_augmentations_are_those_without_a_count() -> None:
    """config.py (torch-free) reads CONTINUOUS_AUGMENTATIONS; the code asks `count`."""
    from distillrun.config import CONTINUOUS_AUGMENTATIONS

    shape, normalization = (1, 8, 8), {"normalize": "none"}
    settings = {"pixels": 1, "padding": 1, "flip": True, "border": "zeros", "alpha": 1.0}
    for name in choices.AUGMENTATIONS:
        built = augment.from_config({"name": name, **settings}, shape, normalization)
        continuous = built is not None and built.count is None
        assert continuous == (name in CONTINUOUS_AUGMENTATIONS), name


@pytest.mark.parametrize(
    ("key", "names"),
    [
        ("ensemble", choices.ENSEMBLES),
        ("optim.name", choices.OPTIMIZERS),
        ("optim.schedule", choices.SCHEDULES),
        ("model.name", choices.MODELS),
        ("train.precision", choices.PRECISIONS),
    ],
)
def test_the_config_checks_offer_the_same_names(key: str, names: tuple[str, ...]) -> None:
    from hydra import compose, initialize_config_module

    from distillrun.config import validate

    with initialize_config_module(config_module="distillrun.conf", version_base="1.3"):
        for name in names:
            # A model's other keys come with its config file (conf/model/<name>.yaml).
            choice = f"model={name}" if key == "model.name" else f"{key}={name}"
            validate("distill", compose(config_name="distill", overrides=[choice]))
        cfg = compose(config_name="distill", overrides=[f"{key}=nonsense"])
    with pytest.raises(UserError, match=f"{key}=nonsense: use {choices.one_of(names)}"):
        validate("distill", cfg)


def test_every_stage_has_its_module_and_its_primary_config() -> None:
    for stage in STAGES:
        assert hasattr(importlib.import_module(module_name(stage)), "main"), stage
        assert (ROOT / "conf" / f"{config_name(stage)}.yaml").is_file(), stage


def test_every_stage_has_its_config_checks() -> None:
    """In its own module (`check_config`), so that adding a stage touches no other file."""
    from distillrun.config import stage_checks

    for stage in STAGES:
        checks = stage_checks(stage)
        assert callable(checks) and checks.__module__ == module_name(stage), stage


def _string_literals_naming_stages(tree: ast.AST) -> list[tuple[int, list[str]]]:
    """Tuple, list, set and dict literals that name two or more stages."""
    found = []
    for node in ast.walk(tree):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if not isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) or items is None:
            continue
        names = [n.value for n in items if isinstance(n, ast.Constant) and n.value in STAGES]
        if len(names) >= 2:
            found.append((node.lineno, names))
    return found


def test_only_the_stage_table_lists_stages() -> None:
    """Adding a stage touches its module, its config and its record in STAGES, nothing else."""
    table = ROOT / "distillrun" / "stages" / "__init__.py"
    # The reproductions script a pipeline: they name the stages they run, in order.
    pipelines = {ROOT / "distillrun" / "tools" / f"{name}.py" for name in TOOLS}
    listed = [
        f"{path.relative_to(ROOT)}:{line} {names}"
        for path in sorted((ROOT / "distillrun").rglob("*.py"))
        if path != table and path not in pipelines
        for line, names in _string_literals_naming_stages(ast.parse(path.read_text()))
    ]
    assert not listed, listed
    assert _string_literals_naming_stages(ast.parse(table.read_text()))  # the check can see one


def _import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports, at module level or inside functions."""
    files = [p for d in ("distillrun", "hydra_plugins") for p in (ROOT / d).rglob("*.py")]

    def name(path: Path) -> str:
        parts = path.relative_to(ROOT).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    modules = {name(p): p for p in files}
    graph = {}
    for module, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name in modules}
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    full = f"{node.module}.{a.name}"
                    edges.add(full if full in modules else node.module)
        graph[module] = {e for e in edges if e in modules and e != module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    cycles, state = [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dep in sorted(graph[module]):
            if state.get(dep) == "open":
                cycles.append(path[path.index(dep) :] + [module, dep])
            elif dep not in state:
                visit(dep, [*path, module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return cycles


def test_the_import_graph_has_no_cycle() -> None:
    """Integrations (trackers, the search, its Hydra plugin) depend on the core, never the
    reverse, and no two modules import each other, even inside functions."""
    assert _cycles(_import_graph()) == []
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}})  # the check can see one


def test_library_errors_are_value_errors_and_paths_may_be_strings(tmp_path: Path) -> None:
    model = models.build_model({"name": "mlp", "hidden": [4]}, (3,), 2)
    path = tmp_path / "m.pt"
    torch.save(models.checkpoint(model, {"name": "mlp", "hidden": [4]}, (3,), 2), path)
    loaded = models.load_model(str(path))
    assert torch.equal(loaded(torch.ones(1, 3)), model.eval()(torch.ones(1, 3)))
    with pytest.raises(ValueError, match="missing file"):
        models.load_model(str(tmp_path / "nothing.pt"))


@pytest.mark.slow
def test_the_wheel_ships_every_config_group(built_wheel: Path) -> None:
    shipped = set(zipfile.ZipFile(built_wheel).namelist())
    configs = sorted((ROOT / "conf").rglob("*.yaml"))
    assert len(configs) > 20 and (ROOT / "conf" / "debug" / "tiny.yaml") in configs
    missing = [
        str(c) for c in configs if f"distillrun/conf/{c.relative_to(ROOT / 'conf')}" not in shipped
    ]
    assert not missing
    stages = {f"distillrun/stages/{config_name(s)}.py" for s in STAGES}
    assert stages <= shipped


@pytest.mark.slow
def test_the_docs_library_example_runs_as_written(tmp_path: Path) -> None:
    page = (ROOT / "docs/library.md").read_text()
    code = re.search(r"```python\n(.*?)```", page, re.S).group(1)
    distillrun_here(tmp_path, "train-teachers", "debug=tiny")
    distillrun_here(tmp_path, "distill", "debug=tiny")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["mine", "distill's"]
    mine = int(lines[0].split()[1])
    assert mine < 0.5 * 450  # digits' 450 test images: it learned, far above chance


MAX_BODY_LINES = 60  # a stage body reads top to bottom like a recipe; its steps are functions


def _function(tree: ast.Module, name: str) -> ast.FunctionDef:
    (found,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name]
    return found


def _stage_body(tree: ast.Module) -> ast.FunctionDef:
    """The function a stage module's Hydra main hands to run_stage."""
    (call,) = [
        n
        for n in ast.walk(_function(tree, "main"))
        if isinstance(n, ast.Call) and getattr(n.func, "id", None) == "run_stage"
    ]
    return _function(tree, call.args[2].id)


def test_stage_bodies_and_fit_are_short_and_say_what_they_do() -> None:
    """Each stage body (and core.train.fit) fits in 60 lines, counted by ast, and has a
    docstring saying what it does, consumes and writes."""
    functions = {"core.train.fit": _function(ast.parse(Path(train.__file__).read_text()), "fit")}
    for stage in STAGES:
        module = importlib.import_module(module_name(stage))
        body = _stage_body(ast.parse(Path(module.__file__).read_text()))
        functions[f"{stage}: {body.name}"] = body
    assert len(functions) == len(STAGES) + 1
    lines = {name: f.end_lineno - f.lineno + 1 for name, f in functions.items()}
    too_long = {name: n for name, n in lines.items() if n > MAX_BODY_LINES}
    assert not too_long, f"over {MAX_BODY_LINES} lines: {too_long}"
    undocumented = [name for name, f in functions.items() if not ast.get_docstring(f)]
    assert not undocumented, undocumented
