"""The two builds of the native kernels: avx512 and avx2 (csrc/avx2.h).

This machine runs both, so the avx2 build goes through the same kernel, decode-step, parity and
GGUF tests as the default one (in a subprocess that asks for it), and its library is checked for
instructions an AVX2-only CPU would not have.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamascope import kernels
from llamascope.errors import LlamascopeError

TESTS = Path(__file__).parent
needs_avx2 = pytest.mark.skipif(not kernels.cpu_supported("avx2"), reason="this CPU has no AVX2 with FMA and F16C")


def test_build_choice_follows_the_cpu_and_the_environment(monkeypatch):
    monkeypatch.delenv("LLAMASCOPE_NO_KERNELS", raising=False)
    monkeypatch.delenv("LLAMASCOPE_KERNELS", raising=False)
    best = next((b for b in ("avx512", "avx2") if kernels.cpu_supported(b)), None)
    assert kernels.chosen_build() == best
    monkeypatch.setenv("LLAMASCOPE_KERNELS", "off")
    assert kernels.chosen_build() is None
    monkeypatch.setenv("LLAMASCOPE_KERNELS", "AVX2")
    assert kernels.chosen_build() == ("avx2" if kernels.cpu_supported("avx2") else None)
    monkeypatch.setenv("LLAMASCOPE_KERNELS", "sse")
    with pytest.raises(LlamascopeError, match="LLAMASCOPE_KERNELS='sse'.*avx512, avx2 or off"):
        kernels.chosen_build()
    monkeypatch.setenv("LLAMASCOPE_KERNELS", "avx512")
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"avx2", "fma", "f16c"}))
    assert kernels.chosen_build() is None  # asked for, but this CPU cannot run it
    monkeypatch.delenv("LLAMASCOPE_KERNELS")
    assert kernels.chosen_build() == "avx2"  # an AVX2-only CPU gets the avx2 build
    monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset({"sse4_2", "avx"}))
    assert kernels.chosen_build() is None


@needs_avx2
@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
def test_avx2_library_has_no_avx512_instructions(tmp_path):
    """What an AVX2-only CPU would fault on: zmm registers, mask registers, EVEX-only operations."""
    library = tmp_path / "kernels-avx2.so"
    kernels._build(library, kernels.BUILDS["avx2"][1])
    listing = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True,
                             check=True).stdout
    assert "vfmadd" in listing and "vpmaddubsw" in listing  # (it is the kernels' code)
    avx512 = re.compile(r"%zmm|%k[0-7]|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|vpmovu?s?[dq][bw]\b|vinserti32x4|vpermi2|\{%k|vpdpbusd|vdpbf16ps|vcvtneps2bf16|vscalef|vrndscale|vpternlog|vpmov\w*2m|"
                        r"vpermt2|vpcompress|vexpand|vmovdqu(8|16|32|64)|vmovdqa(32|64)|vbroadcast[if](32x|64x)")
    found = sorted({m.group(0) for m in avx512.finditer(listing)})
    assert not found, f"AVX-512 in the avx2 build: {found}"
    default = tmp_path / "kernels-avx512.so"
    kernels._build(default, kernels.BUILDS["avx512"][1])  # and the pattern does see AVX-512 code
    assert avx512.search(subprocess.run(["objdump", "-d", str(default)], capture_output=True, text=True).stdout)


@needs_avx2
def test_avx2_build_passes_the_kernel_tests():
    """The kernel tests (against the plain path, and exactness between kernels), the decode step's,
    greedy parity with transformers and the GGUF formats, all on the avx2 build."""
    env = dict(os.environ, LLAMASCOPE_KERNELS="avx2")
    env.pop("LLAMASCOPE_NO_KERNELS", None)
    files = ["test_quant.py", "test_decode_step.py", "test_sampling.py", "test_parity.py", "test_gguf.py"]
    probe = subprocess.run([sys.executable, "-c", "from llamascope import kernels; print(kernels.load().build)"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert probe.stdout.strip() == "avx2", probe.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                          *(str(TESTS / f) for f in files)], env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join(run.stdout.splitlines()[-25:])
    assert run.returncode == 0, tail
    assert re.search(r"\d+ passed", tail) and " failed" not in tail
