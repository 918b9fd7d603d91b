"""gguf_file.GGUFFile, the header reader, against gguf-py's own GGUFReader on the same files: every
metadata value and every tensor's description and data, little- and big-endian, with each value
type GGUF defines; and damaged headers fail with GGUFFormatError, not a stray exception."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llamascope.loading import default_model_path  # noqa: E402
from llamascope.loading.gguf_file import GGUFFile, GGUFFormatError  # noqa: E402


def _write(path, endian, alignment=None):
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
    if alignment is not None:
        writer.add_custom_alignment(alignment)
    writer.add_uint8("t.u8", 200)
    writer.add_int8("t.i8", -100)
    writer.add_uint16("t.u16", 60000)
    writer.add_int16("t.i16", -30000)
    writer.add_uint32("t.u32", 4_000_000_000)
    writer.add_int32("t.i32", -2_000_000_000)
    writer.add_uint64("t.u64", 2**63 + 5)
    writer.add_int64("t.i64", -(2**62))
    writer.add_float32("t.f32", 1e-5)
    writer.add_float64("t.f64", 1 / 3)
    writer.add_bool("t.bool", True)
    writer.add_string("t.str", "héllo ▁wörld")
    writer.add_string("t.empty", "")
    writer.add_array("t.strings", ["a", "", "ünï", "<0x0A>", "▁the"] * 50)
    writer.add_array("t.ints", list(range(-5, 300)))
    writer.add_array("t.floats", [0.5, -1.25, 3e-8])
    writer.add_array("t.bools", [True, False, True])
    writer.add_tensor("f32", rng.standard_normal((3, 64)).astype(np.float32))
    writer.add_tensor("f16", rng.standard_normal((2, 5, 32)).astype(np.float16))
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("q8", q8, raw_shape=q8.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    writer.add_tensor("vec", np.arange(7, dtype=np.float32))
    bf16 = rng.integers(0, 2**16, (3, 32), dtype=np.uint16)
    writer.add_tensor("bf16", bf16.view(np.uint8), raw_shape=(3, 64), raw_dtype=gguf.GGMLQuantizationType.BF16)
    q4k = rng.integers(0, 256, (2, 2 * 144), dtype=np.uint8)  # two rows of two 256-weight super-blocks
    writer.add_tensor("q4k", q4k, raw_shape=q4k.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("endian, alignment", [("LITTLE", None), ("BIG", None), ("LITTLE", 256)])
def test_header_matches_gguf_reader(tmp_path, endian, alignment):
    path = tmp_path / f"{endian}.gguf"
    _write(path, gguf.GGUFEndian[endian], alignment)
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    assert ours.byte_order == ("<" if endian == "LITTLE" else ">")
    assert list(ours.fields) == [k for k in theirs.fields if not k.startswith("GGUF.")]
    for key, field in ours.fields.items():
        reference = theirs.fields[key]
        assert field.types == reference.types, key
        assert field.contents() == reference.contents(), key
        assert type(field.contents()) is type(reference.contents()), key
    assert ours.fields["t.f32"].contents() == np.float32(1e-5)
    assert ours.fields["t.u64"].contents() == 2**63 + 5
    assert len(ours.fields["t.strings"]) == 250
    assert ours.data_offset == theirs.data_offset
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for mine, reference in zip(ours.tensors, theirs.tensors):
        assert mine.tensor_type == reference.tensor_type
        assert mine.shape == tuple(int(d) for d in reference.shape)
        assert (mine.n_elements, mine.n_bytes, mine.data_offset) == (
            reference.n_elements,
            reference.n_bytes,
            reference.data_offset,
        )
        assert mine.data.shape == reference.data.shape and mine.data.dtype == reference.data.dtype
        assert np.array_equal(mine.data, reference.data)
    assert {t.name: t.data.shape for t in ours.tensors}["q4k"] == (2, 288)
    if alignment:
        assert ours.data_offset % alignment == 0 and all(t.data_offset % alignment == 0 for t in ours.tensors)


def test_default_model_header_matches_gguf_reader():
    """The real 49152-token vocabulary and merges, read both ways."""
    path = default_model_path()
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    for key in (
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.token_type",
        "general.architecture",
        "llama.rope.freq_base",
        "tokenizer.chat_template",
    ):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes)) for t in theirs.tensors
    ]


def test_damaged_headers(tmp_path):
    path = tmp_path / "ok.gguf"
    _write(path, gguf.GGUFEndian.LITTLE)
    data = path.read_bytes()
    header_end = GGUFFile(path).data_offset
    for cut in (3, 24, 40, 300, header_end - 33):  # (the padding before the data is under 32 bytes)
        cut_path = tmp_path / f"cut{cut}.gguf"
        cut_path.write_bytes(data[:cut])
        with pytest.raises(GGUFFormatError) as error:
            GGUFFile(cut_path)
        assert error.value.truncated, cut
    version = tmp_path / "version.gguf"
    version.write_bytes(data[:4] + (7).to_bytes(4, "little") + data[8:])
    with pytest.raises(GGUFFormatError, match="version 7"):
        GGUFFile(version)
    huge = tmp_path / "huge.gguf"
    huge.write_bytes(data[:8] + (2**60).to_bytes(8, "little") + data[16:])
    with pytest.raises(GGUFFormatError) as error:
        GGUFFile(huge)
    assert error.value.truncated


@pytest.mark.parametrize("back", [1, 4, "all"])
def test_tensors_that_overlap_are_refused(tmp_path, back):
    """A tensor moved back onto its neighbour's bytes (its offset in the header rewritten) is
    refused, naming both: else it would read the other's bytes as its weights."""
    path = tmp_path / "ok.gguf"
    _write(path, gguf.GGUFEndian.LITTLE)
    header = GGUFFile(path)
    first, second = sorted(header.tensors, key=lambda t: t.data_offset)[:2]
    # the second tensor's info: name (u64 length, bytes), n_dims u32, dims u64 each, type u32, offset u64
    data = bytearray(path.read_bytes())
    name = len(second.name).to_bytes(8, "little") + second.name.encode()
    at = data.index(name) + len(name) + 4 + 8 * len(second.shape) + 4
    end_of_first = first.data_offset + first.n_bytes - header.data_offset
    moved = end_of_first - (first.n_bytes if back == "all" else back)
    data[at : at + 8] = moved.to_bytes(8, "little")
    bad = tmp_path / "overlap.gguf"
    bad.write_bytes(bytes(data))
    message = f"tensor '{second.name}' starts at byte .* inside tensor '{first.name}'"
    with pytest.raises(GGUFFormatError, match=message):
        GGUFFile(bad)


def test_big_endian_model_is_refused_by_name(tmp_path):
    """Its metadata reads (above), but the weight readers take little-endian bytes: refused, not
    loaded as wrong numbers."""
    from llamascope.errors import LlamascopeError
    from llamascope.loading import open_checkpoint

    path = tmp_path / "big.gguf"
    _write(path, gguf.GGUFEndian.BIG)
    with pytest.raises(LlamascopeError, match="big-endian") as error:
        open_checkpoint(path)
    assert str(path) in str(error.value)


def test_text_that_is_not_utf8(tmp_path):
    """A value that is not UTF-8 is refused when it is read, naming its key (the rest of the file
    reads); a key or tensor name that is not UTF-8 makes the header unreadable, not 'truncated'."""
    path = tmp_path / "ok.gguf"
    _write(path, gguf.GGUFEndian.LITTLE)
    data = path.read_bytes()
    bad_value = data.replace("héllo".encode(), b"h\xff\xfello", 1)
    bad_token = data.replace("ünï".encode(), b"\xc3\xffn\xc3\xaf", 1)
    bad_key = data.replace(b"t.u16", b"t.\xff16", 1)
    for name, content in (("value", bad_value), ("token", bad_token), ("key", bad_key)):
        (tmp_path / f"{name}.gguf").write_bytes(content)
    header = GGUFFile(tmp_path / "value.gguf")
    assert header.fields["t.u32"].contents() == 4_000_000_000
    with pytest.raises(ValueError, match="not UTF-8"):
        header.fields["t.str"].contents()
    tokens = GGUFFile(tmp_path / "token.gguf").fields["t.strings"]
    assert len(tokens) == 250
    with pytest.raises(ValueError, match="not UTF-8"):
        tokens.contents()
    with pytest.raises(GGUFFormatError, match="metadata key at byte .* is not UTF-8") as error:
        GGUFFile(tmp_path / "key.gguf")
    assert not error.value.truncated
