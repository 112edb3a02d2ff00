"""Checks on the command line and the composed config, before any work starts.

Nothing here imports torch: these checks run in the dispatcher, so bad input is refused in a
fraction of a second with one line that names the problem and the fix.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import math
import re
from collections.abc import Callable
from importlib import resources
from typing import Any

from omegaconf import DictConfig, OmegaConf

from distillrun import choices
from distillrun.choices import one_of
from distillrun.core import distributed
from distillrun.errors import UserError
from distillrun.stages import module_name

GROUPS = (
    "dataset",
    "model",
    "optim",
    "experiment",
    "debug",
    "logger",
    "augment",
    "teacher_outputs",
    "loss",
)
VECTOR_DATASETS = ("hierarchical", "mnist1d")  # vectors whatever their settings
# Augmentations with no finite set of views (their `count` is None): nothing to cache.
CONTINUOUS_AUGMENTATIONS = ("mixup",)
# Set by the dispatcher for `resume=<folder>`: the run folder the stage continues.
RESUME_ENV = "DISTILLRUN_RESUME"
DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def group_choices(group: str) -> list[str]:
    folder = resources.files("distillrun.conf") / group
    if not folder.is_dir():
        return []
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def yaml_file(group: str, name: str) -> dict[str, Any]:
    """The keys of conf/<group>/<name>.yaml as written there (read without Hydra)."""
    import yaml

    return yaml.safe_load((resources.files("distillrun.conf") / group / f"{name}.yaml").read_text())


def did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def sweep_values(override: Any) -> list[str] | None:
    """The values of a sweep override; None for glob() and interval sweeps, which Hydra expands
    itself (each of their jobs is still validated when it starts)."""
    try:
        return list(override.sweep_string_iterator())
    except Exception:
        return None


def check_group_choices(overrides: list[Any]) -> None:
    """Refuse `dataset=foo` and the like with a suggestion (Hydra would print a trace, exit 1)."""
    for override in overrides:
        group = override.key_or_group
        if group not in GROUPS or override.is_delete():
            continue
        values = sweep_values(override) if override.is_sweep_override() else [override.value()]
        if values is None:
            continue
        values = [v for value in values for v in (value if isinstance(value, list) else [value])]
        choices = group_choices(group)
        for value in values:
            if isinstance(value, str) and value not in choices:
                raise UserError(
                    f"unknown {group} '{value}'{did_you_mean(value, choices)}: "
                    f"choose one of {', '.join(choices)}"
                )


# --- keys: a misspelled one gets a suggestion, an added one must be read by some stage ---------

PACKAGE_HEADER = re.compile(r"^# @package (\S+)", re.MULTILINE)


def key_paths(node: Any, prefix: str = "") -> list[str]:
    """Every dotted key path of a config node (`train`, `train.epochs`, ...), Hydra's own
    settings and the defaults list left out."""
    if not isinstance(node, dict):
        return []
    paths = []
    for key, value in node.items():
        if not prefix and key in ("hydra", "defaults"):
            continue
        path = f"{prefix}{key}"
        paths += [path, *key_paths(value, f"{path}.")]
    return paths


@functools.cache
def keys_any_stage_reads() -> frozenset[str]:
    """The key paths that some file under conf/ sets: the stages read no others, so a `+key=`
    that adds a key outside them changes nothing."""
    import yaml

    root = resources.files("distillrun.conf")
    paths: set[str] = set()
    for file in _yaml_files(root):
        text = file.read_text()
        header = PACKAGE_HEADER.search(text)
        group = str(file.relative_to(root).parent).replace("/", ".")  # type: ignore[attr-defined]
        package = header.group(1) if header else ("" if group == "." else group)
        prefix = "" if package == "_global_" else f"{package}." if package else ""
        if prefix:
            paths |= {prefix[:-1]}
        paths |= set(key_paths(yaml.safe_load(text) or {}, prefix))
    return frozenset(paths)


def _yaml_files(folder: Any) -> list[Any]:
    found = []
    for entry in folder.iterdir():
        if entry.is_dir():
            found += _yaml_files(entry)
        elif entry.name.endswith(".yaml"):
            found.append(entry)
    return found


def check_added_keys(stage: str, overrides: list[Any], keys: Callable[[], list[str]]) -> None:
    """Refuse `+key=` / `++key=` for a key that no stage reads (Hydra adds it, and the run goes
    on as if it had not been given). `+` is legitimate for a config group (+experiment=...),
    Hydra's own settings and keys that some preset sets. `keys`: the stage's keys, for the
    suggestion (composed only when there is something to refuse)."""
    for o in overrides:
        key = o.key_or_group
        if not (o.is_add() or o.is_force_add()) or o.package is not None:
            continue
        if key in GROUPS or "/" in key or key == "hydra" or key.startswith("hydra."):
            continue
        if key in keys_any_stage_reads():
            continue
        close = closest_key(key, [*keys(), *keys_any_stage_reads()])
        value = o.input_line.split("=", 1)[1] if "=" in o.input_line else "..."
        fix = f"did you mean {close}={value}?" if close else "drop it"
        raise UserError(
            f"{o.input_line} adds a key that no stage reads: {fix} (`+` adds a config group, "
            f"e.g. +experiment=<name>; `distillrun {stage} --cfg job` lists the keys)"
        )


def unknown_key(stage: str, key: str, keys: list[str]) -> str:
    """The line for `key=value` naming a key the stage's config does not have."""
    close = closest_key(key, keys)
    listed = f"`distillrun {stage} --cfg job` lists the keys"
    if close:
        return f"unknown key '{key}': did you mean '{close}'? ({listed})"
    if key in keys_any_stage_reads():
        return (
            f"unknown key '{key}' here (other stages, group choices or presets have it): {listed}"
        )
    return f"unknown key '{key}': {listed}"


def closest_key(key: str, keys: list[str]) -> str | None:
    """The key path most like `key`: a sibling with a similar name where its parent exists
    (`train.epoch` -> `train.epochs`), else a similar path of the same depth."""
    parent, _, name = key.rpartition(".")
    siblings = {k.rpartition(".")[2]: k for k in keys if k.rpartition(".")[0] == parent}
    if siblings:
        close = difflib.get_close_matches(name, siblings, n=1, cutoff=0.75)
        return siblings[close[0]] if close else None
    same_depth = [k for k in keys if k.count(".") == key.count(".")]
    close = difflib.get_close_matches(key, same_depth, n=1, cutoff=0.75)
    return close[0] if close else None


class Problems(list):
    def need(self, ok: bool, message: str) -> None:
        if not ok:
            self.append(message)


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_seed(v: Any) -> bool:
    return is_int(v) and 0 <= v < 2**31


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def in_range(v: Any, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> bool:
    if not is_num(v) or not math.isfinite(v):
        return False
    above = v > lo if lo_open else v >= lo
    below = v < hi if hi_open else v <= hi
    return above and below


def check_basics(cfg: DictConfig, p: Problems) -> None:
    """The keys of conf/base.yaml, which every stage has."""
    p.need(is_seed(cfg.seed), f"seed={cfg.seed} must be an integer in [0, 2^31)")
    p.need(
        isinstance(cfg.device, str) and bool(DEVICE.match(cfg.device)),
        f"device={cfg.device} is not one of auto, cpu, cuda, cuda:N, mps",
    )
    p.need(
        cfg.progress in ("auto", True, False), f"progress={cfg.progress}: use auto, true or false"
    )
    p.need(
        cfg.threads == "auto" or (is_int(cfg.threads) and cfg.threads >= 1),
        f"threads={cfg.threads}: use auto or an integer >= 1",
    )
    p.need(
        isinstance(cfg.paths.output_root, str) and cfg.paths.output_root.strip() != "",
        f"paths.output_root={cfg.paths.output_root} must be a folder path",
    )
    for key in ("epochs", "batch_size", "eval_batch_size"):
        v = cfg.train[key]
        p.need(is_int(v) and v >= 1, f"train.{key}={v} must be an integer >= 1")
    precision = cfg.train.get("precision", "fp32")
    p.need(
        precision in choices.PRECISIONS,
        f"train.precision={precision}: use {one_of(choices.PRECISIONS)}",
    )
    if precision == "fp16" and cfg.device in ("cpu", "mps"):
        p.append(choices.fp16_refusal(f"device={cfg.device}"))
    for key in ("channels_last", "compile"):
        v = cfg.train.get(key, False)
        p.need(isinstance(v, bool), f"train.{key}={v}: use true or false")
    if distributed.launched():
        _torchrun(cfg, p)
    limit = cfg.train.get("max_batches_per_epoch")
    p.need(
        limit is None or (is_int(limit) and limit >= 1),
        f"train.max_batches_per_epoch={limit} must be an integer >= 1, or null for every batch",
    )
    every = cfg.train.checkpoint_every
    p.need(
        in_range(every, 0, math.inf),
        f"train.checkpoint_every={every} must be a number of seconds >= 0 (0: every epoch)",
    )
    _logger(cfg.get("logger"), p)


def _logger(logger: Any, p: Problems) -> None:
    """The `logger` node: each selected tracker's package is installed, its settings usable."""
    for name in choices.trackers_selected(logger):
        if importlib.util.find_spec(choices.TRACKERS[name]) is None:
            p.append(
                f"logger={name} needs the {choices.TRACKERS[name]} package: "
                f"{choices.TRACKING_INSTALL}"
            )
    if "mlflow" in choices.trackers_selected(logger):
        uri = logger.mlflow.tracking_uri
        if uri is not None and not (isinstance(uri, str) and uri.strip()):
            p.append("logger.mlflow.tracking_uri must be a URI (http://host:5000) or null")
        name = logger.get("experiment")
        if name is not None and not (isinstance(name, str) and name.strip()):
            p.append("logger.experiment must be a name or null (the stage's name)")


def _torchrun(cfg: DictConfig, p: Problems) -> None:
    """What data-parallel training cannot do (distributed.py)."""
    if cfg.device == "mps" or str(cfg.device).startswith("cuda:"):
        p.append(
            f"device={cfg.device} under torchrun: use device=cuda (each process takes the GPU "
            "of its LOCAL_RANK), auto or cpu"
        )
    if (cfg.get("dataset") or {}).get("download"):
        p.append(
            "dataset.download=true under torchrun would download once per process: download "
            "without torchrun first (e.g. a debug=tiny run), then train under torchrun"
        )


def check_dataset(cfg: DictConfig, p: Problems) -> None:
    d = cfg.dataset
    p.need(
        in_range(d.val_fraction, 0, 1, hi_open=True),
        f"dataset.val_fraction={d.val_fraction} must be in [0, 1)",
    )
    if "test_fraction" in d:
        p.need(
            in_range(d.test_fraction, 0, 1, lo_open=True, hi_open=True),
            f"dataset.test_fraction={d.test_fraction} must be in (0, 1)",
        )
    if "split_seed" in d:
        p.need(
            is_seed(d.split_seed),
            f"dataset.split_seed={d.split_seed} must be an integer in [0, 2^31)",
        )
    limit = d.get("max_per_split")
    p.need(
        limit is None or (is_int(limit) and limit >= 1),
        f"dataset.max_per_split={limit} must be an integer >= 1, or null for every example",
    )
    if OmegaConf.is_missing(d, "path"):
        p.append(f"dataset={d.name} needs a file: add dataset.path=/path/to/data.npz")
    if "normalize" in d:
        p.need(
            d.normalize in choices.NORMALIZATIONS,
            f"dataset.normalize={d.normalize}: use {one_of(choices.NORMALIZATIONS)}",
        )
    for key in ("download", "standardize"):
        if key in d:
            p.need(isinstance(d[key], bool), f"dataset.{key}={d[key]}: use true or false")
    if "root" in d:
        p.need(
            isinstance(d.root, str) and d.root.strip() != "",
            f"dataset.root={d.root} must be a folder path",
        )
    if "num_samples" in d:
        p.need(
            is_int(d.num_samples) and d.num_samples >= 20,
            f"dataset.num_samples={d.num_samples} must be an integer >= 20",
        )
    if "train_split" in d:
        p.need(
            in_range(d.train_split, 0, 1, lo_open=True, hi_open=True),
            f"dataset.train_split={d.train_split} must be in (0, 1)",
        )
    if "template_seed" in d:
        p.need(
            is_seed(d.template_seed),
            f"dataset.template_seed={d.template_seed} must be an integer in [0, 2^31)",
        )
    if d.name == "hierarchical":
        for key in ("n_super", "n_sub", "dim", "modes", "train_per_class", "test_per_class"):
            v = d[key]
            p.need(is_int(v) and v >= 1, f"dataset.{key}={v} must be an integer >= 1")
        for key in ("super_spread", "sub_spread", "mode_spread"):
            p.need(in_range(d[key], 0, math.inf), f"dataset.{key}={d[key]} must be a number >= 0")
        p.need(is_seed(d.seed), f"dataset.seed={d.seed} must be an integer in [0, 2^31)")
        cross = d.get("cross_modes", 0.0)
        p.need(
            in_range(cross, 0, 1), f"dataset.cross_modes={cross} must be a probability in [0, 1]"
        )


def check_model(cfg: DictConfig, p: Problems) -> None:
    m = cfg.model
    p.need(m.name in choices.MODELS, f"model.name={m.name}: use {one_of(choices.MODELS)}")
    for key in ("dropout", "input_dropout"):
        if key in m:
            p.need(in_range(m[key], 0, 1, hi_open=True), f"model.{key}={m[key]} must be in [0, 1)")
    if m.get("max_norm") is not None:
        p.need(
            in_range(m.max_norm, 0, math.inf, lo_open=True), "model.max_norm must be > 0 or null"
        )
    # mlp: hidden is a list of layer sizes; cnn: channels is a list, hidden one size.
    lists = ("hidden",) if m.name == "mlp" else ("channels",) if m.name == "cnn" else ()
    for key in lists:
        p.need(
            OmegaConf.is_list(m[key]) and all(is_int(s) and s >= 1 for s in m[key]),
            f"model.{key}={m[key]} must be a list of integers >= 1, e.g. [64]",
        )
    if m.name == "cnn":
        p.need(
            is_int(m.hidden) and m.hidden >= 1, f"model.hidden={m.hidden} must be an integer >= 1"
        )
        p.need(
            OmegaConf.is_list(m.channels) and len(m.channels) >= 1,
            "model.channels needs at least one convolution, e.g. [32, 64]",
        )
    if m.name in choices.DEPTHS:  # the CIFAR nets: a depth of 6n+2 (ResNets) or 6n+4 (WRNs)
        problem = choices.depth_problem(m.name, m.get("depth"))
        if problem:
            p.append(problem)
    if m.name == "cifar_resnet":
        widths = m.get("widths")
        p.need(
            OmegaConf.is_list(widths)
            and len(widths) == 4
            and all(is_int(w) and w >= 1 for w in widths),
            f"model.widths={widths} must be 4 integers >= 1: the stem's and the three stages' "
            "channels, e.g. [16, 16, 32, 64]",
        )
    if m.name == "wrn":
        widen = m.get("widen")
        p.need(is_int(widen) and widen >= 1, f"model.widen={widen} must be an integer >= 1")


def check_optim(cfg: DictConfig, p: Problems) -> None:
    o = cfg.optim
    p.need(o.name in choices.OPTIMIZERS, f"optim.name={o.name}: use {one_of(choices.OPTIMIZERS)}")
    p.need(in_range(o.lr, 0, math.inf, lo_open=True), f"optim.lr={o.lr} must be a number > 0")
    p.need(
        in_range(o.weight_decay, 0, math.inf), f"optim.weight_decay={o.weight_decay} must be >= 0"
    )
    if "momentum" in o:
        p.need(
            in_range(o.momentum, 0, 1, hi_open=True),
            f"optim.momentum={o.momentum} must be in [0, 1)",
        )
        p.need(isinstance(o.nesterov, bool), f"optim.nesterov={o.nesterov}: use true or false")
        if o.nesterov is True and o.momentum == 0:
            p.append("optim.nesterov=true needs optim.momentum > 0")
    if "betas" in o:
        p.need(
            OmegaConf.is_list(o.betas)
            and len(o.betas) == 2
            and all(in_range(b, 0, 1, hi_open=True) for b in o.betas),
            f"optim.betas={o.betas} must be two numbers in [0, 1), e.g. [0.9, 0.999]",
        )
    p.need(
        o.schedule in choices.SCHEDULES,
        f"optim.schedule={o.schedule}: use {one_of(choices.SCHEDULES)}",
    )
    # Checked whatever the schedule: a bad value waiting for schedule=step is still a mistake.
    p.need(
        is_int(o.step_size) and o.step_size >= 1,
        f"optim.step_size={o.step_size} must be an integer >= 1",
    )
    p.need(in_range(o.gamma, 0, 1, lo_open=True), f"optim.gamma={o.gamma} must be in (0, 1]")
    milestones = o.get("milestones")  # conf/optim/sgd.yaml has it; adam and older runs do not
    if milestones is not None:
        epochs = list(milestones) if OmegaConf.is_list(milestones) else None
        p.need(
            bool(epochs)
            and all(is_int(e) and e >= 1 for e in epochs)
            and epochs == sorted(set(epochs)),
            f"optim.milestones={milestones} must be increasing epochs >= 1, e.g. [150,180,210]",
        )
    elif o.schedule == "multistep":
        p.append("optim.schedule=multistep needs epochs: add '+optim.milestones=[150,180,210]'")


def check_common(cfg: DictConfig, p: Problems) -> None:
    for check in (check_basics, check_dataset, check_model, check_optim):
        check(cfg, p)


def check_augment(cfg: DictConfig, p: Problems) -> None:
    a = cfg.augment
    name = a.name
    if name not in choices.AUGMENTATIONS:
        p.append(f"augment.name={name}: use {one_of(choices.AUGMENTATIONS)}")
        return
    if name in ("shift", "crop_flip") and cfg.dataset.name in VECTOR_DATASETS:
        p.append(
            f"augment={name} moves pixels, but dataset={cfg.dataset.name} holds vectors: use "
            "augment=none (or augment=mixup, which mixes vectors as well)"
        )
    if name == "shift":
        p.need(
            is_int(a.pixels) and a.pixels >= 1,
            f"augment.pixels={a.pixels} must be an integer >= 1 (no shift: augment=none)",
        )
    if name == "crop_flip":
        p.need(is_int(a.padding) and a.padding >= 0, "augment.padding must be an integer >= 0")
        p.need(isinstance(a.flip, bool), f"augment.flip={a.flip}: use true or false")
        if a.padding == 0 and a.flip is False:
            p.append("augment=crop_flip with padding=0 and flip=false has one view: augment=none")
    if name in ("shift", "crop_flip"):
        p.need(
            a.border in choices.BORDERS,
            f"augment.border={a.border}: use {one_of(choices.BORDERS)}",
        )
    if name == "mixup":
        p.need(
            in_range(a.alpha, 0, math.inf, lo_open=True),
            f"augment.alpha={a.alpha} must be a number > 0 (mixup's Beta(alpha, alpha))",
        )


def check_teacher_outputs(cfg: DictConfig, p: Problems) -> None:
    t = cfg.teacher_outputs
    if t.mode not in choices.TEACHER_OUTPUTS:
        p.append(f"teacher_outputs.mode={t.mode}: use {one_of(choices.TEACHER_OUTPUTS)}")
        return
    if t.mode == "cached" and cfg.augment.name in CONTINUOUS_AUGMENTATIONS:
        p.append(
            f"augment={cfg.augment.name} makes every batch anew, so its views cannot be cached: "
            "use teacher_outputs=online"
        )
    if t.mode == "online":
        return
    p.need(
        t.top_k is None or (is_int(t.top_k) and t.top_k >= 1),
        f"teacher_outputs.top_k={t.top_k} must be null (every logit) or an integer >= 1",
    )
    p.need(
        in_range(t.max_mb, 0, math.inf, lo_open=True),
        f"teacher_outputs.max_mb={t.max_mb} must be a number of MB > 0",
    )
    m = t.views_per_example
    p.need(
        m is None or (is_int(m) and m >= 1),
        f"teacher_outputs.views_per_example={m} must be null (every view) or an integer >= 1",
    )
    p.need(is_seed(t.views_seed), f"teacher_outputs.views_seed={t.views_seed} must be a seed")


def folder_list(value: Any) -> list[Any] | None:
    """The folders a `teachers=`/`runs=` value names, or None when it is not a path or a list."""
    values = list(value) if OmegaConf.is_list(value) else [value]
    return values if all(isinstance(v, str) and v for v in values) else None


def check_loss(cfg: DictConfig, p: Problems) -> None:
    """The `loss` node (conf/loss/<name>.yaml): its hyperparameters are weights >= 0 (integers
    where the file's default is one), and what it needs of the rest of the config."""
    loss, names = cfg.loss, group_choices("loss")
    if loss.name not in names:
        p.append(f"loss.name={loss.name}: use loss=<name>, one of {one_of(tuple(names))}")
        return
    p.need(
        isinstance(loss.standardize, bool),
        f"loss.standardize={loss.standardize}: use true or false",
    )
    if loss.standardize is True and loss.name in choices.LOSSES_WITHOUT_STANDARDIZATION:
        others = tuple(n for n in names if n not in choices.LOSSES_WITHOUT_STANDARDIZATION)
        p.append(
            f"loss.standardize=true is not defined for loss={loss.name} (it standardises the "
            f"logits a softmax reads): use loss.standardize=false, or loss={one_of(others)}"
        )
    for key, default in yaml_file("loss", loss.name).items():
        if key in ("name", "standardize"):
            continue
        v, kind = loss.get(key), "an integer" if is_int(default) else "a finite number"
        ok = (is_int(v) and v >= 0) if is_int(default) else in_range(v, 0, math.inf)
        p.need(
            ok, f"loss.{key}={v} must be {kind} >= 0 (the default of loss={loss.name}: {default})"
        )
    size = cfg.train.batch_size
    if loss.name in choices.LOSSES_OVER_THE_BATCH and is_int(size) and size < 2:
        p.append(
            f"loss={loss.name} correlates the examples of a batch, and train.batch_size={size} "
            "holds one: set train.batch_size=2 or more"
        )


def _experiment(stage: str, cfg: DictConfig, p: Problems) -> None:
    """A preset for one stage used with another (presets set stage-specific keys)."""
    preset = cfg.get("experiment")
    if preset is None or preset.stage == stage:
        return
    other = preset.get("companion")
    fix = f"use +experiment={other}" if other else "drop it"
    p.append(f"experiment={preset.name} is a preset for `distillrun {preset.stage}`: {fix}")


def is_run_folder(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value != "")


MEMBER_KEYS = ("path", "kind", "arch", "input_scale", "label_map")


def check_member_settings(where: str, m: Any, p: Problems) -> None:
    """kind, arch, input_scale and label_map: top-level defaults or one member's own."""
    if m.get("kind") is not None:
        p.need(
            m.kind in choices.MEMBER_KINDS,
            f"{where}kind={m.kind}: use {one_of(choices.MEMBER_KINDS)}, or null (from the file)",
        )
    if m.get("arch") is not None:
        p.need(isinstance(m.arch, str) and m.arch != "", f"{where}arch must be a name or null")
    if "input_scale" in m:
        p.need(
            in_range(m.input_scale, 0, math.inf, lo_open=True),
            f"{where}input_scale={m.input_scale} must be a number > 0",
        )
    if m.get("label_map") is not None:
        lm = list(m.label_map) if OmegaConf.is_list(m.label_map) else None
        p.need(
            lm is not None and all(is_int(c) and c >= 0 for c in lm) and len(set(lm)) == len(lm),
            f"{where}label_map={m.label_map} must list distinct class ids, e.g. [1, 0, 2]",
        )


def check_named_run(cfg: DictConfig, p: Problems, example: str) -> None:
    if OmegaConf.is_missing(cfg, "run"):
        p.append(f"name the run folder: {example}")
    else:
        p.need(isinstance(cfg.run, str) and cfg.run != "", f"run={cfg.run}: {example}")


def stage_checks(stage: str) -> Callable[[DictConfig, Problems], None]:
    """The checks of a stage's own keys: `check_config` in its module (the record in STAGES names
    it), imported when a run is checked: the module is about to run anyway."""
    return importlib.import_module(module_name(stage)).check_config


def validate(stage: str, cfg: DictConfig) -> None:
    """Check every value of a composed stage config; raise one UserError listing all problems."""
    p = Problems()
    _experiment(stage, cfg, p)
    if p:  # the preset's keys are another stage's: its other problems would only confuse
        raise UserError(p[0])
    stage_checks(stage)(cfg, p)
    if p:
        fix = "" if len(p) == 1 else f" ({len(p)} problems)"
        raise UserError("; ".join(p) + fix)
