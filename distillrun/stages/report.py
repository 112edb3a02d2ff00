"""`distillrun report <folders>`: the sweep summary for any run and sweep folders, plus a
Markdown report (report.md) that links the plots and gives the command behind each folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from distillrun.config import Problems, check_basics, folder_list
from distillrun.console import fmt, say
from distillrun.runs import artifacts
from distillrun.runs.summary import Row, collect, command, source_labels, summarise, table_rows
from distillrun.stages.common import Run, run_stage


@hydra.main(version_base="1.3", config_path="pkg://distillrun.conf", config_name="report")
def main(cfg: DictConfig) -> float | None:
    return run_stage("report", cfg, report)


def check_config(cfg: DictConfig, p: Problems) -> None:
    """The checks of this stage's own keys, run before anything is written (config.validate)."""
    check_basics(cfg, p)
    runs = folder_list(cfg.runs)
    p.need(
        bool(runs),
        "name the run or sweep folders to report: distillrun report outputs/distill/multirun/<ts>",
    )
    p.need(cfg.title is None or isinstance(cfg.title, str), "title must be text")


def report(cfg: DictConfig, run: Run) -> dict[str, Any]:
    """Summarise run and sweep folders.

    Consumes any run or sweep folders (`runs=`), complete or not. Writes the sweep summary
    (summary.csv and its plots, runs/summary.py) and report.md, and as metrics how many runs it
    read and how many of them are complete.
    """
    folders = [Path(str(f)) for f in cfg.runs]
    rows = [row for folder in folders for row in collect(folder)]
    for folder in folders:
        run.inputs[folder.name] = str(folder.resolve())
    title = cfg.title or "distillrun report"
    files = summarise(rows, run.dir, title)
    markdown(title, folders, rows, files, run.dir / "report.md")
    say(f"report: {run.dir / 'report.md'} ({len(rows)} runs from {len(folders)} folders)")
    return {"runs": len(rows), "complete": sum(r.status == "complete" for r in rows)}


def markdown(
    title: str, folders: list[Path], rows: list[Row], files: list[Path], path: Path
) -> None:
    columns, cells = table_rows(rows)
    lines = [f"# {title}", "", f"{artifacts.now()[:16].replace('T', ' ')}, {len(rows)} runs.", ""]
    lines += ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(fmt(c).replace("|", "\\|") for c in row) + " |" for row in cells]
    plots = [f"![{f.stem}]({f.name})" for f in files if f.suffix == ".png"]
    lines += ["", "## Plots", "", *(plots or ["(nothing to plot)"])]
    lines += ["", "## Where the numbers come from", ""]
    labels = source_labels(rows)
    for folder in folders:
        label = labels.get(str(folder))
        lines.append(f"- {label + ': ' if label else ''}`{folder.resolve()}`")
        how = command(folder)
        if how:
            lines.append(f"  `{how}`")
    artifacts.atomic_write(path, lambda f: f.write("\n".join(lines) + "\n"), "w")
