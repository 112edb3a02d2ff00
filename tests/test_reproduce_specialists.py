"""`make reproduce-specialists` (python -m distillrun.tools.reproduce_specialists): its table's
rows, its goals and where its overrides go. The command itself runs in test_specialists_cli.py, on
that module's tiny pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import assert_one_line_error, tool_here

from distillrun.tools.reproduce_specialists import (
    PAPER_ROWS,
    coverage_rises,
    for_stage,
    grouped,
    paper_grouped,
)


def row(covering: int, examples: int, generalist: int, combined: int) -> dict:
    return {
        "covering": covering,
        "examples": examples,
        "generalist_correct": generalist,
        "combined_correct": combined,
    }


def test_rows_of_four_or_more_specialists_are_merged() -> None:
    rows = grouped([row(0, 10, 0, 2), row(1, 10, 5, 6), row(4, 4, 2, 3), row(6, 6, 2, 3)])
    assert [(r["covering"], r["examples"], r["gained"]) for r in rows] == [
        ("0", 10, 2),
        ("1", 10, 1),
        ("4+", 10, 2),
    ]
    assert rows[0]["relative_change"] is None  # the generalist had none of them right
    assert rows[2]["relative_change"] == pytest.approx(0.5)
    assert rows[2]["generalist_accuracy"] == pytest.approx(0.4)


def test_the_papers_rows_merged_the_same_way() -> None:
    paper = paper_grouped()
    assert [r["covering"] for r in paper] == ["0", "1", "2", "3", "4+"]
    assert sum(r["examples"] for r in paper) == sum(r[1] for r in PAPER_ROWS)  # none lost
    assert paper[3]["relative_change"] == pytest.approx(0.088)
    # 4 or more: +2,704 on a base of about 22,900 the generalist had right
    assert paper[4]["gained"] == 2704
    assert paper[4]["relative_change"] == pytest.approx(0.118, abs=1e-3)
    assert coverage_rises(paper)


def test_coverage_rises_needs_three_rows_and_every_3_plus_row_above_the_1_row() -> None:
    def table(*changes: tuple[str, float | None]) -> list[dict]:
        return [{"covering": c, "relative_change": v} for c, v in changes]

    assert coverage_rises(table(("1", 0.02), ("2", 0.03), ("3", 0.05)))
    assert not coverage_rises(table(("1", 0.02), ("3", 0.05)))  # two rows only
    assert not coverage_rises(table(("0", None), ("1", 0.02), ("3", 0.05)))  # n/a is no row
    assert not coverage_rises(table(("1", 0.02), ("2", 0.03), ("3", 0.05), ("4+", 0.01)))
    assert not coverage_rises(table(("0", 0.0), ("1", 0.02), ("2", 0.04)))  # no 3+ row


def test_each_override_goes_to_the_stages_that_have_its_key() -> None:
    extra = ["device=cpu", "dataset.seed=1", "model.hidden=[64]", "specialists.k=4", "n=2", "T=4"]
    assert for_stage("train-teachers", extra) == extra[:3]
    assert for_stage("specialists", extra) == ["device=cpu", "dataset.seed=1", "specialists.k=4"]
    assert for_stage("evaluate", extra) == ["device=cpu", "n=2"]
    assert for_stage("distill", extra) == [*extra[:3], "T=4"]


def test_resume_with_other_overrides_or_of_another_folder_is_one_line(tmp_path: Path) -> None:
    started = tool_here("reproduce_specialists", tmp_path, "--out", str(tmp_path), "no_such_key=1")
    (root,) = (p for p in tmp_path.iterdir() if p.is_dir())  # made before the first step failed
    state = json.loads((root / "reproduce.json").read_text())
    assert state["arguments"] == {"overrides": ["no_such_key=1"]}, started.stderr
    other = tool_here("reproduce_specialists", tmp_path, "--resume", str(root), "seed=1")
    assert_one_line_error(other, "was started with", "resume it with the same overrides")
    stray = tool_here("reproduce_specialists", tmp_path, "--resume", str(tmp_path))
    assert_one_line_error(stray, "not a reproduction folder", "reproduce-specialists/<timestamp>")
