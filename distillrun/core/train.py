"""The training loop, shared by every stage.

Data lives on the device as tensors; a batch is an index slice of a random permutation, never a
per-sample DataLoader. The loss is a function of (logits, batch), where the batch (augment.Batch)
holds the examples' indices, the augmented inputs, the views drawn and the epoch: so the same
loop trains teachers on labels and students on teacher outputs looked up by example and view,
or computed on the batch's inputs.

With a `state_path`, `fit` writes a resumable checkpoint (model, optimiser, scheduler,
best-so-far state, history and every random-number state) at the end of an epoch, at most every
`checkpoint_every` seconds, and, resuming, continues from it: the resumed run reaches exactly
the numbers of an uninterrupted one on the CPU, from whichever epoch was saved.
"""

from __future__ import annotations

import copy
import itertools
import math
import os
import random
import shutil
import signal
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from distillrun.choices import PRECISIONS, fp16_refusal, one_of
from distillrun.core import distributed
from distillrun.core.models import apply_max_norm
from distillrun.errors import STOP_SIGNALS, Terminated, UserError, raise_terminated
from distillrun.method.augment import Augmentation, Batch
from distillrun.method.metrics import classification_metrics
from distillrun.runs import artifacts

LossFn = Callable[[torch.Tensor, Batch], torch.Tensor]


def make_deterministic(compile: bool = True) -> dict[str, Any]:
    """The torch settings that make a run repeatable; returned for the manifest.

    On the CPU, the same seed, thread count and library versions give identical numbers. On
    CUDA, deterministic algorithms (cuBLAS needs its workspace setting) remove most of the
    run-to-run noise; ops without a deterministic kernel only warn. Without `compile` the
    switch skips torch.compile's own flag, whose import (torch._inductor) takes seconds.
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_flag = getattr(torch._C, "_set_deterministic_algorithms", None)
    if compile or set_flag is None:
        torch.use_deterministic_algorithms(True, warn_only=True)
    else:
        set_flag(True, warn_only=True)  # what the call above does, less the inductor flag
    torch.backends.cudnn.benchmark = False
    return {
        "deterministic_algorithms": True,
        "cudnn_benchmark": False,
        "torch_threads": torch.get_num_threads(),
    }


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device={name} but CUDA is not available here: use device=auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"device={name} but MPS is not available here: use device=auto or cpu")
    return device


# optim.name -> the optimiser, optim.schedule -> the learning-rate schedule (the names are
# choices.OPTIMIZERS and choices.SCHEDULES).
OPTIMIZERS: dict[str, Callable[[Any, Mapping[str, Any]], torch.optim.Optimizer]] = {
    "adam": lambda params, cfg: torch.optim.Adam(
        params, lr=cfg["lr"], betas=tuple(cfg["betas"]), weight_decay=cfg["weight_decay"]
    ),
    "sgd": lambda params, cfg: torch.optim.SGD(
        params,
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        nesterov=cfg["nesterov"],
        weight_decay=cfg["weight_decay"],
    ),
}
Schedule = Callable[[torch.optim.Optimizer, Mapping[str, Any], int], Any]
SCHEDULES: dict[str, Schedule] = {
    "cosine": lambda opt, cfg, epochs: torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs),
    "step": lambda opt, cfg, epochs: torch.optim.lr_scheduler.StepLR(
        opt, cfg["step_size"], cfg["gamma"]
    ),
    "constant": lambda opt, cfg, epochs: torch.optim.lr_scheduler.ConstantLR(
        opt, factor=1.0, total_iters=0
    ),
    "multistep": lambda opt, cfg, epochs: torch.optim.lr_scheduler.MultiStepLR(
        opt, list(cfg["milestones"]), cfg["gamma"]
    ),
}


def make_optimizer(
    params: Any, cfg: Mapping[str, Any], epochs: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    """The optimiser and schedule an `optim` config names (conf/optim/*.yaml)."""
    for key, table in (("name", OPTIMIZERS), ("schedule", SCHEDULES)):
        if cfg[key] not in table:
            raise UserError(f"unknown optim.{key} '{cfg[key]}': use {one_of(tuple(table))}")
    opt = OPTIMIZERS[cfg["name"]](params, cfg)
    return opt, SCHEDULES[cfg["schedule"]](opt, cfg, epochs)


# train.precision -> the dtype the forward passes autocast to (None: float32 throughout).
AUTOCAST: dict[str, torch.dtype | None] = {
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}


def check_speed_settings(device: torch.device, precision: str, compile: bool) -> None:
    """Refuse, in one line, a precision or compilation this device cannot run (stages call it
    once the device is known, before anything is trained)."""
    if precision == "fp16" and device.type != "cuda":
        raise UserError(fp16_refusal(str(device)))
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UserError(
            f"train.precision=bf16 but {torch.cuda.get_device_name(device)} has no bfloat16: "
            "use train.precision=fp16 or fp32"
        )
    if compile and device.type == "cpu":
        compilers = (os.environ.get("CXX", "g++"), "c++", "clang++")
        if not any(shutil.which(c) for c in compilers if c):
            raise UserError(
                "train.compile=true on the CPU needs a C++ compiler (g++ or clang++), and none "
                "is on PATH: install one, or use train.compile=false"
            )


def autocast(device: torch.device, precision: str) -> AbstractContextManager:
    """The forward passes' precision: torch.autocast to bf16 or fp16, or float32 as it is."""
    if precision not in AUTOCAST:
        raise UserError(f"unknown train.precision '{precision}': use {one_of(PRECISIONS)}")
    dtype = AUTOCAST[precision]
    if dtype is None:
        return nullcontext()
    if dtype == torch.float16 and device.type != "cuda":
        raise UserError(fp16_refusal(str(device)))
    return torch.autocast(device.type, dtype=dtype)


@torch.inference_mode()
def predict(
    model: nn.Module, x: torch.Tensor, batch_size: int = 1024, precision: str = "fp32"
) -> torch.Tensor:
    """Logits of `model` in eval mode, batch by batch (float32, whatever the precision)."""
    was_training = model.training
    model.eval()
    with autocast(x.device, precision):
        out = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    return out.float()


def batch_bounds(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, stop) of each batch of an epoch. A last batch of a single example is folded
    into the one before it: BatchNorm cannot train on one example. (Under torchrun the same:
    distributed.deal gives no process a single example of a batch of two or more.)"""
    starts = list(range(0, n, batch_size))
    if len(starts) > 1 and n - starts[-1] < 2:
        starts.pop()
    return list(zip(starts, [*starts[1:], n], strict=True))


@dataclass(frozen=True)
class TrainSettings:
    """How `fit` trains a model. Stages build it from their config (`train.*`, `optim`,
    `model.max_norm`) with `stages.common.train_settings`; a new training option goes here."""

    optim: Mapping[str, Any]  # an optim config: name, lr, schedule, ... (conf/optim/*.yaml)
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 1024
    seed: int = 0  # batch order, views and anything else random in the loop
    max_norm: float | None = None  # per-unit weight norm bound after every step
    augment: Augmentation | None = None  # each batch's augmentation (augment.py), drawn anew
    precision: str = "fp32"  # the forward passes: fp32, or autocast to bf16 or fp16
    channels_last: bool = False  # images in NHWC memory order (faster convolutions on GPUs)
    compile: bool = False  # torch.compile the model for training
    # A resumable checkpoint at most every this many seconds (0: after every epoch), and always
    # after the last epoch and when SIGTERM or SIGHUP stops a run.
    checkpoint_every: float = 60.0
    # At most this many batches an epoch (None: every batch): smoke runs (debug=tiny) on big data.
    max_batches_per_epoch: int | None = None


@dataclass
class Fit:
    """What a training run ended with: the model at its selected epoch and the history."""

    model: nn.Module
    best_epoch: int
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    diverged: str | None = None  # why training looks diverged, or None


# --- resumable checkpoints ---------------------------------------------------------------------
# Plain containers and tensors only, so they load with weights_only=True; random-number states
# are stored as tensors for the same reason.

RESUME_FORMAT = "distillrun-resume-1"


def rng_state(generator: torch.Generator, device: torch.device) -> dict[str, Any]:
    """Every random-number state training consumes: torch (CPU, CUDA), numpy, python, and the
    batch generator."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    state: dict[str, Any] = {
        "generator": generator.get_state(),
        "torch": torch.get_rng_state(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": {
            "version": py_state[0],
            "state": torch.tensor(py_state[1], dtype=torch.int64),
            "gauss_next": py_state[2],
        },
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Progress:
    """What the loop carries from epoch to epoch besides the model and optimiser."""

    epoch: int = 0
    best: tuple[float, float] = (math.inf, math.inf)
    best_state: dict[str, torch.Tensor] | None = None
    best_epoch: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0
    initial_loss: float = math.nan  # the loss of the first batch, before any step


def _save_state(
    path: Path,
    progress: _Progress,
    epochs: int,
    model: nn.Module,
    opt: torch.optim.Optimizer | None,
    sched: torch.optim.lr_scheduler.LRScheduler | None,
    generator: torch.Generator,
    device: torch.device,
    scaler: torch.amp.GradScaler | None = None,
) -> None:
    """A resumable checkpoint; without `opt` it is the small final form: the selected model."""
    artifacts.save_tensors(
        path,
        {
            "format": RESUME_FORMAT,
            "finished": opt is None,
            "epoch": progress.epoch,
            "epochs": epochs,
            "model": model.state_dict(),
            "optimizer": None if opt is None else opt.state_dict(),
            "scheduler": None if sched is None else sched.state_dict(),
            "scaler": None if opt is None or scaler is None else scaler.state_dict(),
            "best": list(progress.best),
            "best_state": None if opt is None else progress.best_state,
            "best_epoch": progress.best_epoch,
            "history": progress.history,
            "seconds": progress.seconds,
            "initial_loss": progress.initial_loss,
            "rng": rng_state(generator, device),
        },
    )


def _load_state(
    path: Path,
    epochs: int,
    model: nn.Module,
    opt: torch.optim.Optimizer,
    sched: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[_Progress, bool]:
    """Restore a resumable checkpoint into model, optimiser, scheduler, gradient scaler and
    random states."""
    ckpt = artifacts.load_tensors(path)
    try:
        if ckpt.get("format") != RESUME_FORMAT or ckpt["epochs"] != epochs:
            raise ValueError(f"written for {ckpt.get('epochs')} epochs, not {epochs}")
        model.load_state_dict(ckpt["model"])
        if not ckpt["finished"]:
            opt.load_state_dict(ckpt["optimizer"])
            sched.load_state_dict(ckpt["scheduler"])
            if scaler is not None and ckpt.get("scaler"):
                scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], generator)
        progress = _Progress(
            epoch=int(ckpt["epoch"]),
            best=(float(ckpt["best"][0]), float(ckpt["best"][1])),
            best_state=ckpt["best_state"],
            best_epoch=int(ckpt["best_epoch"]),
            history=list(ckpt["history"]),
            seconds=float(ckpt["seconds"]),
            initial_loss=float(ckpt.get("initial_loss", math.nan)),
        )
    except (AttributeError, KeyError, TypeError, ValueError, IndexError, RuntimeError) as e:
        reason = " ".join(str(e).split())[:120] or type(e).__name__
        if "state_dict" in reason:
            reason = "its weights are of another architecture or class count"
        raise UserError(
            f"resumable checkpoint {path} does not fit this model or run ({reason}): delete it "
            "to train this model again from its start, then resume"
        ) from e
    return progress, bool(ckpt["finished"])


def divergence(history: list[dict[str, Any]], initial_loss: float, chance: float) -> str | None:
    """Why a finished training run looks diverged, or None: its training loss ended far above
    the first batch's, or its validation accuracy never left chance (`chance`: the share of
    the most common validation label) while the loss did not fall."""
    if not history:
        return None
    final = history[-1]["train_loss"]
    if final > 10 * initial_loss:
        return f"the training loss ended at {final:.3g}, up from {initial_loss:.3g} at the start"
    best = max((r["val_accuracy"] for r in history if "val_accuracy" in r), default=None)
    if best is not None and best <= chance + 0.02 and final >= 0.9 * initial_loss:
        return (
            f"the validation accuracy stayed at chance ({best:.3f}; always answering the most "
            f"common class gives {chance:.3f}) and the training loss did not fall"
        )
    return None


@contextmanager
def _sigterm_at_epoch_end(enabled: bool) -> Iterator[list[int]]:
    """In a stage (where SIGTERM and SIGHUP already stop the run cleanly), either signal during
    training lets the epoch in progress finish, so that its checkpoint is written before the
    run stops; a second one stops at once. Yields a list that holds the signal once one came."""
    requested: list[int] = []

    def defer(signum: int, frame: Any) -> None:
        if requested:
            raise_terminated(signum, frame)
        requested.append(signum)

    deferred = [s for s in STOP_SIGNALS if signal.getsignal(s) is raise_terminated]
    if not enabled or not deferred:
        yield requested
        return
    for signum in deferred:
        signal.signal(signum, defer)
    try:
        yield requested
    finally:
        for signum in deferred:
            signal.signal(signum, raise_terminated)


def fit(
    model: nn.Module,
    x: torch.Tensor,
    loss_fn: LossFn,
    settings: TrainSettings,
    *,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    on_epoch: Callable[[dict[str, Any]], None] = lambda record: None,
    on_batch: Callable[[], None] = lambda: None,
    state_path: Path | None = None,
    resume: bool = False,
    on_resume: Callable[[list[dict[str, Any]]], None] = lambda history: None,
    batches: Callable[[torch.Generator], Iterable[torch.Tensor]] | None = None,
    val_view: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Fit:
    """Train `model` on the examples `x` with `loss_fn(logits, batch)` (an augment.Batch).

    After each epoch the model is scored on the validation split; the epoch with the fewest
    validation errors (then the lowest validation NLL) is kept. With no validation split the
    last epoch is kept. The test set is never looked at here.

    With `state_path` it writes resumable checkpoints there (above), replaced by the selected
    model once training ends; with `resume` it continues from one (`on_resume` gets the history
    so far). `batches` draws each epoch's index batches (specialists: half-and-half) instead of
    a shuffled pass over `x`; `val_view` maps validation logits to the labels of `y_val`.
    """
    s, device = settings, x.device
    amp = autocast(device, s.precision)  # refuses fp16 off CUDA before anything is trained
    model = _in_memory_format(model, x, s.channels_last)
    generator = torch.Generator().manual_seed(s.seed)
    opt, sched = make_optimizer(model.parameters(), s.optim, s.epochs)
    scaler = torch.amp.GradScaler(device.type) if s.precision == "fp16" else None
    progress = _Progress(best_epoch=s.epochs)
    if resume and state_path is not None and state_path.is_file():
        progress, finished = _load_state(state_path, s.epochs, model, opt, sched, generator, scaler)
        on_resume(progress.history)
        if finished:
            return _finish(model.eval(), progress, y_val)
    writer = state_path if distributed.is_main() else None  # process 0 writes checkpoints
    saver = _Saver(writer, progress, s.epochs, model, opt, sched, generator, device, scaler)
    step = _Step(_trainable(model, device, s.compile), model, loss_fn, opt, scaler, amp, s)
    epochs = _Epochs(x, step, generator, sched, progress, batches, on_batch, x_val, y_val, val_view)
    model.train()
    stop = False
    with _sigterm_at_epoch_end(state_path is not None) as sigterm:
        for epoch in range(progress.epoch + 1, s.epochs + 1):
            on_epoch(epochs.train(epoch, saver.saved_epoch))
            # Under torchrun all processes stop after the same epoch, whichever got SIGTERM;
            # the last epoch is saved below, in the final form.
            stop = distributed.any_process(bool(sigterm), device)
            if epoch < s.epochs and (stop or saver.due(s.checkpoint_every)):
                saver.save(epoch)
            if stop and epoch < s.epochs:
                raise Terminated(sigterm[0] if sigterm else signal.SIGTERM)
    _keep_best(model, progress)
    saver.save_final()
    if stop:  # it came during the last epoch: this model is saved, the run stops here
        raise Terminated(sigterm[0] if sigterm else signal.SIGTERM)
    return _finish(model, progress, y_val)


def _in_memory_format(model: nn.Module, x: torch.Tensor, channels_last: bool) -> nn.Module:
    """The model in channels-last memory order when asked (images only)."""
    if not channels_last:
        return model
    if x.dim() != 4:
        raise UserError(
            "train.channels_last=true orders images' memory, but this data holds vectors: "
            "use train.channels_last=false"
        )
    return model.to(memory_format=torch.channels_last)


def _trainable(model: nn.Module, device: torch.device, compile: bool) -> nn.Module:
    """What trains: the model, its DDP wrapper under torchrun, compiled when asked."""
    net = distributed.wrap(model, device)  # the model itself, without torchrun
    return torch.compile(net) if compile else net


def _keep_best(model: nn.Module, progress: _Progress) -> None:
    """The model at its selected epoch, in eval mode."""
    if progress.best_state is not None:
        model.load_state_dict(progress.best_state)
    model.eval()


@dataclass
class _Epochs:
    """One epoch after another of a training run: the batches, the steps, the schedule and
    the validation, each epoch recorded in `progress`."""

    x: torch.Tensor
    step: _Step
    generator: torch.Generator
    sched: torch.optim.lr_scheduler.LRScheduler
    progress: _Progress
    batches: Callable[[torch.Generator], Iterable[torch.Tensor]] | None
    on_batch: Callable[[], None]
    x_val: torch.Tensor
    y_val: torch.Tensor
    val_view: Callable[[torch.Tensor], torch.Tensor] | None

    def train(self, epoch: int, saved_epoch: int) -> dict[str, Any]:
        """Train epoch `epoch`; its record (`saved_epoch`: the last checkpoint, for errors)."""
        s, progress = self.step.settings, self.progress
        t0 = time.perf_counter()
        epoch_batches = self.epoch_batches(epoch)
        lr = self.step.opt.param_groups[0]["lr"]
        train_loss = _train_epoch(
            self.x, self.step, s, epoch, epoch_batches, self.generator, progress, self.on_batch
        )
        self.sched.step()
        if not math.isfinite(train_loss):
            kept = f" (the checkpoint of epoch {saved_epoch} is kept)" if saved_epoch else ""
            raise UserError(
                f"the training loss became {train_loss} in epoch {epoch}{kept}: lower "
                "optim.lr (or raise the temperature T, if distilling) and run again"
            )
        record: dict[str, Any] = {"epoch": epoch, "train_loss": train_loss, "lr": lr}
        if len(self.y_val):
            record.update(self.validate(epoch))
        record["seconds"] = time.perf_counter() - t0
        progress.epoch = epoch
        progress.history.append(record)
        progress.seconds += record["seconds"]
        return record

    def epoch_batches(self, epoch: int) -> Iterable[torch.Tensor]:
        """This epoch's index batches: a shuffled pass over `x`, or `batches`' draw."""
        s = self.step.settings
        if distributed.active():
            # Each process's dropout masks: its own, and (seeded at every epoch from the seed,
            # epoch and process) the same again when a run resumes.
            torch.manual_seed(distributed.process_seed(s.seed, epoch))
        if self.batches is not None:
            drawn = self.batches(self.generator)
        else:
            perm = torch.randperm(len(self.x), generator=self.generator).to(self.x.device)
            drawn = (perm[start:stop] for start, stop in batch_bounds(len(self.x), s.batch_size))
        # Without a limit the batches are untouched: the same draws as ever.
        return (
            drawn
            if s.max_batches_per_epoch is None
            else itertools.islice(drawn, s.max_batches_per_epoch)
        )

    def validate(self, epoch: int) -> dict[str, Any]:
        """The epoch's validation metrics; the weights are kept when they are the best yet."""
        model, s, progress = self.step.model, self.step.settings, self.progress
        distributed.sync_buffers(model)  # every process scores process 0's model
        val_logits = predict(model, self.x_val, s.eval_batch_size, s.precision)
        if self.val_view is not None:
            val_logits = self.val_view(val_logits)
        metrics = classification_metrics(val_logits, self.y_val, "val")
        key = (metrics["val_errors"], metrics["val_nll"])
        if key < progress.best:
            progress.best, progress.best_epoch = key, epoch
            progress.best_state = copy.deepcopy(model.state_dict())
        return metrics


@dataclass
class _Saver:
    """The resumable checkpoints of a training run in progress: when one is due, and writing
    one (`saved_epoch`: the epoch of the last one)."""

    path: Path | None
    progress: _Progress
    epochs: int
    model: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    generator: torch.Generator
    device: torch.device
    scaler: torch.amp.GradScaler | None
    saved_epoch: int = 0
    saved_at: float = field(default_factory=time.monotonic)

    def __post_init__(self) -> None:
        self.saved_epoch = self.progress.epoch  # resumed: the checkpoint it resumed from

    def due(self, every: float) -> bool:
        return time.monotonic() - self.saved_at >= every

    def save(self, epoch: int) -> None:
        if self.path is None:
            return
        _save_state(
            self.path,
            self.progress,
            self.epochs,
            self.model,
            self.opt,
            self.sched,
            self.generator,
            self.device,
            self.scaler,
        )
        self.saved_epoch, self.saved_at = epoch, time.monotonic()

    def save_final(self) -> None:
        """The small final form: the selected model alone, nothing to resume."""
        if self.path is not None:
            _save_state(
                self.path,
                self.progress,
                self.epochs,
                self.model,
                None,
                None,
                self.generator,
                self.device,
            )


@dataclass
class _Step:
    """One optimisation step on a batch: the forward pass in the run's precision, on this
    process's share of the batch under torchrun, with the gradient scaler for fp16."""

    net: nn.Module  # what trains: the model, or its DDP wrapper or compiled form
    model: nn.Module  # the model itself
    loss_fn: LossFn
    opt: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp: AbstractContextManager
    settings: TrainSettings

    def __call__(self, batch: Batch) -> tuple[torch.Tensor, int]:
        """The summed loss of this process's examples, and how many there were."""
        share = batch.part(distributed.shard(len(batch.idx)))
        n = len(share.idx)
        x = share.x
        if self.settings.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.amp:
            out = self.net(x).float()
            # A share without examples (the last batch under torchrun) has no mean loss; its
            # forward pass on zero rows gives DDP the zero gradients it must average.
            loss = self.loss_fn(out, share) if n else out.sum()
        # DDP averages the processes' gradients: weighting each process's mean loss by its
        # share of the batch makes that average the gradient of the whole batch's mean loss.
        if distributed.active():
            weighted = loss * (n * distributed.world_size() / len(batch.idx))
        else:
            weighted = loss
        self.opt.zero_grad(set_to_none=True)
        if self.scaler is None:
            weighted.backward()
            self.opt.step()
        else:
            self.scaler.scale(weighted).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        if self.settings.max_norm:
            apply_max_norm(self.model, self.settings.max_norm)
        return loss.detach() * n, n


def _train_epoch(
    x: torch.Tensor,
    step: _Step,
    s: TrainSettings,
    epoch: int,
    epoch_batches: Iterable[torch.Tensor],
    generator: torch.Generator,
    progress: _Progress,
    on_batch: Callable[[], None],
) -> float:
    """One pass over the epoch's batches; the mean training loss (one device sync, which also
    lets the caller catch NaN and inf). Under torchrun every process draws the whole batch and
    its views from the same generator, then trains on its share."""
    total = torch.zeros(2, device=x.device)  # summed loss and examples: no sync per batch
    for idx in epoch_batches:
        batch = Batch(idx, x[idx]) if s.augment is None else s.augment.batch(x, idx, generator)
        loss_sum, n = step(replace(batch, epoch=epoch))
        counted = torch.stack([loss_sum, loss_sum.new_tensor(float(n))])
        if math.isnan(progress.initial_loss):  # the first batch's loss, once per run
            first = distributed.all_sum(counted.clone())
            progress.initial_loss = float(first[0] / first[1])
        total += counted
        on_batch()
    loss, seen = distributed.all_sum(total).tolist()
    return loss / seen


def _finish(model: nn.Module, progress: _Progress, y_val: torch.Tensor) -> Fit:
    chance = float(torch.bincount(y_val).max()) / len(y_val) if len(y_val) else 0.0
    return Fit(
        model,
        progress.best_epoch,
        progress.history,
        progress.seconds,
        divergence(progress.history, progress.initial_loss, chance),
    )
