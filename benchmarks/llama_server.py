"""llama.cpp's own `llama-server`, built from the sources inside the `llama-cpp-python` sdist.

    .venv/bin/python benchmarks/llama_server.py          # build (once) and print the binary's path

The sdist comes from PyPI (`pip download --no-binary`), is unpacked under benchmarks/.work/ and
built with cmake for this CPU's instruction sets named one by one (AVX2, FMA, F16C and whichever
AVX-512 extensions /proc/cpuinfo lists), never `-march=native` and never AMX: with those,
llama.cpp's AMX path crashes on some of the virtual machines this project runs on. No network
feature is built in (no curl, no OpenSSL, no downloaded web UI).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / ".work"
LLAMA_CPP_PYTHON = "0.3.36"  # the version the [bench] extra pins
SOURCE = WORK / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
BUILD = WORK / f"llama-server-{LLAMA_CPP_PYTHON}"
BINARY = BUILD / "bin" / "llama-server"

# /proc/cpuinfo flag -> the ggml option that uses it
AVX512_OPTIONS = {
    "avx512f": "GGML_AVX512",
    "avx512vbmi": "GGML_AVX512_VBMI",
    "avx512_vnni": "GGML_AVX512_VNNI",
    "avx512_bf16": "GGML_AVX512_BF16",
}


def cpu_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cmake_options(flags: set[str]) -> list[str]:
    """The instruction sets to build for, each named; the rest of llama.cpp switched off."""
    options = {
        "GGML_NATIVE": "OFF",
        "GGML_AVX": "ON",
        "GGML_AVX2": "ON" if "avx2" in flags else "OFF",
        "GGML_FMA": "ON" if "fma" in flags else "OFF",
        "GGML_F16C": "ON" if "f16c" in flags else "OFF",
        "GGML_AMX_TILE": "OFF",
        "GGML_AMX_INT8": "OFF",
        "GGML_AMX_BF16": "OFF",
        "GGML_OPENMP": "ON",
        "LLAMA_OPENSSL": "OFF",
        "LLAMA_BUILD_TESTS": "OFF",
        "LLAMA_BUILD_EXAMPLES": "OFF",
        "LLAMA_BUILD_UI": "OFF",
        "LLAMA_USE_PREBUILT_UI": "OFF",
        "CMAKE_BUILD_TYPE": "Release",
    }
    for flag, option in AVX512_OPTIONS.items():
        options[option] = "ON" if flag in flags else "OFF"
    return [f"-D{key}={value}" for key, value in options.items()]


def fetch_source() -> None:
    if SOURCE.is_dir():
        return
    WORK.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-q", "-d", str(WORK)]
        + [f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        check=True,
    )
    archive = WORK / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz"
    subprocess.run(["tar", "xzf", str(archive), "-C", str(WORK)], check=True)


def build() -> Path:
    """-> the path of a built llama-server (built once; later calls reuse it)."""
    if BINARY.is_file():
        return BINARY
    fetch_source()
    print(f"building llama-server from {SOURCE} (several minutes on 2 cores)", file=sys.stderr)
    subprocess.run(["cmake", "-S", str(SOURCE), "-B", str(BUILD), *cmake_options(cpu_flags())], check=True)
    subprocess.run(["cmake", "--build", str(BUILD), "--target", "llama-server", "-j", "2"], check=True)
    return BINARY


if __name__ == "__main__":
    print(build())
