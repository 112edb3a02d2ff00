"""The exceptions that turn into a one-line message: UserError (exit code 2) and Terminated."""


class UserError(Exception):
    """Bad input the user can fix: the message names the problem and the fix, in one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's preemption), handled like Ctrl-C; exit code 143."""
