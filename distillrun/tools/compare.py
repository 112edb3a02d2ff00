"""`make compare` (python -m distillrun.tools.compare): the logit losses side by side.

Every loss of `loss=` (and KD and DKD with logit standardisation) and the hard-label baseline,
with seeds 0..N-1, in two settings, run as ordinary distillrun commands into one folder
outputs/compare/<timestamp>/ (a run or sweep folder per step); then report.md and report.json
there: each method's test errors, mean ± sample standard deviation over the seeds.

- digits: scikit-learn's digits (no download), all of its training split, on views shifted by
  up to 1 pixel, distilled from five small CNNs (the demo's teachers). Minutes.
- mnist_3pct_views: `make reproduce`'s soft_targets_3pct_views (3% of MNIST, views shifted by up
  to 1 pixel, 300 epochs) from its five CNN teachers: those of a `make reproduce` named with
  --teachers <its folder>/teachers, else trained here as reproduce trains them.

    python -m distillrun.tools.compare [--data-root ../shared/data/mnist] [--download]
        [--teachers <reproduction>/teachers] [--seeds 3] [--settings digits,mnist_3pct_views]
        [--out outputs/compare] [--resume outputs/compare/<timestamp>] [override ...]

Overrides (e.g. device=cuda) go to every step. An interrupted comparison continues with
--resume: complete steps are kept, an interrupted run continues from its last epoch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from distillrun.errors import UserError, run_tool
from distillrun.runs import artifacts
from distillrun.tools.reproduce import (
    Step,
    _mean,
    _runs,
    _std,
    add_folder_arguments,
    add_mnist_arguments,
    machine,
    open_folder,
    run_steps,
    table_rows,
)

MINUTES_GOAL = 30  # the issue's: the whole comparison within 30 minutes on 2 CPU cores


@dataclass(frozen=True)
class Method:
    """A row of the table: the distill overrides of a loss and where its settings come from."""

    name: str  # its step's folder
    label: str
    overrides: tuple[str, ...]
    source: str


# The later losses, each with its paper's published settings (docs/method.md#later-logit-losses).
# alpha turns the published `CE + term` into alpha * term + (1 - alpha) * CE at another overall
# scale, which Adam (the students' optimiser here) does not see.
LATER = (
    Method(
        "kd_ls",
        "KD + logit standardisation",
        ("loss=kd", "loss.standardize=true", "T=2", "alpha=0.989010989010989"),
        "published (Sun et al. 2024, CIFAR-100): T 2, KD weight 9, CE 0.1 (alpha 9/9.1)",
    ),
    Method(
        "logit_mse",
        "logit matching (MSE)",
        ("loss=logit_mse", "alpha=1.0"),
        "published (Ba and Caruana 2014): regression on the logits alone (alpha 1)",
    ),
    Method(
        "dkd",
        "DKD",
        ("loss=dkd", "T=4", "alpha=0.5"),
        "published (Zhao et al. 2022, CIFAR-100): alpha_t 1, beta_n 8, T 4, warm-up 20 epochs, "
        "CE 1 (alpha 0.5)",
    ),
    Method(
        "dkd_ls",
        "DKD + logit standardisation",
        ("loss=dkd", "loss.standardize=true", "T=2", "alpha=0.9"),
        "published (logit-standardization-KD's code, CIFAR-100): DKD's alpha_t and beta_n times "
        "9, T 2, CE 1 (alpha 0.9)",
    ),
    Method(
        "dist",
        "DIST",
        ("loss=dist", "T=4", "alpha=0.5"),
        "published (Huang et al. 2022, CIFAR-100): beta = gamma = 2, tau 4, CE 1 (alpha 0.5)",
    ),
    Method(
        "nkd",
        "NKD",
        ("loss=nkd", "T=1", "alpha=0.5"),
        "published (Yang et al. 2023, its code's default): temp 1, gamma 1.5, CE 1 (alpha 0.5)",
    ),
)


@dataclass(frozen=True)
class Setting:
    name: str  # its folder in the comparison folder
    title: str
    teachers: tuple[str, ...]  # train-teachers overrides
    student: tuple[str, ...]  # distill overrides of every method
    kd: Method  # KD's settings in this setting (its step also trains the hard-label baseline)
    needs_mnist: bool = False
    methods: tuple[Method, ...] = field(default=LATER)


SETTINGS = {
    "digits": Setting(
        "digits",
        "digits: all 1,212 training images, views shifted by up to 1 pixel",
        ("model=cnn", "augment=shift", "augment.pixels=1", "train.epochs=60"),  # the demo's
        ("augment=shift", "augment.pixels=1", "train.epochs=200", "train.batch_size=32"),
        Method(
            "kd",
            "KD",
            ("T=4", "alpha=0.9"),
            "published (CRD's and DKD's KD on CIFAR-100): T 4, alpha 0.9",
        ),
    ),
    "mnist_3pct_views": Setting(
        "mnist_3pct_views",
        "MNIST: 3% of the training set, views shifted by up to 1 pixel (soft_targets_3pct_views)",
        ("+experiment=mnist_cnn_teachers",),
        ("+experiment=soft_targets_3pct_views",),
        Method(
            "kd",
            "KD",
            (),
            "the preset's T 20, alpha 1, chosen on validation errors (docs/reproduction.md)",
        ),
        needs_mnist=True,
    ),
}


def methods(setting: Setting) -> list[Method]:
    """The setting's rows after the hard labels: its KD, then the later losses."""
    return [setting.kd, *setting.methods]


def teachers_folder(root: Path, setting: Setting, given: Path | None) -> Path:
    """The setting's teachers: the named ones (MNIST only), else its own teachers step's."""
    return given if given is not None and setting.needs_mnist else root / setting.name / "teachers"


def plan(
    root: Path,
    settings: list[str],
    data: list[str],
    extra: list[str],
    seeds: int = 3,
    teachers: Path | None = None,
) -> list[Step]:
    """The steps, setting by setting: its teachers (unless given), then one step per method,
    KD's with the hard-label baseline; each a sweep over the seeds when there are several."""
    seed = {"seed": [str(s) for s in range(seeds)]} if seeds > 1 else {}
    steps = []
    for name in settings:
        setting = SETTINGS[name]
        own = [*data, *extra] if setting.needs_mnist else list(extra)
        where = teachers_folder(root, setting, teachers)
        if where == root / name / "teachers":
            steps.append(Step(f"{name}/teachers", "train-teachers", [*setting.teachers, *own]))
        for method in methods(setting):
            baseline = "baseline=true" if method is setting.kd else "baseline=false"
            overrides = [*setting.student, *method.overrides, baseline, f"teachers={where}", *own]
            steps.append(Step(f"{name}/{method.name}", "distill", overrides, dict(seed)))
    return steps


# --- the report ----------------------------------------------------------------------------------


def _spread(values: list[float]) -> dict[str, Any]:
    return {
        "mean": _mean(values),
        "std": _std(values) if len(values) > 1 else None,
        "values": values,
    }


def setting_results(root: Path, setting: Setting, teachers: Path) -> dict[str, Any]:
    """One setting's figures: the teachers', and each method's test errors and accuracy over
    its seeds (the hard-label baseline from KD's runs)."""
    ensemble = artifacts.complete_run(teachers, "train-teachers")["metrics"]
    rows: dict[str, Any] = {}
    for method in methods(setting):
        runs = sorted(_runs(root / setting.name / method.name, "distill"), key=_seed)
        if method is setting.kd:
            rows["hard"] = {
                "label": "hard labels (no teacher)",
                "source": "alpha 0: the KD runs' baselines, same students and views",
                **_figures(runs, "baseline_"),
            }
        rows[method.name] = {"label": method.label, "source": method.source, **_figures(runs)}
        rows[method.name]["overrides"] = list(method.overrides)
    return {
        "title": setting.title,
        "teachers": str(teachers),
        "teacher_ensemble_errors": ensemble["test_errors"],
        "methods": rows,
    }


def _seed(run: dict[str, Any]) -> int:
    return run["config"]["seed"]


def _figures(runs: list[dict[str, Any]], prefix: str = "") -> dict[str, Any]:
    metrics = [run["metrics"] for run in runs]
    return {
        "seeds": [_seed(run) for run in runs],
        "test_errors": _spread([m[f"{prefix}test_errors"] for m in metrics]),
        "test_accuracy": _spread([m[f"{prefix}test_accuracy"] for m in metrics]),
        "val_errors": _spread([m[f"{prefix}val_errors"] for m in metrics]),
    }


def _shown(spread: dict[str, Any], digits: int = 1) -> str:
    """A mean ± sd (or the one value) for report.md."""
    if spread["std"] is None:
        return f"{spread['mean']:g}"
    return f"{spread['mean']:.{digits}f} ± {spread['std']:.{digits}f}"


def _percent(spread: dict[str, Any]) -> dict[str, Any]:
    std = spread["std"]
    return {"mean": 100 * spread["mean"], "std": None if std is None else 100 * std}


REPORT = """\
# distillrun: the logit losses compared

{date} on {machine} ({device}); torch {torch}; {minutes:.1f} minutes of steps (goal: at most \
{goal}; {met}); {seeds}

Test errors of each method, mean ± sample standard deviation over the seeds (the accuracy in \
brackets). Every method of a setting trains the same student on the same views from the same \
teachers; only the loss differs. Hyperparameters: the published ones, or chosen on validation \
errors, as each row says. The commands' paths are relative to this folder.
{settings}
Reproduce: `{command}`
"""

SETTING = """
## {title}

Teachers: {teacher_ensemble_errors} test errors (the ensemble; `{teachers}`).

| method | test errors | test accuracy | validation errors | hyperparameters | command |
| --- | --- | --- | --- | --- | --- |
{rows}
"""


def markdown(r: dict[str, Any], steps: dict[str, Step], root: Path) -> str:
    parts = []
    for name, s in r["settings"].items():
        rows = []
        for key, m in s["methods"].items():
            step = steps[f"{name}/{'kd' if key == 'hard' else key}"]
            command = "`" + shlex.join(step.command(root / step.name)).replace(f"{root}/", "") + "`"
            rows.append((
                m["label"],
                f"**{_shown(m['test_errors'])}**",
                f"{_shown(_percent(m['test_accuracy']), 2)}%",
                _shown(m["val_errors"]),
                m["source"],
                command + (" (its baselines)" if key == "hard" else ""),
            ))  # fmt: skip
        parts.append(SETTING.format(**s, rows=table_rows(rows)))
    seeds = r["seeds"]
    fields = {
        **r,
        "seeds": f"seeds 0-{seeds - 1}." if seeds > 1 else "one seed.",
        "goal": MINUTES_GOAL,
        "met": "met" if r["minutes"] <= MINUTES_GOAL else "NOT met",
        "settings": "".join(parts),
    }
    return REPORT.format(**fields)


def write_report(
    root: Path, steps: list[Step], state: dict[str, Any], teachers: Path | None
) -> int:
    args = state["arguments"]
    settings = {
        name: setting_results(root, SETTINGS[name], teachers_folder(root, SETTINGS[name], teachers))
        for name in args["settings"]
    }
    first = next(iter(settings.values()))
    r = {
        "date": dt.date.today().isoformat(),
        "machine": machine(),
        "device": artifacts.complete_run(Path(first["teachers"]), "train-teachers").get("device"),
        "torch": metadata.version("torch"),
        "seeds": args["seeds"],
        "minutes": sum(state["seconds"].values()) / 60,
        "minutes_by_step": {k: v / 60 for k, v in state["seconds"].items()},
        "minutes_goal": MINUTES_GOAL,
        "command": state["command"],
        "settings": settings,
        "runs": {s.name: str(root / s.name) for s in steps},
    }
    artifacts.write_json(root / "report.json", r)
    text = markdown(r, {s.name: s for s in steps}, root)
    artifacts.atomic_write(root / "report.md", lambda f: f.write(text), "w")
    print(f"\ndistillrun compare: {r['minutes']:.1f} minutes; {root / 'report.md'}")
    return 0


# --- the command ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_mnist_arguments(parser, seeds=3)
    parser.add_argument(
        "--teachers",
        help="a complete train-teachers run on MNIST, e.g. a `make reproduce` folder's teachers "
        "(default: train them here as reproduce does)",
    )
    parser.add_argument(
        "--settings",
        type=setting_names,
        default=list(SETTINGS),
        help=f"the settings to compare in, with commas (default: {','.join(SETTINGS)})",
    )
    add_folder_arguments(parser, "outputs/compare", "comparison")
    args = parser.parse_args(argv)
    run_tool("compare", lambda: compare(args))


def setting_names(text: str) -> list[str]:
    """--settings digits,mnist_3pct_views: the names, each once, in that order."""
    names = list(dict.fromkeys(text.split(",")))
    unknown = [name for name in names if name not in SETTINGS]
    if unknown:
        raise argparse.ArgumentTypeError(f"{', '.join(unknown)}: use {', '.join(SETTINGS)}")
    return names


def given_teachers(folder: str | None) -> Path | None:
    """--teachers, checked: a complete train-teachers run on MNIST."""
    if folder is None:
        return None
    path = Path(folder).expanduser().resolve()
    run = artifacts.complete_run(path, "train-teachers")
    dataset = run["config"]["dataset"]["name"]
    if dataset != "mnist":
        raise UserError(
            f"--teachers {path} was trained on dataset={dataset}: name a train-teachers run on "
            "MNIST (a `make reproduce` folder's teachers), or leave --teachers out"
        )
    return path


def compare(args: argparse.Namespace) -> int:
    teachers = given_teachers(args.teachers)
    wanted = {
        "data_root": str(Path(args.data_root).expanduser().resolve()),
        "download": args.download,
        "teachers": None if teachers is None else str(teachers),
        "seeds": args.seeds,
        "settings": args.settings,
        "overrides": args.overrides,
    }
    root, state = open_folder(args, "distillrun.tools.compare", wanted, "comparison")
    data = [f"dataset.root={wanted['data_root']}"] + (["dataset.download=true"] * args.download)
    steps = plan(root, wanted["settings"], data, args.overrides, args.seeds, teachers)
    code = run_steps("compare", root, steps, state)
    if code:
        return code
    return write_report(root, steps, state, teachers)


if __name__ == "__main__":
    main()
