"""Exceptions and warning categories of lcnnify.

Every error names the module path / graph node, the op, and the fix. All errors derive from
:class:`LCNNError`; those about bad arguments are also ``ValueError`` (``except ValueError`` keeps working).
"""
from __future__ import annotations


class LCNNError(Exception):
    """Base class of every error raised by lcnnify."""


class ConversionError(LCNNError, ValueError):
    """A model (or one of its modules / graph nodes) cannot be converted, or the conversion's options are bad."""


class MeasurementError(LCNNError, ValueError):
    """Bad input to a measurement (wrong shape, labels out of range, NaN input, eps < 0...)."""


class LCNNWarning(UserWarning):
    """Base warning category of lcnnify."""


class ShapeChangeWarning(LCNNWarning):
    """A spectrally normalized conv saw a new input shape and re-initialised its power iteration."""


class ConversionWarning(LCNNWarning):
    """Something was left unconverted or converted through a fallback path."""


class DatasetNotFoundError(LCNNError, FileNotFoundError):
    """A dataset's files are not on disk where `lcnnify.data` looks for them (lcnnify never downloads).

    The message says which directory was searched, which files are missing and where to get them.
    """
