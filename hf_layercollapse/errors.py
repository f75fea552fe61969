"""The library's own exception."""

from __future__ import annotations


class LayerCollapseConfigError(ValueError):
    """A configuration, a checkpoint's collapse record or a plan is malformed, or does not fit the model.

    The message names the field (or the unit) and the file it came from, and says what to do.
    """


class CheckpointIntegrityError(LayerCollapseConfigError, OSError):
    """A saved folder does not hold what its manifest says: a file is missing, changed or truncated, or a weight file
    of another save lies beside the checkpoint. The message names the file."""
