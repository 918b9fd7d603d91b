"""Shared helpers for the GGUF, tokenizer and conversion tests.

- `fetch_reference_vocabularies`: llama.cpp's vocabulary test files (vocab-only GGUFs with the
  expected tokenizations in .inp/.out), extracted once from the llama-cpp-python source archive
  into ~/.cache/llamascope/vocab/.
- `sentencepiece_model_bytes`: a SentencePiece ModelProto written by hand (protobuf wire format),
  so that the `sentencepiece` library itself can tokenize with a vocabulary taken from a GGUF.
- `write_tiny_llama`: a tiny random LLaMA written with gguf.GGUFWriter, each weight in a chosen
  stored type, Q/K rows permuted as llama.cpp's converter does; it returns the weights a correct
  loader must produce (Hugging Face names and row order).
- `REFERENCE_DEQUANT`: dequantisers transcribed from ggml-quants.c, one block at a time.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
VOCAB_NAMES = (
    "ggml-vocab-llama-spm.gguf",
    "ggml-vocab-llama-bpe.gguf",
    "ggml-vocab-qwen2.gguf",
    "ggml-vocab-phi-3.gguf",
)
VOCAB_FILES = tuple(name + suffix for name in VOCAB_NAMES for suffix in ("", ".inp", ".out"))
CACHE_DIR = Path.home() / ".cache" / "llamascope" / "vocab"
CASE_SEPARATOR = "\n__ggml_vocab_test__\n"


# ---- llama.cpp's reference vocabularies ----------------------------------------------------------


def _download_source(folder: str) -> Path:
    """The llama-cpp-python source archive, downloaded from PyPI into `folder`."""
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:", LLAMA_CPP_PYTHON]
        + ["-d", folder],
        check=True,
        capture_output=True,
        timeout=900,
    )
    return next(Path(folder).glob("llama_cpp_python-*.tar.gz"))


def fetch_reference_vocabularies(cache: Path = CACHE_DIR) -> Path:
    """The folder holding VOCAB_FILES; downloads the source archive only when one is missing."""
    if all((cache / name).is_file() for name in VOCAB_FILES):
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download_source(tmp)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                name = Path(member.name).name
                if name in VOCAB_FILES and member.name.endswith(f"vendor/llama.cpp/models/{name}"):
                    data = tar.extractfile(member).read()
                    partial = cache / (name + ".part")
                    partial.write_bytes(data)
                    os.replace(partial, cache / name)  # other runs never see half a file
    missing = [name for name in VOCAB_FILES if not (cache / name).is_file()]
    if missing:
        raise FileNotFoundError(f"{LLAMA_CPP_PYTHON} source archive lacks {missing}")
    return cache


# llama.cpp's own Hugging Face -> GGUF converter: the script and the packages it imports.
CONVERTER_DIR = Path.home() / ".cache" / "llamascope" / "llama.cpp-converter"
CONVERTER_PARTS = ("conversion/", "gguf-py/gguf/")


def fetch_llama_cpp_converter(cache: Path = CONVERTER_DIR) -> Path:
    """A folder holding llama.cpp's convert_hf_to_gguf.py with its conversion/ and gguf-py/
    packages, from the same source archive (downloaded once)."""
    script = cache / "convert_hf_to_gguf.py"
    if script.is_file():
        return cache
    cache.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=cache.parent))  # (beside the cache: the rename below is atomic)
    with tempfile.TemporaryDirectory() as tmp:
        archive = _download_source(tmp)
        with tarfile.open(archive) as tar:
            for member in tar.getmembers():
                _, found, inside = member.name.partition("/vendor/llama.cpp/")
                wanted = inside == script.name or inside.startswith(CONVERTER_PARTS)
                if found and wanted and member.isfile() and ".." not in Path(inside).parts:
                    target = staging / inside
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(tar.extractfile(member).read())
    if not (staging / script.name).is_file():
        shutil.rmtree(staging, ignore_errors=True)
        raise FileNotFoundError(f"{LLAMA_CPP_PYTHON} source archive lacks convert_hf_to_gguf.py")
    try:
        os.replace(staging, cache)  # other runs never see half a folder
    except OSError:  # another run got there first
        shutil.rmtree(staging, ignore_errors=True)
    return cache


def _fetched(fetch, what: str) -> Path:
    """fetch() -> its folder, or a skip naming `what` where the source archive cannot be had (no
    network to PyPI)."""
    try:
        return fetch()
    except (subprocess.SubprocessError, OSError, StopIteration) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[-300:]
        pytest.skip(f"cannot fetch {LLAMA_CPP_PYTHON} source ({what}): {e} {detail}")


@pytest.fixture(scope="session")
def llama_cpp_converter() -> Path:
    return _fetched(fetch_llama_cpp_converter, "the converter")


@pytest.fixture(scope="session")
def vocab_dir() -> Path:
    return _fetched(fetch_reference_vocabularies, "reference vocabularies")


def llama_cpp_cases(vocab: Path, name: str) -> list[tuple[str, list[int]]]:
    """(text, expected ids without special tokens) from llama.cpp's NAME.inp / NAME.out pair."""
    texts = (vocab / f"{name}.inp").read_text(encoding="utf-8").split(CASE_SEPARATOR)
    if texts and texts[-1] == "":
        texts.pop()  # the file ends with a separator
    lines = (vocab / f"{name}.out").read_text(encoding="utf-8").split("\n")
    ids = [[int(x) for x in line.split()] for line in lines[: len(texts)]]
    assert len(texts) == len(ids) > 40, f"{name}: {len(texts)} inputs, {len(ids)} outputs"
    return list(zip(texts, ids))


# ---- a SentencePiece model written by hand ---------------------------------------------------------


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, value: int | bytes | float) -> bytes:
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    if isinstance(value, int):
        return _varint(number << 3 | 0) + _varint(value)
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def sentencepiece_model_bytes(
    pieces: list[str], scores: list[float], types: list[int], add_dummy_prefix: bool = True
) -> bytes:
    """A BPE ModelProto (byte fallback, identity normaliser, no whitespace cleaning: LLaMA's settings)."""
    out = bytearray()
    for piece, score, kind in zip(pieces, scores, types):
        out += _field(1, _field(1, piece.encode("utf-8")) + _field(2, float(score)) + _field(3, int(kind)))
    trainer = _field(3, 2) + _field(35, 1)  # model_type BPE, byte_fallback
    normalizer = _field(1, b"identity") + _field(3, int(add_dummy_prefix)) + _field(4, 0)
    return bytes(out + _field(2, trainer) + _field(3, normalizer))


# ---- ggml-quants.c, one block at a time ----------------------------------------------------------


def _f16(block: np.ndarray, offset: int) -> np.float32:
    return np.float32(block[offset : offset + 2].view(np.float16)[0])


def ref_q8_0(block: np.ndarray) -> np.ndarray:
    d = _f16(block, 0)
    return block[2:34].view(np.int8).astype(np.float32) * d


def ref_q4_0(block: np.ndarray) -> np.ndarray:
    d, qs = _f16(block, 0), block[2:18]
    y = np.empty(32, np.float32)
    for j in range(16):
        y[j] = np.float32(int(qs[j] & 0x0F) - 8) * d
        y[j + 16] = np.float32(int(qs[j] >> 4) - 8) * d
    return y


def ref_q4_1(block: np.ndarray) -> np.ndarray:
    d, m, qs = _f16(block, 0), _f16(block, 2), block[4:20]
    y = np.empty(32, np.float32)
    for j in range(16):
        y[j] = np.float32(qs[j] & 0x0F) * d + m
        y[j + 16] = np.float32(qs[j] >> 4) * d + m
    return y


def ref_q5_0(block: np.ndarray) -> np.ndarray:
    d, qh, qs = _f16(block, 0), int(block[2:6].view(np.uint32)[0]), block[6:22]
    y = np.empty(32, np.float32)
    for j in range(16):
        xh_0 = ((qh >> j) << 4) & 0x10
        xh_1 = (qh >> (j + 12)) & 0x10
        y[j] = np.float32(((int(qs[j]) & 0x0F) | xh_0) - 16) * d
        y[j + 16] = np.float32(((int(qs[j]) >> 4) | xh_1) - 16) * d
    return y


def ref_q5_1(block: np.ndarray) -> np.ndarray:
    d, m, qh, qs = _f16(block, 0), _f16(block, 2), int(block[4:8].view(np.uint32)[0]), block[8:24]
    y = np.empty(32, np.float32)
    for j in range(16):
        xh_0 = ((qh >> j) << 4) & 0x10
        xh_1 = (qh >> (j + 12)) & 0x10
        y[j] = np.float32((int(qs[j]) & 0x0F) | xh_0) * d + m
        y[j + 16] = np.float32((int(qs[j]) >> 4) | xh_1) * d + m
    return y


def ref_q2_k(block: np.ndarray) -> np.ndarray:
    """scales[16] (sc low nibble, m high), qs[64], d, dmin: 16 sub-blocks of 16, 2 bits each."""
    scales, qs, d, dmin = block[0:16], block[16:80], _f16(block, 80), _f16(block, 82)
    y = np.empty(256, np.float32)
    for i in range(16):  # sub-block i: half i // 8, bit pair (i % 8) // 2, bytes 16 * (i % 2) ..
        half, pair, part = i // 8, (i % 8) // 2, i % 2
        dl, ml = d * np.float32(scales[i] & 0xF), dmin * np.float32(scales[i] >> 4)
        q = (qs[32 * half + 16 * part : 32 * half + 16 * part + 16] >> (2 * pair)) & 3
        y[16 * i : 16 * i + 16] = dl * q.astype(np.float32) - ml
    return y


def _scales_k3(packed: np.ndarray) -> list[int]:
    """Q3_K's 12 bytes -> 16 six-bit scales less 32: low nibbles from bytes 0-7 (sc 0-7 low, sc
    8-15 high nibbles), top bits from bit pair i // 4 of byte 8 + i % 4."""
    out = []
    for i in range(16):
        low = int(packed[i] & 0xF) if i < 8 else int(packed[i - 8] >> 4)
        high = (int(packed[8 + i % 4]) >> (2 * (i // 4))) & 3
        out.append((low | (high << 4)) - 32)
    return out


def ref_q3_k(block: np.ndarray) -> np.ndarray:
    """hmask[32], qs[64], scales[12], d: 16 sub-blocks of 16, 3 bits each: the low two bits from qs,
    less 4 where the weight's hmask bit is clear."""
    hmask, qs, sc, d = block[0:32], block[32:96], _scales_k3(block[96:108]), _f16(block, 108)
    y = np.empty(256, np.float32)
    for i in range(16):
        half, pair, part = i // 8, (i % 8) // 2, i % 2
        low = (qs[32 * half + 16 * part : 32 * half + 16 * part + 16].astype(np.int32) >> (2 * pair)) & 3
        high = (hmask[16 * part : 16 * part + 16].astype(np.int32) >> (4 * half + pair)) & 1
        q = low - np.where(high == 1, 0, 4)
        y[16 * i : 16 * i + 16] = (d * np.float32(sc[i])) * q.astype(np.float32)
    return y


def _scale_min_k4(j: int, q: np.ndarray) -> tuple[int, int]:
    if j < 4:
        return int(q[j] & 63), int(q[j + 4] & 63)
    return int((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4)), int((q[j + 4] >> 4) | ((q[j] >> 6) << 4))


def ref_q4_k(block: np.ndarray) -> np.ndarray:
    d, dmin, scales, q = _f16(block, 0), _f16(block, 2), block[4:16], block[16:144]
    y = []
    for j in range(4):  # 64 values per step: low nibbles then high nibbles of 32 bytes
        sc, m = _scale_min_k4(2 * j, scales)
        d1, m1 = d * np.float32(sc), dmin * np.float32(m)
        sc, m = _scale_min_k4(2 * j + 1, scales)
        d2, m2 = d * np.float32(sc), dmin * np.float32(m)
        chunk = q[32 * j : 32 * j + 32]
        y.append(d1 * (chunk & 0xF).astype(np.float32) - m1)
        y.append(d2 * (chunk >> 4).astype(np.float32) - m2)
    return np.concatenate(y)


def ref_q5_k(block: np.ndarray) -> np.ndarray:
    d, dmin, scales = _f16(block, 0), _f16(block, 2), block[4:16]
    qh, ql = block[16:48], block[48:176]
    y = []
    u1, u2 = 1, 2
    for j in range(4):
        sc, m = _scale_min_k4(2 * j, scales)
        d1, m1 = d * np.float32(sc), dmin * np.float32(m)
        sc, m = _scale_min_k4(2 * j + 1, scales)
        d2, m2 = d * np.float32(sc), dmin * np.float32(m)
        chunk = ql[32 * j : 32 * j + 32]
        y.append(d1 * ((chunk & 0xF) + np.where(qh & u1, 16, 0)).astype(np.float32) - m1)
        y.append(d2 * ((chunk >> 4) + np.where(qh & u2, 16, 0)).astype(np.float32) - m2)
        u1, u2 = u1 << 2, u2 << 2
    return np.concatenate(y)


def ref_q6_k(block: np.ndarray) -> np.ndarray:
    ql, qh, sc, d = block[0:128], block[128:192], block[192:208].view(np.int8), _f16(block, 208)
    y = np.empty(256, np.float32)
    for half in range(2):
        n, ql_h, qh_h, sc_h = 128 * half, ql[64 * half :], qh[32 * half :], sc[8 * half :]
        for l in range(32):
            s = l // 16
            q1 = int((ql_h[l] & 0xF) | (((qh_h[l] >> 0) & 3) << 4)) - 32
            q2 = int((ql_h[l + 32] & 0xF) | (((qh_h[l] >> 2) & 3) << 4)) - 32
            q3 = int((ql_h[l] >> 4) | (((qh_h[l] >> 4) & 3) << 4)) - 32
            q4 = int((ql_h[l + 32] >> 4) | (((qh_h[l] >> 6) & 3) << 4)) - 32
            y[n + l] = d * np.float32(sc_h[s]) * np.float32(q1)
            y[n + l + 32] = d * np.float32(sc_h[s + 2]) * np.float32(q2)
            y[n + l + 64] = d * np.float32(sc_h[s + 4]) * np.float32(q3)
            y[n + l + 96] = d * np.float32(sc_h[s + 6]) * np.float32(q4)
    return y


# type name -> (values per block, bytes per block, reference, byte ranges of fp16 scales, scale size)
BLOCK_TYPES = {
    "Q8_0": (32, 34, ref_q8_0, (0,), 1e-3),
    "Q4_0": (32, 18, ref_q4_0, (0,), 1e-2),
    "Q4_1": (32, 20, ref_q4_1, (0, 2), 1e-2),
    "Q5_0": (32, 22, ref_q5_0, (0,), 1e-2),
    "Q5_1": (32, 24, ref_q5_1, (0, 2), 1e-2),
    "Q4_K": (256, 144, ref_q4_k, (0, 2), 2e-4),
    "Q5_K": (256, 176, ref_q5_k, (0, 2), 1e-4),
    "Q6_K": (256, 210, ref_q6_k, (208,), 2e-5),
    "Q2_K": (256, 84, ref_q2_k, (80, 82), 1e-3),
    "Q3_K": (256, 110, ref_q3_k, (108,), 1e-3),
    "IQ4_NL": (32, 18, None, (0,), 1e-2),  # a type llamascope refuses
}


def reference_dequantize(raw: np.ndarray, type_name: str) -> np.ndarray:
    """[rows, bytes] of blocks -> [rows, values] float32 through the ggml-quants.c transcriptions."""
    per_block, size, ref, _, _ = BLOCK_TYPES[type_name]
    rows = raw.reshape(raw.shape[0], -1, size)
    return np.stack([np.concatenate([ref(block) for block in row]) for row in rows])


def random_blocks(rng: np.random.Generator, rows: int, cols: int, type_name: str) -> np.ndarray:
    """Random block bytes [rows, bytes] with sane fp16 scales, so every bit pattern gets exercised."""
    per_block, size, _, scale_offsets, scale = BLOCK_TYPES[type_name]
    blocks = rng.integers(0, 256, size=(rows, cols // per_block, size), dtype=np.uint8)
    for offset in scale_offsets:
        values = (rng.uniform(0.5, 1.5, size=blocks.shape[:2]) * scale).astype(np.float16)
        if type_name == "Q4_1" and offset == 2:
            values = -values * 8  # the minimum of a Q4_1 block
        blocks[:, :, offset : offset + 2] = values.view(np.uint8).reshape(*blocks.shape[:2], 2)
    return blocks.reshape(rows, -1)


# ---- tiny LLaMA GGUF files -------------------------------------------------------------------------


def permute_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's LlamaModel.permute (conversion/llama.py), applied to rows of any storage."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


@dataclass
class TinySpec:
    hidden: int = 256
    intermediate: int = 512
    layers: int = 2
    heads: int = 4
    kv_heads: int = 2
    context: int = 128
    rope_theta: float = 10000.0
    rms_eps: float = 1e-5
    tied: bool = False


# HF name suffix -> stored type, per layer: together they cover every supported type.
LAYER_TYPES = (
    {
        "q_proj": "Q4_K",
        "k_proj": "Q5_K",
        "v_proj": "Q6_K",
        "o_proj": "Q4_0",
        "gate_proj": "Q4_1",
        "up_proj": "F16",
        "down_proj": "BF16",
    },
    {
        "q_proj": "Q8_0",
        "k_proj": "Q4_0",
        "v_proj": "Q4_1",
        "o_proj": "Q4_K",
        "gate_proj": "Q5_K",
        "up_proj": "Q6_K",
        "down_proj": "F32",
    },
)
GGUF_BLOCK = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}


def tiny_vocabulary() -> tuple[list[str], list[float], list[int]]:
    """A 320-token SentencePiece-style vocabulary: <unk> <s> </s>, 256 bytes, then pieces."""
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = ["\u2581"] + letters + ["\u2581" + c for c in letters] + ["he", "in", "er", "an", "\u2581the"]
    pieces += [a + b for a in "aeiou" for b in "nrst" if a + b not in pieces][: 61 - len(pieces)]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    scores = [0.0] * 259 + [-float(i) for i in range(len(pieces))]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces)
    return tokens, scores, types


TINY_CHAT_TEMPLATE = "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"


@dataclass
class TinyModel:
    path: Path
    spec: TinySpec
    expected: dict[str, np.ndarray]  # HF name -> float32 weights a correct loader returns
    types: dict[str, str] = field(default_factory=dict)  # GGUF name -> stored type


def _stored(
    rng: np.random.Generator, shape: tuple[int, ...], type_name: str, reference: bool = True
) -> tuple[np.ndarray, np.ndarray | None]:
    """(what the file stores, row by row; the float32 values it means)."""
    if type_name in ("F32", "F16"):
        values = rng.normal(0, 0.05, size=shape).astype(np.float32)
        stored = values.astype(np.float16) if type_name == "F16" else values
        return stored, stored.astype(np.float32)
    if type_name == "BF16":
        high = (rng.normal(0, 0.05, size=shape).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        return high.view(np.uint8).reshape(shape[0], -1), (high.astype(np.uint32) << 16).view(np.float32)
    raw = random_blocks(rng, shape[0], shape[1], type_name)
    ref = BLOCK_TYPES[type_name][2]
    return raw, (reference_dequantize(raw, type_name) if ref is not None and reference else None)


def _gguf_type(type_name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[type_name]


def write_tiny_llama(
    path: Path,
    spec: TinySpec | None = None,
    seed: int = 0,
    *,
    arch: str = "llama",
    metadata: dict | None = None,
    drop: tuple[str, ...] = (),
    types: dict | None = None,
    extra_tensors: dict | None = None,
    tokenizer: bool = True,
    reference: bool = True,
) -> TinyModel:
    """Write a tiny random LLaMA GGUF; `metadata` overrides keys (None removes one), `drop` leaves
    tensors out, `types` overrides stored types by GGUF name, `extra_tensors` adds F32 tensors.
    With `reference=False` the expected weights are not computed (files meant to be refused)."""
    from gguf import GGMLQuantizationType, GGUFWriter

    spec = spec or TinySpec()
    rng = np.random.default_rng(seed)
    tokens, scores, token_types = tiny_vocabulary()
    vocab, head_dim = len(tokens), spec.hidden // spec.heads
    plan: list[tuple[str, str, tuple[int, ...], str, int | None]] = [
        ("token_embd.weight", "model.embed_tokens.weight", (vocab, spec.hidden), "Q8_0", None),
        ("output_norm.weight", "model.norm.weight", (spec.hidden,), "F32", None),
    ]
    if not spec.tied:
        plan.append(("output.weight", "lm_head.weight", (vocab, spec.hidden), "Q6_K", None))
    q, kv = spec.heads * head_dim, spec.kv_heads * head_dim
    for n in range(spec.layers):
        shapes = {
            "q_proj": (q, spec.hidden),
            "k_proj": (kv, spec.hidden),
            "v_proj": (kv, spec.hidden),
            "o_proj": (spec.hidden, q),
            "gate_proj": (spec.intermediate, spec.hidden),
            "up_proj": (spec.intermediate, spec.hidden),
            "down_proj": (spec.hidden, spec.intermediate),
        }
        for short, shape in shapes.items():
            module = "self_attn" if short in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
            heads = {"q_proj": spec.heads, "k_proj": spec.kv_heads}.get(short)
            plan.append(
                (
                    f"blk.{n}.{GGUF_BLOCK[short]}.weight",
                    f"model.layers.{n}.{module}.{short}.weight",
                    shape,
                    LAYER_TYPES[n % 2][short],
                    heads,
                )
            )
        for short, norm in (("attn_norm", "input_layernorm"), ("ffn_norm", "post_attention_layernorm")):
            plan.append((f"blk.{n}.{short}.weight", f"model.layers.{n}.{norm}.weight", (spec.hidden,), "F32", None))

    writer = GGUFWriter(str(path), arch)
    keys = {
        f"{arch}.block_count": spec.layers,
        f"{arch}.context_length": spec.context,
        f"{arch}.embedding_length": spec.hidden,
        f"{arch}.feed_forward_length": spec.intermediate,
        f"{arch}.attention.head_count": spec.heads,
        f"{arch}.attention.head_count_kv": spec.kv_heads,
        f"{arch}.attention.layer_norm_rms_epsilon": spec.rms_eps,
        f"{arch}.rope.freq_base": spec.rope_theta,
        f"{arch}.rope.dimension_count": head_dim,
    }
    if tokenizer:
        keys.update(
            {
                "tokenizer.ggml.model": "llama",
                "tokenizer.ggml.tokens": tokens,
                "tokenizer.ggml.scores": scores,
                "tokenizer.ggml.token_type": token_types,
                "tokenizer.ggml.bos_token_id": 1,
                "tokenizer.ggml.eos_token_id": 2,
                "tokenizer.ggml.unknown_token_id": 0,
                "tokenizer.ggml.add_bos_token": True,
                "tokenizer.chat_template": TINY_CHAT_TEMPLATE,
            }
        )
    keys.update(metadata or {})
    _add_metadata(writer, keys)

    expected, stored_types = {}, {}
    for gguf_name, hf_name, shape, type_name, heads in plan:
        type_name = (types or {}).get(gguf_name, type_name)
        if gguf_name in drop:
            continue
        if len(shape) == 1:
            stored = (1 + rng.normal(0, 0.1, size=shape)).astype(np.float32)
            values = stored
        else:
            stored, values = _stored(rng, shape, type_name, reference)
        if heads is not None:
            stored = permute_rows(stored, heads)  # as convert_hf_to_gguf.py does
        raw_dtype = None if type_name in ("F32", "F16") else _gguf_type(type_name)
        writer.add_tensor(gguf_name, np.ascontiguousarray(stored), raw_dtype=raw_dtype)
        expected[hf_name], stored_types[gguf_name] = values, type_name
    for gguf_name, values in (extra_tensors or {}).items():
        writer.add_tensor(gguf_name, np.asarray(values, dtype=np.float32), raw_dtype=GGMLQuantizationType.F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return TinyModel(Path(path), spec, expected, stored_types)


def _add_metadata(writer, keys: dict) -> None:
    from gguf import GGUFValueType

    for key, value in keys.items():
        if value is None:
            continue
        if isinstance(value, bool):
            writer.add_bool(key, value)
        elif isinstance(value, int):
            writer.add_uint32(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        elif isinstance(value, str):
            writer.add_string(key, value)
        elif value and isinstance(value[0], float):
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.FLOAT32)
        elif value and isinstance(value[0], int):
            writer.add_key_value(key, list(value), GGUFValueType.ARRAY, sub_type=GGUFValueType.INT32)
        else:
            writer.add_array(key, list(value))


def write_vocab_gguf(path: Path, keys: dict, arch: str = "llama") -> Path:
    """A vocabulary-only GGUF: metadata, no tensors."""
    from gguf import GGUFWriter

    writer = GGUFWriter(str(path), arch)
    _add_metadata(writer, keys)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def hf_llama(expected: dict[str, np.ndarray], config_dict: dict):
    """transformers' LlamaForCausalLM (float32) holding `expected` weights: the reference forward."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{k: v for k, v in config_dict.items() if k != "architectures"})
    model = LlamaForCausalLM(config).float().eval()
    state = {name: torch.from_numpy(np.ascontiguousarray(values)) for name, values in expected.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    return model


def greedy_tokens(logits_of, prompt: list[int], new_tokens: int) -> list[int]:
    """Plain greedy loop without a cache: `logits_of(tokens[1, T], positions[1, T])` -> [1, T, V]."""
    import torch

    ids = list(prompt)
    with torch.inference_mode():
        for _ in range(new_tokens):
            tokens = torch.tensor([ids])  # [1, T]
            positions = torch.arange(len(ids))[None]  # [1, T]
            ids.append(int(logits_of(tokens, positions)[0, -1].argmax()))
    return ids[len(prompt) :]


def hf_logits(model):
    """transformers' model as a `logits_of` function for `greedy_tokens`."""
    return lambda tokens, positions: model(input_ids=tokens, position_ids=positions).logits
