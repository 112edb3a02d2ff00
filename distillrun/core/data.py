"""Datasets as in-memory CPU tensors: load, hold out a validation split, standardise, fingerprint.

Each dataset has one small loader that returns raw arrays; `_finish` does the rest the same way
for all of them: label checks, the stratified validation split, standardisation with statistics
of the training split only, and a sha256 fingerprint of the exact result.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from distillrun.errors import UserError

_TENSORS = ("x_train", "y_train", "x_val", "y_val", "x_test", "y_test")
_IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_CIFAR_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch", "batches.meta")
_CIFAR100_FILES = ("train", "test", "meta")


@dataclass(eq=False)
class Data:
    """A dataset split into train / validation / test tensors, ready for training."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    image_shape: tuple[int, int, int] | None
    fingerprint: str
    superclass: list[int] | None = None  # superclass of each class, where the dataset knows it
    # What was done to the loader's values (images in [0, 1]): {"normalize": "standardize",
    # "mean": [...], "std": [...]} per channel or feature, or {"normalize": "none"}. Exported
    # models carry it, so `predict` prepares raw inputs exactly as training did.
    normalization: dict[str, Any] | None = None
    # Rows of the loader's training set that became the train and validation splits (sorted),
    # so outputs computed elsewhere over the whole training set can be split the same way.
    train_rows: torch.Tensor | None = None
    val_rows: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Data:
        """A new Data with every tensor moved to `device`."""
        return replace(self, **{k: getattr(self, k).to(device) for k in _TENSORS})

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example: (C, H, W) for images, (D,) for vectors."""
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (
            f"Data(name={self.name!r}, train={len(self.y_train)}, val={len(self.y_val)}, "
            f"test={len(self.y_test)}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, fingerprint={self.fingerprint[:12]!r})"
        )


def load_dataset(cfg: Any) -> Data:
    """Load the dataset described by the `dataset` config node (see conf/dataset/*.yaml)."""
    name = str(_get(cfg, "name"))
    loader = _LOADERS.get(name)
    if loader is None:
        known = ", ".join(sorted(_LOADERS))
        raise UserError(f"unknown dataset.name={name!r}: choose one of {known}")
    data = loader(cfg)
    # A preset of a generator (jft_like) is named as the user chose it; its fingerprint, and so
    # its caches and the runs that consume it, stay the generator's.
    shown = _optional(cfg, "display_name")
    return replace(data, name=str(shown)) if shown else data


# --- config access ---------------------------------------------------------------------------


def _has(cfg: Any, key: str) -> bool:
    return key in cfg if isinstance(cfg, Mapping) else hasattr(cfg, key)


def _optional(cfg: Any, key: str) -> Any:
    """cfg.key, or None where the dataset's config has no such key."""
    return cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)


def _get(cfg: Any, key: str) -> Any:
    """cfg.key, or a UserError naming the missing key."""
    if isinstance(cfg, DictConfig) and key in cfg.keys() and OmegaConf.is_missing(cfg, key):
        value = None
    else:
        value = _optional(cfg, key)
    if value is None:
        hint = "/path/to/data.npz" if key == "path" else "<value>"
        raise UserError(f"dataset.{key} is not set: add dataset.{key}={hint}")
    return value


def _fraction(cfg: Any, key: str, allow_zero: bool) -> float:
    value = _get(cfg, key)
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    if not is_number or value < 0 or (value == 0 and not allow_zero) or value >= 1:
        low = "[0" if allow_zero else "(0"
        raise UserError(
            f"dataset.{key}={value!r} is not a fraction in {low}, 1): set e.g. dataset.{key}=0.1"
        )
    return float(value)


def _int(cfg: Any, key: str) -> int:
    value = _get(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"dataset.{key}={value!r} is not an integer: set e.g. dataset.{key}=0")
    return value


# --- shared helpers ----------------------------------------------------------------------------


def _split(y: np.ndarray, fraction: float, seed: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Sorted row indices (kept, held out) holding out `fraction`, stratified when possible."""
    # sklearn.model_selection imports scipy and pandas (~2 s): only when a split is made.
    from sklearn.model_selection import train_test_split

    rows = np.arange(len(y))
    if fraction == 0:
        return rows, rows[:0]
    try:
        kept, held = train_test_split(rows, test_size=fraction, stratify=y, random_state=seed)
    except ValueError:  # a class too rare, or too few held-out rows for one per class
        try:
            kept, held = train_test_split(rows, test_size=fraction, random_state=seed)
        except ValueError as exc:
            raise UserError(
                f"cannot hold out {what} of {len(y)} rows ({exc}): "
                "lower the fraction or use more data"
            ) from exc
    return np.sort(kept), np.sort(held)


def _at_most(rows: np.ndarray, limit: int, seed: int) -> np.ndarray:
    """`limit` of `rows`, drawn at random with `seed` and sorted; all of them if no more."""
    if len(rows) <= limit:
        return rows
    return np.sort(np.random.default_rng(seed).choice(rows, limit, replace=False))


def _float32(x: np.ndarray, scale: float) -> torch.Tensor:
    out = x.astype(np.float32)  # a new array, whatever the dtype
    if scale != 1.0:
        np.divide(out, np.float32(scale), out=out)
    return torch.from_numpy(out)


def _standardize(
    train: torch.Tensor, others: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: per channel for images (N, C, H, W), per feature for vectors, train statistics.
    Returns the mean and std used."""
    dims = (0, 2, 3) if train.ndim == 4 else (0,)
    std, mean = torch.std_mean(train, dim=dims, keepdim=True, correction=0)
    std = torch.where(std > 1e-6, std, torch.ones_like(std))  # constant features: only centre
    for t in (train, *others):
        t.sub_(mean).div_(std)
    return mean, std


def _fingerprint(name: str, tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256(name.encode())
    for key, t in zip(_TENSORS, tensors, strict=True):
        h.update(f"|{key}:{t.dtype}:{tuple(t.shape)}|".encode())
        h.update(t.contiguous().numpy().data)
    return h.hexdigest()


def _finish(
    name: str,
    cfg: Any,
    x_train: np.ndarray,
    y_train: np.ndarray,
    x_test: np.ndarray,
    y_test: np.ndarray,
    num_classes: int | None = None,
    standardize: bool = True,
    scale: float = 1.0,
) -> Data:
    """Check labels, split off validation, standardise and fingerprint: the common tail. The
    inputs become float32 divided by `scale` after the split, so bytes (uint8 images) are
    converted once, split by split, not copied whole as floats and then again by the split."""
    val_fraction = _fraction(cfg, "val_fraction", allow_zero=True)
    seed = _int(cfg, "split_seed")
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    if num_classes is None:
        num_classes = int(max(y_train.max(), y_test.max())) + 1
    for split, y in (("train", y_train), ("test", y_test)):
        bad = y[(y < 0) | (y >= num_classes)]
        if len(bad):
            raise UserError(
                f"{name}: {split} label {int(bad[0])} is outside 0..{num_classes - 1}: "
                "fix the labels in the data files"
            )

    kept, held = _split(y_train, val_fraction, seed, f"dataset.val_fraction={val_fraction}")
    if len(kept) == 0:
        raise UserError(f"{name}: the training split is empty: lower dataset.val_fraction")
    limit = _optional(cfg, "max_per_split")
    if limit is not None:  # debug=tiny: a smoke run scores a few thousand examples, not 70,000
        kept, held = _at_most(kept, limit, seed), _at_most(held, limit, seed)
        test_rows = _at_most(np.arange(len(y_test)), limit, seed)
        x_test, y_test = np.asarray(x_test)[test_rows], y_test[test_rows]
    y_all = torch.from_numpy(y_train)
    kept_t, held_t = torch.from_numpy(kept), torch.from_numpy(held)
    x_train = np.asarray(x_train)
    # Our own float32 copies (standardised in place below): `astype(float32) / scale`, exactly.
    xs = [_float32(x, scale) for x in (x_train[kept], x_train[held], np.asarray(x_test))]
    found = _optional(cfg, "normalize")
    normalize = str(found or "standardize")  # datasets configured before the key existed
    normalization: dict[str, Any] = {"normalize": "none"}
    if standardize and normalize == "standardize":
        mean, std = _standardize(xs[0], (xs[1], xs[2]))
        normalization = {
            "normalize": "standardize",
            "mean": mean.flatten().tolist(),
            "std": std.flatten().tolist(),
        }
    elif normalize not in ("standardize", "none"):
        raise UserError(f"dataset.normalize={normalize}: use standardize or none")
    tensors = [xs[0], y_all[kept_t], xs[1], y_all[held_t], xs[2], torch.from_numpy(y_test)]
    tensors = [t.contiguous() for t in tensors]
    image_shape = tuple(xs[0].shape[1:]) if xs[0].ndim == 4 else None
    return Data(
        name,
        *tensors,
        num_classes=num_classes,
        image_shape=image_shape,
        fingerprint=_fingerprint(name, tensors),
        normalization=normalization,
        train_rows=kept_t,
        val_rows=held_t,
    )


# --- loaders -----------------------------------------------------------------------------------


def _load_digits(cfg: Any) -> Data:
    """scikit-learn's 8x8 digits, with a stratified test split drawn by split_seed."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).reshape(-1, 1, 8, 8)
    y = digits.target
    test_fraction = _fraction(cfg, "test_fraction", allow_zero=False)
    train, test = _split(y, test_fraction, _int(cfg, "split_seed"), "dataset.test_fraction")
    return _finish("digits", cfg, x[train], y[train], x[test], y[test])


def _root(cfg: Any) -> Path:
    return Path(os.path.expanduser(str(_get(cfg, "root")))).resolve()


def _torchvision(
    cls: type, label: str, root: Path, folder: Path, files: tuple[str, ...], cfg: Any
) -> list[Any]:
    """[train, test] datasets of torchvision class `cls`, every failure turned into a UserError."""
    download = bool(_get(cfg, "download"))
    try:
        return [cls(str(root), train=train, download=download) for train in (True, False)]
    # torchvision raises RuntimeError, URLError, ValueError, AssertionError, pickle errors... for
    # missing, corrupt or undownloadable files: all of them are the user's to fix.
    except Exception as exc:
        missing = [folder / f for f in files if not (folder / f).is_file()]
        reason = " ".join(str(exc).split())[:300] or type(exc).__name__
        if missing and not download:
            raise UserError(
                f"{label} not found under {root} (looked for {missing[0]}): set dataset.root=... "
                "(or the DISTILLRUN_DATA environment variable) to the folder holding it, "
                "or add dataset.download=true to fetch it"
            ) from exc
        if missing:
            raise UserError(
                f"could not download {label} into {root} ({reason}): check the internet "
                f"connection, or put the files in {folder} yourself and use dataset.download=false"
            ) from exc
        raise UserError(
            f"{label} files in {folder} are unreadable or corrupt ({reason}): delete them and add "
            "dataset.download=true to fetch fresh copies, or point dataset.root=... at good ones"
        ) from exc


def _load_idx(cfg: Any, name: str, class_name: str) -> Data:
    """MNIST and Fashion-MNIST: uint8 (N, 28, 28) images, as torchvision's .data holds them.

    Files already in place are read directly (`_read_idx`): importing torchvision.datasets
    takes 1.5 s of every stage's start. torchvision downloads them, and names what is missing.
    """
    root = _root(cfg)
    folder = root / class_name / "raw"
    if not bool(_get(cfg, "download")) and all((folder / f).is_file() for f in _IDX_FILES):
        try:
            x, y, x_test, y_test = (_read_idx(folder / f) for f in _IDX_FILES)
        except (OSError, ValueError) as exc:
            raise UserError(
                f"{class_name} files in {folder} are unreadable or corrupt ({exc}): delete them "
                "and add dataset.download=true to fetch fresh copies, or point dataset.root=... "
                "at good ones"
            ) from exc
    else:
        import torchvision.datasets

        cls = getattr(torchvision.datasets, class_name)
        train, test = _torchvision(cls, class_name, root, folder, _IDX_FILES, cfg)
        x, y, x_test, y_test = (
            t.numpy() for t in (train.data, train.targets, test.data, test.targets)
        )
    for images, labels in ((x, y), (x_test, y_test)):
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise UserError(
                f"{class_name} files in {folder} do not pair {images.shape} images with "
                f"{labels.shape} labels: delete them and add dataset.download=true"
            )
    return _finish(name, cfg, x[:, None], y, x_test[:, None], y_test, 10, scale=255.0)


def _read_idx(path: Path) -> np.ndarray:
    """An uncompressed IDX file of unsigned bytes: 0, 0, 8 (the type), the number of
    dimensions, each size as 4 big-endian bytes, then the data."""
    raw = np.fromfile(path, dtype=np.uint8)
    ndim = int(raw[3]) if len(raw) >= 4 else 0
    if ndim == 0 or raw[:3].tolist() != [0, 0, 8] or len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path.name} is not an IDX file of bytes")
    sizes = raw[4 : 4 + 4 * ndim].reshape(ndim, 4).astype(np.int64)
    shape = tuple(int(n) for n in sizes @ np.array([1 << 24, 1 << 16, 1 << 8, 1]))
    data = raw[4 + 4 * ndim :]
    if data.size != np.prod(shape):
        raise ValueError(f"{path.name} holds {data.size} bytes where its header says {shape}")
    return data.reshape(shape)


def _load_mnist(cfg: Any) -> Data:
    return _load_idx(cfg, "mnist", "MNIST")


def _load_fashion_mnist(cfg: Any) -> Data:
    return _load_idx(cfg, "fashion_mnist", "FashionMNIST")


def _load_cifar10(cfg: Any) -> Data:
    """CIFAR-10: torchvision's .data is uint8 (N, 32, 32, 3), turned into (N, 3, 32, 32)."""
    from torchvision.datasets import CIFAR10

    root = _root(cfg)
    folder = root / CIFAR10.base_folder
    train, test = _torchvision(CIFAR10, "CIFAR-10", root, folder, _CIFAR_FILES, cfg)

    def images(ds: Any) -> np.ndarray:
        return ds.data.transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    return _finish(
        "cifar10", cfg, images(train), np.array(train.targets), images(test), test.targets, 10
    )


def _load_cifar100(cfg: Any) -> Data:
    """CIFAR-100's 100 fine classes; the 20 coarse labels become each class's superclass."""
    import pickle

    from torchvision.datasets import CIFAR100

    root = _root(cfg)
    folder = root / CIFAR100.base_folder
    train, test = _torchvision(CIFAR100, "CIFAR-100", root, folder, _CIFAR100_FILES, cfg)
    # torchvision keeps only the fine labels; the coarse ones are in the same (md5-checked) file.
    with open(folder / "train", "rb") as f:
        coarse = pickle.load(f, encoding="latin1").get("coarse_labels")
    if coarse is None or len(coarse) != len(train.targets):
        raise UserError(
            f"{folder / 'train'} has no coarse labels: it is not CIFAR-100's python version; "
            "delete it and add dataset.download=true"
        )
    superclass = [0] * 100
    for fine, c in zip(train.targets, coarse, strict=True):
        superclass[fine] = int(c)

    def images(ds: Any) -> np.ndarray:
        return ds.data.transpose(0, 3, 1, 2).astype(np.float32) / 255.0

    data = _finish(
        "cifar100", cfg, images(train), np.array(train.targets), images(test), test.targets, 100
    )
    return replace(data, superclass=superclass)


def _load_hierarchical(cfg: Any) -> Data:
    """Gaussian classes in superclasses, generated from dataset.seed.

    Superclass centres are drawn with spread `super_spread`, each of the `n_sub` class centres
    of a superclass around its superclass centre with spread `sub_spread`, and every example
    around its class centre with unit noise: classes of one superclass are close and confused.
    With `cross_modes` > 0, each of a class's `modes` blobs lies, with that probability, among
    the classes of another superclass (drawn at random) instead: such a class is confused with
    two groups or more, so overlapping clusters can cover it several times.
    """
    n_super, n_sub, dim = (_int(cfg, k) for k in ("n_super", "n_sub", "dim"))
    per_class = {s: _int(cfg, f"{s}_per_class") for s in ("train", "test")}
    spreads = {k: float(_get(cfg, k)) for k in ("super_spread", "sub_spread", "mode_spread")}
    modes = _int(cfg, "modes")
    # Absent from the configs of runs made before it existed: those had none.
    cross = float(_get(cfg, "cross_modes")) if _has(cfg, "cross_modes") else 0.0
    if min(n_super, n_sub, dim, modes, *per_class.values()) < 1 or min(spreads.values()) < 0:
        raise UserError(
            "dataset.n_super, n_sub, dim, modes and *_per_class must be >= 1 and the spreads >= 0"
        )
    if not 0 <= cross <= 1 or (cross > 0 and n_super < 2):
        raise UserError(f"dataset.cross_modes={cross}: use a probability in [0, 1] (n_super >= 2)")
    rng = np.random.default_rng(_int(cfg, "seed"))
    supers = rng.normal(0.0, spreads["super_spread"], (n_super, 1, dim))
    centres = (supers + rng.normal(0.0, spreads["sub_spread"], (n_super, n_sub, dim))).reshape(
        n_super * n_sub, 1, dim
    )
    # Each class is a mixture of `modes` blobs, so its boundary with its siblings is not linear.
    blobs = centres + rng.normal(0.0, spreads["mode_spread"], (len(centres), modes, dim))
    if cross > 0:  # drawn only then, so that cross_modes=0 gives the data it always gave
        home = np.arange(len(centres)) // n_sub
        away = (home[:, None] + rng.integers(1, n_super, (len(centres), modes))) % n_super
        stray = rng.random((len(centres), modes)) < cross
        # A stray blob keeps its offset from its class centre, moved to a fresh spot among the
        # classes of superclass `away`.
        moved = supers[away, 0] + rng.normal(0.0, spreads["sub_spread"], blobs.shape)
        blobs = np.where(stray[..., None], moved + blobs - centres, blobs)
    centres = blobs

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.repeat(np.arange(len(centres)), n)
        mode = rng.integers(0, modes, len(y))
        return centres[y, mode] + rng.normal(0.0, 1.0, (len(y), dim)), y

    (x_train, y_train), (x_test, y_test) = draw(per_class["train"]), draw(per_class["test"])
    data = _finish("hierarchical", cfg, x_train, y_train, x_test, y_test, len(centres))
    return replace(data, superclass=[c // n_sub for c in range(len(centres))])


def _load_mnist1d(cfg: Any) -> Data:
    """MNIST-1D generated in memory by mnist1d.data.make_dataset (which writes no files)."""
    from mnist1d.data import get_dataset_args, make_dataset

    num_samples = _int(cfg, "num_samples")
    if num_samples < 20:
        raise UserError(f"dataset.num_samples={num_samples} is too small: use at least 20")
    args = get_dataset_args()
    args.num_samples = num_samples
    args.train_split = _fraction(cfg, "train_split", allow_zero=False)
    args.seed = _int(cfg, "template_seed")
    # make_dataset seeds the global `random` and numpy generators: put them back afterwards.
    states = random.getstate(), np.random.get_state()
    try:
        d = make_dataset(args)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
    if len(d["y"]) == 0 or len(d["y_test"]) == 0:
        raise UserError(f"dataset.train_split={args.train_split} leaves a split empty: use 0.8")
    return _finish("mnist1d", cfg, d["x"], d["y"], d["x_test"], d["y_test"])


NPZ_ARRAYS = ("x_train", "y_train", "x_test", "y_test")
NPZ_FIX = "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"


def _load_npz(cfg: Any) -> Data:
    """The user's own .npz file with x_train, y_train, x_test, y_test."""
    from distillrun.io.inputs import load_npz, missing_path, resolve

    path = resolve(_get(cfg, "path"), "dataset.path")
    if path.is_dir():
        raise UserError(f"dataset.path={path} is a directory: set dataset.path to your .npz file")
    if not path.is_file():
        raise missing_path(path, "dataset.path", "set dataset.path to your .npz file")
    arrays = load_npz(path, "x_train, y_train, x_test, y_test", f"write it with {NPZ_FIX}")
    missing = [k for k in NPZ_ARRAYS if k not in arrays]
    if missing:
        raise UserError(f"{path} lacks array(s) {', '.join(missing)}: save it with {NPZ_FIX}")
    for split in ("train", "test"):
        arrays[f"x_{split}"] = _npz_inputs(path, split, arrays[f"x_{split}"], arrays[f"y_{split}"])
        _npz_labels(path, split, arrays[f"y_{split}"])
    if arrays["x_train"].shape[1:] != arrays["x_test"].shape[1:]:
        raise UserError(
            f"x_train rows are {arrays['x_train'].shape[1:]} but x_test rows are "
            f"{arrays['x_test'].shape[1:]} in {path}: both splits need the same shape"
        )
    y_train, y_test = arrays["y_train"], arrays["y_test"]
    classes = int(y_train.max()) + 1
    if classes > len(y_train):
        raise UserError(
            f"y_train in {path} has label {classes - 1} but only {len(y_train)} rows: labels "
            "are class ids 0..C-1 (renumber them with np.unique(y, return_inverse=True))"
        )
    unseen = y_test[y_test >= classes]
    if len(unseen):
        raise UserError(
            f"y_test in {path} has label {int(unseen[0])}, a class y_train never has "
            f"(its classes: 0..{classes - 1}): give the training split every class"
        )
    return _finish(
        "npz",
        cfg,
        arrays["x_train"],
        y_train,
        arrays["x_test"],
        y_test,
        classes,
        standardize=bool(_get(cfg, "standardize")),
    )


def _npz_inputs(path: Path, split: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x_<split> as float32 [N, D] or [N, C, H, W], finite, one row per label."""
    from distillrun.io.inputs import as_float32

    shapes = "shaped (N, D), (N, H, W) or (N, C, H, W)"
    if x.ndim not in (2, 3, 4) or 0 in x.shape[1:]:
        raise UserError(
            f"x_{split} in {path} has shape {x.shape}: it must be {shapes}, with values"
        )
    if len(x) != len(y) or len(x) == 0:
        raise UserError(
            f"x_{split} has {len(x)} rows but y_{split} has {len(y)} in {path}: "
            "give every example exactly one label (and at least one example)"
        )
    x = as_float32(x, f"x_{split} in {path}", f"give finite real numbers {shapes}")
    return x[:, None] if x.ndim == 3 else x


def _npz_labels(path: Path, split: str, y: np.ndarray) -> None:
    """y_<split>: a 1-D array of integer class ids >= 0 (bool or float labels are refused)."""
    if y.dtype.kind not in "iu" or y.ndim != 1:
        raise UserError(
            f"y_{split} in {path} has shape {y.shape} and dtype {y.dtype}: it must be a 1-D "
            "array of integer class ids (use y.astype(np.int64))"
        )
    if (y < 0).any():
        raise UserError(f"y_{split} in {path} holds negative labels: use class ids 0..C-1")


_LOADERS: dict[str, Callable[[Any], Data]] = {
    "digits": _load_digits,
    "mnist": _load_mnist,
    "fashion_mnist": _load_fashion_mnist,
    "cifar10": _load_cifar10,
    "cifar100": _load_cifar100,
    "hierarchical": _load_hierarchical,
    "mnist1d": _load_mnist1d,
    "npz": _load_npz,
}
