"""`make reproduce` (python -m distillrun.reproduce): the paper's MNIST results, one command.

Runs distillrun's stages with the experiment presets, one after another, into one folder
outputs/reproduce/<timestamp>/ (a run or sweep folder per step), then writes report.md (each
experiment: the paper's figure, ours, the command that produced it) and report.json there.

    python -m distillrun.reproduce [--data-root ../shared/data/mnist] [--download]
        [--out outputs/reproduce] [--resume outputs/reproduce/<timestamp>] [override ...]

Overrides (e.g. device=cuda) go to every step. An interrupted reproduction continues with
--resume: complete steps are kept, an interrupted run continues from its last epoch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from distillrun import artifacts, summary
from distillrun.errors import UserError, interrupted_exit_code, raise_terminated

PAPER = {  # METHOD.md sections 3 and 4
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
GOALS = {  # the goals: (report.json key, operator, target)
    "distilled student": ("student_distilled_errors", "<=", 74),
    "teacher ensemble": ("teacher_ensemble_errors", "<=", 60),
    "omitted 3, corrected": ("omit3_corrected_errors", "<=", 109),
    "3%: gap recovered by soft targets": ("soft3pct_gap_recovered", ">=", 0.8),
    "minutes": ("minutes", "<=", 45),
}
SWEEP_T = "3,8"  # the small sweep; with the T=20 run, the best T is chosen on validation errors
STATE = "reproduce.json"  # the reproduction's own record: its arguments and its steps


@dataclass
class Step:
    name: str  # its folder in the reproduction folder
    stage: str
    overrides: list[str]
    sweep: str | None = None  # "key=v1,v2": a -m sweep over it

    def command(self, folder: Path) -> list[str]:
        where = f"hydra.sweep.dir={folder}" if self.sweep else f"hydra.run.dir={folder}"
        sweep = ["-m", self.sweep] if self.sweep else []
        return ["distillrun", self.stage, *sweep, *self.overrides, where]


def plan(root: Path, data: list[str], extra: list[str]) -> list[Step]:
    """The steps, in order: teachers first; every student is distilled from them."""
    teachers = [f"teachers={root / 'teachers'}"]
    student = [*teachers, *data, *extra]
    return [
        Step("teachers", "train-teachers", ["+experiment=mnist_cnn_teachers", *data, *extra]),
        Step("distill_T20", "distill", ["+experiment=hinton_mnist", *student]),
        Step(
            "T_sweep",
            "distill",
            ["+experiment=hinton_mnist", "baseline=false", *student],
            sweep=f"T={SWEEP_T}",
        ),
        Step("omit3", "distill", ["+experiment=omit3", "baseline=false", *student]),
        Step("soft_targets_3pct", "distill", ["+experiment=soft_targets_3pct", *student]),
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


def run_step(step: Step, folder: Path) -> int:
    """Run a step into `folder`, keeping what an earlier, interrupted attempt finished."""
    if not folder.exists():
        return _stage(step.command(folder)[1:])
    if not step.sweep:
        if _complete(folder, step.stage):
            print("complete: kept")
            return 0
        return _stage([step.stage, f"resume={folder}"])
    # A sweep: resume its unfinished jobs, run the ones it never started, then summarise it.
    key, listed = step.sweep.split("=", 1)
    values = listed.split(",")
    kept = 0
    for n, value in enumerate(values):
        job = folder / str(n)
        if job.exists() and _complete(job, step.stage):
            kept += 1
            continue
        if job.exists():
            code = _stage([step.stage, f"resume={job}"])
        else:
            code = _stage([step.stage, *step.overrides, f"{key}={value}", f"hydra.run.dir={job}"])
        if code:
            return code
    if kept == len(values):
        print("complete: kept")
    else:
        rows = summary.collect(folder)
        summary.summarise(rows, folder, f"{step.stage} sweep, resumed: {len(rows)} jobs")
    return 0


# --- the report ----------------------------------------------------------------------------------


def _metrics(folder: Path, stage: str) -> dict[str, Any]:
    return artifacts.complete_run(folder, stage)["metrics"]


def results(root: Path) -> dict[str, Any]:
    """report.json's figures, read from the steps' manifests."""
    teachers_run = artifacts.complete_run(root / "teachers", "train-teachers")
    teachers = teachers_run["metrics"]
    t20 = _metrics(root / "distill_T20", "distill")
    omit3 = _metrics(root / "omit3", "distill")
    small = _metrics(root / "soft_targets_3pct", "distill")
    # The best T by validation errors (then NLL), never by test errors.
    by_T = {20.0: t20}
    for job in artifacts.sweep_jobs(root / "T_sweep"):
        run = artifacts.complete_run(job, "distill")
        by_T[float(run["config"]["T"])] = run["metrics"]
    best_T = min(by_T, key=lambda t: (by_T[t]["val_errors"], by_T[t]["val_nll"]))
    hard = t20["baseline_test_errors"]
    hard3, soft3 = small["baseline_test_errors"], small["test_errors"]
    return {
        "device": teachers_run.get("device"),
        "teacher_ensemble_errors": teachers["test_errors"],
        "teacher_member_errors": [m["test_errors"] for m in teachers["members"]],
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
        "soft3pct_gap_recovered": (hard3 - soft3) / (hard3 - hard) if hard3 != hard else None,
    }


def _met(value: Any, op: str, target: float) -> bool | None:
    if value is None:
        return None
    return value <= target if op == "<=" else value >= target


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


def markdown(r: dict[str, Any], steps: dict[str, Step], root: Path) -> str:
    p, pct = PAPER, lambda x: f"{100 * x:.1f}%"
    c = {name: _cmd(step, root) for name, step in steps.items()}
    rows = [
        ("teachers", f"{p['teacher_errors']} (one 1200x1200 net)",
         f"{r['teacher_ensemble_errors']} (ensemble; members "
         f"{', '.join(map(str, r['teacher_member_errors']))})", c["teachers"]),
        ("800x800 student, hard labels", p["student_hard_errors"], r["student_hard_errors"],
         c["distill_T20"] + " (its baseline)"),
        ("800x800 student distilled at T=20", p["student_distilled_errors"],
         r["student_distilled_errors"], c["distill_T20"]),
        (f"the same at the best T of {{{SWEEP_T},20}} (by validation errors)",
         "all T >= 8 similar", f"{r['student_distilled_best_errors']} (T={r['best_T']:g})",
         c["T_sweep"]),
        ("no 3s in the transfer set", f"{p['omit3_errors']} ({p['omit3_errors_on_3']} on 3s)",
         f"{r['omit3_errors']} ({r['omit3_errors_on_3']} on 3s)", c["omit3"]),
        ("... after raising the bias of class 3",
         f"{p['omit3_corrected_errors']} ({p['omit3_corrected_errors_on_3']} on 3s; "
         f"+{p['omit3_bias']})",
         f"{r['omit3_corrected_errors']} ({r['omit3_corrected_errors_on_3']} on 3s; "
         f"+{r['omit3_bias']:g}, fitted on validation)", c["omit3"]),
        ("3% of the training set, hard targets", f"{pct(p['hard3pct_test_accuracy'])} (speech)",
         f"{r['hard3pct_test_errors']} ({pct(r['hard3pct_test_accuracy'])})",
         c["soft_targets_3pct"] + " (its baseline)"),
        ("3% of the training set, soft targets", f"{pct(p['soft3pct_test_accuracy'])} (speech)",
         f"{r['soft3pct_test_errors']} ({pct(r['soft3pct_test_accuracy'])})",
         c["soft_targets_3pct"]),
        ("gap to the full-data student recovered by soft targets", "87%",
         "-" if r["soft3pct_gap_recovered"] is None else pct(r["soft3pct_gap_recovered"]), "-"),
    ]  # fmt: skip
    lines = [
        "# distillrun: reproducing Hinton, Vinyals and Dean (2015) on MNIST",
        "",
        f"{r['date']} on {r['machine']} ({r['device']}); torch {r['torch']}; "
        f"{r['minutes']:.1f} minutes.",
        "",
        "Test errors of 10,000 (the paper's section 4 figures are frame accuracies of its "
        "speech model; ours are MNIST's, with accuracies in brackets).",
        "",
        "| experiment | paper | distillrun | command |",
        "| --- | --- | --- | --- |",
        *(f"| {a} | {b} | {c_} | {d} |" for a, b, c_, d in rows),
        "",
        "| goal | target | distillrun | met |",
        "| --- | --- | --- | --- |",
    ]
    for name, (key, op, target) in GOALS.items():
        value, ok = r[key], r["goals_met"][name]
        shown = f"{value:.2f}" if isinstance(value, float) else value
        lines.append(f"| {name} | {op} {target} | {shown} | {'yes' if ok else 'NO'} |")
    by_T = ", ".join(
        f"T={t}: {e} ({r['val_errors_by_T'][t]} on validation)" for t, e in r["errors_by_T"].items()
    )
    lines += [
        "",
        f"Test errors by T: {by_T}. Plot of the sweep: "
        "[T_sweep/errors_vs_T.png](T_sweep/errors_vs_T.png).",
        "",
        f"Reproduce: `{r['command']}`",
        "",
    ]
    return "\n".join(lines)


# --- the command ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data-root",
        default=os.environ.get("DISTILLRUN_DATA", "../shared/data/mnist"),
        help="where MNIST is, in torchvision's layout (default: ../shared/data/mnist)",
    )
    parser.add_argument("--download", action="store_true", help="fetch MNIST into --data-root")
    parser.add_argument("--out", default="outputs/reproduce", help="where reproductions go")
    parser.add_argument("--resume", help="an interrupted reproduction's folder, to continue")
    parser.add_argument("overrides", nargs="*", help="passed to every stage, e.g. device=cuda")
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        sys.exit(reproduce(args))
    except UserError as e:
        print(f"distillrun reproduce: {e}", file=sys.stderr)
        sys.exit(2)


def reproduce(args: argparse.Namespace) -> int:
    command = shlex.join(["python", "-m", "distillrun.reproduce", *sys.argv[1:]])
    wanted = {
        "data_root": str(Path(args.data_root).expanduser().resolve()),
        "download": args.download,
        "overrides": args.overrides,
    }
    if args.resume:
        root = Path(args.resume).expanduser().resolve()
        state = _read_state(root)
        if state["arguments"] != wanted:
            raise UserError(
                f"--resume {root} was started with {state['arguments']}: resume it with the "
                "same --data-root, --download and overrides, or start a new reproduction"
            )
    else:
        stamp = dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S-%f")
        root = Path(args.out).expanduser().resolve() / stamp
        state = {"arguments": wanted, "command": command, "started": artifacts.now(), "seconds": {}}
        try:
            root.mkdir(parents=True)
            artifacts.write_json(root / STATE, state)
        except OSError as e:
            why = e.strerror or e
            raise UserError(f"cannot write {root} ({why}): choose a writable --out") from e
    data = [f"dataset.root={wanted['data_root']}"] + (["dataset.download=true"] * args.download)
    steps = plan(root, data, args.overrides)
    print(f"distillrun reproduce: {len(steps)} steps into {root}")
    again = f"continue with `{state['command']} --resume {root}`"
    for i, step in enumerate(steps, 1):
        folder = root / step.name
        print(f"\n[{i}/{len(steps)}] {step.name}: {shlex.join(step.command(folder))}", flush=True)
        start = time.perf_counter()
        try:
            code = run_step(step, folder)
        except KeyboardInterrupt as e:
            print(
                f"distillrun reproduce: interrupted in step {step.name}; {again}", file=sys.stderr
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
                f"distillrun reproduce: step {step.name} stopped (exit {code}); {again}",
                file=sys.stderr,
            )
            return code
    return write_report(root, steps, state)


def _read_state(root: Path) -> dict[str, Any]:
    try:
        state = json.loads((root / STATE).read_text())
        state["arguments"], state["seconds"]  # noqa: B018 - both must be there
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(
            f"--resume {root} is not a reproduction folder ({STATE} missing or damaged: {e}): "
            "pass outputs/reproduce/<timestamp>"
        ) from e
    return state


def write_report(root: Path, steps: list[Step], state: dict[str, Any]) -> int:
    r = results(root)
    r["minutes"] = sum(state["seconds"].values()) / 60
    r["goals_met"] = {name: _met(r[key], op, target) for name, (key, op, target) in GOALS.items()}
    r |= {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "torch": metadata.version("torch"),
        "command": state["command"],
        "paper": PAPER,
        "runs": {s.name: str(root / s.name) for s in steps},
    }
    artifacts.write_json(root / "report.json", r)
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
