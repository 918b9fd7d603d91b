"""The native kernels (csrc/gemv.c, csrc/attention.c, csrc/decode_step.c, csrc/argmax.c): built once with
the system C compiler, called with ctypes.

The library is compiled on first use into ~/.cache/llamascope/kernels/ (keyed by the sources'
hash), which takes about a second. It needs gcc or clang and a CPU with AVX-512 (F, BW, VL, VNNI)
and F16C; without them `load()` returns None and callers use the plain PyTorch path.
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

log = logging.getLogger("llamascope")

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / name for name in ("gemv.c", "attention.c", "decode_step.c", "argmax.c")]
HEADERS = [CSRC / "simd.h"]
REQUIRED_CPU_FLAGS = ("avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "f16c", "fma")
CFLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq",
          "-mavx512vnni", "-mavx512bf16", "-mf16c", "-mfma"]


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


def cpu_supported() -> bool:
    return all(cpu_has(flag) for flag in REQUIRED_CPU_FLAGS)


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "llamascope" / "kernels"


def _build(target: Path) -> None:
    compiler = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc") or shutil.which("clang")
    if compiler is None:
        raise RuntimeError("no C compiler found (gcc, cc or clang)")
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".so")
    os.close(fd)
    try:
        subprocess.run([compiler, *CFLAGS, *map(str, SOURCES), "-o", tmp, "-lm"], check=True, capture_output=True,
                       text=True)
        os.replace(tmp, target)  # atomic: concurrent builders (tensor-parallel ranks) never see half a file
    except subprocess.CalledProcessError as e:
        raise RuntimeError(f"compiling the kernels failed: {e.stderr.strip()[:500]}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    """The kernel library, or None where this machine cannot run it."""
    if os.environ.get("LLAMASCOPE_NO_KERNELS"):
        return None
    if not cpu_supported():
        log.info("native kernels off: this CPU lacks one of %s", ", ".join(REQUIRED_CPU_FLAGS))
        return None
    digest = hashlib.sha256(b"".join(s.read_bytes() for s in SOURCES + HEADERS) + " ".join(CFLAGS).encode()).hexdigest()[:16]
    target = _cache_dir() / f"gemv-{digest}.so"
    try:
        if not target.exists():
            log.info("compiling native kernels into %s", target)
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, RuntimeError) as e:
        log.warning("native kernels off: %s", e)
        return None
    p, i, f = ctypes.c_void_p, ctypes.c_int, None
    for name in ("gemv_blocks_f32", "gemv_q4_packed_f32"):
        getattr(lib, name).argtypes = [i, p, i, i, p, i, p, i]
        getattr(lib, name).restype = f
    fl = ctypes.c_float
    lib.rmsnorm_f32.argtypes = [p, p, p, i, i, fl]
    lib.rmsnorm_f32.restype = f
    lib.silu_mul_f32.argtypes = [p, i, i, p]
    lib.silu_mul_f32.restype = f
    lib.decode_attention_f32.argtypes = [p, p, p, p, p, i, i, i, i, i, fl, p, i]
    lib.decode_attention_f32.restype = f
    if cpu_has("avx512_bf16") and hasattr(lib, "gemv_bf16_bf16"):
        lib.gemv_bf16_bf16.argtypes = [p, i, i, p, i, p, i]
        lib.gemv_bf16_bf16.restype = f
    for name in ("gemv_f32", "gemv_bf16", "gemv_q8_0_exact_f32"):
        getattr(lib, name).argtypes = [p, i, i, p, i, p, i]
        getattr(lib, name).restype = f
    lib.dequant_q8_0.argtypes = [p, i, i, p, i, i]
    lib.dequant_q8_0.restype = f
    lib.dequant_q4_packed.argtypes = [i, p, i, i, p, i, i]
    lib.dequant_q4_packed.restype = f
    lib.argmax_rows_f32.argtypes = [p, i, i, p]
    lib.argmax_rows_f32.restype = f
    lib.decode_step_f32.argtypes = [p, i, p, p, p, p, p, p, p, i, p, i]
    lib.decode_step_f32.restype = i
    if cpu_has("avx512_bf16"):
        lib.decode_attention_bf16.argtypes = [p, p, p, p, p, i, i, i, i, i, fl, p, i]
        lib.decode_attention_bf16.restype = f
        lib.decode_step_bf16.argtypes = [p, i, p, p, p, p, p, p, p, i, p, i]
        lib.decode_step_bf16.restype = i
    return lib
