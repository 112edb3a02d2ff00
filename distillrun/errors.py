"""The exceptions that turn into a one-line message: UserError (exit code 2) and Terminated."""


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
