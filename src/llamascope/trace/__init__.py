"""A glass box over one generation: what each step of generate() took in, computed and chose.

    from llamascope import Engine
    from llamascope.trace import trace, render_trace
    engine = Engine.load()
    t = trace(engine, "My name is Mariama, my favorite", max_new_tokens=4, lens=True)
    render_trace(t)                  # rich tables: tokenization, settings, strategy, each step, ...
    t.to_json(); render_html(t)      # the same trace as JSON, and an HTML report with the lens heat map

The trace records; it never recomputes what the engine computed. It runs `generation.generate`
with `on_step` (which hands over each `Step`: the prepared inputs, the logits, the scores after
the processors and the chosen tokens) and `capture` (the model's named activations, see
`activations.py`). The per-position predictions come from the prefill's own logits (the `logits`
point, asked for at every position). The logit lens is the one computation added on top: it applies the model's final
norm and LM head to the residual stream after each layer; at the last layer that is exactly the
computation the model made, so that row equals the model's logits bit for bit.

`trace(..., layer=N)` lists every tensor of layer N at the prefill, named as in transformers
(layer.py); `trace(..., attention=True)` keeps every layer's and head's attention weights over
all the positions (attention.py).

`ActivationRecorder` captures activations by name (off by default), at the points
activations.NAMES lists: the residual stream around each block, the attention and MLP outputs,
attention weights, and inside chosen layers every tensor of transformers' modules.
"""

from .attention import AttentionMap
from .layer import LayerView
from .record import (
    ACTIVATION_NAMES,
    ActivationRecorder,
    Lens,
    PositionPrediction,
    StepTrace,
    TokenChoice,
    Trace,
    capture_activations,
    decoding_strategy,
    lens_logits,
    trace,
)
from .report import render_html
from .text import render_trace

__all__ = [
    "ACTIVATION_NAMES",
    "ActivationRecorder",
    "AttentionMap",
    "LayerView",
    "Lens",
    "PositionPrediction",
    "StepTrace",
    "TokenChoice",
    "Trace",
    "capture_activations",
    "decoding_strategy",
    "lens_logits",
    "render_html",
    "render_trace",
    "trace",
]
