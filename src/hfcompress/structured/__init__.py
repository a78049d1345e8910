"""What the structured methods (``width``, ``heads``, ``depth``) share: a journal of changes
that can be undone, the coupled modules of each architecture, and shrinking a Linear/Conv1D.

The methods themselves live in ``hfcompress.methods.<name>``; nothing here names one.
"""

from hfcompress.structured.architectures import (
    MLP_LAYOUTS,
    AttentionParts,
    MlpLayout,
    MlpParts,
    attention_parts,
    find_mlps,
    mlp_parts,
)
from hfcompress.structured.edit import (
    dense_weight,
    new_dense_like,
    select_inputs,
    select_outputs,
)
from hfcompress.structured.journal import Journal
from hfcompress.structured.reference import structural_differences

__all__ = [
    "MLP_LAYOUTS",
    "AttentionParts",
    "Journal",
    "MlpLayout",
    "MlpParts",
    "attention_parts",
    "dense_weight",
    "find_mlps",
    "mlp_parts",
    "new_dense_like",
    "select_inputs",
    "select_outputs",
    "structural_differences",
]
