"""--help, --cfg, --info and shell completion without the stage module (so without torch)."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from distillrun.cli import config_app, quick_help
from distillrun.stages import STAGES, module_name


def printed(app, args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    sys.argv = ["distillrun", *args]
    try:
        app()
    except SystemExit as e:  # --help exits 0
        assert e.code in (0, None)
    return capsys.readouterr().out


@pytest.mark.parametrize("stage", STAGES)
def test_the_config_app_prints_what_the_stage_app_prints(
    stage: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same config name, search path and job name (`--cfg hydra` shows them all); for one
    stage also the same --help and job config."""
    monkeypatch.setattr(sys, "argv", sys.argv)  # restored after
    stage_app = importlib.import_module(module_name(stage)).main
    shown = [["--cfg", "hydra"]]
    if stage == "distill":
        shown += [["--help"], ["--cfg", "job", "T=3"]]
    for args in shown:
        mine = printed(config_app(stage), args, capsys)
        assert mine == printed(stage_app, args, capsys), args
        assert mine.strip(), args
    hydra_cfg = printed(config_app(stage), ["--cfg", "hydra"], capsys)
    assert (
        f"  name: {stage}\n" in hydra_cfg and f"config_name: {STAGES[stage].module}\n" in hydra_cfg
    )


def test_the_quick_help_is_hydras_help(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stage with overrides; the stages' helps differ only in their configs, headers, footers.
    stage, args = "train-teachers", ["dataset=mnist", "teachers.n=2"]
    monkeypatch.setattr(sys, "argv", sys.argv)  # restored after
    hydras = printed(config_app(stage), [*args, "--help"], capsys)
    assert "debug/train_teachers: tiny" in hydras and "teacher_outputs: auto, cached" in hydras
    assert quick_help(stage, [*args, "--help"]) + "\n" == hydras


def test_the_quick_help_leaves_a_bad_override_to_hydra() -> None:
    assert quick_help("distill", ["alpah=2", "--help"]) is None


def test_help_cfg_and_a_tab_import_no_torch() -> None:
    probe = """
import os, sys
from distillrun import cli
os.environ["COMP_LINE"] = "distillrun distill tra"
for args in (["distill", "--help"], ["distill", "T=2", "--cfg", "job"], ["-sc", "query=bash"]):
    sys.argv = ["distillrun", *args]
    try:
        cli.main()
    except SystemExit as e:
        assert e.code in (0, None), (args, e.code)
    assert "torch" not in sys.modules, f"{args}: torch imported"
"""
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "train." in done.stdout and "T: 2" in done.stdout and "alpha weights" in done.stdout
