"""The hfcompress exception tree.

Every error the library raises on user input derives from :class:`HfCompressError`. Each
subclass also derives from the builtin a caller would naturally catch (``ValueError`` for a
bad parameter), so ``except ValueError`` keeps working.
"""

from __future__ import annotations


class HfCompressError(Exception):
    """Base class of all hfcompress errors."""


class InvalidParameterError(HfCompressError, ValueError):
    """A compression parameter (rank, sparsity, a_shape, ...) is out of range for its module."""


class MissingDependencyError(HfCompressError, ImportError):
    """An optional package a feature needs is not installed; the message says how to get it."""


class UnsupportedModuleError(HfCompressError, TypeError, ValueError):
    """A module hfcompress cannot compress (neither ``nn.Linear`` nor GPT-2's ``Conv1D``).

    It is both a ``TypeError`` (the natural builtin) and a ``ValueError`` (what every other
    bad argument to ``from_module`` raises), so either ``except`` clause catches it.
    """


class RecipeError(HfCompressError, ValueError):
    """A recipe that cannot be parsed or does not fit the model; the message names the field."""


class RegistrationError(HfCompressError, ValueError):
    """A method or layer registration that conflicts with one already made, or is incomplete."""


class UnknownMethodError(HfCompressError, ValueError):
    """A method name no package registered; the message lists the known ones."""


class CalibrationError(HfCompressError, ValueError):
    """Calibration data that cannot feed a criterion (no examples, no tokens reached a module)."""


class DecompositionError(HfCompressError, RuntimeError):
    """A module's decomposition failed inside ``compress_model``; the model was restored."""


class FrozenLayerError(HfCompressError, RuntimeError):
    """A layer in its inference form (``hfcompress.freeze``) was asked to train."""
