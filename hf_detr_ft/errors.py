"""User-facing errors.

Each error here describes a mistake the user can fix (a wrong folder, a class count that does
not match the data, a model that cannot be reached). The CLI prints them as one clear message
instead of a traceback; library callers can catch them by type.
"""


class HfDetrFtError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class DatasetError(HfDetrFtError):
    """The dataset folder or its annotations cannot be used as they are."""


class ArgumentError(HfDetrFtError, ValueError):
    """An argument's value cannot work (out of range, or not with this setup)."""


class ModelLoadError(HfDetrFtError):
    """The starting checkpoint cannot be loaded."""


#: Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_CODE = 130


class TrainingInterrupted(HfDetrFtError):
    """Training was stopped by Ctrl-C after saving a checkpoint that it can resume from."""
