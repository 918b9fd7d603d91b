"""gguf_file.GGUFFile, the header reader, against gguf-py's own GGUFReader on the same files: every
metadata value and every tensor's description and data, little- and big-endian, with each value
type GGUF defines; and damaged headers fail with GGUFFormatError, not a stray exception."""

from __future__ import annotations

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from llamascope.loading import default_model_path  # noqa: E402
from llamascope.loading.gguf_file import GGUFFile, GGUFFormatError  # noqa: E402


def _write(path, endian):
    rng = np.random.default_rng(0)
    writer = gguf.GGUFWriter(str(path), "llama", endianess=endian)
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
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("endian", ["LITTLE", "BIG"])
def test_header_matches_gguf_reader(tmp_path, endian):
    path = tmp_path / f"{endian}.gguf"
    _write(path, gguf.GGUFEndian[endian])
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
            reference.n_elements, reference.n_bytes, reference.data_offset)
        assert mine.data.shape == reference.data.shape and mine.data.dtype == reference.data.dtype
        assert np.array_equal(mine.data, reference.data)


def test_default_model_header_matches_gguf_reader():
    """The real 49152-token vocabulary and merges, read both ways."""
    path = default_model_path()
    ours, theirs = GGUFFile(path), gguf.GGUFReader(str(path))
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
                "general.architecture", "llama.rope.freq_base", "tokenizer.chat_template"):
        assert ours.fields[key].contents() == theirs.fields[key].contents(), key
    assert [(t.name, t.data_offset, t.n_bytes) for t in ours.tensors] == [
        (t.name, int(t.data_offset), int(t.n_bytes)) for t in theirs.tensors]


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
