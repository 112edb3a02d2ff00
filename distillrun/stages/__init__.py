"""The stages, one module each: a thin `@hydra.main` calling a plain function that does the
stage's work in a run folder (see `common.run_stage` for what every stage does around it).

`STAGES` is the one table of stages: the dispatcher, the config checks, torchrun's list of
training stages, which runs stand in for which, and export's model files are all read from it.
Adding a stage touches its module, its config and its record here. This file must not import
torch: the dispatcher reads it for `--help`.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    """One stage: `distillrun.stages.<module>` with primary config `conf/<module>.yaml`."""

    name: str
    module: str
    about: str  # the one line `distillrun --help` prints
    writes: str  # its main artifacts, for `--help` readers and docs
    consumes: tuple[str, ...] = ()  # stages whose complete runs it reads
    trains: bool = False  # trains models (so it can run data-parallel under torchrun)
    stands_in_for: str | None = None  # its runs are consumed wherever that stage's are
    # Its run's model file, for export and predict: (file pattern, what `member=` picks, or None
    # for a single model).
    model_file: tuple[str, str | None] | None = None


_MEMBERS = ("member_{i}.pt", "a member of the ensemble")
STAGES: dict[str, Stage] = {
    s.name: s
    for s in (
        Stage(
            "train-teachers",
            "train_teachers",
            "train an ensemble of teachers with different seeds",
            "member_<i>.pt, logits.pt",
            trains=True,
            model_file=_MEMBERS,
        ),
        Stage(
            "distill",
            "distill",
            "distill a teachers run into a small student with soft targets at temperature T",
            "student.pt, baseline.pt",
            consumes=("train-teachers", "evaluate"),
            trains=True,
            model_file=("student.pt", None),
        ),
        Stage(
            "specialists",
            "specialists",
            "cluster a generalist's confusions and train a specialist per class cluster",
            "clusters.json, specialist_<m>.pt",
            consumes=("train-teachers",),
            trains=True,
            model_file=("specialist_{i}.pt", "a specialist"),
        ),
        Stage(
            "evaluate",
            "evaluate",
            "classify with a generalist plus its specialists (the paper's KL combination)",
            "logits.pt (the combination)",
            consumes=("specialists", "train-teachers"),
        ),
        Stage(
            "report",
            "report",
            "a table, plots and a Markdown report of run and sweep folders",
            "report.md, summary.csv, plots",
        ),
        Stage(
            "import-teachers",
            "import_teachers",
            "teachers trained elsewhere (weights, TorchScript, ONNX, logits) as a teachers run",
            "logits.pt, member_<i>.pt",
            stands_in_for="train-teachers",
            model_file=_MEMBERS,
        ),
        Stage(
            "export",
            "export",
            "a run's model as safetensors, TorchScript and ONNX, checked against PyTorch and timed",
            "model.safetensors, model.ts, model.onnx, model.md",
            consumes=("distill", "train-teachers", "specialists"),
        ),
        Stage(
            "predict",
            "predict",
            "classify images, an .npz or a CSV with an export or a run's model",
            "predictions.csv",
            consumes=("export", "distill"),
        ),
    )
}


def config_name(stage: str) -> str:
    return STAGES[stage].module


def module_name(stage: str) -> str:
    return f"distillrun.stages.{STAGES[stage].module}"


def training_stages() -> tuple[str, ...]:
    return tuple(name for name, s in STAGES.items() if s.trains)


def stages_for(stage: str) -> tuple[str, ...]:
    """The stages whose complete runs a consumer of `stage` runs accepts: `stage` itself and
    those that stand in for it (an import-teachers run is a teachers run)."""
    return (stage, *(name for name, s in STAGES.items() if s.stands_in_for == stage))
