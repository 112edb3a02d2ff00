"""`loss=` as a config group: each conf/loss/<name>.yaml and its term in losses.LOSSES, what the
training loop hands a loss (epoch, labels, batch), its checks, cached against online teachers,
resume, and runs recorded before the group existed."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import (
    ONE_THREAD,
    TINY_TEACHERS,
    assert_one_line_error,
    distillrun,
    distillrun_here,
    manifest,
    metric_lines,
    runs,
)
from omegaconf import OmegaConf

from distillrun.config import group_choices
from distillrun.core.models import build_model, checkpoint, load_model
from distillrun.core.train import TrainSettings, fit
from distillrun.method.augment import Batch, Views
from distillrun.method.ensemble import combine
from distillrun.method.losses import (
    LOSSES,
    SETTINGS,
    dist_loss,
    distillation_loss,
    dkd_loss,
    logit_matching_loss,
    nkd_loss,
    standardize,
)
from distillrun.method.teacher_outputs import CachedLogits, OnlineTeachers, view_cache
from distillrun.runs import artifacts
from distillrun.stages.common import TEST_KILL_ENV
from distillrun.stages.distill import distill_loss_fn

ROOT = Path(__file__).resolve().parents[1]
LOSS_DIR = ROOT / "conf" / "loss"
SOFTMAX_LOSSES = ("kd", "dkd", "dist", "nkd")


def loss_file(name: str) -> dict:
    return yaml.safe_load((LOSS_DIR / f"{name}.yaml").read_text())


def loss_cfg(name: str, standardize: bool = False, **settings) -> OmegaConf:
    node = {**loss_file(name), "standardize": standardize, **settings}
    return OmegaConf.create({"loss": node, "T": 3.0, "ensemble": "arithmetic"})


# --- one YAML, one term ---------------------------------------------------------------------------


def test_every_loss_yaml_has_its_term_and_every_term_its_yaml() -> None:
    assert sorted(LOSSES) == group_choices("loss") == sorted(p.stem for p in LOSS_DIR.iterdir())
    for name, term in LOSSES.items():
        text = (LOSS_DIR / f"{name}.yaml").read_text()
        settings = loss_file(name)
        assert settings["name"] == name and settings["standardize"] is False, name
        params = inspect.signature(term).parameters.values()
        keyword_only = {p.name for p in params if p.kind is p.KEYWORD_ONLY}
        assert keyword_only == set(settings) - set(SETTINGS), name  # the YAML's hyperparameters
        assert all(p.default is p.empty for p in params), name  # their defaults: the YAML's
        # the first comment names the loss and its paper (authors and year)
        assert re.match(rf"# {name}: .*(et al\.|\(\d{{4}}\)|, \d{{4}})", text), name


def test_kd_stays_the_default_and_computes_todays_loss_bit_for_bit() -> None:
    """Runs and command lines from before the group: loss=kd and loss=logit_mse unchanged."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="distillrun.conf", version_base="1.3"):
        cfg = compose(config_name="distill")
    assert OmegaConf.to_container(cfg.loss) == {"name": "kd", "standardize": False}
    members, out, y = torch.randn(3, 16, 10), torch.randn(16, 10), torch.randint(0, 10, (16,))
    teacher, batch = CachedLogits({"logits": members}, 10), Batch(torch.arange(16), out)
    for name, old, T_targets in (
        ("kd", distillation_loss, 3.0),
        ("logit_mse", logit_matching_loss, 1.0),
    ):
        targets = combine(members, "arithmetic", T_targets)
        for labels in (y, None):
            new = distill_loss_fn(loss_cfg(name), teacher, labels, 10, 0.7)(out, batch)
            assert torch.equal(new, old(out, targets, labels, 3.0, 0.7)), (name, labels)


# --- what a loss gets from the training loop ------------------------------------------------------


def problem(n: int = 12, classes: int = 7):
    g = torch.Generator().manual_seed(0)
    members = 3 * torch.randn(2, n, classes, generator=g)
    out = torch.randn(n, classes, generator=g)
    return members, out, torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("standardized", [False, True])
def test_each_loss_gets_the_epoch_the_labels_and_the_batch(standardized: bool) -> None:
    members, out, y = problem()
    teacher = CachedLogits({"logits": members}, 7)
    idx = torch.tensor([5, 0, 3, 9, 2, 11])
    batch = Batch(idx, out[idx], epoch=5)
    z = standardize(out[idx]) if standardized else out[idx]
    m = standardize(members[:, idx]) if standardized else members[:, idx]
    at = lambda T: combine(m, "arithmetic", T)  # noqa: E731 # each member standardised, then combined
    ce, T, alpha = F.cross_entropy(out[idx], y[idx]), 3.0, 0.6
    expected = {
        "kd": T
        * T
        * F.kl_div(F.log_softmax(z / T, 1), at(T), log_target=True, reduction="batchmean"),
        "dkd": 5 / 20 * dkd_loss(z, at(T), y[idx], T, 1.0, 8.0),  # epoch 5 of DKD's 20 warm-up ones
        "dist": dist_loss(z, at(T), T, 2.0, 2.0),  # the intra-class relation of these 6 rows
        "nkd": nkd_loss(z, at(1.0), at(T), y[idx], T, 1.5),
    }
    for name, term in expected.items():
        loss = distill_loss_fn(loss_cfg(name, standardized), teacher, y, 7, alpha)
        torch.testing.assert_close(loss(out[idx], batch), alpha * term + (1 - alpha) * ce)
    # Without labels: the term alone, its target class the teachers' most likely one.
    top = at(1.0).argmax(1) if not standardized else combine(m, "arithmetic", 1.0).argmax(1)
    unlabeled = distill_loss_fn(loss_cfg("nkd", standardized), teacher, None, 7, alpha)
    torch.testing.assert_close(unlabeled(out[idx], batch), nkd_loss(z, at(1.0), at(T), top, T, 1.5))


def test_the_training_loop_hands_the_loss_its_epoch_and_resumes_exactly(tmp_path: Path) -> None:
    """DKD's warm-up reads the epoch from the batch; a run stopped in epoch 2 (before its
    checkpoint) resumes from epoch 1's, sees epochs 2 to 4 and ends with the uninterrupted
    run's weights."""
    x = torch.randn(24, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(24) % 4
    teacher = CachedLogits({"logits": torch.randn(2, 24, 4)}, 4)
    dkd = distill_loss_fn(loss_cfg("dkd", warmup_epochs=3), teacher, y, 4, 0.5)

    def run(state: Path, resume: bool = False, stop_after: int | None = None):
        seen: list[int] = []

        def loss_fn(out, b):
            seen.append(b.epoch)
            return dkd(out, b)

        def on_epoch(record):
            if record["epoch"] == stop_after:
                raise KeyboardInterrupt

        opt = {"name": "adam", "lr": 0.01, "betas": [0.9, 0.999], "weight_decay": 0.0}
        settings = TrainSettings({**opt, "schedule": "cosine"}, 4, 8, seed=1, checkpoint_every=0)
        torch.manual_seed(0)
        model = build_model({"name": "mlp", "hidden": [8]}, (6,), 4)
        fitted = fit(
            model,
            x,
            loss_fn,
            settings,
            x_val=x[:8],
            y_val=y[:8],
            state_path=state,
            resume=resume,
            on_epoch=on_epoch,
        )
        return fitted, seen

    whole, seen = run(tmp_path / "a.pt")
    assert seen == [1] * 3 + [2] * 3 + [3] * 3 + [4] * 3
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b.pt", stop_after=2)
    resumed, seen = run(tmp_path / "b.pt", resume=True)
    assert seen == [2] * 3 + [3] * 3 + [4] * 3
    for key, value in whole.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key


# --- cached and online teachers -------------------------------------------------------------------

TINY_CNN = {"name": "cnn", "channels": [4], "hidden": 8, "dropout": 0.0}


@pytest.mark.parametrize(
    ("name", "standardized"), [(n, False) for n in LOSSES] + [(n, True) for n in SOFTMAX_LOSSES]
)
def test_cached_and_online_teachers_give_each_loss_the_same_targets(
    tmp_path: Path, name: str, standardized: bool
) -> None:
    files = []
    for i in range(2):
        torch.manual_seed(i)
        files.append(tmp_path / f"member_{i}.pt")
        model = build_model(TINY_CNN, (1, 6, 6), 5)
        artifacts.save_tensors(files[-1], checkpoint(model, TINY_CNN, (1, 6, 6), 5))
    x = torch.randn(32, 1, 6, 6, generator=torch.Generator().manual_seed(0))
    y = torch.arange(32) % 5
    views = Views(1, False, "replicate")
    cached, _ = view_cache(
        sources=["teachers"],
        member_files=files,
        fingerprint="data",
        cache_dir=tmp_path,
        x=x,
        transfer=torch.arange(32),
        num_classes=5,
        augmentation=views,
        batch_size=16,
        device=torch.device("cpu"),
        say=lambda line: None,
        top_k=None,
        max_mb=100.0,
    )
    online = OnlineTeachers([load_model(f) for f in files])
    cfg = loss_cfg(name, standardized)
    from_cache, from_models = (distill_loss_fn(cfg, t, y, 5, 0.5) for t in (cached, online))
    gaps = []

    def loss_fn(out: torch.Tensor, b: Batch) -> torch.Tensor:
        a, o = cached.member_logits(b), online.member_logits(b)
        if standardized:
            a, o = standardize(a), standardize(o)
        gaps.append(
            float(
                (combine(a, "arithmetic", 3.0).exp() - combine(o, "arithmetic", 3.0).exp())
                .abs()
                .max()
            )
        )
        loss = from_cache(out, b)
        torch.testing.assert_close(loss, from_models(out, b), rtol=1e-2, atol=1e-3)
        return loss

    settings = TrainSettings(
        {
            "name": "adam",
            "lr": 0.01,
            "betas": [0.9, 0.999],
            "weight_decay": 0.0,
            "schedule": "constant",
            "step_size": 1,
            "gamma": 1.0,
        },
        epochs=2,
        batch_size=8,
        augment=views,
    )
    torch.manual_seed(0)
    fit(build_model(TINY_CNN, (1, 6, 6), 5), x, loss_fn, settings, x_val=x, y_val=y)
    assert len(gaps) == 8 and max(gaps) < 2e-3  # fp16 rounding of the cached logits


# --- bad input, the sweep of methods, its summary -------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["loss=dk"], ["unknown loss 'dk'", "did you mean 'dkd'", "kd, logit_mse, nkd"]),
        (["loss=dkd", "loss.beta_n=-1"], ["loss.beta_n=-1", ">= 0", "default of loss=dkd: 8.0"]),
        (["loss=dkd", "loss.warmup_epochs=2.5"], ["loss.warmup_epochs=2.5", "an integer >= 0"]),
        (["loss=dist", "T=0"], ["T=0", "> 0"]),  # DIST's tau is T
        (
            ["loss=logit_mse", "loss.standardize=true"],
            ["loss.standardize=true", "loss=logit_mse", "loss=dist, dkd, kd or nkd"],
        ),
        (["-m", "loss=kd,logit_mse", "loss.standardize=true"], ["loss=logit_mse"]),
        (  # the bad pair is no sweep value's own: only the grid holds it
            ["-m", "loss=kd,logit_mse", "loss.standardize=false,true", "seed=0,1"],
            ["the sweep's job loss=logit_mse loss.standardize=true seed=0:", "loss=dist, dkd"],
        ),
        (["loss=dist", "train.batch_size=1"], ["loss=dist", "train.batch_size=2 or more"]),
    ],
)
def test_bad_loss_settings_are_one_line_before_any_run_folder(
    tmp_path: Path, args: list[str], fragments: list[str]
) -> None:
    assert_one_line_error(distillrun(tmp_path, "distill", *args, check=None), *fragments)
    assert not (tmp_path / "outputs").exists()


def test_the_sweep_of_methods_passes_the_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from distillrun.cli import precheck

    monkeypatch.chdir(tmp_path)
    args = ["-m", "loss=kd,dkd,dist,nkd", "loss.standardize=false,true", "seed=0,1,2"]
    assert precheck("distill", args) == args  # each value of each sweep composed and checked


def test_the_seeds_table_groups_runs_by_loss_and_its_settings() -> None:
    from distillrun.runs.summary import Row, over_seeds, seed_table

    rows = [
        Row("sweep", Path(str(i)), "distill", "complete", overrides, {"test_errors": errors}, 1.0)
        for i, (overrides, errors) in enumerate(
            ({"loss": loss, "loss.standardize": ls, "seed": str(seed)}, 10 * i + seed)
            for i, (loss, ls) in enumerate([("kd", "false"), ("kd", "true"), ("dkd", "false")])
            for seed in (0, 1, 2)
        )
    ]
    columns, cells = seed_table(over_seeds(rows))
    assert columns[:3] == ["overrides", "seeds", "test errors"]
    assert cells == [
        ["loss=kd loss.standardize=false", 3, "1 ± 1"],
        ["loss=kd loss.standardize=true", 3, "11 ± 1"],
        ["loss=dkd loss.standardize=false", 3, "21 ± 1"],
    ]


# --- end to end: cached against online students, kill and resume, runs from before ---------------

STUDENT = ["train.epochs=4", "model.hidden=[16]", "progress=false", "baseline=false"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cwd = tmp_path_factory.mktemp("loss-teachers")
    distillrun_here(cwd, "train-teachers", *TINY_TEACHERS, env=ONE_THREAD)
    (folder,) = runs(cwd, "train-teachers")
    return folder


@pytest.mark.slow
def test_cached_and_online_students_agree_for_every_loss(teachers: Path, tmp_path: Path) -> None:
    distillrun_here(
        tmp_path,
        "distill",
        "-m",
        "loss=dkd,dist,nkd",
        "loss.standardize=false,true",
        "teacher_outputs=cached,online",
        "augment=shift",
        "augment.pixels=1",
        f"teachers={teachers}",
        *STUDENT,
        env=ONE_THREAD,
    )
    (sweep,) = (tmp_path / "outputs/distill/multirun").iterdir()
    jobs = [manifest(p) for p in sorted(sweep.iterdir(), key=lambda p: p.name) if p.name.isdigit()]
    by_setting: dict[tuple, dict[str, int]] = {}
    for m in jobs:
        o = dict(item.split("=", 1) for item in m["overrides"])
        setting = (o["loss"], o["loss.standardize"])
        by_setting.setdefault(setting, {})[o["teacher_outputs"]] = m["metrics"]["test_errors"]
    assert len(jobs) == 12 and len(by_setting) == 6
    for setting, errors in by_setting.items():
        assert abs(errors["cached"] - errors["online"]) <= 1, (setting, errors)


@pytest.mark.slow
def test_a_run_from_before_the_group_resumes_exactly_and_reports(
    teachers: Path, tmp_path: Path
) -> None:
    """Runs recorded `loss: kd` before loss= was a group; killed, such a run resumes to the
    numbers of an uninterrupted one (the epoch-dependent DKD: the in-process test above)."""
    args = [f"teachers={teachers}", *STUDENT, "train.checkpoint_every=0"]
    distillrun_here(tmp_path, "distill", *args, "hydra.run.dir=whole", env=ONE_THREAD)
    old = tmp_path / "old"
    kill = {**ONE_THREAD, TEST_KILL_ENV: "student:2"}
    distillrun(tmp_path, "distill", *args, f"hydra.run.dir={old}", env=kill, check=-9)
    record = manifest(old)
    assert record["config"]["loss"] == {"name": "kd", "standardize": False}
    record["config"]["loss"] = "kd"  # as written before
    (old / "manifest.json").write_text(json.dumps(record))
    hydra_config = old / ".hydra" / "config.yaml"
    text = hydra_config.read_text()
    assert "loss:\n  name: kd\n  standardize: false\n" in text
    hydra_config.write_text(text.replace("loss:\n  name: kd\n  standardize: false\n", "loss: kd\n"))

    distillrun_here(tmp_path, "distill", f"resume={old}", env=ONE_THREAD)
    assert manifest(old)["status"] == "complete"
    assert metric_lines(old) == metric_lines(tmp_path / "whole")
    assert (old / "student.pt").read_bytes() == (tmp_path / "whole" / "student.pt").read_bytes()
    distillrun_here(tmp_path, "report", str(old), env=ONE_THREAD)
    (written,) = (tmp_path / "outputs" / "report").glob("*/report.md")
    errors = manifest(old)["metrics"]["test_errors"]
    assert (
        f"| old | - | {manifest(old)['metrics']['val_errors']} | {errors} |" in written.read_text()
    )
