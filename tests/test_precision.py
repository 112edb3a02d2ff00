"""train.precision, train.channels_last and train.compile: what runs where, and what it gives."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import ONE_THREAD, assert_one_line_error, distillrun_here, manifest, runs

from distillrun.core.models import build_model
from distillrun.core.train import TrainSettings, check_speed_settings, fit
from distillrun.errors import UserError

SGD = {"name": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": False, "weight_decay": 0.0}
SGD |= {"schedule": "constant", "step_size": 1, "gamma": 1.0}
CNN = {"name": "cnn", "channels": [8, 16], "hidden": 32, "dropout": 0.0}


def images(n: int = 96, device: str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x.mean((1, 2, 3)) > 0).long()  # brighter than average?
    return x.to(device), y.to(device)


def train_cnn(
    x: torch.Tensor,
    y: torch.Tensor,
    path: Path | None = None,
    resume: bool = False,
    on_epoch=lambda record: None,
    **settings,
):
    torch.manual_seed(0)
    model = build_model(CNN, (1, 8, 8), 2).to(x.device)
    dtypes: list[torch.dtype] = []
    model.features[0].register_forward_hook(lambda m, i, out: dtypes.append(out.dtype))
    fitted = fit(
        model,
        x,
        lambda logits, b: F.cross_entropy(logits, y[b.idx]),
        TrainSettings(SGD, epochs=8, batch_size=16, **settings),
        x_val=x[:32],
        y_val=y[:32],
        state_path=path,
        resume=resume,
        on_epoch=on_epoch,
    )
    return fitted, dtypes


def test_bf16_autocasts_the_forward_passes_on_the_cpu() -> None:
    x, y = images()
    full, full_dtypes = train_cnn(x, y)
    half, half_dtypes = train_cnn(x, y, precision="bf16")
    assert set(full_dtypes) == {torch.float32}
    assert set(half_dtypes) == {torch.bfloat16}  # training and validation passes
    assert all(p.dtype == torch.float32 for p in half.model.parameters())  # fp32 master weights
    # The same training in a coarser arithmetic: it learns, and ends near the fp32 run.
    losses = [r["train_loss"] for r in half.history]
    assert losses[-1] < 0.3 * losses[0]
    assert abs(losses[-1] - full.history[-1]["train_loss"]) < 0.05


def test_channels_last_trains_the_same_model_in_nhwc_memory() -> None:
    x, y = images()
    plain, _ = train_cnn(x, y)
    nhwc, _ = train_cnn(x, y, channels_last=True)
    weight = [m for m in nhwc.model.modules() if isinstance(m, torch.nn.Conv2d)][1].weight
    assert weight.is_contiguous(memory_format=torch.channels_last)
    assert not weight.is_contiguous()
    for a, b in zip(plain.history, nhwc.history, strict=True):
        assert a["val_errors"] == b["val_errors"]
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-5 * max(1, a["train_loss"])


def test_precision_settings_that_cannot_run_are_one_line_errors(tmp_path: Path) -> None:
    tiny = ["debug=tiny", "teachers.n=1"]
    fp16 = distillrun_here(
        tmp_path, "train-teachers", *tiny, "train.precision=fp16", "device=cpu", check=None
    )
    assert_one_line_error(fp16, "train.precision=fp16", "CUDA", "bf16")
    assert not (tmp_path / "outputs" / "train-teachers").exists()  # refused before any folder
    bad = distillrun_here(tmp_path, "distill", "train.precision=fp8", check=None)
    assert_one_line_error(bad, "train.precision=fp8", "fp32, bf16 or fp16")
    # Known only once the device is (device=auto): refused before anything is trained.
    with pytest.raises(UserError, match="train.precision=fp16 .* not cpu"):
        check_speed_settings(torch.device("cpu"), "fp16", False)
    check_speed_settings(torch.device("cpu"), "bf16", True)  # this machine has a C++ compiler
    x, y = images()
    with pytest.raises(UserError, match="train.channels_last=true .* vectors"):
        fit(
            build_model({"name": "mlp", "hidden": [4]}, (64,), 2),
            x.flatten(1),
            lambda logits, b: F.cross_entropy(logits, y[b.idx]),
            TrainSettings(SGD, epochs=1, channels_last=True),
            x_val=x[:0],
            y_val=y[:0],
        )


@pytest.mark.slow  # a run of the command (in this process)
def test_a_bf16_run_records_its_precision_and_completes(tmp_path: Path) -> None:
    distillrun_here(
        tmp_path,
        "train-teachers",
        "debug=tiny",
        "teachers.n=1",
        "model=cnn",
        "train.precision=bf16",
        "train.channels_last=true",
        env=ONE_THREAD,
    )
    (run,) = runs(tmp_path, "train-teachers")
    m = manifest(run)
    assert m["status"] == "complete"
    assert m["config"]["train"]["precision"] == "bf16" and m["config"]["train"]["channels_last"]
    assert m["metrics"]["test_accuracy"] > 0.5  # digits, one epoch: far above chance (0.1)


@pytest.mark.slow  # torch.compile's first compilation takes seconds
def test_compile_trains_to_the_numbers_of_eager_mode() -> None:
    x, y = images()
    x = x.flatten(1)  # an MLP compiles in seconds, a CNN in tens of seconds

    def train(compile: bool):
        torch.manual_seed(0)
        model = build_model({"name": "mlp", "hidden": [16]}, (64,), 2)
        settings = TrainSettings(SGD, epochs=3, batch_size=16, compile=compile)
        loss = lambda logits, b: F.cross_entropy(logits, y[b.idx])  # noqa: E731
        return fit(model, x, loss, settings, x_val=x[:32], y_val=y[:32])

    eager, compiled = train(False), train(True)
    for a, b in zip(eager.history, compiled.history, strict=True):
        assert a["val_errors"] == b["val_errors"]
        assert abs(a["train_loss"] - b["train_loss"]) < 1e-4 * max(1, a["train_loss"])


@pytest.mark.gpu
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_on_cuda_trains_and_resumes_exactly(tmp_path: Path, precision: str) -> None:
    x, y = images(device="cuda")
    options = {"precision": precision, "channels_last": True, "checkpoint_every": 0}
    whole, dtypes = train_cnn(x, y, tmp_path / "whole.pt", **options)
    assert set(dtypes) == {torch.bfloat16 if precision == "bf16" else torch.float16}
    assert whole.history[-1]["train_loss"] < whole.history[0]["train_loss"]

    def stop_after_two(record: dict) -> None:
        if record["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_cnn(x, y, tmp_path / "cut.pt", on_epoch=stop_after_two, **options)
    state = torch.load(tmp_path / "cut.pt", weights_only=True)
    assert (state["scaler"] is not None) == (precision == "fp16")  # the fp16 scale resumes too
    resumed, _ = train_cnn(x, y, tmp_path / "cut.pt", resume=True, **options)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole.history]
    assert [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.history] == strip
