"""Misspelled and added keys: a suggestion, one line, before anything runs (in process)."""

from __future__ import annotations

import pytest

from distillrun.cli import precheck
from distillrun.config import closest_key, keys_any_stage_reads


def refusal(capsys: pytest.CaptureFixture[str], stage: str, *args: str) -> str:
    """The one line precheck exits with (code 2) for these overrides."""
    with pytest.raises(SystemExit) as exited:
        precheck(stage, [*args, "--cfg", "job"])  # --cfg: composes and checks, writes nothing
    assert exited.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("override", "meant"),
    [
        ("alpah=0.5", "'alpha'"),
        ("train.epoch=5", "'train.epochs'"),
        ("teacher_outputs.topk=3", "'teacher_outputs.top_k'"),
        ("~alpah", "'alpha'"),
    ],
)
def test_a_misspelled_key_gets_the_closest(
    capsys: pytest.CaptureFixture[str], override: str, meant: str
) -> None:
    line = refusal(capsys, "distill", override)
    assert f"did you mean {meant}" in line and "--cfg job" in line
    assert "+" not in line.split("(")[0]  # not Hydra's advice to add it with +


@pytest.mark.parametrize("override", ["+alpah=0.5", "++alpah=0.5"])
def test_an_added_key_no_stage_reads_is_refused(
    capsys: pytest.CaptureFixture[str], override: str
) -> None:
    line = refusal(capsys, "distill", override)
    assert "no stage reads" in line and "did you mean alpha=0.5?" in line
    assert "+experiment=" in line  # what + is for


def test_added_groups_and_keys_some_config_sets_pass() -> None:
    for args in (["experiment=omit3"], ["+hydra.job.env_set.X=1"], ["++train.epochs=3"]):
        assert precheck("distill", [*args, "--cfg", "job"]) == [*args, "--cfg", "job"]


def test_the_keys_some_stage_reads_come_from_every_config_file() -> None:
    keys = keys_any_stage_reads()
    assert {"alpha", "teacher_outputs.top_k", "dataset.root", "logger.mlflow.tracking_uri"} <= keys
    assert {"optim.milestones", "model.max_norm", "transfer.omit_classes"} <= keys
    assert not {k for k in keys if k.startswith(("hydra", "defaults"))}


def test_the_closest_key_is_a_sibling_with_a_similar_name() -> None:
    keys = ["train", "train.epochs", "dataset", "dataset.name", "alpha", "paths"]
    assert closest_key("train.epoch", keys) == "train.epochs"
    assert closest_key("dataset.size", keys) is None  # not dataset.name: the names differ
    assert closest_key("alpah", keys) == "alpha"
    assert closest_key("foo.bar", keys) is None
