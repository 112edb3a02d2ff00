"""The CIFAR-100 distillation benchmark path (issue #18): the CIFAR ResNets and wide ResNets,
their parameter counts against published ones, the multistep schedule, and every preset run for
one tiny epoch on synthetic CIFAR-100 files."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import (
    ONE_THREAD,
    assert_one_line_error,
    distillrun_here,
    manifest,
    runs,
    write_cifar100,
)
from omegaconf import OmegaConf

from distillrun.core.models import build_model, checkpoint, count_parameters, load_model
from distillrun.core.train import TrainSettings, fit
from distillrun.errors import UserError
from distillrun.method import teacher_outputs as teaching
from distillrun.method.augment import Batch
from distillrun.runs import artifacts

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "conf" / "model"
NAMED = [
    *(f"resnet{d}" for d in (8, 14, 20, 32, 44, 56, 110)),
    "resnet8x4",
    "resnet32x4",
    *("wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2", "wrn_28_10"),
]
# (teacher, student): CRD's and DKD's pairs, one preset each (conf/experiment/cifar100_*.yaml).
PAIRS = [
    ("resnet32x4", "resnet8x4"),
    ("wrn_40_2", "wrn_16_2"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet32"),
]


def named(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(MODELS / f"{name}.yaml"))


def params(cfg: dict, classes: int = 100) -> int:
    with torch.device("meta"):  # shapes only: no memory, no initialisation of 36M weights
        return count_parameters(build_model(cfg, (3, 32, 32), classes))


def resnet(depth: int, widths: list[int] | None = None) -> dict:
    return {"name": "cifar_resnet", "depth": depth, "widths": widths or [16, 16, 32, 64]}


def wrn(depth: int, widen: int) -> dict:
    return {"name": "wrn", "depth": depth, "widen": widen, "dropout": 0.0}


# --- parameter counts ---------------------------------------------------------------------------


def by_definition(cfg: dict, classes: int = 100) -> int:
    """The parameter count of a net as its paper defines it, layer by layer: 3x3 convolutions
    without bias, BatchNorm (weight and bias per channel), 1x1 projections where the shape
    changes (with a BN in a ResNet, without in a WRN), and the linear classifier."""
    n = (cfg["depth"] - (2 if cfg["name"] == "cifar_resnet" else 4)) // 6
    if cfg["name"] == "cifar_resnet":
        stem, stages = cfg["widths"][0], cfg["widths"][1:]
    else:
        stem, stages = 16, [16 * cfg["widen"], 32 * cfg["widen"], 64 * cfg["widen"]]
    total, c = 9 * 3 * stem + (2 * stem if cfg["name"] == "cifar_resnet" else 0), stem
    for i, width in enumerate(stages):
        for b in range(n):
            total += 9 * c * width + 9 * width * width + 2 * width  # two convolutions, one BN
            total += 2 * (width if cfg["name"] == "cifar_resnet" else c)  # the other BN
            if c != width or (b == 0 and i > 0):
                total += c * width + (2 * width if cfg["name"] == "cifar_resnet" else 0)
            c = width
    final_bn = 2 * c if cfg["name"] == "wrn" else 0
    return total + final_bn + c * classes + classes


@pytest.mark.parametrize("name", NAMED)
def test_each_named_model_has_the_parameters_of_its_definition(name: str) -> None:
    cfg = named(name)
    assert params(cfg, 100) == by_definition(cfg, 100)
    assert params(cfg, 10) == by_definition(cfg, 10)


# Exact counts printed by osmr/imgclsmob for the same architectures (He et al.'s ResNets with
# 1x1 conv + BN projection shortcuts, as in RepDistiller; Zagoruyko & Komodakis' WRNs): the
# CIFAR-10 and CIFAR-100 tables of chainer_/README.md, commit c1a844dde061 (2024-09-06).
# wrn_16_10 and wrn_40_8 are no named config; the generic builder builds them.
IMGCLSMOB = [
    # (config, CIFAR-10 count, CIFAR-100 count)
    (resnet(20), 272_474, 278_324),
    (resnet(56), 855_770, 861_620),
    (resnet(110), 1_730_714, 1_736_564),
    (wrn(16, 10), 17_116_634, 17_174_324),
    (wrn(28, 10), 36_479_194, 36_536_884),
    (wrn(40, 8), 35_748_314, 35_794_484),
]


@pytest.mark.parametrize(("cfg", "cifar10", "cifar100"), IMGCLSMOB)
def test_parameter_counts_match_the_counts_imgclsmob_prints(
    cfg: dict, cifar10: int, cifar100: int
) -> None:
    assert params(cfg, 10) == cifar10
    assert params(cfg, 100) == cifar100


def test_parameter_counts_round_to_the_papers_figures() -> None:
    """The papers count their CIFAR-10 nets (10 classes), to the precision they print.

    He et al. 2016, Table 6: 0.27M, 0.46M, 0.66M, 0.85M, 1.7M, 19.4M for ResNet-20 ... 1202.
    Their CIFAR nets pad the identity with zeros where the shape changes (option A); ours, like
    RepDistiller's (whose models CRD's and DKD's accuracy tables used), project it with a 1x1
    convolution and BN (option B): two such shortcuts, 16*32 + 2*32 + 32*64 + 2*64 = 2,752
    parameters more at widths [16, 16, 32, 64], enough to round ResNet-32 and ResNet-56 up
    (0.47M, 0.86M). So the paper's figures are checked without them.

    Zagoruyko & Komodakis 2016, Table 4 (one count per net for CIFAR-10 and CIFAR-100; it is the
    10-class one: WRN-40-2 has 2,243,546 parameters with 10 classes, 2.2M, and 2,255,156 with 100).
    """
    projections = 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64
    assert projections == 2_752
    he = {20: 0.27, 32: 0.46, 44: 0.66, 56: 0.85}
    for depth, millions in he.items():
        assert round((params(resnet(depth), 10) - projections) / 1e6, 2) == millions
    for depth, millions in ((110, 1.7), (1202, 19.4)):
        assert round((params(resnet(depth), 10) - projections) / 1e6, 1) == millions
    wrns = {(40, 1): 0.6, (40, 2): 2.2, (40, 4): 8.9, (40, 8): 35.7, (28, 10): 36.5}
    wrns |= {(28, 12): 52.5, (22, 8): 17.2, (22, 10): 26.8, (16, 8): 11.0, (16, 10): 17.1}
    for (depth, widen), millions in wrns.items():
        assert round(params(wrn(depth, widen), 10) / 1e6, 1) == millions


def test_the_benchmark_pairs_have_these_parameters_for_cifar100() -> None:
    """What the README's table says (computed here; see the tests above for the sources)."""
    counts = {name: params(named(name)) for pair in PAIRS for name in pair}
    assert counts == {
        "resnet32x4": 7_433_860,
        "resnet8x4": 1_233_540,
        "wrn_40_2": 2_255_156,
        "wrn_16_2": 703_284,
        "resnet56": 861_620,
        "resnet20": 278_324,
        "resnet110": 1_736_564,
        "resnet32": 472_756,
    }


# --- the models ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", NAMED)
def test_each_named_model_maps_a_cifar_batch_to_100_logits(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(OmegaConf.create(named(name)), (3, 32, 32), 100)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 100) and torch.isfinite(out).all()
    out.sum().backward()  # every parameter takes part
    assert all(p.grad is not None for p in model.parameters())


def test_initialisation_is_kaiming_normal_and_unit_batchnorm() -> None:
    torch.manual_seed(0)
    model = build_model(named("resnet32x4"), (3, 32, 32), 100)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    for conv in convs:  # fan_out = out_channels * k * k, std = sqrt(2 / fan_out)
        k = conv.kernel_size[0]
        expected = (2 / (conv.out_channels * k * k)) ** 0.5
        assert abs(conv.weight.std().item() / expected - 1) < 0.2, conv
    assert all((bn.weight == 1).all() and (bn.bias == 0).all() for bn in bns)


@pytest.mark.parametrize("name", ["resnet8", "wrn_16_1"])
def test_models_round_trip_through_a_checkpoint_and_take_other_image_shapes(
    tmp_path: Path, name: str
) -> None:
    cfg = named(name)
    if cfg["name"] == "wrn":
        cfg["dropout"] = 0.3  # in eval mode: off
    model = build_model(cfg, (1, 28, 28), 10).eval()  # MNIST-shaped: global average pooling
    x = torch.randn(3, 1, 28, 28)
    artifacts.save_tensors(tmp_path / "m.pt", checkpoint(model, cfg, (1, 28, 28), 10))
    torch.testing.assert_close(load_model(tmp_path / "m.pt")(x), model(x))


def test_a_wrong_depth_or_width_is_refused_by_the_builder() -> None:
    with pytest.raises(UserError, match=r"model.depth=21 .*6n\+2.*8, 20, 32, 56 or 110"):
        build_model(resnet(21), (3, 32, 32), 100)
    with pytest.raises(UserError, match=r"model.depth=12 .*6n\+4"):
        build_model(wrn(12, 2), (3, 32, 32), 100)
    with pytest.raises(UserError, match="4 widths"):
        build_model(resnet(20, [16, 32, 64]), (3, 32, 32), 100)
    with pytest.raises(UserError, match="needs images"):
        build_model(resnet(20), (40,), 10)


@pytest.mark.parametrize(
    ("stage", "args", "fragments"),
    [
        ("train-teachers", ["model=resnet20", "model.depth=21"], ["model.depth=21", "6n+2"]),
        ("distill", ["model=wrn_16_2", "model.depth=18"], ["model.depth=18", "6n+4"]),
        ("distill", ["model=resnet8x4", "model.widths=[32,64]"], ["model.widths=[32, 64]"]),
        ("distill", ["optim=sgd", "optim.milestones=[150,150]"], ["optim.milestones"]),
    ],
)
def test_bad_model_and_schedule_values_are_one_line_exit_2_before_anything_is_written(
    tmp_path: Path, stage: str, args: list[str], fragments: list[str]
) -> None:
    result = distillrun_here(tmp_path, stage, *args, check=None)
    assert_one_line_error(result, *fragments)
    assert not (tmp_path / "outputs").exists()


# --- the multistep schedule ---------------------------------------------------------------------


def test_multistep_divides_the_lr_by_10_after_epochs_150_180_and_210() -> None:
    """The benchmark's schedule, through the training loop: 240 epochs of a tiny model."""
    optim = OmegaConf.load(ROOT / "conf" / "optim" / "sgd.yaml")
    optim.schedule = "multistep"
    torch.manual_seed(0)
    x, y = torch.randn(8, 4), torch.arange(8) % 2
    model = build_model({"name": "mlp", "hidden": [4]}, (4,), 2)
    settings = TrainSettings(optim, epochs=240, batch_size=8)

    def loss(out: torch.Tensor, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(out, y[batch.idx])

    result = fit(model, x, loss, settings, x_val=x[:2], y_val=y[:2])
    lr = {r["epoch"]: r["lr"] for r in result.history}  # the lr each epoch trained with
    expected = {1: 0.05, 150: 0.05, 151: 5e-3, 180: 5e-3, 181: 5e-4, 210: 5e-4, 211: 5e-5}
    expected[240] = 5e-5
    assert {e: lr[e] for e in expected} == pytest.approx(expected, rel=1e-9)
    assert len(set(lr.values())) == 4


# --- the presets --------------------------------------------------------------------------------


def compose(stage: str, preset: str) -> object:
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    from distillrun.config import validate
    from distillrun.stages import config_name

    with initialize_config_module(config_module="distillrun.conf", version_base="1.3"):
        cfg = hydra_compose(config_name=config_name(stage), overrides=[f"experiment={preset}"])
    validate(stage, cfg)
    return cfg


@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_the_presets_set_the_benchmark_recipe(teacher: str, student: str) -> None:
    t = compose("train-teachers", f"cifar100_{teacher}")
    s = compose("distill", f"cifar100_{teacher}_{student}")
    assert (
        t.experiment.companion == s.experiment.name and s.experiment.companion == t.experiment.name
    )
    assert t.teachers.n == 1
    assert OmegaConf.to_container(t.model) == named(teacher)
    assert OmegaConf.to_container(s.model) == named(student)
    for cfg in (t, s):
        assert cfg.dataset.name == "cifar100" and cfg.dataset.val_fraction == 0.1
        assert (cfg.augment.name, cfg.augment.padding, cfg.augment.flip) == ("crop_flip", 4, True)
        o = cfg.optim
        assert (o.name, o.lr, o.momentum, o.weight_decay) == ("sgd", 0.05, 0.9, 5e-4)
        assert (o.schedule, list(o.milestones), o.gamma) == ("multistep", [150, 180, 210], 0.1)
        assert (cfg.train.epochs, cfg.train.batch_size) == (240, 64)
    assert (s.T, s.alpha, s.baseline, s.teacher_outputs.mode) == (4.0, 0.9, True, "auto")
    # Every view of every transfer image fits the cache as the preset's comment says.
    size = teaching.cache_size(1, 45_000, 162, 100, None) / 1e6
    assert size == 1458.0 <= s.teacher_outputs.max_mb
    assert s.teacher_outputs.views_per_example is None and s.teacher_outputs.top_k is None
    assert round(teaching.cache_size(1, 45_000, 162, 100, 10) / 1e6) == 306


# The published settings of the later losses on each pair (conf/experiment/cifar100_*_<loss>.yaml):
# DKD's beta_n by teacher (mdistiller's configs/cifar100/dkd/*.yaml); every loss at the SGD step
# of its paper: `scale` is our loss over the published one (CE + DKD, CE + DIST: alpha=0.5 gives
# half; 0.1 CE + 9 KD: alpha=9/9.1 gives 1/9.1), so lr * scale and weight_decay / scale must be
# the published 0.05 and 5e-4.
DKD_BETA_N = {"resnet32x4": 8.0, "wrn_40_2": 6.0, "resnet56": 2.0, "resnet110": 2.0}
LOSS_PRESETS = {  # suffix: (loss.name, loss.standardize, T, the published CE weight / term weight)
    "dkd": ("dkd", False, 4.0, 1.0),
    "dist": ("dist", False, 4.0, 1.0),
    "kd_ls": ("kd", True, 2.0, 0.1 / 9),
}


@pytest.mark.parametrize("suffix", LOSS_PRESETS)
@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_the_loss_presets_set_the_published_loss_on_the_pair_recipe(
    teacher: str, student: str, suffix: str
) -> None:
    pair = compose("distill", f"cifar100_{teacher}_{student}")
    s = compose("distill", f"cifar100_{teacher}_{student}_{suffix}")
    name, standardize, T, ce_per_term = LOSS_PRESETS[suffix]
    assert s.experiment.name == f"cifar100_{teacher}_{student}_{suffix}"
    assert s.experiment.companion == f"cifar100_{teacher}"
    assert (s.loss.name, s.loss.standardize, s.T) == (name, standardize, T)
    assert (1 - s.alpha) / s.alpha == pytest.approx(ce_per_term)  # the published balance
    scale = s.alpha if name != "kd" else s.alpha / 9  # ours = scale * published
    assert s.optim.lr * scale == pytest.approx(0.05) and s.optim.weight_decay / scale == (
        pytest.approx(5e-4)
    )
    if name == "dkd":
        assert (s.loss.alpha_t, s.loss.beta_n, s.loss.warmup_epochs) == (
            1.0,
            DKD_BETA_N[teacher],
            20,
        )
    if name == "dist":
        assert (s.loss.beta, s.loss.gamma) == (2.0, 2.0)
    # Everything else is the pair preset's.
    for key in ("model", "dataset", "augment", "train", "teacher_outputs", "transfer"):
        assert s[key] == pair[key], key
    assert (s.baseline, s.optim.momentum, list(s.optim.milestones)) == (True, 0.9, [150, 180, 210])


# --- every preset end to end, on synthetic CIFAR-100 files ---------------------------------------


# The command in a Python that accepts the synthetic files: torchvision checks CIFAR-100's md5
# sums, so the test's own are put on its CIFAR100 class first.
@pytest.fixture(scope="module")
def cifar100(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """40 training and 20 test images of CIFAR-100's shape: (root, md5 lists as JSON)."""
    root = tmp_path_factory.mktemp("cifar100")
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(60, 3072), dtype=np.uint8)
    files = write_cifar100(root, pixels[:40], np.arange(40) % 100, pixels[40:], np.arange(20) * 5)
    return root, json.dumps(files)


def run(cwd: Path, cifar100: tuple[Path, str], *args: str) -> subprocess.CompletedProcess:
    """The command in this process, with torchvision's CIFAR100 checking the fake files' md5."""
    from torchvision.datasets import CIFAR100

    root, files = cifar100
    with pytest.MonkeyPatch.context() as patch:
        for key, value in json.loads(files).items():
            patch.setattr(CIFAR100, key, value)
        return distillrun_here(cwd, *args, f"dataset.root={root}", env=ONE_THREAD)


@pytest.mark.slow
@pytest.mark.parametrize(("teacher", "student"), PAIRS)
def test_each_preset_pair_runs_one_tiny_epoch(
    tmp_path: Path, cifar100: tuple[Path, str], teacher: str, student: str
) -> None:
    # debug=tiny applies after the presets (their 240 epochs become one; +experiment= as users
    # type it).
    # Two cached views per image instead of 162: the whole cache of a resnet32x4 takes minutes
    # on a CPU (the views' exactness is tests/test_augment.py's business).
    # The teacher takes 9 small steps on batches of 4: its BatchNorm statistics need a few
    # batches before its outputs in eval mode are sane (a ResNet-110 after one batch has logits
    # near 1e6, beyond fp16 and the view cache), and small steps, on random pixels and labels.
    tiny = ["debug=tiny"]
    preset = f"+experiment=cifar100_{teacher}"
    steps = ["train.batch_size=4", "optim.lr=0.001"]
    run(tmp_path, cifar100, "train-teachers", preset, *tiny, "teachers.n=1", *steps)
    (teachers,) = runs(tmp_path, "train-teachers")
    m = manifest(teachers)
    assert m["status"] == "complete" and m["config"]["teachers"]["n"] == 1
    assert m["config"]["train"]["epochs"] == 1  # debug=tiny's, not the preset's 240
    assert m["metrics"]["teacher_params"] == params(named(teacher))
    assert (teachers / "member_0.pt").is_file()

    views = "teacher_outputs.views_per_example=2"
    pair = f"+experiment=cifar100_{teacher}_{student}"
    run(tmp_path, cifar100, "distill", pair, *tiny, views, f"teachers={teachers}")
    (student_run,) = runs(tmp_path, "distill")
    m = manifest(student_run)
    assert m["status"] == "complete" and m["config"]["T"] == 4.0 and m["config"]["alpha"] == 0.9
    assert m["metrics"]["student_params"] == params(named(student))
    assert m["metrics"]["teacher_params"] == params(named(teacher))
    assert {"test_accuracy", "baseline_test_accuracy"} <= set(m["metrics"])
    cache = m["teacher_outputs"]["view_cache"]
    assert m["teacher_outputs"]["mode"] == "cached" and cache["views"] == 2
    assert Path(cache["path"]).parent.parent == teachers  # beside the teachers, for reuse
    assert (student_run / "student.pt").is_file() and (student_run / "baseline.pt").is_file()
