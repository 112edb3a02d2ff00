"""The networks: an MLP, a small CNN, and torchvision's ResNet-18 adapted to small images."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from distillrun.choices import one_of
from distillrun.errors import UserError


class MLP(nn.Module):
    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: list[int],
        dropout: float = 0.0,
        input_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class CNN(nn.Module):
    def __init__(
        self,
        image_shape: tuple[int, int, int],
        num_classes: int,
        channels: list[int],
        hidden: int,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        c, h, w = image_shape
        blocks: list[nn.Module] = []
        for out in channels:
            blocks += [nn.Conv2d(c, out, 3, padding=1), nn.ReLU()]
            if min(h, w) >= 2:  # stop pooling once the map is 1 pixel wide (8x8 digits)
                blocks.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
            c = out
        self.features = nn.Sequential(*blocks)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c * h * w, hidden),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def resnet18(image_shape: tuple[int, int, int], num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32-scale images."""
    from torchvision.models import resnet18 as tv_resnet18

    net = tv_resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(image_shape[0], 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return net


# model.name -> a builder of (config, input shape, classes) (the names are choices.MODELS).
BUILDERS: dict[str, Callable[[Mapping[str, Any], tuple[int, ...], int], nn.Module]] = {
    "mlp": lambda cfg, shape, classes: MLP(
        math.prod(shape),
        classes,
        list(cfg["hidden"]),
        cfg.get("dropout", 0.0),
        cfg.get("input_dropout", 0.0),
    ),
    "cnn": lambda cfg, shape, classes: CNN(
        shape, classes, list(cfg["channels"]), cfg["hidden"], cfg["dropout"]
    ),
    "resnet18": lambda cfg, shape, classes: resnet18(shape, classes),
}
IMAGE_MODELS = ("cnn", "resnet18")
TORCHVISION = "torchvision:"  # model name prefix: torchvision's classifiers as they are


def torchvision_model(arch: str, num_classes: int) -> nn.Module:
    """torchvision's classification architecture `arch` (e.g. resnet18), untrained, with a head
    of `num_classes` outputs (imported teachers bring their own weights)."""
    from torchvision import models as tv

    names = tv.list_models(module=tv)
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=1)
        hint = f" (did you mean '{TORCHVISION}{close[0]}'?)" if close else ""
        raise UserError(
            f"unknown torchvision classification architecture '{arch}'{hint}: use one of "
            f"torchvision.models.list_models(), e.g. arch={TORCHVISION}resnet18"
        )
    return tv.get_model(arch, weights=None, num_classes=num_classes)


def build_model(
    cfg: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """Build the model named by `cfg["name"]` for inputs of `input_shape` (without the batch)."""
    name = cfg["name"]
    if name.startswith(TORCHVISION):
        return torchvision_model(name[len(TORCHVISION) :], num_classes)
    if name not in BUILDERS:
        raise UserError(f"unknown model.name '{name}': use {one_of(tuple(BUILDERS))}")
    if name in IMAGE_MODELS and len(input_shape) != 3:
        raise UserError(
            f"model={name} needs images, but this dataset holds vectors of shape "
            f"{tuple(input_shape)}: use model=mlp"
        )
    return BUILDERS[name](cfg, tuple(input_shape), num_classes)


def output_layer(model: nn.Module) -> nn.Linear:
    """The final linear layer, whose bias holds each class's prior."""
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Rescale each unit's incoming weight vector to an L2 norm of at most `max_norm`."""
    for m in model.modules():
        if isinstance(m, nn.Linear):
            m.weight.copy_(torch.renorm(m.weight, p=2, dim=0, maxnorm=max_norm))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def checkpoint(
    model: nn.Module, cfg: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int
) -> dict[str, Any]:
    """A self-describing checkpoint of plain containers and tensors (loadable weights_only)."""
    if OmegaConf.is_config(cfg):
        cfg = OmegaConf.to_container(cfg, resolve=True)  # plain types: no omegaconf in the pickle
    return {
        "model": dict(cfg),
        "input_shape": list(input_shape),
        "num_classes": num_classes,
        "state_dict": model.state_dict(),
    }


def load_model(path: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """The model in a distillrun checkpoint (`member_<i>.pt`, `student.pt`, `baseline.pt`,
    `specialist_<m>.pt` of a run folder), rebuilt from the architecture it records, on `device`
    and in eval mode. Loaded with weights_only: nothing in the file is run. A missing, damaged
    or foreign file raises UserError (a ValueError) naming the file and the fix."""
    return load_checkpoint(path, device)[0]


def load_checkpoint(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict[str, Any]]:
    """`load_model`, and the model config the checkpoint records (its architecture: for an
    imported teacher, not necessarily its run's `model` config)."""
    from distillrun.artifacts import load_tensors

    ckpt = load_tensors(path, map_location=device)
    keys = ("model", "input_shape", "num_classes", "state_dict")
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in keys):
        raise UserError(
            f"{path} is not a distillrun model checkpoint: re-run the stage that wrote it"
        )
    model = build_model(ckpt["model"], tuple(ckpt["input_shape"]), ckpt["num_classes"])
    try:
        model.load_state_dict(ckpt["state_dict"])
    except RuntimeError as e:
        raise UserError(
            f"{path} does not match its own architecture ({str(e).splitlines()[0][:100]}): "
            "the file is corrupt; re-run the stage that wrote it"
        ) from e
    return model.to(device).eval(), dict(ckpt["model"])
