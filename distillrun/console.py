"""Terminal output: rich progress bars while training, rich tables for results.

Progress bars only draw on a terminal (`progress=auto`), so CI logs get the result lines and
tables, not thousands of refreshes. Output that can no longer be written (`| head` left, the
terminal closed) is dropped: it never stops a run (`output_may_close`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from distillrun.core import distributed

# Logs and pipes get 120 columns, so the result tables do not wrap at rich's default of 80.
console = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
err_console = Console(stderr=True, highlight=False)


# A write fails with these once nobody reads: the pipe's reader left (EPIPE), the terminal
# hung up (EIO).
OUTPUT_GONE = {errno.EPIPE, errno.EIO}


class _DropsWhenClosed:
    """sys.stdout or sys.stderr, whose writes go to /dev/null from the first one that finds
    the reader gone, instead of raising BrokenPipeError in the middle of training."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.gone = False

    def write(self, text: str) -> int:
        self._guarded(self.stream.write, text)
        return len(text)

    def flush(self) -> None:
        self._guarded(self.stream.flush)

    def _guarded(self, method: Any, *args: Any) -> None:
        if self.gone:
            return
        try:
            method(*args)
        except OSError as e:
            if e.errno not in OUTPUT_GONE:
                raise
            self._to_devnull()

    def _to_devnull(self) -> None:
        """Point the stream's file descriptor at /dev/null: what is still buffered, and every
        other writer of it (logging handlers, rich), then write into nothing."""
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self.stream.fileno())
            os.close(devnull)
            self.stream.flush()
        except (OSError, ValueError):  # no descriptor of its own: drop at this level
            self.gone = True

    def __getattr__(self, name: str) -> Any:  # isatty, fileno, encoding, ...
        return getattr(self.stream, name)


@contextlib.contextmanager
def output_may_close() -> Iterator[None]:
    """Within it, stdout and stderr may close at any moment (`distillrun ... | head -1`, a
    closed terminal): what cannot be written is dropped and the run goes on."""
    if isinstance(sys.stdout, _DropsWhenClosed):  # already (the command wraps each stage)
        yield
        return
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _DropsWhenClosed(sys.stdout), _DropsWhenClosed(sys.stderr)
    try:
        yield
    finally:
        sys.stdout.flush()  # what is buffered fails here or nowhere (at exit, unguarded)
        sys.stderr.flush()
        sys.stdout, sys.stderr = saved


def say(message: str) -> None:
    console.print(message, markup=False, soft_wrap=True)  # paths stay whole and literal


class Bars:
    """An epoch bar and a batch bar for one model's training."""

    def __init__(self, progress: Progress | None, label: str, epochs: int, batches: int) -> None:
        self.progress = progress
        if progress is not None:
            self.epoch_task = progress.add_task(f"{label} epochs", total=epochs)
            self.batch_task = progress.add_task("  batches", total=batches)

    def batch(self) -> None:
        if self.progress is not None:
            self.progress.advance(self.batch_task)

    def epoch(self, record: dict[str, Any]) -> None:
        if self.progress is not None:
            self.progress.advance(self.epoch_task)
            self.progress.reset(self.batch_task)
            if "val_accuracy" in record:
                self.progress.update(
                    self.epoch_task, description=f"val acc {record['val_accuracy']:.4f}"
                )


@contextlib.contextmanager
def training_bars(setting: Any, label: str, epochs: int, batches: int) -> Iterator[Bars]:
    show = console.is_terminal if setting in ("auto", None) else bool(setting)
    if not show:
        yield Bars(None, label, epochs, batches)
        return
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
    with progress:
        yield Bars(progress, label, epochs, batches)


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def results_table(
    title: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[Any]],
    text_columns: int = 1,
    legend: str | None = None,
) -> None:
    """A table whose first `text_columns` columns are left-aligned text, the rest numbers.
    Too wide for the console, the text columns wrap first; a header wraps between its words
    but is never cut. `legend`: a line under it that spells out abbreviated headers."""
    table = Table(title=title, title_justify="left", caption=legend, caption_justify="left")
    cells = [[fmt(v) for v in row] for row in rows]
    # Each column as wide as its widest word (header or cell): headers wrap between words and
    # are never cut; text columns wrap first. Where even that does not fit (a narrow
    # terminal), text stays whole and rich shrinks the other columns as it can.
    widths = [
        max([len(w) for w in col.split()] + [len(w) for r in cells for w in r[i : i + 1]])
        for i, col in enumerate(columns)
    ]
    widths = [min(w, 16) if i < text_columns else w for i, w in enumerate(widths)]
    fits = sum(widths) + 3 * len(widths) + 1 <= console.width
    for i, (col, width) in enumerate(zip(columns, widths, strict=True)):
        if i < text_columns:
            table.add_column(col, overflow="fold", min_width=width, no_wrap=not fits)
        else:
            table.add_column(col, justify="right", width=width if fits else None)
    for row in cells:
        table.add_row(*row)
    console.print(table)


def error_line(stage: str, message: str) -> None:
    if not distributed.is_main():  # under torchrun, process 0 speaks for all
        return
    err_console.print(f"distillrun {stage}: error: {message}", markup=False, soft_wrap=True)
    sys.stderr.flush()


def warning_line(stage: str, message: str) -> None:
    if not distributed.is_main():
        return
    err_console.print(f"distillrun {stage}: warning: {message}", markup=False, soft_wrap=True)
    sys.stderr.flush()
