"""User-facing errors, all of them in one place.

Each error here describes something the user can fix or must know (a wrong folder, a class
count that does not match the data, a model that cannot be reached, a run that diverged). The
CLI prints them as one line and a non-zero exit code instead of a traceback; library callers
catch them by type (all derive from :class:`HfDetrFtError`).
"""


class HfDetrFtError(Exception):
    """Base class for errors caused by user input rather than by a bug."""


class DatasetError(HfDetrFtError):
    """The dataset folder or its annotations cannot be used as they are."""


class ArgumentError(HfDetrFtError, ValueError):
    """An argument's value cannot work (out of range, or not with this setup)."""


class ModelLoadError(HfDetrFtError):
    """The starting checkpoint cannot be loaded."""


class InputError(HfDetrFtError):
    """The images to run the model on cannot be found."""


class PreflightError(HfDetrFtError):
    """A pre-flight check found a problem that makes training pointless as configured."""


class TrainingDivergedError(HfDetrFtError):
    """The training loss became NaN or infinite; training was stopped without saving it."""


class ReportError(HfDetrFtError):
    """There is no training history to report on."""


class OutputDirError(HfDetrFtError):
    """The output folder cannot be used: another run holds it, or it holds files of another."""


class HubError(HfDetrFtError):
    """The model could not be published; the local files are not affected."""


class ExportError(HfDetrFtError):
    """The model cannot be exported (an operator the exporter has no ONNX form of, ...)."""


class ExportCheckError(ExportError):
    """The exported model does not reproduce the PyTorch model within the tolerances."""


#: Exit status of a run stopped by Ctrl-C (128 + SIGINT), as shells report it.
INTERRUPTED_EXIT_CODE = 130


class TrainingInterrupted(HfDetrFtError):
    """Training was stopped by Ctrl-C after saving a checkpoint that it can resume from."""
