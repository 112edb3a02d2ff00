"""`distillrun predict run=<export or run folder> input=<images folder, .npz or .csv>`.

Classifies the inputs with an export folder's model.onnx on ONNX Runtime, or with a run's
PyTorch model (`member=` as for export), preprocessed as in training from the model's own
config. Writes predictions.csv (id, class, probability, top-k) to its run folder.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from distillrun import choices
from distillrun.choices import one_of
from distillrun.config import Problems, check_basics, check_named_run, is_int, is_num
from distillrun.console import results_table, say
from distillrun.core.train import predict as torch_predict
from distillrun.errors import UserError
from distillrun.io.exports import (
    EXPORT_STAGE,
    FILES,
    ONNX_INPUT,
    ensure_shape,
    exportable,
    load_export,
    normalize,
)
from distillrun.io.imported import onnx_session
from distillrun.io.inputs import read_inputs, resolve
from distillrun.runs import artifacts
from distillrun.stages import STAGES
from distillrun.stages.common import Run, run_stage

PREDICTIONS = "predictions.csv"
SHOWN = 10  # rows of the table on the terminal


@hydra.main(version_base="1.3", config_path="pkg://distillrun.conf", config_name="predict")
def main(cfg: DictConfig) -> float | None:
    return run_stage("predict", cfg, predict)


def check_config(cfg: DictConfig, p: Problems) -> None:
    """The checks of this stage's own keys, run before anything is written (config.validate)."""
    check_basics(cfg, p)
    check_named_run(cfg, p, "distillrun predict run=outputs/export/<run> input=<file or folder>")
    if OmegaConf.is_missing(cfg, "input"):
        p.append("name the inputs: input=<folder of PNG/JPEG images, .npz or .csv file>")
    else:
        p.need(isinstance(cfg.input, str) and cfg.input != "", f"input={cfg.input}: a path")
    p.need(
        cfg.member is None or (is_int(cfg.member) and cfg.member >= 0),
        f"member={cfg.member} must be null or a member number >= 0",
    )
    p.need(is_int(cfg.top_k) and cfg.top_k >= 1, f"top_k={cfg.top_k} must be an integer >= 1")
    header = cfg.get("header", "auto")  # Hydra reads header=true as a bool
    p.need(
        str(header).lower() in choices.CSV_HEADERS and not is_num(header),
        f"header={header}: use {one_of(choices.CSV_HEADERS)}",
    )


def load_predictor(source: Path, member: int | None, device: torch.device) -> tuple[Any, dict, str]:
    """(a function of normalised inputs -> logits, the export config, the runtime's name)."""
    if not source.is_dir():
        holders = ", ".join(name for name, s in STAGES.items() if s.model_file)
        raise UserError(
            f"run folder {source} does not exist: pass run=<an export folder, or a run of "
            f"{holders}> (`distillrun runs export` lists them)"
        )
    manifest = artifacts.read_manifest(source) if source.is_dir() else None
    if manifest and manifest.get("stage") == EXPORT_STAGE:
        if manifest.get("status") != "complete":
            raise UserError(f"{source} is an unfinished export: re-run `distillrun export`")
        config = load_export(source)
        session, _ = onnx_session(source / FILES["onnx"])

        def run_onnx(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(session.run(None, {ONNX_INPUT: x.numpy()})[0])

        return run_onnx, config, "onnxruntime"
    exp = exportable(source, member, device)
    return lambda x: torch_predict(exp.model, x.to(device)).cpu(), exp.config, "pytorch"


def source_identity(source: Path, config: dict[str, Any], runtime: str) -> dict[str, Any]:
    """The identity of the run the predictions come from, with the hashes of the files read."""
    manifest = artifacts.read_manifest(source) or {}
    if runtime == "onnxruntime":  # an export folder
        return artifacts.run_identity(source, manifest, [FILES["onnx"], FILES["config"]])
    return artifacts.run_identity(source, manifest, [config["source"]["file"]])


def check_finite(probs: torch.Tensor, ids: list[str], given: Path) -> None:
    """Refuse to write probabilities that are NaN: finite inputs far outside the training
    data's scale can overflow the model."""
    bad = (~torch.isfinite(probs).all(dim=1)).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(ids[i] for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise UserError(
            f"the model's outputs for {len(bad)} input(s) of {given} are not finite ({shown}): "
            "check that those inputs are in the units of the training data (images in [0, 1])"
        )


def predict(cfg: DictConfig, run: Run) -> dict[str, Any]:
    """Classify new inputs with an exported or trained model.

    Consumes an export folder (its model.onnx) or a run with a model file (`run=`), and the
    inputs (`input=`: an images folder, .npz or .csv). Writes predictions.csv (id, class,
    probability, top-k), and as metrics the number of inputs, the runtime and the count per
    predicted class.
    """
    source = resolve(cfg.run, "run")
    given = resolve(cfg.input, "input")
    forward, config, runtime = load_predictor(source, cfg.member, run.device)
    run.add_input("run", source, [source_identity(source, config, runtime)])
    # Runs made before header= existed have no such key: auto, what they did.
    header = str(cfg.get("header", "auto")).lower()
    ids, raw = read_inputs(given, config["input_shape"], header)
    run.info["input"] = str(given)
    x = normalize(ensure_shape(raw, config["input_shape"], str(given)), config)
    batch = cfg.train.eval_batch_size
    logits = torch.cat([forward(x[i : i + batch]) for i in range(0, len(x), batch)])
    probs = torch.softmax(logits.float(), dim=1)
    check_finite(probs, ids, given)
    k = min(int(cfg.top_k), probs.shape[1])
    top_p, top_c = probs.topk(k, dim=1)
    classes = config["classes"]
    rows = [
        [
            ids[n],
            classes[int(top_c[n, 0])],
            float(top_p[n, 0]),
            " ".join(
                f"{classes[int(c)]}:{float(p):.4f}" for c, p in zip(top_c[n], top_p[n], strict=True)
            ),
        ]
        for n in range(len(ids))
    ]
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(["id", "class", "probability", f"top_{k}"])
    writer.writerows([[i, c, f"{p:.6f}", t] for i, c, p, t in rows])
    artifacts.write_bytes(run.dir / PREDICTIONS, text.getvalue().encode())
    results_table(
        f"predict: {len(ids)} inputs from {given.name} with {runtime}"
        + (f" (first {SHOWN})" if len(ids) > SHOWN else ""),
        ["id", "class", "probability", f"top {k}"],
        rows[:SHOWN],
    )
    say(f"predictions: {run.dir / PREDICTIONS}")
    counts: dict[str, int] = {}
    for _, c, _, _ in rows:
        counts[c] = counts.get(c, 0) + 1
    return {"examples": len(ids), "runtime": runtime, "class_counts": counts}
