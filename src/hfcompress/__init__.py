"""hfcompress: compress HuggingFace transformers models by module surgery.

``import hfcompress`` also registers the ``"hfcompress"`` quantization method with transformers,
so ``AutoModel*.from_pretrained`` rebuilds compressed checkpoints.
"""

from hfcompress._interrupt import exit_if_command

# The command imports this package before its main() can catch Ctrl-C: see _interrupt.
try:
    from hfcompress import methods  # noqa: F401 - registers the built-in methods
    from hfcompress._version import __version__
    from hfcompress.errors import (
        CalibrationError,
        DecompositionError,
        FrozenLayerError,
        HfCompressError,
        InvalidParameterError,
        RecipeError,
        RegistrationError,
        UnknownMethodError,
        UnsupportedModuleError,
    )
    from hfcompress.inference import freeze, model_bytes, unfreeze
    from hfcompress.layers.base import CompressedLayer
    from hfcompress.methods.kronecker.layer import KroneckerLinear
    from hfcompress.methods.lowrank.layer import LowRankLinear
    from hfcompress.methods.prune.layer import PrunedLinear
    from hfcompress.model_card import write_model_card  # also: save_pretrained writes the card
    from hfcompress.quantization import quantize_int8
    from hfcompress.recipe import Recipe
    from hfcompress.registry import Criterion, Method, get_method, method_names, register_method
    from hfcompress.serialization import CheckpointError, HfCompressConfig, decompress
    from hfcompress.surgery import (
        CompressionReport,
        compress_model,
        plan_compression,
        record_compression,
    )
except KeyboardInterrupt:
    exit_if_command()
    raise

__all__ = [
    "CalibrationError",
    "CheckpointError",
    "CompressedLayer",
    "CompressionReport",
    "Criterion",
    "DecompositionError",
    "FrozenLayerError",
    "HfCompressConfig",
    "HfCompressError",
    "InvalidParameterError",
    "KroneckerLinear",
    "LowRankLinear",
    "Method",
    "PrunedLinear",
    "Recipe",
    "RecipeError",
    "RegistrationError",
    "UnknownMethodError",
    "UnsupportedModuleError",
    "__version__",
    "compress_model",
    "decompress",
    "freeze",
    "get_method",
    "method_names",
    "model_bytes",
    "plan_compression",
    "quantize_int8",
    "record_compression",
    "register_method",
    "unfreeze",
    "write_model_card",
]
