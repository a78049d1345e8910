"""One distillation step on 2 processes: FSDP2 (``fully_shard``) against DDP, same tiny model.

The student is a GPT-2 (4 blocks, width 256, vocabulary 2048) with every block linear pruned to
50% (``PrunedLinear``: weight + bool mask); the teacher is the dense model. Each step is a
student forward/backward, a teacher forward, the distillation loss (α = 0.5, T = 2), AdamW
(weight decay 0.1) and the mask re-application of ``GradualPruningCallback``. Per rank it reports
the median step time and two memories: the bytes the training state takes on that rank
(student parameters + gradients + optimizer state + masks + teacher parameters, counted from
the local tensors) and the process's peak RSS (which includes torch itself).

Modes: ``ddp`` (student in DDP, whole teacher on each rank), ``fsdp`` (student and teacher
sharded with ``hfcompress.training.shard_model``), ``fsdp-whole-teacher``.

Usage:
    python bench/bench_distributed.py                    # launches torchrun for every mode
    python bench/bench_distributed.py --steps 30 --markdown docs/benchmarks.md
    torchrun --nproc_per_node=2 bench/bench_distributed.py --worker fsdp   # one mode
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import GPT2Config, GPT2LMHeadModel

from hfcompress import PrunedLinear, compress_model
from hfcompress.training import shard_model
from hfcompress.training.distributed import apply_mask_, local_tensor
from hfcompress.training.losses import distillation_loss

MODES = ("ddp", "fsdp", "fsdp-whole-teacher")


def build() -> tuple[GPT2LMHeadModel, GPT2LMHeadModel]:
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=2048,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    teacher = GPT2LMHeadModel(config).eval().requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    recipe = {"stages": [{"method": "prune", "targets": r".*\.h\.\d+\..*", "sparsity": 0.5}]}
    compress_model(student, recipe, progress=False)
    return student, teacher


def _bytes(tensors) -> int:
    return sum(local_tensor(t).numel() * local_tensor(t).element_size() for t in tensors)


def state_bytes(student, teacher, optimizer) -> int:
    params = list(student.parameters())
    grads = [p.grad for p in params if p.grad is not None]
    moments = [v for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
    masks = [m.mask for m in student.modules() if isinstance(m, PrunedLinear)]
    return (
        _bytes(params)
        + _bytes(grads)
        + _bytes(moments)
        + _bytes(masks)
        + _bytes(teacher.parameters())
    )


def worker(mode: str, steps: int, batch: int, seq: int, out: str | None) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    student, teacher = build()
    if mode == "ddp":
        trained = torch.nn.parallel.DistributedDataParallel(student)
    else:
        shard_model(student)
        if mode == "fsdp":
            shard_model(teacher)
        trained = student
    assert (mode != "ddp") == isinstance(next(student.parameters()), DTensor)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, weight_decay=0.1)
    pruned = [m for m in student.modules() if isinstance(m, PrunedLinear)]
    g = torch.Generator().manual_seed(1 + rank)
    times = []
    for step in range(steps + 3):
        ids = torch.randint(0, 2048, (batch, seq), generator=g)
        start = time.perf_counter()
        logits = trained(input_ids=ids).logits
        with torch.no_grad():
            teacher_logits = teacher(input_ids=ids).logits
        if mode == "fsdp":
            teacher.reshard()
        loss, _, _ = distillation_loss(
            logits, teacher_logits, ids, alpha=0.5, temperature=2.0, causal=True
        )
        loss.backward()
        optimizer.step()
        for layer in pruned:
            apply_mask_(layer)
        held = state_bytes(student, teacher, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if step >= 3:  # warm-up
            times.append(time.perf_counter() - start)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    row = {"mode": mode, "rank": rank, "step_ms": 1000 * statistics.median(times),
           "state_mb": held / 2**20, "peak_rss_mb": peak_rss}  # fmt: skip
    rows = [None, None]
    dist.all_gather_object(rows, row)
    if rank == 0 and out:
        with open(out, "w", encoding="utf-8") as f:
            json.dump(rows, f)
    dist.destroy_process_group()


def launch(mode: str, args: argparse.Namespace, out: str) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--standalone",
        __file__, "--worker", mode, "--steps", str(args.steps), "--batch", str(args.batch),
        "--seq", str(args.seq), "--out", out,
    ]  # fmt: skip
    subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    with open(out, encoding="utf-8") as f:
        return json.load(f)


def table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        f"### 2 processes (gloo, CPU), GPT-2 4×256, batch {args.batch}×{args.seq} per rank, "
        f"{args.steps} steps, torch {torch.__version__}, {platform.machine()}",
        "",
        "| mode | rank | step (ms, median) | training state on the rank (MB) | peak RSS (MB) |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['mode']} | {r['rank']} | {r['step_ms']:.0f} | {r['state_mb']:.1f} "
            f"| {r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", choices=MODES, help="run one mode (under torchrun)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", help="(worker) where rank 0 writes its JSON rows")
    parser.add_argument("--markdown", help="append the table to this file")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.batch, args.seq, args.out)
        return
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode in MODES:
            rows += launch(mode, args, os.path.join(tmp, f"{mode}.json"))
    text = table(rows, args)
    print(text)
    if args.markdown:
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write("\n" + text)


if __name__ == "__main__":
    main()
