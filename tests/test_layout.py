"""The shape of the package: what the method modules import, that every named option has one
list of allowed values behind both the checks and the code, that the wheel ships every config
group, and that the library example of docs/library.md runs as written."""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import distillrun

from distillrun import choices, losses, models, train
from distillrun.ensemble import combine
from distillrun.errors import UserError
from distillrun.stages import STAGES, config_name, module_name

ROOT = Path(__file__).resolve().parents[1]
METHOD = ["losses", "ensemble", "inference", "specialists", "models", "data", "metrics", "train"]


def test_the_method_modules_import_no_hydra_and_no_cli_code() -> None:
    modules = ", ".join(f"distillrun.{m}" for m in METHOD)
    code = (
        f"import sys, {modules}\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'hydra' or m in "
        "('distillrun.cli', 'distillrun.config', 'distillrun.console') "
        "or m.startswith('distillrun.stages')]\n"
        "print(sorted(bad))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_importing_distillrun_does_not_import_torch() -> None:
    code = "import sys, distillrun; print('torch' in sys.modules, distillrun.load_model.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "distillrun.models"]


def test_each_table_of_functions_has_exactly_the_allowed_names() -> None:
    assert tuple(losses.LOSSES) == choices.LOSSES
    assert tuple(train.OPTIMIZERS) == choices.OPTIMIZERS
    assert tuple(train.SCHEDULES) == choices.SCHEDULES
    assert tuple(train.AUTOCAST) == choices.PRECISIONS
    assert tuple(models.BUILDERS) == choices.MODELS
    logits = torch.randn(3, 4, 5)
    for method in choices.ENSEMBLES:
        assert combine(logits, method).shape == (4, 5)
    with pytest.raises(ValueError, match="arithmetic or geometric"):
        combine(logits, "median")


@pytest.mark.parametrize(
    ("key", "names"),
    [
        ("loss", choices.LOSSES),
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
    distillrun(tmp_path, "train-teachers", "debug=tiny")
    distillrun(tmp_path, "distill", "debug=tiny")
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["mine", "distill's"]
    mine = int(lines[0].split()[1])
    assert mine < 0.5 * 450  # digits' 450 test images: it learned, far above chance
