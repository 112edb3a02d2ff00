"""`make reproduce-specialists` (python -m distillrun.tools.reproduce_specialists): the paper's
specialists (docs/method.md#specialists) on a data set where its regime holds, one command.

Runs, one after another, into outputs/reproduce-specialists/<timestamp>/ (a run folder per
step): the generalist, its specialists, the KL combination (evaluate), the combination
distilled back into one net of the generalist's size, and, as the control, the same net
distilled from the generalist alone. Then writes report.md (the overall relative gain, the
table by the number of specialists covering the correct class beside the paper's, the
distilled-back net, the goals) and report.json there.

    python -m distillrun.tools.reproduce_specialists [--out outputs/reproduce-specialists]
        [--resume outputs/reproduce-specialists/<timestamp>] [override ...]

Overrides (e.g. device=cuda, dataset.seed=1, model.hidden=[64]) go to the steps whose stage
has their key (TAKEN_BY); evaluate reads its data from the specialists run. An interrupted
reproduction continues with --resume: complete steps are kept, an interrupted run continues
from its last epoch.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path
from typing import Any

from distillrun.errors import run_tool
from distillrun.runs import artifacts
from distillrun.tools.reproduce import (
    Step,
    add_folder_arguments,
    open_folder,
    provenance,
    run_steps,
    table_rows,
)

# docs/method.md#specialists, JFT: (specialists covering the correct class, test examples, top-1
# correct gained, relative accuracy change).
PAPER_ROWS = [
    ("0", 350037, 0, 0.0),
    ("1", 141993, 1421, 0.034),
    ("2", 67161, 1572, 0.074),
    ("3", 38801, 1124, 0.088),
    ("4", 26298, 835, 0.105),
    ("5", 16474, 561, 0.111),
    ("6", 10682, 362, 0.113),
    ("7", 7376, 232, 0.128),
    ("8", 4703, 182, 0.136),
    ("9", 4706, 208, 0.166),
    ("10+", 9082, 324, 0.141),
]
PAPER = {"generalist_accuracy": 0.250, "combined_accuracy": 0.261, "relative_gain": 0.044}
GROUPS = ("0", "1", "2", "3", "4+")  # the report's rows: 4 or more specialists in one row
GOALS = {  # the goals: (report.json key, operator, target)
    "combined vs generalist, relative": ("relative_gain", ">=", 0.03),
    "rises from 1 to 3+ specialists covering": ("coverage_rises", "==", True),
    "distilled back beats the generalist": ("distilled_back_gain", ">", 0.0),
    "minutes": ("minutes", "<=", 20),
}


def plan(root: Path, extra: list[str]) -> list[Step]:
    """The steps, in order, each reading the folder of the one before."""

    def step(name: str, stage: str, *overrides: str) -> Step:
        return Step(name, stage, [*overrides, *for_stage(stage, extra)])

    generalist = f"generalist={root / 'generalist'}"
    return [
        step("generalist", "train-teachers", "+experiment=jft_like_generalist"),
        step("specialists", "specialists", "+experiment=jft_like_specialists", generalist),
        step("evaluate", "evaluate", f"specialists={root / 'specialists'}"),
        step(
            "distill_back",
            "distill",
            "+experiment=jft_like_distill",
            f"teachers={root / 'evaluate'}",
        ),
        step(
            "distill_generalist",
            "distill",
            "+experiment=jft_like_distill",
            f"teachers={root / 'generalist'}",
            "baseline=false",
        ),
    ]


# The stages that take an override, by its first key; keys every stage has go to all of them.
# model= sets the generalist and the nets distilled back (specialists copy the generalist's).
TAKEN_BY = {
    "dataset": ("train-teachers", "specialists", "distill"),
    "optim": ("train-teachers", "specialists", "distill"),
    "model": ("train-teachers", "distill"),
    "teachers": ("train-teachers",),
    "specialists": ("specialists",),
    "n": ("evaluate",),
    "optimizer": ("evaluate",),
    "tolerance": ("evaluate",),
    "max_iter": ("evaluate",),
    "T": ("distill",),
    "alpha": ("distill",),
    "transfer": ("distill",),
}


def for_stage(stage: str, overrides: list[str]) -> list[str]:
    """The overrides `stage` takes (`dataset.seed=1` goes to every stage with a dataset)."""
    key = lambda o: o.lstrip("+~").split("=")[0].split(".")[0]  # noqa: E731
    return [o for o in overrides if stage in TAKEN_BY.get(key(o), (stage,))]


# --- the report ----------------------------------------------------------------------------------


def grouped(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """evaluate's by_coverage rows merged into the report's rows 0, 1, 2, 3 and 4+ (absent
    where no test example falls in them); relative_change is None where the generalist had none
    of a row's examples right."""
    out = []
    for i, label in enumerate(GROUPS):
        mine = [r for r in rows if min(r["covering"], len(GROUPS) - 1) == i]
        if not mine:
            continue
        g = sum(r["generalist_correct"] for r in mine)
        b = sum(r["combined_correct"] for r in mine)
        n = sum(r["examples"] for r in mine)
        out.append(
            {
                "covering": label,
                "examples": n,
                "generalist_accuracy": g / n,
                "gained": b - g,
                "relative_change": (b - g) / g if g else None,
            }
        )
    return out


def paper_grouped() -> list[dict[str, Any]]:
    """The paper's rows merged the same way; the 4+ row's relative change is derived from its
    rows (each row's generalist correct = gained / relative change)."""
    out = []
    for i, label in enumerate(GROUPS):
        mine = [r for r in PAPER_ROWS if min(int(r[0].rstrip("+")), len(GROUPS) - 1) == i]
        gained = sum(r[2] for r in mine)
        base = sum(r[2] / r[3] for r in mine if r[3])
        out.append(
            {
                "covering": label,
                "examples": sum(r[1] for r in mine),
                "gained": gained,
                "relative_change": gained / base if base else 0.0,
            }
        )
    return out


def coverage_rises(rows: list[dict[str, Any]]) -> bool:
    """The issue's test of the table's shape: at least three rows with a relative change, among
    them the 1-specialist row and a 3-or-more row, and every 3-or-more row above the 1 row."""
    change = {r["covering"]: r["relative_change"] for r in rows if r["relative_change"] is not None}
    high = [change[k] for k in ("3", "4+") if k in change]
    return len(change) >= 3 and "1" in change and bool(high) and min(high) > change["1"]


def _train_accuracy(generalist: Path) -> float:
    """The generalist's accuracy on its own training split: well below 1 when it is limited by
    its capacity rather than by its data."""
    from distillrun.core.data import load_dataset  # torch: only once the steps are done

    run = artifacts.complete_run(generalist, "train-teachers")
    data = load_dataset(run["dataset"]["config"])
    logits = artifacts.load_tensors(generalist / "logits.pt")["train"][0]
    return float((logits.argmax(dim=1) == data.y_train.cpu()).float().mean())


def results(root: Path) -> dict[str, Any]:
    """report.json's figures, read from the steps' manifests."""
    generalist = artifacts.complete_run(root / "generalist", "train-teachers")
    specialists = artifacts.complete_run(root / "specialists", "specialists")["metrics"]
    ev = artifacts.complete_run(root / "evaluate", "evaluate")["metrics"]
    back = artifacts.complete_run(root / "distill_back", "distill")["metrics"]
    control = artifacts.complete_run(root / "distill_generalist", "distill")["metrics"]
    g, c = ev["generalist_accuracy"], ev["combined_accuracy"]
    rows = grouped(ev["by_coverage"])
    sizes = [len(s) for s in specialists_clusters(root)]
    return {
        "device": generalist.get("device"),
        "dataset": generalist["dataset"]["config"],
        "test_examples": generalist["dataset"]["sizes"]["test"],
        "generalist_train_accuracy": _train_accuracy(root / "generalist"),
        "generalist_accuracy": g,
        "combined_accuracy": c,
        "relative_gain": (c - g) / g if g else None,
        "generalist_conditional_accuracy": ev["generalist_conditional_accuracy"],
        "combined_conditional_accuracy": ev["combined_conditional_accuracy"],
        "specialists": specialists["clusters"],
        "cluster_sizes": sizes,
        "cluster_ari": specialists.get("cluster_ari"),
        "by_coverage": rows,
        "coverage_rises": coverage_rises(rows),
        "by_active_coverage": grouped(ev["by_active_coverage"]),
        "distilled_back_accuracy": back["test_accuracy"],
        "distilled_back_gain": back["test_accuracy"] - g,
        "hard_labels_accuracy": back["baseline_test_accuracy"],
        "distilled_from_generalist_accuracy": control["test_accuracy"],
    }


def specialists_clusters(root: Path) -> list[list[int]]:
    return json.loads((root / "specialists" / "clusters.json").read_text())["clusters"]


def _met(value: Any, op: str, target: Any) -> bool:
    if value is None:
        return False
    if op == "==":
        return value == target
    return value <= target if op == "<=" else value >= target if op == ">=" else value > target


def relative(change: float | None) -> str:
    return "n/a" if change is None else f"{100 * change:+.1f}%"


REPORT = """\
# distillrun: the paper's specialists (distillrun's docs/method.md#specialists), reproduced \
in shape

{date} on {machine} ({device}); torch {torch}; {minutes:.1f} minutes.

Data: `dataset=jft_like`, {classes} classes in {n_super} confusable groups, {modes} blobs per \
class of which each lies in another group with probability {cross_modes}, {train_per_class} \
training examples per class; {test_examples:,} test examples. The generalist gets \
{generalist_train} of its own training set right: it is limited by its capacity. \
{n_specialists} specialists, cluster sizes {cluster_sizes}, found without labels (adjusted Rand \
index against the groups {ari:.2f}).

| test accuracy | paper (JFT) | distillrun |
| --- | --- | --- |
{accuracies}

By the number of specialists covering the correct class (whose class set holds it, as the \
paper's Table 4), test set:

| covering | paper: examples | gained | relative change | distillrun: examples | generalist \
accuracy | gained | relative change |
| --- | --- | --- | --- | --- | --- | --- | --- |
{by_coverage}

Counting only the active specialists (those holding the generalist's top class) instead mixes \
in whether the generalist was right, since its top class picks them:

| active covering | examples | generalist accuracy | gained | relative change |
| --- | --- | --- | --- | --- |
{by_active_coverage}

| goal | target | distillrun | met |
| --- | --- | --- | --- |
{goals}

Steps:

{steps}

Reproduce: `{command}`
"""


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _accuracy_rows(r: dict[str, Any]) -> list[tuple[str, str, str]]:
    return [
        ("generalist", _pct(PAPER["generalist_accuracy"]), _pct(r["generalist_accuracy"])),
        (
            "generalist + specialists",
            _pct(PAPER["combined_accuracy"]),
            _pct(r["combined_accuracy"]),
        ),
        ("relative gain", relative(PAPER["relative_gain"]), relative(r["relative_gain"])),
        (
            "the combination distilled back into one net of the generalist's size",
            "not done",
            _pct(r["distilled_back_accuracy"]),
        ),
        (
            "the same net distilled from the generalist alone (control)",
            "-",
            _pct(r["distilled_from_generalist_accuracy"]),
        ),
        ("the same net on hard labels (control)", "-", _pct(r["hard_labels_accuracy"])),
    ]


def _coverage_rows(r: dict[str, Any]) -> list[tuple[Any, ...]]:
    """The paper's Table 4 beside ours, by the number of specialists covering the class."""
    ours = {row["covering"]: row for row in r["by_coverage"]}
    paper = {row["covering"]: row for row in paper_grouped()}
    rows = []
    for label in GROUPS:
        p, o = paper[label], ours.get(label)
        derived = " (its rows 4 to 10+)" if label == "4+" else ""
        theirs = (label, f"{p['examples']:,}", f"{p['gained']:+,}")
        theirs += (f"{relative(p['relative_change'])}{derived}",)
        if o:
            mine = (f"{o['examples']:,}", _pct(o["generalist_accuracy"]), f"{o['gained']:+d}")
            rows.append((*theirs, *mine, relative(o["relative_change"])))
        else:
            rows.append((*theirs, "0", "-", "-", "-"))
    return rows


def markdown(r: dict[str, Any], steps: list[Step], root: Path) -> str:
    d = r["dataset"]
    goals = []
    for name, (key, op, target) in GOALS.items():
        value, ok = r[key], r["goals_met"][name]
        shown = f"{value:.4f}" if isinstance(value, float) else value
        goals.append((name, f"{op} {target}", shown, "yes" if ok else "NO"))
    return REPORT.format(
        **{k: r[k] for k in ("date", "machine", "device", "torch", "minutes", "command")},
        **{k: d[k] for k in ("n_super", "modes", "cross_modes", "train_per_class")},
        classes=d["n_super"] * d["n_sub"],
        test_examples=r["test_examples"],
        generalist_train=_pct(r["generalist_train_accuracy"]),
        n_specialists=len(r["cluster_sizes"]),
        cluster_sizes=r["cluster_sizes"],
        ari=r["cluster_ari"] or 0,
        accuracies=table_rows(_accuracy_rows(r)),
        by_coverage=table_rows(_coverage_rows(r)),
        by_active_coverage=table_rows(
            (
                o["covering"],
                f"{o['examples']:,}",
                _pct(o["generalist_accuracy"]),
                f"{o['gained']:+d}",
                relative(o["relative_change"]),
            )
            for o in r["by_active_coverage"]
        ),
        goals=table_rows(goals),
        steps="\n".join(f"- {s.name}: `{shlex.join(s.command(root / s.name))}`" for s in steps),
    )


# --- the command ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_folder_arguments(parser, "outputs/reproduce-specialists", "reproduction")
    args = parser.parse_args(argv)
    run_tool("reproduce-specialists", lambda: reproduce(args))


def reproduce(args: argparse.Namespace) -> int:
    wanted = {"overrides": args.overrides}
    root, state = open_folder(
        args, "distillrun.tools.reproduce_specialists", wanted, "reproduction"
    )
    steps = plan(root, args.overrides)
    code = run_steps("reproduce-specialists", root, steps, state)
    if code:
        return code
    return write_report(root, steps, state)


def write_report(root: Path, steps: list[Step], state: dict[str, Any]) -> int:
    r = results(root)
    r["minutes"] = sum(state["seconds"].values()) / 60
    r["goals_met"] = {name: _met(r[key], op, target) for name, (key, op, target) in GOALS.items()}
    r |= provenance(root, steps, state, {**PAPER, "by_coverage": paper_grouped()})
    artifacts.write_json(root / "report.json", r)
    artifacts.atomic_write(root / "report.md", lambda f: f.write(markdown(r, steps, root)), "w")
    met = sum(bool(v) for v in r["goals_met"].values())
    print(
        f"\n{(root / 'report.md').read_text()}\n"
        f"distillrun reproduce-specialists: {r['minutes']:.1f} minutes, {met} of {len(GOALS)} "
        f"goals met; {root / 'report.md'}"
    )
    return 0


if __name__ == "__main__":
    main()
