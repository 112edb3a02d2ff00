"""The exceptions that end a run in a known way: UserError (one line, exit code 2), Terminated
(interrupted) and Pruned (a search trial stopped early)."""

from __future__ import annotations

from typing import Any


class UserError(ValueError):
    """Bad input the user can fix: the message names the problem and the fix, in one line.
    A ValueError, so library callers can catch it as one."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's preemption), handled like Ctrl-C; exit code 143."""


def raise_terminated(signum: int, frame: object) -> None:
    """A SIGTERM handler: `signal.signal(signal.SIGTERM, raise_terminated)`."""
    raise Terminated


def interrupted_exit_code(error: KeyboardInterrupt) -> int:
    """128 + the signal number: 143 for SIGTERM, 130 for Ctrl-C."""
    return 143 if isinstance(error, Terminated) else 130


class Pruned(Exception):
    """Raised from `Run.log` when the search's pruner stops a hopeless trial; `run_stage` marks
    the run `pruned` (finished, never consumed as complete) with the metrics seen so far."""

    def __init__(self, epoch: int, metrics: dict[str, Any]) -> None:
        super().__init__(f"pruned by the search after epoch {epoch}")
        self.fields = {"pruned_at_epoch": epoch, "metrics": metrics}
