"""Float weights used where they lie in the mapped checkpoint file (loading/mapping.py): the
same numbers and tokens as weights read into memory, the file's own pages, never written back."""

from __future__ import annotations

import ctypes
import hashlib
import json
import struct
from pathlib import Path

import pytest
import torch
from gguf_fixtures import GGUF_BLOCK, TinySpec, write_tiny_llama
from hypothesis import given, settings
from hypothesis import strategies as st

from llamascope import Engine
from llamascope.loading import load_model
from llamascope.loading.mapping import PAGE, FileMaps, _parts


def _regions(path: Path) -> list[tuple[int, int]]:
    """The address ranges of this process mapped from `path` (/proc/self/maps)."""
    target = str(Path(path).resolve())
    regions = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == target:
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                regions.append((lo, hi))
    return regions


def _in_file(tensor: torch.Tensor, path: Path) -> bool:
    address = tensor.data_ptr()
    return any(lo <= address < hi for lo, hi in _regions(path))


def _digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def _float_gguf(tmp_path: Path, qtype: str) -> Path:
    """A tiny GGUF whose matrices are all `qtype` (F32 or BF16), q/k rows in llama.cpp's order."""
    spec = TinySpec()
    types = {f"blk.{n}.{short}.weight": qtype for n in range(spec.layers) for short in GGUF_BLOCK.values()}
    types.update({"token_embd.weight": qtype, "output.weight": qtype})
    path = tmp_path / f"tiny-{qtype}.gguf"
    write_tiny_llama(path, spec, types=types, reference=False)
    return path


@pytest.fixture(params=["safetensors", "F32", "BF16"])
def float_checkpoint(request, tiny_model, tmp_path) -> tuple[Path, Path]:
    """(what to load, the file its weights lie in)."""
    if request.param == "safetensors":
        return tiny_model, tiny_model / "model.safetensors"
    path = _float_gguf(tmp_path, request.param)
    return path, path


def test_mapped_weights_are_the_files_pages_with_the_read_weights_numbers(float_checkpoint):
    """Every weight equals the one read with mmap=False, bit for bit; the weights the file holds as
    used (embedding, LM head, o_proj, down_proj, gate/up as one fused view) are views of its
    mapping, a GGUF's un-permuted q/k rows are not, and nothing is mapped with mmap=False."""
    path, file = float_checkpoint
    mapped = load_model(path).model
    read = load_model(path, mmap=False).model
    mapped_state, read_state = mapped.state_dict(), read.state_dict()
    assert mapped_state.keys() == read_state.keys()
    for name, tensor in mapped_state.items():
        assert tensor.dtype == read_state[name].dtype and torch.equal(tensor, read_state[name]), name
    layer = mapped.model.layers[1]
    for weight in (
        mapped.model.embed_tokens.weight,
        mapped.lm_head.weight,
        layer.self_attn.o_proj.weight,
        layer.mlp.down_proj.weight,
        layer.mlp.gate_up_proj.weight,  # (fused without a copy: gate and up lie one after another)
    ):
        assert _in_file(weight, file)
    assert _in_file(layer.self_attn.qkv_proj.weight, file) is False  # (read into one buffer)
    assert not any(_in_file(t, file) for t in read_state.values())


def test_a_mapped_model_generates_the_tokens_of_a_read_one(float_checkpoint):
    path, _ = float_checkpoint
    prompt = "Once upon a time"
    mapped = Engine.load(path).generate(prompt, max_new_tokens=12, do_sample=False)
    read = Engine.load(path, mmap=False).generate(prompt, max_new_tokens=12, do_sample=False)
    assert mapped.output_ids == read.output_ids


def test_writing_a_mapped_weight_never_reaches_the_file(tiny_model, tmp_path):
    """The mapping is private: an in-place edit of a weight copies its pages for this process."""
    folder = tmp_path / "copy"
    folder.mkdir()
    for item in tiny_model.iterdir():
        (folder / item.name).write_bytes(item.read_bytes())
    file = folder / "model.safetensors"
    before = _digest(file)
    model = load_model(folder).model
    weight = model.model.layers[0].mlp.down_proj.weight
    assert _in_file(weight, file)
    with torch.no_grad():
        weight.mul_(0).add_(3.0)
    assert torch.all(weight == 3.0)
    assert _digest(file) == before
    assert torch.all(load_model(folder).model.model.layers[0].mlp.down_proj.weight != 3.0)


def test_an_offset_the_dtype_cannot_view_is_read_instead(tiny_model, tmp_path):
    """A safetensors file whose data starts at an odd byte (a header of odd length: legal) holds
    float32 tensors the mapping cannot view as float32: they are read, and equal the aligned file's."""
    source = tiny_model / "model.safetensors"
    raw = source.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    odd = json.dumps(header).encode()
    if len(odd) % 2 == 0:
        odd += b" "
    folder = tmp_path / "odd"
    folder.mkdir()
    for item in tiny_model.iterdir():
        if item.name != "model.safetensors":
            (folder / item.name).write_bytes(item.read_bytes())
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(odd)) + odd + raw[8 + length :])
    assert (8 + len(odd)) % 4 != 0
    odd_model = load_model(folder).model
    aligned = load_model(tiny_model, mmap=False).model
    for name, tensor in odd_model.state_dict().items():
        assert torch.equal(tensor, aligned.state_dict()[name]), name
        assert not _in_file(tensor, folder / "model.safetensors")


def test_a_span_past_the_files_end_is_refused_by_name(tmp_path):
    path = tmp_path / "short.bin"
    path.write_bytes(bytes(4096))
    maps = FileMaps()
    assert maps.tensor(path, 0, torch.float32, (1024,)).shape == (1024,)
    assert maps.tensor(path, 2, torch.float32, (4,)) is None  # (not a multiple of 4 bytes)
    with pytest.raises(Exception, match=r"short\.bin: a tensor of 4096 bytes at byte 4 runs past"):
        maps.tensor(path, 4, torch.float32, (1024,))


def test_an_empty_file_is_read_not_mapped(tmp_path):
    path = tmp_path / "empty.bin"
    path.write_bytes(b"")
    assert FileMaps().tensor(path, 0, torch.float32, (1,)) is None


def test_populate_makes_the_spans_resident(tmp_path):
    path = tmp_path / "data.bin"
    path.write_bytes(bytes(range(256)) * (64 * PAGE // 256))
    maps = FileMaps()
    view = maps.tensor(path, 8 * PAGE, torch.uint8, (16 * PAGE,))
    maps.populate()
    resident = bytearray((16 * PAGE + PAGE - 1) // PAGE)
    libc_mincore(view.data_ptr(), 16 * PAGE, resident)
    assert all(b & 1 for b in resident)


def libc_mincore(address: int, nbytes: int, out: bytearray) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    buffer = (ctypes.c_ubyte * len(out)).from_buffer(out)
    assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(nbytes), buffer) == 0, ctypes.get_errno()


@settings(max_examples=200, deadline=None)
@given(
    spans=st.lists(st.tuples(st.integers(0, 40 * PAGE), st.integers(1, 9 * PAGE)), min_size=0, max_size=12),
    count=st.integers(1, 5),
)
def test_populate_parts_cover_each_page_of_the_spans_once(spans, count):
    """The parts over the threads: at most `count`, page-aligned, no page twice, every page of
    every span, and none more than a page above an equal share."""
    parts = _parts([(PAGE * 100 + a, n) for a, n in spans], count)
    assert len(parts) <= count
    wanted = set()
    for address, nbytes in spans:
        first, last = (PAGE * 100 + address) // PAGE, (PAGE * 100 + address + nbytes - 1) // PAGE
        wanted.update(range(first, last + 1))
    covered: list[int] = []
    for part in parts:
        for lo, n in part:
            assert lo % PAGE == 0 and n % PAGE == 0 and n > 0
            covered.extend(range(lo // PAGE, (lo + n) // PAGE))
    assert sorted(covered) == sorted(wanted)
    if parts:
        share = -(-len(wanted) // count)
        assert max(sum(n for _, n in part) // PAGE for part in parts) <= share
