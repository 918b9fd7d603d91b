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
    kernels.compile_library(library, kernels.build_flags("avx2"))
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    assert "vfmadd" in listing and "vpmaddubsw" in listing  # (it is the kernels' code)
    avx512 = re.compile(
        r"%zmm|%k[0-7]|%[xy]mm(1[6-9]|2[0-9]|3[01])\b|vpmovu?s?[dq][bw]\b|vinserti32x4|vpermi2|\{%k|vpdpbusd|vdpbf16ps|vcvtneps2bf16|vscalef|vrndscale|vpternlog|vpmov\w*2m|"
        r"vpermt2|vpcompress|vexpand|vmovdqu(8|16|32|64)|vmovdqa(32|64)|vbroadcast[if](32x|64x)"
    )
    found = sorted({m.group(0) for m in avx512.finditer(listing)})
    assert not found, f"AVX-512 in the avx2 build: {found}"
    default = tmp_path / "kernels-avx512.so"
    # and the pattern does see AVX-512 code
    kernels.compile_library(default, kernels.build_flags("avx512") + ["-mavx512bf16"])
    assert avx512.search(subprocess.run(["objdump", "-d", str(default)], capture_output=True, text=True).stdout)


@pytest.mark.skipif(
    not kernels.cpu_has("avx512_bf16") or not kernels.cpu_supported("avx512"),
    reason="compares against AVX512-BF16's instructions",
)
def test_avx512_without_bf16_gives_the_bf16_instructions_numbers(tmp_path):
    """An AVX-512 CPU without AVX512-BF16 (Ice Lake, Cascade Lake) gets an avx512 build without
    -mavx512bf16: its bfloat16 products as float32 FMAs and its bfloat16 rounding by integer
    operations, the numbers of vdpbf16ps and vcvtneps2bf16 for normal values, bit for bit."""
    import ctypes

    import gguf
    import numpy as np
    import torch

    libraries = {}
    for name, extra in (("native", ["-mavx512bf16"]), ("emulated", [])):
        path = tmp_path / f"{name}.so"
        kernels.compile_library(path, kernels.BUILDS["avx512"][1] + extra)
        libraries[name] = kernels.bind(ctypes.CDLL(str(path)))
    if shutil.which("objdump"):
        listing = subprocess.run(
            ["objdump", "-d", str(tmp_path / "emulated.so")], capture_output=True, text=True
        ).stdout
        assert "vdpbf16ps" not in listing and "vcvtneps2bf16" not in listing
    torch.manual_seed(0)
    N, K, T = 37, 320, 3
    w = torch.randn(N, K).to(torch.bfloat16)
    x = torch.randn(T, K).to(torch.bfloat16)
    f = torch.randn(N, K) * 3
    f[0, :5] = torch.tensor([float("nan"), float("inf"), -float("inf"), 0.0, -0.0])
    out = {}
    for name, lib in libraries.items():
        y = torch.empty(T, N)
        lib.gemv_bf16_bf16(w.data_ptr(), N, K, x.data_ptr(), T, y.data_ptr(), 2)
        with np.errstate(invalid="ignore"):  # (the NaN and infinities make NaN blocks)
            blocks = torch.from_numpy(gguf.quantize(f.numpy(), gguf.GGMLQuantizationType.Q8_0))
        d = torch.empty(N, K, dtype=torch.bfloat16)
        lib.dequant_q8_0(blocks.data_ptr(), N, K, d.data_ptr(), 1, 2)
        out[name] = (y, d)
    assert torch.equal(out["native"][0], out["emulated"][0])
    assert torch.equal(out["native"][1].view(torch.int16), out["emulated"][1].view(torch.int16))
    assert torch.allclose(out["native"][0], x.float() @ w.float().t(), rtol=1e-5, atol=1e-4)


@needs_avx2
def test_avx2_build_passes_the_kernel_tests():
    """The kernel tests (against the plain path, and exactness between kernels), the decode step's,
    greedy parity with transformers and the GGUF formats, all on the avx2 build."""
    env = dict(os.environ, LLAMASCOPE_KERNELS="avx2")
    env.pop("LLAMASCOPE_NO_KERNELS", None)
    files = ["test_quant.py", "test_decode_step.py", "test_sampling.py", "test_parity.py", "test_gguf.py"]
    probe = subprocess.run(
        [sys.executable, "-c", "from llamascope import kernels; print(kernels.load().build)"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.stdout.strip() == "avx2", probe.stderr
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *(str(TESTS / f) for f in files)],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    tail = "\n".join(run.stdout.splitlines()[-25:])
    assert run.returncode == 0, tail
    assert re.search(r"\d+ passed", tail) and " failed" not in tail


@needs_avx2
@pytest.mark.skipif(not kernels.cpu_supported("avx512"), reason="compares the avx2 build with the avx512 one")
def test_avx2_build_gives_the_avx512_numbers_for_k_quants(tmp_path):
    """csrc/kquant.c through avx2.h's emulated operations (or, sub, 16-bit shifts, 256-bit casts,
    permutes, dpbusd) gives the avx512 build's products and dequantised weights bit for bit."""
    import ctypes

    import numpy as np
    import torch
    from gguf_fixtures import random_blocks

    libraries = {}
    for build in ("avx512", "avx2"):
        path = tmp_path / f"{build}.so"
        kernels.compile_library(path, kernels.build_flags(build))
        libraries[build] = kernels.bind(ctypes.CDLL(str(path)))
    rng = np.random.default_rng(11)
    N, K = 29, 768
    x = torch.randn(8, K) * torch.rand(8, 1) * 4
    for qtype in ("Q4_K", "Q5_K", "Q6_K", "Q2_K", "Q3_K"):
        code = kernels.format_code(qtype)
        w = torch.from_numpy(random_blocks(rng, N, K, qtype))
        out = {}
        for build, lib in libraries.items():
            results = []
            for T in (1, 5, 8):
                y = torch.empty(T, N)
                assert lib.gemv_kquant_f32(code, w.data_ptr(), N, K, x.data_ptr(), T, y.data_ptr(), 2) == 0
                results.append(y)
            for bf16, dtype in ((0, torch.float32), (1, torch.bfloat16)):
                d = torch.empty(N, K, dtype=dtype)
                lib.dequant_kquant(code, w.data_ptr(), N, K, d.data_ptr(), bf16, 2)
                results.append(d.view(torch.int16) if bf16 else d)
            out[build] = results
        for a, b in zip(out["avx512"], out["avx2"]):
            assert torch.equal(a, b), qtype


def _prefetches_by_product_function(library: Path, product: str) -> dict[str, tuple[int, int]]:
    """function -> (8-bit product instructions, prefetch instructions) in the library's listing."""
    listing = subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)], capture_output=True, text=True, check=True
    ).stdout
    counts: dict[str, list[int]] = {}
    function = None
    for line in listing.splitlines():
        header = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if header:
            function = header.group(1)
            counts[function] = [0, 0]
        elif function is not None:
            counts[function][0] += product in line
            counts[function][1] += "prefetch" in line
    return {name: (n, p) for name, (n, p) in counts.items() if n}


@pytest.mark.skipif(shutil.which("objdump") is None, reason="needs objdump")
@pytest.mark.parametrize("build", ["avx512", "avx2"])
def test_block_kernels_keep_their_weight_prefetches(tmp_path, build):
    """The block-format kernels (Q8_0, repacked Q4, K-quants) stream their weights from memory and
    prefetch them ahead (simd.h). GCC 12 deleted those prefetches as dead code when the helper
    issuing them was a plain `static inline` called from an always_inline function, costing a
    third of Q4's read speed; every function whose loop runs the 8-bit products must keep them.
    (One-block remainders, a single product, have no loop to prefetch for.)"""
    if not kernels.cpu_supported(build):
        pytest.skip(f"this CPU does not run the {build} build")
    library = tmp_path / f"kernels-{build}.so"
    kernels.compile_library(library, kernels.build_flags(build))
    product = "vpdpbusd" if build == "avx512" else "vpmaddubsw"
    activations_only = {"q8_corrections"}  # (products of the activations with a constant: no weights read)
    functions = {
        name: counts
        for name, counts in _prefetches_by_product_function(library, product).items()
        if counts[0] > 1 and name.split(".")[0] not in activations_only
    }
    assert len(functions) >= 3, functions  # (the listing does hold the block kernels)
    missing = sorted(name for name, (_, prefetches) in functions.items() if prefetches == 0)
    assert not missing, f"block kernels that no longer prefetch their weights: {missing}"
