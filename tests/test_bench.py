"""The bench's CIFAR KD throughput: measured on a CUDA GPU, skipped elsewhere with a line;
its code is exercised here on the CPU with small nets, few views and few images."""

from __future__ import annotations

import json

import pytest
import torch

from distillrun.method.augment import Views
from distillrun.tools import bench

RESNET8 = {"name": "cifar_resnet", "depth": 8, "widths": [16, 16, 32, 64]}


@pytest.fixture(autouse=True)
def one_thread():
    """One thread for these tests, then the count as it was: later tests in this process
    compare machine records, which hold it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_cifar_kd_throughput_runs_both_loops_and_reports_them() -> None:
    views = Views(1, True, "zeros")  # 18 views
    figures = bench.cifar_kd_throughput(
        torch.device("cpu"), "bf16", 48, 1, 1, RESNET8, RESNET8, views, "resnet8 -> resnet8"
    )
    assert figures["cifar_kd_samples_per_s"] > 0 and figures["cifar_kd_reference_samples_per_s"] > 0
    assert figures["cifar_kd_cache_seconds"] > 0
    assert (
        figures["cifar_kd_setup"]
        == "resnet8 -> resnet8, 48 images x 1 epochs, batch 64, 18 views, bf16 on cpu"
    )


def test_without_a_gpu_the_cifar_figures_are_skipped_with_a_line(monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert bench.cifar_kd(quick=True) == {"cifar_kd": "skipped: measured on a CUDA GPU only"}
    assert "no CUDA GPU here" in capsys.readouterr().out


def test_loss_throughput_times_each_loss_through_distills_loss_function(monkeypatch) -> None:
    """Every variant of LOSS_VARIANTS is timed with its own loss (distill's loss function with
    that loss= and standardisation), and its ratio to kd is reported."""
    torch.set_num_threads(1)
    monkeypatch.setattr(bench, "STUDENT", {"name": "mlp", "hidden": [8], "dropout": 0.0})
    built = []
    real = bench.distill_loss_of

    def recording(loss: str, standardize: bool, cached, y):
        built.append((loss, standardize))
        return real(loss, standardize, cached, y)

    monkeypatch.setattr(bench, "distill_loss_of", recording)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(300, 1, 28, 28, generator=g), torch.randint(0, 10, (300,), generator=g)
    figures = bench.loss_throughput(x, y, epochs=1, repeats=1)
    assert built == list(bench.LOSS_VARIANTS.values())
    others = [name for name in bench.LOSS_VARIANTS if name != "kd"]
    assert {f"loss_throughput_ratio_{n}" for n in others} <= set(figures)
    assert {f"loss_throughput_ratio_{n}" for n in others} <= set(bench.GOALS)
    assert all(figures[f"loss_throughput_ratio_{n}"] > 0 for n in others)
    assert "270 examples x 1 epochs, 9 cached views" in figures["loss_throughput_setup"]


def test_only_commands_times_the_commands_and_nothing_else(monkeypatch, tmp_path) -> None:
    def no_data(*args, **kwargs):
        raise AssertionError("--only commands loaded data")

    monkeypatch.setattr(bench, "mnist_like", no_data)
    monkeypatch.setattr(bench, "command_seconds", lambda args, env=None, repeats=5: 0.25)
    out = tmp_path / "bench.json"
    bench.main(["--only", "commands", "--out", str(out)])
    figures = json.loads(out.read_text())
    assert set(figures.pop("goals_met").values()) == {True, False}  # every goal, met or not
    assert figures == {
        "help_seconds": 0.25,
        "stage_help_seconds": 0.25,
        "cfg_job_seconds": 0.25,
        "tab_seconds": 0.25,
    }
