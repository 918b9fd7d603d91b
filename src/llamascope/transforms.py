"""Whole-model weight transforms: a model already in memory turned into another weight format."""

from __future__ import annotations

from torch import nn

from . import native
from .formats import HIGH_QTYPE, quant_format, quantize
from .layers import FastLinear, LocalPart, QuantEmbedding, QuantLinear, linear_slots, local_slot


def quantize_model(model: nn.Module, quant: str) -> nn.Module:
    """Replace each float projection with a QuantLinear in `quant`'s format (a `--quant` name), the LM head with a
    Q8_0 one and the token embedding with a Q8_0 QuantEmbedding (a tied head shares its blocks):
    the weights `load_model(quant=...)` builds while reading, from a model already in memory. A
    model on the native backend stays on it: the new layers get the kernels (and a new decode step)."""
    qtype = quant_format(quant)
    lib = next((m.native for m in model.modules() if isinstance(m, native.NATIVE_MODULES) and m.native), None)
    model.decode_step = None  # it points at the modules being replaced
    head = local_slot(model, "lm_head")
    embed = model.model.embed_tokens
    float_embedding = type(embed) is nn.Embedding
    tied = float_embedding and head == (model, "lm_head") and model.lm_head.weight.data_ptr() == embed.weight.data_ptr()
    for parent, name in linear_slots(model):
        module = getattr(parent, name)
        if (parent, name) == head and tied:
            continue  # it becomes the embedding's blocks below
        layer_qtype = HIGH_QTYPE if (parent, name) == head else qtype
        if isinstance(module, (nn.Linear, FastLinear)):
            bias = None if module.bias is None else module.bias.detach().float()
            setattr(
                parent,
                name,
                QuantLinear(quantize(module.weight.detach(), layer_qtype), layer_qtype, module.in_features, bias),
            )
    if float_embedding:
        blocks = quantize(embed.weight.detach(), HIGH_QTYPE)
        model.model.embed_tokens = QuantEmbedding(blocks, HIGH_QTYPE, embed.embedding_dim, embed.weight.dtype)
        if tied:
            model.lm_head = QuantLinear(blocks, HIGH_QTYPE, embed.embedding_dim)
    if lib is not None:
        native.attach(model, lib, one_process=not any(isinstance(m, LocalPart) for m in model.modules()))
    return model
