"""What `predict` classifies: a folder of PNG/JPEG images, an .npz array or a CSV of feature
vectors, read as raw inputs (the units the dataset loader yields: images in [0, 1]) with an id
per example. Normalisation is the model's own (formats.normalize), never given by hand.

Everything read from a user's file goes through the same checks: numbers only (no complex,
text or object values), finite once cast to float32, at least one example. Each problem is one
UserError naming the file, where in it (row and column of a CSV, row of an array) and the fix.
"""

from __future__ import annotations

import csv
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distillrun.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# PIL modes of 8-bit images, converted to greyscale or RGB by PIL and divided by 255.
EIGHT_BIT_MODES = ("1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr")
# 16-bit greyscale PNGs: PIL reads them as "I;16" (or "I"), scaled by 65535, their true range.
SIXTEEN_BIT_MAX = 65535.0
NPZ_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip file's first bytes (the second: empty)
NPY_MAGIC = b"\x93NUMPY"
FLOAT32_MAX = float(np.finfo(np.float32).max)


def resolve(value: object, key: str) -> Path:
    """The absolute path a `key=value` setting names; a symbolic-link loop is a UserError
    (pathlib raises RuntimeError for it)."""
    try:
        return Path(os.path.expanduser(str(value))).resolve()
    except (RuntimeError, OSError) as e:
        raise UserError(f"{key}={value} cannot be resolved ({e}): point it at a real path") from e


def missing_path(path: Path, key: str, want: str) -> UserError:
    """The error for a `key=path` that is not there: a dangling link, a link loop or nothing."""
    what = "does not exist"
    if path.is_symlink():
        what = "is a symbolic link to nothing (or a link loop)"
    return UserError(f"{key}={path} {what}: {want}")


def read_inputs(
    path: Path, input_shape: list[int], header: str = "auto"
) -> tuple[list[str], torch.Tensor]:
    """(ids, raw inputs [N, ...]) from an images folder, an .npz or a .csv file. `header`
    (auto, true or false) says whether a CSV's first row names the columns."""
    if path.is_dir():
        return _images(path, input_shape)
    if not path.is_file():
        raise missing_path(path, "input", "pass a folder of images, an .npz or a .csv")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz(path)
    if suffix == ".csv":
        return _csv(path, header)
    if suffix in IMAGE_SUFFIXES:
        return _images(path, input_shape)
    raise UserError(
        f"input={path}: cannot read {suffix or 'files without a suffix'}; give a folder of "
        "PNG/JPEG images, an .npz array or a .csv of feature vectors"
    )


# --- arrays ------------------------------------------------------------------------------------


def as_float32(a: np.ndarray, what: str, fix: str) -> np.ndarray:
    """`a` as float32, refused unless it holds real numbers (bool, integer or float) that are
    all finite once cast: NaN, infinities and values beyond float32's range (which the cast
    makes infinite) are named with the row they are in (counting from 0, as array ids do)."""
    if a.dtype.kind not in "biuf":
        kind = "complex numbers" if a.dtype.kind == "c" else f"{a.dtype} values"
        raise UserError(f"{what} holds {kind}, not real numbers: {fix}")
    x = _float32(a)
    bad = _first_non_finite(x)
    if bad is not None:
        value = a[bad]
        problem = "NaN" if np.isnan(value) else "an infinite value"
        if np.isfinite(value):
            problem = f"{float(value):.3g}, beyond float32's range (+-{FLOAT32_MAX:.3g}),"
        where = f" in row {bad[0]}" if a.ndim else ""
        raise UserError(f"{what} holds {problem}{where}: {fix}")
    return x


def _float32(a: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore", invalid="ignore"):  # overflow becomes inf, refused after
        return np.asarray(a, dtype=np.float32)


def _first_non_finite(x: np.ndarray) -> tuple[int, ...] | None:
    bad = np.argwhere(~np.isfinite(x))
    return tuple(int(i) for i in bad[0]) if len(bad) else None


def load_npz(path: Path, what: str, fix: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file, never unpickling (which could run code); a file that cannot
    be read is one UserError naming `what` it should hold and the `fix`."""

    def refuse(reason: str) -> UserError:
        return UserError(f"{path} is not a readable .npz file of {what} ({reason}): {fix}")

    try:
        with open(path, "rb") as f:
            magic = f.read(6)
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): make it a readable file") from e
    if magic.startswith(NPY_MAGIC):
        raise refuse("it holds a single array saved with np.save (.npy), not named arrays")
    if not magic.startswith(NPZ_MAGIC):
        raise refuse(
            "not a zip archive of arrays, so it was not loaded" if magic else "it is empty"
        )
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {k: npz[k] for k in npz.files}
    # A damaged archive or member fails in any of these ways (zlib.error: bad compressed data).
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error, struct.error) as e:
        reason = " ".join(str(e).split())[:160] or type(e).__name__
        if "pickle" in reason:
            reason = "it would have to be unpickled, which could run code, so it was not loaded"
        raise refuse(reason) from e
    except MemoryError as e:  # also what a forged header declaring a huge shape gives
        raise UserError(f"{path} holds more than fits in memory ({e}): use a smaller file") from e


def _npz(path: Path) -> tuple[list[str], torch.Tensor]:
    """The array `x` (or `x_test`, or the only array) of an .npz file; ids are row numbers."""
    fix = "write it with np.savez(path, x=...), one example per row"
    arrays = load_npz(path, "inputs", fix)
    keys = list(arrays)
    if not keys:
        raise UserError(f"{path} holds no arrays: {fix}")
    key = next((k for k in ("x", "x_test") if k in keys), keys[0] if len(keys) == 1 else None)
    if key is None:
        raise UserError(f"{path} holds arrays {', '.join(keys)}: name the inputs x (np.savez)")
    a = arrays[key]
    if a.ndim < 2:
        raise UserError(f"{path}: {key} has shape {a.shape}, not one example per row: {fix}")
    if len(a) == 0:
        raise UserError(f"{path}: {key} has shape {a.shape}, no examples: {fix}")
    x = as_float32(a, f"{path}: {key}", "give finite real numbers, one example per row")
    return [str(i) for i in range(len(x))], torch.from_numpy(x)


# --- CSV ---------------------------------------------------------------------------------------


def _csv(path: Path, header: str) -> tuple[list[str], torch.Tensor]:
    """One feature vector per row. With a header (header=true, or auto and every cell of the
    first row not a number), an `id` column names the rows. Rows and columns in messages
    count from 1, blank lines included, as a spreadsheet shows them."""
    rows = _csv_rows(path)
    if not rows:
        raise UserError(f"{path} is empty: one feature vector per row")
    first = rows[0][1]
    has_header = header == "true" or (header == "auto" and not any(map(_is_number, first)))
    names = [c.strip() for c in rows.pop(0)[1]] if has_header else None
    if not rows:
        raise UserError(f"{path} holds a header but no rows of values: one feature vector per row")
    id_col = names.index("id") if names and "id" in names else None
    width = len(names) if names else len(rows[0][1])
    ids, values = [], []
    for line, row in rows:
        if len(row) != width:
            raise UserError(
                f"{path} row {line} has {len(row)} cells where "
                f"{'the header has' if names else f'row {rows[0][0]} has'} {width}: "
                "every row needs the same number of cells"
            )
        for col, cell in enumerate(row, start=1):
            if col - 1 != id_col and not _is_number(cell):
                raise UserError(_not_a_number(path, line, col, cell, header, rows[0][0]))
        ids.append(row[id_col] if id_col is not None else str(len(ids)))
        values.append([float(c) for i, c in enumerate(row) if i != id_col])
    x = _float32(np.array(values, dtype=np.float64))
    if x.shape[1] == 0:
        raise UserError(f"{path} has an id column but no values: one feature vector per row")
    bad = _first_non_finite(x)
    if bad is not None:
        line, row = rows[bad[0]]
        col = [i for i in range(len(row)) if i != id_col][bad[1]] + 1
        raise UserError(
            f"{path} row {line}, column {col} holds {row[col - 1].strip()!r}, not a finite "
            "float32 number: fix that cell"
        )
    return ids, torch.from_numpy(x)


def _csv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) of each non-blank row; a byte-order mark is not part of a cell."""
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f)
            rows = []
            for row in reader:
                if any(cell.strip() for cell in row):
                    rows.append((reader.line_num, row))
            return rows
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason}): save the CSV as UTF-8") from e
    except csv.Error as e:
        raise UserError(f"{path} is not a readable CSV ({e}): save it as plain CSV text") from e
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror}): make it a readable file") from e


def _not_a_number(path: Path, line: int, col: int, cell: str, header: str, first: int) -> str:
    where = f"{path} row {line}, column {col} holds {cell.strip()!r}, which is not a number"
    if line == first and header != "false":  # a first row taken for values
        return f"{where}: if row {line} names the columns, add header=true; else fix that cell"
    return f"{where}: fix that cell (or drop that row)"


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True


# --- images ------------------------------------------------------------------------------------


def _images(path: Path, input_shape: list[int]) -> tuple[list[str], torch.Tensor]:
    """Each image greyscaled or made RGB to the model's channels and resized to its height and
    width, in [0, 1]: 8-bit images as pixel / 255, 16-bit greyscale ones as pixel / 65535."""
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise UserError(
            f"the model takes inputs of shape {tuple(input_shape)}, not images: give an .npz "
            "array or a .csv of feature vectors"
        )
    if path.is_file():
        files = [path]
    else:
        try:
            names = sorted(path.iterdir())
        except OSError as e:
            raise UserError(f"cannot list {path} ({e.strerror}): make it readable") from e
        files = [p for p in names if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise UserError(f"input={path} holds no .png, .jpg or .jpeg files: pass a folder of images")
    arrays = [_image(file, *input_shape) for file in files]
    return [f.name for f in files], torch.from_numpy(np.stack(arrays))


def _image(file: Path, channels: int, height: int, width: int) -> np.ndarray:
    """One image file as a float32 array [channels, height, width] in [0, 1]."""
    from PIL import Image, UnidentifiedImageError

    # What a damaged or hostile file raises from PIL's decoders, besides OSError.
    damaged = (OSError, UnidentifiedImageError, ValueError, SyntaxError, struct.error, zlib.error)
    try:
        with Image.open(file) as image:
            image.load()
            return _pixels(file, image, channels, height, width)
    except UserError:
        raise  # already the message (a UserError is a ValueError too)
    except Image.DecompressionBombError as e:
        raise UserError(f"image {file} is too large to read safely ({e}): resize it") from e
    except damaged as e:
        raise UserError(f"cannot read image {file} ({e}): remove it or fix the file") from e


def _pixels(file: Path, image: Any, channels: int, height: int, width: int) -> np.ndarray:
    """The pixels of an opened PIL image, by its mode: 8-bit modes through PIL's conversion,
    16-bit greyscale by its true range; transparency and other modes are refused."""
    from PIL import Image

    mode = image.mode
    if "A" in mode or "a" in mode or "transparency" in image.info:
        if np.asarray(image.convert("RGBA"))[..., 3].min() < 255:
            raise UserError(
                f"image {file} has transparent pixels, whose colour would be a guess: flatten "
                "it onto the background your training images had (e.g. white or black)"
            )
    if mode in EIGHT_BIT_MODES:
        image = image.convert("L" if channels == 1 else "RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        a = np.asarray(image, dtype=np.float32) / 255.0
        return a[None] if channels == 1 else a.transpose(2, 0, 1)
    if mode == "I" or mode.startswith("I;16"):
        grey = np.asarray(image).astype(np.float32)
        if grey.min() < 0 or grey.max() > SIXTEEN_BIT_MAX:
            raise UserError(
                f"image {file} holds values outside 0..65535 (PIL mode {mode}): save it as an "
                "8-bit or 16-bit PNG"
            )
        resized = Image.fromarray(grey / SIXTEEN_BIT_MAX)  # mode F: 32-bit float
        if resized.size != (width, height):
            resized = resized.resize((width, height), Image.Resampling.BILINEAR)
        a = np.asarray(resized, dtype=np.float32)[None]
        return np.repeat(a, channels, axis=0)
    raise UserError(
        f"image {file} has PIL mode {mode}, which predict does not read: save it as an 8-bit "
        "or 16-bit greyscale, or an 8-bit RGB, PNG"
    )
