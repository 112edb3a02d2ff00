"""The exceptions that end a run in a known way: UserError (one line, exit code 2), Terminated
(interrupted) and Pruned (a search trial stopped early)."""

from __future__ import annotations

import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn


class UserError(ValueError):
    """Bad input the user can fix: the message names the problem and the fix, in one line.
    A ValueError, so library callers can catch it as one."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's preemption) or SIGHUP (the terminal closed), handled like
    Ctrl-C; exit code 128 + the signal's number (143, 129)."""

    def __init__(self, signum: int = signal.SIGTERM) -> None:
        super().__init__(int(signum))  # (args that rebuild it, should it be pickled)
        self.signum = int(signum)


# The signals that stop a run like Ctrl-C: at the end of the epoch in progress, resumable.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM or SIGHUP handler: `signal.signal(signal.SIGTERM, raise_terminated)`."""
    raise Terminated(signum)


def stop_on_signals() -> dict[int, Any]:
    """Make SIGTERM and SIGHUP raise Terminated; returns the handlers they had. A SIGHUP that
    is ignored (`nohup distillrun ...`) stays ignored: the user asked for the run to outlive
    the terminal."""
    previous = {}
    for signum in STOP_SIGNALS:
        if signum == signal.SIGHUP and signal.getsignal(signum) == signal.SIG_IGN:
            continue
        previous[signum] = signal.signal(signum, raise_terminated)
    return previous


def interrupted_exit_code(error: KeyboardInterrupt) -> int:
    """128 + the signal number: 143 for SIGTERM, 129 for SIGHUP, 130 for Ctrl-C."""
    return 128 + error.signum if isinstance(error, Terminated) else 130


def interruption(error: KeyboardInterrupt) -> str:
    """What stopped the run, in words, for its manifest."""
    if not isinstance(error, Terminated):
        return "Ctrl-C"
    return "SIGHUP: the terminal closed" if error.signum == signal.SIGHUP else "SIGTERM"


class Pruned(Exception):
    """Raised from `Run.log` when the search's pruner stops a hopeless trial; `run_stage` marks
    the run `pruned` (finished, never consumed as complete) with the metrics seen so far."""

    def __init__(self, epoch: int, metrics: dict[str, Any]) -> None:
        super().__init__(f"pruned by the search after epoch {epoch}")
        self.fields = {"pruned_at_epoch": epoch, "metrics": metrics}


def run_tool(name: str, body: Callable[[], int]) -> NoReturn:
    """A tool's command (`make reproduce`, ...): SIGTERM stops it like Ctrl-C, a UserError is one
    line and exit 2, else the body's exit code."""
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        sys.exit(body())
    except UserError as e:
        print(f"distillrun {name}: {e}", file=sys.stderr)
        sys.exit(2)
