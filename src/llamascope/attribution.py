"""Direct logit attribution: a token's logit at one position split into what each part of the
model wrote into the residual stream.

The residual stream before the final norm is a sum, x = embed + sum_i attn_out_i + sum_i mlp_out_i,
and each layer's attention output is o_proj over its heads side by side, a sum over heads
attn_out_i = sum_h W_O[:, h*D:(h+1)*D] z_h (+ o_proj's bias). The final RMSNorm divides x by
rms(x) = sqrt(mean(x^2) + eps) and multiplies by its weight g, and the LM head's row of token t
reads the result: logit_t = W_U[t] . (g * x / rms(x)). Holding the position's rms fixed (the
"scale"), each part c contributes W_U[t] . (g * c / rms(x)), and the parts sum to the logit.

    acts = Capture(names=POINTS, detail=range(L))   # (heads are tapped inside the detail layers)
    logits = model(tokens, positions, capture=acts)
    a = attribute(model, acts, position=-1, token_ids=[chosen, runner_up], logits=logits[0, -1])

Everything is computed in float32 from the captured activations and the layers' weights as float
matrices (a QuantLinear's dequantised blocks). With float weights the parts sum to the model's own
logit up to float rounding; with quantised ones they sum to the logit of the same computation with
the dequantised weights, and the model's own kernels (which quantise activations to 8 bits, not a
linear operation) land near it: `Attribution.quantised` says which, and each token keeps both.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import LlamascopeError
from .formats import dequantize
from .layers import FastLinear, QuantLinear

# The capture points the attribution reads (`heads` only exists in the layers the capture details).
POINTS = ("embed", "layers.*.self_attn.heads", "layers.*.mlp_out", "layers.*.output")


@dataclass
class TokenAttribution:
    """One token's logit at the position, part by part."""

    id: int
    values: list[float]  # each part's direct contribution, in Attribution.parts' order
    total: float  # the sum of the values: the logit computed from the parts
    logit: float  # the model's own logit (what the token was chosen from)
    text: str = ""  # the token decoded on its own (the caller's tokenizer fills it in)

    def to_json(self) -> dict:
        return {"id": self.id, "text": self.text, "values": self.values, "sum": self.total, "logit": self.logit}


@dataclass
class Attribution:
    """The direct logit attribution of a token (and of its runner-up) at one position."""

    position: int  # the column of the forward pass attributed
    parts: list[str]  # "embed", "layers.{i}.attn.head {h}", "layers.{i}.attn.bias", "layers.{i}.mlp"
    scale: float  # rms of the residual stream there: the final norm's divisor, held fixed
    token: TokenAttribution
    runner_up: TokenAttribution | None
    quantised: bool  # o_proj or the LM head is quantised: the parts use its dequantised weights

    @property
    def basis(self) -> str:
        """In words: which logit the parts sum to."""
        if self.quantised:
            return (
                "the parts use o_proj's and the LM head's quantised weights dequantised to float32 and sum to "
                "the logit computed so; the model's own products (kernels that quantise activations to 8 bits) "
                "give its logit, near it"
            )
        return "float weights: the parts sum to the model's own logit up to float rounding"

    def to_json(self) -> dict:
        return {
            "position": self.position,
            "parts": self.parts,
            "scale": self.scale,
            "token": self.token.to_json(),
            "runner_up": self.runner_up.to_json() if self.runner_up is not None else None,
            "quantised": self.quantised,
            "basis": self.basis,
        }


def attribute(
    model: nn.Module,
    acts: Mapping[str, torch.Tensor],
    position: int,
    token_ids: Sequence[int],
    logits: torch.Tensor,
) -> Attribution:
    """The direct logit attribution at `position` (a column of the captured pass, batch row 0) of
    `token_ids` (the chosen token, then optionally the runner-up); `logits` [V]: the model's own
    logits at that position. `acts`: a capture holding POINTS in every layer (Capture(detail=...)
    naming them all)."""
    layers = model.model.layers
    _check_points(acts, len(layers))
    x = acts[f"layers.{len(layers) - 1}.output"][0, position].float()  # [hidden]
    norm = model.model.norm
    scale = torch.sqrt(x.pow(2).mean() + norm.eps)  # the final norm's divisor at this position
    ids = torch.tensor(list(token_ids), dtype=torch.long)  # [n]
    readout = head_rows(model.lm_head, ids) * norm.weight.detach().float() / scale  # [n, hidden]
    names = ["embed"]
    columns = [(readout @ acts["embed"][0, position].float())[:, None]]  # [n, 1]
    for layer in layers:
        layer_names, values = _layer_parts(layer, acts, position, readout)
        names += layer_names
        columns.append(values)
    values = torch.cat(columns, dim=1)  # [n, parts]
    attributed = [
        TokenAttribution(int(t), row.tolist(), float(row.double().sum()), float(logits[t]))
        for t, row in zip(ids.tolist(), values)
    ]
    quantised = isinstance(model.lm_head, QuantLinear) or any(
        isinstance(layer.self_attn.o_proj, QuantLinear) for layer in layers
    )
    runner_up = attributed[1] if len(attributed) > 1 else None
    return Attribution(position, names, float(scale), attributed[0], runner_up, quantised)


def _layer_parts(
    layer: nn.Module, acts: Mapping[str, torch.Tensor], position: int, readout: torch.Tensor
) -> tuple[list[str], torch.Tensor]:
    """One decoder layer's parts: each attention head through its slice of o_proj, o_proj's bias
    (if any) and the MLP's output, read by `readout` [n, hidden] -> names, values [n, parts]."""
    i = layer.index
    o_proj = layer.self_attn.o_proj
    z = acts[f"layers.{i}.self_attn.heads"][0, position].float()  # [H, D]
    H, D = z.shape
    through = readout @ float_weight(o_proj)  # [n, H*D]: the readout pulled back through o_proj
    heads = (through.view(-1, H, D) * z).sum(-1)  # [n, H]
    names = [f"layers.{i}.attn.head {h}" for h in range(H)]
    columns = [heads]
    if o_proj.bias is not None:
        names.append(f"layers.{i}.attn.bias")
        columns.append((readout @ o_proj.bias.detach().float())[:, None])  # [n, 1]
    names.append(f"layers.{i}.mlp")
    columns.append((readout @ acts[f"layers.{i}.mlp_out"][0, position].float())[:, None])  # [n, 1]
    return names, torch.cat(columns, dim=1)


def float_weight(layer: nn.Module) -> torch.Tensor:
    """A projection's weight as a float32 matrix [out, in] (a QuantLinear's blocks dequantised)."""
    if isinstance(layer, QuantLinear):
        return layer.dequantized()
    if isinstance(layer, (nn.Linear, FastLinear)):
        return layer.weight.detach().float()
    raise LlamascopeError(f"attribution reads float or block-format projections, not a {type(layer).__name__}")


def head_rows(layer: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """The LM head's rows of the tokens `ids` [n] as float32 [n, hidden] (only those dequantised)."""
    if isinstance(layer, QuantLinear):
        return dequantize(layer.blocks.index_select(0, ids), layer.qtype, layer.in_features)
    if isinstance(layer, (nn.Linear, FastLinear)):
        return layer.weight.detach()[ids].float()
    return float_weight(layer)[ids]  # (refuses, by name, what it cannot read)


def _check_points(acts: Mapping[str, torch.Tensor], layers: int) -> None:
    """Refuse, by name, a capture that lacks a point the attribution reads."""
    needed = ["embed", f"layers.{layers - 1}.output"]
    needed += [f"layers.{i}.{point}" for i in range(layers) for point in ("self_attn.heads", "mlp_out")]
    missing = [name for name in needed if name not in acts]
    if missing:
        raise LlamascopeError(
            f"attribution needs the capture point {missing[0]} (capture {', '.join(POINTS)} "
            "with every layer in Capture(detail=...))"
        )
