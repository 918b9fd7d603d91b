"""Quantised and fast float layers: each fast path against its plain path, block formats against
the gguf package's reference quantisers."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from gguf import quants

from llamascope import kernels
from llamascope.formats import dequantize, quantize
from llamascope.generation import generate
from llamascope.layers import FastLinear, QuantEmbedding, QuantLinear
from llamascope.loading import load_model
from llamascope.native import native_linear
from llamascope.transforms import quantize_model

QTYPES = ["Q8_0", "Q4_0", "Q4_1"]
needs_kernels = pytest.mark.skipif(kernels.load() is None, reason="native kernels unavailable on this machine")


def test_block_sizes_are_ggmls():
    """Each kept format's weights and bytes per block are the gguf package's (ggml's own table);
    csrc/kernels.h gives each of them a format code."""
    from llamascope.formats import KEPT_FORMATS, block_layout

    for qtype in KEPT_FORMATS:
        assert block_layout(qtype) == gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, qtype)], qtype
        assert kernels.format_code(qtype) >= 0


@pytest.mark.parametrize("qtype", QTYPES)
def test_block_formats_match_ggml_reference(qtype):
    """Our quantiser writes the same bytes as the gguf package; dequantising agrees exactly."""
    torch.manual_seed(1)
    w = torch.randn(16, 160) * torch.rand(16, 1) * 3
    w[3, :32] = 0.0  # an all-zero block
    ours = quantize(w, qtype)
    reference = quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    assert np.array_equal(ours.numpy(), reference)
    expected = quants.dequantize(reference, getattr(gguf.GGMLQuantizationType, qtype))
    assert np.array_equal(dequantize(ours, qtype, 160).numpy(), expected)


@needs_kernels
def _native(layer: QuantLinear) -> QuantLinear:
    """The layer as the native backend runs it (the kernels' layout, the library attached)."""
    return native_linear(layer, kernels.load())


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("K", [32, 96, 576, 1536])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_quant_kernel_matches_plain_path(qtype, K, rows):
    """The kernel quantises activations to 8 bits per block of 32: within ~1% of the plain path."""
    torch.manual_seed(K + rows)
    layer = _native(QuantLinear.from_float(torch.randn(67, K), qtype))
    x = torch.randn(rows, K)
    fast, plain = layer(x), layer.forward_plain(x)
    assert fast.shape == plain.shape == (rows, 67)
    assert (fast - plain).abs().max() <= 0.02 * plain.abs().max()
    # Relative error per output, against the size of the exact dot product's terms.
    scale = x.abs() @ layer.dequantized().abs().t()
    assert ((fast - plain).abs() / scale).max() < 0.01


@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("at", [3, 19, 40])
def test_nan_activations_give_nan_like_the_plain_path(qtype, at):
    """A NaN anywhere in an activation row makes every output of that row NaN, as float
    arithmetic does; before, a NaN among the first 16 values of a block was lost by vmaxps."""
    layer = _native(QuantLinear.from_float(torch.randn(5, 64), qtype))
    x = torch.randn(2, 64)
    x[0, at] = float("nan")
    fast, plain = layer(x), layer.forward_plain(x)
    assert plain[0].isnan().all() and fast[0].isnan().all()
    assert not fast[1].isnan().any()


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(67, 96), (256, 576), (5, 33)])
def test_fast_float_linear_matches_torch(dtype, shape):
    torch.manual_seed(0)
    w = torch.randn(*shape).to(dtype)
    layer = FastLinear(w, None, kernels.load())
    for rows in (1, 4):
        x = torch.randn(rows, shape[1]).to(dtype)
        expected = F.linear(x, w).float()
        tolerance = 1e-5 if dtype == torch.float32 else 1e-2
        assert torch.allclose(layer(x).float(), expected, rtol=tolerance, atol=tolerance * expected.abs().max())
    x = torch.randn(2, 20, shape[1]).to(dtype)  # prefill: the plain path
    assert torch.equal(layer(x), F.linear(x, w))


def test_quant_embedding_rows():
    w = torch.randn(50, 64)
    blocks = quantize(w, "Q8_0")
    emb = QuantEmbedding(blocks, "Q8_0", 64)
    tokens = torch.tensor([[3, 7, 49], [0, 0, 1]])
    assert torch.equal(emb(tokens), dequantize(blocks, "Q8_0", 64)[tokens])


def test_fast_model_generates_like_plain_model(tiny_model):
    plain = load_model(tiny_model, backend="plain")
    fast = load_model(tiny_model)
    assert any(isinstance(m, FastLinear) for m in fast.model.modules()) == (kernels.load() is not None)
    assert not any(isinstance(m, FastLinear) for m in plain.model.modules())
    ids = plain.tokenizer.encode("My name is Mariama, my favorite")
    a = generate(plain.model, ids, max_new_tokens=32, eos_token_id=[])
    b = generate(fast.model, ids, max_new_tokens=32, eos_token_id=[])
    assert a.output_ids == b.output_ids


@pytest.mark.parametrize("quant, qtype", [("int8", "Q8_0"), ("int4", "Q4_1")])
def test_quantized_model_kernel_vs_plain_path(tiny_model, quant, qtype):
    """Same quantised weights, kernels on vs off: logits stay close at every decode step."""
    fast = load_model(tiny_model, quant=quant)
    layers = [m for m in fast.model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.qtype == qtype for m in layers if m is not fast.model.lm_head)
    assert fast.model.lm_head.qtype == "Q8_0"  # the head keeps 8 bits
    ids = fast.tokenizer.encode("Once upon a time")
    logits_fast, logits_plain = [], []
    generate(fast.model, ids, max_new_tokens=8, eos_token_id=[], on_step=lambda s: logits_fast.append(s.logits))
    for m in layers:
        m.native = None  # force the plain path
    generate(fast.model, ids, max_new_tokens=8, eos_token_id=[], on_step=lambda s: logits_plain.append(s.logits))
    # Later steps may follow different tokens after a near tie; compare prefill and the first decode step.
    # The kernels' 8-bit activations put this random model's logits 1.5-3.5% of their range away
    # from float activations on the same weights; wrong block maths would be off by the whole range.
    for step in (0, 1):
        assert (logits_fast[step] - logits_plain[step]).abs().max() <= 0.05 * logits_plain[step].abs().max()


@pytest.mark.parametrize("quant", ["int8", "int4", "q4_0"])
@pytest.mark.parametrize(
    "name,overrides",
    [
        ("gqa", {}),
        ("tied", dict(tie_word_embeddings=True)),
        ("mha-bias", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    ],
)
def test_quantising_while_loading_gives_the_transform_s_weights(model_factory, quant, name, overrides):
    """load_model(quant=...) quantises each matrix from slices of its rows as it reads them; the
    result is quantize_model's on the float model: the same blocks in every layer, the embedding
    and head in Q8_0, a tied head sharing the embedding's blocks."""
    path = model_factory(name, **overrides)
    loaded = load_model(path, quant=quant, backend="plain").model
    transformed = quantize_model(load_model(path, backend="plain").model, quant)
    qtype = {"int8": "Q8_0", "int4": "Q4_1", "q4_0": "Q4_0"}[quant]
    layers = {n: m for n, m in loaded.named_modules() if isinstance(m, QuantLinear)}
    expected = {n: m for n, m in transformed.named_modules() if isinstance(m, QuantLinear)}
    assert layers.keys() == expected.keys() and len(layers) == 7 * 2 + 1
    for n, layer in layers.items():
        assert layer.qtype == expected[n].qtype == ("Q8_0" if n == "lm_head" else qtype), n
        assert torch.equal(layer.blocks, expected[n].blocks), n
        if layer.bias is not None or expected[n].bias is not None:
            assert torch.equal(layer.bias, expected[n].bias), n
    for model in (loaded, transformed):
        embed = model.model.embed_tokens
        assert isinstance(embed, QuantEmbedding) and embed.qtype == "Q8_0"
        shared = model.lm_head.qweight.data_ptr() == embed.blocks.data_ptr()
        assert shared == bool(overrides.get("tie_word_embeddings"))
    assert torch.equal(loaded.model.embed_tokens.blocks, transformed.model.embed_tokens.blocks)
    for (n, a), (_, b) in zip(loaded.state_dict().items(), transformed.state_dict().items()):
        if a.is_floating_point():  # the norms
            assert torch.equal(a, b), n


def test_quantized_model_close_to_float(tiny_model):
    plain = load_model(tiny_model, backend="plain")
    ids = torch.tensor([plain.tokenizer.encode("My name is Mariama, my favorite")])
    positions = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        reference = plain.model(ids, positions)
        # Random weights spread wide amplify rounding through the layers; real models fare better
        # (see the perplexity figures in the README). Wrong block maths would be off by far more.
        for quant, tolerance, agreement in (("int8", 0.1, 0.8), ("int4", 0.5, 0.5)):
            found = load_model(tiny_model, quant=quant).model(ids, positions)
            assert (found - reference).abs().max() <= tolerance * reference.abs().max(), quant
            same_top1 = (found.argmax(-1) == reference.argmax(-1)).float().mean().item()
            assert same_top1 >= agreement, quant


@needs_kernels
def test_lm_head_keeps_float_activations():
    """8-bit activations beside outlier channels can swap close top candidates: the head's product
    keeps them in float32 and matches the plain path to float rounding."""
    torch.manual_seed(0)
    layer = QuantLinear.from_float(torch.randn(500, 576), "Q8_0")
    x = torch.randn(1, 576)
    x[0, 7] = 40.0  # an outlier channel, as final hidden states have
    approximate = _native(layer)(x)
    head = native_linear(layer, kernels.load(), is_head=True)
    assert head.float_activations and head.layout == "rows"
    exact, plain = head(x), head.forward_plain(x)
    assert torch.allclose(exact, plain, rtol=1e-5, atol=1e-4 * plain.abs().max())
    assert (approximate - plain).abs().max() > 10 * (exact - plain).abs().max()


@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("K", [32, 160, 2048])
def test_native_dequantisation_is_exact(qtype, K):
    """The prefill path's native dequantisation gives the plain path's numbers bit for bit."""
    torch.manual_seed(K)
    layer = _native(QuantLinear.from_float(torch.randn(37, K) * torch.rand(37, 1) * 3, qtype))
    assert torch.equal(layer.dequantized_fast(torch.float32), layer.dequantized(torch.float32))
    assert torch.equal(layer.dequantized_fast(torch.bfloat16), layer.dequantized(torch.bfloat16))


@needs_kernels
@pytest.mark.parametrize("qtype", QTYPES)
def test_long_inputs_match_plain_path(qtype):
    """Prefill-sized inputs: float32 products agree with the plain path to float rounding; the
    bfloat16 product (the default where the CPU has AVX512-BF16) to bfloat16 rounding of the
    activations and weights."""
    torch.manual_seed(3)
    layer = _native(QuantLinear.from_float(torch.randn(96, 256), qtype))
    x = torch.randn(40, 256)
    plain = layer.forward_plain(x)
    scale = x.abs() @ layer.dequantized().abs().t()  # [40, 96] size of each dot product's terms
    layer.long_inputs_in_bf16 = False
    assert ((layer(x) - plain).abs() / scale).max() < 1e-5
    if kernels.cpu_has("avx512_bf16"):
        layer.long_inputs_in_bf16 = True
        error = ((layer(x) - plain).abs() / scale).max()
        assert 1e-6 < error < 2**-7  # it does run in bfloat16, and within its rounding


@needs_kernels
@pytest.mark.parametrize("kind", ["Q8_0", "Q4_0", "Q4_1", "Q8_0-float-activations", "float32", "bfloat16"])
@pytest.mark.parametrize("K", [96, 576])  # an odd and an even number of blocks
def test_kernel_rows_are_independent(kind, K):
    """A few rows at once (batched decode, the server's slots) give each row exactly what it gets
    alone: the multi-row kernels share weight loads, not arithmetic."""
    torch.manual_seed(7)
    w = torch.randn(45, K)
    if kind in ("float32", "bfloat16"):
        dtype = getattr(torch, kind)
        layer, x = FastLinear(w.to(dtype), None, kernels.load()), torch.randn(8, K).to(dtype)
    else:
        head = kind.endswith("float-activations")
        layer, x = native_linear(QuantLinear.from_float(w, kind[:4]), kernels.load(), is_head=head), torch.randn(8, K)
        assert layer.float_activations == head
    alone = torch.cat([layer(x[i : i + 1]) for i in range(8)])
    for rows in (2, 5, 8):
        assert torch.equal(layer(x[:rows]), alone[:rows]), rows


# ---- K-quants (GGUF Q2_K to Q6_K): kept as stored, read by csrc/kquant.c -------------------

K_QTYPES = ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"]


def _k_layer(qtype: str, N: int, K: int, seed: int) -> QuantLinear:
    """A layer of random super-blocks: every bit of the packed scales, minimums and high bits varies."""
    from gguf_fixtures import random_blocks

    raw = random_blocks(np.random.default_rng(seed), N, K, qtype)  # [N, K/256 * bytes]
    return _native(QuantLinear(torch.from_numpy(raw), qtype, K))


def _eight_bit(x: torch.Tensor) -> torch.Tensor:
    """x as the kernels quantise it (per 32 values: d = max|x| / 127, q = round-half-even(x / d)),
    in float64: the activations every block product of the kernels sees."""
    blocks = x.reshape(-1, 32)
    d = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.round(blocks * torch.where(d > 0, 1.0 / d, torch.zeros_like(d)))
    return (q.double() * d.double()).reshape(x.shape)


@needs_kernels
@pytest.mark.parametrize("qtype", K_QTYPES)
@pytest.mark.parametrize("K", [256, 768, 2048, 4096])  # (4096 with 8 rows: scratch on the heap, not the stack)
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_k_quant_kernel_is_the_exact_product_of_its_8_bit_activations(qtype, K, rows):
    """Against the reference dequantiser's weights (gguf-py) and the 8-bit activations, the kernel
    is exact up to float32 summation (any misplaced scale, minimum, nibble or high bit would show
    as an error of the weights' own size), and within ~1% of the plain float path."""
    layer = _k_layer(qtype, 45, K, seed=K + rows)
    torch.manual_seed(K + rows)
    x = torch.randn(rows, K)
    w = layer.dequantized().double()  # [45, K]
    fast = layer(x).double()
    scale = x.abs().double() @ w.abs().t()  # [rows, 45] the size of each dot product's terms
    assert ((fast - _eight_bit(x) @ w.t()).abs() / scale).max() < 1e-5
    assert ((fast - layer.forward_plain(x).double()).abs() / scale).max() < 0.01


@needs_kernels
@pytest.mark.parametrize("qtype", K_QTYPES)
def test_k_quant_rows_are_independent_and_nan_propagates(qtype):
    layer = _k_layer(qtype, 33, 512, seed=5)
    torch.manual_seed(5)
    x = torch.randn(8, 512)
    alone = torch.cat([layer(x[i : i + 1]) for i in range(8)])
    for rows in (2, 5, 8):
        assert torch.equal(layer(x[:rows]), alone[:rows]), rows
    x[1, 300] = float("nan")
    out = layer(x[:3])
    assert out[1].isnan().all() and not out[0].isnan().any() and not out[2].isnan().any()


@needs_kernels
@pytest.mark.parametrize("qtype", K_QTYPES)
def test_k_quant_native_dequantisation_is_exact(qtype):
    """The prefill path's native dequantisation gives gguf-py's numbers bit for bit (and their
    bfloat16 rounding), and long inputs agree with the plain path to float rounding."""
    layer = _k_layer(qtype, 37, 768, seed=9)
    reference = layer.dequantized(torch.float32)
    assert torch.equal(layer.dequantized_fast(torch.float32), reference)
    assert torch.equal(layer.dequantized_fast(torch.bfloat16), reference.bfloat16())
    x = torch.randn(40, 768)
    layer.long_inputs_in_bf16 = False
    scale = x.abs() @ reference.abs().t()
    assert ((layer(x) - layer.forward_plain(x)).abs() / scale).max() < 1e-5


def test_k_quant_needs_whole_super_blocks():
    from llamascope.errors import LlamascopeError

    with pytest.raises(LlamascopeError, match="Q4_K weights need an input size that is a multiple of 256, not 320"):
        QuantLinear(torch.zeros(4, 180, dtype=torch.uint8), "Q4_K", 320)
    # rows of the wrong length would send the kernel past the end of each row
    with pytest.raises(
        LlamascopeError,
        match=r"Q6_K weights of input size 512 take 420 bytes a row, got blocks of "
        r"shape \[4, 288\]",
    ):
        QuantLinear(torch.zeros(4, 288, dtype=torch.uint8), "Q6_K", 512)
    with pytest.raises(LlamascopeError, match=r"Q8_0 weights of input size 64 take 68 bytes a row"):
        QuantLinear(torch.zeros(4, 34, dtype=torch.uint8), "Q8_0", 64)


@pytest.mark.parametrize("qtype", K_QTYPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_k_quant_embedding_rows_are_the_reference_rows(qtype, dtype):
    """A K-quant token_embd (Q4_K_M files have one) looks rows up natively: gguf-py's numbers."""
    from gguf_fixtures import random_blocks

    raw = torch.from_numpy(random_blocks(np.random.default_rng(3), 50, 512, qtype))
    embedding = QuantEmbedding(raw, qtype, 512, dtype)
    embedding.native = kernels.load()
    tokens = torch.tensor([[0, 49, 7], [7, 23, 1]])
    expected = dequantize(raw, qtype, 512, dtype)[tokens]  # [2, 3, 512]
    assert torch.equal(embedding(tokens), expected)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("N, K", [(1, 32), (23, 128), (23, 96), (37, 352), (300, 576)])
def test_native_block_packing_gives_the_reference_bytes(qtype, N, K):
    """The kernel library's pack_blocks (what loading uses) gives formats.pack_blocks' bytes, on one
    or two threads, for whole and padded groups of four blocks."""
    import llamascope.formats as quant

    lib = kernels.load()
    size = quant.BLOCK_BYTES[qtype]
    blocks = torch.randint(0, 256, (N, K // 32 * size), dtype=torch.uint8, generator=torch.Generator().manual_seed(N))
    reference = quant.pack_blocks(blocks, qtype, K)
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            assert torch.equal(quant.pack_blocks(blocks, qtype, K, lib), reference)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_0", "Q4_1"])
@pytest.mark.parametrize("K", [128, 96, 352])  # whole groups of four blocks, and padded ones
def test_block_packing_in_row_slices(qtype, K, monkeypatch):
    """pack_blocks packs a few rows at a time into its result: the same bytes as packing the rows one
    by one, each group laid out as the kernel reads it (Q4: nibbles, scales, minimums; Q8_0: weights
    0-15 of each block, 16-31 of each, both as q + 128, then the scales), zero blocks as padding,
    and unpack_blocks gives the blocks back."""
    import llamascope.formats as quant

    N, nb = 23, K // 32
    size = quant.BLOCK_BYTES[qtype]
    blocks = torch.randint(0, 256, (N, nb * size), dtype=torch.uint8)
    nbp = (nb + 3) // 4 * 4
    monkeypatch.setattr(quant, "CONVERT_ROWS_BYTES", 4 * 3 * nbp * size)  # 4 rows a slice
    packed = quant.pack_blocks(blocks, qtype, K)
    one_by_one = torch.cat([quant.pack_blocks(blocks[r : r + 1], qtype, K) for r in range(N)])
    assert torch.equal(packed, one_by_one)
    assert torch.equal(quant.unpack_blocks(packed, qtype, K), blocks)
    group = {"Q8_0": 136, "Q4_0": 72, "Q4_1": 80}[qtype]
    first = blocks[5].reshape(nb, size)[:4]  # row 5's first group: blocks 0-3 (zero past nb)
    first = torch.cat([first, torch.zeros(4 - len(first), size, dtype=torch.uint8)])
    if qtype == "Q8_0":
        as_unsigned = (first[:, 2:].view(torch.int8).to(torch.int16) + 128).to(torch.uint8)  # [4, 32] q + 128
        expect = torch.cat(
            [as_unsigned[:, :16].reshape(-1), as_unsigned[:, 16:].reshape(-1), first[:, 0:2].reshape(-1)]
        )
    else:
        expect = torch.cat(
            [first[:, -16:].reshape(-1), first[:, 0:2].reshape(-1)]
            + ([first[:, 2:4].reshape(-1)] if qtype == "Q4_1" else [])
        )
    assert torch.equal(packed[5, :group], expect)
    if nb % 4:
        last = packed[5].reshape(-1, group)[-1]
        pad = 4 - nb % 4
        scales = 128 if qtype == "Q8_0" else 64
        assert not last[scales + 8 - 2 * pad : scales + 8].any()  # padded blocks: d = 0
        if qtype == "Q8_0":  # and q = 0, stored as 128
            assert (last[64 - 16 * pad : 64] == 128).all() and (last[128 - 16 * pad : 128] == 128).all()
        else:
            assert not last[64 - 16 * pad : 64].any()
