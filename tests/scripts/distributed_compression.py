"""Worker for tests/test_training_distributed.py: compression during DDP and FSDP2 training.

``torchrun --nproc_per_node=2 distributed_compression.py OUT SCENARIO...`` runs each scenario on
2 CPU processes (gloo) and writes what the test compares to OUT/<scenario>.rank<k>.pt:

* ``fsdp_prune``: a student with pruned, low-rank and Kronecker layers, sharded with
  ``shard_model`` (parameters checked to be DTensors at every step), distilled from a sharded
  teacher with gradual pruning; then ``save_model`` and the sharded logits on fixed inputs.
* ``fsdp_rank`` / ``ddp_rank``: progressive rank reduction under FSDP2 / DDP (a whole teacher),
  then ``save_model``.
* ``fsdp_resume`` / ``ddp_resume``: those runs saving a checkpoint half way, and new trainers
  resuming from it.

Imported without torchrun, :func:`run_prune` is the single-process reference on the same data
(batches of 4 instead of 2 × 2).
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from torch.utils.data import SequentialSampler
from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback

from hfcompress import compress_model
from hfcompress.layers import CompressedLayer, KroneckerLinear, LowRankLinear, PrunedLinear
from hfcompress.training import (
    CompressionLoggingCallback,
    DistillationArguments,
    DistillationTrainer,
    GradualPruningCallback,
    ProgressiveRankCallback,
    gather_full_model,
    shard_model,
)
from hfcompress.training.distributed import effective_rank, full_tensor

MIXED = {
    "stages": [
        {"method": "prune", "targets": r".*\.h\.\d+\.attn\..*", "sparsity": 0.0},
        {"method": "lowrank", "targets": r".*\.h\.\d+\.mlp\.c_fc", "rank": 16},
        {"method": "kronecker", "targets": r".*\.h\.\d+\.mlp\.c_proj", "a_shape": [8, 16]},
    ]
}
LOWRANK = {"stages": [{"method": "lowrank", "targets": r".*\.h\.\d+\.mlp\..*", "rank": 16}]}
PROBE = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(5))


def models(recipe: dict) -> tuple[GPT2LMHeadModel, GPT2LMHeadModel]:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=64,
        vocab_size=128,
        bos_token_id=0,
        eos_token_id=0,
        resid_pdrop=0.0,  # no dropout: the runs must see the same computation
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    teacher = GPT2LMHeadModel(config)
    student = copy.deepcopy(teacher)
    compress_model(student, recipe, progress=False)
    return student, teacher


def data() -> list[dict[str, torch.Tensor]]:
    rows = torch.randint(1, 128, (48, 16), generator=torch.Generator().manual_seed(3))
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


class InOrderTrainer(DistillationTrainer):
    """Batches in dataset order, so 2 ranks × 2 rows see what one process sees in batches of 4."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


class AssertSharded(TrainerCallback):
    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, model=None, **kwargs):
        compressed = [m for m in model.modules() if isinstance(m, CompressedLayer)]
        assert compressed and all(
            isinstance(p, DTensor) for m in compressed for p in m.parameters()
        ), "parameters are not sharded"
        self.steps += 1


def arguments(out: str, batch: int, steps: int, **overrides) -> DistillationArguments:
    settings = {
        "output_dir": out,
        "per_device_train_batch_size": batch,
        "max_steps": steps,
        "learning_rate": 1e-2,
        "weight_decay": 0.1,
        "lr_scheduler_type": "constant",
        "use_cpu": True,
        "report_to": [],
        "save_strategy": "no",
        "disable_tqdm": True,
        "logging_steps": 4,
        **overrides,
    }
    if "WORLD_SIZE" in os.environ:  # under torchrun
        settings["ddp_backend"] = "gloo"
    return DistillationArguments(**settings)


def pruning() -> GradualPruningCallback:
    return GradualPruningCallback(0.0, 0.5, start_step=0, end_step=8, update_every=2)


def layer_state(model: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    """Whole masks and weights of the hfcompress layers (gathered on every rank)."""
    state = {}
    for name, m in model.named_modules():
        if isinstance(m, PrunedLinear):
            state[name] = {"mask": m.mask.clone(), "weight": full_tensor(m.weight).clone()}
        elif isinstance(m, (LowRankLinear, KroneckerLinear)):
            state[name] = {k: full_tensor(p).clone() for k, p in m.named_parameters()}
    return state


def run_prune(out: str, distributed: bool, resume: str | None = None, **overrides) -> dict:
    """Gradual pruning to 50% (updates every 2 steps until step 8) over 12 steps; distributed:
    student and teacher sharded."""
    student, teacher = models(MIXED)
    callbacks = [pruning(), CompressionLoggingCallback()]
    if distributed:
        shard_model(student)
        shard_model(teacher)
        callbacks.append(AssertSharded())
    batch = 2 if distributed else 4
    args = arguments(os.path.join(out, "prune"), batch, 12, **overrides)
    trainer = InOrderTrainer(
        model=student, teacher=teacher, args=args, train_dataset=data(), callbacks=callbacks
    )
    trainer.train(resume_from_checkpoint=resume)
    result = {"layers": layer_state(student), "metrics": trainer.state.log_history[-2]}
    if distributed:
        assert callbacks[-1].steps > 0
        result["world_size"] = args.world_size
        trainer.save_model(os.path.join(out, "prune_final"))
        with torch.no_grad():
            result["logits"] = student(input_ids=PROBE).logits.clone()
    return result


def run_rank(out: str, fsdp: bool, resume: str | None = None, **overrides) -> dict:
    """Ranks 16 → 8 (step 3) → 4 (step 6) in 8 steps; the teacher is whole on every rank."""
    student, teacher = models(LOWRANK)
    if fsdp:
        shard_model(student)
    callback = ProgressiveRankCallback(every=3, factor=0.5, min_rank=2)
    tag = "fsdp_rank" if fsdp else "ddp_rank"
    args = arguments(os.path.join(out, tag), 2, 8, **overrides)
    trainer = InOrderTrainer(
        model=student,
        teacher=teacher,
        args=args,
        train_dataset=data(),
        callbacks=[callback, CompressionLoggingCallback()],
    )
    trainer.train(resume_from_checkpoint=resume)
    layers = {n: m for n, m in student.named_modules() if isinstance(m, LowRankLinear)}
    result = {
        "ranks": {n: effective_rank(m) for n, m in layers.items()},
        "shapes": {n: tuple(m.u.weight.shape) for n, m in layers.items()},
        "layers": layer_state(student),
        "metrics": trainer.state.log_history[-2],
    }
    trainer.save_model(os.path.join(out, f"{tag}_final"))
    with torch.no_grad():
        result["logits"] = student(input_ids=PROBE).logits.clone()
    if fsdp:
        full = gather_full_model(student)  # the copy a checkpoint is saved from
        if full is not None:
            result["gathered_ranks"] = {n: full.get_submodule(n).rank for n in layers}
    return result


def run_resume(out: str, fsdp: bool) -> dict:
    """Runs saving a checkpoint half way, and new trainers resuming from it: gradual pruning
    (FSDP only: checkpoint-6 of 12, masks changing until step 8) and progressive rank
    (checkpoint-4 of 8: rank 8 saved, 4 reached after resuming)."""
    results = {}
    if fsdp:
        reference = run_prune(out, True, save_strategy="steps", save_steps=6)
        resumed = run_prune(out, True, resume=os.path.join(out, "prune", "checkpoint-6"))
        results["prune"] = (reference["layers"], resumed["layers"])
    tag = "fsdp_rank" if fsdp else "ddp_rank"
    reference = run_rank(out, fsdp, save_strategy="steps", save_steps=4)
    resumed = run_rank(out, fsdp, resume=os.path.join(out, tag, "checkpoint-4"))
    results["rank"] = (reference["layers"], resumed["layers"])
    results["ranks"] = (reference["ranks"], resumed["ranks"])
    return results


def main(out: str, scenarios: list[str]) -> None:
    rank = int(os.environ.get("RANK", "0"))
    runs = {
        "fsdp_prune": lambda: run_prune(out, True),
        "fsdp_rank": lambda: run_rank(out, True),
        "ddp_rank": lambda: run_rank(out, False),
        "fsdp_resume": lambda: run_resume(out, True),
        "ddp_resume": lambda: run_resume(out, False),
    }
    for scenario in scenarios:
        result = runs[scenario]()
        torch.save(result, os.path.join(out, f"{scenario}.rank{rank}.pt"))
        if dist.is_initialized():
            dist.barrier()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
