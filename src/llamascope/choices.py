"""The names the load options accept, without PyTorch: the command lists them in its `--help`
before PyTorch is imported (startup.py), and loading/options.py and formats.py check them."""

from __future__ import annotations

BACKENDS = ("native", "plain", "compiled")
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # and "auto": the checkpoint's
# --quant names and the block format each gives the projections ("none": every matrix float)
QUANT_CHOICES = {"int8": "Q8_0", "int4": "Q4_1", "q8_0": "Q8_0", "q4_0": "Q4_0", "q4_1": "Q4_1"}
