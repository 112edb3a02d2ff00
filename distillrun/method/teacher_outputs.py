"""The teachers' outputs on each training batch of a student: cached or online.

Both sources give the members' raw logits [M, B, C] for an augment.Batch; distill combines them
into the ensemble's targets at T the same way, whichever the source.

- CachedLogits looks them up by example (and view): train-teachers' logits.pt without
  augmentation, or the view cache with it.
- OnlineTeachers runs the member checkpoints on the batch's inputs (mixup needs it; it is the
  reference the cache is checked against).

The view cache holds every member's logits on every (transfer example, view) as fp16, or only
each view's k largest logits and one floor for the others (`top_k`: the floor keeps the total
probability of the classes left out). It is built once per teachers (keyed by their run ids
and the sha256 of their member checkpoints, never their folders: a copied teachers folder keeps
its cache, a folder that now holds other teachers does not), data, transfer set, augmentation
and precision, under a file lock, and written under a temporary name then renamed:
the parallel jobs of a sweep build it once, and a killed build leaves nothing that is read.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distillrun.errors import UserError
from distillrun.method.augment import Batch, SubsetViews, Views
from distillrun.runs import artifacts

FORMAT = "distillrun-views-1"
FOLDER = "view-cache"


class CachedLogits:
    """Teacher logits by example: `logits` [M, N, C] (no views) or [M, N, V, C]; or, top-k,
    `values` and `indices` [M, N, V, k] and `floor` [M, N, V]."""

    def __init__(self, tensors: dict[str, torch.Tensor], num_classes: int) -> None:
        self.tensors = tensors
        self.num_classes = num_classes

    def to(self, device: torch.device) -> CachedLogits:
        return CachedLogits({k: v.to(device) for k, v in self.tensors.items()}, self.num_classes)

    def member_logits(self, batch: Batch) -> torch.Tensor:
        t = self.tensors
        if "logits" in t:
            logits = t["logits"]
            if logits.dim() == 3:
                return logits[:, batch.idx].float()
            return logits[:, batch.idx, batch.view].float()
        where = (slice(None), batch.idx, batch.view)
        floor = t["floor"][where].float()  # [M, B]
        full = floor[..., None].expand(*floor.shape, self.num_classes).clone()
        return full.scatter_(-1, t["indices"][where].long(), t["values"][where].float())


class OnlineTeachers:
    """The member models, run on every batch's inputs (in eval mode, without gradients)."""

    def __init__(self, models: list[nn.Module]) -> None:
        self.models = models

    def member_logits(self, batch: Batch) -> torch.Tensor:
        with torch.no_grad():
            return torch.stack([model(batch.x) for model in self.models]).float()


def load_members(files: list[Path], device: torch.device, why: str) -> list[nn.Module]:
    """The member checkpoints, in eval mode; `why` names what needs them, for the error."""
    if not files:
        raise UserError(
            f"{why} needs the teachers' member checkpoints (member_<i>.pt), and these teachers "
            "have none (an evaluate run, imported ONNX, TorchScript or logits members, or "
            "deleted checkpoints): use augment=none, or teachers with PyTorch checkpoints"
        )
    from distillrun.core.models import load_model

    return [load_model(f, device) for f in files]


def cache_size(members: int, examples: int, views: int, classes: int, top_k: int | None) -> int:
    """Bytes of a view cache: fp16 logits, or fp16 top-k values, int16 indices, fp16 floor."""
    per_view = classes * 2 if top_k is None else top_k * 4 + 2
    return members * examples * views * per_view


def _key(sources: list[Any], fingerprint: str, transfer: torch.Tensor, what: dict) -> str:
    h = hashlib.sha256(json.dumps([FORMAT, sources, fingerprint, what], sort_keys=True).encode())
    h.update(transfer.cpu().numpy().tobytes())
    return h.hexdigest()


def _describe(augmentation: Views | SubsetViews, top_k: int | None) -> dict[str, Any]:
    if isinstance(augmentation, SubsetViews):
        what = {"views": asdict(augmentation.views), "table": _digest(augmentation.table)}
    else:
        what = {"views": asdict(augmentation)}
    return {**what, "top_k": top_k}


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.cpu().numpy().tobytes()).hexdigest()


def view_cache(
    *,
    sources: list[Any],
    member_files: list[Path],
    fingerprint: str,
    cache_dir: Path,
    x: torch.Tensor,
    transfer: torch.Tensor,
    num_classes: int,
    augmentation: Views | SubsetViews,
    top_k: int | None,
    max_mb: float,
    batch_size: int,
    device: torch.device,
    say: Callable[[str], None],
) -> tuple[CachedLogits, dict[str, Any]]:
    """The members' logits on every view of the transfer examples `x` (the rows `transfer` of
    the training split), from the cache in `cache_dir` or built there now; and what to record
    of it (path, size, whether this call built it). `sources` identifies the members in the
    cache's key: the teacher runs' ids and the hashes of `member_files`
    (artifacts.cache_identity), never paths."""
    views = augmentation.views if isinstance(augmentation, SubsetViews) else augmentation
    count = augmentation.count
    if top_k is not None and top_k >= num_classes:
        top_k = None  # every logit: nothing to leave out
    if top_k is not None and num_classes > 2**15:
        raise UserError(
            f"teacher_outputs.top_k keeps class ids as int16: {num_classes} classes "
            "are too many; use top_k=null"
        )
    members = len(member_files)
    size = cache_size(members, len(x), count, num_classes, top_k)
    key = _key(sources, fingerprint, transfer, _describe(augmentation, top_k))
    path = cache_dir / FOLDER / f"{key[:24]}.pt"
    info: dict[str, Any] = {"path": str(path), "views": count, "mb": size / 1e6}
    lock = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.parent / f".{path.stem}.lock", "a")
    except OSError:
        info["path"] = None  # a read-only teachers folder: build in memory, keep nothing
    try:
        if lock is not None:
            fcntl.flock(lock, fcntl.LOCK_EX)  # the other jobs of a sweep wait while one builds
            found = _read(path, key, (len(x), count))
            if found is not None:
                mb = size / 1e6
                say(f"  view cache: {path} ({count} views x {len(x):,} examples, {mb:.1f} MB)")
                return CachedLogits(found, num_classes), {**info, "built_by_this_run": False}
        models = load_members(member_files, device, "caching the teachers' outputs on views")
        what = f"{augmentation.describe()}" + (f", top {top_k} logits" if top_k else "")
        say(
            f"  caching {count} views x {len(x):,} examples x {members} teachers = "
            f"{count * len(x) * members:,} teacher passes, {size / 1e6:.1f} MB ({what})"
        )
        if size / 1e6 > max_mb:
            raise UserError(
                f"the view cache would take {size / 1e6:,.1f} MB, above "
                f"teacher_outputs.max_mb={max_mb:g}: cache fewer views per example "
                f"(teacher_outputs.views_per_example=m, of {views.count}), keep the largest "
                "logits only (teacher_outputs.top_k=k), raise teacher_outputs.max_mb, or score "
                "the teachers on every batch (teacher_outputs=online)"
            )
        start = time.perf_counter()
        tensors = _build(models, x, augmentation, num_classes, top_k, batch_size, device)
        seconds = time.perf_counter() - start
        say(f"  scored {count * len(x) * members:,} views in {seconds:.0f} s")
        if lock is not None:
            artifacts.save_tensors(path, {"format": FORMAT, "key": key, **tensors})
        return CachedLogits(tensors, num_classes), {
            **info,
            "built_by_this_run": lock is not None,
            "seconds": seconds,
        }
    finally:
        if lock is not None:
            lock.close()  # releases the lock


def _read(path: Path, key: str, shape: tuple[int, int]) -> dict[str, torch.Tensor] | None:
    """The cache's tensors, or None when it is missing, damaged or of other views (rebuilt)."""
    try:
        found = artifacts.load_tensors(path) if path.is_file() else None
    except UserError:
        return None
    if not isinstance(found, dict) or found.get("format") != FORMAT or found.get("key") != key:
        return None
    tensors = {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}
    first = tensors.get("logits", tensors.get("floor"))
    if first is None or tuple(first.shape[1:3]) != shape:
        return None
    return tensors


def _build(
    models: list[nn.Module],
    x: torch.Tensor,
    augmentation: Views | SubsetViews,
    num_classes: int,
    top_k: int | None,
    batch_size: int,
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """Every member's logits on every view of `x`, batch by batch, without gradients."""
    subset = augmentation.table if isinstance(augmentation, SubsetViews) else None
    views = augmentation.views if isinstance(augmentation, SubsetViews) else augmentation
    m, n, count = len(models), len(x), augmentation.count
    if top_k is None:
        out = {"logits": torch.empty(m, n, count, num_classes, dtype=torch.float16)}
    else:
        out = {
            "values": torch.empty(m, n, count, top_k, dtype=torch.float16),
            "indices": torch.empty(m, n, count, top_k, dtype=torch.int16),
            "floor": torch.empty(m, n, count, dtype=torch.float16),
        }
    with torch.no_grad():
        for start in range(0, n, batch_size):
            stop = min(n, start + batch_size)
            xb = x[start:stop].to(device)
            for slot in range(count):
                if subset is None:
                    view = torch.full((stop - start,), slot, dtype=torch.long)
                else:
                    view = subset[start:stop, slot]
                xv = views.apply(xb, view)
                for i, model in enumerate(models):
                    logits = model(xv).float().cpu()
                    _store(out, logits, i, slice(start, stop), slot, top_k)
    for name, t in out.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise UserError(
                f"a teacher's logits overflow fp16 in the view cache ({name}): its logits are "
                "beyond 65,504; use teacher_outputs=online"
            )
    return out


def _store(
    out: dict[str, torch.Tensor],
    logits: torch.Tensor,
    member: int,
    rows: slice,
    slot: int,
    top_k: int | None,
) -> None:
    if top_k is None:
        out["logits"][member, rows, slot] = logits.half()
        return
    values, indices = logits.topk(top_k, dim=1)
    rest = logits.scatter(1, indices, -math.inf)  # the classes left out
    # One logit for each class left out, keeping their total probability at T = 1.
    floor = torch.logsumexp(rest, dim=1) - math.log(logits.shape[1] - top_k)
    out["values"][member, rows, slot] = values.half()
    out["indices"][member, rows, slot] = indices.to(torch.int16)
    out["floor"][member, rows, slot] = floor.half()
