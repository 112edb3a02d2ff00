"""import-teachers on hostile and malformed files (issue #24, items 2 and 6).

Weights and logits are data and nothing in them runs; TorchScript and ONNX are programs, run
only when named as such. Every bad file is one line (a UserError), and a run with one bad member
writes no member file.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, distillrun, manifest, runs
from omegaconf import OmegaConf

from distillrun.core.data import load_dataset
from distillrun.errors import UserError
from distillrun.io.imported import MemberSpec, import_member, member_specs
from distillrun.stages.import_teachers import checked_member

DIGITS = {"name": "digits", "test_fraction": 0.25, "val_fraction": 0.1, "split_seed": 0}
MLP = {"name": "mlp", "hidden": [8]}
SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DIGITS)


def _member(digits, path: Path, kind: str):
    """Import one member with every warning an error: a warning is a second line on stderr."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return import_member(0, MemberSpec(path, kind), digits, MLP, 512, torch.device("cpu"))


def _good_logits(digits) -> dict[str, np.ndarray]:
    """Logits that score well: the true class gets 5."""
    return {s: 5 * np.eye(10, dtype=np.float32)[getattr(digits, f"y_{s}").numpy()] for s in SPLITS}


class FileWriter(torch.nn.Module):
    """A TorchScript program that overwrites `path` whenever it runs."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.head = torch.nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        written = torch.from_file(self.path, shared=True, size=4, dtype=torch.uint8).fill_(66)
        return self.head(x.flatten(1)) + written.sum() * 0


def _file_writer(victim: Path, saved_as: Path) -> None:
    victim.write_bytes(b"AAAA")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation
        torch.jit.save(torch.jit.script(FileWriter(str(victim))), saved_as)


# --- item 2: nothing runs unless named as a program ---------------------------------------------


@pytest.mark.slow
def test_a_torchscript_program_named_pt_runs_nothing_and_writes_nothing(
    digits, tmp_path: Path
) -> None:
    victim = tmp_path / "victim.bin"
    _file_writer(victim, tmp_path / "evil.pt")
    np.savez(tmp_path / "good.npz", **_good_logits(digits))
    result = distillrun(tmp_path, "import-teachers", "members=[good.npz,evil.pt]", check=None)
    assert_one_line_error(result, "evil.pt is a TorchScript program", "kind=torchscript")
    assert "runs its code" in result.stderr
    assert victim.read_bytes() == b"AAAA"
    # The good member before it left nothing a later stage could read.
    (folder,) = runs(tmp_path, "import-teachers")
    assert manifest(folder)["status"] == "failed"
    assert not [p.name for p in folder.iterdir() if p.name.startswith(("member_", "logits"))]


def test_a_torchscript_program_runs_only_when_named_as_one(digits, tmp_path: Path) -> None:
    victim = tmp_path / "victim.bin"
    _file_writer(victim, tmp_path / "evil.pth")
    spec = member_specs(_cfg([str(tmp_path / "evil.pth")]))[0]
    assert spec.kind == "state_dict"
    for kind in ("state_dict", spec.kind):
        with pytest.raises(UserError, match="TorchScript program, not weights.*kind=torchscript"):
            _member(digits, tmp_path / "evil.pth", kind)
    assert victim.read_bytes() == b"AAAA"
    # Named as TorchScript, it is the user's program: it runs (and writes).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import_member(0, MemberSpec(tmp_path / "evil.pth", "torchscript"), digits, MLP, 512, "cpu")
    assert victim.read_bytes() == b"BBBB"


def test_onnx_external_data_outside_the_models_folder_is_refused(digits, tmp_path: Path) -> None:
    onnx = pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from onnx import TensorProto, helper, numpy_helper

    (tmp_path / "secret.bin").write_bytes(np.ones(10, np.float32).tobytes())
    (tmp_path / "model").mkdir()
    bias = TensorProto(name="b", data_type=TensorProto.FLOAT, dims=[10])
    bias.data_location = TensorProto.EXTERNAL
    bias.external_data.add(key="location", value="../secret.bin")
    weight = numpy_helper.from_array(np.zeros((64, 10), np.float32), "w")
    shape = numpy_helper.from_array(np.array([-1, 64], np.int64), "shape")
    nodes = [
        helper.make_node("Reshape", ["x", "shape"], ["flat"]),
        helper.make_node("MatMul", ["flat", "w"], ["z"]),
        helper.make_node("Add", ["z", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])],
        initializer=[weight, shape, bias],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, tmp_path / "model" / "m.onnx")
    with pytest.raises(UserError, match=r"reads tensor 'b' from \.\./secret\.bin, outside"):
        _member(digits, tmp_path / "model" / "m.onnx", "onnx")


# --- item 6: malformed files, one line each ------------------------------------------------------


def _cfg(members: list[str]):
    return OmegaConf.create(
        {"members": members, "kind": None, "arch": None, "input_scale": 1.0, "label_map": None}
    )


def test_a_member_path_that_is_not_a_file_is_one_line(tmp_path: Path) -> None:
    (tmp_path / "folder.pt").mkdir()
    os.symlink(tmp_path / "b.pt", tmp_path / "a.pt")
    os.symlink(tmp_path / "a.pt", tmp_path / "b.pt")
    os.symlink(tmp_path / "nowhere.pt", tmp_path / "dangling.pt")
    for name, problem in (
        ("folder.pt", "is a folder"),
        ("a.pt", "is a symlink loop"),
        ("dangling.pt", "is a symlink to .*nowhere.pt, which does not exist"),
        ("missing.pt", "does not exist"),
    ):
        with pytest.raises(UserError, match=f"{name} {problem}: pass the model or logits file"):
            member_specs(_cfg([str(tmp_path / name)]))


def _bad_logits(digits) -> dict[str, tuple[dict[str, np.ndarray] | None, str]]:
    """name -> (arrays for np.savez, or None for a file written otherwise; the error expected)."""
    good = _good_logits(digits)
    huge = {**good, "train": np.full(good["train"].shape, 1e300)}  # float64 beyond float32
    not_float = "logits are floating-point numbers shaped \\(examples, classes\\)"
    return {
        "npy_named.npz": (None, "is not an .npz \\(a zip of named arrays; an .npy"),
        "zero_rows.npz": (
            {"train": np.zeros((0, 10), np.float32), "test": np.zeros((0, 10), np.float32)},
            "train has 0 rows, dataset=digits's train split has 1212",
        ),
        "nan.npz": ({**good, "val": good["val"] * np.nan}, "NaN or infinite logits on the val"),
        "inf.npz": ({**good, "test": good["test"] - np.inf}, "NaN or infinite logits on the test"),
        "huge.npz": (huge, "on the train split \\(or values beyond float32's range\\)"),
        "complex.npz": ({s: a + 1j for s, a in good.items()}, f"dtype complex64; {not_float}"),
        "int.npz": ({s: a.astype(np.int64) for s, a in good.items()}, f"dtype int64; {not_float}"),
        "bool.npz": ({s: a > 0 for s, a in good.items()}, f"dtype bool; {not_float}"),
        "labels.npz": ({s: a.argmax(1) for s, a in good.items()}, "has shape \\(1212,\\)"),
        "rows.npz": ({**good, "test": good["test"][:-1]}, "test has 449 rows"),
        "classes.npz": ({s: a[:, :7] for s, a in good.items()}, "outputs 7 classes but"),
        "mixed.npz": (
            {**good, "test": good["test"][:, :7]},
            "different number of classes per split",
        ),
    }


def test_each_malformed_logits_file_is_one_line(digits, tmp_path: Path) -> None:
    for name, (arrays, problem) in _bad_logits(digits).items():
        if arrays is None:
            np.save(tmp_path / "single.npy", _good_logits(digits)["train"])
            (tmp_path / "single.npy").rename(tmp_path / name)
        else:
            np.savez(tmp_path / name, **arrays)
        with pytest.raises(UserError, match=problem):
            _member(digits, tmp_path / name, "logits")


class Returns(torch.nn.Module):
    """A model whose output is `what` instead of logits."""

    def __init__(self, what: str) -> None:
        super().__init__()
        self.what = what

    def forward(self, x: torch.Tensor):
        flat = x.flatten(1)[:, :10]
        if self.what == "1-D":
            return flat.sum(1)
        if self.what == "class ids":
            return flat.argmax(1, keepdim=True).expand(-1, 10)
        if self.what == "NaN":
            return flat * float("nan")
        if self.what == "float64 beyond float32":
            return flat.double() * 1e300 + 1e300
        if self.what == "one row":
            return flat[:1]
        return (flat, flat)


@pytest.mark.parametrize(
    ("what", "problem"),
    [
        ("1-D", "returns shape \\(512,\\) and dtype torch.float32 for 512 examples"),
        ("class ids", "returns shape \\(512, 10\\) and dtype torch.int64"),
        ("NaN", "NaN or infinite logits on the train split"),
        ("float64 beyond float32", "beyond float32's range"),
        ("one row", "returns shape \\(1, 10\\) .* for 512 examples"),
        ("tuple", "returns a tuple, not a tensor"),
    ],
)
def test_a_model_whose_output_is_not_logits_is_one_line(
    digits, tmp_path: Path, what: str, problem: str
) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.save(torch.jit.trace(Returns(what), torch.zeros(2, 1, 8, 8)), tmp_path / "m.ts")
    with pytest.raises(UserError, match=problem):
        _member(digits, tmp_path / "m.ts", "torchscript")


def test_logits_near_chance_say_their_rows_must_follow_the_assumed_dataset(
    digits, tmp_path: Path
) -> None:
    good = _good_logits(digits)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "shuffled.npz", **{s: a[rng.permutation(len(a))] for s, a in good.items()})
    cfg = OmegaConf.create({"train": {"eval_batch_size": 512}, "min_accuracy": None})
    spec = MemberSpec(tmp_path / "shuffled.npz", "logits")
    with pytest.raises(UserError, match="near chance") as refused:
        checked_member(0, spec, digits, MLP, cfg, torch.device("cpu"))
    message = str(refused.value)
    assert "rows must follow the splits of dataset=digits (the dataset assumed)" in message
    assert "(1212 train, 135 val, 450 test)" in message and "dataset=npz" in message
    assert "input_scale" not in message  # a model's causes, not a logits file's
    assert message.index("likely rows in another order") < message.index("label_map=")
