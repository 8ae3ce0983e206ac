"""The errors lorakit raises.

Every error names what was wrong (the file, field, module or tensor) and how to fix it. Callers
that want to handle all of lorakit's input problems at once catch ``LorakitError``.
"""

from __future__ import annotations

__all__ = [
    "LorakitError",
    "ConfigError",
    "AdapterFormatError",
    "CompatibilityError",
    "CheckpointError",
    "DataError",
    "ModelLoadError",
    "TrainingError",
    "TrainingInterrupted",
    "DiskFullError",
]


class LorakitError(Exception):
    """Base class of every error lorakit raises on purpose."""


class ConfigError(LorakitError, ValueError):
    """A configuration value is invalid, or a target pattern matches nothing."""


class AdapterFormatError(LorakitError):
    """An adapter directory or file is malformed: missing, unexpected or bad tensors, a pickle."""


class CompatibilityError(LorakitError):
    """An adapter does not fit the base model it is loaded onto."""


class CheckpointError(LorakitError):
    """A training checkpoint is missing, incomplete or fails its manifest check."""


class DataError(LorakitError, ValueError):
    """A data file or record is unusable; the message names the file and line."""


class ModelLoadError(LorakitError):
    """A base model cannot be found or loaded; the message gives the command that fixes it."""


class TrainingError(LorakitError):
    """Training cannot go on (a non-finite loss, say); the last good checkpoint is kept."""


class TrainingInterrupted(LorakitError):
    """Training was stopped by a signal after saving a checkpoint; `--resume` continues it."""


class DiskFullError(TrainingError):
    """A run's file could not be written: no space left on its device. The message names the
    path, the space the write needed and where else to write; earlier checkpoints are kept."""
