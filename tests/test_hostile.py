"""Hostile and odd inputs to `predict` (issue #24, item 6): each is one line naming the problem
and the fix, exit code 2, and no predictions.csv. In-process on inputs.read_inputs; two runs of
the installed command show the exit code and that nothing is written."""

from __future__ import annotations

import io
import os
import re
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ONE_THREAD, assert_one_line_error, distillrun_here, manifest, runs

from distillrun.errors import UserError
from distillrun.io.inputs import read_inputs

ROWS = "1,2,3\n4,5,6\n"


def read(path: Path, shape: list[int] | None = None, header: str = "auto"):
    return read_inputs(path, shape or [3], header)


def refused(path: Path, match: str, shape: list[int] | None = None, header: str = "auto") -> str:
    with pytest.raises(UserError, match=match) as excinfo:
        read(path, shape, header)
    message = str(excinfo.value)
    assert "\n" not in message and ": " in message  # one line, the problem then the fix
    return message


# --- CSV ---------------------------------------------------------------------------------------


def test_csv_header_rule_is_explicit(tmp_path: Path) -> None:
    """auto: a header only when no cell of the first row is a number; a stray non-number in the
    first row is no longer taken for a header (which dropped the row and shifted the ids)."""
    csv = tmp_path / "x.csv"
    csv.write_text("0.5x,2,3\n" + ROWS)
    refused(csv, r"row 1, column 1 holds '0\.5x'.*add header=true")
    ids, x = read(csv, header="true")  # the user says it is a header: then it is one
    assert ids == ["0", "1"] and x.tolist() == [[1, 2, 3], [4, 5, 6]]
    csv.write_text("a,b,c\n" + ROWS)
    assert read(csv)[1].shape == (2, 3)
    refused(csv, r"row 1, column 1 holds 'a'.*fix that cell", header="false")
    csv.write_text(ROWS)
    ids, x = read(csv, header="false")
    assert ids == ["0", "1"] and x.shape == (2, 3)
    ids, x = read(csv, header="true")  # the first row is then names, however numeric
    assert ids == ["0"] and x.tolist() == [[4, 5, 6]]


def test_csv_with_a_byte_order_mark_keeps_every_row(tmp_path: Path) -> None:
    csv = tmp_path / "bom.csv"
    csv.write_text(ROWS, encoding="utf-8-sig")  # Excel's "CSV UTF-8"
    ids, x = read(csv)
    assert ids == ["0", "1"] and x.tolist() == [[1, 2, 3], [4, 5, 6]]
    csv.write_text("id,a,b,c\ncat,1,2,3\n", encoding="utf-8-sig")
    assert read(csv)[0] == ["cat"]  # the header's first cell is "id", not "\ufeffid"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("1,2,3\n4,x,6\n", r"row 2, column 2 holds 'x', which is not a number: fix that cell"),
        ("1,2,3\n\n4,5,\n", r"row 3, column 3 holds ''"),  # blank lines count, as in a sheet
        ("1,2,3\n4,nan,6\n", r"row 2, column 2 holds 'nan', not a finite float32 number"),
        ("1,2,3\n4,5,1e39\n", r"row 2, column 3 holds '1e39', not a finite float32"),
        ("id,a,b\nq,1,inf\n", r"row 2, column 3 holds 'inf'"),
        ("1,2,3\n4,5\n", r"row 2 has 2 cells where row 1 has 3"),
        ("id,a,b\nq,1\n", r"row 2 has 2 cells where the header has 3"),
        ("a,b,c\n", "a header but no rows of values"),
        ("\n\n", "is empty"),
        ("id\nq\n", "an id column but no values"),
    ],
)
def test_csv_bad_cells_name_their_row_and_column(tmp_path: Path, text: str, match: str) -> None:
    (tmp_path / "x.csv").write_text(text)
    refused(tmp_path / "x.csv", match)


def test_csv_that_is_not_text_or_not_readable(tmp_path: Path) -> None:
    (tmp_path / "latin1.csv").write_bytes("caf\xe9,1\n".encode("latin-1"))
    refused(tmp_path / "latin1.csv", "not UTF-8 text.*save the CSV as UTF-8")
    (tmp_path / "long.csv").write_text('"' + "1" * 200_000 + '"\n')  # beyond csv's field limit
    refused(tmp_path / "long.csv", "not a readable CSV.*field larger")
    (tmp_path / "dir.csv").mkdir()  # a folder where a file is expected: read as images
    refused(tmp_path / "dir.csv", "holds no .png, .jpg or .jpeg files", [1, 2, 2])


# --- .npz --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("huge", r"x holds 1e\+300, beyond float32's range .* in row 1"),
        ("nan", "x holds NaN in row 0: give finite real numbers"),
        ("complex", "x holds complex numbers, not real numbers"),
        ("strings", "x holds <U1 values, not real numbers"),
        ("npy", r"single array saved with np.save \(.npy\).*np.savez\(path, x=...\)"),
        ("zero_rows", r"shape \(0, 3\), no examples"),
        ("one_d", r"shape \(3,\), not one example per row"),
        ("empty_file", r"not a readable .npz file of inputs \(it is empty\)"),
        ("text", "not a zip archive of arrays, so it was not loaded"),
        ("no_arrays", "holds no arrays"),
        ("truncated", "not a readable .npz file of inputs"),
        ("objects", "would have to be unpickled"),
        ("forged_shape", r"holds more than fits in memory .*use a smaller file"),
    ],
)
def test_npz_inputs_are_real_finite_rows(tmp_path: Path, case: str, match: str) -> None:
    path = tmp_path / "x.npz"
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    if case == "npy":
        with open(path, "wb") as f:  # np.save under an .npz name
            np.save(f, x)
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "text":
        path.write_text("x\n1,2,3\n")
    elif case == "truncated":
        np.savez(path, x=x)
        path.write_bytes(path.read_bytes()[:100])
    elif case == "no_arrays":
        np.savez(path)
    elif case == "forged_shape":  # a member whose header declares terabytes
        header = io.BytesIO()
        shape = {"descr": "<f8", "fortran_order": False, "shape": (10**11, 64)}
        np.lib.format.write_array_header_1_0(header, shape)
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("x.npy", header.getvalue() + bytes(64))
    else:
        array = {
            "huge": np.array([[0.0, 1, 2], [3, 1e300, 5]]),
            "nan": np.where(x == 2, np.nan, x),
            "complex": x.astype(complex),
            "strings": np.array([["a", "b", "c"]]),
            "zero_rows": np.zeros((0, 3)),
            "one_d": np.zeros(3),
            "objects": np.array([[1, 2, 3], "a"], dtype=object),
        }[case]
        np.savez(path, x=array)
    refused(path, match)


def test_npz_of_bool_int_and_float16_values_is_read_as_their_values(tmp_path: Path) -> None:
    for array in (
        np.eye(3, dtype=bool),
        np.eye(3, dtype=np.uint8) * 2,
        np.eye(3, dtype=np.float16),
    ):
        np.savez(tmp_path / "x.npz", x=array)
        ids, x = read(tmp_path / "x.npz")
        assert ids == ["0", "1", "2"] and x.dtype == torch.float32
        assert x.tolist() == array.astype(np.float32).tolist()


# --- images ------------------------------------------------------------------------------------


def save(folder: Path, name: str, image) -> Path:  # noqa: ANN001
    folder.mkdir(exist_ok=True)
    image.save(folder / name)
    return folder / name


def test_16_bit_png_is_scaled_by_its_true_range(tmp_path: Path) -> None:
    from PIL import Image

    pixels = np.array([[0, 1000], [32768, 65535]], dtype=np.uint16)
    file = save(tmp_path / "png", "a.png", Image.fromarray(pixels))
    assert Image.open(file).mode == "I;16"
    _, x = read(file, [1, 2, 2])
    np.testing.assert_allclose(x[0, 0].numpy(), pixels / 65535.0, rtol=1e-6)  # not clipped at 255
    _, rgb = read(file, [3, 2, 2])  # greyscale into an RGB model: the same value in each channel
    assert rgb.shape == (1, 3, 2, 2) and (rgb[0] == x[0, 0]).all()
    _, small = read(file, [1, 1, 1])  # resized as floats, never through 8 bits
    assert 0.3 < float(small) < 0.6


def test_8_bit_modes_are_read_and_transparency_is_refused(tmp_path: Path) -> None:
    from PIL import Image

    grey = np.array([[0, 255], [128, 64]], dtype=np.uint8)
    folder = tmp_path / "png"
    save(folder, "a_l.png", Image.fromarray(grey))
    save(folder, "b_palette.png", Image.fromarray(grey).convert("P"))
    save(folder, "c_rgba_opaque.png", Image.fromarray(grey).convert("RGBA"))
    save(folder, "d_1bit.png", Image.fromarray(grey > 100))
    ids, x = read(folder, [1, 2, 2])
    assert ids == ["a_l.png", "b_palette.png", "c_rgba_opaque.png", "d_1bit.png"]
    np.testing.assert_allclose(x[0, 0].numpy(), grey / 255.0, rtol=1e-6)
    np.testing.assert_allclose(x[1, 0].numpy(), grey / 255.0, rtol=1e-6)
    np.testing.assert_allclose(x[2, 0].numpy(), grey / 255.0, rtol=1e-6)
    assert x[3, 0].tolist() == [[0, 1], [1, 0]]
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)  # black strokes on a transparent background
    save(folder, "e_transparent.png", Image.fromarray(rgba))
    refused(folder, r"^image \S+e_transparent.png has transparent pixels.*flatten it", [1, 2, 2])


def test_damaged_images_and_folders(tmp_path: Path) -> None:
    from PIL import Image

    folder = tmp_path / "png"
    file = save(folder, "a.png", Image.fromarray(np.zeros((8, 8), dtype=np.uint8)))
    file.write_bytes(file.read_bytes()[:40])
    refused(folder, "cannot read image .*a.png.*remove it or fix the file", [1, 8, 8])
    file.write_bytes(b"not an image")
    refused(folder, "cannot read image", [1, 8, 8])
    refused(folder, r"takes inputs of shape \(64,\), not images", [64])
    (tmp_path / "loop.npz").symlink_to(tmp_path / "loop.npz")
    refused(tmp_path / "loop.npz", "symbolic link to nothing .*or a link loop")
    refused(tmp_path / "nothing.npz", "does not exist: pass a folder of images")


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file")
def test_unreadable_files_are_one_line(tmp_path: Path) -> None:
    (tmp_path / "x.csv").write_text(ROWS)
    np.savez(tmp_path / "x.npz", x=np.zeros((2, 3)))
    for name in ("x.csv", "x.npz"):
        (tmp_path / name).chmod(0)
        refused(tmp_path / name, "cannot read .*Permission denied.*make it a readable file")


# --- the config and the command ------------------------------------------------------------------


def test_header_takes_auto_true_or_false() -> None:
    from hydra import compose, initialize_config_module

    from distillrun.config import validate

    base = ["run=r", "input=i.csv"]
    with initialize_config_module(config_module="distillrun.conf", version_base="1.3"):
        for value in ("auto", "true", "false"):
            validate(
                "predict", compose(config_name="predict", overrides=[*base, f"header={value}"])
            )
        for value in ("maybe", "1"):
            cfg = compose(config_name="predict", overrides=[*base, f"header={value}"])
            with pytest.raises(UserError, match=f"header={value}: use auto, true or false"):
                validate("predict", cfg)


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("hostile")
    distillrun_here(
        cwd, "train-teachers", "debug=tiny", "teachers.n=1", "threads=1", env=ONE_THREAD
    )
    (folder,) = runs(cwd, "train-teachers")
    return folder


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "content", "fragment"),
    [
        ("x.csv", "0.5x" + ",0" * 63 + "\n" + "1" + ",0" * 63 + "\n", "add header=true"),
        ("x.npz", None, "no examples"),
    ],
)
def test_predict_refuses_in_one_line_and_writes_no_predictions(
    teachers: Path, tmp_path: Path, name: str, content: str | None, fragment: str
) -> None:
    if content is None:
        np.savez(tmp_path / name, x=np.zeros((0, 64)))
    else:
        (tmp_path / name).write_text(content)
    result = distillrun_here(
        tmp_path, "predict", f"run={teachers}", "member=0", f"input={name}", check=None
    )
    assert_one_line_error(result, fragment)
    (folder,) = runs(tmp_path, "predict")
    assert manifest(folder)["status"] == "failed"
    assert not (folder / "predictions.csv").exists()


def test_outputs_that_are_not_finite_are_refused_before_writing() -> None:
    """Finite inputs far outside the training data's scale can overflow the model."""
    from distillrun.stages.predict import check_finite

    probs = torch.tensor([[0.5, 0.5], [float("nan"), 0.5], [1.0, 0.0]])
    with pytest.raises(UserError, match=r"outputs for 1 input\(s\) of x.npz are not finite \(b\)"):
        check_finite(probs, ["a", "b", "c"], Path("x.npz"))
    check_finite(probs[[0, 2]], ["a", "c"], Path("x.npz"))


def test_other_pil_modes_are_refused_by_name(tmp_path: Path) -> None:
    """PNG and JPEG decode to the modes above; a float image, or 32-bit values beyond 16 bits,
    can only come from elsewhere and are refused rather than guessed at."""
    from PIL import Image

    from distillrun.io.inputs import _pixels

    with pytest.raises(UserError, match=r"^image f.png has PIL mode F, which predict does not"):
        _pixels(Path("f.png"), Image.new("F", (2, 2)), 1, 2, 2)
    wide = Image.fromarray(np.array([[0, 70000]], dtype=np.int32))
    assert wide.mode == "I"
    with pytest.raises(UserError, match=r"^image i.png holds values outside 0..65535"):
        _pixels(Path("i.png"), wide, 1, 1, 2)
    within = Image.fromarray(np.array([[0, 65535]], dtype=np.int32))
    assert _pixels(Path("i.png"), within, 1, 1, 2).tolist() == [[[0.0, 1.0]]]


def test_a_named_run_folder_that_is_no_run_says_what_it_is(tmp_path: Path) -> None:
    from distillrun.runs import artifacts

    (tmp_path / "file").write_text("x")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    export = tmp_path / "export"
    export.mkdir()
    artifacts.write_json(export / "manifest.json", {"stage": "export", "status": "complete"})
    nameless = tmp_path / "nameless"
    nameless.mkdir()
    artifacts.write_json(nameless / "manifest.json", {})
    cases = {
        "file": "is a file, not a run folder",
        "loop": "is a symbolic link to nothing (or a link loop)",
        "export": "is an export run, not a train-teachers run",
        "nameless": "it names no stage",
    }
    for name, message in cases.items():
        with pytest.raises(UserError, match=re.escape(message)):
            artifacts.complete_run(tmp_path / name, "train-teachers")
