"""The exception tree of downpour.

Every error a user can cause is one of these, with a message that says what was
wrong, what was expected and what to do about it. Each also subclasses the
built-in type a caller would naturally catch (ValueError, OSError, ...).

    DownpourError
    ├── ConfigError       a setting, flag, file or hyperparameter is invalid
    ├── DataError         a data file is missing, truncated or of the wrong format
    ├── ProtocolError     a message on the wire is malformed (see common/wire/protocol.py)
    ├── ClusterError      a node did not answer in time, or the cluster cannot go on
    └── TrainingError     a run ended without training (the last guard behind the checks)
"""


class DownpourError(Exception):
    """Base class of every error downpour raises on purpose."""


class ConfigError(DownpourError, ValueError):
    """A setting, command-line flag, config file or hyperparameter is invalid."""


class DataError(DownpourError, ValueError):
    """A data file or dataset is missing, truncated, corrupt or inconsistent."""


class ProtocolError(DownpourError, ValueError):
    """A message does not follow the wire protocol; `code` is its E_* code (common/wire/protocol.py)."""

    code = 1  # E_MALFORMED


class ClusterError(DownpourError, RuntimeError):
    """A node did not answer within its timeout, or the cluster cannot continue."""


class TrainingError(DownpourError, RuntimeError):
    """A run ended having trained nothing: no model is saved and no `end` line claims success.

    The checks before a run (common/training.py `check_batches`, common/config.py) refuse
    every setting known to lead here, so reaching it means a case they do not cover."""
