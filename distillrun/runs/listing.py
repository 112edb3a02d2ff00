"""`distillrun runs [stage]`: the run and sweep folders under the output root, newest first, and
`--latest <stage>`: the newest complete run folder of a stage, one path for scripts.

Also `pin_inputs`: a run's overrides with the input runs it consumed named as it used them, so
that a command or preset repeating it reads the same runs later, not whatever is newest then.
Torch-free: it reads manifests (docs/run-folders.md) and nothing else.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from distillrun.errors import UserError
from distillrun.runs import artifacts
from distillrun.stages import STAGES

HEADLINE = "test_accuracy"  # the stage's main model (docs/run-folders.md), shown for every run


@dataclass
class Entry:
    """One line of the listing: a run folder, or a sweep folder standing for its jobs."""

    folder: Path
    stage: str
    status: str
    started: str  # ISO time: the manifest's, else the folder's modification time
    data: str = "-"
    metric: str = "-"
    inputs: dict[str, list[str]] = field(default_factory=dict)
    sweep: bool = False


def entries(root: Path, stage: str | None = None) -> list[Entry]:
    """Every run and sweep folder of `stage` (all stages: None) under `root`, newest first."""
    found = []
    for name in [stage] if stage else STAGES:
        base = root / name
        if not base.is_dir():
            continue
        for folder in base.iterdir():
            if folder.is_dir() and folder.name != "multirun":
                if artifacts.holds_run(folder) is not None:
                    found.append(run_entry(folder, name))
        for folder in base.glob("multirun/*"):
            if folder.is_dir():
                found.append(sweep_entry(folder, name))
    return sorted(found, key=lambda e: e.started, reverse=True)


def run_entry(folder: Path, stage: str) -> Entry:
    try:
        manifest = artifacts.read_manifest(folder)
    except UserError:
        return Entry(folder, stage, "damaged manifest", _modified(folder))
    if manifest is None:
        return Entry(folder, stage, "unfinished", _modified(folder))
    dataset = manifest.get("dataset")
    metric = (manifest.get("metrics") or {}).get(HEADLINE)
    inputs = manifest.get("inputs") or {}
    return Entry(
        folder,
        str(manifest.get("stage", stage)),
        artifacts.reported_status(folder, manifest),
        str(manifest.get("started") or _modified(folder)),
        str(dataset.get("name", "-")) if isinstance(dataset, dict) else "-",
        f"{metric:.4f}" if isinstance(metric, (int, float)) else "-",
        {str(k): [str(v)] for k, v in inputs.items()} if isinstance(inputs, dict) else {},
    )


def sweep_entry(folder: Path, stage: str) -> Entry:
    """A sweep: how many of its jobs are complete, the range of their headline metric (no job
    is picked: picking is done on validation, by `report` or a search), and their inputs."""
    jobs = [run_entry(job, stage) for job in artifacts.sweep_jobs(folder)]
    done = [j for j in jobs if j.status == "complete"]
    metrics = sorted(j.metric for j in done if j.metric != "-")
    metric = "-"
    if metrics:
        metric = metrics[0] if metrics[0] == metrics[-1] else f"{metrics[0]}-{metrics[-1]}"
    inputs: dict[str, list[str]] = {}
    for job in jobs:
        for key, values in job.inputs.items():
            inputs.setdefault(key, [])
            inputs[key] += [v for v in values if v not in inputs[key]]
    return Entry(
        folder,
        stage,
        f"{len(done)}/{len(jobs)} complete" if jobs else "no jobs",
        min((j.started for j in jobs), default=_modified(folder)),
        ",".join(sorted({j.data for j in jobs} - {"-"})) or "-",
        metric,
        inputs,
        sweep=True,
    )


def latest_run(root: Path, stage: str) -> Path:
    """The newest complete run folder of `stage` (a sweep's jobs included): what a script
    passes on as `teachers=`, `run=` or `generalist=`."""
    complete = []
    for entry in entries(root, stage):
        runs = (
            [run_entry(j, stage) for j in artifacts.sweep_jobs(entry.folder)]
            if entry.sweep
            else [entry]
        )
        complete += [r for r in runs if r.status == "complete" and r.stage == stage]
    if not complete:
        raise UserError(
            f"no complete {stage} run under {root / stage}: run `distillrun {stage}` first "
            "(`distillrun runs` lists what is there)"
        )
    return max(complete, key=lambda r: r.started).folder


def _modified(folder: Path) -> str:
    try:
        return datetime.fromtimestamp(folder.stat().st_mtime, timezone.utc).isoformat()
    except OSError:
        return ""


# --- the table ----------------------------------------------------------------------------------


def shown_path(path: str | Path) -> str:
    """A path as the user would type it: relative to the current folder when it is below it."""
    path = Path(path)
    try:
        return (
            str(path.resolve().relative_to(Path.cwd().resolve()))
            if path.is_absolute()
            else str(path)
        )
    except ValueError:
        return str(path)


def table(rows: list[Entry]) -> str:
    header = ["folder", "stage", "status", "data", HEADLINE, "inputs"]
    lines = [header]
    for e in rows:
        inputs = " ".join(
            f"{key}={shown_path(values[0])}" if len(values) == 1 else f"{key}=<{len(values)} runs>"
            for key, values in e.inputs.items()
        )
        stage = f"{e.stage} (sweep)" if e.sweep else e.stage
        lines.append([shown_path(e.folder), stage, e.status, e.data, e.metric, inputs or "-"])
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(
            [*(c.ljust(w) for c, w in zip(line[:-1], widths, strict=True)), line[-1]]
        ).rstrip()
        for line in lines
    )


# --- the command --------------------------------------------------------------------------------


class _OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # type: ignore[override]
        raise UserError(f"{message}: see `distillrun runs --help`")


def check_stage(name: str) -> str:
    if name in STAGES:
        return name
    from distillrun.config import did_you_mean

    raise UserError(
        f"unknown stage '{name}'{did_you_mean(name, list(STAGES))}: stages are {', '.join(STAGES)}"
    )


def runs_command(argv: list[str]) -> None:
    """`distillrun runs [stage] [--latest STAGE] [--root DIR]`."""
    parser = _OneLineParser(
        prog="distillrun runs",
        description="Run and sweep folders, newest first: stage, status, data, "
        f"{HEADLINE} and the input runs each consumed.",
    )
    parser.add_argument("stage", nargs="?", help="only this stage's folders")
    parser.add_argument(
        "--latest", metavar="STAGE", help="print the newest complete run folder of STAGE"
    )
    parser.add_argument(
        "--root", default="outputs", help="the output root (paths.output_root; default outputs)"
    )
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.latest:
        if args.stage:
            raise UserError("--latest names its stage: drop the other stage name")
        print(latest_run(root, check_stage(args.latest)))
        return
    found = entries(root, check_stage(args.stage) if args.stage else None)
    if not found:
        where = root / args.stage if args.stage else root
        print(f"no run folders under {where}", file=sys.stderr)
        return
    print(table(found))


# --- pinning the inputs a run used --------------------------------------------------------------

_BARE = re.compile(r"^[\w/.:@-]+$")  # a value Hydra reads as it is written, and a shell too


def pin_inputs(overrides: list[str], manifest: dict[str, Any]) -> list[str]:
    """`overrides` with each input run the manifest records (teachers, generalist, run, ...)
    set to the folder it consumed: a default ("the newest") or a relative path would name
    other runs later."""
    config = manifest.get("config") or {}
    inputs = manifest.get("inputs") or {}
    pins = {k: v for k, v in inputs.items() if isinstance(config, dict) and k in config}
    kept = [o for o in overrides if o.lstrip("+~").split("=", 1)[0] not in pins]
    return [*kept, *(f"{key}={_hydra_value(str(value))}" for key, value in pins.items())]


def _hydra_value(value: str) -> str:
    if value.startswith("[") and value.endswith("]"):  # several folders: "[a, b]"
        return "[" + ",".join(_hydra_value(v) for v in value[1:-1].split(", ")) + "]"
    if _BARE.match(value):
        return value
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'  # Hydra's quoting
