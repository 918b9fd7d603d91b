"""Runs only where a GPU is present: the same engine on a CUDA device, chosen at load (`device=` /
`--device`).

Where PyTorch sees no GPU, only the device-choice errors run and every other test here is
skipped; where it sees one, the tokens and numbers on the GPU must be the CPU's (and
transformers') for the same weights.
"""

from __future__ import annotations

import pytest
import torch

from llamascope.cli import main
from llamascope.engine import Engine
from llamascope.errors import LlamascopeError
from llamascope.generation import generate
from llamascope.loading import load_model, resolve_device
from llamascope.perplexity import perplexity

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="PyTorch sees no CUDA device")

PROMPT = [1, 17, 42, 99, 7]


def test_auto_is_the_cpu_without_a_gpu_and_bad_devices_are_named():
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
        with pytest.raises(LlamascopeError, match="--device cuda: PyTorch sees no CUDA device"):
            resolve_device("cuda")
    else:
        assert resolve_device("auto").type == "cuda"
        with pytest.raises(LlamascopeError, match="CUDA device"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    with pytest.raises(LlamascopeError, match="--device 'tpu': expected auto, cpu, cuda or cuda:N"):
        resolve_device("tpu")
    with pytest.raises(LlamascopeError, match="runs on cpu or cuda"):
        resolve_device("meta")


def test_cli_names_a_missing_gpu(tiny_model, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["generate", "--model", str(tiny_model), "--device", "cuda", "hello"]) == 1
    assert "--device cuda: PyTorch sees no CUDA device" in capsys.readouterr().err


@needs_cuda
@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_tokens_on_cuda_equal_transformers(tiny_model, use_cache):
    from transformers import LlamaForCausalLM

    model = load_model(tiny_model, device="cuda").model
    assert model.device.type == "cuda" and model.decode_step is None
    ours = generate(model, PROMPT, max_new_tokens=24, eos_token_id=[], use_cache=use_cache).output_ids[0]
    reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    theirs = reference.generate(
        torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(PROMPT) :].tolist()
    assert ours == theirs


@needs_cuda
def test_padded_batch_and_sampling_on_cuda(tiny_model):
    """Left padding (the 4-D mask) and seeded sampling (the generator on the model's device)."""
    model = load_model(tiny_model, device="cuda").model
    prompts = [PROMPT, PROMPT[2:]]
    batch = generate(model, prompts, max_new_tokens=8, eos_token_id=[]).output_ids
    alone = [generate(model, p, max_new_tokens=8, eos_token_id=[]).output_ids[0] for p in prompts]
    assert batch == alone
    first = generate(model, PROMPT, max_new_tokens=8, do_sample=True, seed=3, eos_token_id=[]).output_ids
    assert first == generate(model, PROMPT, max_new_tokens=8, do_sample=True, seed=3, eos_token_id=[]).output_ids


@needs_cuda
def test_gguf_blocks_on_cuda_give_the_cpu_logits(tmp_path):
    from gguf_fixtures import write_tiny_llama

    path = write_tiny_llama(tmp_path / "tiny.gguf").path
    cpu = load_model(path, backend="plain").model
    gpu = load_model(path, device="cuda").model
    with torch.inference_mode():
        tokens, positions = torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None]
        expected = cpu(tokens, positions)
        got = gpu(tokens.cuda(), positions.cuda()).cpu()
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()


@needs_cuda
def test_perplexity_and_trace_on_cuda(tiny_model):
    from llamascope.trace import trace

    cpu, gpu = Engine.load(tiny_model), Engine.load(tiny_model, device="cuda")
    ids = list(range(3, 60))
    assert perplexity(gpu.model, ids, window=32, stride=16)[0] == pytest.approx(
        perplexity(cpu.model, ids, window=32, stride=16)[0], rel=1e-4
    )
    record = trace(gpu, PROMPT, max_new_tokens=3, lens=True)
    on_cpu = trace(cpu, PROMPT, max_new_tokens=3)
    assert [s.chosen.id for s in record.steps] == [s.chosen.id for s in on_cpu.steps]


@needs_cuda
def test_bench_on_cuda(tiny_model, capsys):
    assert (
        main(
            [
                "bench",
                "--model",
                str(tiny_model),
                "--device",
                "cuda",
                "--new-tokens",
                "4",
                "--prompt-tokens",
                "4",
                "--prefill-tokens",
                "16",
                "--repeats",
                "1",
                "--json",
            ]
        )
        == 0
    )
    assert '"device": "cuda:' in capsys.readouterr().out


@needs_cuda
def test_compiled_decode_on_cuda_equals_transformers(tiny_model):
    """`--backend compiled` on the GPU: the decode step runs as one compiled graph; tokens as transformers'."""
    from transformers import LlamaForCausalLM

    from llamascope.compiled import CompiledDecode

    model = load_model(tiny_model, device="cuda", backend="compiled").model
    assert type(model.decode_step) is CompiledDecode
    reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    for prompt in (PROMPT, PROMPT[:3]):
        ours = generate(model, prompt, max_new_tokens=24, eos_token_id=[]).output_ids[0]
        theirs = reference.generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
        )[0, len(prompt) :].tolist()
        assert ours == theirs
