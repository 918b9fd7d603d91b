"""The native kernels (csrc/gemv.c, csrc/kquant.c, csrc/attention.c, csrc/decode_step.c,
csrc/argmax.c): built once with the system C compiler, called with ctypes.

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
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import LlamascopeError

log = logging.getLogger("llamascope")

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("gemv.c", "kquant.c", "attention.c", "decode_step.c", "argmax.c")]
HEADERS = [CSRC / "simd.h", CSRC / "avx2.h"]
_BASE_CFLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp"]
# build -> (CPU flags it needs, compiler flags)
BUILDS = {
    "avx512": (("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma"),
               _BASE_CFLAGS + ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni",
                               "-mf16c", "-mfma"]),
    "avx2": (("avx2", "f16c", "fma"), _BASE_CFLAGS + ["-mavx2", "-mf16c", "-mfma", "-DLLAMASCOPE_AVX2"]),
}


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


def _build(target: Path, cflags: list[str]) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (gcc, cc or clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *cflags, *map(str, SOURCES), "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True)
        os.replace(tmp, target)  # atomic: concurrent builders (tensor-parallel ranks) never see half a file
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling the kernels failed: {e.stderr.strip()[:500]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The kernel library (its `build` attribute names it), or None where this machine runs none.
    An unknown LLAMASCOPE_KERNELS value raises LlamascopeError."""
    build = chosen_build()
    if build is None:
        if cpu_flags() and not any(cpu_supported(b) for b in BUILDS):
            log.info("native kernels off: this CPU has neither AVX-512 (with VNNI) nor AVX2 with FMA and F16C")
        return None
    cflags = build_flags(build)
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + " ".join(cflags).encode()).hexdigest()[:16]
    target = _cache_dir() / f"kernels-{build}-{digest}.so"
    try:
        if not target.exists():
            log.info("compiling native kernels (%s) into %s", build, target)
            _build(target, cflags)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        log.warning("native kernels off: %s", e)
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int, None
    for name in ("gemv_blocks_f32", "gemv_packed_f32"):  # (0, or -1 when scratch memory ran out)
        getattr(lib, name).argtypes = [i, p, i, i, p, i, p, i]
        getattr(lib, name).restype = i
    fl = ctypes.c_float
    lib.rmsnorm_f32.argtypes = [p, p, p, i, i, fl]
    lib.rmsnorm_f32.restype = f
    lib.silu_mul_f32.argtypes = [p, i, i, p]
    lib.silu_mul_f32.restype = f
    lib.rmsnorm_rows_f32.argtypes = [p, p, p, i, i, fl, i]
    lib.rmsnorm_rows_f32.restype = f
    lib.silu_mul_rows_f32.argtypes = [p, i, i, p, i]
    lib.silu_mul_rows_f32.restype = f
    lib.rope_rows_f32.argtypes = [p, i, ctypes.c_int64, i, i, p, p, i]
    lib.rope_rows_f32.restype = f
    i64 = ctypes.c_int64
    lib.prefill_attention_f32.argtypes = [p, i64, p, p, i, i, i, i, i, i, fl, p, i64, i]
    lib.prefill_attention_f32.restype = i
    lib.decode_attention_f32.argtypes = [p, p, p, p, p, i, i, i, i, i, fl, p, i]
    lib.decode_attention_f32.restype = f
    lib.build = build
    lib.gemv_bf16_bf16.argtypes = [p, i, i, p, i, p, i]
    lib.gemv_bf16_bf16.restype = f
    for name in ("gemv_f32", "gemv_bf16", "gemv_q8_0_exact_f32"):
        getattr(lib, name).argtypes = [p, i, i, p, i, p, i]
        getattr(lib, name).restype = f
    lib.dequant_q8_0.argtypes = [p, i, i, p, i, i]
    lib.dequant_q8_0.restype = f
    lib.dequant_packed.argtypes = [i, p, i, i, p, i, i]
    lib.dequant_packed.restype = f
    lib.gemv_kquant_f32.argtypes = [i, p, i, i, p, i, p, i]
    lib.gemv_kquant_f32.restype = i
    lib.dequant_kquant.argtypes = [i, p, i, i, p, i, i]
    lib.dequant_kquant.restype = None
    lib.argmax_rows_f32.argtypes = [p, i, i, p]
    lib.argmax_rows_f32.restype = f
    lib.decode_step_f32.argtypes = [p, i, p, p, p, p, p, p, p, i, p, i]
    lib.decode_step_f32.restype = i
    lib.decode_attention_bf16.argtypes = [p, p, p, p, p, i, i, i, i, i, fl, p, i]
    lib.decode_attention_bf16.restype = f
    lib.decode_step_bf16.argtypes = [p, i, p, p, p, p, p, p, p, i, p, i]
    lib.decode_step_bf16.restype = i
    return lib

