"""The native kernels (csrc/gemv.c, csrc/kquant.c, csrc/attention.c, csrc/decode_step.c,
csrc/argmax.c): built once with the system C compiler, called with ctypes.

csrc/kernels.h is their interface, written once: the formats (read here by `header_enum`) and
every exported function; `SIGNATURES` gives ctypes the ones Python calls (marked LS_API there).

The library is compiled on first use into ~/.cache/llamascope/kernels/ (keyed by the sources'
hash and the build), which takes a few seconds. It needs gcc or clang, and one of two builds
fits the CPU:
- "avx512": AVX-512 (F, BW, VL, DQ, VNNI), F16C and FMA; with -mavx512bf16 where the CPU also has
  AVX512-BF16 (its bfloat16 products then run on vdpbf16ps, elsewhere as exact float32 FMAs);
- "avx2": AVX2, FMA and F16C (most laptops and desktops): the same sources, with csrc/avx2.h
  giving each 16-lane operation as two 8-lane halves.
Both have every kernel, the bfloat16 ones (bfloat16 weights and activations, the bfloat16 decode
step) included.
The best build the CPU runs is used. LLAMASCOPE_KERNELS=avx512|avx2|off picks one (off, or the
older LLAMASCOPE_NO_KERNELS=1: none); without a build, `load()` returns None and callers use the
plain PyTorch path.
The library links OpenMP; torch's own libgomp (same soname) is already loaded, so both share one
thread pool.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import re
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import LlamascopeError

log = logging.getLogger("llamascope")

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("gemv.c", "kquant.c", "attention.c", "decode_step.c", "argmax.c")]
HEADER = CSRC / "kernels.h"  # the formats and every exported function, written once
HEADERS = [HEADER, CSRC / "simd.h", CSRC / "avx2.h"]
# -Wmissing-prototypes: a function the library exports must be declared in kernels.h
_BASE_CFLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp", "-Wall", "-Wextra", "-Wmissing-prototypes"]
# build -> (CPU flags it needs, compiler flags)
BUILDS = {
    "avx512": (
        ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma"),
        _BASE_CFLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mf16c", "-mfma"],
    ),
    "avx2": (("avx2", "f16c", "fma"), _BASE_CFLAGS + ["-mavx2", "-mf16c", "-mfma", "-DLLAMASCOPE_AVX2"]),
}

_P, _I, _I64, _F = ctypes.c_void_p, ctypes.c_int, ctypes.c_int64, ctypes.c_float
# The functions Python calls (kernels.h's LS_API prototypes): name -> (return type, argument types).
# Every pointer is a c_void_p (callers pass tensors' data_ptr()); None returns nothing; an int
# return is 0, or -1 when the kernel's scratch memory ran out. tests/test_kernels_header.py checks
# this table against kernels.h.
SIGNATURES = {
    # products: y[T, N] = x[T, K] W^T
    "gemv_f32": (None, (_P, _I, _I, _P, _I, _P, _I)),
    "gemv_bf16": (None, (_P, _I, _I, _P, _I, _P, _I)),
    "gemv_bf16_bf16": (None, (_P, _I, _I, _P, _I, _P, _I)),
    "gemv_blocks_f32": (_I, (_I, _P, _I, _I, _P, _I, _P, _I)),
    "gemv_packed_f32": (_I, (_I, _P, _I, _I, _P, _I, _P, _I)),
    "gemv_q8_0_exact_f32": (None, (_P, _I, _I, _P, _I, _P, _I)),
    "gemv_kquant_f32": (_I, (_I, _P, _I, _I, _P, _I, _P, _I)),
    # block dequantisers
    "dequant_q8_0": (None, (_P, _I, _I, _P, _I, _I)),
    "dequant_packed": (None, (_I, _P, _I, _I, _P, _I, _I)),
    "pack_blocks": (None, (_I, _P, _I, _I, _P, _I)),
    "dequant_kquant": (None, (_I, _P, _I, _I, _P, _I, _I)),
    # norms and activations
    "rmsnorm_rows_f32": (None, (_P, _P, _P, _I, _I, _F, _I)),
    "silu_mul_rows_f32": (None, (_P, _I, _I, _P, _I)),
    # RoPE and attention
    "rope_rows_f32": (None, (_P, _I, _I64, _I, _I, _P, _P, _I)),
    "decode_attention_f32": (None, (_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _I, _P, _I)),
    "decode_attention_bf16": (None, (_P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _F, _I, _P, _I)),
    "prefill_attention_f32": (_I, (_P, _I64, _P, _P, _I, _I, _I, _I, _I, _I, _F, _I, _P, _I64, _I)),
    # decode step
    "decode_step_f32": (_I, (_P, _I, _P, _P, _P, _P, _P, _P, _P, _I, _P, _I)),
    "decode_step_bf16": (_I, (_P, _I, _P, _P, _P, _P, _P, _P, _P, _I, _P, _I)),
    # argmax
    "argmax_rows_f32": (None, (_P, _I, _I, _P)),
}


def header_enum(name: str) -> dict[str, int]:
    """kernels.h's `enum name { ... }` as {enumerator: value}, in the header's order."""
    enums = _header_enums()
    if name not in enums:
        raise LlamascopeError(f"{HEADER}: no enum {name!r} (it has {', '.join(enums)})")
    return dict(enums[name])


def format_code(name: str) -> int:
    """The ls_format value kernels.h gives a weight format ("F32", "BF16", "Q8_0", "Q4_K", ...)."""
    codes = header_enum("ls_format")
    if "LS_" + name not in codes:
        raise LlamascopeError(f"{HEADER}: no weight format {name!r} in enum ls_format")
    return codes["LS_" + name]


def layout_code(name: str) -> int:
    """The ls_layout value kernels.h gives a weight layout ("rows" or "packed")."""
    codes = header_enum("ls_layout")
    if "LS_LAYOUT_" + name.upper() not in codes:
        raise LlamascopeError(f"{HEADER}: no weight layout {name!r} in enum ls_layout")
    return codes["LS_LAYOUT_" + name.upper()]


@lru_cache(maxsize=1)
def _header_enums() -> dict[str, tuple[tuple[str, int], ...]]:
    """Every named enum in kernels.h: name -> its (enumerator, value) pairs."""
    text = re.sub(r"/\*.*?\*/|//[^\n]*", "", HEADER.read_text(), flags=re.DOTALL)
    enums = {}
    for match in re.finditer(r"\benum\s+(\w+)\s*\{(.*?)\}", text, flags=re.DOTALL):
        pairs, value = [], -1
        for item in filter(None, (part.strip() for part in match.group(2).split(","))):
            key, _, given = (part.strip() for part in item.partition("="))
            value = int(given, 0) if given else value + 1
            pairs.append((key, value))
        enums[match.group(1)] = tuple(pairs)
    return enums


def build_flags(build: str) -> list[str]:
    """The compiler flags of `build` on this CPU (AVX512-BF16's instructions only where it has them)."""
    flags = list(BUILDS[build][1])
    if build == "avx512" and cpu_has("avx512_bf16"):
        flags.append("-mavx512bf16")
    return flags


@lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def cpu_has(flag: str) -> bool:
    return flag in cpu_flags()


def cpu_supported(build: str = "avx512") -> bool:
    return all(cpu_has(flag) for flag in BUILDS[build][0])


def chosen_build() -> str | None:
    """The build `load()` uses here: LLAMASCOPE_KERNELS's, else the best one this CPU runs; None
    for none."""
    asked = os.environ.get("LLAMASCOPE_KERNELS", "").strip().lower()
    if os.environ.get("LLAMASCOPE_NO_KERNELS") or asked == "off":
        return None
    if asked:
        if asked not in BUILDS:
            raise LlamascopeError(f"LLAMASCOPE_KERNELS={asked!r}: expected one of {', '.join(BUILDS)} or off")
        if not cpu_supported(asked):
            missing = [flag for flag in BUILDS[asked][0] if not cpu_has(flag)]
            log.warning("LLAMASCOPE_KERNELS=%s: this CPU lacks %s; native kernels off", asked, ", ".join(missing))
            return None
        return asked
    return next((build for build in BUILDS if cpu_supported(build)), None)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llamascope" / "kernels"


def library_path(build: str) -> Path:
    """Where `build`'s library lives: named by the build and a hash of the sources, headers and flags."""
    text = b"".join(path.read_bytes() for path in SOURCES + HEADERS) + " ".join(build_flags(build)).encode()
    digest = hashlib.sha256(text).hexdigest()[:16]
    return _cache_dir() / f"kernels-{build}-{digest}.so"


def compile_library(target: Path, cflags: list[str]) -> None:
    """Compiles SOURCES with `cflags` into the shared library `target` (RuntimeError on failure)."""
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (gcc, cc or clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run(
            [compiler, *cflags, *map(str, SOURCES), "-o", tmp, "-lm"], check=True, capture_output=True, text=True
        )
        os.replace(tmp, target)  # atomic: concurrent builders (tensor-parallel ranks) never see half a file
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling the kernels failed: {e.stderr.strip()[:500]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def bind(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Gives each of SIGNATURES' functions in `lib` its return and argument types."""
    for name, (restype, argtypes) in SIGNATURES.items():
        function = getattr(lib, name)
        function.restype, function.argtypes = restype, list(argtypes)
    return lib


def _log_no_build() -> None:
    if cpu_flags() and not any(cpu_supported(b) for b in BUILDS):
        log.info("native kernels off: this CPU has neither AVX-512 (with VNNI) nor AVX2 with FMA and F16C")


def _compiled(build: str) -> Path:
    """`build`'s library, compiled first if this machine has not got it yet."""
    target = library_path(build)
    if not target.exists():
        log.info("compiling native kernels (%s) into %s", build, target)
        compile_library(target, build_flags(build))
    return target


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The kernel library (its `build` attribute names it), or None where this machine runs none.
    An unknown LLAMASCOPE_KERNELS value raises LlamascopeError."""
    build = chosen_build()
    if build is None:
        _log_no_build()
        return None
    try:
        lib = ctypes.CDLL(str(_compiled(build)))
    except (OSError, RuntimeError) as e:
        log.warning("native kernels off: %s", e)
        return None
    bind(lib)
    lib.build = build
    return lib
