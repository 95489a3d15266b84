"""The one exception family for errors a user can cause.

Every message names the bad value, where it came from (config key, file, row) and the fix. The CLI prints
the message alone, without a traceback.
"""


class PipelineError(Exception):
    """Base of every error a user can cause and fix."""


class ConfigError(PipelineError):
    """A config key or value is wrong."""


class StageError(PipelineError):
    """A stage could not do its work for a reason the user can fix (missing file, no space, ...)."""


class DataError(PipelineError):
    """A data file or row is malformed."""


class RewardError(PipelineError):
    """A reward scorer raised or returned something that is not a number."""


class RegistryError(PipelineError):
    """A registry operation was refused (bad name, unknown reference, invalid adapter, ...)."""


class NotFoundError(RegistryError):
    """An adapter, version or alias does not exist."""
