"""The networks: an MLP, a small CNN, torchvision's ResNet-18 adapted to small images, and the
CIFAR ResNets and wide ResNets that knowledge-distillation papers benchmark on CIFAR-100."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from omegaconf import OmegaConf
from torch import nn

from distillrun.choices import depth_problem, one_of
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


# --- the CIFAR nets of the distillation benchmarks (CRD, DKD: conf/model/resnet*.yaml, wrn_*.yaml)
#
# Both have the layers of HobbitLong/RepDistiller's models, the code behind CRD's and DKD's
# published accuracy tables, so that those figures compare with ours (tests/test_cifar.py checks
# the parameter counts). Initialisation: Kaiming normal (fan_out, ReLU gain) for every
# convolution, BatchNorm weight 1 and bias 0 (as there), PyTorch's default for the final linear
# layer (RepDistiller's WRN zeroes its bias, its ResNet does not).


def _conv3x3(c_in: int, c_out: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=False)


def _blocks_per_stage(name: str, depth: int) -> int:
    problem = depth_problem(name, depth)
    if problem:
        raise UserError(problem)
    return (depth - 4) // 6 if name == "wrn" else (depth - 2) // 6


def _init_weights(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """He et al.'s basic block: conv-BN-ReLU-conv-BN, plus the shortcut, then ReLU. Where the
    shape changes, the shortcut is a 1x1 convolution and BN (the paper's option B), as in
    RepDistiller; the paper's own CIFAR nets padded the identity with zeros (option A), which
    is why its counts are 2,752 parameters lower for widths [16, 16, 32, 64]."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = _conv3x3(c_out, c_out)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(c_out),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016, section 4.2): a 3x3 stem of widths[0] channels, three
    stages of n basic blocks of widths[1..3] channels at strides 1, 2, 2 (depth = 6n + 2), global
    average pooling and a linear classifier. widths [16, 16, 32, 64] are the paper's
    resnet20/32/56/110; [32, 64, 128, 256] are CRD's resnet8x4 and resnet32x4."""

    def __init__(self, in_channels: int, num_classes: int, depth: int, widths: list[int]) -> None:
        super().__init__()
        n = _blocks_per_stage("cifar_resnet", depth)
        if len(widths) != 4:
            raise UserError(f"model.widths={widths} must be 4 widths: the stem's and 3 stages'")
        layers: list[nn.Module] = [
            _conv3x3(in_channels, widths[0]),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        ]
        c = widths[0]
        for width, stride in zip(widths[1:], (1, 2, 2), strict=True):
            for i in range(n):
                layers.append(BasicBlock(c, width, stride if i == 0 else 1))
                c = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(c, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class WideBlock(nn.Module):
    """The wide ResNet block: BN-ReLU-conv3x3, BN-ReLU, dropout, conv3x3, plus the shortcut.
    Where the channels change, the shortcut is a 1x1 convolution of the input after its BN-ReLU
    (as in Zagoruyko & Komodakis' code and RepDistiller), else the input itself."""

    def __init__(self, c_in: int, c_out: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = _conv3x3(c_in, c_out, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _conv3x3(c_out, c_out)
        self.project: nn.Conv2d | None = None
        if stride != 1 or c_in != c_out:
            self.project = nn.Conv2d(c_in, c_out, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = torch.relu(self.bn1(x))
        out = self.dropout(torch.relu(self.bn2(self.conv1(a))))
        out = self.conv2(out)
        return out + (x if self.project is None else self.project(a))


class WideResNet(nn.Module):
    """WRN-depth-widen of Zagoruyko & Komodakis (2016): a 3x3 stem of 16 channels, three stages
    of n pre-activation blocks of 16k, 32k, 64k channels at strides 1, 2, 2 (depth = 6n + 4),
    a final BN-ReLU, global average pooling and a linear classifier."""

    def __init__(
        self, in_channels: int, num_classes: int, depth: int, widen: int, dropout: float = 0.0
    ) -> None:
        super().__init__()
        n = _blocks_per_stage("wrn", depth)
        if widen < 1:
            raise UserError(f"model.widen={widen} must be an integer >= 1")
        layers: list[nn.Module] = [_conv3x3(in_channels, 16)]
        c = 16
        for width, stride in zip((16 * widen, 32 * widen, 64 * widen), (1, 2, 2), strict=True):
            for i in range(n):
                layers.append(WideBlock(c, width, stride if i == 0 else 1, dropout))
                c = width
        layers += [nn.BatchNorm2d(c), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(c, num_classes)
        _init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


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
    "cifar_resnet": lambda cfg, shape, classes: CifarResNet(
        shape[0], classes, cfg["depth"], list(cfg["widths"])
    ),
    "wrn": lambda cfg, shape, classes: WideResNet(
        shape[0], classes, cfg["depth"], cfg["widen"], cfg.get("dropout", 0.0)
    ),
}
IMAGE_MODELS = ("cnn", "resnet18", "cifar_resnet", "wrn")
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
    from distillrun.runs.artifacts import load_tensors

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
