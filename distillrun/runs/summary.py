"""Summaries of runs and sweeps: one row per run, a rich table, summary.csv and PNG plots.

`SweepSummary` is a Hydra callback (conf/base.yaml): when a `-m` sweep ends, whatever launcher
ran it, it writes the summary into the sweep folder. `distillrun report` uses the same pieces
for any run and sweep folders. Nothing here imports torch.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from distillrun.errors import UserError
from distillrun.runs import artifacts
from distillrun.runs.listing import pin_inputs

# The table's metric columns: (header, manifest metric). The CSV holds every scalar metric.
TABLE = (
    ("val errors", "val_errors"),  # what a search selects on (a pruned trial: when pruned)
    ("test errors", "test_errors"),
    ("test accuracy", "test_accuracy"),
    ("test NLL", "test_nll"),
    ("ECE", "test_ece"),
    ("agrees with teachers", "teacher_agreement"),
    ("hard-label errors", "baseline_test_errors"),
    ("inference speedup", "inference_speedup"),
    ("diverged", "diverged"),  # 1 where a model of the run looks diverged
)
# Horizontal reference lines on the plots: (label, manifest metric).
REFERENCES = (
    ("student on hard labels", "baseline_test_errors"),
    ("teacher ensemble", "teacher_test_errors"),
)
# What a seed sweep reports as mean and spread over its seeds (those the runs have).
OVER_SEEDS = (
    ("test accuracy", "test_accuracy"),
    ("test errors", "test_errors"),
    ("hard-label accuracy", "baseline_test_accuracy"),
    ("hard-label errors", "baseline_test_errors"),
    ("val errors", "val_errors"),
    ("agrees with teachers", "teacher_agreement"),
)
# Finished runs: a pruned trial of a search ended as it should (never consumed as complete).
FINISHED = ("complete", "pruned")
SEARCH_FILE = (
    "search.json"  # written by the search (distillrun/integrations/search.py) into its sweep folder
)


@dataclass
class Row:
    """One run: where it came from, what it overrode, what it measured."""

    source: str  # the sweep or run folder named by the user
    run: Path
    stage: str
    status: str
    overrides: dict[str, str]
    metrics: dict[str, float]
    minutes: float | None

    def value(self, key: str) -> float | None:
        v = self.overrides.get(key)
        return _number(v) if v is not None else self.metrics.get(key)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        out[key.lstrip("+~")] = value
    return out


def _minutes(manifest: dict[str, Any]) -> float | None:
    try:
        start = dt.datetime.fromisoformat(manifest["started"])
        return (dt.datetime.fromisoformat(manifest["ended"]) - start).total_seconds() / 60
    except (KeyError, TypeError, ValueError):
        return None


def _row(source: str, folder: Path) -> Row:
    try:
        manifest = artifacts.read_manifest(folder)
    except UserError:
        manifest = {"status": "corrupt"}
    if manifest is None:  # killed or still running: Hydra's record of its overrides remains
        overrides_file = folder / ".hydra" / "overrides.yaml"
        items = OmegaConf.load(overrides_file) if overrides_file.is_file() else []
        return Row(source, folder, "?", "unfinished", _overrides(list(items)), {}, None)
    metrics = {
        k: float(v)
        for k, v in (manifest.get("metrics") or {}).items()
        if isinstance(v, (int, float)) and (not isinstance(v, bool) or k == "diverged")
    }
    return Row(
        source,
        folder,
        str(manifest.get("stage", "?")),
        artifacts.reported_status(folder, manifest),  # a stale "running": interrupted
        _overrides(manifest.get("overrides") or []),
        metrics,
        _minutes(manifest),
    )


def collect(folder: Path) -> list[Row]:
    """The rows of a run folder (one) or a sweep folder (one per job)."""
    if not folder.is_dir():
        raise UserError(f"{folder} does not exist: pass a run or sweep folder under outputs/")
    if artifacts.is_sweep(folder):
        return [_row(str(folder), job) for job in artifacts.sweep_jobs(folder)]
    if (folder / artifacts.MANIFEST).is_file() or (folder / ".hydra").is_dir():
        return [_row(str(folder), folder)]
    raise UserError(
        f"{folder} is neither a run folder nor a sweep folder: pass e.g. "
        "outputs/distill/<timestamp> or outputs/distill/multirun/<timestamp>"
    )


def varying(rows: list[Row]) -> list[str]:
    """Override keys whose value differs between rows (or is missing from some)."""
    keys = sorted({k for r in rows for k in r.overrides})
    return [k for k in keys if len({r.overrides.get(k) for r in rows}) > 1]


def command(folder: Path) -> str | None:
    """The command line that made a run or sweep, from Hydra's records."""
    try:
        if artifacts.is_sweep(folder):
            hydra_cfg = OmegaConf.load(folder / "multirun.yaml").hydra
            chosen = [o for o in hydra_cfg.overrides.hydra if not o.startswith("hydra.mode=")]
            words = [*chosen, *hydra_cfg.overrides.task]  # e.g. hydra/sweeper=optuna, its space
            return f"distillrun {hydra_cfg.job.name} -m " + " ".join(words)
        manifest = artifacts.read_manifest(folder)
    except Exception:  # a damaged record: the report still shows the numbers
        return None
    if not manifest:
        return None
    words = pin_inputs(list(manifest.get("overrides") or []), manifest)  # the runs it read
    return f"distillrun {manifest.get('stage')} " + " ".join(words)


# ----------------------------------------------------------------------------- outputs


def source_labels(rows: list[Row]) -> dict[str, str]:
    """Short names for the folders rows came from: A, B, ... (none for a single folder)."""
    sources = list(dict.fromkeys(r.source for r in rows))
    if len(sources) < 2:
        return {}
    return {src: chr(ord("A") + i) if i < 26 else str(i) for i, src in enumerate(sources)}


def table_rows(rows: list[Row]) -> tuple[list[str], list[list[Any]]]:
    """Columns and cells; a row shows the overrides that vary within its own folder."""
    labels = source_labels(rows)
    keys = {src: varying([r for r in rows if r.source == src]) for src in {r.source for r in rows}}
    metrics = [(header, key) for header, key in TABLE if any(key in r.metrics for r in rows)]
    status = any(r.status != "complete" for r in rows)
    columns = (["source"] if labels else []) + ["run", "overrides"] + (["status"] if status else [])
    columns += [header for header, _ in metrics] + ["minutes"]
    out = []
    for r in rows:
        shown = " ".join(f"{k}={r.overrides[k]}" for k in keys[r.source] if k in r.overrides)
        cells: list[Any] = [labels[r.source]] if labels else []
        cells += [r.run.name, shown or "-"] + ([r.status] if status else [])
        cells += [_int_if_whole(r.metrics.get(key)) for _, key in metrics]
        cells.append(None if r.minutes is None else f"{r.minutes:.2f}")
        out.append(cells)
    return columns, out


def _int_if_whole(v: float | None) -> Any:
    return int(v) if v is not None and v == int(v) and abs(v) < 1e15 else v


def print_table(rows: list[Row], title: str) -> None:
    from distillrun.console import results_table, say

    columns, cells = table_rows(rows)
    results_table(title, columns, cells, text_columns=columns.index("overrides") + 1)
    for source, label in source_labels(rows).items():
        say(f"  {label}: {source}")


def write_csv(rows: list[Row], path: Path) -> None:
    keys = sorted({k for r in rows for k in r.overrides})
    metrics = sorted({k for r in rows for k in r.metrics})
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["source", "run", "stage", "status", *keys, *metrics, "wall_minutes"])
    for r in rows:
        writer.writerow(
            [r.source, str(r.run), r.stage, r.status]
            + [r.overrides.get(k, "") for k in keys]
            + [_int_if_whole(r.metrics.get(k)) if k in r.metrics else "" for k in metrics]
            + ["" if r.minutes is None else f"{r.minutes:.3f}"]
        )
    artifacts.atomic_write(path, lambda f: f.write(out.getvalue()), "w")


def _x_axis(rows: list[Row]) -> tuple[str | None, list[Row]]:
    """What the line plot puts on its x axis (T, else alpha, else another numeric override
    that varies; seeds are not an axis), and the rows that have a value for it."""
    keys = [k for k in varying(rows) if not k.endswith("seed")]
    for k in ("T", "alpha", *keys):
        having = [r for r in rows if k in r.overrides and r.value(k) is not None]
        if len({r.value(k) for r in having}) > 1:
            return k, having
    return None, []


def plot_errors(rows: list[Row], folder: Path) -> Path | None:
    """Test errors against T (or alpha, ...): a line per value of the other overrides, with
    the hard-label student and the teacher ensemble as horizontal references."""
    done = [r for r in rows if r.status == "complete" and "test_errors" in r.metrics]
    x, done = _x_axis(done)
    if x is None:
        return None
    others = [k for k in varying(done) if k != x]
    labels = source_labels(rows)
    several = len({r.source for r in done}) > 1
    lines: dict[str, list[Row]] = defaultdict(list)
    for r in done:
        label = ", ".join(f"{k}={r.overrides.get(k, '-')}" for k in others)
        if several:
            label = f"{labels[r.source]}" + (f", {label}" if label else "")
        lines[label].append(r)

    plt = artifacts.pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, line in sorted(lines.items()):
        points = sorted((r.value(x), r.metrics["test_errors"]) for r in line)
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    styles = iter(("--", ":", "-.", (0, (5, 1))))
    for name, key in REFERENCES:
        for value in sorted({r.metrics[key] for r in done if key in r.metrics}):
            ax.axhline(value, color="grey", linestyle=next(styles, "--"), linewidth=1)
            ax.annotate(
                f"{name}: {value:g}",
                (0.01, value),
                xycoords=("axes fraction", "data"),
                va="bottom",
                fontsize=8,
                color="dimgrey",
            )
    xs = sorted({r.value(x) for r in done})
    if x == "T" and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
        ax.set_xticks(xs, [f"{v:g}" for v in xs])
    ax.set_xlabel(x)
    ax.set_ylabel("test errors")
    ax.set_title(f"test errors against {x}")
    ax.grid(alpha=0.3)
    if any(lines):  # labelled lines: something besides x varies
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = folder / f"errors_vs_{x}.png"
    artifacts.save_figure(fig, path, dpi=120, tight=False)
    return path


def plot_heatmaps(rows: list[Row], folder: Path) -> list[Path]:
    """A T x alpha heat map of test errors per source in which both vary (mean over others)."""
    paths = []
    labels = source_labels(rows)
    sources = list(dict.fromkeys(r.source for r in rows))
    for source in sources:
        done = [
            r
            for r in rows
            if r.source == source and r.status == "complete" and "test_errors" in r.metrics
        ]
        keys = varying(done)
        if not ("T" in keys and "alpha" in keys):
            continue
        if any(r.value("T") is None or r.value("alpha") is None for r in done):
            continue
        cells: dict[tuple[float, float], list[float]] = defaultdict(list)
        for r in done:
            cells[(r.value("alpha"), r.value("T"))].append(r.metrics["test_errors"])
        alphas = sorted({a for a, _ in cells})
        temps = sorted({t for _, t in cells})
        grid = [
            [
                sum(cells[(a, t)]) / len(cells[(a, t)]) if cells.get((a, t)) else math.nan
                for t in temps
            ]
            for a in alphas
        ]
        plt = artifacts.pyplot()
        fig, ax = plt.subplots(figsize=(1.2 * len(temps) + 2.5, 0.8 * len(alphas) + 2))
        image = ax.imshow(grid, cmap="viridis_r", aspect="auto")
        values = [v for line in grid for v in line if not math.isnan(v)]
        middle = (min(values) + max(values)) / 2
        for i in range(len(alphas)):
            for j in range(len(temps)):
                if not math.isnan(grid[i][j]):
                    color = "black" if grid[i][j] < middle else "white"  # on light, on dark
                    ax.text(j, i, f"{grid[i][j]:g}", ha="center", va="center", color=color)
        ax.set_xticks(range(len(temps)), [f"{t:g}" for t in temps])
        ax.set_yticks(range(len(alphas)), [f"{a:g}" for a in alphas])
        ax.set_xlabel("T")
        ax.set_ylabel("alpha (weight of the soft term)")
        where = f": {labels[source]} ({Path(source).name})" if labels else ""
        ax.set_title(f"test errors by T and alpha{where}")
        fig.colorbar(image, ax=ax, label="test errors")
        fig.tight_layout()
        name = f"heatmap-{labels[source]}.png" if labels else "heatmap.png"
        artifacts.save_figure(fig, folder / name, dpi=120, tight=False)
        paths.append(folder / name)
    return paths


def is_search(source: str) -> bool:
    return (Path(source) / SEARCH_FILE).is_file()


def plot_trials(rows: list[Row], folder: Path) -> list[Path]:
    """For each search: validation errors by trial (pruned trials: when pruned), and the best
    so far. Test errors play no part in a search, so they are not drawn."""
    paths = []
    labels = source_labels(rows)
    for source in dict.fromkeys(r.source for r in rows):
        trials = [
            (int(r.run.name), r.status, r.metrics["val_errors"])
            for r in rows
            if r.source == source and r.run.name.isdigit() and "val_errors" in r.metrics
        ]
        if not trials:
            continue
        plt = artifacts.pyplot()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for status, marker in (("complete", "o"), ("pruned", "x")):
            points = [(n, v) for n, s, v in trials if s == status]
            if points:
                ax.scatter(*zip(*points, strict=True), marker=marker, label=status)
        best, steps = math.inf, []
        for n, status, v in sorted(trials):
            if status == "complete":
                best = min(best, v)
            if best < math.inf:
                steps.append((n, best))
        if steps:
            ax.step(*zip(*steps, strict=True), where="post", color="grey", label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel("validation errors")
        where = f": {labels[source]} ({Path(source).name})" if labels else ""
        ax.set_title(f"validation errors by trial{where}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        name = f"errors_by_trial-{labels[source]}.png" if labels else "errors_by_trial.png"
        artifacts.save_figure(fig, folder / name, dpi=120, tight=False)
        paths.append(folder / name)
    return paths


@dataclass
class SeedGroup:
    """Complete runs of one folder that differ in their seed alone."""

    overrides: dict[str, str]  # what they share (the seed left out)
    seeds: list[str]
    stats: dict[str, tuple[float, float]]  # metric -> (mean, sample standard deviation)


def over_seeds(rows: list[Row]) -> list[SeedGroup]:
    """The mean and spread over seeds of each group of complete runs that differ in `seed`
    alone (none when no folder varies the seed; groups of one seed are left out)."""
    groups: dict[tuple[str, tuple[tuple[str, str], ...]], list[Row]] = defaultdict(list)
    for r in rows:
        if r.status == "complete":
            shared = tuple(sorted((k, v) for k, v in r.overrides.items() if k != "seed"))
            groups[(r.source, shared)].append(r)
    out = []
    for (_, shared), members in groups.items():
        seeds = [m.overrides.get("seed", "default") for m in members]
        if len(set(seeds)) < 2:
            continue
        stats = {}
        for _, key in OVER_SEEDS:
            values = [m.metrics[key] for m in members if key in m.metrics]
            if len(values) == len(members):
                stats[key] = (statistics.mean(values), statistics.stdev(values))
        out.append(SeedGroup(dict(shared), seeds, stats))
    return out


def seed_table(groups: list[SeedGroup]) -> tuple[list[str], list[list[Any]]]:
    """Columns and cells of the over-seeds table: "mean ± std" of each metric."""
    shown = varying([Row("", Path(), "", "", g.overrides, {}, None) for g in groups])
    metrics = [(h, k) for h, k in OVER_SEEDS if any(k in g.stats for g in groups)]
    columns = ["overrides", "seeds", *(header for header, _ in metrics)]
    cells = []
    for g in groups:
        label = " ".join(f"{k}={g.overrides[k]}" for k in shown if k in g.overrides) or "-"
        row: list[Any] = [label, len(g.seeds)]
        for _, key in metrics:
            mean, std = g.stats.get(key, (None, None))
            row.append(None if mean is None else f"{mean:.4g} ± {std:.2g}")
        cells.append(row)
    return columns, cells


def write_seed_csv(groups: list[SeedGroup], path: Path) -> None:
    keys = sorted({k for g in groups for k in g.overrides})
    metrics = [k for _, k in OVER_SEEDS if any(k in g.stats for g in groups)]
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow([*keys, "seeds", *(f"{k}_{s}" for k in metrics for s in ("mean", "std"))])
    for g in groups:
        stats = [g.stats[k][i] if k in g.stats else "" for k in metrics for i in (0, 1)]
        writer.writerow([g.overrides.get(k, "") for k in keys] + [" ".join(g.seeds), *stats])
    artifacts.atomic_write(path, lambda f: f.write(out.getvalue()), "w")


def summarise(rows: list[Row], folder: Path, title: str) -> list[Path]:
    """Print the table; write summary.csv and the plots into `folder`; return the files.
    Runs that differ in their seed alone also get their mean and spread (summary_seeds.csv).
    A search's trials get the errors-by-trial plot instead of plots over a grid."""
    from distillrun.console import results_table

    print_table(rows, title)
    files = [folder / "summary.csv"]
    write_csv(rows, files[0])
    groups = over_seeds(rows)
    if groups:
        columns, cells = seed_table(groups)
        results_table("over seeds: mean ± sample standard deviation", columns, cells, 2)
        files.append(folder / "summary_seeds.csv")
        write_seed_csv(groups, files[-1])
    grid = [r for r in rows if not is_search(r.source)]
    line = plot_errors(grid, folder)
    files += ([line] if line else []) + plot_heatmaps(grid, folder)
    return files + plot_trials([r for r in rows if is_search(r.source)], folder)


# The last sweep this process summarised: (jobs not complete, jobs, folder). The dispatcher
# exits 2 when some failed, whichever launcher ran them.
last_sweep: tuple[int, int, Path] | None = None


class SweepSummary(Callback):
    """Hydra callback: summarise a sweep's jobs into its folder when the sweep ends."""

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        from distillrun.console import say

        folder = Path(config.hydra.sweep.dir)
        if not folder.is_dir():
            return  # every job was refused before it started
        rows = [_row(str(folder), job) for job in artifacts.sweep_jobs(folder)]
        if not rows:
            return
        done = sum(r.status == "complete" for r in rows)
        pruned = sum(r.status == "pruned" for r in rows)
        title = f"{config.hydra.job.name} sweep: {done} of {len(rows)} jobs complete"
        title += f", {pruned} pruned" if pruned else ""
        files = summarise(rows, folder, title)
        say("sweep summary: " + ", ".join(str(f) for f in files))
        global last_sweep
        last_sweep = (sum(r.status not in FINISHED for r in rows), len(rows), folder)
