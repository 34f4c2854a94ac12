"""The one exception type for bad user input, printed as a single line by every CLI."""


class ConfigError(ValueError):
    """Bad configuration, layout, data or checkpoint: the message says what and how to fix."""
