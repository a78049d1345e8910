"""hfcompress: compress HuggingFace transformers models by module surgery.

Public API only; see the submodules for the building blocks.
"""

from hfcompress._version import __version__
from hfcompress.errors import HfCompressError, InvalidParameterError, UnsupportedModuleError
from hfcompress.layers import CompressedLayer, KroneckerLinear, LowRankLinear, PrunedLinear

__all__ = [
    "CompressedLayer",
    "HfCompressError",
    "InvalidParameterError",
    "KroneckerLinear",
    "LowRankLinear",
    "PrunedLinear",
    "UnsupportedModuleError",
    "__version__",
]
