"""Tests for distillrun.core.data: every loader runs for real on small files the tests write."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import IDX_NAMES, idx_bytes, write_cifar100, write_idx
from omegaconf import OmegaConf
from torchvision.datasets import CIFAR10, CIFAR100, MNIST

from distillrun.core.data import Data, load_dataset
from distillrun.errors import UserError


def one_line_error(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    message = str(excinfo.value)
    assert message and "\n" not in message
    return message


def standardized(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    """What the loader should produce: `x` standardised with `train`'s per-channel/feature stats."""
    dims = (0, 2, 3) if train.ndim == 4 else (0,)
    mean = train.mean(axis=dims, keepdims=True, dtype=np.float64)
    std = train.std(axis=dims, keepdims=True, dtype=np.float64)
    return (x - mean) / std


# --- digits --------------------------------------------------------------------------------------


def digits_cfg(**over: object) -> object:
    return OmegaConf.create(
        {"name": "digits", "test_fraction": 0.25, "val_fraction": 0.1, "split_seed": 0, **over}
    )


def test_digits_shapes_dtypes_and_split_sizes() -> None:
    d = load_dataset(digits_cfg())
    assert isinstance(d, Data) and d.name == "digits"
    assert d.num_classes == 10
    assert d.image_shape == (1, 8, 8) and d.input_shape == (1, 8, 8)
    assert len(d.x_test) == 450  # ceil(0.25 * 1797)
    assert len(d.x_val) == 135  # ceil(0.1 * 1347)
    assert len(d.x_train) + len(d.x_val) + len(d.x_test) == 1797
    for x, y in ((d.x_train, d.y_train), (d.x_val, d.y_val), (d.x_test, d.y_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape[1:] == (1, 8, 8) and len(x) == len(y)
        assert x.device.type == "cpu"
    # stratified: every class present in each split, in close to the overall proportion
    for y, n in ((d.y_val, 135), (d.y_test, 450)):
        counts = torch.bincount(y, minlength=10)
        assert (counts > 0).all() and (counts - n / 10).abs().max() <= 3
    # train split standardised (one channel), val/test with the same statistics
    assert d.x_train.mean().abs() < 1e-4
    assert (d.x_train.std(correction=0) - 1).abs() < 1e-4
    assert d.x_test.mean().abs() < 0.1


def test_digits_is_deterministic_and_fingerprint_tracks_the_split() -> None:
    a, b = load_dataset(digits_cfg()), load_dataset(digits_cfg())
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 64
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_val, b.y_val)
    c = load_dataset(digits_cfg(split_seed=1))
    assert c.fingerprint != a.fingerprint
    assert not torch.equal(c.y_test, a.y_test)
    e = load_dataset(digits_cfg(val_fraction=0.2))
    assert e.fingerprint != a.fingerprint


def test_digits_without_validation_split() -> None:
    d = load_dataset(digits_cfg(val_fraction=0))
    assert d.x_val.shape == (0, 1, 8, 8) and d.y_val.shape == (0,)
    assert d.x_val.dtype == torch.float32 and d.y_val.dtype == torch.int64
    assert len(d.x_train) == 1797 - 450


def test_to_returns_a_new_data_with_moved_tensors() -> None:
    d = load_dataset(digits_cfg())
    moved = d.to(torch.device("cpu"))
    assert moved is not d and moved.fingerprint == d.fingerprint
    assert moved.x_train.device.type == "cpu" and moved.input_shape == d.input_shape


@pytest.mark.parametrize(
    ("over", "match"),
    [
        ({"name": "imagenet"}, "unknown dataset.name='imagenet'.*digits.*mnist1d.*npz"),
        ({"val_fraction": 1.5}, "dataset.val_fraction=1.5 is not a fraction"),
        ({"test_fraction": 0}, "dataset.test_fraction=0 is not a fraction"),
        ({"split_seed": None}, "dataset.split_seed is not set"),
    ],
)
def test_bad_config_is_a_user_error(over: dict, match: str) -> None:
    with pytest.raises(UserError, match=match) as excinfo:
        load_dataset(digits_cfg(**over))
    one_line_error(excinfo)


# --- MNIST / Fashion-MNIST: real IDX files ------------------------------------------------------


def fake_mnist() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "train_x": rng.integers(0, 256, size=(50, 28, 28), dtype=np.uint8),
        "train_y": np.arange(50, dtype=np.uint8) % 10,
        "test_x": rng.integers(0, 256, size=(20, 28, 28), dtype=np.uint8),
        "test_y": (np.arange(20, dtype=np.uint8) * 3) % 10,
    }


def idx_cfg(name: str, root: Path, **over: object) -> object:
    base = {"name": name, "root": str(root), "download": False, "val_fraction": 0, "split_seed": 0}
    return OmegaConf.create({**base, **over})


IDX_DATASETS = [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")]


@pytest.mark.parametrize(("name", "folder"), IDX_DATASETS)
def test_idx_files_in_place_are_read_as_torchvision_reads_them(
    tmp_path: Path, name: str, folder: str
) -> None:
    import torchvision.datasets

    write_idx(tmp_path / folder / "raw", fake_mnist())
    theirs = getattr(torchvision.datasets, folder)(str(tmp_path), train=True)
    ours = load_dataset(idx_cfg(name, tmp_path, normalize="none"))
    scaled = theirs.data.numpy()[:, None].astype(np.float32) / np.float32(255.0)
    assert torch.equal(ours.x_train, torch.from_numpy(scaled))
    assert torch.equal(ours.y_train, theirs.targets)


def test_idx_files_in_place_load_without_torchvision_datasets(tmp_path: Path) -> None:
    write_idx(tmp_path / "MNIST" / "raw", fake_mnist())
    code = (
        "import sys; from omegaconf import OmegaConf; from distillrun.core.data import "
        f"load_dataset; load_dataset(OmegaConf.create({dict(idx_cfg('mnist', tmp_path))!r})); "
        "sys.exit('torchvision.datasets' in sys.modules)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0


def check_matches_fake_mnist(d: Data, arrays: dict[str, np.ndarray]) -> None:
    assert d.num_classes == 10 and d.image_shape == (1, 28, 28)
    assert d.x_train.shape == (50, 1, 28, 28) and d.x_test.shape == (20, 1, 28, 28)
    assert d.y_train.tolist() == arrays["train_y"].tolist()
    assert d.y_test.tolist() == arrays["test_y"].tolist()
    train = arrays["train_x"][:, None] / 255.0
    test = arrays["test_x"][:, None] / 255.0
    np.testing.assert_allclose(d.x_train.numpy(), standardized(train, train), atol=1e-5)
    np.testing.assert_allclose(d.x_test.numpy(), standardized(test, train), atol=1e-5)


@pytest.mark.parametrize(("name", "folder"), IDX_DATASETS)
def test_idx_files_are_read_exactly(tmp_path: Path, name: str, folder: str) -> None:
    arrays = fake_mnist()
    write_idx(tmp_path / folder / "raw", arrays)
    d = load_dataset(idx_cfg(name, tmp_path))
    assert d.name == name
    check_matches_fake_mnist(d, arrays)


@pytest.mark.parametrize(("name", "folder"), IDX_DATASETS)
def test_idx_validation_split_is_stratified(tmp_path: Path, name: str, folder: str) -> None:
    write_idx(tmp_path / folder / "raw", fake_mnist())
    d = load_dataset(idx_cfg(name, tmp_path, val_fraction=0.2))
    assert len(d.x_train) == 40 and len(d.x_val) == 10 and len(d.x_test) == 20
    assert torch.bincount(d.y_val, minlength=10).tolist() == [1] * 10
    assert d.x_train.mean(dim=(0, 2, 3)).abs().max() < 1e-4


@pytest.mark.parametrize(("name", "folder"), IDX_DATASETS)
def test_idx_missing_root_names_it_and_the_fix(tmp_path: Path, name: str, folder: str) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(UserError, match="dataset.download=true") as excinfo:
        load_dataset(idx_cfg(name, root))
    message = one_line_error(excinfo)
    assert str(root.resolve()) in message
    assert str(root / folder / "raw" / "train-images-idx3-ubyte") in message
    assert "dataset.root=" in message and "DISTILLRUN_DATA" in message


def test_mnist_truncated_file_is_a_user_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, fake_mnist())
    image_file = raw / IDX_NAMES["train_x"]
    image_file.write_bytes(image_file.read_bytes()[:5000])
    with pytest.raises(UserError, match="unreadable or corrupt") as excinfo:
        load_dataset(idx_cfg("mnist", tmp_path))
    assert str(raw) in one_line_error(excinfo)


def test_mnist_garbage_file_is_a_user_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_idx(raw, fake_mnist())
    (raw / IDX_NAMES["test_y"]).write_bytes(b"not an idx file")
    with pytest.raises(UserError, match="corrupt") as excinfo:
        load_dataset(idx_cfg("mnist", tmp_path))
    one_line_error(excinfo)


def test_mnist_label_out_of_range_is_a_user_error(tmp_path: Path) -> None:
    arrays = fake_mnist()
    arrays["test_y"][3] = 12
    write_idx(tmp_path / "MNIST" / "raw", arrays)
    with pytest.raises(UserError, match="test label 12 is outside 0..9") as excinfo:
        load_dataset(idx_cfg("mnist", tmp_path))
    one_line_error(excinfo)


# --- MNIST download=true, without internet --------------------------------------------------------
# torchvision cannot download from file:// URLs: its _urlretrieve reads `response.length`, which
# urllib's file:// responses lack (AttributeError, checked with torchvision 0.29). So the test
# serves the gzipped files over HTTP from 127.0.0.1 instead: torchvision's whole real path runs
# (urlopen, redirect check, md5 check, gunzip), and nothing is patched but MNIST.mirrors/resources.


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture
def local_mirror(tmp_path: Path, no_proxy: None) -> Iterator[tuple[str, Path]]:
    """(base URL, folder) of an HTTP server on 127.0.0.1 serving that folder."""
    folder = tmp_path / "mirror"
    folder.mkdir()
    handler = functools.partial(QuietHandler, directory=str(folder))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", folder
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_mnist_download_runs_torchvisions_real_code(
    tmp_path: Path, local_mirror: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, folder = local_mirror
    arrays = fake_mnist()
    resources = []
    for key, name in IDX_NAMES.items():
        blob = gzip.compress(idx_bytes(arrays[key]))
        (folder / f"{name}.gz").write_bytes(blob)
        resources.append((f"{name}.gz", hashlib.md5(blob).hexdigest()))
    monkeypatch.setattr(MNIST, "mirrors", [url])
    monkeypatch.setattr(MNIST, "resources", resources)

    root = tmp_path / "data"
    d = load_dataset(idx_cfg("mnist", root, download=True))
    check_matches_fake_mnist(d, arrays)
    for name in IDX_NAMES.values():
        assert (root / "MNIST" / "raw" / name).is_file()


def test_mnist_failed_download_is_a_user_error(
    tmp_path: Path, no_proxy: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as s:  # a port nobody listens on: connection refused, like no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{port}/"])
    with pytest.raises(UserError, match="could not download MNIST") as excinfo:
        load_dataset(idx_cfg("mnist", tmp_path / "data", download=True))
    one_line_error(excinfo)


def test_fashion_mnist_is_not_mnist(tmp_path: Path) -> None:
    write_idx(tmp_path / "MNIST" / "raw", fake_mnist())
    with pytest.raises(UserError, match="FashionMNIST not found"):
        load_dataset(idx_cfg("fashion_mnist", tmp_path))


# --- CIFAR-10: real pickled batches, md5-checked by torchvision ----------------------------------


def write_cifar(root: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, ...]:
    """Five 4-image training batches and a 5-image test batch; md5 lists patched to match."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)

    def dump(name: str, obj: dict) -> list[str]:
        blob = pickle.dumps(obj)
        (folder / name).write_bytes(blob)
        return [name, hashlib.md5(blob).hexdigest()]

    train_x = rng.integers(0, 256, size=(20, 3072), dtype=np.uint8)
    train_y = np.arange(20) % 10
    train_list = [
        dump(
            f"data_batch_{i + 1}",
            {"data": train_x[4 * i : 4 * i + 4], "labels": train_y[4 * i : 4 * i + 4].tolist()},
        )
        for i in range(5)
    ]
    test_x = rng.integers(0, 256, size=(5, 3072), dtype=np.uint8)
    test_y = np.array([9, 7, 5, 3, 1])
    test_list = [dump("test_batch", {"data": test_x, "labels": test_y.tolist()})]
    meta_name, meta_md5 = dump("batches.meta", {"label_names": [f"c{i}" for i in range(10)]})
    monkeypatch.setattr(CIFAR10, "train_list", train_list)
    monkeypatch.setattr(CIFAR10, "test_list", test_list)
    monkeypatch.setattr(
        CIFAR10, "meta", {"filename": meta_name, "key": "label_names", "md5": meta_md5}
    )
    return train_x, train_y, test_x, test_y


def test_cifar100_reads_fine_labels_and_coarse_superclasses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real CIFAR-100 python files (100 training, 10 test images), md5 lists patched."""
    rng = np.random.default_rng(2)
    fine = np.arange(100)
    coarse = fine // 5  # superclass of each fine class
    train_x = rng.integers(0, 256, size=(100, 3072), dtype=np.uint8)
    test_y = np.arange(10) * 7
    test_x = rng.integers(0, 256, size=(10, 3072), dtype=np.uint8)
    for key, value in write_cifar100(tmp_path, train_x, fine, test_x, test_y).items():
        monkeypatch.setattr(CIFAR100, key, value)
    folder = tmp_path / CIFAR100.base_folder
    d = load_dataset(cifar_cfg(tmp_path, name="cifar100"))
    assert d.name == "cifar100" and d.num_classes == 100 and d.image_shape == (3, 32, 32)
    assert d.superclass == coarse.tolist()
    assert d.y_train.tolist() == fine.tolist() and d.y_test.tolist() == test_y.tolist()
    train = train_x.reshape(-1, 3, 32, 32) / 255.0  # channel-first, standardised like CIFAR-10
    np.testing.assert_allclose(d.x_train.numpy(), standardized(train, train), atol=1e-5)

    (folder / "train").write_bytes(b"not a pickle")
    with pytest.raises(UserError):
        load_dataset(cifar_cfg(tmp_path, name="cifar100"))


def cifar_cfg(root: Path, **over: object) -> object:
    base = {"name": "cifar10", "root": str(root), "download": False}
    return OmegaConf.create({**base, "val_fraction": 0, "split_seed": 0, **over})


def test_cifar10_batches_are_read_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    train_x, train_y, test_x, test_y = write_cifar(tmp_path, monkeypatch)
    d = load_dataset(cifar_cfg(tmp_path))
    assert d.name == "cifar10" and d.num_classes == 10 and d.image_shape == (3, 32, 32)
    assert d.x_train.shape == (20, 3, 32, 32) and d.x_test.shape == (5, 3, 32, 32)
    assert d.y_train.tolist() == train_y.tolist() and d.y_test.tolist() == test_y.tolist()
    # CIFAR rows are 1024 red, 1024 green, 1024 blue values: exactly (3, 32, 32) per image
    train = train_x.reshape(-1, 3, 32, 32) / 255.0
    test = test_x.reshape(-1, 3, 32, 32) / 255.0
    np.testing.assert_allclose(d.x_train.numpy(), standardized(train, train), atol=1e-5)
    np.testing.assert_allclose(d.x_test.numpy(), standardized(test, train), atol=1e-5)


def test_cifar10_with_validation_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path, monkeypatch)
    d = load_dataset(cifar_cfg(tmp_path, val_fraction=0.5))
    assert len(d.y_train) == 10 and len(d.y_val) == 10
    assert sorted(d.y_val.tolist()) == list(range(10))  # stratified: one of each class
    std, mean = torch.std_mean(d.x_train, dim=(0, 2, 3), correction=0)
    assert mean.abs().max() < 1e-4 and (std - 1).abs().max() < 1e-4


def test_cifar10_corrupt_and_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_cifar(tmp_path, monkeypatch)
    batch = tmp_path / "cifar-10-batches-py" / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[:-10])  # md5 no longer matches
    with pytest.raises(UserError, match="unreadable or corrupt") as excinfo:
        load_dataset(cifar_cfg(tmp_path))
    one_line_error(excinfo)
    batch.unlink()
    with pytest.raises(UserError, match="not found.*data_batch_3.*dataset.download=true"):
        load_dataset(cifar_cfg(tmp_path))


# --- MNIST-1D -------------------------------------------------------------------------------------


def test_mnist1d_generates_in_memory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    cfg = {"name": "mnist1d", "num_samples": 500, "train_split": 0.8, "template_seed": 42}
    d = load_dataset(OmegaConf.create({**cfg, "val_fraction": 0.1, "split_seed": 0}))
    assert list(tmp_path.iterdir()) == []  # no cache file in the working directory
    assert np.array_equal(np.random.get_state()[1], before)  # global RNG left alone
    assert d.image_shape is None and d.input_shape == (40,) and d.num_classes == 10
    assert d.x_train.shape == (360, 40) and d.x_val.shape == (40, 40)
    assert d.x_test.shape == (100, 40) and d.x_train.dtype == torch.float32
    assert d.x_train.mean(0).abs().max() < 1e-4
    assert (d.x_train.std(0, correction=0) - 1).abs().max() < 1e-4
    assert set(d.y_train.tolist()) == set(range(10))


# --- npz ------------------------------------------------------------------------------------------


def npz_cfg(path: object, **over: object) -> object:
    base = {"name": "npz", "path": path, "standardize": True, "val_fraction": 0}
    return OmegaConf.create({**base, "split_seed": 0, **over})


def flat_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    return {
        "x_train": rng.normal(3.0, 2.0, size=(30, 5)),
        "y_train": np.arange(30) % 3,
        "x_test": rng.normal(3.0, 2.0, size=(10, 5)),
        "y_test": np.arange(10) % 3,
    }


def test_npz_flat(tmp_path: Path) -> None:
    arrays = flat_arrays()
    np.savez(tmp_path / "d.npz", **arrays)
    d = load_dataset(npz_cfg(str(tmp_path / "d.npz")))
    assert d.name == "npz" and d.num_classes == 3 and d.image_shape is None
    assert d.x_train.shape == (30, 5) and d.x_train.dtype == torch.float32
    assert d.y_test.tolist() == arrays["y_test"].tolist()
    x_train = arrays["x_train"]
    np.testing.assert_allclose(d.x_train.numpy(), standardized(x_train, x_train), atol=1e-5)
    np.testing.assert_allclose(d.x_test.numpy(), standardized(arrays["x_test"], x_train), atol=1e-5)

    raw = load_dataset(npz_cfg(str(tmp_path / "d.npz"), standardize=False, val_fraction=0.2))
    assert len(raw.x_train) == 24 and len(raw.x_val) == 6
    np.testing.assert_allclose(raw.x_test.numpy(), arrays["x_test"].astype(np.float32))
    assert raw.fingerprint != d.fingerprint


def test_npz_images(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    hw = {"x_train": rng.random((12, 6, 7)), "y_train": np.arange(12) % 4}
    hw |= {"x_test": rng.random((4, 6, 7)), "y_test": np.arange(4)}
    np.savez(tmp_path / "hw.npz", **hw)
    d = load_dataset(npz_cfg(str(tmp_path / "hw.npz")))
    assert d.x_train.shape == (12, 1, 6, 7) and d.image_shape == (1, 6, 7)
    assert d.num_classes == 4

    chw = {"x_train": rng.random((12, 2, 6, 7)) * [[[5.0]], [[0.1]]], "y_train": hw["y_train"]}
    chw |= {"x_test": rng.random((4, 2, 6, 7)), "y_test": np.arange(4)}
    np.savez(tmp_path / "chw.npz", **chw)
    d = load_dataset(npz_cfg(str(tmp_path / "chw.npz")))
    assert d.x_test.shape == (4, 2, 6, 7) and d.image_shape == (2, 6, 7)
    std, mean = torch.std_mean(d.x_train, dim=(0, 2, 3), correction=0)
    assert mean.abs().max() < 1e-5 and (std - 1).abs().max() < 1e-5


def test_npz_falls_back_to_unstratified_split(tmp_path: Path) -> None:
    arrays = flat_arrays()
    arrays["y_train"][0] = 7  # class 7 has a single example: stratification is impossible
    np.savez(tmp_path / "d.npz", **arrays)
    d = load_dataset(npz_cfg(str(tmp_path / "d.npz"), val_fraction=0.2))
    assert len(d.y_train) == 24 and len(d.y_val) == 6 and d.num_classes == 8


def bad_npz(tmp_path: Path, case: str) -> object:
    """The config for one broken-input case; writes whatever file it needs."""
    path = tmp_path / "bad.npz"
    arrays = flat_arrays()
    if case == "unset":
        return npz_cfg("???")
    if case == "nonexistent":
        return npz_cfg(str(tmp_path / "nope.npz"))
    if case == "not_npz":
        path.write_text("x_train,y_train\n1,2\n")
    elif case == "npy":
        np.save(tmp_path / "bad.npy", arrays["x_train"])
        path = tmp_path / "bad.npy"
    elif case == "truncated":
        np.savez(path, **arrays)
        path.write_bytes(path.read_bytes()[:300])
    elif case == "object":
        np.savez(path, **(arrays | {"y_train": np.array([[1], "a"], dtype=object)}))
    elif case == "npy_named_npz":
        with open(path, "wb") as f:
            np.save(f, arrays["x_train"])
    elif case == "empty_file":
        path.write_bytes(b"")
    elif case == "corrupt_member":  # a compressed member whose bytes were damaged
        np.savez_compressed(path, **arrays)
        data = bytearray(path.read_bytes())
        data[200:260] = bytes(60)
        path.write_bytes(bytes(data))
    elif case == "directory":
        path.mkdir()
    elif case == "link_loop":
        path.symlink_to(path)
    else:
        changes = {
            "missing": {"y_test": None},
            "lengths": {"y_train": arrays["y_train"][:-1]},
            "float_labels": {"y_train": arrays["y_train"].astype(float)},
            "negative": {"y_test": arrays["y_test"] - 1},
            "shapes": {"x_test": arrays["x_test"][:, :4]},
            "nan": {"x_train": np.where(arrays["x_train"] > 5, np.nan, arrays["x_train"])},
            "1d_x": {"x_train": arrays["x_train"][:, 0]},
            "zero_rows": {"x_train": arrays["x_train"][:0], "y_train": arrays["y_train"][:0]},
            "zero_width": {"x_train": arrays["x_train"][:, :0]},
            "huge": {"x_test": np.where(arrays["x_test"] > 5, 1e300, arrays["x_test"])},
            "inf": {"x_train": np.where(arrays["x_train"] > 5, -np.inf, arrays["x_train"])},
            "complex": {"x_train": arrays["x_train"] + 1j},
            "strings": {"x_test": arrays["x_test"].astype(str)},
            "bool_labels": {"y_train": arrays["y_train"] > 0},
            "2d_labels": {"y_test": arrays["y_test"][:, None]},
            "sparse_labels": {"y_train": arrays["y_train"] * 1000},
            "unseen_label": {"y_test": np.where(arrays["y_test"] == 2, 3, arrays["y_test"])},
        }[case]
        arrays |= changes
        np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return npz_cfg(str(path))


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("unset", r"dataset\.path is not set: add dataset\.path="),
        ("nonexistent", "nope.npz does not exist"),
        ("not_npz", "not a readable .npz .*not a zip archive"),
        ("npy", "not a readable .npz .*single array"),
        ("truncated", "not a readable .npz "),
        ("object", "not a readable .npz .*unpickled"),
        ("missing", "lacks array.*y_test"),
        ("lengths", "x_train has 30 rows but y_train has 29"),
        ("float_labels", "y_train .*dtype float64.*integer class ids"),
        ("negative", "y_test .*negative labels"),
        ("shapes", "both splits need the same shape"),
        ("nan", "NaN"),
        ("1d_x", r"x_train .*shape \(30,\).*\(N, D\)"),
        ("npy_named_npz", r"single array saved with np.save.*np.savez\(path, x_train="),
        ("empty_file", r"not a readable .npz .*\(it is empty\)"),
        ("corrupt_member", "not a readable .npz "),
        ("directory", "is a directory: set dataset.path"),
        ("link_loop", r"cannot be resolved \(Symlink loop.*point it at a real path"),
        ("zero_rows", "x_train has 0 rows .*at least one example"),
        ("zero_width", r"x_train .*shape \(30, 0\).*with values"),
        ("huge", r"x_test .*1e\+300, beyond float32's range .* in row \d+: give finite"),
        ("inf", r"x_train .*an infinite value in row"),
        ("complex", "x_train .*complex numbers, not real numbers"),
        ("strings", "x_test .*<U32 values, not real numbers"),
        ("bool_labels", "y_train .*dtype bool.*integer class ids"),
        ("2d_labels", r"y_test .*shape \(10, 1\).*1-D"),
        ("sparse_labels", "label 2000 but only 30 rows.*np.unique"),
        ("unseen_label", "y_test .*label 3, a class y_train never has.*0..2"),
    ],
)
def test_npz_bad_inputs_are_user_errors(tmp_path: Path, case: str, match: str) -> None:
    cfg = bad_npz(tmp_path, case)
    with pytest.raises(UserError, match=match) as excinfo:
        load_dataset(cfg)
    one_line_error(excinfo)


# --- the real MNIST beside the repository (../shared/data/mnist), where this machine has it -----

SHARED_MNIST = Path(__file__).resolve().parents[2] / "shared" / "data" / "mnist"


@pytest.mark.skipif(not (SHARED_MNIST / "MNIST" / "raw").is_dir(), reason="no ../shared MNIST")
def test_real_mnist_from_the_shared_folder() -> None:
    cfg = OmegaConf.create(
        {
            "name": "mnist",
            "root": str(SHARED_MNIST),
            "download": False,
            "val_fraction": 0.1,
            "split_seed": 0,
        }
    )
    data = load_dataset(cfg)
    assert (len(data.y_train), len(data.y_val), len(data.y_test)) == (54000, 6000, 10000)
    assert data.x_train.shape[1:] == (1, 28, 28) and data.num_classes == 10
    assert torch.bincount(data.y_test).tolist()[:2] == [980, 1135]  # MNIST's known test counts
    # What every run, cache and manifest of MNIST records since the loader was written: a
    # faster loader must give the same bytes.
    assert data.fingerprint.startswith("8cd61da82eccbbe5")
