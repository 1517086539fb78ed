"""User-facing error types: every problem a user can fix is a ``MilError``."""

from __future__ import annotations


class MilError(Exception):
    """An error the user can act on; the CLI prints it without a traceback."""


class ConfigError(MilError):
    """A config file or ``--set`` override names an unknown key or a bad value."""


class DataError(MilError):
    """A feature file, cohort CSV or split file is missing, unreadable or inconsistent."""


class SplitError(DataError):
    """A split file is malformed or puts one patient into two partitions."""


class TrainingError(MilError):
    """Training failed in a way a setting can fix (e.g. the loss became NaN: lower the learning rate)."""


class MilWarning(UserWarning):
    """Something the user should know and may want to fix; the CLI prints it as ``mil: warning: …``."""


class TrainingWarning(MilWarning):
    """A fold that may not have trained well (:mod:`mil.train.diagnostics`): what, and what to change."""
