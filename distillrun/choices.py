"""The allowed values of every named option, defined once and torch-free.

The config checks (config.py) refuse anything else before a run starts, and the code that acts
on a value (ensemble, train, models, specialists, inference) keys its table of functions by
these names; tests/test_layout.py checks that each table has exactly these keys. Models,
augmentations and losses are named by their config files instead (`shipped_names`; the losses:
conf/loss/, checked by tests/test_loss_group.py).
"""

from __future__ import annotations

import re
from importlib import resources


def shipped_names(group: str) -> tuple[str, ...]:
    """The `name:` of every conf/<group>/*.yaml, sorted: the implementations that the shipped
    configs choose (a builder without a config file is out of reach; tests/test_layout.py checks
    that each table of builders has exactly these names)."""
    folder = resources.files("distillrun.conf") / group
    names = set()
    for file in folder.iterdir():
        if file.name.endswith(".yaml"):
            found = re.search(r"^name:\s*(\w+)", file.read_text(), re.M)
            if found:
                names.add(found.group(1))
    return tuple(sorted(names))


# loss=: the names are those of conf/loss/<name>.yaml (config.group_choices, losses.LOSSES).
# What config.py must know of some losses before a run starts:
LOSSES_WITHOUT_STANDARDIZATION = ("logit_mse",)  # no softmax: loss.standardize is not defined
LOSSES_OVER_THE_BATCH = ("dist",)  # a statistic across the batch's examples: batches of 2+
ENSEMBLES = ("arithmetic", "geometric")  # ensemble.combine
OPTIMIZERS = ("adam", "sgd")  # train.OPTIMIZERS
SCHEDULES = ("cosine", "step", "constant", "multistep")  # train.SCHEDULES
MODELS = shipped_names("model")  # models.BUILDERS
CLUSTERINGS = ("kmeans", "online")  # specialists.cluster_classes
KL_OPTIMIZERS = ("preconditioned", "plain")  # inference.combine_kl
NORMALIZATIONS = ("standardize", "none")  # data._finish: dataset.normalize
MEMBER_KINDS = ("state_dict", "torchscript", "onnx", "logits")  # imported.LOADERS
AUGMENTATIONS = shipped_names("augment")  # augment.BUILDERS
BORDERS = ("replicate", "reflect", "zeros")  # augment.BORDERS: augment.border
TEACHER_OUTPUTS = ("auto", "cached", "online")  # stages.distill: teacher_outputs.mode
PRECISIONS = ("fp32", "bf16", "fp16")  # train.AUTOCAST: train.precision
CSV_HEADERS = ("auto", "true", "false")  # inputs.read_inputs: predict's header=
TRACKERS = {"mlflow": "mlflow", "tensorboard": "tensorboard"}  # logger=: the package each needs
TRACKING_INSTALL = 'pip install "distillrun[tracking]"'


def trackers_selected(logger: object) -> list[str]:
    """The trackers a `logger` config node selects (none: the node is absent or empty)."""
    return [name for name in TRACKERS if logger and name in logger]  # type: ignore[operator]


def fp16_refusal(device: str) -> str:
    """Why train.precision=fp16 cannot run on `device` (it needs CUDA's gradient scaler)."""
    return (
        f"train.precision=fp16 (with its gradient scaler) is for CUDA GPUs, not {device}: use "
        "train.precision=bf16 (autocast on the CPU too) or fp32"
    )


def one_of(names: tuple[str, ...]) -> str:
    """ "a, b or c": how messages name the choices."""
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


# The CIFAR nets' depths, 6n + offset with n >= 1 blocks per stage, and the usual ones.
DEPTHS = {"cifar_resnet": (2, "8, 20, 32, 56 or 110"), "wrn": (4, "16, 28 or 40")}


def depth_problem(name: str, depth: object) -> str | None:
    """Why `depth` cannot be the depth of model `name` (cifar_resnet or wrn); None if it can."""
    offset, usual = DEPTHS[name]
    if isinstance(depth, int) and not isinstance(depth, bool):
        if depth > offset and (depth - offset) % 6 == 0:
            return None
    return (
        f"model.depth={depth} does not fit model.name={name}: its depth is 6n+{offset} "
        f"(n >= 1 blocks per stage), e.g. {usual}"
    )
