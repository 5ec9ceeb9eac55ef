"""User-facing errors.

Anything a user can cause (a bad config value, a missing file, a truncated shard) raises a
`MoelabError` whose message names the field, file or value and says what was expected. The CLI
prints that message on one line and exits non-zero, never a traceback.
"""


class MoelabError(Exception):
    """An error caused by user input, reported without a traceback."""


class ConfigError(MoelabError, ValueError):
    """A configuration key or value is invalid."""


class DataError(MoelabError):
    """A data directory, shard, tokenizer or corpus is missing or malformed."""


class CheckpointError(MoelabError):
    """A checkpoint is missing, incomplete or belongs to another model."""


class TrainingError(MoelabError):
    """Training cannot continue (for example the loss became non-finite)."""
