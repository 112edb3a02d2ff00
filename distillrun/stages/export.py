"""`distillrun export run=<run folder>`: a run's model as files other tools read.

Writes to its own run folder: model.safetensors and config.json (architecture, classes, input
shape, the normalisation the model expects), model.ts (TorchScript), model.onnx (dynamic batch
axis) and model.md (a model card), then manifest.json with the parity figures (every format's
logits on the test split against the PyTorch model's) and the latency of each runtime at batch
1 and 256. A format that disagrees with the PyTorch model fails the export.
"""

from __future__ import annotations

import math
from typing import Any

import hydra
from omegaconf import DictConfig

from distillrun.config import Problems, check_basics, check_named_run, in_range, is_int
from distillrun.console import results_table, say
from distillrun.io.exports import FILES, export_metrics, exportable, model_card, write_formats
from distillrun.io.inputs import resolve
from distillrun.runs import artifacts
from distillrun.stages.common import Run, run_stage


@hydra.main(version_base="1.3", config_path="pkg://distillrun.conf", config_name="export")
def main(cfg: DictConfig) -> float | None:
    return run_stage("export", cfg, export)


def check_config(cfg: DictConfig, p: Problems) -> None:
    """The checks of this stage's own keys, run before anything is written (config.validate)."""
    check_basics(cfg, p)
    check_named_run(cfg, p, "distillrun export run=outputs/distill/<run>")
    p.need(
        cfg.member is None or (is_int(cfg.member) and cfg.member >= 0),
        f"member={cfg.member} must be null (a distill run's student) or a member number >= 0",
    )
    p.need(
        in_range(cfg.tolerance, 0, math.inf, lo_open=True),
        f"tolerance={cfg.tolerance} must be a number > 0, e.g. 1e-4",
    )
    p.need(
        is_int(cfg.latency_repeats) and cfg.latency_repeats >= 1,
        f"latency_repeats={cfg.latency_repeats} must be an integer >= 1",
    )


def export(cfg: DictConfig, run: Run) -> dict[str, Any]:
    """Write one model of a run in the formats other tools read, each checked against the
    PyTorch model.

    Consumes a run with a model file (`run=`; `member=` picks one of an ensemble or of the
    specialists). Writes model.safetensors, config.json, model.ts, model.onnx and model.md
    (io/exports.py), and as metrics the test accuracy, the parity of every format and the
    latency of each runtime.
    """
    source = resolve(cfg.run, "run")
    exp = exportable(source, cfg.member)
    run.add_input("run", source, [artifacts.run_identity(source, exp.manifest, [exp.file.name])])
    run.info["dataset"] = exp.manifest.get("dataset")
    run.info["model"] = {k: exp.config[k] for k in ("model", "input_shape", "num_classes")}
    say(f"export: {exp.file} ({exp.manifest.get('stage')} run) -> {run.dir}")
    write_formats(exp, run.dir)
    metrics = export_metrics(
        exp, run.dir, float(cfg.tolerance), int(cfg.latency_repeats), cfg.train.eval_batch_size
    )
    artifacts.atomic_write(
        run.dir / FILES["card"], lambda f: f.write(model_card(exp, metrics, run.dir)), "w"
    )
    results_table(
        f"export of {exp.file.name}: test accuracy {metrics['test_accuracy']:.4f}, "
        f"{metrics['params']:,} parameters",
        ["runtime", "max abs diff (test)", "ms at batch 1", "ms at batch 256"],
        [
            [name, f"{metrics['parity_max_abs_diff'][name]:.2e}", t["batch_1"], t["batch_256"]]
            for name, t in metrics["latency_ms"].items()
        ],
    )
    say(f"export folder: {run.dir}")
    return metrics
