"""One exception hierarchy for everything lora-ref refuses.

Every error a user can provoke with bad input is a :class:`LoraRefError`. The CLI maps
them to exit code 2 and prints ``str(error)`` on one line; anything else is a bug (exit 3).
Subclasses also derive from the matching built-in so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class LoraRefError(Exception):
    """Base of every error lora-ref raises on purpose."""


class ConfigError(LoraRefError, ValueError):
    """An adapter configuration value is missing, of the wrong type or out of range."""


class UnsupportedFeatureError(ConfigError):
    """A layer kind or variant that a feature does not define (the feature matrix, docs/features.md, says why)."""


class ShapeError(LoraRefError, ValueError):
    """Tensor shapes disagree (A/B rank, base/adapter dimensions, batch length, ...)."""


class DTypeError(LoraRefError, TypeError):
    """A tensor has a dtype lora-ref does not support for that role."""


class NonFiniteError(LoraRefError, ValueError):
    """An adapter holds NaN or infinity where a finite value is required."""


class FileFormatError(LoraRefError, ValueError):
    """A file is malformed: truncated, inconsistent header, invalid JSON, missing keys."""


class UnsafeFileError(FileFormatError):
    """A file format that can execute code (pickle) was offered; it is never loaded."""


class TargetNotFoundError(LoraRefError, KeyError):
    """A module the adapter targets does not exist in the base weights or graph."""

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return str(self.args[0]) if self.args else ""


class MergeStateError(LoraRefError, RuntimeError):
    """A merge or unmerge that the ledger refuses: double merge, wrong order, not merged."""


class ResidualMismatchError(LoraRefError, ValueError):
    """An exact-unmerge residual belongs to another weight or another adapter."""


class OverwriteRefusedError(LoraRefError, ValueError):
    """An output path names one of the command's inputs (only ``--in-place`` may replace an input)."""


class CarriedTensorError(LoraRefError, ValueError):
    """An adapter file carries a tensor lora-ref cannot apply here; it is refused, never ignored."""


class ProvenanceError(MergeStateError):
    """A command contradicts the merge record a lora-ref file carries (double merge, not merged, order)."""


class ExactnessError(ResidualMismatchError):
    """A residual's checksums fail, or an exact unmerge did not reproduce the recorded base digest."""


class NotRegularFileError(FileFormatError):
    """An input is a FIFO, socket or device, not a regular file or folder; it is never opened."""


class MarkerError(LoraRefError, ValueError):
    """A document's generated block cannot be found exactly once: a marker missing, repeated or out of order."""
