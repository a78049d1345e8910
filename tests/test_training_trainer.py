"""DistillationTrainer and the callbacks on tiny models in transformers' Trainer (CPU)."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset

from conftest import BLOCK_LINEARS, tiny_model, word_tokenizer
from hfcompress import compress_model
from hfcompress.errors import HfCompressError, InvalidParameterError
from hfcompress.layers import LowRankLinear, PrunedLinear
from hfcompress.training import (
    CompressionLoggingCallback,
    DistillationArguments,
    DistillationTrainer,
    GradualPruningCallback,
    ProgressiveRankCallback,
    causal_lm_blocks,
    cubic_sparsity,
)


def memorizable(n: int = 8, length: int = 16) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    rows = torch.randint(1, 128, (n, length), generator=g)
    return [{"input_ids": r, "labels": r.clone()} for r in rows]


def arguments(tmp_path, **overrides) -> DistillationArguments:
    settings = {
        "output_dir": str(tmp_path / "run"),
        "per_device_train_batch_size": 4,
        "learning_rate": 5e-3,
        "max_steps": 20,
        "logging_steps": 1,
        "report_to": [],
        "use_cpu": True,
        "save_strategy": "no",
        "disable_tqdm": True,
        "weight_decay": 0.1,
        "alpha": 0.5,
        "temperature": 2.0,
        **overrides,
    }
    return DistillationArguments(**settings)


def student_and_teacher(recipe: dict | None):
    teacher = tiny_model("gpt2")
    student = copy.deepcopy(teacher)
    if recipe is not None:
        compress_model(student, recipe, progress=False)
    return student, teacher


RECIPES = {
    "prune": {"stages": [{"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.5}]},
    "lowrank": {"stages": [{"method": "lowrank", "targets": BLOCK_LINEARS, "rank": 8}]},
    "kronecker": {
        "stages": [{"method": "kronecker", "targets": BLOCK_LINEARS, "a_shape": [8, 8], "terms": 2}]
    },
}


@pytest.mark.parametrize("method", list(RECIPES))
def test_loss_decreases_for_every_method(tmp_path, method):
    student, teacher = student_and_teacher(RECIPES[method])
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=arguments(tmp_path, max_steps=30),
        train_dataset=memorizable(),
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert losses[-1] < 0.7 * losses[0], losses
    assert {"loss_ce", "loss_kd"} <= set(trainer.state.log_history[0])


def test_teacher_is_frozen_bit_identical_and_gets_no_gradient(tmp_path):
    student, teacher = student_and_teacher(RECIPES["lowrank"])
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    DistillationTrainer(
        model=student, teacher=teacher, args=arguments(tmp_path), train_dataset=memorizable()
    ).train()
    assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert not teacher.training


def test_alpha_one_is_plain_supervised_training(tmp_path):
    student, teacher = student_and_teacher(RECIPES["prune"])

    def no_teacher(*args, **kwargs):
        raise AssertionError("alpha = 1 must not run the teacher")

    teacher.forward = no_teacher
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=arguments(tmp_path, alpha=1.0, max_steps=3),
        train_dataset=memorizable(),
    )
    trainer.train()
    first = trainer.state.log_history[0]
    assert first["loss_kd"] == 0.0 and first["loss"] == pytest.approx(first["loss_ce"], rel=1e-4)


def test_hidden_state_distillation_runs_and_logs(tmp_path):
    student, teacher = student_and_teacher(RECIPES["lowrank"])
    args = arguments(tmp_path, max_steps=3, hidden_weight=0.5, layer_map="1:1,2:2")
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=memorizable()
    )
    trainer.train()
    assert trainer.state.log_history[0]["loss_hidden"] > 0


def test_cubic_schedule():
    assert cubic_sparsity(0, 0.0, 0.5, 0, 100) == 0.0
    assert cubic_sparsity(100, 0.0, 0.5, 0, 100) == 0.5
    assert cubic_sparsity(50, 0.0, 0.5, 0, 100) == pytest.approx(0.5 - 0.5 * 0.5**3)
    assert cubic_sparsity(150, 0.1, 0.5, 0, 100) == 0.5


def test_gradual_pruning_reaches_target_locks_pattern_and_keeps_zeros(tmp_path):
    student, teacher = student_and_teacher(
        {"stages": [{"method": "prune", "targets": BLOCK_LINEARS, "sparsity": 0.0}]}
    )
    callback = GradualPruningCallback(0.0, 0.6, start_step=0, end_step=10, update_every=2)
    args = arguments(tmp_path, max_steps=40, learning_rate=1e-2)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=memorizable(), callbacks=[callback]
    )
    masks_at_lock = {}

    class Snapshot(GradualPruningCallback.__mro__[1]):  # a bare TrainerCallback
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == 11:
                for name, m in student.named_modules():
                    if isinstance(m, PrunedLinear):
                        masks_at_lock[name] = m.mask.clone()

    trainer.add_callback(Snapshot())
    trainer.train()
    for name, module in student.named_modules():
        if isinstance(module, PrunedLinear):
            assert int((~module.mask).sum()) == round(0.6 * module.mask.numel())
            assert torch.equal(module.mask, masks_at_lock[name])  # locked after end_step
            assert torch.all(module.weight[~module.mask] == 0)  # exactly 0 after 30 AdamW+wd steps
    spec = student.config.quantization_config.modules
    assert all(s["sparsity"] == pytest.approx(0.6) for s in spec.values())


def test_gradual_pruning_requires_pruned_layers(tmp_path):
    student, teacher = student_and_teacher(None)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=arguments(tmp_path),
        train_dataset=memorizable(),
        callbacks=[GradualPruningCallback()],
    )
    with pytest.raises(HfCompressError, match="no PrunedLinear layers"):
        trainer.train()
    with pytest.raises(InvalidParameterError, match="initial_sparsity"):
        GradualPruningCallback(0.6, 0.5)


def test_progressive_rank_shrinks_parameters_on_schedule(tmp_path):
    student, teacher = student_and_teacher(RECIPES["lowrank"])
    layer = student.transformer.h[0].mlp.c_fc
    ranks, counts = {}, {}

    class Record(GradualPruningCallback.__mro__[1]):
        def on_step_end(self, args, state, control, **kwargs):
            ranks[state.global_step] = layer_ref().rank
            counts[state.global_step] = sum(p.numel() for p in student.parameters())

    def layer_ref():
        return student.transformer.h[0].mlp.c_fc

    callback = ProgressiveRankCallback(every=5, factor=0.5, min_rank=2)
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=arguments(tmp_path, max_steps=16),
        train_dataset=memorizable(),
        callbacks=[callback, Record()],
    )
    trainer.train()
    assert [ranks[s] for s in (4, 5, 10, 15, 16)] == [8, 4, 2, 2, 2]
    lowrank = [m for m in student.modules() if isinstance(m, LowRankLinear)]
    per_rank = sum(m.in_features + m.out_features for m in lowrank)
    assert counts[4] - counts[5] == 4 * per_rank  # rank 8 -> 4 in every layer
    assert counts[5] - counts[10] == 2 * per_rank
    assert layer is layer_ref() and layer.rank == 2  # truncated in place, not replaced
    params = {id(p) for p in student.parameters()}
    optimizer_params = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert params == optimizer_params  # the optimizer follows the new factors
    assert student.config.quantization_config.modules["transformer.h.0.mlp.c_fc"]["rank"] == 2


def test_compression_metrics_in_log_history(tmp_path):
    student, teacher = student_and_teacher(RECIPES["prune"])
    trainer = DistillationTrainer(
        model=student,
        teacher=teacher,
        args=arguments(tmp_path, max_steps=2),
        train_dataset=memorizable(),
        callbacks=[CompressionLoggingCallback()],
    )
    assert isinstance(trainer.callback_handler.callbacks[0], CompressionLoggingCallback)
    trainer.train()
    entry = trainer.state.log_history[0]
    dense = sum(p.numel() for p in teacher.parameters())
    assert entry["compression/dense_params"] == dense
    assert entry["compression/sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert entry["compression/ratio"] == pytest.approx(dense / entry["compression/params"])


def test_resume_restores_masks_ranks_and_schedule(tmp_path):
    recipe = {
        "stages": [
            {"method": "lowrank", "targets": r".*mlp\.c_fc", "rank": 8},
            {"method": "prune", "targets": r".*attn\.c_attn", "sparsity": 0.0},
        ]
    }

    def run(max_steps: int, resume: bool):
        student, teacher = student_and_teacher(recipe)
        callbacks = [
            GradualPruningCallback(0.0, 0.5, start_step=0, end_step=8, update_every=2),
            ProgressiveRankCallback(every=4, factor=0.5, min_rank=2),
        ]
        args = arguments(
            tmp_path, max_steps=max_steps, save_strategy="steps", save_steps=6, learning_rate=1e-2
        )
        trainer = DistillationTrainer(
            model=student,
            teacher=teacher,
            args=args,
            train_dataset=memorizable(),
            callbacks=callbacks,
        )
        trainer.train(
            resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-6") if resume else None
        )
        return student

    first = run(6, resume=False)  # stops at the checkpoint
    checkpoint = tmp_path / "run" / "checkpoint-6"
    assert (checkpoint / "model.safetensors").exists()
    resumed = run(12, resume=True)
    attn = resumed.transformer.h[0].attn.c_attn
    assert int((~attn.mask).sum()) == round(0.5 * attn.mask.numel())
    assert torch.all(attn.weight[~attn.mask] == 0)
    assert resumed.transformer.h[0].mlp.c_fc.rank == 2  # 8 -> 4 (step 4, restored) -> 2 (step 8)
    assert first.transformer.h[0].mlp.c_fc.rank == 4
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(checkpoint)  # checkpoints are hfcompress format
    assert reloaded.transformer.h[0].mlp.c_fc.rank == 4


def test_causal_lm_blocks():
    tokenizer = word_tokenizer(["a", "b", "c", "d", "e"])  # a = 2, ..., e = 6
    data = Dataset.from_dict({"text": ["a b c", "d e a b", "c d"]})
    blocks = causal_lm_blocks(data, tokenizer, block_size=4)
    assert blocks["input_ids"] == [[2, 3, 4, 5], [6, 2, 3, 4]]
    assert blocks["labels"] == blocks["input_ids"]
    with pytest.raises(InvalidParameterError, match=r"text_column='body'.*\['text'\]"):
        causal_lm_blocks(data, tokenizer, block_size=4, text_column="body")
