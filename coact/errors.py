"""One exception type for problems a user can fix; the CLI prints it as one line."""


class CoactError(Exception):
    """Bad input or state: the message names the problem and what to do about it."""
