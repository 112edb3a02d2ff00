"""The one exception type that turns into a one-line message and exit code 2."""


class UserError(Exception):
    """Bad input the user can fix: the message names the problem and the fix, in one line."""
