"""The "native" backend: gives a built model the C kernels (csrc/, through kernels.py).

`attach(model, lib)` does it in three steps, on a model that `loading.build` made with plain layers:

1. `accelerate`: block-format projections go into the kernels' layout (Q8_0/Q4 in groups of four
   blocks; a Q8_0 LM head keeps ggml's rows with float activations), float projections become
   `FastLinear` (same weights, no copy), and RMSNorm, attention, SiLU(gate) * up and a quantised
   embedding get the library (`module.native`);
2. `fuse_projections` (one process only): q, k, v and gate, up as one product each;
3. the one-call decode step (`decode_step.DecodeStep`; one process only), where it applies.

This module is the only place that hands the library to a layer; layers say what their kernel reads
through `native_weight()` (layers.NativeWeight).
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from . import decode_step, kernels
from .formats import PACKED_QTYPES
from .layers import FastLinear, QuantEmbedding, QuantLinear, linear_from, linear_slots, local_slot
from .model import MLP, Attention, RMSNorm

# Modules that compute natively once they hold the library
NATIVE_MODULES = (RMSNorm, Attention, MLP, FastLinear, QuantLinear, QuantEmbedding)


def attach(model: nn.Module, lib: ctypes.CDLL, one_process: bool = True) -> nn.Module:
    """Run `model` on the kernel library `lib`: see the module's steps. Under tensor parallelism
    (`one_process=False`) only step 1: the collectives wrap the separate projections, and a
    step's products are not one process's to run."""
    accelerate(model, lib)
    if one_process:
        fuse_projections(model)
        decode_step.enable(model, lib)
    return model


def native_modules(model: nn.Module):
    """The names of the model's modules that call a native kernel ("" is the model itself, when its
    decode step is the native one)."""
    if isinstance(model.decode_step, decode_step.DecodeStep):
        yield ""
    for name, module in model.named_modules():
        if isinstance(module, NATIVE_MODULES) and module.native is not None:
            yield name


def accelerate(model: nn.Module, lib: ctypes.CDLL) -> nn.Module:
    """Step 1: every projection, norm, attention, MLP and quantised embedding on the library."""
    model.decode_step = None  # it points at the modules being replaced: attach makes it again
    head = local_slot(model, "lm_head")
    for parent, name in linear_slots(model):
        setattr(parent, name, native_linear(getattr(parent, name), lib, is_head=(parent, name) == head))
    for module in model.modules():
        if isinstance(module, (RMSNorm, Attention, MLP, QuantEmbedding)):
            module.native = lib
    return model


def native_linear(layer: nn.Module, lib: ctypes.CDLL, is_head: bool = False) -> nn.Module:
    """A projection as the native backend runs it: a QuantLinear in the kernels' layout with the
    library, a float32 or bfloat16 nn.Linear as a FastLinear (same weights, no copy), anything
    else as it is. Q8_0/Q4 weights are packed (same numbers, csrc/gemv.c), except a Q8_0 LM head
    (`is_head`), which keeps ggml's blocks (a tied embedding's own) and float activations."""
    if isinstance(layer, QuantLinear):
        layer.native = lib  # (before in_layout, which repacks with it and carries it over)
        if is_head and layer.qtype == "Q8_0":
            layer = layer.in_layout("rows", float_activations=True)
        elif layer.qtype in PACKED_QTYPES:
            layer = layer.in_layout("packed")
        layer.native = lib
        # prefill's product in bfloat16 where oneDNN's is fast (AVX512-BF16); the head stays float32
        layer.long_inputs_in_bf16 = kernels.cpu_has("avx512_bf16") and not is_head
        return layer
    if isinstance(layer, nn.Linear) and layer.weight.dtype in (torch.float32, torch.bfloat16):
        return FastLinear(layer.weight, layer.bias, lib)
    return layer


def fuse_projections(model: nn.Module) -> nn.Module:
    """Step 2: q, k and v (and gate and up) as one product each: half the calls per layer, and the
    activations are read (and quantised) once. Outputs are the same numbers as separate layers."""
    model.decode_step = None  # it points at the modules being replaced: attach makes it again
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        if attn.qkv_proj is None:
            fused = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
            if fused is not None:
                attn.fuse(fused)
        if mlp.gate_up_proj is None:
            fused = _fused([mlp.gate_proj, mlp.up_proj])
            if fused is not None:
                mlp.fuse(fused)
    return model


def _stacked(weights: list[torch.Tensor]) -> torch.Tensor:
    """The weights' rows stacked [sum of rows, in]: a view where they already lie one after another
    in one buffer (loading reads them so), else a copy."""
    first = weights[0]
    offset, adjacent = first.storage_offset(), True
    for w in weights:
        same = w.untyped_storage().data_ptr() == first.untyped_storage().data_ptr()
        adjacent = adjacent and same and w.is_contiguous() and w.storage_offset() == offset and w.dim() == 2
        offset += w.numel()
    if not adjacent or len({w.shape[1] for w in weights}) != 1:
        return torch.cat(weights)
    return first.as_strided((sum(w.shape[0] for w in weights), first.shape[1]), (first.shape[1], 1))


def _fused(modules: list[nn.Module]) -> nn.Module | None:
    """One layer computing the given layers' outputs side by side, or None where they differ in kind."""
    biases = [m.bias for m in modules]
    if any(b is not None for b in biases) and any(b is None for b in biases):
        return None
    bias = None if biases[0] is None else torch.cat([b.detach().float() for b in biases])
    first = modules[0]
    if isinstance(first, QuantLinear) and all(
        isinstance(m, QuantLinear)
        and (m.qtype, m.layout, m.float_activations) == (first.qtype, first.layout, first.float_activations)
        for m in modules
    ):
        # rows are independent in every layout, so the fused rows are the parts' rows stacked
        layer = QuantLinear(
            _stacked([m.qweight for m in modules]),  # (a view where loading packed them in one buffer)
            first.qtype,
            first.in_features,
            bias,
            layout=first.layout,
            float_activations=first.float_activations,
        )
        layer.native, layer.long_inputs_in_bf16 = first.native, first.long_inputs_in_bf16
        return layer
    if all(isinstance(m, (nn.Linear, FastLinear)) for m in modules) and len({m.weight.dtype for m in modules}) == 1:
        weight = _stacked([m.weight.detach() for m in modules])
        bias = None if bias is None else bias.to(weight.dtype)
        if isinstance(first, FastLinear):
            return FastLinear(weight, bias, first.native)
        return linear_from(weight, bias)
    return None
