"""User-facing errors: the command line prints these as one line, without a traceback."""


class PolyNeXtError(Exception):
    """Base class for errors caused by user input (files, names, options)."""


class CheckpointError(PolyNeXtError, ValueError):
    """A checkpoint file is unreadable or does not match the model."""


class DataError(PolyNeXtError, ValueError):
    """A dataset folder is missing, empty or malformed."""


class ConfigError(PolyNeXtError, ValueError):
    """An unknown model / recipe name or a bad option value."""
