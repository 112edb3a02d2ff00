"""Augmentations, one module for every stage (`augment=` in conf/augment/).

The finite ones enumerate their views, so that view v of an example is the same tensor on
every call, device and run, and a teacher's output on each view can be computed once and
cached exactly (teacher_outputs.py, the view cache):

- shift:     integer translations by up to k pixels in y and x, (2k+1)^2 views; the border
             is filled as `augment.border` says (replicate: the edge pixel, the background of
             digits).
- crop_flip: the CIFAR recipe: crops of the image padded by p pixels (zeros: black),
             optionally mirrored: (2p+1)^2 * 2 views.

View v = (mirrored * side + dy) * side + dx, where side = 2k+1 and (dy, dx) is the crop's
top-left corner in the padded image (k, k: the image itself).

mixup (Zhang et al. 2018) is continuous: each batch is mixed with a shuffled copy of itself,
x = w x + (1 - w) x[partner] with w ~ Beta(alpha, alpha), so a teacher must score the mixed
images as they come (teacher_outputs=online).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F

from distillrun.choices import AUGMENTATIONS, one_of
from distillrun.errors import UserError

# augment.border -> (torch's padding mode, pad with the value of a black pixel)
BORDERS = {"replicate": "replicate", "reflect": "reflect", "zeros": "constant"}


@dataclass
class Batch:
    """One training batch: which examples, what the model sees, and how it was augmented."""

    idx: torch.Tensor  # the examples' indices into the training inputs
    x: torch.Tensor  # the model's input: the examples, augmented
    view: torch.Tensor | None = None  # finite augmentations: each example's view (see Views)
    partner: torch.Tensor | None = None  # mixup: the example each example was mixed with
    weight: float = 1.0  # mixup: the weight of each example itself
    epoch: int = 0  # the epoch it trains in, from 1 (set by the training loop; DKD's warm-up)

    def labels(self, y: torch.Tensor, num_classes: int) -> torch.Tensor:
        """The batch's hard targets: class ids, or under mixup the mixed one-hot
        distributions (which `F.cross_entropy` takes as well)."""
        if self.partner is None:
            return y[self.idx]
        one_hot = F.one_hot(y[self.idx], num_classes).float()
        return self.weight * one_hot + (1 - self.weight) * F.one_hot(y[self.partner], num_classes)

    def part(self, share: slice) -> Batch:
        """The examples of `share`: a data-parallel process's part of the batch."""
        view = None if self.view is None else self.view[share]
        partner = None if self.partner is None else self.partner[share]
        return replace(self, idx=self.idx[share], x=self.x[share], view=view, partner=partner)


@dataclass(frozen=True)
class Views:
    """A finite augmentation of images [N, C, H, W]: translations by up to `pixels`,
    optionally mirrored. `fill`: the value of a black pixel per channel, for border=zeros."""

    pixels: int
    flip: bool
    border: str
    fill: tuple[float, ...] = ()

    @property
    def side(self) -> int:
        return 2 * self.pixels + 1

    @property
    def count(self) -> int:
        return self.side * self.side * (2 if self.flip else 1)

    def describe(self) -> str:
        what = f"shifts of up to {self.pixels} px ({self.border} border)"
        return what + (", mirrored or not" if self.flip else "") + f": {self.count} views"

    def sample(self, n: int, generator: torch.Generator) -> torch.Tensor:
        """A view for each of n examples, uniformly. (Shifts alone draw the two offsets as
        the former `teachers.jitter` did, so its runs repeat exactly as augment=shift.)"""
        offsets = torch.randint(0, self.side, (2, n), generator=generator)
        view = offsets[0] * self.side + offsets[1]
        if self.flip:
            view += torch.randint(0, 2, (n,), generator=generator) * self.side * self.side
        return view

    def apply(self, x: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
        """Each image of `x` [N, C, H, W] in its view (`view` [N] of ints)."""
        n, channels, h, w = x.shape
        k, side = self.pixels, self.side
        view = view.to(x.device)
        if self.border == "zeros":
            fill = torch.tensor(self.fill or (0.0,) * channels, dtype=x.dtype, device=x.device)
            padded = x.new_empty(n, channels, h + 2 * k, w + 2 * k)
            padded[:] = fill[:, None, None]
            padded[:, :, k : k + h, k : k + w] = x
        else:
            padded = F.pad(x, (k, k, k, k), mode=BORDERS[self.border])
        dy, dx = (view // side) % side, view % side
        rows = dy[:, None] + torch.arange(h, device=x.device)  # [N, H]
        cols = dx[:, None] + torch.arange(w, device=x.device)  # [N, W]
        if self.flip:
            mirrored = (view >= side * side)[:, None]
            cols = torch.where(mirrored, cols.flip(1), cols)
        batch = torch.arange(n, device=x.device)[:, None, None]
        # Advanced indices around a slice put their dimensions first: [N, H, W, C].
        return padded[batch, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)

    def batch(self, x: torch.Tensor, idx: torch.Tensor, generator: torch.Generator) -> Batch:
        view = self.sample(len(idx), generator).to(idx.device)
        return Batch(idx, self.apply(x[idx], view), view=view)


@dataclass(frozen=True)
class SubsetViews:
    """`per_example` of the views of each example, drawn once with their own seed (FKD's
    approach, when caching every view costs too much): `table` [N, per_example] holds each
    example's view ids. A batch's `view` is a position in its example's row, which is what the
    view cache is indexed by."""

    views: Views
    table: torch.Tensor

    @property
    def count(self) -> int:
        return self.table.shape[1]

    def describe(self) -> str:
        return f"{self.count} of the {self.views.describe()} per example"

    def batch(self, x: torch.Tensor, idx: torch.Tensor, generator: torch.Generator) -> Batch:
        slot = torch.randint(0, self.count, (len(idx),), generator=generator).to(idx.device)
        view = self.table[idx, slot]
        return Batch(idx, self.views.apply(x[idx], view), view=slot)


def subset(
    views: Views, n: int, per_example: int, seed: int, device: torch.device | str = "cpu"
) -> SubsetViews:
    """`per_example` distinct views of each of n examples, the same for the same seed."""
    g = torch.Generator().manual_seed(seed)
    order = torch.rand(n, views.count, generator=g).argsort(dim=1)
    return SubsetViews(views, order[:, :per_example].sort(dim=1).values.to(device))


@dataclass(frozen=True)
class Mixup:
    """mixup: each batch mixed with a permutation of itself, one Beta(alpha, alpha) weight."""

    alpha: float
    count = None  # continuous: no views to enumerate

    def describe(self) -> str:
        return f"mixup (alpha {self.alpha:g})"

    def batch(self, x: torch.Tensor, idx: torch.Tensor, generator: torch.Generator) -> Batch:
        # Beta by inversion of a uniform from the run's own generator, so a resumed run draws
        # exactly what an uninterrupted one would.
        from scipy.special import betaincinv  # scikit-learn's dependency; imported when used

        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        weight = float(betaincinv(self.alpha, self.alpha, u))
        partner = idx[torch.randperm(len(idx), generator=generator).to(idx.device)]
        mixed = weight * x[idx] + (1 - weight) * x[partner]
        return Batch(idx, mixed, partner=partner, weight=weight)


Augmentation = Views | SubsetViews | Mixup


def _mixup(cfg: Any, image_shape: tuple[int, ...] | None, normalization: dict) -> Mixup:
    return Mixup(float(cfg["alpha"]))


def _views(cfg: Any, image_shape: tuple[int, ...] | None, normalization: dict) -> Views:
    """shift and crop_flip: the finite views of an image (crop_flip adds mirrored ones)."""
    name = cfg["name"]
    if image_shape is None:
        raise UserError(
            f"augment={name} moves pixels, but this dataset holds vectors: use augment=none "
            "(or augment=mixup, which mixes vectors as well)"
        )
    pixels = int(cfg["pixels"] if name == "shift" else cfg["padding"])
    border = str(cfg["border"])
    if border == "reflect" and pixels >= min(image_shape[1:]):
        raise UserError(
            f"augment.border=reflect needs fewer shift pixels ({pixels}) than the image's "
            f"side ({min(image_shape[1:])}): use border=replicate or fewer pixels"
        )
    fill: tuple[float, ...] = ()
    if normalization.get("normalize") == "standardize":  # black, once standardised
        mean, std = normalization["mean"], normalization["std"]
        fill = tuple(-m / s for m, s in zip(mean, std, strict=True))
    return Views(pixels, bool(cfg.get("flip", False)), border, fill)


# augment.name -> its builder (none builds nothing); choices.AUGMENTATIONS names the same keys.
BUILDERS = {"none": None, "shift": _views, "crop_flip": _views, "mixup": _mixup}


def from_config(cfg: Any, image_shape: tuple[int, ...] | None, normalization: dict) -> Any:
    """The augmentation an `augment` config names (None for none), for data of this shape
    (None: vectors) and normalisation (for a black border of standardised images)."""
    name = cfg["name"]
    if name not in AUGMENTATIONS:
        raise UserError(f"unknown augment '{name}': use {one_of(AUGMENTATIONS)}")
    build = BUILDERS[name]
    return None if build is None else build(cfg, image_shape, normalization)
