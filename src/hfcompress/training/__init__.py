"""Training compressed models: distillation in transformers' Trainer, and compression callbacks."""

from hfcompress.training.arguments import DistillationArguments, parse_layer_map
from hfcompress.training.callbacks import (
    CompressionLoggingCallback,
    GradualPruningCallback,
    ProgressiveRankCallback,
    compression_metrics,
    cubic_sparsity,
    remap_optimizer,
)
from hfcompress.training.data import causal_lm_blocks
from hfcompress.training.distributed import is_sharded, shard_model
from hfcompress.training.losses import distillation_loss, hidden_state_loss
from hfcompress.training.sharded_checkpoint import (
    gather_full_model,
    load_into_sharded,
    save_full_checkpoint,
)
from hfcompress.training.trainer import DistillationTrainer

__all__ = [
    "CompressionLoggingCallback",
    "DistillationArguments",
    "DistillationTrainer",
    "GradualPruningCallback",
    "ProgressiveRankCallback",
    "causal_lm_blocks",
    "compression_metrics",
    "cubic_sparsity",
    "distillation_loss",
    "gather_full_model",
    "hidden_state_loss",
    "is_sharded",
    "load_into_sharded",
    "parse_layer_map",
    "remap_optimizer",
    "save_full_checkpoint",
    "shard_model",
]
