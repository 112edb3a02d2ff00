"""`make reproduce` (python -m distillrun.tools.reproduce): the paper's MNIST results, one command.

Runs distillrun's stages with the experiment presets, one after another, into one folder
outputs/reproduce/<timestamp>/ (a run or sweep folder per step), then writes report.md (each
experiment: the paper's figure, ours, the command that produced it), report.json and
errors_vs_T.png there.

    python -m distillrun.tools.reproduce [--data-root ../shared/data/mnist] [--download] [--seeds N]
        [--out outputs/reproduce] [--resume outputs/reproduce/<timestamp>] [override ...]

Overrides (e.g. device=cuda) go to every step. With --seeds N every student step runs with
seeds 0..N-1 (the teachers once) and the report gives each figure's mean and standard deviation.
An interrupted reproduction continues with --resume: complete steps are kept, an interrupted run
continues from its last epoch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from distillrun.errors import UserError, interrupted_exit_code, run_tool
from distillrun.runs import artifacts, summary

PAPER = {  # docs/method.md#mnist
    "teacher_errors": 67,
    "student_hard_errors": 146,
    "student_distilled_errors": 74,
    "omit3_errors": 206,
    "omit3_errors_on_3": 133,
    "omit3_corrected_errors": 109,
    "omit3_corrected_errors_on_3": 14,
    "omit3_bias": 3.5,
    "hard3pct_test_accuracy": 0.445,  # the speech experiment: frame accuracy
    "soft3pct_test_accuracy": 0.570,
    "full_test_accuracy": 0.589,
}
GOALS = {  # the issues' goals: (report.json key, operator, target)
    "distilled student": ("student_distilled_errors", "<=", 74),
    "teacher ensemble": ("teacher_ensemble_errors", "<=", 60),
    "omitted 3, corrected": ("omit3_corrected_errors", "<=", 109),
    "3%: gap recovered by soft targets": ("soft3pct_gap_recovered", ">=", 0.8),
    "student on consistent views": ("student_views_errors", "<=", 65),
    "3% on views: gap recovered by soft targets": ("soft3pct_views_gap_recovered", ">=", 0.8),
    "minutes": ("minutes", "<=", 45),
}
SWEEP_T = ["3", "8"]  # the small sweep; with the T=20 run, the best T is chosen on validation
STATE = "reproduce.json"  # the reproduction's own record: its arguments and its steps


@dataclass
class Step:
    name: str  # its folder in the reproduction folder
    stage: str
    overrides: list[str]
    sweep: dict[str, list[str]] = field(default_factory=dict)  # key -> values: a -m sweep

    def command(self, folder: Path) -> list[str]:
        where = f"hydra.sweep.dir={folder}" if self.sweep else f"hydra.run.dir={folder}"
        sweep = ["-m", *(f"{k}={','.join(v)}" for k, v in self.sweep.items())] if self.sweep else []
        return ["distillrun", self.stage, *sweep, *self.overrides, where]

    def jobs(self) -> list[list[str]]:
        """Each job's sweep overrides, in the order of Hydra's job numbers (the product of
        the values, the first key slowest)."""
        keys = [[f"{k}={v}" for v in values] for k, values in self.sweep.items()]
        return [list(job) for job in itertools.product(*keys)]


def plan(root: Path, data: list[str], extra: list[str], seeds: int = 1) -> list[Step]:
    """The steps, in order: teachers first; every student is distilled from them, with seeds
    0..seeds-1 (a sweep over the seed when there are several)."""
    teachers = [f"teachers={root / 'teachers'}"]
    student = [*teachers, *data, *extra]
    seed = {"seed": [str(s) for s in range(seeds)]} if seeds > 1 else {}

    def distill(name: str, preset: str, *more: str, **sweep: list[str]) -> Step:
        return Step(name, "distill", [f"+experiment={preset}", *more, *student], {**sweep, **seed})

    return [
        Step("teachers", "train-teachers", ["+experiment=mnist_cnn_teachers", *data, *extra]),
        distill("distill_T20", "hinton_mnist"),
        distill("T_sweep", "hinton_mnist", "baseline=false", T=SWEEP_T),
        distill("omit3", "omit3", "baseline=false"),
        distill("soft_targets_3pct", "soft_targets_3pct"),
        distill("views", "hinton_mnist_views"),
        distill("soft_targets_3pct_views", "soft_targets_3pct_views"),
    ]


# --- running the steps ---------------------------------------------------------------------------


def _stage(args: list[str]) -> int:
    """`distillrun <args>` in a child process, its output on this terminal; its exit code."""
    child = subprocess.Popen([sys.executable, "-m", "distillrun", *args])
    try:
        return child.wait()
    except BaseException:  # Ctrl-C or SIGTERM: the stage stops cleanly, resumable
        child.send_signal(signal.SIGTERM)
        child.wait()
        raise


def _complete(folder: Path, stage: str) -> bool:
    try:
        return artifacts.is_complete(artifacts.read_manifest(folder), stage)
    except UserError:
        return False


def _started(folder: Path) -> bool:
    """Whether a run or sweep got as far as writing its folder (a kill can come before)."""
    return (folder / ".hydra").is_dir() or (folder / "multirun.yaml").is_file()


def run_step(step: Step, folder: Path) -> int:
    """Run a step into `folder`, keeping what an earlier, interrupted attempt finished."""
    if not _started(folder):
        return _stage(step.command(folder)[1:])
    if not step.sweep:
        if _complete(folder, step.stage):
            print("complete: kept")
            return 0
        return _stage([step.stage, f"resume={folder}"])
    # A sweep: resume its unfinished jobs, run the ones it never started, then summarise it.
    jobs = step.jobs()
    kept = 0
    for n, overrides in enumerate(jobs):
        job = folder / str(n)
        if _complete(job, step.stage):
            kept += 1
            continue
        if _started(job):
            code = _stage([step.stage, f"resume={job}"])
        else:
            code = _stage([step.stage, *step.overrides, *overrides, f"hydra.run.dir={job}"])
        if code:
            return code
    if kept == len(jobs):
        print("complete: kept")
    else:
        rows = summary.collect(folder)
        summary.summarise(rows, folder, f"{step.stage} sweep, resumed: {len(rows)} jobs")
    return 0


# --- the report ----------------------------------------------------------------------------------


def _runs(folder: Path, stage: str) -> list[dict[str, Any]]:
    """The complete runs of a step: itself, or every job of its sweep."""
    if artifacts.is_sweep(folder):
        return [artifacts.complete_run(job, stage) for job in artifacts.sweep_jobs(folder)]
    return [artifacts.complete_run(folder, stage)]


def _of_seed(runs: list[dict[str, Any]], seed: int) -> list[dict[str, Any]]:
    return [run for run in runs if run["config"]["seed"] == seed]


def _gap(hard_few: float, soft_few: float, hard_all: float) -> float | None:
    """The share of the gap between the hard-label students on few and on all the data that
    soft targets close."""
    return (hard_few - soft_few) / (hard_few - hard_all) if hard_few != hard_all else None


def figures(root: Path, seed: int) -> dict[str, Any]:
    """report.json's figures of the students with one seed, read from the steps' manifests."""
    one = {
        name: _of_seed(_runs(root / name, "distill"), seed)[0]["metrics"]
        for name in (
            "distill_T20",
            "omit3",
            "soft_targets_3pct",
            "views",
            "soft_targets_3pct_views",
        )
    }
    t20, omit3, small = one["distill_T20"], one["omit3"], one["soft_targets_3pct"]
    views, small_views = one["views"], one["soft_targets_3pct_views"]
    # The best T by validation errors (then NLL), never by test errors.
    by_T = {20.0: t20}
    for run in _of_seed(_runs(root / "T_sweep", "distill"), seed):
        by_T[float(run["config"]["T"])] = run["metrics"]
    best_T = min(by_T, key=lambda t: (by_T[t]["val_errors"], by_T[t]["val_nll"]))
    hard = t20["baseline_test_errors"]
    hard3, soft3 = small["baseline_test_errors"], small["test_errors"]
    hard_views = views["baseline_test_errors"]
    hard3_views, soft3_views = small_views["baseline_test_errors"], small_views["test_errors"]
    return {
        "student_hard_errors": hard,
        "student_distilled_errors": t20["test_errors"],
        "student_distilled_best_errors": by_T[best_T]["test_errors"],
        "best_T": best_T,
        "errors_by_T": {f"{t:g}": by_T[t]["test_errors"] for t in sorted(by_T)},
        "val_errors_by_T": {f"{t:g}": by_T[t]["val_errors"] for t in sorted(by_T)},
        "omit3_errors": omit3["uncorrected_test_errors"],
        "omit3_errors_on_3": omit3["uncorrected_test_errors_on_omitted"],
        "omit3_corrected_errors": omit3["test_errors"],
        "omit3_corrected_errors_on_3": omit3["test_errors_on_omitted"],
        "omit3_bias": omit3["omit_bias"],
        "hard3pct_test_errors": hard3,
        "soft3pct_test_errors": soft3,
        "hard3pct_test_accuracy": small["baseline_test_accuracy"],
        "soft3pct_test_accuracy": small["test_accuracy"],
        "soft3pct_gap_recovered": _gap(hard3, soft3, hard),
        "student_hard_views_errors": hard_views,
        "student_views_errors": views["test_errors"],
        "hard3pct_views_test_errors": hard3_views,
        "soft3pct_views_test_errors": soft3_views,
        "soft3pct_views_gap_recovered": _gap(hard3_views, soft3_views, hard_views),
    }


def results(root: Path, seeds: int = 1) -> dict[str, Any]:
    """report.json's figures: the teachers', and each student figure's mean over the seeds
    (with `spread`: its standard deviation and values, when there are several)."""
    teachers_run = artifacts.complete_run(root / "teachers", "train-teachers")
    teachers = teachers_run["metrics"]
    per_seed = [figures(root, seed) for seed in range(seeds)]
    r: dict[str, Any] = {
        "device": teachers_run.get("device"),
        "seeds": seeds,
        "teacher_ensemble_errors": teachers["test_errors"],
        "teacher_member_errors": [m["test_errors"] for m in teachers["members"]],
    }
    spread: dict[str, Any] = {}
    for key, first in per_seed[0].items():
        values = [f[key] for f in per_seed]
        if isinstance(first, dict):  # by T: the mean of each T
            r[key] = {t: _mean([v[t] for v in values]) for t in first}
        elif key == "best_T":
            r[key] = max(set(values), key=values.count)  # the T most seeds chose
            if seeds > 1:
                spread[key] = {"values": values}
        else:
            r[key] = _mean(values)
            if seeds > 1 and None not in values:
                spread[key] = {"std": _std(values), "values": values}
    if seeds > 1:
        r["spread"] = spread
    return r


def _mean(values: list[Any]) -> Any:
    if len(values) == 1 or None in values:
        return values[0] if len(values) == 1 else None
    return sum(values) / len(values)


def _std(values: list[float]) -> float:
    """The sample standard deviation (n - 1)."""
    mean = sum(values) / len(values)
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _met(value: Any, op: str, target: float) -> bool | None:
    if value is None:
        return None
    return value <= target if op == "<=" else value >= target


def provenance(
    root: Path, steps: list[Step], state: dict[str, Any], paper: dict[str, Any]
) -> dict[str, Any]:
    """What a report records of how it was made: date, machine, torch, command, the paper's
    figures and each step's folder."""
    return {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "torch": metadata.version("torch"),
        "command": state["command"],
        "paper": paper,
        "runs": {s.name: str(root / s.name) for s in steps},
    }


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        names = [
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {platform.system()} {platform.release()}"


def _cmd(step: Step, root: Path) -> str:
    return "`" + shlex.join(step.command(root / step.name)) + "`"


REPORT = """\
# distillrun: reproducing Hinton, Vinyals and Dean (2015) on MNIST

{date} on {machine} ({device}); torch {torch}; {minutes:.1f} minutes; {seeds}

Test errors of 10,000 (the paper's section 4 figures are frame accuracies of its speech model; \
ours are MNIST's, with accuracies in brackets). The rows on views go beyond the paper \
(distillrun's docs/method.md#consistent-teaching).

| experiment | paper | distillrun | command |
| --- | --- | --- | --- |
{experiments}

| goal | target | distillrun | met |
| --- | --- | --- | --- |
{goals}

Test errors by T: {by_T}. Plot: [errors_vs_T.png](errors_vs_T.png).

Reproduce: `{command}`
"""


class _Figures:
    """How report.md shows a figure of report.json: a count, or with several seeds the mean
    ± the standard deviation; a share as a percentage."""

    def __init__(self, r: dict[str, Any]) -> None:
        self.r, self.spread = r, r.get("spread", {})

    def n(self, key: str) -> str:
        if key in self.spread and "std" in self.spread[key]:
            return f"{self.r[key]:.1f} ± {self.spread[key]['std']:.1f}"
        return "-" if self.r[key] is None else f"{self.r[key]:g}"

    def pct(self, key: str, paper: bool = False) -> str:
        value = PAPER[key] if paper else self.r[key]
        if value is None:
            return "-"
        if not paper and key in self.spread and "std" in self.spread[key]:
            return f"{100 * value:.1f}% ± {100 * self.spread[key]['std']:.1f}"
        return f"{100 * value:.1f}%"


def _experiment_rows(r: dict[str, Any], c: dict[str, str]) -> list[tuple[Any, ...]]:
    """(experiment, the paper's figure, ours, the command): the rows of report.md's table."""
    p, f = PAPER, _Figures(r)
    n, pct = f.n, f.pct
    return [
        ("teachers", f"{p['teacher_errors']} (one 1200x1200 net)",
         f"{r['teacher_ensemble_errors']} (ensemble; members "
         f"{', '.join(map(str, r['teacher_member_errors']))})", c["teachers"]),
        ("800x800 student, hard labels", p["student_hard_errors"], n("student_hard_errors"),
         c["distill_T20"] + " (its baseline)"),
        ("800x800 student distilled at T=20", p["student_distilled_errors"],
         n("student_distilled_errors"), c["distill_T20"]),
        (f"the same at the best T of {{{','.join(SWEEP_T)},20}} (by validation errors)",
         "all T >= 8 similar", f"{n('student_distilled_best_errors')} (T={r['best_T']:g})",
         c["T_sweep"]),
        ("no 3s in the transfer set", f"{p['omit3_errors']} ({p['omit3_errors_on_3']} on 3s)",
         f"{n('omit3_errors')} ({n('omit3_errors_on_3')} on 3s)", c["omit3"]),
        ("... after raising the bias of class 3",
         f"{p['omit3_corrected_errors']} ({p['omit3_corrected_errors_on_3']} on 3s; "
         f"+{p['omit3_bias']})",
         f"{n('omit3_corrected_errors')} ({n('omit3_corrected_errors_on_3')} on 3s; "
         f"+{n('omit3_bias')}, fitted on validation)", c["omit3"]),
        ("3% of the training set, hard targets", f"{pct('hard3pct_test_accuracy', True)} (speech)",
         f"{n('hard3pct_test_errors')} ({pct('hard3pct_test_accuracy')})",
         c["soft_targets_3pct"] + " (its baseline)"),
        ("3% of the training set, soft targets", f"{pct('soft3pct_test_accuracy', True)} (speech)",
         f"{n('soft3pct_test_errors')} ({pct('soft3pct_test_accuracy')})",
         c["soft_targets_3pct"]),
        ("gap to the full-data student recovered by soft targets", "87%",
         pct("soft3pct_gap_recovered"), "-"),
        ("800x800 student, hard labels, shifted views", "-", n("student_hard_views_errors"),
         c["views"] + " (its baseline)"),
        ("800x800 student, consistent shifted views (T=20)", "-", n("student_views_errors"),
         c["views"]),
        ("3% of the training set, hard targets on shifted views", "-",
         n("hard3pct_views_test_errors"), c["soft_targets_3pct_views"] + " (its baseline)"),
        ("3% of the training set, soft targets on shifted views", "-",
         n("soft3pct_views_test_errors"), c["soft_targets_3pct_views"]),
        ("gap recovered on views (all three students on the same views)", "87%",
         pct("soft3pct_views_gap_recovered"), "-"),
    ]  # fmt: skip


def _goal_rows(r: dict[str, Any]) -> list[tuple[Any, ...]]:
    """(goal, target, ours, met): the rows of report.md's goal table."""
    rows = []
    for name, (key, op, target) in GOALS.items():
        value, ok = r[key], r["goals_met"][name]
        shown = value if not isinstance(value, float) else f"{value:.1f}"
        if key.endswith("gap_recovered"):
            shown, target = _Figures(r).pct(key), f"{100 * target:g}%"
        rows.append((name, f"{op} {target}", shown, "yes" if ok else "NO"))
    return rows


def _errors(e: float) -> str:
    """A count of errors, or with seeds a mean."""
    return f"{e:g}" if float(e).is_integer() else f"{e:.2f}"


def markdown(r: dict[str, Any], steps: dict[str, Step], root: Path) -> str:
    seeds = r["seeds"]
    commands = {name: _cmd(step, root) for name, step in steps.items()}
    fields = {**r, "seeds": "one seed."}
    if seeds > 1:
        fields["seeds"] = f"every student with seeds 0-{seeds - 1}: mean ± standard deviation."
    return REPORT.format(
        **fields,
        experiments=table_rows(_experiment_rows(r, commands)),
        goals=table_rows(_goal_rows(r)),
        by_T=", ".join(
            f"T={t}: {_errors(e)} ({_errors(r['val_errors_by_T'][t])} on validation)"
            for t, e in r["errors_by_T"].items()
        ),
    )


def table_rows(rows: Any) -> str:
    """Markdown table rows, one per tuple of cells."""
    return "\n".join("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)


def plot_T(r: dict[str, Any], path: Path) -> None:
    """Test errors against T: the paper's setting and the views, side by side, each with its
    hard-label student and the teachers as lines."""
    plt = artifacts.pyplot()
    spread = r.get("spread", {})
    panels = [
        ("paper setting (no views)", r["errors_by_T"], "student_hard_errors"),
        (
            "consistent shifted views",
            {"20": r["student_views_errors"]},
            "student_hard_views_errors",
        ),
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, (title, by_T, hard) in zip(axes, panels, strict=True):
        ts = sorted(by_T, key=float)
        ax.plot([float(t) for t in ts], [by_T[t] for t in ts], "o-", label="distilled student")
        ax.axhline(r[hard], color="tab:red", ls="--", label="student, hard labels")
        ax.axhline(r["teacher_ensemble_errors"], color="tab:green", ls=":", label="teachers")
        if hard in spread and "std" in spread[hard]:
            low, high = r[hard] - spread[hard]["std"], r[hard] + spread[hard]["std"]
            ax.axhspan(low, high, color="tab:red", alpha=0.1)
        ax.set_xscale("log")
        ax.minorticks_off()
        ax.set_xlim(2.5, 25)
        ax.set_xticks([3, 8, 20], ["3", "8", "20"])
        ax.set_title(title)
        ax.set_xlabel("temperature T")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("test errors (of 10,000)")
    axes[0].legend()
    fig.tight_layout()
    artifacts.save_figure(fig, path, dpi=120, tight=False)


# --- the command ---------------------------------------------------------------------------------


def add_mnist_arguments(parser: argparse.ArgumentParser, seeds: int) -> None:
    """--data-root, --download and --seeds: what the MNIST tools (reproduce, compare) share."""
    parser.add_argument(
        "--data-root",
        default=os.environ.get("DISTILLRUN_DATA", "../shared/data/mnist"),
        help="where MNIST is, in torchvision's layout (default: ../shared/data/mnist)",
    )
    parser.add_argument("--download", action="store_true", help="fetch MNIST into --data-root")
    parser.add_argument(
        "--seeds",
        type=seed_count,
        default=seeds,
        help=f"train every student with seeds 0..N-1 (default {seeds})",
    )


def add_folder_arguments(parser: argparse.ArgumentParser, out: str, what: str) -> None:
    """--out, --resume and the overrides: what every tool that runs steps into a folder takes."""
    parser.add_argument("--out", default=out, help=f"where {what}s go")
    parser.add_argument("--resume", help=f"an interrupted {what}'s folder, to continue")
    parser.add_argument("overrides", nargs="*", help="passed to every stage, e.g. device=cuda")


def seed_count(text: str) -> int:
    """--seeds N: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text}: give a number of seeds >= 1")
    return int(text)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mnist_arguments(parser, seeds=1)
    add_folder_arguments(parser, "outputs/reproduce", "reproduction")
    args = parser.parse_args(argv)
    run_tool("reproduce", lambda: reproduce(args))


def reproduce(args: argparse.Namespace) -> int:
    wanted = {
        "data_root": str(Path(args.data_root).expanduser().resolve()),
        "download": args.download,
        "overrides": args.overrides,
        "seeds": args.seeds,
    }
    # Reproductions started before --seeds existed recorded no seeds: they had one.
    root, state = open_folder(
        args, "distillrun.tools.reproduce", wanted, "reproduction", started_without={"seeds": 1}
    )
    data = [f"dataset.root={wanted['data_root']}"] + (["dataset.download=true"] * args.download)
    steps = plan(root, data, args.overrides, args.seeds)
    code = run_steps("reproduce", root, steps, state)
    if code:
        return code
    return write_report(root, steps, state, args.seeds)


def open_folder(
    args: argparse.Namespace,
    module: str,
    wanted: dict[str, Any],
    what: str,
    started_without: dict[str, Any] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """The --resume folder, if it was started with the arguments `wanted`, else a new folder
    under --out; and its state (STATE: the arguments, the command, the seconds of each step)."""
    if not args.resume:
        command = shlex.join(["python", "-m", module, *sys.argv[1:]])
        state = {"arguments": wanted, "command": command, "started": artifacts.now(), "seconds": {}}
        return new_folder(args.out, state), state
    root = Path(args.resume).expanduser().resolve()
    try:
        state = json.loads((root / STATE).read_text())
        # (reproduce-specialists kept its overrides beside the seconds until 2026-12)
        given = state["arguments"] if "arguments" in state else {"overrides": state["overrides"]}
        started = {**(started_without or {}), **given}
        state["seconds"], state["command"]  # noqa: B018 - both must be there
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"--resume {root} is not a {what} folder ({STATE} missing or damaged: {e}): "
            f"pass {args.out}/<timestamp>"
        ) from e
    if started != wanted:
        names = [k if k == "overrides" else "--" + k.replace("_", "-") for k in wanted]
        raise UserError(
            f"--resume {root} was started with {given}: resume it with the same "
            f"{', '.join(names)}, or start a new {what}"
        )
    return root, state


def new_folder(out: str, state: dict[str, Any]) -> Path:
    """A new reproduction folder under `out`, named by the time, holding `state` as STATE."""
    stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
    root = Path(out).expanduser().resolve() / stamp
    try:
        root.mkdir(parents=True)
        artifacts.write_json(root / STATE, state)
    except OSError as e:
        why = e.strerror or e
        raise UserError(f"cannot write {root} ({why}): choose a writable --out") from e
    return root


def run_steps(program: str, root: Path, steps: list[Step], state: dict[str, Any]) -> int:
    """Run the steps in order, each into its folder of `root`, adding each attempt's seconds to
    `state` (written to STATE after every step); the exit code of a step that stopped, else 0."""
    print(f"distillrun {program}: {len(steps)} steps into {root}")
    again = f"continue with `{state['command']} --resume {root}`"
    for i, step in enumerate(steps, 1):
        folder = root / step.name
        print(f"\n[{i}/{len(steps)}] {step.name}: {shlex.join(step.command(folder))}", flush=True)
        start = time.perf_counter()
        try:
            code = run_step(step, folder)
        except KeyboardInterrupt as e:
            print(
                f"distillrun {program}: interrupted in step {step.name}; {again}", file=sys.stderr
            )
            code = interrupted_exit_code(e)
        finally:  # the minutes of the report count every attempt's work
            spent = state["seconds"].get(step.name, 0.0) + time.perf_counter() - start
            state["seconds"][step.name] = spent
            artifacts.write_json(root / STATE, state)
        if code in (130, 143):
            return code
        if code:
            print(
                f"distillrun {program}: step {step.name} stopped (exit {code}); {again}",
                file=sys.stderr,
            )
            return code
    return 0


def write_report(root: Path, steps: list[Step], state: dict[str, Any], seeds: int = 1) -> int:
    r = results(root, seeds)
    r["minutes"] = sum(state["seconds"].values()) / 60
    r["goals_met"] = {name: _met(r[key], op, target) for name, (key, op, target) in GOALS.items()}
    r |= provenance(root, steps, state, PAPER)
    artifacts.write_json(root / "report.json", r)
    plot_T(r, root / "errors_vs_T.png")  # written atomically
    artifacts.atomic_write(
        root / "report.md", lambda f: f.write(markdown(r, {s.name: s for s in steps}, root)), "w"
    )
    met = sum(bool(v) for v in r["goals_met"].values())
    print(
        f"\ndistillrun reproduce: {r['minutes']:.1f} minutes, {met} of {len(GOALS)} goals met; "
        f"{root / 'report.md'}"
    )
    return 0


if __name__ == "__main__":
    main()
