"""User errors: one line naming the argument and its value; the CLI maps them to exit code 2."""


class EdgezoError(ValueError):
    """A bad input. The message is one line that names the cause."""


def check(condition, message):
    if not condition:
        raise EdgezoError(message)
