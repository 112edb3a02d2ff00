"""Teacher in, student out (issue #14): import-teachers, export and predict.

The round trip: train-teachers -> export a member to every format -> import-teachers from each
-> the imported logits equal the original cache, and distill on the import gives the same
student as on the original run. Plus the ways a user's file can be wrong, each one line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_one_line_error, distillrun_here, manifest, runs

from distillrun.core.data import load_dataset
from distillrun.core.models import build_model, load_model
from distillrun.errors import UserError
from distillrun.io.exports import normalize
from distillrun.io.imported import (
    MemberSpec,
    _unwrap,
    import_member,
    infer_kind,
    near_chance,
)
from distillrun.io.inputs import read_inputs
from distillrun.stages.predict import load_predictor

TEACHERS = [
    "teachers.n=1",
    "train.epochs=4",
    "train.batch_size=32",
    "model.hidden=[32]",
    "progress=false",
    "threads=1",
]
STUDENT = ["train.epochs=2", "model.hidden=[16]", "baseline=false", "progress=false", "threads=1"]
DIGITS = {"name": "digits", "test_fraction": 0.25, "val_fraction": 0.1, "split_seed": 0}
MLP = {"name": "mlp", "hidden": [8]}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("io")


@pytest.fixture(scope="module")
def teachers(workdir: Path) -> Path:
    distillrun_here(workdir, "train-teachers", *TEACHERS)
    (folder,) = runs(workdir, "train-teachers")
    return folder


@pytest.fixture(scope="module")
def exported(workdir: Path, teachers: Path) -> Path:
    distillrun_here(workdir, "export", f"run={teachers}", "member=0", "latency_repeats=3")
    (folder,) = runs(workdir, "export")
    return folder


@pytest.fixture(scope="module")
def imported(workdir: Path, teachers: Path, exported: Path) -> Path:
    """One import-teachers run whose members are the exported member in every format, and its
    cached logits both aligned with the splits and over the whole training set."""
    cache = torch.load(teachers / "logits.pt", weights_only=True)
    split = {s: cache[s][0].numpy() for s in ("train", "val", "test")}
    np.savez(workdir / "aligned.npz", **split)
    data = load_dataset(DIGITS)
    whole = np.zeros((len(data.train_rows) + len(data.val_rows), 10), np.float32)
    whole[data.train_rows.numpy()], whole[data.val_rows.numpy()] = split["train"], split["val"]
    np.savez(workdir / "whole.npz", train=whole, test=split["test"])
    files = [exported / "model.safetensors", exported / "model.ts", exported / "model.onnx"]
    files += [workdir / "aligned.npz", workdir / "whole.npz"]
    distillrun_here(
        workdir, "import-teachers", f"members=[{','.join(map(str, files))}]", "threads=1"
    )
    (folder,) = runs(workdir, "import-teachers")
    return folder


# --- the round trip ---------------------------------------------------------------------------


@pytest.mark.slow
def test_export_writes_every_format_checked_and_timed(exported: Path, teachers: Path) -> None:
    names = {p.name for p in exported.iterdir()}
    files = {"model.safetensors", "config.json", "model.ts", "model.onnx", "model.md"}
    assert files <= names
    m = manifest(exported)
    assert m["stage"] == "export" and m["status"] == "complete"
    assert m["inputs"]["run"] == str(teachers.resolve())
    metrics = m["metrics"]
    assert set(metrics["parity_max_abs_diff"]) == {"eager", "torchscript", "onnxruntime"}
    assert all(d <= 1e-4 for d in metrics["parity_max_abs_diff"].values())
    for runtime in ("eager", "torchscript", "onnxruntime"):
        assert set(metrics["latency_ms"][runtime]) == {"batch_1", "batch_256"}
        assert all(t > 0 for t in metrics["latency_ms"][runtime].values())
    teacher = manifest(teachers)["metrics"]["members"][0]
    assert metrics["test_errors"] == teacher["test_errors"]
    config = json.loads((exported / "config.json").read_text())
    assert config["input_shape"] == [1, 8, 8] and config["classes"] == [str(c) for c in range(10)]
    assert config["normalization"]["normalize"] == "standardize"
    assert len(config["normalization"]["mean"]) == 1  # one channel
    card = (exported / "model.md").read_text()
    assert "model.onnx" in card and str(teachers.resolve()) in card and "batch 256" in card


@pytest.mark.slow
def test_import_from_every_format_gives_the_original_logits(imported: Path, teachers: Path) -> None:
    original = torch.load(teachers / "logits.pt", weights_only=True)
    cache = torch.load(imported / "logits.pt", weights_only=True)
    assert cache["fingerprint"] == original["fingerprint"]
    for split in ("train", "val", "test"):
        assert cache[split].shape[0] == 5
        torch.testing.assert_close(cache[split], original[split][:1].expand_as(cache[split]))
    m = manifest(imported)
    assert m["stage"] == "import-teachers" and m["status"] == "complete"
    kinds = [member["kind"] for member in m["metrics"]["members"]]
    assert kinds == ["state_dict", "torchscript", "onnx", "logits", "logits"]
    errors = manifest(teachers)["metrics"]["members"][0]["test_errors"]
    assert all(member["test_errors"] == errors for member in m["metrics"]["members"])
    assert all("val_accuracy" in member for member in m["metrics"]["members"])
    # Only the PyTorch member has a checkpoint; the others say why they have none.
    assert torch.load(imported / "member_0.pt", weights_only=True)["num_classes"] == 10
    for i in (1, 2, 3, 4):
        assert not (imported / f"member_{i}.pt").exists()
        assert "no PyTorch weights" in (imported / f"member_{i}.pt.absent").read_text()


@pytest.mark.slow
def test_distill_on_the_import_gives_the_same_student(
    workdir: Path, teachers: Path, imported: Path, tmp_path: Path
) -> None:
    """The import's five members have the original's logits, so their ensemble teaches the
    student what the original did (to rounding: their mean is not bit-identical)."""
    distillrun_here(tmp_path, "distill", f"teachers={teachers}", *STUDENT)
    # No teachers=: the newest complete teachers run is the import (import-teachers counts).
    distillrun_here(workdir, "distill", *STUDENT)
    (original,) = runs(tmp_path, "distill")
    (from_import,) = runs(workdir, "distill")
    assert manifest(from_import)["inputs"]["teachers"] == str(imported.resolve())
    a, b = manifest(original)["metrics"], manifest(from_import)["metrics"]
    assert a["test_errors"] == b["test_errors"]
    sa = torch.load(original / "student.pt", weights_only=True)["state_dict"]
    sb = torch.load(from_import / "student.pt", weights_only=True)["state_dict"]
    for key in sa:
        torch.testing.assert_close(sa[key], sb[key], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_predict_on_png_images_with_onnx_and_with_pytorch(
    teachers: Path, exported: Path, tmp_path: Path
) -> None:
    from PIL import Image

    raw = load_dataset({**DIGITS, "normalize": "none"})  # pixels in [0, 1], as in a PNG / 255
    images = tmp_path / "png"
    images.mkdir()
    for i in range(12):
        pixels = (raw.x_test[i, 0].numpy() * 255).round().astype(np.uint8)
        size = 8 if i < 10 else 16  # two larger ones, resized to the model's 8x8
        Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST).save(
            images / f"{i:02d}.png"
        )
    out = distillrun_here(tmp_path, "predict", f"run={exported}", f"input={images}", "top_k=2")
    assert "00.png" in out.stdout and "top 2" in out.stdout
    (folder,) = runs(tmp_path, "predict")
    assert manifest(folder)["metrics"]["runtime"] == "onnxruntime"
    rows = [line.split(",") for line in (folder / "predictions.csv").read_text().splitlines()]
    assert rows[0] == ["id", "class", "probability", "top_2"]
    assert [r[0] for r in rows[1:]] == [f"{i:02d}.png" for i in range(12)]
    assert all(r[3].startswith(f"{r[1]}:") for r in rows[1:])

    # The run's PyTorch model reads the same images the same way, from the run's own config.
    forward, config, runtime = load_predictor(teachers, 0, torch.device("cpu"))
    ids, x = read_inputs(images, config["input_shape"])
    assert runtime == "pytorch" and ids == [r[0] for r in rows[1:]]
    assert forward(normalize(x, config)).argmax(dim=1).tolist() == [int(r[1]) for r in rows[1:]]
    # Raw inputs through the export's preprocessing give exactly the cached test logits.
    np.savez(tmp_path / "x.npz", x=raw.x_test.numpy())
    forward, config, runtime = load_predictor(exported, None, torch.device("cpu"))
    _, x = read_inputs(tmp_path / "x.npz", config["input_shape"])
    expected = torch.load(teachers / "logits.pt", weights_only=True)["test"][0]
    assert runtime == "onnxruntime"
    torch.testing.assert_close(forward(normalize(x, config)), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_a_format_that_disagrees_fails_the_export_with_the_figures(
    teachers: Path, tmp_path: Path
) -> None:
    from distillrun.io.exports import export_metrics, exportable, write_formats

    exp = exportable(teachers, 0)
    write_formats(exp, tmp_path)
    with torch.no_grad():
        exp.model.net[-1].bias.add_(0.01)  # the files no longer compute the model in memory
    with pytest.raises(UserError, match=r"parity check failed.*eager 1\.00e-02.*tolerance 0\.0001"):
        export_metrics(exp, tmp_path, 1e-4, 1, 256)


@pytest.mark.slow
def test_specialists_and_evaluate_take_an_imported_generalist(
    imported: Path, tmp_path: Path
) -> None:
    distillrun_here(
        tmp_path,
        "specialists",
        f"generalist={imported}",
        "specialists.member=0",  # the state_dict member: PyTorch weights to fine-tune
        "specialists.k=2",
        "dataset=digits",
        "debug=tiny",
    )
    distillrun_here(tmp_path, "evaluate", "progress=false")
    (specialists,) = runs(tmp_path, "specialists")
    (evaluate,) = runs(tmp_path, "evaluate")
    assert manifest(specialists)["inputs"]["generalist"] == str(imported.resolve())
    assert manifest(evaluate)["status"] == "complete"


@pytest.mark.slow
def test_specialists_refuse_an_onnx_generalist_in_one_line(imported: Path, tmp_path: Path) -> None:
    result = distillrun_here(
        tmp_path,
        "specialists",
        f"generalist={imported}",
        "specialists.member=2",
        "specialists.k=2",
        "dataset=digits",
        "progress=false",
        check=None,
    )
    assert_one_line_error(result, "member_2.pt", "imported as onnx", "kind=state_dict")


@pytest.mark.slow
def test_a_teacher_near_chance_is_refused_with_the_label_map_that_fixes_it(
    teachers: Path, tmp_path: Path
) -> None:
    cache = torch.load(teachers / "logits.pt", weights_only=True)
    order = [3, 7, 0, 9, 1, 5, 2, 8, 4, 6]  # the member's output j is our class order[j]
    shuffled = {s: cache[s][0][:, order].numpy() for s in ("train", "val", "test")}
    np.savez(tmp_path / "shuffled.npz", **shuffled)
    result = distillrun_here(tmp_path, "import-teachers", "members=[shuffled.npz]", check=None)
    assert_one_line_error(result, "near chance", "label_map=", "rows must follow the splits")
    assert f"label_map={order}".replace(" ", "") in result.stderr.replace(" ", "")


# --- one member, in process -------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    return load_dataset(DIGITS)


def test_normalize_none_keeps_the_values_and_the_splits_are_recorded(digits) -> None:
    raw = load_dataset({**DIGITS, "normalize": "none"})
    assert raw.normalization == {"normalize": "none"}
    assert float(raw.x_train.min()) == 0.0 and float(raw.x_train.max()) == 1.0
    norm = digits.normalization
    assert norm["normalize"] == "standardize" and len(norm["mean"]) == 1
    restored = digits.x_train * norm["std"][0] + norm["mean"][0]
    torch.testing.assert_close(restored, raw.x_train, atol=1e-5, rtol=0)
    rows = torch.cat([digits.train_rows, digits.val_rows]).sort().values
    assert torch.equal(rows, torch.arange(len(digits.y_train) + len(digits.y_val)))
    assert raw.fingerprint != digits.fingerprint


def test_state_dict_wrappers_and_module_prefix_are_understood(tmp_path: Path) -> None:
    state = build_model(MLP, (1, 8, 8), 10).state_dict()
    for wrapped in (state, {"model": state}, {"state_dict": state, "epoch": 3}):
        prefixed = {f"module.{k}": v for k, v in state.items()}
        for obj in (wrapped, {"state_dict": prefixed}):
            got, ours = _unwrap(obj, tmp_path / "w.pt")
            assert ours is None and got.keys() == state.keys()
    with pytest.raises(UserError, match="not a tensor"):
        _unwrap({"a": torch.zeros(1), "b": "text"}, tmp_path / "w.pt")


def test_kinds_are_inferred_from_the_file(tmp_path: Path) -> None:
    model = build_model(MLP, (1, 8, 8), 10)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    torch.jit.save(torch.jit.trace(model, torch.zeros(1, 1, 8, 8)), tmp_path / "m.pt")
    assert infer_kind(tmp_path / "w.pth") == "state_dict"
    # A program is run only when named as one: a TorchScript .pt is refused as weights.
    assert infer_kind(tmp_path / "m.pt") == "state_dict"
    assert infer_kind(tmp_path / "m.ts") == infer_kind(tmp_path / "m.torchscript") == "torchscript"
    assert infer_kind(tmp_path / "x.onnx") == "onnx"
    assert infer_kind(tmp_path / "l.npz") == "logits"
    with pytest.raises(UserError, match="kind="):
        infer_kind(tmp_path / "model.bin")


def _member(digits, path: Path, kind: str, **kw):
    spec = MemberSpec(path=path, kind=kind, **kw)
    return import_member(0, spec, digits, MLP, 512, torch.device("cpu"))


def test_safetensors_and_label_map(digits, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = build_model(MLP, (1, 8, 8), 10).eval()
    save_file(model.state_dict(), tmp_path / "m.safetensors")
    member = _member(digits, tmp_path / "m.safetensors", "state_dict")
    with torch.no_grad():
        torch.testing.assert_close(member.logits["test"], model(digits.x_test))
    assert member.checkpoint["model"] == MLP and member.params == sum(
        p.numel() for p in model.parameters()
    )
    order = list(range(1, 10)) + [0]
    mapped = _member(digits, tmp_path / "m.safetensors", "state_dict", label_map=order)
    torch.testing.assert_close(mapped.logits["test"][:, order], member.logits["test"])
    # Its checkpoint (for specialists and export) has the head's rows in our order too.
    torch.save(mapped.checkpoint, tmp_path / "member.pt")
    with torch.no_grad():
        reordered = load_model(tmp_path / "member.pt")(digits.x_test)
    torch.testing.assert_close(reordered, mapped.logits["test"])
    scaled = _member(digits, tmp_path / "m.safetensors", "state_dict", input_scale=2.0)
    assert scaled.checkpoint is None and "input_scale=2" in scaled.info["no_checkpoint"]


def test_unsafe_and_mismatched_files_are_one_line_errors(digits, tmp_path: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (print, ("this must never run",))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(UserError, match="other than tensors.*nothing in it was run"):
        _member(digits, tmp_path / "evil.pt", "state_dict")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(UserError, match="cannot load .* as an ONNX model"):
        _member(digits, tmp_path / "junk.onnx", "onnx")
    # Five classes where the dataset has ten.
    torch.save(build_model(MLP, (1, 8, 8), 5).state_dict(), tmp_path / "five.pt")
    with pytest.raises(UserError, match="outputs 5 classes but dataset=digits has 10"):
        _member(digits, tmp_path / "five.pt", "state_dict")
    # A model for 28x28 inputs.
    torch.save(build_model(MLP, (1, 28, 28), 10).state_dict(), tmp_path / "big.pt")
    with pytest.raises(UserError, match="does not fit the architecture mlp"):
        _member(digits, tmp_path / "big.pt", "state_dict")
    # ONNX and TorchScript models for 28x28 inputs.
    big = build_model(MLP, (1, 28, 28), 10).eval()
    torch.onnx.export(big, (torch.zeros(1, 1, 28, 28),), tmp_path / "big.onnx", dynamo=False)
    with pytest.raises(UserError, match=r"takes inputs of shape \(1, 28, 28\) but .* \(1, 8, 8\)"):
        _member(digits, tmp_path / "big.onnx", "onnx")
    torch.jit.save(torch.jit.trace(big, torch.zeros(1, 1, 28, 28)), tmp_path / "big.ts")
    with pytest.raises(
        UserError, match=r"cannot run on this dataset's inputs of shape \(1, 8, 8\)"
    ):
        _member(digits, tmp_path / "big.ts", "torchscript")
    # An .npz whose arrays would have to be unpickled.
    np.savez(tmp_path / "objects.npz", train=np.array([{"a": 1}], dtype=object), test=np.zeros(1))
    with pytest.raises(UserError, match="unpickled, which could run code, so it was not loaded"):
        _member(digits, tmp_path / "objects.npz", "logits")
    # Logits of the wrong length.
    np.savez(tmp_path / "short.npz", train=np.zeros((5, 10)), test=np.zeros((450, 10)))
    with pytest.raises(UserError, match="train has 5 rows.*whole training set \\(1347 rows\\)"):
        _member(digits, tmp_path / "short.npz", "logits")


def test_near_chance_names_the_causes_and_the_fixing_label_map() -> None:
    y = torch.arange(100) % 4
    good = torch.nn.functional.one_hot(y, 4).float()
    assert near_chance(good, y, 4, None) is None
    swapped = good[:, [1, 0, 3, 2]]  # output j is our class [1, 0, 3, 2][j]
    why = near_chance(swapped, y, 4, None)
    assert "label_map=[1, 0, 3, 2] would score 100.0%" in why
    assert "dataset.normalize" in why and "input_scale" in why
    assert near_chance(swapped, y, 4, 0.0) is None  # min_accuracy=0 takes anything


def test_a_torchvision_architecture_by_name(tmp_path: Path) -> None:
    """arch=torchvision:<name>: torchvision's own classifier with the dataset's class count,
    from DataParallel weights in a {"model": ...} wrapper; its checkpoint rebuilds it."""
    from distillrun.core.models import load_model

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "rgb.npz",
        x_train=rng.random((16, 3, 24, 24), np.float32),
        y_train=np.arange(16) % 4,
        x_test=rng.random((4, 3, 24, 24), np.float32),
        y_test=np.arange(4) % 4,
    )
    data = load_dataset(
        {
            "name": "npz",
            "path": str(tmp_path / "rgb.npz"),
            "val_fraction": 0.1,
            "split_seed": 0,
            "standardize": True,
        }
    )
    torch.manual_seed(0)
    net = build_model({"name": "torchvision:squeezenet1_1"}, (3, 24, 24), 4).eval()
    torch.save(
        {"model": {f"module.{k}": v for k, v in net.state_dict().items()}}, tmp_path / "w.pt"
    )
    spec = MemberSpec(path=tmp_path / "w.pt", kind="state_dict", arch="torchvision:squeezenet1_1")
    member = import_member(0, spec, data, MLP, 64, torch.device("cpu"))
    with torch.no_grad():
        torch.testing.assert_close(member.logits["test"], net(data.x_test))
    assert member.info["arch"] == {"name": "torchvision:squeezenet1_1"}
    torch.save(member.checkpoint, tmp_path / "member_0.pt")
    with torch.no_grad():
        rebuilt = load_model(tmp_path / "member_0.pt")(data.x_test)
    torch.testing.assert_close(rebuilt, member.logits["test"])
    with pytest.raises(UserError, match="did you mean 'torchvision:squeezenet1_1'"):
        import_member(
            0, MemberSpec(spec.path, "state_dict", "torchvision:squeezenet11"), data, MLP, 64, "cpu"
        )


def test_bad_settings_are_refused_before_any_run_folder(tmp_path: Path) -> None:
    for args, fragment in (
        (["import-teachers"], "members=[teacher.onnx]"),
        (["import-teachers", "members=[a.pt]", "kind=keras"], "kind=keras"),
        (["import-teachers", "members=[a.pt]", "label_map=[0,0,1]"], "distinct class ids"),
        (["export"], "distillrun export run="),
        (["predict", "run=x"], "input=<folder of PNG/JPEG"),
    ):
        result = distillrun_here(tmp_path, *args, check=None)
        assert_one_line_error(result, fragment)
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("*.json"))


def test_every_member_kind_has_its_loader() -> None:
    from distillrun.choices import MEMBER_KINDS
    from distillrun.io.imported import LOADERS

    assert tuple(LOADERS) == MEMBER_KINDS


def test_which_model_a_run_exports(tmp_path: Path) -> None:
    from distillrun.io.exports import classes_of, model_file

    distill = {"stage": "distill"}
    assert model_file(tmp_path, distill, None) == tmp_path / "student.pt"
    with pytest.raises(UserError, match="drop member=1"):
        model_file(tmp_path, distill, 1)
    teachers = {"stage": "import-teachers", "metrics": {"members": [{}, {}]}}
    assert model_file(tmp_path, teachers, 1) == tmp_path / "member_1.pt"
    with pytest.raises(UserError, match="member=0..1"):
        model_file(tmp_path, teachers, None)
    with pytest.raises(UserError, match="use 0..1"):
        model_file(tmp_path, teachers, 2)
    with pytest.raises(UserError, match="evaluate run, which holds no model"):
        model_file(tmp_path, {"stage": "evaluate"}, None)
    (tmp_path / "clusters.json").write_text(json.dumps({"clusters": [[1, 2], [3, 4, 5]]}))
    specialists = {"stage": "specialists", "metrics": {"members": [{}, {}]}}
    assert model_file(tmp_path, specialists, 1) == tmp_path / "specialist_1.pt"
    assert classes_of(tmp_path, specialists, 1, 4) == ["3", "4", "5", "dustbin"]
    assert classes_of(tmp_path, specialists, 1, 10) == [str(c) for c in range(10)]  # full head


def test_predict_reads_csv_rows_with_ids_and_refuses_other_shapes(tmp_path: Path) -> None:
    from distillrun.io.exports import ensure_shape

    (tmp_path / "x.csv").write_text("id,a,b,c,d\ncat,0,1,2,3\ndog,4,5,6,7\n")
    ids, x = read_inputs(tmp_path / "x.csv", [2, 2])
    assert ids == ["cat", "dog"] and x.tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert ensure_shape(x, [1, 2, 2], "x.csv").shape == (2, 1, 2, 2)
    with pytest.raises(UserError, match=r"shape \(4,\) but the model takes \(1, 8, 8\)"):
        ensure_shape(x, [1, 8, 8], "x.csv")
    (tmp_path / "ragged.csv").write_text("1,2\n3\n")
    with pytest.raises(UserError, match="row 2 has 1 cells where row 1 has 2"):
        read_inputs(tmp_path / "ragged.csv", [2])
    with pytest.raises(UserError, match="not images"):
        read_inputs(tmp_path, [4])


def test_without_the_onnx_extra_one_line_says_how_to_get_it(monkeypatch) -> None:
    import importlib.util

    from distillrun.io.imported import need_onnx

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "onnxruntime" else real(name)
    )
    with pytest.raises(
        UserError, match=r"onnxruntime, not installed: pip install 'distillrun\[onnx\]'"
    ):
        need_onnx()


def test_a_checkpoint_tells_its_own_architecture(tmp_path: Path) -> None:
    """What specialists start from: the member's own architecture, which for an imported
    generalist need not be its run's `model` config."""
    from distillrun.core.models import checkpoint, load_checkpoint

    small = {"name": "mlp", "hidden": [4]}
    torch.save(checkpoint(build_model(small, (3,), 2), small, (3,), 2), tmp_path / "m.pt")
    model, model_cfg = load_checkpoint(str(tmp_path / "m.pt"))
    assert model_cfg == small and model.net[1].out_features == 4
