"""Errors a user can act on. The CLI prints them as one line and exits non-zero (no traceback)."""

from __future__ import annotations


class MedlatentError(Exception):
    """A problem with the user's input, files or environment, stated in one line."""


class DataError(MedlatentError):
    """A data file or folder is missing, corrupt, or not what was expected."""


class ConfigError(MedlatentError):
    """A configuration key or value is unknown or invalid."""


class CheckpointError(MedlatentError):
    """A run folder has no usable checkpoint, or a checkpoint does not match the run."""


class TrainingDiverged(MedlatentError):
    """The loss became NaN or infinite; the run stopped and kept its last good checkpoint."""


class RunInUse(MedlatentError):
    """Another live process is training in this run folder."""
