"""Worker for tests/test_training_distributed.py, launched by torchrun on 2 CPU processes (gloo).

Each rank distills a tiny GPT-2 student from its teacher with gradual pruning, then writes its
masks and weights to OUT/rank<k>.pt so the test can compare the ranks.
"""

from __future__ import annotations

import copy
import os
import sys

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from hfcompress import compress_model
from hfcompress.layers import PrunedLinear
from hfcompress.training import DistillationArguments, DistillationTrainer, GradualPruningCallback


def main(out_dir: str) -> None:
    torch.manual_seed(0)
    teacher = GPT2LMHeadModel(
        GPT2Config(
            n_layer=2,
            n_embd=64,
            n_head=4,
            n_positions=64,
            vocab_size=128,
            bos_token_id=0,
            eos_token_id=0,
        )
    )
    student = copy.deepcopy(teacher)
    compress_model(
        student,
        {"stages": [{"method": "prune", "targets": r".*\.h\.\d+\..*", "sparsity": 0.0}]},
        progress=False,
    )
    rows = torch.randint(1, 128, (16, 16), generator=torch.Generator().manual_seed(3))
    data = [{"input_ids": r, "labels": r.clone()} for r in rows]
    args = DistillationArguments(
        output_dir=os.path.join(out_dir, "run"),
        per_device_train_batch_size=2,
        max_steps=12,
        learning_rate=1e-2,
        weight_decay=0.1,
        use_cpu=True,
        ddp_backend="gloo",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=4,
    )
    callback = GradualPruningCallback(0.0, 0.5, start_step=0, end_step=8, update_every=2)
    trainer = DistillationTrainer(
        model=student, teacher=teacher, args=args, train_dataset=data, callbacks=[callback]
    )
    trainer.train()
    state = {
        name: {"mask": m.mask.clone(), "weight": m.weight.detach().clone()}
        for name, m in student.named_modules()
        if isinstance(m, PrunedLinear)
    }
    rank = int(os.environ.get("RANK", "0"))
    torch.save(
        {"layers": state, "world_size": args.world_size}, os.path.join(out_dir, f"rank{rank}.pt")
    )


if __name__ == "__main__":
    main(sys.argv[1])
