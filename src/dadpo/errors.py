"""The one exception type that reaches users as a one-line message (exit code 2, no traceback)."""


class DadpoError(Exception):
    """Bad input or configuration: the message names the option, key or file at fault."""


class ConfigError(DadpoError):
    """A setting whose value does not fit the model or data at hand, raised by library code: the message
    names the config field (`prune.ratio: …`, what a recipe user wrote); a command line shows the flag
    that set it instead (`dadpo.settings.as_flag_error`)."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message
