"""The one exception type that reaches users as a one-line message (exit code 2, no traceback)."""


class DadpoError(Exception):
    """Bad input or configuration: the message names the option, key or file at fault."""
