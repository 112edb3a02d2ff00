"""Augmentations and consistent teaching: every view enumerated exactly, the view cache against
the online teachers, its lock-and-rename discipline, and distill on views end to end."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ONE_THREAD,
    assert_one_line_error,
    distillrun,
    distillrun_here,
    manifest,
    metric_lines,
    runs,
    signal_when,
    start,
    without_timings,
)

from distillrun.core.models import build_model, checkpoint
from distillrun.core.train import TrainSettings, fit
from distillrun.errors import UserError
from distillrun.method import augment
from distillrun.method.augment import Batch, Mixup, Views
from distillrun.method.ensemble import combine
from distillrun.method.teacher_outputs import FOLDER, OnlineTeachers, view_cache
from distillrun.runs import artifacts

TINY_CNN = {"name": "cnn", "channels": [4], "hidden": 8, "dropout": 0.0}
OPTIM = {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "weight_decay": 0.0}
OPTIM |= {"schedule": "constant", "step_size": 1, "gamma": 1.0}


def images(n: int = 6, side: int = 6, channels: int = 1, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channels, side, side, generator=torch.Generator().manual_seed(seed))


# --- the views ---------------------------------------------------------------------------------


@pytest.mark.parametrize("border", ["replicate", "reflect", "zeros"])
def test_shift_views_are_every_translation_exactly_once(border: str) -> None:
    x = images()
    views = Views(1, False, border, fill=(-0.5,))
    mode = augment.BORDERS[border]
    if border == "zeros":
        padded = F.pad(x, (1, 1, 1, 1), value=-0.5)  # the black value is -0.5
    else:
        padded = F.pad(x, (1, 1, 1, 1), mode=mode)
    seen = []
    for v in range(views.count):
        out = views.apply(x, torch.full((len(x),), v))
        dy, dx = divmod(v, 3)
        assert torch.equal(out, padded[:, :, dy : dy + 6, dx : dx + 6]), v
        assert torch.equal(out, views.apply(x, torch.full((len(x),), v)))  # the same every time
        seen.append(out)
    assert views.count == 9 and torch.equal(seen[4], x)  # view 4 is the image itself
    assert len({tuple(s.flatten().tolist()) for s in seen}) == 9


def test_crop_flip_views_mirror_the_crops_and_pad_with_black() -> None:
    x = images(channels=3)
    black = (-1.0, -2.0, -3.0)
    views = Views(2, True, "zeros", fill=black)
    assert views.count == 5 * 5 * 2
    for v in range(25):
        crop = views.apply(x, torch.full((len(x),), v))
        mirrored = views.apply(x, torch.full((len(x),), v + 25))
        assert torch.equal(mirrored, crop.flip(-1)), v
    corner = views.apply(x, torch.zeros(len(x), dtype=torch.long))  # shifted 2 down, 2 right
    for c, value in enumerate(black):
        assert torch.all(corner[:, c, :2, :] == value) and torch.all(corner[:, c, :, :2] == value)
    # Each example takes its own view.
    mixed = views.apply(x, torch.arange(len(x)))
    for i in range(len(x)):
        assert torch.equal(mixed[i], views.apply(x[i : i + 1], torch.tensor([i]))[0])


def test_views_are_drawn_uniformly_as_teachers_jitter_drew_its_offsets() -> None:
    views = Views(2, False, "replicate")
    drawn = views.sample(2000, torch.Generator().manual_seed(7))
    offsets = torch.randint(0, 5, (2, 2000), generator=torch.Generator().manual_seed(7))
    assert torch.equal(drawn, offsets[0] * 5 + offsets[1])
    counts = torch.bincount(drawn, minlength=25)
    assert len(counts) == 25 and counts.min() > 40  # 80 expected each
    flipped = Views(1, True, "zeros").sample(2000, torch.Generator().manual_seed(0))
    assert set(flipped.tolist()) == set(range(18))


def test_a_subset_keeps_m_distinct_views_per_example_and_draws_among_them() -> None:
    views = Views(2, False, "replicate")
    sub = augment.subset(views, 50, 4, seed=3)
    assert sub.table.shape == (50, 4) and sub.count == 4
    assert all(len(set(row.tolist())) == 4 for row in sub.table)
    assert torch.equal(sub.table, augment.subset(views, 50, 4, seed=3).table)
    assert not torch.equal(sub.table, augment.subset(views, 50, 4, seed=4).table)
    x = images(50)
    idx = torch.arange(10, 30)
    batch = sub.batch(x, idx, torch.Generator().manual_seed(0))
    assert batch.view.min() >= 0 and batch.view.max() < 4  # positions in each example's row
    chosen = sub.table[idx, batch.view]
    assert torch.equal(batch.x, views.apply(x[idx], chosen))


def test_mixup_mixes_inputs_and_labels_with_one_weight_per_batch() -> None:
    x, y = images(16), torch.arange(16) % 4
    idx = torch.arange(2, 12)
    batch = Mixup(0.4).batch(x, idx, torch.Generator().manual_seed(5))
    again = Mixup(0.4).batch(x, idx, torch.Generator().manual_seed(5))
    w, partner = batch.weight, batch.partner
    assert w == again.weight and torch.equal(partner, again.partner)
    assert sorted(partner.tolist()) == idx.tolist()  # a permutation of the batch's examples
    assert (partner != idx).sum() >= len(idx) // 2  # mostly mixed with others, not themselves
    assert torch.allclose(batch.x, w * x[idx] + (1 - w) * x[partner])
    labels = batch.labels(y, 4)
    one_hot = F.one_hot(y, 4).float()
    assert torch.allclose(labels, w * one_hot[idx] + (1 - w) * one_hot[partner])
    half = batch.part(slice(5, 10))  # a data-parallel process's part keeps its partners' labels
    assert torch.equal(half.labels(y, 4), labels[5:10]) and torch.equal(half.x, batch.x[5:10])
    plain = Batch(idx, x[idx])
    assert torch.equal(plain.labels(y, 4), y[idx])


@pytest.mark.parametrize("alpha", [0.2, 2.0])
def test_mixup_weights_follow_beta_alpha_alpha(alpha: float) -> None:
    from scipy import stats

    x, idx, generator = images(4), torch.arange(4), torch.Generator().manual_seed(0)
    weights = [Mixup(alpha).batch(x, idx, generator).weight for _ in range(1000)]
    # Kolmogorov-Smirnov: a uniform draw, or one ignoring alpha, gives p-values below 1e-10.
    assert stats.kstest(weights, "beta", args=(alpha, alpha)).pvalue > 0.01


def test_image_augmentations_are_refused_on_vectors() -> None:
    with pytest.raises(UserError, match="holds vectors: use augment=none"):
        augment.from_config({"name": "shift", "pixels": 1, "border": "replicate"}, None, {})
    assert isinstance(augment.from_config({"name": "mixup", "alpha": 1.0}, None, {}), Mixup)
    standardised = {"normalize": "standardize", "mean": [0.5], "std": [0.25]}
    cfg = {"name": "crop_flip", "padding": 4, "flip": True, "border": "zeros"}
    views = augment.from_config(cfg, (1, 32, 32), standardised)
    assert views == Views(4, True, "zeros", fill=(-2.0,)) and views.count == 162


# --- the view cache against the online teachers ------------------------------------------------


@pytest.fixture
def members(tmp_path: Path) -> list[Path]:
    files = []
    for i in range(2):
        torch.manual_seed(i)
        model = build_model(TINY_CNN, (1, 6, 6), 5)
        files.append(tmp_path / f"member_{i}.pt")
        artifacts.save_tensors(files[-1], checkpoint(model, TINY_CNN, (1, 6, 6), 5))
    return files


def cache(members: list[Path], folder: Path, x: torch.Tensor, views, **options):
    settings = {"top_k": None, "max_mb": 100.0, **options}
    return view_cache(
        sources=["teachers"],
        member_files=members,
        fingerprint="data",
        cache_dir=folder,
        x=x,
        transfer=torch.arange(len(x)),
        num_classes=5,
        augmentation=views,
        batch_size=16,
        device=torch.device("cpu"),
        say=lambda line: None,
        **settings,
    )


@pytest.mark.parametrize("per_example", [None, 3])
def test_cached_and_online_teachers_give_the_same_targets_on_every_batch(
    members: list[Path], tmp_path: Path, per_example: int | None
) -> None:
    from distillrun.core.models import load_model

    x, y = images(40), torch.arange(40) % 5
    views = Views(1, False, "replicate")
    if per_example:
        views = augment.subset(views, len(x), per_example, seed=0)
    cached, info = cache(members, tmp_path, x, views)
    assert info["built_by_this_run"] is True and info["views"] == views.count
    online = OnlineTeachers([load_model(f) for f in members])
    gaps = []

    def loss_fn(out: torch.Tensor, b: Batch) -> torch.Tensor:
        a = combine(cached.member_logits(b), "arithmetic", 4.0)
        o = combine(online.member_logits(b), "arithmetic", 4.0)
        gaps.append(float((a.exp() - o.exp()).abs().max()))
        return F.kl_div(F.log_softmax(out / 4, 1), a, log_target=True, reduction="batchmean")

    torch.manual_seed(0)
    settings = TrainSettings(OPTIM, epochs=3, batch_size=8, augment=views)
    fit(build_model(TINY_CNN, (1, 6, 6), 5), x, loss_fn, settings, x_val=x, y_val=y)
    assert len(gaps) == 15 and max(gaps) < 2e-3  # fp16 rounding of logits of a few units


def test_top_k_keeps_the_largest_logits_and_the_probability_of_the_rest(
    members: list[Path], tmp_path: Path
) -> None:
    x = images(20)
    views = Views(1, False, "replicate")
    full, _ = cache(members, tmp_path / "full", x, views)
    top, info = cache(members, tmp_path / "top", x, views, top_k=1)
    assert info["mb"] < cache(members, tmp_path / "full", x, views)[1]["mb"]
    batch = Batch(torch.arange(20), x, view=torch.arange(20) % 9)
    exact, approx = full.member_logits(batch), top.member_logits(batch)
    values, indices = exact.topk(1, dim=-1)
    assert torch.allclose(approx.gather(-1, indices), values, atol=1e-2)
    rest = torch.ones_like(exact, dtype=torch.bool).scatter(-1, indices, False)
    mass = lambda z: (z.softmax(-1) * rest).sum(-1)  # noqa: E731
    assert torch.allclose(mass(approx), mass(exact), atol=2e-3)
    others = approx.masked_select(rest).view(*exact.shape[:-1], 4)
    assert torch.all(others == others[..., :1])  # one shared floor


def test_a_cache_too_large_is_refused_naming_the_fixes(members: list[Path], tmp_path: Path) -> None:
    with pytest.raises(UserError) as e:
        cache(members, tmp_path, images(40), Views(2, False, "replicate"), max_mb=0.001)
    for fix in ("views_per_example", "top_k", "max_mb", "teacher_outputs=online"):
        assert fix in str(e.value)
    assert not list((tmp_path / FOLDER).glob("*.pt"))


def test_a_damaged_cache_is_rebuilt(members: list[Path], tmp_path: Path) -> None:
    x, views = images(200), Views(1, False, "replicate")
    first, info = cache(members, tmp_path, x, views)
    path = Path(info["path"])
    path.write_bytes(b"not a cache")
    again, info = cache(members, tmp_path, x, views)
    assert info["built_by_this_run"] is True  # read as missing, built again
    batch = Batch(torch.arange(5), x[:5], view=torch.arange(5))
    assert torch.equal(first.member_logits(batch), again.member_logits(batch))


# A child process builds the view cache with torch.save patched to write the first half of the
# file's bytes, wherever it writes them, and then hang: the test kills it mid-write.
HALF_WRITTEN_BUILD = """
import io, os, sys, time, torch
from pathlib import Path

real_save = torch.save

def save_half_then_hang(obj, f, *args, **kwargs):
    whole = io.BytesIO()
    real_save(obj, whole, *args, **kwargs)
    half = whole.getvalue()[: len(whole.getvalue()) // 2]
    out = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
    out.write(half)
    out.flush()
    print("wrote", len(half), flush=True)
    time.sleep(300)

torch.save = save_half_then_hang  # before distillrun is imported
from distillrun.method import teacher_outputs as teaching
from distillrun.method.augment import Views
members, folder = [Path(p) for p in sys.argv[1:-1]], Path(sys.argv[-1])
x = torch.randn(40, 1, 6, 6, generator=torch.Generator().manual_seed(0))  # images(40)
teaching.view_cache(
    sources=["teachers"], member_files=members, fingerprint="data", cache_dir=folder, x=x,
    transfer=torch.arange(40), num_classes=5, augmentation=Views(1, False, "replicate"),
    top_k=None, max_mb=100.0, batch_size=16, device=torch.device("cpu"), say=print)
"""


def test_a_cache_build_killed_mid_write_leaves_nothing_read(
    members: list[Path], tmp_path: Path
) -> None:
    x, views = images(40), Views(1, False, "replicate")
    whole, _ = cache(members, tmp_path / "whole", x, views)
    killed = tmp_path / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", HALF_WRITTEN_BUILD, *map(str, members), str(killed)],
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, **ONE_THREAD},
    )
    try:
        for line in child.stdout:
            if line.startswith("wrote"):
                break
        else:
            pytest.fail("the child ended before writing the cache")
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    written = int(line.split()[1])
    folder = killed / FOLDER
    assert [f for f in folder.iterdir() if f.stat().st_size == written]  # killed mid-write
    assert not list(folder.glob("*.pt"))  # the half-written bytes are under no cache's name
    again, info = cache(members, killed, x, views)
    assert info["built_by_this_run"] is True
    assert again.tensors.keys() == whole.tensors.keys()
    assert all(torch.equal(again.tensors[k], whole.tensors[k]) for k in whole.tensors)


# --- distill on views, end to end --------------------------------------------------------------

TEACHERS = [
    "model=cnn",
    "model.channels=[8]",
    "model.hidden=16",
    "teachers.n=2",
    "train.epochs=3",
    "progress=false",
]
STUDENT = ["train.epochs=5", "model.hidden=[32]", "progress=false"]
SHIFT = ["augment=shift", "augment.pixels=1"]


@pytest.fixture(scope="module")
def digits_teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("views")
    distillrun_here(cwd, "train-teachers", *TEACHERS, env=ONE_THREAD)
    (folder,) = runs(cwd, "train-teachers")
    return folder


def distill(cwd: Path, teachers: Path, *args: str, check: int | None = 0, views=SHIFT):
    common = [f"teachers={teachers}", *STUDENT, *views]
    return distillrun_here(cwd, "distill", *common, *args, env=ONE_THREAD, check=check)


@pytest.mark.slow
def test_cached_and_online_students_agree_on_digits(digits_teachers: Path, tmp_path: Path) -> None:
    cached = distill(tmp_path, digits_teachers, "hydra.run.dir=cached")
    assert "caching 9 views x 1,212 examples x 2 teachers = 21,816 teacher passes" in cached.stdout
    online = distill(tmp_path, digits_teachers, "teacher_outputs=online", "hydra.run.dir=online")
    assert "teachers run on every batch (2 members, online)" in online.stdout
    a, b = manifest(tmp_path / "cached"), manifest(tmp_path / "online")
    assert a["teacher_outputs"]["mode"] == "cached" and b["teacher_outputs"]["mode"] == "online"
    assert a["teacher_outputs"]["view_cache"]["built_by_this_run"] is True
    assert abs(a["metrics"]["test_errors"] - b["metrics"]["test_errors"]) <= 1
    # The hard-label baselines see the same views and need no teachers: identical.
    assert a["metrics"]["baseline_test_errors"] == b["metrics"]["baseline_test_errors"]
    again = distill(tmp_path, digits_teachers, "T=2", "hydra.run.dir=again")
    assert "view cache:" in again.stdout and "caching" not in again.stdout
    assert (
        manifest(tmp_path / "again")["teacher_outputs"]["view_cache"]["built_by_this_run"] is False
    )


@pytest.mark.slow
def test_a_killed_cached_view_run_resumes_bit_identically(
    digits_teachers: Path, tmp_path: Path
) -> None:
    common = [f"teachers={digits_teachers}", *STUDENT, *SHIFT, "baseline=false"]
    common += ["train.checkpoint_every=0", "teacher_outputs.views_per_example=4"]
    distillrun_here(tmp_path, "distill", *common, "hydra.run.dir=whole", env=ONE_THREAD)
    proc = start(tmp_path, "distill", *common, "hydra.run.dir=killed")
    signal_when(proc, "killed/resume/student.pt", tmp_path, signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    assert manifest(tmp_path / "killed")["status"] == "running"
    distillrun(tmp_path, "distill", f"resume={tmp_path / 'killed'}", env=ONE_THREAD)
    whole, killed = manifest(tmp_path / "whole"), manifest(tmp_path / "killed")
    assert without_timings(killed["metrics"]) == without_timings(whole["metrics"])
    assert metric_lines(tmp_path / "killed") == metric_lines(tmp_path / "whole")
    assert (tmp_path / "killed/student.pt").read_bytes() == (
        tmp_path / "whole/student.pt"
    ).read_bytes()


@pytest.mark.slow
def test_parallel_jobs_build_the_view_cache_once(digits_teachers: Path, tmp_path: Path) -> None:
    # Reflected borders: views no other test of this module has cached.
    args = ["-m", "T=1,4", f"teachers={digits_teachers}", *STUDENT, *SHIFT, "train.epochs=1"]
    args += ["augment.border=reflect"]
    args += ["hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "hydra.sweep.dir=sweep"]
    result = distillrun(tmp_path, "distill", *args, env=ONE_THREAD)
    assert "2 of 2 jobs complete" in result.stdout
    jobs = artifacts.sweep_jobs(tmp_path / "sweep")
    built = [manifest(j)["teacher_outputs"]["view_cache"] for j in jobs]
    assert sorted(b["built_by_this_run"] for b in built) == [False, True]
    assert len({b["path"] for b in built}) == 1
    assert Path(built[0]["path"]).parent == digits_teachers.resolve() / FOLDER


@pytest.mark.slow
def test_mixup_trains_with_online_teachers_and_bad_combinations_are_one_line(
    digits_teachers: Path, tmp_path: Path
) -> None:
    mixed = distill(tmp_path, digits_teachers, "augment=mixup", "hydra.run.dir=mixup", views=[])
    assert "teachers run on every batch" in mixed.stdout
    m = manifest(tmp_path / "mixup")
    assert m["teacher_outputs"] == {"mode": "online", "augment": "mixup (alpha 1)"}
    assert math.isfinite(m["metrics"]["test_nll"])
    refused = distill(  # shifts of 2 px: not cached yet, so it would be built
        tmp_path, digits_teachers, "augment.pixels=2", "teacher_outputs.max_mb=0.01", check=None
    )
    assert_one_line_error(refused, "teacher_outputs.max_mb=0.01", "views_per_example", "online")
    before = set(tmp_path.rglob("*"))
    cached_mixup = distill(
        tmp_path, digits_teachers, "augment=mixup", "teacher_outputs=cached", check=None, views=[]
    )
    assert_one_line_error(cached_mixup, "augment=mixup", "teacher_outputs=online")
    vectors = distillrun_here(
        tmp_path, "distill", "dataset=hierarchical", "augment=shift", check=None
    )
    assert_one_line_error(vectors, "dataset=hierarchical holds vectors", "augment=none")
    assert set(tmp_path.rglob("*")) == before  # refused before anything was written
