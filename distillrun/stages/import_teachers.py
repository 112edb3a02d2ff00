"""`distillrun import-teachers`: teachers trained elsewhere, as a teachers run like any other.

Each member (a state_dict, a TorchScript archive, an ONNX model or precomputed logits; see
imported.py) is scored on the validation and test splits; one at or near chance is refused
with the likely causes. Every member is read and checked before anything is written. Writes
what a train-teachers run writes: logits.pt (every member's logits on the train, val and test
splits), member_<i>.pt for the members that are PyTorch models of a known architecture (for the
others, member_<i>.pt.absent says why there is none), and manifest.json last, so distill,
specialists and evaluate consume it unchanged.
"""

from __future__ import annotations

from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from distillrun.config import (
    MEMBER_KEYS,
    Problems,
    check_basics,
    check_dataset,
    check_member_settings,
    check_model,
    in_range,
)
from distillrun.console import say
from distillrun.core.data import Data, load_dataset
from distillrun.errors import UserError
from distillrun.io.imported import (
    SPLITS,
    Member,
    MemberSpec,
    import_member,
    logits_file_causes,
    member_specs,
    near_chance,
)
from distillrun.method.metrics import classification_metrics
from distillrun.runs import artifacts
from distillrun.stages.common import Run, run_stage
from distillrun.stages.train_teachers import (
    dataset_info,
    finish_ensemble,
    member_models,
    record_inference_speed,
)

NO_CHECKPOINT = (
    "member {i} of this import-teachers run has no PyTorch weights in distillrun's format ({why}); "
    "specialists (which fine-tune the generalist's weights) and export need them: import the "
    "member as kind=state_dict with its architecture, or use another member"
)


@hydra.main(version_base="1.3", config_path="pkg://distillrun.conf", config_name="import_teachers")
def main(cfg: DictConfig) -> float | None:
    return run_stage("import-teachers", cfg, import_teachers)


def check_config(cfg: DictConfig, p: Problems) -> None:
    """The checks of this stage's own keys, run before anything is written (config.validate)."""
    for check in (check_basics, check_dataset, check_model):
        check(cfg, p)
    example = "members=[teacher.onnx] (or [a.pt,b.ts,c.npz])"
    if OmegaConf.is_missing(cfg, "members"):
        p.append(f"name the teacher files: {example}")
        return
    entries = list(cfg.members) if OmegaConf.is_list(cfg.members) else [cfg.members]
    p.need(bool(entries), f"members=[] names no teachers: {example}")
    check_member_settings("", cfg, p)
    for i, entry in enumerate(entries):
        if OmegaConf.is_dict(entry):
            unknown = sorted(set(entry) - set(MEMBER_KEYS))
            p.need(not unknown, f"members[{i}] has unknown keys {unknown}: use {MEMBER_KEYS}")
            p.need(isinstance(entry.get("path"), str), f"members[{i}] needs path: a file")
            check_member_settings(f"members[{i}].", entry, p)
        else:
            p.need(isinstance(entry, str) and entry != "", f"members[{i}]={entry} is not a file")
    p.need(
        cfg.min_accuracy is None or in_range(cfg.min_accuracy, 0, 1),
        f"min_accuracy={cfg.min_accuracy} must be in [0, 1] or null",
    )


def import_teachers(cfg: DictConfig, run: Run) -> dict[str, Any]:
    """Score teachers trained elsewhere and record them as a teachers run.

    Consumes the members named in `members=` (state_dicts, TorchScript, ONNX or logits) and
    the dataset. Writes what train-teachers writes: logits.pt, member_<i>.pt where a member is
    a known PyTorch architecture (member_<i>.pt.absent otherwise), metrics.jsonl, and the
    ensemble's and members' scores as metrics.
    """
    data = load_dataset(cfg.dataset)
    run.info["dataset"] = dataset_info(data, cfg)
    specs = member_specs(cfg)
    say(
        f"import-teachers: {len(specs)} member(s) on {data.name} ({len(data.y_train)} train / "
        f"{len(data.y_val)} val / {len(data.y_test)} test) on {run.device} -> {run.dir}"
    )
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    # Every member is read and checked before anything is written: one bad member leaves no
    # member file behind, only the folder marked failed.
    imported = [
        checked_member(i, spec, data, model_cfg, cfg, run.device) for i, spec in enumerate(specs)
    ]
    members: list[dict[str, Any]] = []
    logits: dict[str, list[torch.Tensor]] = {s: [] for s in SPLITS}
    params: list[int | None] = []
    for i, (spec, member) in enumerate(zip(specs, imported, strict=True)):
        for split in SPLITS:
            logits[split].append(member.logits[split])
        target = run.dir / f"member_{i}.pt"
        if member.checkpoint is not None:
            artifacts.save_tensors(target, member.checkpoint)
        else:
            why = member.info.get("no_checkpoint", f"it was imported as {spec.kind}")
            reason = NO_CHECKPOINT.format(i=i, why=why)
            artifacts.write_bytes(target.with_name(target.name + artifacts.ABSENT), reason.encode())
        params.append(member.params)
        scores = {
            **classification_metrics(member.logits["val"], data.y_val, "val"),
            **classification_metrics(member.logits["test"], data.y_test, "test"),
        }
        members.append({**member.info, "params": member.params, **scores})
        say(
            f"  member {i} ({spec.kind}, {spec.path.name}): {scores['test_errors']} test errors, "
            f"accuracy {scores['test_accuracy']:.4f}"
        )

    files = [run.dir / f"member_{i}.pt" for i in range(len(specs))]
    record_inference_speed(run, member_models(files, run.device), data, cfg.train.eval_batch_size)
    labels = [f"member {i} ({m['kind']})" for i, m in enumerate(members)]
    teacher_params = None if None in params else sum(params)
    return finish_ensemble(run, data, logits, labels, members, teacher_params)


def checked_member(
    i: int,
    spec: MemberSpec,
    data: Data,
    model_cfg: dict[str, Any],
    cfg: DictConfig,
    device: torch.device,
) -> Member:
    """Member i's logits on every split, refused in one line when it scores near chance."""
    member = import_member(i, spec, data, model_cfg, cfg.train.eval_batch_size, device)
    split, y = ("val", data.y_val) if len(data.y_val) else ("train", data.y_train)
    rows = logits_file_causes(data) if spec.kind == "logits" else None
    why = near_chance(member.logits[split], y, data.num_classes, cfg.min_accuracy, rows)
    if why:
        raise UserError(f"member {i} ({spec.path}) on the {split} split: {why}")
    return member
