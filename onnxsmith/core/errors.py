"""Exceptions that carry a one-line message for the user (the CLI prints it and exits with code 2)."""


class UserError(Exception):
    """Bad input or an impossible request: the message names the problem and, where possible, the fix."""


class PassError(Exception):
    """A pass failed or broke the model; the message names the pass and the passes that ran before it."""


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
