"""Teachers trained elsewhere: read one member of any kind and compute its logits on our splits.

Kinds (`choices.MEMBER_KINDS`): `state_dict` (weights for a model config of ours or a
torchvision architecture; `.pt`/`.pth` or `.safetensors`), `torchscript`, `onnx` (run with ONNX
Runtime) and `logits` (precomputed, `.npz`). Weights and logits are data: `.pt` files load
with `torch.load(weights_only=True)` only, `.npz` without pickle, and nothing in them is run.
TorchScript and ONNX members are programs: they are loaded (and run on the dataset) only when the
user names them as such, with a `.ts`/`.torchscript`/`.ptl`/`.onnx` file or `kind=`; a TorchScript
archive saved as `.pt` is refused unread. ONNX runs on ONNX Runtime's own operators alone: no
custom-op library is ever registered, and external data must lie in the model's folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
import os
import warnings
import zipfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from distillrun.choices import MEMBER_KINDS, one_of
from distillrun.core.data import Data
from distillrun.core.models import TORCHVISION, build_model, checkpoint, count_parameters
from distillrun.errors import UserError
from distillrun.io.inputs import load_npz
from distillrun.runs import artifacts

SPLITS = ("train", "val", "test")
EXPORT_CONFIG = "config.json"  # written by `distillrun export` beside model.safetensors
CHECKPOINT_KEYS = ("model", "input_shape", "num_classes", "state_dict")
ONNX_PACKAGES = ("onnx", "onnxruntime", "onnxscript")  # the `onnx` extra
Forward = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class MemberSpec:
    """One member as configured: its file and how to read and feed it."""

    path: Path
    kind: str
    arch: str | None = None
    input_scale: float = 1.0
    label_map: list[int] | None = None


@dataclass
class Loaded:
    """What a kind's loader read: a model (`forward`) or the logits themselves."""

    forward: Forward | None = None
    logits: dict[str, torch.Tensor] | None = None
    params: int | None = None
    checkpoint: dict[str, Any] | None = None  # distillrun's checkpoint format
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class Member:
    """An imported member: its logits on every split (our label order) and what we know of it."""

    logits: dict[str, torch.Tensor]
    params: int | None
    checkpoint: dict[str, Any] | None  # distillrun's checkpoint format, for PyTorch members
    info: dict[str, Any] = field(default_factory=dict)


def infer_kind(path: Path) -> str:
    """A member's kind from its file's suffix; `.pt`/`.pth` are weights, never a program."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return "onnx"
    if suffix == ".npz":
        return "logits"
    if suffix == ".safetensors":
        return "state_dict"
    if suffix in (".ts", ".torchscript", ".ptl"):
        return "torchscript"
    if suffix in (".pt", ".pth"):
        return "state_dict"
    raise UserError(
        f"cannot tell what {path} holds from its name: add kind=<{'|'.join(MEMBER_KINDS)}> "
        "(or {path: ..., kind: ...} for one member)"
    )


def _is_torchscript_archive(path: Path) -> bool:
    """torch.jit.save writes a zip with the module's code (`code/`) and `constants.pkl`;
    torch.save's zip has neither. Only the zip's directory is read: nothing is loaded or run."""
    try:
        with zipfile.ZipFile(path) as z:
            names = [n.split("/", 1)[-1] for n in z.namelist()]
    except (OSError, zipfile.BadZipFile):
        return False
    return any(n == "constants.pkl" or n.startswith("code/") for n in names)


def member_specs(cfg: DictConfig) -> list[MemberSpec]:
    """`members=` (a file, a list of files, or of {path, kind, arch, input_scale, label_map})
    with the top-level keys as every member's defaults."""
    entries = cfg.members
    entries = list(entries) if OmegaConf.is_list(entries) else [entries]
    specs = []
    for entry in entries:
        given = OmegaConf.to_container(entry) if OmegaConf.is_dict(entry) else {"path": entry}
        setting = {k: given.get(k, cfg.get(k)) for k in ("kind", "arch", "input_scale")}
        label_map = given.get("label_map", cfg.label_map)
        if OmegaConf.is_list(label_map):
            label_map = list(label_map)
        path = _teacher_file(str(given["path"]))
        specs.append(
            MemberSpec(
                path=path,
                kind=setting["kind"] or infer_kind(path),
                arch=setting["arch"],
                input_scale=float(setting["input_scale"]),
                label_map=None if label_map is None else [int(c) for c in label_map],
            )
        )
    return specs


def _teacher_file(given: str) -> Path:
    """The member's file, resolved; a folder, a missing file, a symlink loop or anything but a
    regular file is one line."""
    path = Path(os.path.abspath(os.path.expanduser(given)))
    try:
        path = path.resolve(strict=True)
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (before Python 3.13)
        what = "is a symlink loop" if "loop" in str(e).lower() else "does not exist"
        if isinstance(e, FileNotFoundError) and path.is_symlink():
            what = f"is a symlink to {os.readlink(path)}, which does not exist"
        raise UserError(f"teacher file {path} {what}: pass the model or logits file") from e
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "is not a regular file"
        raise UserError(f"teacher file {path} {what}: pass the model or logits file")
    return path


def sha256(path: Path) -> str:
    """The file's content hash; a file that cannot be read is one line."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}): make it readable") from e
    return h.hexdigest()


# --- the kinds ---------------------------------------------------------------------------------


def _weights(path: Path) -> Any:
    """The tensors of a .safetensors or a .pt/.pth file, without running anything in it."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            reason = str(e).splitlines()[0][:120] if str(e) else type(e).__name__
            raise UserError(
                f"cannot read {path} as safetensors ({reason}): pass a whole .safetensors file"
            ) from e
    if _is_torchscript_archive(path):
        raise UserError(
            f"{path} is a TorchScript program, not weights, so it was not loaded: importing it "
            "runs its code; if you trust it, import it as TorchScript with kind=torchscript "
            "(or rename it to .ts), or save the weights with torch.save(model.state_dict(), path)"
        )
    try:
        return artifacts.load_tensors(path)
    except UserError as e:
        why = artifacts.why_unloadable(e.__cause__) if e.__cause__ else str(e)
        raise UserError(
            f"cannot import {path}: {why}; nothing in it was run. Save the weights with "
            "torch.save(model.state_dict(), path) or as .safetensors"
        ) from e


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """(state_dict, distillrun checkpoint or None): a bare state_dict, {"model": ...} or
    {"state_dict": ...} around one, or distillrun's own checkpoint; `module.` prefixes (from
    DataParallel / DistributedDataParallel) are dropped."""
    ours = None
    if isinstance(obj, Mapping) and all(k in obj for k in CHECKPOINT_KEYS):
        ours, obj = dict(obj), obj["state_dict"]
    else:
        for key in ("state_dict", "model"):
            if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
                obj = obj[key]
                break
    if not isinstance(obj, Mapping) or not obj:
        raise UserError(
            f"{path} holds no state_dict (a mapping of parameter names to tensors): save it with "
            "torch.save(model.state_dict(), path)"
        )
    if not all(isinstance(v, torch.Tensor) for v in obj.values()):
        bad = next(k for k, v in obj.items() if not isinstance(v, torch.Tensor))
        raise UserError(
            f"{path}: entry '{bad}' is not a tensor, so this is not a state_dict: save "
            "model.state_dict() (a {'model': ...} or {'state_dict': ...} wrapper is fine)"
        )
    state = {k.removeprefix("module."): v for k, v in obj.items()}
    return state, ours


def _architecture(spec: MemberSpec, model_cfg: Mapping[str, Any]) -> dict[str, Any]:
    """arch=torchvision:<name>, else the config.json of a distillrun export beside the file,
    else this run's `model=` config."""
    if spec.arch:
        if not spec.arch.startswith(TORCHVISION):
            raise UserError(
                f"arch={spec.arch}: use arch={TORCHVISION}<name> for torchvision, or leave arch "
                "null and give our architecture with model=<mlp|cnn|...> and its keys"
            )
        return {"name": spec.arch}
    exported = spec.path.parent / EXPORT_CONFIG
    if exported.is_file():
        try:
            config = json.loads(exported.read_text())
        except ValueError as e:
            raise UserError(f"{exported} is not JSON ({e}): re-run `distillrun export`") from e
        if isinstance(config, dict) and isinstance(config.get("model"), dict):
            return config["model"]
    return dict(model_cfg)


def _state_dict(
    spec: MemberSpec, data: Data, model_cfg: Mapping[str, Any], device: torch.device
) -> Loaded:
    state, ours = _unwrap(_weights(spec.path), spec.path)
    arch = ours["model"] if ours else _architecture(spec, model_cfg)
    if ours and tuple(ours["input_shape"]) != data.input_shape:
        raise UserError(
            f"{spec.path} is a model for inputs of shape {tuple(ours['input_shape'])}, but "
            f"dataset={data.name} has {data.input_shape}: import a model for this dataset"
        )
    classes = int(ours["num_classes"]) if ours else _head_size(state, arch, data)
    model = build_model(arch, data.input_shape, classes)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        details = [ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()]
        raise UserError(
            f"{spec.path} does not fit the architecture {arch['name']} for inputs "
            f"{data.input_shape} and {classes} classes ({'; '.join(details)[:240]}): state the "
            f"architecture it was trained with (arch={TORCHVISION}<name>, or model=... and its "
            "keys)"
        ) from e
    model = model.to(device).eval()
    ckpt = checkpoint(model, arch, data.input_shape, classes)
    return Loaded(model, params=count_parameters(model), checkpoint=ckpt, info={"arch": arch})


def _head_size(state: dict[str, torch.Tensor], arch: dict[str, Any], data: Data) -> int:
    """The class count the weights were trained for: their last 2-D weight's rows (the head),
    so a mismatch with the dataset is said as such, not as a size mismatch deep in torch."""
    heads = [v for k, v in state.items() if k.endswith("weight") and v.dim() == 2]
    return int(heads[-1].shape[0]) if heads else data.num_classes


def _torchscript(
    spec: MemberSpec, data: Data, model_cfg: Mapping[str, Any], device: torch.device
) -> Loaded:
    module = load_torchscript(spec.path, device)
    return Loaded(module, params=sum(p.numel() for p in module.parameters()))


def load_torchscript(path: Path, device: torch.device | str = "cpu") -> Any:
    """A TorchScript archive (its own format: code as TorchScript, no pickled Python)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch.jit is deprecated in favour of torch.export
            module = torch.jit.load(str(path), map_location=device)
    except Exception as e:  # torch raises RuntimeError, ValueError... for anything not an archive
        reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
        raise UserError(
            f"cannot load {path} as TorchScript ({reason}): save it with "
            "torch.jit.save(torch.jit.script(model), path), or say kind=state_dict for weights"
        ) from e
    return module.eval()


def _onnx(
    spec: MemberSpec, data: Data, model_cfg: Mapping[str, Any], device: torch.device
) -> Loaded:
    session, params = onnx_session(spec.path)
    first = session.get_inputs()[0]
    declared = first.shape[1:]
    shape = data.input_shape
    if all(isinstance(d, int) for d in declared) and tuple(declared) != shape:
        if math.prod(declared) != math.prod(shape):
            raise UserError(
                f"{spec.path} takes inputs of shape {tuple(declared)} but dataset={data.name} "
                f"has {shape}: export the model for inputs of shape {shape}"
            )
        shape = tuple(declared)  # the same values laid out another way, e.g. flattened

    def forward(x: torch.Tensor) -> torch.Tensor:
        feed = x.detach().cpu().reshape(len(x), *shape).numpy()
        return torch.from_numpy(session.run(None, {first.name: feed})[0])

    info = {"onnx_input": first.name, "onnx_input_shape": list(shape)}
    return Loaded(forward, params=params, info=info)


def need_onnx() -> None:
    """ONNX support is the `onnx` extra: without it, one line saying how to get it."""
    missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(
            f"ONNX needs {', '.join(missing)}, not installed: pip install 'distillrun[onnx]'"
        )


def onnx_session(path: Path) -> tuple[Any, int]:
    """An ONNX Runtime session on the CPU and the model's parameter count (its initializers)."""
    need_onnx()
    import onnx
    import onnxruntime as ort

    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ...
        raise _not_onnx(path, e) from e
    _check_external_data(proto, path)
    try:
        params = sum(math.prod(t.dims) for t in proto.graph.initializer)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only: no warnings on the terminal
        # As many threads as torch (`threads=`), and none spinning while idle (ORT's default),
        # which would take the cores from torch when export times one after the other.
        options.intra_op_num_threads = torch.get_num_threads()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        # No register_custom_ops_library, ever: an op outside ONNX Runtime's own is refused.
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as e:  # ORT raises its own Fail / InvalidGraph, ...
        raise _not_onnx(path, e) from e
    if session.get_inputs()[0].type != "tensor(float)":
        raise UserError(
            f"{path} takes {session.get_inputs()[0].type} inputs: export it for float32 inputs"
        )
    return session, params


def _not_onnx(path: Path, e: Exception) -> UserError:
    reason = " ".join(str(e).split())[:160] or type(e).__name__
    return UserError(
        f"cannot load {path} as an ONNX model ({reason}): export it with torch.onnx.export "
        "or your framework's ONNX exporter"
    )


def _check_external_data(proto: Any, path: Path) -> None:
    """Tensors stored outside the .onnx file must lie in files in the model's own folder, so a
    model cannot make ONNX Runtime read any other file (newer ORT versions check this too)."""
    folder = path.parent.resolve()
    functions = [t for f in proto.functions for t in _node_tensors(f.node)]
    for tensor in [*_onnx_tensors(proto.graph), *functions]:
        if tensor.data_location != tensor.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = (folder / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(folder):
            raise UserError(
                f"{path} reads tensor {tensor.name!r} from {location}, outside the model's "
                "folder, so it was not loaded: keep its external data files beside the .onnx"
            )


def _onnx_tensors(graph: Any) -> Iterator[Any]:
    """Every tensor of a graph: its initializers and those in its nodes' attributes."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes: Any) -> Iterator[Any]:
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            subgraphs = [a.g] if a.HasField("g") else []
            for graph in [*subgraphs, *a.graphs]:  # If, Loop, Scan
                yield from _onnx_tensors(graph)


def _logits_file(
    spec: MemberSpec, data: Data, model_cfg: Mapping[str, Any], device: torch.device
) -> Loaded:
    """`.npz` with train, val, test arrays aligned with our splits, or with `train` over the
    loader's whole training set (validation rows included, in their original order) and test."""
    write = "write it with np.savez(path, train=..., val=..., test=...)"
    if not zipfile.is_zipfile(spec.path):  # np.load would return an .npy's single array
        raise UserError(
            f"{spec.path} is not an .npz (a zip of named arrays; an .npy saved under that name, "
            f"or a damaged file?): {write}"
        )
    arrays = load_npz(spec.path, "logits", write)
    sizes = {s: len(getattr(data, f"y_{s}")) for s in SPLITS}
    whole = sizes["train"] + sizes["val"]
    fix = (
        f"save train ({sizes['train']} rows), val ({sizes['val']}) and test ({sizes['test']}) "
        f"aligned with dataset={data.name}'s splits, or train over its whole training set "
        f"({whole} rows) and test"
    )
    missing = [k for k in ("train", "test") if k not in arrays]
    if missing:
        raise UserError(f"{spec.path} lacks array(s) {', '.join(missing)}: {fix}")
    for key, a in arrays.items():
        if key in SPLITS and (a.ndim != 2 or not np.issubdtype(a.dtype, np.floating)):
            raise UserError(
                f"{spec.path}: {key} has shape {a.shape} and dtype {a.dtype}; logits are "
                "floating-point numbers shaped (examples, classes), not class ids, booleans or "
                "complex numbers: save the model's raw scores"
            )
    with np.errstate(over="ignore"):  # beyond float32's range becomes inf, refused below
        arrays = {k: np.asarray(a, np.float32) for k, a in arrays.items() if k in SPLITS}
    train = torch.from_numpy(arrays["train"])
    out = {"test": torch.from_numpy(arrays["test"])}
    if "val" in arrays:
        out |= {"train": train, "val": torch.from_numpy(arrays["val"])}
    elif len(train) == whole and data.train_rows is not None and data.val_rows is not None:
        out |= {"train": train[data.train_rows], "val": train[data.val_rows]}
    else:
        out |= {"train": train, "val": train[:0]}
    for split in SPLITS:
        if len(out[split]) != sizes[split]:
            raise UserError(
                f"{spec.path}: {split} has {len(out[split])} rows, dataset={data.name}'s {split} "
                f"split has {sizes[split]}: {fix}"
            )
    return Loaded(logits=out)


# kind (choices.MEMBER_KINDS) -> its loader
LOADERS: dict[str, Callable[[MemberSpec, Data, Mapping[str, Any], torch.device], Loaded]] = {
    "state_dict": _state_dict,
    "torchscript": _torchscript,
    "onnx": _onnx,
    "logits": _logits_file,
}


# --- one member --------------------------------------------------------------------------------


@torch.no_grad()
def _run(forward: Forward, x: torch.Tensor, batch_size: int, label: str) -> torch.Tensor:
    outs = []
    for start in range(0, len(x), batch_size):
        batch = x[start : start + batch_size]
        try:
            out = forward(batch)
        except Exception as e:  # shape errors surface as RuntimeError, ORT's own errors, ...
            reason = " ".join(str(e).split())[:200] or type(e).__name__
            raise UserError(
                f"{label} cannot run on this dataset's inputs of shape {tuple(x.shape[1:])} "
                f"({reason}): import a model for inputs of that shape (and channel count)"
            ) from e
        outs.append(_checked_output(out, len(batch), label))
    return torch.cat(outs) if outs else torch.zeros(0, 0)


def _checked_output(out: Any, rows: int, label: str) -> torch.Tensor:
    """A model's output as float32 logits, or one line saying what it returned instead."""
    fix = "import a model whose output is its logits, shaped (examples, classes)"
    if not isinstance(out, torch.Tensor):
        raise UserError(f"{label} returns a {type(out).__name__}, not a tensor: {fix}")
    if out.dim() != 2 or len(out) != rows or not out.is_floating_point():
        raise UserError(
            f"{label} returns shape {tuple(out.shape)} and dtype {out.dtype} for {rows} "
            f"examples (class ids? one score?): {fix}"
        )
    return out.float().cpu()


def _check_logits(logits: dict[str, torch.Tensor], label: str) -> int:
    """The class count of a member's logits; NaN, infinite (beyond float32's range before the
    cast) or splits of different widths are one line."""
    for split, t in logits.items():
        if not torch.isfinite(t).all():
            raise UserError(
                f"{label} gives NaN or infinite logits on the {split} split (or values beyond "
                "float32's range): fix the model or the file"
            )
    widths = {s: t.shape[1] for s, t in logits.items() if len(t)}
    if len(set(widths.values())) > 1:
        raise UserError(
            f"{label} gives a different number of classes per split ({widths}): every split "
            "needs one logit per class"
        )
    return next(iter(widths.values()), 0)


def import_member(
    index: int,
    spec: MemberSpec,
    data: Data,
    model_cfg: Mapping[str, Any],
    batch_size: int,
    device: torch.device,
) -> Member:
    """Read member `index` and compute its logits on the train, val and test splits, in this
    dataset's label order (`label_map`); every mismatch is a one-line UserError."""
    label = f"member {index} ({spec.path.name}, {spec.kind})"
    if spec.kind not in MEMBER_KINDS:
        raise UserError(f"kind={spec.kind} for {spec.path}: use {one_of(MEMBER_KINDS)}")
    info: dict[str, Any] = {
        "kind": spec.kind,
        "source": str(spec.path),
        "sha256": sha256(spec.path),
    }
    loaded = LOADERS[spec.kind](spec, data, model_cfg, device)
    info |= loaded.info
    logits = loaded.logits
    if logits is None:
        scale = spec.input_scale
        logits = {
            s: _run(loaded.forward, getattr(data, f"x_{s}").to(device) * scale, batch_size, label)
            for s in SPLITS
        }
        info["input_scale"] = scale
    classes = _check_logits(logits, label)
    logits = {s: t.reshape(0, classes) if not len(t) else t for s, t in logits.items()}
    if spec.label_map is not None:
        logits = {
            s: _relabel(t, spec.label_map, data.num_classes, label) for s, t in logits.items()
        }
        info["label_map"] = spec.label_map
    elif classes != data.num_classes:
        raise UserError(
            f"{label} outputs {classes} classes but dataset={data.name} has "
            f"{data.num_classes}: import a model trained on these classes"
        )
    ckpt = loaded.checkpoint
    if ckpt is not None and spec.input_scale != 1:
        ckpt = None
        info["no_checkpoint"] = f"its weights expect inputs times input_scale={spec.input_scale:g}"
    elif ckpt is not None and spec.label_map is not None:
        if _reorder_head(loaded.forward, spec.label_map, data.x_test.to(device), logits["test"]):
            ckpt = {**ckpt, "state_dict": loaded.forward.state_dict()}
        else:
            ckpt = None
            info["no_checkpoint"] = (
                "label_map reorders its outputs and its last layer is not linear"
            )
    return Member(logits, loaded.params, ckpt, info)


@torch.no_grad()
def _reorder_head(
    model: torch.nn.Module, label_map: list[int], x: torch.Tensor, expected: torch.Tensor
) -> bool:
    """Reorder the rows of the model's final linear layer so that its output c is our class c;
    True when the model then gives the relabelled logits."""
    linear = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not linear or linear[-1].out_features != len(label_map):
        return False
    head = linear[-1]
    inverse = torch.empty(len(label_map), dtype=torch.long)
    inverse[torch.tensor(label_map)] = torch.arange(len(label_map))
    head.weight.copy_(head.weight[inverse.to(head.weight.device)])
    if head.bias is not None:
        head.bias.copy_(head.bias[inverse.to(head.bias.device)])
    return bool(torch.allclose(model(x).float().cpu(), expected, atol=1e-5, rtol=1e-5))


def _relabel(t: torch.Tensor, label_map: list[int], num_classes: int, label: str) -> torch.Tensor:
    """Output j of the member is our class label_map[j]."""
    if t.shape[1] != len(label_map) or sorted(label_map) != list(range(num_classes)):
        raise UserError(
            f"label_map={label_map} must list each of the {num_classes} classes once, one entry "
            f"per output of {label} ({t.shape[1]} outputs)"
        )
    out = torch.empty_like(t)
    out[:, label_map] = t
    return out


# --- is it a teacher at all? -------------------------------------------------------------------


MODEL_CAUSES = (
    "another input normalisation: dataset.normalize=none for inputs as loaded, "
    "input_scale=255 for 0-255 pixels; or a wrong input shape: import a model for this "
    "dataset's inputs"
)


def logits_file_causes(data: Data) -> str:
    """Why precomputed logits score near chance, besides another label order: their rows."""
    rows = f"{len(data.y_train)} train, {len(data.y_val)} val, {len(data.y_test)} test"
    return (
        f"rows in another order or from other data: a logits file's rows must follow "
        f"the splits of dataset={data.name} (the dataset assumed) in order and count ({rows}); "
        "set dataset= to the data they were computed on (dataset=npz dataset.path=<file> "
        "for your own)"
    )


def near_chance(
    logits: torch.Tensor,
    y: torch.Tensor,
    num_classes: int,
    min_accuracy: float | None,
    rows_cause: str | None = None,
) -> str | None:
    """None when the member beats chance clearly (or `min_accuracy`), else what it scores and
    its likely causes: for a model, another label order (with the label_map that fixes it, when
    one does) then its inputs; for a logits file (`rows_cause`), its rows first."""
    from scipy.optimize import linear_sum_assignment

    if len(y) == 0:
        return None
    chance = float(torch.bincount(y, minlength=num_classes).max()) / len(y)  # majority class
    floor = min_accuracy if min_accuracy is not None else chance + 0.2 * (1 - chance)
    pred = logits.argmax(dim=1)
    accuracy = float((pred == y).float().mean())
    if accuracy >= floor:
        return None
    counts = torch.zeros(num_classes, num_classes)
    counts.index_put_((pred, y), torch.ones(len(y)), accumulate=True)  # [output, true class]
    outputs, classes = linear_sum_assignment(counts.numpy(), maximize=True)
    mapped = float(counts[outputs, classes].sum()) / len(y)
    guess = [int(c) for _, c in sorted(zip(outputs, classes, strict=True))]
    hint = ""
    if mapped >= floor and guess != list(range(num_classes)):
        hint = f" (label_map={guess} would score {mapped:.1%})"
    label_order = f"another label order: set label_map=[...]{hint}"
    if rows_cause:  # a logits file: rows from other data are the likelier fault
        causes = f"likely {rows_cause}; or {label_order}"
    else:
        causes = f"likely {label_order}; or {MODEL_CAUSES}"
    return (
        f"accuracy {accuracy:.1%}, at or near chance ({chance:.1%}; the floor is {floor:.1%}): "
        f"{causes}. min_accuracy=0 imports it anyway"
    )
