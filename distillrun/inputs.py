"""What `predict` classifies: a folder of PNG/JPEG images, an .npz array or a CSV of feature
vectors, read as raw inputs (the units the dataset loader yields: images in [0, 1]) with an id
per example. Normalisation is the model's own (formats.normalize), never given by hand.
"""

from __future__ import annotations

import csv
import io
import zipfile
from pathlib import Path

import numpy as np
import torch

from distillrun.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def read_inputs(path: Path, input_shape: list[int]) -> tuple[list[str], torch.Tensor]:
    """(ids, raw inputs [N, ...]) from an images folder, an .npz or a .csv file."""
    if path.is_dir():
        return _images(path, input_shape)
    if not path.is_file():
        raise UserError(f"input={path} does not exist: pass a folder of images, an .npz or a .csv")
    suffix = path.suffix.lower()
    if suffix == ".npz":
        return _npz(path)
    if suffix == ".csv":
        return _csv(path)
    if suffix in IMAGE_SUFFIXES:
        return _images(path, input_shape)
    raise UserError(
        f"input={path}: cannot read {suffix or 'files without a suffix'}; give a folder of "
        "PNG/JPEG images, an .npz array or a .csv of feature vectors"
    )


def _images(path: Path, input_shape: list[int]) -> tuple[list[str], torch.Tensor]:
    """Each image greyscaled or made RGB to the model's channels and resized to its height and
    width, as pixel / 255."""
    from PIL import Image, UnidentifiedImageError

    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise UserError(
            f"the model takes inputs of shape {tuple(input_shape)}, not images: give an .npz "
            "array or a .csv of feature vectors"
        )
    channels, height, width = input_shape
    files = (
        [path]
        if path.is_file()
        else sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    )
    if not files:
        raise UserError(f"input={path} holds no .png, .jpg or .jpeg files: pass a folder of images")
    arrays = []
    for file in files:
        try:
            with Image.open(file) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                if image.size != (width, height):
                    image = image.resize((width, height), Image.Resampling.BILINEAR)
                a = np.asarray(image, dtype=np.float32) / 255.0
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise UserError(f"cannot read image {file} ({e}): remove it or fix the file") from e
        arrays.append(a[None] if channels == 1 else a.transpose(2, 0, 1))
    return [f.name for f in files], torch.from_numpy(np.stack(arrays))


def load_npz(path: Path, what: str, fix: str) -> dict[str, np.ndarray]:
    """Every array of an .npz file, never unpickling (which could run code); a file that cannot
    be read is one UserError naming `what` it should be and the `fix`."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            if not hasattr(npz, "files"):
                raise ValueError("it holds a single array (.npy), not named arrays")
            return {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        reason = " ".join(str(e).split())[:160]
        if "pickle" in reason:
            reason = "it would have to be unpickled, which could run code, so it was not loaded"
        raise UserError(f"{path} is not a readable .npz of {what} ({reason}): {fix}") from e


def _npz(path: Path) -> tuple[list[str], torch.Tensor]:
    """The array `x` (or `x_test`, or the only array) of an .npz file; ids are row numbers."""
    arrays = load_npz(path, "inputs", "write it with np.savez(path, x=...)")
    keys = list(arrays)
    key = next((k for k in ("x", "x_test") if k in keys), keys[0] if len(keys) == 1 else None)
    if key is None:
        raise UserError(f"{path} holds arrays {', '.join(keys)}: name the inputs x (np.savez)")
    x = arrays[key]
    if not np.issubdtype(x.dtype, np.number) or x.ndim < 2 or not np.isfinite(x).all():
        raise UserError(
            f"{path}: {key} has shape {x.shape} and dtype {x.dtype}: give finite numbers, one "
            "example per row"
        )
    return [str(i) for i in range(len(x))], torch.from_numpy(np.asarray(x, dtype=np.float32))


def _csv(path: Path) -> tuple[list[str], torch.Tensor]:
    """One feature vector per row; an optional header, whose `id` column names the rows."""
    rows = [r for r in csv.reader(io.StringIO(path.read_text())) if r]
    if not rows:
        raise UserError(f"{path} is empty: one feature vector per row")
    header = None if all(_is_number(c) for c in rows[0]) else rows.pop(0)
    id_col = header.index("id") if header and "id" in header else None
    ids, values = [], []
    for n, row in enumerate(rows, start=2 if header else 1):
        cells = [c for i, c in enumerate(row) if i != id_col]
        if not all(_is_number(c) for c in cells):
            raise UserError(f"{path} line {n} holds a value that is not a number: fix the file")
        ids.append(row[id_col] if id_col is not None else str(len(ids)))
        values.append([float(c) for c in cells])
    widths = {len(v) for v in values}
    if len(widths) != 1:
        raise UserError(f"{path} has rows of {sorted(widths)} values: every row needs the same")
    x = torch.tensor(values, dtype=torch.float32)
    if not torch.isfinite(x).all():
        raise UserError(f"{path} holds NaN or infinite values: clean them first")
    return ids, x


def _is_number(cell: str) -> bool:
    try:
        float(cell)
    except ValueError:
        return False
    return True
