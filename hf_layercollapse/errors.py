"""The library's own exception."""

from __future__ import annotations


class LayerCollapseConfigError(ValueError):
    """A configuration, a checkpoint's collapse record or a plan is malformed, or does not fit the model.

    The message names the field (or the unit) and the file it came from, and says what to do.
    """
