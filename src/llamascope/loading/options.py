"""How to load a model: one object from the CLI and the Python API down to `load_model`.

    LoadOptions(dtype="auto", device="auto", quant=None, backend="native", huge_pages=False, mmap=True)

`backend` is the one choice of how the layers compute:

| backend    | layers                                                | for                                     |
|------------|-------------------------------------------------------|-----------------------------------------|
| "native"   | the C kernels (csrc/), one call per decode step       | the CPU (the default)                   |
| "plain"    | PyTorch's operations only in the model                | the reference of every fast path        |
| "compiled" | plain layers, decode step compiled by `torch.compile` | a GPU, or a CPU without the kernels     |

Where no kernel build runs (a GPU, a CPU without AVX2) "native" gives the plain layers.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..choices import BACKENDS, DTYPE_NAMES, QUANT_CHOICES
from ..errors import LlamascopeError
from ..formats import quant_format

DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}


@dataclass(frozen=True)
class LoadOptions:
    """`dtype`: "auto" (the checkpoint's), "float32", "bfloat16", "float16" or a torch.dtype.
    `device`: "auto" (the first GPU PyTorch sees, else the CPU), "cpu", "cuda" or "cuda:N".
    `quant`: None keeps the weights as stored (GGUF blocks stay quantised where a native kernel
    reads them); "none" makes every matrix float at `dtype`; "int8" / "int4" (or "q8_0", "q4_0",
    "q4_1") quantise the projections as they are read, the LM head and embedding to 8 bits.
    `backend`: "native", "plain" or "compiled" (see the module's table).
    `huge_pages`: copy the weights of 4 MB or more into 2 MB pages after loading (slower load).
    `mmap`: float weights the file holds as they are used (same dtype, row-major; not a GGUF's
    Q/K rows) are views of the file mapped copy-on-write, not copies (loading/mapping.py); off,
    or with `huge_pages`, every weight is read into memory of its own."""

    dtype: str | torch.dtype = "auto"
    device: str | torch.device = "auto"
    quant: str | None = None
    backend: str = "native"
    huge_pages: bool = False
    mmap: bool = True

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise LlamascopeError(f"--backend {self.backend!r}: expected one of {', '.join(BACKENDS)}")
        if not isinstance(self.dtype, torch.dtype) and self.dtype != "auto":
            named_dtype(self.dtype)
        if self.quant is not None and self.quant.lower() != "none" and self.quant.lower() not in QUANT_CHOICES:
            raise LlamascopeError(f"--quant {self.quant!r}: expected one of none, {', '.join(QUANT_CHOICES)}")
        if self.backend == "compiled" and self.quant_format is not None:
            raise LlamascopeError(
                f"--backend compiled runs float weights; --quant {self.quant} runs on the native kernels"
            )

    @property
    def quant_format(self) -> str | None:
        """The block format `quant` gives the projections, or None (weights as stored, or float)."""
        return None if self.quant is None or self.quant.lower() == "none" else quant_format(self.quant)

    @classmethod
    def build(cls, options: LoadOptions | None = None, **overrides) -> LoadOptions:
        """`options` with `overrides` (LoadOptions' field names) applied; unknown names are refused."""
        if options is not None and not isinstance(options, LoadOptions):
            raise TypeError(f"options must be a LoadOptions, not {options!r}; pass dtype=, quant=, ... as keywords")
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"unknown load option(s) {', '.join(unknown)}; LoadOptions has {', '.join(sorted(names))}")
        base = options if options is not None else cls()
        return cls(**{name: overrides.get(name, getattr(base, name)) for name in names})


def named_dtype(name: str) -> torch.dtype:
    """The torch dtype a --dtype name other than "auto" stands for."""
    if name not in DTYPES:
        raise LlamascopeError(f"--dtype {name!r}: expected one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]


def resolve_device(name: str | torch.device) -> torch.device:
    """ "auto": the first CUDA device when PyTorch sees one, else the CPU; or "cpu", "cuda", "cuda:N"."""
    if isinstance(name, str) and name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        raise LlamascopeError(f"--device {name!r}: expected auto, cpu, cuda or cuda:N") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type != "cuda":
        raise LlamascopeError(f"--device {name!r}: llamascope runs on cpu or cuda")
    if not torch.cuda.is_available():
        raise LlamascopeError(
            f"--device {name}: PyTorch sees no CUDA device here (torch {torch.__version__}, "
            f"built {'with CUDA ' + torch.version.cuda if torch.version.cuda else 'for the CPU only'})"
        )
    count = torch.cuda.device_count()
    index = torch.cuda.current_device() if device.index is None else device.index
    if index >= count:
        raise LlamascopeError(
            f"--device {name}: there {'is' if count == 1 else 'are'} {count} CUDA device(s), numbered from 0"
        )
    return torch.device("cuda", index)
