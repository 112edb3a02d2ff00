"""A trained model out of distillrun: safetensors + config, TorchScript and ONNX, each checked
against the PyTorch model and timed; and the inputs' preprocessing that every format expects.

The export config (config.json) says everything a user of the files needs: the architecture,
the classes, the input shape and how raw inputs are normalised (the dataset's own statistics,
as in training), so `predict` never needs them by hand.
"""

from __future__ import annotations

import json
import logging
import math
import os
import statistics
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillrun.core.data import Data, load_dataset
from distillrun.core.models import build_model, count_parameters, load_model
from distillrun.errors import UserError
from distillrun.io.imported import EXPORT_CONFIG, load_torchscript, need_onnx, onnx_session
from distillrun.method.losses import describe
from distillrun.runs import artifacts
from distillrun.runs.teacher_runs import check_data
from distillrun.stages import STAGES

EXPORT_STAGE = "export"
FORMAT = "distillrun-export"
FILES = {
    "weights": "model.safetensors",
    "config": EXPORT_CONFIG,
    "torchscript": "model.ts",
    "onnx": "model.onnx",
    "card": "model.md",
}
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
# Raw images (PNG, JPEG) are read as pixel / 255: every built-in image dataset holds [0, 1].
IMAGE_RANGE = (0.0, 1.0)


@dataclass
class Exportable:
    """A run's model, loaded, with the data it was trained on and its export config."""

    model: nn.Module
    config: dict[str, Any]
    manifest: dict[str, Any]
    data: Data
    file: Path


def model_file(folder: Path, manifest: dict[str, Any], member: int | None) -> Path:
    """The checkpoint of a run's model: the student of a distill run, or member `member` of a
    teachers run or specialists run."""
    stage = STAGES.get(manifest.get("stage"))
    if stage is None or stage.model_file is None:
        holders = ", ".join(name for name, s in STAGES.items() if s.model_file)
        raise UserError(
            f"{folder} is a {manifest.get('stage')} run, which holds no model to export: pass "
            f"a run of {holders}"
        )
    pattern, what = stage.model_file
    if what is None:
        if member is not None:
            raise UserError(f"{folder} is a distill run with one student: drop member={member}")
        return folder / pattern
    count = len(manifest.get("metrics", {}).get("members", []))
    if member is None:
        raise UserError(
            f"{folder} is a {stage} run of {count} models: choose {what} with member=0.."
            f"{max(count - 1, 0)}"
        )
    if not 0 <= member < max(count, 1):
        raise UserError(f"member={member} but {folder} has {count} model(s): use 0..{count - 1}")
    return folder / pattern.format(i=member)


def classes_of(folder: Path, manifest: dict[str, Any], member: int | None, n: int) -> list[str]:
    """The name of each output: the class ids, or a specialist's classes plus its dustbin."""
    if manifest.get("stage") == "specialists" and member is not None:
        clusters = json.loads((folder / "clusters.json").read_text()).get("clusters", [])
        if member < len(clusters) and n == len(clusters[member]) + 1:
            return [str(c) for c in clusters[member]] + ["dustbin"]
    return [str(c) for c in range(n)]


def exportable(folder: Path, member: int | None, device: torch.device | str = "cpu") -> Exportable:
    """The model of a complete run (see `model_file`) and the export config that describes it."""
    if not folder.is_dir():
        raise UserError(f"run folder {folder} does not exist: pass run=<a distill run folder>")
    manifest = artifacts.read_manifest(folder)
    if not manifest or manifest.get("status") != "complete":
        status = (manifest or {}).get("status", "unfinished: no manifest")
        raise UserError(f"{folder} is not a complete run ({status}): pass a complete run folder")
    file = model_file(folder, manifest, member)
    ckpt = artifacts.load_tensors(file)  # the reasons for a missing file are said here
    model = load_model(file, device)
    dataset = manifest.get("dataset", {})
    if "config" not in dataset:
        raise UserError(f"{folder}'s manifest records no dataset: re-run the stage that wrote it")
    data = load_dataset(dataset["config"])
    why_not = check_data(manifest, data)
    if why_not:
        raise UserError(f"{why_not}: the dataset changed since the run; re-run it")
    config = {
        "format": FORMAT,
        "version": 1,
        "model": ckpt["model"],
        "input_shape": list(ckpt["input_shape"]),
        "num_classes": int(ckpt["num_classes"]),
        "classes": classes_of(folder, manifest, member, int(ckpt["num_classes"])),
        "normalization": data.normalization,
        "image_range": list(IMAGE_RANGE),
        "dataset": {k: dataset.get(k) for k in ("name", "fingerprint", "num_classes", "config")},
        "source": {"run": str(folder.resolve()), "stage": manifest["stage"], "file": file.name},
        "onnx": {"input": ONNX_INPUT, "output": ONNX_OUTPUT, "dynamic_axes": {"0": "batch"}},
        "files": {k: v for k, v in FILES.items() if k != "config"},
    }
    return Exportable(model, config, manifest, data, file)


# --- preprocessing (the same for training data, exports and predict) ---------------------------


def normalize(x: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
    """Raw inputs [N, *input_shape] (as the dataset loader yields them) -> the model's inputs."""
    norm = config.get("normalization") or {"normalize": "none"}
    if norm["normalize"] == "none":
        return x
    shape = tuple(config["input_shape"])
    mean, std = torch.tensor(norm["mean"]), torch.tensor(norm["std"])
    stats_shape = (len(mean), 1, 1) if len(shape) == 3 and len(mean) == shape[0] else shape
    return (x - mean.reshape(stats_shape)) / std.reshape(stats_shape)


# --- writing the formats -----------------------------------------------------------------------


def write_formats(exp: Exportable, folder: Path) -> None:
    """model.safetensors, config.json, model.ts and model.onnx (dynamic batch axis)."""
    from safetensors.torch import save as safetensors_bytes

    need_onnx()
    model = exp.model.cpu().eval()
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    artifacts.write_bytes(folder / FILES["weights"], safetensors_bytes(state, {"format": "pt"}))
    artifacts.write_json(folder / FILES["config"], exp.config)
    example = exp.data.x_test[:2].cpu()
    for name in ("onnxscript", "onnx_ir", "torch.onnx"):  # their INFO lines are not for users
        logging.getLogger(name).setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit and torch.onnx warn about their internals
        with torch.no_grad():
            traced = torch.jit.trace(model, example, check_trace=False)
        artifacts.atomic_write(
            folder / FILES["torchscript"], lambda f: torch.jit.save(traced, f), "wb"
        )
        try:
            program = torch.onnx.export(
                model,
                (example,),
                input_names=[ONNX_INPUT],
                output_names=[ONNX_OUTPUT],
                dynamo=True,
                external_data=False,
                dynamic_shapes=({0: torch.export.Dim("batch", min=1)},),
                verbose=False,
            )
        except Exception as e:
            reason = " ".join(str(e).split())[:200]
            raise UserError(
                f"torch.onnx cannot export {exp.config['model']['name']} ({reason}): export the "
                "safetensors and TorchScript files only is not supported; report the architecture"
            ) from e
    proto = program.model_proto.SerializeToString()
    artifacts.atomic_write(folder / FILES["onnx"], lambda f: f.write(proto), "wb")


def runners(folder: Path, config: dict[str, Any]) -> dict[str, Callable[[torch.Tensor], Any]]:
    """Each format, loaded back from the files: a function of a batch of model inputs."""
    from safetensors.torch import load_file

    eager = build_model(config["model"], tuple(config["input_shape"]), config["num_classes"])
    eager.load_state_dict(load_file(str(folder / FILES["weights"])))
    eager.eval()
    scripted = load_torchscript(folder / FILES["torchscript"])
    session, _ = onnx_session(folder / FILES["onnx"])

    def torch_runner(module: nn.Module) -> Callable[[torch.Tensor], Any]:
        def run(x: torch.Tensor) -> torch.Tensor:
            with torch.inference_mode():
                return module(x)

        return run

    def ort(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(session.run(None, {ONNX_INPUT: x.numpy()})[0])

    return {"eager": torch_runner(eager), "torchscript": torch_runner(scripted), "onnxruntime": ort}


def parity(
    model: nn.Module, run: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, batch: int
) -> tuple[torch.Tensor, dict[str, float]]:
    """The PyTorch model's logits on x, and each format's max abs difference from them."""
    from distillrun.core.train import predict

    reference = predict(model.cpu(), x, batch)
    diffs = {}
    for name, fn in run.items():
        out = torch.cat([fn(x[i : i + batch]) for i in range(0, len(x), batch)]).float()
        diffs[name] = float((out - reference).abs().max()) if len(x) else 0.0
    return reference, diffs


def latency(
    run: dict[str, Callable[[torch.Tensor], Any]], x: torch.Tensor, repeats: int
) -> dict[str, dict[str, float]]:
    """Median milliseconds per call of each format at batch 1 and 256 (test rows, repeated to
    fill 256), after warm-up calls, in alternation so background load hits each alike. Every
    runtime uses torch's thread count (`threads=`; ONNX Runtime's session is made so)."""
    batches = {n: x[torch.arange(n) % len(x)].contiguous() for n in (1, 256)}
    times: dict[str, dict[int, list[float]]] = {name: {n: [] for n in batches} for name in run}
    for fn in run.values():
        for xb in batches.values():
            for _ in range(3):
                fn(xb)
    for _ in range(repeats):
        for name, fn in run.items():
            for n, xb in batches.items():
                start = time.perf_counter()
                fn(xb)
                times[name][n].append((time.perf_counter() - start) * 1000)
    return {
        name: {f"batch_{n}": statistics.median(t) for n, t in per.items()}
        for name, per in times.items()
    }


# --- the model card ----------------------------------------------------------------------------


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int) and not isinstance(v, bool):
        return f"{v:,}"
    return "-" if v is None else str(v)


CARD = """\
# {model} {title} on {dataset}

Exported by `distillrun export` from `{run}` (`{file}`), made by `{command}`.

| | |
| --- | --- |
{about}

## Files and their agreement with the PyTorch model (test split, max abs logit difference, \
tolerance {tolerance:g})

| file | format | max abs difference |
| --- | --- | --- |
{parity}

## Latency on this machine (median ms per call, {threads} threads)

| runtime | batch 1 | batch 256 |
| --- | --- | --- |
{latency}

## Use

```bash
distillrun predict run={folder} input=<images folder, .npz or .csv>
```

```python
import onnxruntime, numpy as np
session = onnxruntime.InferenceSession('{onnx}')
logits = session.run(None, {{'{onnx_input}': x.astype(np.float32)}})[0]  # x: normalised as above
```
"""


def model_card(exp: Exportable, metrics: dict[str, Any], folder: Path) -> str:
    """model.md: what the model is, what it was trained from, how good and fast it is."""
    m, config = exp.manifest, exp.config
    src = config["source"]
    stage = m.get("stage")
    files = {"eager": FILES["weights"], "torchscript": FILES["torchscript"]}
    files["onnxruntime"] = FILES["onnx"]
    return CARD.format(
        model=config["model"]["name"],
        title={"distill": "distilled student"}.get(stage, f"{stage} model ({src['file']})"),
        dataset=config["dataset"]["name"],
        run=src["run"],
        file=src["file"],
        command=m.get("command", "?"),
        about=_rows(_card_facts(exp, metrics)),
        tolerance=metrics["parity_tolerance"],
        parity=_rows(
            (f"`{files[name]}`", name, f"{diff:.2e}")
            for name, diff in metrics["parity_max_abs_diff"].items()
        ),
        threads=metrics["latency_threads"],
        latency=_rows(
            (name, f"{t['batch_1']:.3f}", f"{t['batch_256']:.3f}")
            for name, t in metrics["latency_ms"].items()
        ),
        folder=folder,
        onnx=FILES["onnx"],
        onnx_input=ONNX_INPUT,
    )


def _card_facts(exp: Exportable, metrics: dict[str, Any]) -> list[tuple[str, str]]:
    """The card's first table: the model, its data, its teachers (a student's), its scores."""
    m, config = exp.manifest, exp.config
    data, t, cfg = config["dataset"], m.get("metrics", {}), m.get("config", {})
    facts = [
        ("dataset", f"{data['name']} (fingerprint {data['fingerprint'][:12]})"),
        ("architecture", f"`{json.dumps(config['model'])}`"),
        ("parameters", f"{metrics['params']:,}"),
        ("input shape", f"{config['input_shape']} (batch first, any batch size)"),
        ("classes", ", ".join(config["classes"])),
        ("normalisation", _norm_text(config)),
    ]
    if m.get("stage") == "distill":
        teachers = m.get("inputs", {}).get("teachers")
        facts += [
            (
                "teachers",
                f"`{teachers}` ({_fmt(t.get('teacher_params'))} parameters, "
                f"{_fmt(t.get('teacher_test_errors'))} test errors)",
            ),
            (
                "T, alpha",
                f"{_fmt(cfg.get('T'))}, {_fmt(cfg.get('alpha'))} "
                f"(loss {describe(cfg.get('loss', 'kd'))})",
            ),
            ("hard-label student (same net)", f"{_fmt(t.get('baseline_test_errors'))} test errors"),
        ]
    return facts + [
        (
            "test accuracy",
            f"{metrics['test_accuracy']:.4f} ({metrics['test_errors']} errors of "
            f"{len(exp.data.y_test)})",
        ),
        ("test NLL, ECE", f"{metrics['test_nll']:.4f}, {metrics['test_ece']:.4f}"),
    ]


def _rows(rows: Any) -> str:
    """Markdown table rows, one per tuple."""
    return "\n".join("| " + " | ".join(str(cell) for cell in row) + " |" for row in rows)


def _norm_text(config: dict[str, Any]) -> str:
    norm = config.get("normalization") or {"normalize": "none"}
    if norm["normalize"] == "none":
        return "none: inputs as the dataset holds them (images in [0, 1])"

    def short(values: list[float]) -> str:
        return ", ".join(f"{v:.4g}" for v in values[:4]) + (", ..." if len(values) > 4 else "")

    return (
        f"(x - mean) / std with the training split's mean [{short(norm['mean'])}] and std "
        f"[{short(norm['std'])}] (images in [0, 1] first)"
    )


def export_metrics(
    exp: Exportable, folder: Path, tolerance: float, repeats: int, batch: int
) -> dict[str, Any]:
    """Check every format against the PyTorch model on the test split, and time them."""
    from distillrun.method.metrics import classification_metrics

    run = runners(folder, exp.config)
    x_test = exp.data.x_test.cpu()
    reference, diffs = parity(exp.model, run, x_test, batch)
    bad = {k: v for k, v in diffs.items() if not v <= tolerance}
    if bad:
        figures = ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
        raise UserError(
            f"parity check failed: on the {len(x_test)} test examples the exported logits differ "
            f"from the PyTorch model's by up to {figures} (tolerance {tolerance:g}); the files "
            f"{', '.join(bad)} do not compute the same model: report the architecture, or raise "
            "tolerance=... knowingly"
        )
    metrics = classification_metrics(reference, exp.data.y_test.cpu(), "test")
    return {
        **metrics,
        "params": count_parameters(exp.model),
        "parity_tolerance": tolerance,
        "parity_max_abs_diff": diffs,
        "latency_ms": latency(run, x_test, repeats),
        "latency_threads": torch.get_num_threads(),
        "files": {k: os.path.getsize(folder / v) for k, v in FILES.items() if k != "card"},
    }


def load_export(folder: Path) -> dict[str, Any]:
    """The config.json of an export folder, checked."""
    path = folder / FILES["config"]
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} ({e}): re-run `distillrun export`") from e
    if not isinstance(config, dict) or config.get("format") != FORMAT:
        raise UserError(f"{path} is not a distillrun export config: re-run `distillrun export`")
    return config


def ensure_shape(x: torch.Tensor, input_shape: list[int], what: str) -> torch.Tensor:
    """Inputs [N, ...] reshaped to [N, *input_shape] when they hold the same values."""
    shape = tuple(input_shape)
    if tuple(x.shape[1:]) == shape:
        return x
    if x.dim() >= 2 and math.prod(x.shape[1:]) == math.prod(shape):
        return x.reshape(len(x), *shape)
    raise UserError(
        f"{what} holds inputs of shape {tuple(x.shape[1:])} but the model takes {shape}: "
        "give inputs of the model's shape"
    )
