"""``DistillationArguments``: ``TrainingArguments`` plus the distillation settings.

Every field works from the command line through ``HfArgumentParser`` and is saved with the run
(``training_args.bin`` / the Trainer's logs), like any ``TrainingArguments`` field.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from hfcompress.errors import InvalidParameterError


def parse_layer_map(text: str | None) -> dict[int, int]:
    """``"2:4,4:8"`` -> {2: 4, 4: 8}: student hidden-state index -> teacher index."""
    if not text:
        return {}
    mapping = {}
    for pair in text.split(","):
        try:
            student, teacher = (int(part) for part in pair.split(":"))
        except ValueError:
            raise InvalidParameterError(
                f"layer_map={text!r}: expected 'student:teacher' index pairs such as '2:4,4:8'"
            ) from None
        mapping[student] = teacher
    return mapping


@dataclass
class DistillationArguments(TrainingArguments):
    """Training arguments with knowledge-distillation settings (Hinton et al., 2015).

    Example:
        ``python train.py --output_dir out --alpha 0.5 --temperature 2 --hidden_weight 0.1
        --layer_map 2:4,4:8``
    """

    alpha: float = field(
        default=0.5,
        metadata={
            "help": "Weight of the hard-label cross-entropy; 1.0 is plain supervised training."
        },
    )
    temperature: float = field(
        default=2.0, metadata={"help": "Softmax temperature T of the distillation term (T > 0)."}
    )
    hidden_weight: float = field(
        default=0.0,
        metadata={"help": "Weight of the hidden-state MSE (TinyBERT); 0 disables it."},
    )
    layer_map: str | None = field(
        default=None,
        metadata={
            "help": "Student:teacher hidden-state index pairs for the MSE, e.g. '2:4,4:8' "
            "(0 is the embedding output). Default with hidden_weight > 0: the last layers."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.alpha <= 1.0:
            raise InvalidParameterError(f"alpha={self.alpha!r}: expected a weight in [0, 1]")
        if self.temperature <= 0:
            raise InvalidParameterError(f"temperature={self.temperature!r}: expected T > 0")
        if self.hidden_weight < 0:
            raise InvalidParameterError(f"hidden_weight={self.hidden_weight!r}: expected ≥ 0")
        parse_layer_map(self.layer_map)  # fail early on a malformed map
