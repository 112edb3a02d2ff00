"""Pieces of the training stages: model selection, transfer sets, checkpoints."""

import json

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from distillrun.core.models import apply_max_norm, build_model, checkpoint, load_model, output_layer
from distillrun.core.train import TrainSettings, batch_bounds, fit
from distillrun.errors import UserError
from distillrun.method.metrics import classification_metrics
from distillrun.runs import artifacts
from distillrun.stages.distill import fit_omit_bias, transfer_indices

OPTIM = {
    "name": "sgd",
    "lr": 0.1,
    "momentum": 0.0,
    "nesterov": False,
    "weight_decay": 0.0,
    "schedule": "constant",
    "step_size": 1,
    "gamma": 1.0,
}


def fit_with_sgd(model, x, loss_fn, x_val, y_val, epochs, batch_size, **kwargs):
    settings = TrainSettings(OPTIM, epochs=epochs, batch_size=batch_size, seed=0)
    return fit(model, x, loss_fn, settings, x_val=x_val, y_val=y_val, **kwargs)


def test_fit_keeps_the_epoch_with_fewest_validation_errors():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 5, generator=g)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [8]}, (5,), 2)
    states = []
    result = fit_with_sgd(
        model,
        x,
        lambda out, b: F.cross_entropy(out, y[b.idx]),
        x[:50],
        y[:50],
        epochs=6,
        batch_size=32,
        on_epoch=states.append,
    )
    best = min(states, key=lambda r: (r["val_errors"], r["val_nll"]))
    assert result.best_epoch == best["epoch"]
    assert classification_metrics(model(x[:50]), y[:50], "val")["val_errors"] == best["val_errors"]
    assert [r["epoch"] for r in result.history] == list(range(1, 7))


def test_fit_stops_on_a_nan_loss_naming_the_epoch():
    x, y = torch.randn(20, 3), torch.zeros(20, dtype=torch.long)
    model = build_model({"name": "mlp", "hidden": [4]}, (3,), 2)
    with pytest.raises(UserError, match="epoch 1.*optim.lr"):
        fit_with_sgd(
            model,
            x,
            lambda out, b: out.sum() * float("nan"),
            x[:0],
            y[:0],
            epochs=3,
            batch_size=8,
        )


def test_transfer_set_fraction_and_omitted_classes():
    y = torch.arange(1000) % 10
    cfg = OmegaConf.create({"transfer": {"fraction": 0.03, "omit_classes": []}})
    idx = transfer_indices(y, cfg, seed=0)
    assert len(idx) == 30 and len(set(idx.tolist())) == 30
    assert torch.equal(idx, transfer_indices(y, cfg, seed=0))
    assert not torch.equal(idx, transfer_indices(y, cfg, seed=1))
    cfg = OmegaConf.create({"transfer": {"fraction": 1.0, "omit_classes": [3, 7]}})
    idx = transfer_indices(y, cfg, seed=0)
    assert len(idx) == 800 and not torch.isin(y[idx], torch.tensor([3, 7])).any()
    cfg = OmegaConf.create({"transfer": {"fraction": 1.0, "omit_classes": list(range(10))}})
    with pytest.raises(UserError, match="empty"):
        transfer_indices(y, cfg, seed=0)


def test_fit_omit_bias_recovers_a_suppressed_class():
    y = torch.arange(300) % 3
    logits = F.one_hot(y, 3).float() * 4
    logits[:, 1] -= 5.0  # class 1 was never seen: its logit sits 5 too low
    bias = fit_omit_bias(logits, y, [1])
    shifted = logits.clone()
    shifted[:, 1] += bias
    assert classification_metrics(logits, y)["test_errors"] == 100
    assert classification_metrics(shifted, y)["test_errors"] == 0
    assert 1.0 < bias < 9.0


def test_max_norm_caps_incoming_weights():
    model = build_model({"name": "mlp", "hidden": [16]}, (4,), 3)
    with torch.no_grad():
        output_layer(model).weight.mul_(100)
    apply_max_norm(model, 2.0)
    for layer in (m for m in model.modules() if isinstance(m, torch.nn.Linear)):
        assert layer.weight.norm(dim=1).max() <= 2.0 + 1e-5


@pytest.mark.parametrize(
    "cfg,shape",
    [
        ({"name": "mlp", "hidden": [8, 8], "dropout": 0.5, "input_dropout": 0.2}, (1, 8, 8)),
        ({"name": "cnn", "channels": [4, 8], "hidden": 16, "dropout": 0.1}, (1, 8, 8)),
        ({"name": "cnn", "channels": [4], "hidden": 16, "dropout": 0.0}, (3, 32, 32)),
        ({"name": "resnet18"}, (3, 32, 32)),
    ],
)
def test_models_give_logits_and_round_trip_through_a_checkpoint(tmp_path, cfg, shape):
    cfg = OmegaConf.create(cfg)  # as the stages pass it: a DictConfig with ListConfigs inside
    model = build_model(cfg, shape, 7).eval()
    x = torch.randn(2, *shape)
    assert model(x).shape == (2, 7)
    artifacts.save_tensors(tmp_path / "m.pt", checkpoint(model, cfg, shape, 7))
    loaded = load_model(tmp_path / "m.pt")
    torch.testing.assert_close(loaded(x), model(x))


def test_image_models_refuse_vectors():
    with pytest.raises(UserError, match="model=cnn needs images"):
        build_model({"name": "cnn", "channels": [4], "hidden": 8, "dropout": 0.0}, (40,), 10)


def test_bad_checkpoints_are_one_line_errors(tmp_path):
    good = checkpoint(
        build_model({"name": "mlp", "hidden": [8]}, (4,), 3),
        {"name": "mlp", "hidden": [8]},
        (4,),
        3,
    )
    artifacts.save_tensors(tmp_path / "good.pt", good)
    data = (tmp_path / "good.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    (tmp_path / "random.pt").write_bytes(
        torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes()
    )
    other = dict(good, model={"name": "mlp", "hidden": [16]})
    artifacts.save_tensors(tmp_path / "other_arch.pt", other)
    artifacts.save_tensors(tmp_path / "not_a_model.pt", {"x": torch.zeros(2)})
    for name in ("truncated", "random", "other_arch", "not_a_model", "missing"):
        with pytest.raises(UserError) as err:
            load_model(tmp_path / f"{name}.pt")
        assert "\n" not in str(err.value) and str(tmp_path / f"{name}.pt") in str(err.value)


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pt")
    assert not marker.exists()
    with pytest.raises(UserError, match="evil.pt"):
        artifacts.load_tensors(tmp_path / "evil.pt")
    assert not marker.exists()


def test_atomic_write_leaves_no_partial_file(tmp_path, monkeypatch):
    artifacts.write_json(tmp_path / "a.json", {"v": 1})

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(artifacts.os, "fsync", boom)
    with pytest.raises(OSError):
        artifacts.write_json(tmp_path / "a.json", {"v": 2})
    assert json.loads((tmp_path / "a.json").read_text()) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_newest_complete_run_skips_unfinished_failed_and_refused(tmp_path):
    root = tmp_path / "outputs"

    def make(name, status=None, started="", sub=""):
        folder = root / "train-teachers" / sub / name
        folder.mkdir(parents=True)
        if status:
            artifacts.write_manifest(folder, stage="train-teachers", status=status, started=started)
        return folder

    make("a", "complete", "2026-01-01T00:00:00")
    newest = make("0", "complete", "2026-03-01T00:00:00", sub="multirun/x")
    make("c", "failed", "2026-04-01T00:00:00")
    make("d")  # unfinished: no manifest
    make("e", "complete", "2026-05-01T00:00:00")
    said = []
    refuse_e = lambda m: "other data" if m["run_dir"].endswith("/e") else None  # noqa: E731
    folder, manifest = artifacts.newest_complete_run(root, "train-teachers", refuse_e, said.append)
    assert folder == newest and manifest["status"] == "complete"
    assert "skipped 2" in said[0]
    with pytest.raises(UserError, match="no complete train-teachers run.*other data"):
        artifacts.newest_complete_run(root, "train-teachers", lambda m: "other data", said.append)
    with pytest.raises(UserError, match="run `distillrun distill` first"):
        artifacts.newest_complete_run(root, "distill", lambda m: None, said.append)


@pytest.mark.parametrize(("n", "batch_size"), [(10, 3), (10, 5), (9, 4), (5, 4), (1, 4), (3, 1)])
def test_batches_cover_every_example_once_and_never_leave_one_alone(n, batch_size):
    bounds = batch_bounds(n, batch_size)
    assert [i for start, stop in bounds for i in range(start, stop)] == list(range(n))
    assert bounds[-1][1] - bounds[-1][0] > 1 or n == 1  # the last batch is never alone


def test_batchnorm_model_trains_when_the_last_batch_would_hold_one_example():
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 0, 1, 0])
    model = build_model({"name": "resnet18"}, (3, 8, 8), 2)
    result = fit_with_sgd(
        model,
        x,
        lambda out, b: F.cross_entropy(out, y[b.idx]),
        x[:0],
        y[:0],
        epochs=1,
        batch_size=4,
    )
    assert result.best_epoch == 1


@pytest.mark.gpu
def test_fit_trains_on_cuda_with_the_data_on_the_device() -> None:
    device = torch.device("cuda")
    x = torch.randn(64, 5, device=device)
    y = (x[:, 0] > 0).long()
    torch.manual_seed(0)
    model = build_model({"name": "mlp", "hidden": [16]}, (5,), 2).to(device)
    fitted = fit_with_sgd(
        model, x, lambda out, b: F.cross_entropy(out, y[b.idx]), x[:16], y[:16], 20, 16
    )
    assert next(fitted.model.parameters()).device.type == "cuda"
    assert fitted.history[-1]["train_loss"] < fitted.history[0]["train_loss"]
