"""The native decode step (one call per token for the whole stack) against the module path, which
runs the same kernels one module at a time, and against the plain PyTorch path."""

from __future__ import annotations

import pytest
import torch

from llamascope import decode_step, kernels
from llamascope.cache import KVCache
from llamascope.generation import generate
from llamascope.loading import load_model
from llamascope.native import accelerate

pytestmark = pytest.mark.skipif(kernels.load() is None, reason="native kernels unavailable on this machine")

PROMPT = [1, 17, 42, 99, 7]


def _step_logits(model, native: bool, steps: int = 12) -> torch.Tensor:
    """Logits of `steps` one-token decode steps after the prompt, feeding each step's argmax."""
    saved = model.decode_step
    model.decode_step = saved if native else None
    try:
        cache = KVCache.for_model(model, 1, 64)
        with torch.inference_mode():
            logits = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], cache, last_only=True)
            out = []
            for _ in range(steps):
                token = logits[:, -1].argmax(-1, keepdim=True)  # [1, 1]
                logits = model(token, torch.tensor([[cache.length]]), cache)  # [1, 1, V]
                out.append(logits)
        return torch.cat(out, dim=1)  # [1, steps, V]
    finally:
        model.decode_step = saved


@pytest.mark.parametrize("quant", [None, "int8", "int4", "q4_0"])
@pytest.mark.parametrize(
    "name,overrides",
    [
        ("gqa", {}),
        ("mha-bias", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True)),
    ],
)
def test_native_step_equals_module_path(model_factory, quant, name, overrides):
    """Same kernels in the same order on the same numbers: bit-identical logits, for float and
    block-format weights (8-bit activations make any difference visible, so this is strict)."""
    model = load_model(model_factory(name, **overrides), quant=quant).model
    assert model.decode_step is not None
    native, modules = _step_logits(model, True), _step_logits(model, False)
    assert torch.equal(native, modules)


def test_native_step_matches_plain_float_path_and_transformers_tokens(tiny_model):
    from transformers import LlamaForCausalLM

    fast = load_model(tiny_model).model
    plain = load_model(tiny_model, backend="plain").model
    assert fast.decode_step is not None and plain.decode_step is None
    assert (_step_logits(fast, True) - _step_logits(plain, False)).abs().max() < 1e-4
    ours = generate(fast, PROMPT, max_new_tokens=24, eos_token_id=[]).output_ids[0]
    reference = LlamaForCausalLM.from_pretrained(tiny_model).eval()
    theirs = reference.generate(
        torch.tensor([PROMPT]), max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(PROMPT) :].tolist()
    assert ours == theirs


def test_unfused_projections_take_the_three_part_route(tiny_model):
    """q, k, v (and gate, up) kept as separate layers: the step runs them side by side."""
    model = accelerate(load_model(tiny_model, backend="plain").model, kernels.load())  # kernels, no fusion
    assert decode_step.enable(model, kernels.load())
    assert model.decode_step.stack.layers[0].n_qkv == 3 and model.decode_step.stack.layers[0].n_gate_up == 2
    # (the unfused module path runs attention and SiLU through PyTorch: float rounding only)
    assert (_step_logits(model, True) - _step_logits(model, False)).abs().max() < 1e-4


def test_step_applies_only_where_the_module_path_would_use_the_kernels(tiny_model):
    model = load_model(tiny_model).model
    step = model.decode_step
    cache = KVCache.for_model(model, 1, 16)
    one = torch.tensor([[5]])
    assert step.applies(one, cache, None, None)
    assert not step.applies(one, cache, None, {})  # capturing activations (trace)
    assert not step.applies(torch.tensor([[5, 6]]), cache, None, None)  # prefill
    assert step.applies(torch.tensor([[5], [6]]), KVCache.for_model(model, 2, 16), None, None)  # batch
    assert not step.applies(
        torch.tensor([[5], [6]]), KVCache.for_model(model, 2, 16), torch.ones(2, 1, 1, 3, dtype=torch.bool), None
    )  # left padding: the rows' columns differ from their positions
    assert not step.applies(torch.zeros(9, 1, dtype=torch.long), KVCache.for_model(model, 9, 16), None, None)
    assert not step.applies(one, None, None, None)  # no cache
    assert load_model(tiny_model, backend="plain").model.decode_step is None
    bf16 = load_model(tiny_model, dtype="bfloat16").model  # its own step, for bfloat16 caches only
    assert bf16.decode_step is not None and not bf16.decode_step.applies(one, cache, None, None)
    assert bf16.decode_step.applies(one, KVCache.for_model(bf16, 1, 16), None, None)


@pytest.mark.parametrize(
    "name,overrides", [("gqa", {}), ("mha-bias", dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True))]
)
def test_bfloat16_step_rounds_where_pytorch_rounds(model_factory, name, overrides):
    """The bfloat16 step rounds after the same operations as PyTorch in bfloat16; only float sums
    taken in another order differ. So logits agree to a few bfloat16 steps of their size, and the
    greedy tokens agree with the module path (and transformers, see test_parity's bfloat16 case)
    until two candidates come within bfloat16 rounding of each other."""
    from test_parity import assert_equal_until_near_tie

    model = load_model(model_factory(name, **overrides), dtype="bfloat16").model
    assert model.decode_step is not None and model.decode_step.dtype == torch.bfloat16
    native, modules = _step_logits(model, True).float(), _step_logits(model, False).float()
    assert (native[0, 0] - modules[0, 0]).abs().max() <= 4 * 2**-8 * modules[0, 0].abs().max()
    logits = []
    with_step = generate(model, PROMPT, max_new_tokens=24, eos_token_id=[]).output_ids[0]
    saved, model.decode_step = model.decode_step, None
    without = generate(
        model, PROMPT, max_new_tokens=24, eos_token_id=[], on_step=lambda step: logits.append(step.logits[0])
    ).output_ids[0]
    model.decode_step = saved
    assert_equal_until_near_tie(without, with_step, logits)


def test_a_full_cache_is_refused_before_the_native_call(tiny_model):
    from llamascope.errors import LlamascopeError

    model = load_model(tiny_model).model
    cache = KVCache.for_model(model, 1, 2)
    with torch.inference_mode():
        model(torch.tensor([[1, 2]]), torch.tensor([[0, 1]]), cache)
        with pytest.raises(LlamascopeError, match="KV cache full"):
            model(torch.tensor([[3]]), torch.tensor([[2]]), cache)


def test_replacing_layers_replaces_the_stale_step(tiny_model):
    """Quantising a model on the native backend keeps it there: the new layers get the kernels, and
    the decode step (which pointed at the float weights just replaced) is made again over them."""
    from llamascope.layers import QuantLinear
    from llamascope.transforms import quantize_model

    model = load_model(tiny_model).model
    stale = model.decode_step
    assert stale is not None
    quantize_model(model, "int8")
    assert model.decode_step is not None and model.decode_step is not stale
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    assert layers and all(m.native is not None for m in layers)
    assert model.lm_head.float_activations and model.model.layers[0].self_attn.qkv_proj.layout == "packed"
    assert torch.equal(_step_logits(model, True), _step_logits(model, False))


def _alone(model, prompt: list[int], steps: int) -> list[torch.Tensor]:
    """Each step's logits [V] for one sequence over its own KVCache, feeding argmax tokens."""
    cache = KVCache.for_model(model, 1, 64)
    out = []
    with torch.inference_mode():
        logits = model(torch.tensor([prompt]), torch.arange(len(prompt))[None], cache, last_only=True)
        for _ in range(steps):
            token = logits[:, -1].argmax(-1, keepdim=True)
            logits = model(token, torch.tensor([[cache.length]]), cache)
            out.append(logits[0, 0])
    return out


@pytest.mark.parametrize("quant", [None, "int4"])
def test_server_slots_of_different_lengths_equal_each_sequence_alone(tiny_model, quant):
    """The server's batched decode (a SlotBatch: each sequence at its own column) through the native
    step gives each sequence bit for bit what it gets alone; the kernels work row by row."""
    from llamascope.cache import SlotKVCache

    model = load_model(tiny_model, quant=quant).model
    prompts = [[1, 5, 9], [1, 17, 42, 99, 7, 3], [1, 8]]
    steps = 6
    expected = [_alone(model, p, steps) for p in prompts]
    slots = SlotKVCache.for_model(model, num_slots=4, slot_capacity=64)
    tokens = []
    with torch.inference_mode():
        for p in prompts:
            prefill = KVCache.for_model(model, 1, 64)
            logits = model(torch.tensor([p]), torch.arange(len(p))[None], prefill, last_only=True)
            slot = slots.allocate()
            slots.load(slot, prefill)
            tokens.append(int(logits[0, -1].argmax()))
        order = [2, 0, 1]  # rows in another order than the slots
        for step in range(steps):
            batch = slots.batch(order, 1)
            assert model.decode_step.applies(torch.zeros(3, 1, dtype=torch.long), batch, batch.mask(1), None)
            logits = model(torch.tensor([[tokens[s]] for s in order]), batch.positions(1), batch, batch.mask(1))
            for row, s in enumerate(order):
                assert torch.equal(logits[row, 0], expected[s][step]), f"slot {s}, step {step}"
                tokens[s] = int(logits[row, 0].argmax())


def test_batch_over_a_kv_cache_matches_each_row_alone_on_both_paths(tiny_model):
    model = load_model(tiny_model).model
    prompts = [[1, 5, 9, 11], [1, 17, 42, 99], [1, 8, 8, 2]]  # one length: no padding mask
    expected = [_alone(model, p, 5) for p in prompts]
    for native in (True, False):
        saved = model.decode_step
        model.decode_step = saved if native else None
        cache = KVCache.for_model(model, 3, 64)
        with torch.inference_mode():
            logits = model(torch.tensor(prompts), torch.arange(4)[None].expand(3, 4), cache, last_only=True)
            for step in range(5):
                tokens = logits[:, -1].argmax(-1, keepdim=True)  # [3, 1]
                logits = model(tokens, torch.full((3, 1), cache.length), cache)
                for row in range(3):  # (the batch's prefill ran as one matrix product: float rounding)
                    assert (logits[row, 0] - expected[row][step]).abs().max() < 1e-4
        model.decode_step = saved


def _attention_reference(q, keys, values, scale):
    """softmax(q k^T * scale) v in float64, query head h reading KV head h // group.
    q [H, D]; keys, values [KVH, S, D] -> [H, D]."""
    group = q.shape[0] // keys.shape[0]
    k = keys.double().repeat_interleave(group, dim=0)  # [H, S, D]
    v = values.double().repeat_interleave(group, dim=0)
    weights = torch.softmax((k @ q.double()[:, :, None])[:, :, 0] * scale, dim=-1)  # [H, S]
    return (weights[:, None, :] @ v)[:, 0, :]  # [H, D]


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize(
    "H,KVH,D,S,window",
    [(4, 2, 24, 1, 0), (6, 6, 48, 17, 0), (9, 3, 64, 100, 0), (2, 1, 128, 40, 0), (8, 2, 80, 5000, 0)]
    + [(4, 2, 24, 1, 1), (6, 6, 48, 17, 17), (9, 3, 64, 100, 7), (8, 2, 80, 5000, 4097)],
)
def test_one_token_attention_kernel_matches_softmax_reference(H, KVH, D, S, window, bf16):
    """The native one-token attention (RoPE, cache write, softmax over the cache, product with the
    values) against the plain formulas in float64: head dims with a partial last vector (24, 80),
    GQA groups, one column, and more columns than the kernel keeps on its stack; with a sliding
    window (the last `window` columns: 0 is none), as wide as the cache or narrower. The result does
    not depend on the thread count."""
    from llamascope.model import apply_rope

    lib = kernels.load()
    fn = lib.decode_attention_bf16 if bf16 else lib.decode_attention_f32
    dtype = torch.bfloat16 if bf16 else torch.float32
    gen = torch.Generator().manual_seed(H * 1000 + S)
    cap, col, scale = S + 3, S - 1, D**-0.5
    qkv = (torch.randn((H + 2 * KVH) * D, generator=gen) * 2).to(dtype).float()  # bfloat16-exact for bf16
    angle = torch.rand(D // 2, generator=gen) * 6
    cos, sin = torch.cat([angle.cos()] * 2).to(dtype).float(), torch.cat([angle.sin()] * 2).to(dtype).float()
    cache = torch.randn(2, KVH, cap, D, generator=gen).to(dtype)  # earlier columns: random keys and values
    outputs = []
    for threads in (1, 2):
        x, kc, vc = qkv.clone(), cache[0].clone(), cache[1].clone()
        out = torch.empty(H * D)
        fn(
            x.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            kc.data_ptr(),
            vc.data_ptr(),
            col,
            cap,
            H,
            KVH,
            D,
            scale,
            window,
            out.data_ptr(),
            threads,
        )
        outputs.append(out)
    assert torch.equal(outputs[0], outputs[1])
    q, k, v = qkv[: H * D].view(1, H, 1, D), qkv[H * D : (H + KVH) * D].view(1, KVH, 1, D), qkv[(H + KVH) * D :]
    q_rot = apply_rope(q.to(dtype), cos.to(dtype)[None, None], sin.to(dtype)[None, None]).float()[0, :, 0]
    k_rot = apply_rope(k.to(dtype), cos.to(dtype)[None, None], sin.to(dtype)[None, None]).float()[0, :, 0]
    assert torch.equal(kc[:, col].float(), k_rot) and torch.equal(vc[:, col].float(), v.view(KVH, D))
    assert torch.equal(kc[:, :col], cache[0, :, :col]) and torch.equal(kc[:, col + 1 :], cache[0, :, col + 1 :])
    first = max(0, S - window) if window else 0
    expected = _attention_reference(q_rot, kc[:, first:S].float(), vc[:, first:S].float(), scale).float().flatten()
    tolerance = 2**-7 if bf16 else 4e-6  # bfloat16: rounded exponentials and output; 4e-6: sums of 5000 columns
    assert (outputs[0] - expected).abs().max() <= tolerance * expected.abs().max()


@pytest.mark.parametrize("I, rows", [(7, 2), (16, 2), (40, 2), (768, 2), (40, 37)])
def test_silu_mul_kernel_matches_float64(I, rows):
    """The native SiLU(gate) * up (vector exponential) against float64, with gates far out in
    both tails (where e^-g overflows or vanishes) and a width with a partial last vector; a
    prompt's rows (more than 8) are split over two threads."""
    lib = kernels.load()
    gen = torch.Generator().manual_seed(I)
    gu = torch.randn(rows, 2 * I, generator=gen) * 4
    gu[0, :4] = torch.tensor([-1000.0, -90.0, 90.0, 1000.0])[: min(4, I)]
    out = torch.full((rows, I), float("nan"))
    lib.silu_mul_rows_f32(gu.data_ptr(), rows, I, out.data_ptr(), 2)
    g, u = gu[:, :I].double(), gu[:, I:].double()
    expected = g * torch.sigmoid(g) * u
    assert torch.allclose(out.double(), expected, rtol=4e-7, atol=1e-30)


@pytest.mark.parametrize("rows", [1, 8, 37])
def test_prompt_rmsnorm_and_rope_kernels_give_pytorchs_numbers(rows):
    """A prompt's RMSNorm (rows split over two threads past 8) is the module's formula to float32
    rounding and does not depend on the thread count; its RoPE, in place on the q and k heads at the
    start of each fused row, is PyTorch's x * cos + rotate_half(x) * sin bit for bit."""
    from llamascope.model import RMSNorm, apply_rope

    lib = kernels.load()
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(1, rows, 200, generator=gen) * 3
    norm = RMSNorm(200, 1e-5)
    norm.weight.data = torch.rand(200, generator=gen) + 0.5
    expected = norm(x)  # (the module's PyTorch formula: no kernel set)
    outs = []
    for threads in (1, 2):
        out = torch.full_like(x, float("nan"))
        lib.rmsnorm_rows_f32(x.data_ptr(), norm.weight.data_ptr(), out.data_ptr(), rows, 200, 1e-5, threads)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    assert torch.allclose(outs[0], expected, rtol=2e-6, atol=1e-7)

    H, KVH, D = 6, 2, 48
    qkv = torch.randn(1, rows, (H + 2 * KVH) * D, generator=gen)
    cos, sin = torch.randn(1, rows, D, generator=gen), torch.randn(1, rows, D, generator=gen)
    q, k, v = qkv.split((H * D, KVH * D, KVH * D), -1)
    q_ref = apply_rope(q.view(1, rows, H, D).transpose(1, 2), cos, sin)
    k_ref = apply_rope(k.view(1, rows, KVH, D).transpose(1, 2), cos, sin)
    v_before = v.clone()
    lib.rope_rows_f32(qkv.data_ptr(), rows, qkv.shape[-1], H + KVH, D, cos.data_ptr(), sin.data_ptr(), 2)
    q, k, v = qkv.split((H * D, KVH * D, KVH * D), -1)
    assert torch.equal(q.view(1, rows, H, D).transpose(1, 2), q_ref)
    assert torch.equal(k.view(1, rows, KVH, D).transpose(1, 2), k_ref)
    assert torch.equal(v, v_before)


@pytest.mark.parametrize(
    "T, start, H, KVH, D, window",
    [
        (2, 0, 2, 2, 16, 0),
        (37, 0, 4, 2, 64, 0),
        (13, 20, 4, 1, 48, 0),
        (130, 0, 9, 3, 64, 0),
        (70, 60, 8, 8, 128, 0),
        (70, 2, 4, 2, 64, 0),
        (9, 61, 4, 2, 80, 0),  # tiles straddling a 64-column block edge
        # sliding windows: one column; narrower than a tile; across block edges; wider than all
        (37, 0, 4, 2, 64, 1),
        (130, 0, 9, 3, 64, 3),
        (70, 60, 8, 8, 128, 67),
        (200, 100, 4, 2, 48, 130),
        (13, 20, 4, 1, 48, 500),
    ],
)
def test_prompt_attention_kernel_matches_causal_softmax_reference(T, start, H, KVH, D, window):
    """A prompt's native attention: T queries after `start` cached columns over a [KVH, cap, D]
    cache, against float64 softmax(q k^T / sqrt(D)) v under the causal mask (and a sliding window
    of `window` columns, 0: none): GQA and MHA, head sizes 16 to 128 (one to two 64-lane passes),
    tiles of 4 queries with a partial last one, blocks of 64 columns with a partial last one,
    windows that end inside a tile or a block. The numbers do not depend on the thread count."""
    import torch.nn.functional as F

    lib = kernels.load()
    S, cap = start + T, start + T + 7
    gen = torch.Generator().manual_seed(T + 100 * H + D)
    qkv = torch.randn(T, (H + 2 * KVH) * D, generator=gen) * 2  # (only its q part is read)
    keys, values = torch.randn(KVH, cap, D, generator=gen), torch.randn(KVH, cap, D, generator=gen)
    outs = []
    for threads in (1, 2):
        out = torch.full((T, H * D), float("nan"))
        status = lib.prefill_attention_f32(
            qkv.data_ptr(),
            qkv.shape[1],
            keys.data_ptr(),
            values.data_ptr(),
            cap,
            T,
            start,
            H,
            KVH,
            D,
            D**-0.5,
            window,
            out.data_ptr(),
            H * D,
            threads,
        )
        assert status == 0
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    q = qkv[:, : H * D].view(T, H, D).transpose(0, 1)[None].double()  # [1, H, T, D]
    columns, own = torch.arange(S)[None], torch.arange(start, S)[:, None]
    visible = (columns <= own) & ((columns > own - window) if window else True)  # [T, S]
    expected = F.scaled_dot_product_attention(
        q, keys[None, :, :S].double(), values[None, :, :S].double(), attn_mask=visible, enable_gqa=H != KVH
    )  # [1, H, T, D]
    expected = expected[0].transpose(0, 1).reshape(T, H * D)
    assert (outs[0].double() - expected).abs().max() < 1e-5


class _PrefillSpy:
    """The kernel library, recording (T, start) of each prompt attention call it runs."""

    def __init__(self, lib, calls: list):
        self.lib, self.calls = lib, calls

    def __getattr__(self, name: str):
        return getattr(self.lib, name)

    def prefill_attention_f32(self, *args):
        self.calls.append(args[5:7])
        return self.lib.prefill_attention_f32(*args)


def assert_prompt_attention_runs_natively(fast, plain, layer: int) -> None:
    """A prompt of 37 positions, then 9 more over the cached ones: layer `layer` of the `fast`
    model runs its attention natively in one call each, and the logits are the `plain` model's to
    float32 rounding."""
    calls = []
    attention = fast.model.layers[layer].self_attn
    assert attention.native is not None
    attention.native = _PrefillSpy(attention.native, calls)
    prompt = list(range(3, 40))
    with torch.inference_mode():
        results = []
        for model in (fast, plain):
            cache = KVCache.for_model(model, 1, 64)
            first = model(torch.tensor([prompt]), torch.arange(37)[None], cache)  # [1, 37, V]
            second = model(torch.tensor([prompt[:9]]), torch.arange(37, 46)[None], cache)  # [1, 9, V]
            results.append(torch.cat([first, second], dim=1))
    assert calls == [(37, 0), (9, 37)]  # (T, start)
    assert (results[0] - results[1]).abs().max() < 1e-4 * results[1].abs().max()


def test_prompt_attention_runs_natively_and_matches_the_plain_path(tiny_model):
    """A prompt through the fast model's native RoPE and attention (and a second prompt after it,
    over cached columns) gives the plain PyTorch model's logits to float32 rounding."""
    fast, plain = load_model(tiny_model).model, load_model(tiny_model, backend="plain").model
    assert_prompt_attention_runs_natively(fast, plain, 0)


def test_prompt_attention_leaves_long_prompts_to_pytorch(tiny_model, monkeypatch):
    """Past PREFILL_NATIVE_QUERIES new positions in one call (where PyTorch's attention is faster)
    a prompt's attention is PyTorch's; the logits match the plain model's either way."""
    import llamascope.model as model_module

    fast = load_model(tiny_model).model
    plain = load_model(tiny_model, backend="plain").model
    calls = []
    for layer in fast.model.layers:
        layer.self_attn.native = _PrefillSpy(layer.self_attn.native, calls)
    monkeypatch.setattr(model_module, "PREFILL_NATIVE_QUERIES", 20)
    prompt = list(range(3, 40))
    with torch.inference_mode():
        results = []
        for model in (fast, plain):
            cache = KVCache.for_model(model, 1, 64)
            short = model(torch.tensor([prompt[:12]]), torch.arange(12)[None], cache)  # 12 positions: native
            long = model(torch.tensor([prompt[12:]]), torch.arange(12, 37)[None], cache)  # 25: PyTorch's
            results.append(torch.cat([short, long], dim=1))
    assert calls == [(12, 0)] * len(fast.model.layers)
    assert (results[0] - results[1]).abs().max() < 1e-4 * results[1].abs().max()


def test_rope_table_gives_the_rotary_modules_numbers_as_it_grows(tiny_model):
    """The step looks RoPE up in a table by position, grown by doubling; every lookup equals what
    the model's rotary module computes for those positions, bit for bit, before and after growing.
    One sequence gets the table row's own address, several a gathered copy."""
    model = load_model(tiny_model).model
    step = model.decode_step
    for positions in ([[3], [0], [255]], [[256], [7]], [[40]], [[1000], [513], [2]], [[700]]):
        positions = torch.tensor(positions)
        cos_at, sin_at, alive = step._rope(positions, positions.view(-1).tolist())
        if len(positions) == 1:
            table_cos, table_sin = step._rope_table
            row_bytes = table_cos.shape[1] * table_cos.element_size()
            row, offset = divmod(cos_at - table_cos.data_ptr(), row_bytes)
            assert offset == 0 and 0 <= row < table_cos.shape[0]
            assert sin_at - table_sin.data_ptr() == row * row_bytes
            cos, sin = table_cos[row][None, None], table_sin[row][None, None]
        else:
            cos, sin = alive
            assert (cos.data_ptr(), sin.data_ptr()) == (cos_at, sin_at) and cos.is_contiguous()
        expected_cos, expected_sin = model.model.rotary_emb(positions, step.dtype)
        assert torch.equal(cos, expected_cos) and torch.equal(sin, expected_sin)
    assert step._rope_table[0].shape[0] >= 1001


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_q8_0_embedding_rows_equal_the_modules_and_the_step_is_unchanged(tmp_path, dtype):
    """A GGUF token_embd in Q8_0 stays in blocks; the step dequantises the looked-up rows itself.
    They equal the QuantEmbedding module's rows bit for bit, and (float32) the whole step's logits
    equal the module path's. (The layers are stored F32 so that q/k/v and gate/up fuse: unfused
    mixed parts send the module path through PyTorch's attention, equal only to rounding.)"""
    from gguf_fixtures import GGUF_BLOCK, TinySpec, write_tiny_llama

    from llamascope.layers import QuantEmbedding

    float_layers = {f"blk.{n}.{block}.weight": "F32" for n in range(2) for block in GGUF_BLOCK.values()}
    float_layers["output.weight"] = "F32"  # (a kept Q6_K head has no bfloat16 step)
    model = load_model(write_tiny_llama(tmp_path / "tiny.gguf", TinySpec(), types=float_layers).path, dtype=dtype).model
    step = model.decode_step
    assert isinstance(model.model.embed_tokens, QuantEmbedding) and step is not None and step._q8_embedding
    tokens = torch.tensor([[0], [319], [77]])
    with torch.inference_mode():
        rows = step._embed(tokens, tokens.view(-1).tolist())
        expected = model.model.embed_tokens(tokens).to(step.dtype)
    assert rows.dtype == expected.dtype and torch.equal(rows, expected)
    if dtype == "float32":
        assert torch.equal(_step_logits(model, True), _step_logits(model, False))


def test_a_token_outside_the_vocabulary_is_refused_by_name(tmp_path):
    from gguf_fixtures import write_tiny_llama

    from llamascope.errors import LlamascopeError

    model = load_model(write_tiny_llama(tmp_path / "tiny.gguf").path).model
    cache = KVCache.for_model(model, 1, 8)
    with torch.inference_mode(), pytest.raises(LlamascopeError, match="token id 320 is outside the vocabulary"):
        model(torch.tensor([[320]]), torch.tensor([[0]]), cache)


def test_cache_addresses_are_rebuilt_when_the_cache_replaces_its_tensors(tiny_model):
    """The step keeps ctypes arrays of the cache's tensor addresses between steps; beam search's
    reorder replaces every tensor, and the next step must read the new ones (equal to the module
    path's to float rounding: at batch 2 it attends with PyTorch), not the freed ones."""
    model = load_model(tiny_model).model
    outputs = {}
    for native in (True, False):
        saved = model.decode_step
        model.decode_step = saved if native else None
        cache = KVCache.for_model(model, 2, 16)
        with torch.inference_mode():
            model(torch.tensor([PROMPT, PROMPT[::-1]]), torch.arange(len(PROMPT)).expand(2, -1), cache)
            model(torch.tensor([[3], [4]]), torch.full((2, 1), len(PROMPT)), cache)
            cache.reorder(torch.tensor([1, 1]))
            outputs[native] = model(torch.tensor([[5], [6]]), torch.full((2, 1), len(PROMPT) + 1), cache)
        model.decode_step = saved
        if native:
            keys, _ = saved._cache_pointers(cache)
            assert list(keys) == [k.data_ptr() for k in cache.keys]
    assert (outputs[True] - outputs[False]).abs().max() < 1e-4


def test_negative_positions_are_refused_for_any_batch(tiny_model):
    """A negative position would index the RoPE table from its end (several rows) or address memory
    before it (one row)."""
    from llamascope.errors import LlamascopeError

    model = load_model(tiny_model).model
    for positions in ([[-1]], [[3], [-2]]):
        cache = KVCache.for_model(model, len(positions), 8)
        with torch.inference_mode(), pytest.raises(LlamascopeError, match="position id -. is negative"):
            model(torch.tensor([[5]] * len(positions)), torch.tensor(positions), cache)


def test_slot_storage_version_changes_whenever_tensors_may_have_been_replaced(tiny_model, monkeypatch):
    """Growing and a growth that fails halfway both change storage_version, so the step never
    reuses addresses of tensors the cache has let go."""
    from llamascope.cache import SlotKVCache

    model = load_model(tiny_model).model
    cache = SlotKVCache.for_model(model, 4, 64)
    versions = [cache.storage_version]
    cache.reserve(1, 8)
    versions.append(cache.storage_version)
    cache.reserve(1, 8)  # fits: nothing replaced
    assert cache.storage_version == versions[-1]
    cache.reserve(2, 16)
    versions.append(cache.storage_version)
    real_zeros, calls = torch.zeros, []

    def failing_zeros(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise MemoryError("no room")
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(torch, "zeros", failing_zeros)
    with pytest.raises(MemoryError):
        cache.reserve(4, 64)
    versions.append(cache.storage_version)
    assert len(set(versions)) == len(versions), versions


@pytest.mark.parametrize("qtype", ["Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"])
def test_k_quant_gguf_stays_quantised_and_the_step_equals_the_modules(tmp_path, qtype):
    """A GGUF whose projections and head are K-quants keeps them as stored (no float copy), the
    native step runs them and equals the module path bit for bit, and its greedy tokens are those of
    the same file dequantised to float32 (quant="none") up to what the kernels' 8-bit activations
    move the logits by: fed the same tokens, the float model's logits differ by a few percent of
    their spread at most, and where it would have picked another token that one led by less than
    twice that difference (a near-tie)."""
    from gguf_fixtures import GGUF_BLOCK, TinySpec, write_tiny_llama

    from llamascope.layers import QuantLinear

    types = {f"blk.{n}.{block}.weight": qtype for n in range(2) for block in GGUF_BLOCK.values()}
    path = write_tiny_llama(tmp_path / f"{qtype}.gguf", TinySpec(), types={**types, "output.weight": qtype}).path
    model = load_model(path).model
    assert type(model.decode_step) is decode_step.DecodeStep
    assert {m.qtype for m in model.modules() if isinstance(m, QuantLinear)} == {qtype}
    assert not any(p.dtype.is_floating_point and p.dim() == 2 for p in model.parameters())  # no float matrix
    assert torch.equal(_step_logits(model, True), _step_logits(model, False))
    plain = load_model(path, quant="none").model
    tokens = generate(model, PROMPT, max_new_tokens=12, eos_token_id=[]).output_ids[0]
    native, dense = _forced_logits(model, tokens), _forced_logits(plain, tokens)  # [12, V] each
    difference = (native - dense).abs().max()
    assert difference < 0.1 * dense.std()
    chosen = dense.gather(-1, torch.tensor(tokens)[:, None]).squeeze(-1)  # [12]
    assert (dense.max(-1).values - chosen).max() <= 2 * difference
    if qtype in ("Q4_K", "Q5_K", "Q6_K", "Q2_K"):  # no near-tie on these files: the very same tokens
        assert tokens == generate(plain, PROMPT, max_new_tokens=12, eos_token_id=[]).output_ids[0]


def _forced_logits(model, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), V]: the logits of one-token decode steps after PROMPT that chose `tokens`
    (each step's logits, then that token fed in)."""
    cache = KVCache.for_model(model, 1, 64)
    with torch.inference_mode():
        logits = model(torch.tensor([PROMPT]), torch.arange(len(PROMPT))[None], cache, last_only=True)
        out = [logits[0, -1]]
        for token in tokens[:-1]:
            out.append(model(torch.tensor([[token]]), torch.tensor([[cache.length]]), cache)[0, -1])
    return torch.stack(out)
