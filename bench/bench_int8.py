"""int8 variants of one SmolLM2-135M form: memory, perplexity, prefill and decode speed.

``hfcompress.quantize_int8`` has several routes, which differ in accuracy and speed:

* ``torchao-weight-only``: ``quantize_int8(model)``, the default mode ``"weight-only"``:
  torchao ``Int8WeightOnlyConfig`` (weights int8, activations float);
* ``ao-dynamic``: ``mode="dynamic"`` on CPU, PyTorch's dynamic quantization (int8 weights with
  one scale per output row; activations quantized with one scale per tensor, i.e. per call);
* ``ao-dynamic-no-down``: the same with ``exclude=r".*down_proj"`` (the MLP output projections,
  whose inputs carry the largest activation outliers, stay in float32);
* ``torchao-dynamic``: torchao ``Int8DynamicActivationInt8WeightConfig`` (activations
  quantized per token).

Each variant is applied to the same base form (``--base``: dense, or 50% magnitude pruning of
every decoder Linear, frozen) and timed in alternating rounds against the float32 base, so
that the ratios compare measurements taken in the same run.

Usage:
    python bench/bench_int8.py                       # base dense, 3 rounds
    python bench/bench_int8.py --base prune50 --variants ao-dynamic torchao-weight-only
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT.parent / "examples"))

from bench_generate import batch_of, decode, prefill, timed, token_data  # noqa: E402

VARIANTS = ("ao-dynamic", "ao-dynamic-no-down", "torchao-weight-only", "torchao-dynamic")
DECODER = r"model\.layers\.\d+\..*"


def quantized(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    import hfcompress

    model = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if variant == "ao-dynamic":
            return hfcompress.quantize_int8(model, "dynamic")
        if variant == "ao-dynamic-no-down":
            return hfcompress.quantize_int8(model, "dynamic", exclude=r".*down_proj")
        if variant == "torchao-weight-only":
            return hfcompress.quantize_int8(model)  # the default mode
        if variant == "torchao-dynamic":
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig

            return hfcompress.quantize_int8(model, config=Int8DynamicActivationInt8WeightConfig())
    raise ValueError(variant)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", choices=["dense", "prune50"], default="dense")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", default=None, help="append the table to this file")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import hfcompress
    from hfcompress.evaluation import perplexity
    from offline_data import smollm2_dir

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    cpu = torch.device("cpu")
    folder = smollm2_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    ids = token_data(tokenizer, max(args.eval_tokens, args.prompt_tokens))
    prompt = batch_of(ids, 1, args.prompt_tokens, cpu)
    short = batch_of(ids, 1, 16, cpu)

    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    if args.base == "prune50":
        stage = {"method": "prune", "targets": DECODER, "sparsity": 0.5, "criterion": "magnitude"}
        hfcompress.compress_model(base, {"stages": [stage], "exclude": "lm_head"}, progress=False)
        hfcompress.freeze(base)
    base.requires_grad_(False)
    forms = {args.base: base}
    for variant in args.variants:
        forms[f"{args.base}+{variant}"] = quantized(base, variant)

    rows = {}
    with torch.inference_mode():
        for name, model in forms.items():
            ppl = perplexity(model, ids[:, : args.eval_tokens], 512, 256, progress=False)
            prefill(model, prompt[:, :32])
            decode(model, short, 2)
            rows[name] = {"MB": hfcompress.model_bytes(model) / 1e6, "ppl": ppl.perplexity}
            rows[name]["prefill"], rows[name]["decode"] = [], []
            print(f"built {name}: {rows[name]['MB']:.1f} MB, ppl {ppl.perplexity:.2f}", flush=True)
        for r in range(args.rounds):
            for name, model in forms.items():
                rows[name]["prefill"].append(timed(lambda m=model: prefill(m, prompt), cpu))
                rows[name]["decode"].append(
                    timed(lambda m=model: decode(m, short, args.new_tokens), cpu)
                )
            print(f"round {r + 1}/{args.rounds}", flush=True)

    ref = rows[args.base]
    median = statistics.median
    prefill_rate = {n: args.prompt_tokens / median(v["prefill"]) for n, v in rows.items()}
    decode_rate = {n: args.new_tokens / median(v["decode"]) for n, v in rows.items()}
    head = (
        "| form | model MB | × base | ppl | × base | prefill tok/s | × base "
        "| decode tok/s | × base |"
    )
    lines = [head, "|---|" + "---:|" * 8]
    for name, v in rows.items():
        lines.append(
            f"| {name} | {v['MB']:.1f} | {v['MB'] / ref['MB']:.2f} | {v['ppl']:.2f} | "
            f"{v['ppl'] / ref['ppl']:.2f} | {prefill_rate[name]:,.0f} | "
            f"{prefill_rate[name] / prefill_rate[args.base]:.2f} | {decode_rate[name]:,.1f} | "
            f"{decode_rate[name] / decode_rate[args.base]:.2f} |"
        )
    env = (
        f"torch {torch.__version__}, CPU float32, {torch.get_num_threads()} threads, median of "
        f"{args.rounds} rounds, prefill {args.prompt_tokens} tokens batch 1, decode "
        f"{args.new_tokens} tokens batch 1 after 16, ppl on {args.eval_tokens} held-out tokens"
    )
    table = "\n".join(lines)
    print(f"\n{env}\n\n{table}")
    if args.markdown:
        command = "python bench/bench_int8.py " + " ".join(sys.argv[1:])
        with open(args.markdown, "a", encoding="utf-8") as f:
            f.write(f"\n### int8 routes, SmolLM2-135M\n\n`{command}` ({env})\n\n{table}\n")


if __name__ == "__main__":
    main()
