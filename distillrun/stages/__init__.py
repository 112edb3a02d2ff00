"""The stages, one module each: a thin `@hydra.main` calling a plain function that does the
stage's work in a run folder (see `common.run_stage` for what every stage does around it).

Each stage's module and primary config share a name: `distillrun.stages.<config>` and
`conf/<config>.yaml`. This file must not import torch: the dispatcher reads it for `--help`.
"""

from __future__ import annotations

# stage -> (module and primary config name, one-line description)
STAGES: dict[str, tuple[str, str]] = {
    "train-teachers": ("train_teachers", "train an ensemble of teachers with different seeds"),
    "distill": (
        "distill",
        "distill a teachers run into a small student with soft targets at temperature T",
    ),
    "specialists": (
        "specialists",
        "cluster a generalist's confusions and train a specialist per class cluster",
    ),
    "evaluate": (
        "evaluate",
        "classify with a generalist plus its specialists (the paper's KL combination)",
    ),
    "report": ("report", "a table, plots and a Markdown report of run and sweep folders"),
    "import-teachers": (
        "import_teachers",
        "teachers trained elsewhere (weights, TorchScript, ONNX, logits) as a teachers run",
    ),
    "export": (
        "export",
        "a run's model as safetensors, TorchScript and ONNX, checked against PyTorch and timed",
    ),
    "predict": ("predict", "classify images, an .npz or a CSV with an export or a run's model"),
}


def config_name(stage: str) -> str:
    return STAGES[stage][0]


def module_name(stage: str) -> str:
    return f"distillrun.stages.{STAGES[stage][0]}"
