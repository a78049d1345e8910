"""hfcompress: compress HuggingFace transformers models by module surgery.

``import hfcompress`` also registers the ``"hfcompress"`` quantization method with transformers,
so ``AutoModel*.from_pretrained`` rebuilds compressed checkpoints.
"""

from hfcompress._version import __version__
from hfcompress.errors import HfCompressError, InvalidParameterError, UnsupportedModuleError
from hfcompress.inference import freeze, model_bytes, unfreeze
from hfcompress.layers import CompressedLayer, KroneckerLinear, LowRankLinear, PrunedLinear
from hfcompress.recipe import Recipe, RecipeError
from hfcompress.serialization import CheckpointError, HfCompressConfig, decompress
from hfcompress.surgery import (
    CompressionReport,
    compress_model,
    plan_compression,
    record_compression,
)

__all__ = [
    "CheckpointError",
    "CompressedLayer",
    "CompressionReport",
    "HfCompressConfig",
    "HfCompressError",
    "InvalidParameterError",
    "KroneckerLinear",
    "LowRankLinear",
    "PrunedLinear",
    "Recipe",
    "RecipeError",
    "UnsupportedModuleError",
    "__version__",
    "compress_model",
    "decompress",
    "freeze",
    "model_bytes",
    "plan_compression",
    "record_compression",
    "unfreeze",
]
