"""Shared fixtures: tiny config-built models (fixed seed) and the slow/gpu markers."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", default=False, help="run tests marked slow")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    skip_slow = pytest.mark.skip(reason="slow: pass --run-slow to run")
    skip_gpu = pytest.mark.skip(reason="gpu: no CUDA device")
    run_slow = config.getoption("--run-slow")
    for item in items:
        if "slow" in item.keywords and not run_slow:
            item.add_marker(skip_slow)
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """Run a test single-threaded: tiny matrices gain nothing from threads, and on a busy machine
    OpenMP spin-waits dominate (an SVD of a [2048, 4] matrix took 0.14 s instead of 40 µs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def linear_and_conv1d(
    out_features: int, in_features: int, bias: bool = True
) -> tuple[nn.Linear, Conv1D]:
    """An ``nn.Linear`` and a GPT-2 ``Conv1D`` holding the same logical W: [out, in] and bias."""
    linear = nn.Linear(in_features, out_features, bias=bias)
    conv = Conv1D(nf=out_features, nx=in_features)
    with torch.no_grad():
        conv.weight.copy_(linear.weight.T)
        if bias:
            conv.bias.copy_(linear.bias)
        else:
            conv.bias.zero_()
    return linear, conv


def word_tokenizer(words: list[str]):
    """An offline word-level HF tokenizer: [PAD] = 0, [UNK] = 1, then ``words`` from id 2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", *words])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def devices() -> list[pytest.param]:
    """CPU always; CUDA as a ``gpu``-marked param."""
    return [
        pytest.param("cpu", id="cpu"),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ]


# --- tiny config-built models, one per architecture family --------------------------------------
# Every width is 64 and every MLP 128, so one recipe fits all: ranks ≤ 64, a_shape (8, 8) and
# N:M with M | 64 divide every matrix.

BLOCK_LINEARS = r".*\.(h|layers|layer|block)\.\d+\..*"


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(
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


def _llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=128,
            max_position_embeddings=64,
            tie_word_embeddings=True,
        )
    )


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(
        BertConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
            num_labels=3,
        )
    )


def _opt() -> nn.Module:
    from transformers import OPTConfig, OPTForCausalLM

    return OPTForCausalLM(
        OPTConfig(
            hidden_size=64,
            ffn_dim=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            vocab_size=128,
            max_position_embeddings=64,
            word_embed_proj_dim=64,
        )
    )


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(
        T5Config(
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            vocab_size=128,
            decoder_start_token_id=0,
        )
    )


TINY_MODELS = {"gpt2": _gpt2, "llama": _llama, "bert": _bert, "opt": _opt, "t5": _t5}


def tiny_model(arch: str) -> nn.Module:
    """A tiny ``arch`` model in eval mode, built from a config with seed 0."""
    torch.manual_seed(0)
    return TINY_MODELS[arch]().eval()


def tiny_inputs(arch: str, model: nn.Module) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    if arch == "t5":
        return {"input_ids": ids, "decoder_input_ids": ids[:, :6]}
    return {"input_ids": ids}


def model_output(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


@pytest.fixture(params=list(TINY_MODELS))
def arch(request: pytest.FixtureRequest) -> str:
    return request.param


def snapshot(model: nn.Module) -> dict:
    """Everything ``assert_unchanged`` compares: state, module types, config."""
    return {
        "state": {k: v.clone() for k, v in model.state_dict().items()},
        "types": {n: type(m) for n, m in model.named_modules()},
        "config": model.config.to_dict(),
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """The model is exactly as ``snapshot`` saw it, and carries no hfcompress structure."""
    assert {n: type(m) for n, m in model.named_modules()} == before["types"]
    state = model.state_dict()
    assert state.keys() == before["state"].keys()
    for key, value in state.items():
        assert torch.equal(value, before["state"][key]), key
    assert model.config.to_dict() == before["config"]


def logits_without_hfcompress(folder, cls: str, ids: torch.Tensor, tmp_path) -> torch.Tensor:
    """Logits of ``transformers.<cls>.from_pretrained(folder)`` in a fresh process that never
    imports hfcompress (a plain checkpoint must load anywhere); tensors travel as safetensors."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    save_file({"ids": ids.contiguous()}, tmp_path / "ids.safetensors")
    code = (
        "import sys, torch, transformers\n"
        "from safetensors.torch import load_file, save_file\n"
        f"m = getattr(transformers, {cls!r}).from_pretrained({str(folder)!r}).eval()\n"
        f"ids = load_file({str(tmp_path / 'ids.safetensors')!r})['ids']\n"
        "kw = {'decoder_input_ids': ids[:, :6]} if m.config.is_encoder_decoder else {}\n"
        "with torch.no_grad(): out = m(input_ids=ids, **kw).logits\n"
        "assert 'hfcompress' not in sys.modules\n"
        f"save_file({{'out': out.contiguous()}}, {str(tmp_path / 'out.safetensors')!r})\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True)
    return load_file(tmp_path / "out.safetensors")["out"]
