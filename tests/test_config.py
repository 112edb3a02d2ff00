"""The shipped configs, composed with Hydra's compose API as the stages compose them."""

from __future__ import annotations

import functools
import itertools
import re

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, OmegaConf

from distillrun import choices
from distillrun.config import group_choices, validate
from distillrun.core.data import _LOADERS
from distillrun.errors import UserError
from distillrun.stages import config_name


def composed(stage: str, *overrides: str) -> DictConfig:
    with initialize_config_module(config_module="distillrun.conf", version_base="1.3"):
        return compose(config_name=config_name(stage), overrides=list(overrides))


def test_every_group_choice_is_shipped_in_the_package() -> None:
    assert {"digits", "mnist", "mnist1d", "npz", "fashion_mnist", "cifar10"} <= set(
        group_choices("dataset")
    )
    assert {"mlp", "cnn", "resnet18", "hinton_big", "hinton_small"} <= set(group_choices("model"))
    assert group_choices("optim") == ["adam", "sgd"]


def test_every_shipped_dataset_and_augmentation_names_its_code() -> None:
    """A dataset config names a loader that exists, and every augmentation the code knows has
    its config file (and no file names an unknown one): a piece forgotten is caught here."""
    for dataset in group_choices("dataset"):
        assert OmegaConf.load(f"conf/dataset/{dataset}.yaml").name in _LOADERS, dataset
    shipped = {a: OmegaConf.load(f"conf/augment/{a}.yaml").name for a in group_choices("augment")}
    assert shipped == {a: a for a in choices.AUGMENTATIONS}


@functools.cache
def composed_choice(stage: str, group: str, choice: str) -> DictConfig:
    return composed(stage, f"{group}={choice}")


def with_choices(cfg: DictConfig, stage: str, **choices: str) -> DictConfig:
    """`cfg` with each group's node as Hydra composes that choice alone."""
    cfg = cfg.copy()
    for group, choice in choices.items():
        cfg[group] = composed_choice(stage, group, choice)[group]
    return cfg


@pytest.mark.parametrize("stage", ["train-teachers", "distill"])  # the stages with every group
def test_a_model_or_optimizer_choice_sets_its_own_node_only(stage: str) -> None:
    plain = OmegaConf.to_container(composed(stage))
    for group in ("model", "optim"):
        for choice in group_choices(group):
            alone = OmegaConf.to_container(composed_choice(stage, group, choice))
            assert alone | {group: None} == plain | {group: None}, choice


@pytest.mark.parametrize("stage", ["train-teachers", "distill"])  # the stages with every group
@pytest.mark.parametrize("dataset", [d for d in group_choices("dataset") if d != "npz"])
def test_every_combination_of_shipped_choices_is_valid(stage: str, dataset: str) -> None:
    """The dataset with every model and optimiser, each choice composed once (a choice sets
    its own node only: the test above), as Hydra composes them together (checked on one)."""
    base = composed(stage, f"dataset={dataset}")
    # a preset of a generator (jft_like) names the generator it sets
    loader = OmegaConf.load(f"conf/dataset/{dataset}.yaml").name
    combos = list(itertools.product(group_choices("model"), group_choices("optim")))
    for model, optim in combos:
        cfg = with_choices(base, stage, model=model, optim=optim)
        validate(stage, cfg)
        assert cfg.dataset.name == loader and cfg.optim.name == optim
        assert cfg.paths.output_root == "outputs" and cfg.device == "auto"
    model, optim = combos[len(dataset) % len(combos)]
    hydra = composed(stage, f"dataset={dataset}", f"model={model}", f"optim={optim}")
    assembled = with_choices(base, stage, model=model, optim=optim)
    assert OmegaConf.to_container(assembled) == OmegaConf.to_container(hydra)


@pytest.mark.parametrize("dataset", [d for d in group_choices("dataset") if d != "npz"])
@pytest.mark.parametrize("optim", group_choices("optim"))
def test_specialists_takes_every_dataset_and_optimizer(dataset: str, optim: str) -> None:
    cfg = composed("specialists", f"dataset={dataset}", f"optim={optim}")
    validate("specialists", cfg)
    assert "model" not in cfg  # a specialist has its generalist's architecture


def test_specialists_and_evaluate_defaults() -> None:
    s = composed("specialists")
    assert s.dataset.name == "hierarchical" and s.dataset.n_super * s.dataset.n_sub == 100
    assert s.specialists.k == 20 and s.specialists.index is None and s.generalist is None
    assert s.specialists.soft_targets is False and s.specialists.clustering == "kmeans"
    e = composed("evaluate")
    validate("evaluate", e)
    assert e.n == 1 and e.specialists is None and e.tolerance > 0 and "dataset" not in e


@pytest.mark.parametrize(
    ("stage", "overrides", "fragments"),
    [
        ("specialists", ["specialists.k=1"], ["specialists.k=1", ">= 2"]),
        ("specialists", ["specialists.clustering=ward"], ["kmeans or online"]),
        ("specialists", ["specialists.overlap=-1"], ["specialists.overlap=-1"]),
        ("specialists", ["specialists.overlap_share=1.5"], ["overlap_share=1.5", "[0, 1]"]),
        ("specialists", ["dataset.cross_modes=-0.1"], ["cross_modes=-0.1", "probability"]),
        ("specialists", ["specialists.index=20"], ["below specialists.k=20"]),
        ("specialists", ["specialists.soft_targets=maybe"], ["soft_targets"]),
        ("specialists", ["dataset.n_sub=0", "dataset.sub_spread=-1"], ["n_sub=0", "2 problems"]),
        ("evaluate", ["n=0"], ["n=0"]),
        ("evaluate", ["tolerance=0", "max_iter=0"], ["tolerance=0", "max_iter=0", "2 problems"]),
        ("evaluate", ["optimizer=adam"], ["preconditioned or plain"]),
    ],
)
def test_specialists_and_evaluate_values_are_checked(
    stage: str, overrides: list[str], fragments: list[str]
) -> None:
    with pytest.raises(UserError) as e:
        validate(stage, composed(stage, *overrides))
    for fragment in fragments:
        assert fragment in str(e.value)


def test_paper_presets_are_the_papers_nets() -> None:
    big = composed("train-teachers", "model=hinton_big").model
    assert list(big.hidden) == [1200, 1200] and big.dropout == 0.5 and big.input_dropout == 0.2
    small = composed("distill", "model=hinton_small").model
    assert list(small.hidden) == [800, 800] and small.dropout == 0 and small.input_dropout == 0


def test_distill_defaults_follow_the_papers_alpha_convention() -> None:
    cfg = composed("distill")
    assert cfg.teachers is None and cfg.T > 0 and 0 <= cfg.alpha <= 1
    assert (
        cfg.loss.name == "kd"
        and not cfg.loss.standardize
        and cfg.ensemble == "arithmetic"
        and cfg.baseline is True
    )


def test_npz_needs_a_path() -> None:
    with pytest.raises(UserError, match="dataset.path="):
        validate("train-teachers", composed("train-teachers", "dataset=npz"))
    validate("train-teachers", composed("train-teachers", "dataset=npz", "dataset.path=x.npz"))


def test_validation_lists_every_problem_at_once() -> None:
    cfg = composed("distill", "T=0", "alpha=3", "train.batch_size=0", "optim.lr=0")
    with pytest.raises(UserError) as excinfo:
        validate("distill", cfg)
    message = str(excinfo.value)
    for part in ("T=0", "alpha=3", "train.batch_size=0", "optim.lr=0", "(4 problems)"):
        assert part in message
    assert "\n" not in message


def test_data_root_defaults_to_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DISTILLRUN_DATA", "/somewhere/data")
    assert composed("train-teachers", "dataset=mnist").dataset.root == "/somewhere/data"
    monkeypatch.delenv("DISTILLRUN_DATA")
    assert composed("train-teachers", "dataset=mnist").dataset.root == "data"


@pytest.mark.parametrize(
    ("overrides", "fragment"),
    [
        (["model.hidden=64"], "model.hidden=64 must be a list"),
        (["model=cnn", "model.channels=5"], "model.channels=5 must be a list"),
        (["model=cnn", "model.channels=[]"], "at least one convolution"),
        (["model=cnn", "model.hidden=[8]"], "model.hidden=[8] must be an integer"),
        (["optim.betas=5"], "optim.betas=5"),
        (["optim=sgd", "optim.nesterov=true", "optim.momentum=0"], "needs optim.momentum > 0"),
        (["seed=4294967296"], "seed=4294967296"),
        (["dataset.split_seed=-1"], "dataset.split_seed=-1"),
        (["optim.lr=inf"], "optim.lr=inf"),
    ],
)
def test_values_that_would_crash_later_are_refused(overrides: list[str], fragment: str) -> None:
    with pytest.raises(UserError, match=re.escape(fragment)):
        validate("train-teachers", composed("train-teachers", *overrides))


def test_infinite_temperature_is_refused() -> None:
    with pytest.raises(UserError, match="T=inf must be a finite number"):
        validate("distill", composed("distill", "T=inf"))


def test_the_paper_presets() -> None:
    teachers = composed("train-teachers", "experiment=hinton_mnist_teachers")
    assert teachers.dataset.name == "mnist" and list(teachers.model.hidden) == [1200, 1200]
    assert teachers.augment.name == "shift" and teachers.augment.pixels == 2
    assert teachers.model.max_norm == 3.5
    student = composed("distill", "experiment=hinton_mnist")
    assert list(student.model.hidden) == [800, 800] and student.T == 20
    assert student.model.dropout == 0 and student.dataset.name == "mnist"
    assert list(composed("distill", "experiment=small_student").model.hidden) == [30, 30]
    omit3 = composed("distill", "experiment=omit3")
    assert list(omit3.transfer.omit_classes) == [3] and omit3.transfer.fit_omit_bias
    assert composed("distill", "experiment=soft_targets_3pct").transfer.fraction == 0.03
    assert composed("distill", "experiment=hinton_mnist", "T=8").T == 8  # still overridable
    for name in group_choices("experiment"):  # each preset is valid for the stage it names
        stage = OmegaConf.load(f"conf/experiment/{name}.yaml").experiment.stage
        cfg = composed(stage, f"experiment={name}")
        assert cfg.experiment.stage == stage
        validate(stage, cfg)


def test_the_specialists_presets_share_the_jft_like_data() -> None:
    generalist = composed("train-teachers", "experiment=jft_like_generalist")
    specialists = composed("specialists", "experiment=jft_like_specialists")
    back = composed("distill", "experiment=jft_like_distill")
    assert generalist.dataset == specialists.dataset == back.dataset
    assert generalist.dataset.name == "hierarchical" and generalist.dataset.cross_modes > 0
    assert generalist.teachers.n == 1 and list(back.model.hidden) == list(generalist.model.hidden)
    assert specialists.specialists.overlap_share > 0
