"""SentencePiece BPE vocabularies as a `tokenizers.Tokenizer`.

Two sources share one builder, `spm_tokenizer`: LLaMA-1/2 `tokenizer.model` files (read here
with the `sentencepiece` package) and GGUF vocabularies with `tokenizer.ggml.model = llama`
(read in `gguf_tokenizer.py`). The result has the shape of Hugging Face's LlamaTokenizerFast
tokenizer.json: a BPE model with byte fallback whose merges come from the piece scores,
the normalizer Prepend("▁") + Replace(" ", "▁"), and the decoder Replace / ByteFallback /
Fuse / Strip. Control pieces (`<s>`, `</s>`) and the unknown piece are special added tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers

from ..errors import LlamascopeError

# Piece types, numbered as in sentencepiece_model.proto and in GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space
# Pieces that are never the result of a merge: SentencePiece matches them by other means.
NOT_MERGED = (UNKNOWN, CONTROL, BYTE)
# TrainerSpec.model_type values.
SPM_MODEL_TYPES = {1: "Unigram", 2: "BPE", 3: "word", 4: "char"}


@dataclass
class SpmVocabulary:
    """What a SentencePiece BPE tokenizer is made of, whichever file it came from."""

    pieces: list[str]
    scores: list[float]
    types: list[int]
    add_prefix_space: bool = True  # SentencePiece's add_dummy_prefix
    remove_extra_whitespaces: bool = False
    byte_fallback: bool = True
    precompiled_charsmap: bytes = b""
    source: str = ""


def spm_merges(vocab: SpmVocabulary) -> list[tuple[str, str]]:
    """BPE merges implied by the pieces, best first, as transformers' SentencePieceExtractor does.

    SentencePiece merges the adjacent pair whose joined piece has the highest score. Each way of
    cutting a piece in two known pieces is a merge; merges are ordered by the joined piece's
    score (highest first), then by its id, then by the ids of the two halves.
    """
    ids: dict[str, int] = {}
    for index, piece in enumerate(vocab.pieces):
        ids.setdefault(piece, index)
    ranked = []
    for index, piece in enumerate(vocab.pieces):
        if vocab.types[index] in NOT_MERGED or ids[piece] != index:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in ids and right in ids:
                ranked.append((-vocab.scores[index], index, ids[left], ids[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def spm_normalizer(vocab: SpmVocabulary) -> normalizers.Normalizer:
    """SentencePiece's normalisation: optional char map, optional space cleaning, "▁" for spaces."""
    steps: list[normalizers.Normalizer] = []
    if vocab.precompiled_charsmap:
        steps.append(normalizers.Precompiled(vocab.precompiled_charsmap))
    if vocab.remove_extra_whitespaces:
        steps += [normalizers.Strip(left=True, right=True), normalizers.Replace(Regex(" {2,}"), " ")]
    if vocab.add_prefix_space:
        steps.append(normalizers.Prepend(SPACE))
    steps.append(normalizers.Replace(" ", SPACE))
    return normalizers.Sequence(steps)


def spm_decoder(vocab: SpmVocabulary) -> decoders.Decoder:
    """ "▁" back to spaces, <0xNN> pieces back to bytes, and the prefix space dropped."""
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if vocab.add_prefix_space:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    return decoders.Sequence(steps)


def spm_tokenizer(vocab: SpmVocabulary) -> tokenizers.Tokenizer:
    """A LlamaTokenizerFast-shaped `tokenizers.Tokenizer` for a SentencePiece BPE vocabulary."""
    if not (len(vocab.pieces) == len(vocab.scores) == len(vocab.types)):
        raise LlamascopeError(
            f"{vocab.source}: {len(vocab.pieces)} pieces, {len(vocab.scores)} scores and "
            f"{len(vocab.types)} token types: the lists must have the same length"
        )
    ids: dict[str, int] = {}
    for index, piece in enumerate(vocab.pieces):
        ids.setdefault(piece, index)
    unk = next((p for p, t in zip(vocab.pieces, vocab.types) if t == UNKNOWN), None)
    model = models.BPE(
        vocab=ids, merges=spm_merges(vocab), unk_token=unk, fuse_unk=True, byte_fallback=vocab.byte_fallback
    )
    tokenizer = tokenizers.Tokenizer(model)
    tokenizer.normalizer = spm_normalizer(vocab)
    tokenizer.decoder = spm_decoder(vocab)
    special = [
        AddedToken(p, normalized=False, special=True)
        for p, t in zip(vocab.pieces, vocab.types)
        if t in (UNKNOWN, CONTROL)
    ]
    user = [
        AddedToken(p, normalized=False, special=False) for p, t in zip(vocab.pieces, vocab.types) if t == USER_DEFINED
    ]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)
    return tokenizer


# ---- tokenizer.model files ---------------------------------------------------------------------


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[pos]
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80:
            return value, pos


def proto_fields(buf: bytes) -> list[tuple[int, int | bytes]]:
    """Top-level (field number, value) pairs of a protobuf message: varints as ints, the rest as bytes."""
    out: list[tuple[int, int | bytes]] = []
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("truncated message")
        out.append((number, value))
    return out


def _spec(fields: list[tuple[int, int | bytes]], number: int, default):
    """The last value of field `number` (protobuf's rule for repeated scalars), or `default`."""
    values = [v for n, v in fields if n == number]
    return values[-1] if values else default


def read_model_spec(serialized: bytes) -> dict:
    """The parts of a ModelProto that the `sentencepiece` package does not expose.

    ModelProto: 1 pieces (1 piece, 2 score, 3 type), 2 trainer_spec (3 model_type,
    35 byte_fallback), 3 normalizer_spec (2 precompiled_charsmap, 3 add_dummy_prefix,
    4 remove_extra_whitespaces). Unset fields take the proto's defaults.
    """
    top = proto_fields(serialized)
    trainer = proto_fields(_spec(top, 2, b""))
    normalizer = proto_fields(_spec(top, 3, b""))
    types = [int(_spec(proto_fields(piece), 3, NORMAL)) for n, piece in top if n == 1]
    return {
        "types": types,
        "model_type": int(_spec(trainer, 3, 1)),
        "byte_fallback": bool(_spec(trainer, 35, 0)),
        "precompiled_charsmap": bytes(_spec(normalizer, 2, b"")),
        "add_dummy_prefix": bool(_spec(normalizer, 3, 1)),
        "remove_extra_whitespaces": bool(_spec(normalizer, 4, 1)),
    }


def read_sentencepiece(path: Path) -> tuple[SpmVocabulary, dict]:
    """Pieces and scores through `sentencepiece`; piece types and settings from the model's spec."""
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.Load(str(path))
        spec = read_model_spec(processor.serialized_model_proto())
    except (OSError, RuntimeError, ValueError) as e:
        reason = str(e).strip() or type(e).__name__
        raise LlamascopeError(f"{path}: not a readable SentencePiece model ({reason})") from None
    if spec["model_type"] != 2:
        name = SPM_MODEL_TYPES.get(spec["model_type"], str(spec["model_type"]))
        raise LlamascopeError(
            f"{path}: a SentencePiece {name} model (trainer_spec.model_type); only BPE models such as "
            f"LLaMA-1/2's tokenizer.model are supported"
        )
    size = processor.GetPieceSize()
    if len(spec["types"]) != size:
        raise LlamascopeError(f"{path}: the model lists {len(spec['types'])} pieces, sentencepiece reads {size}")
    vocab = SpmVocabulary(
        pieces=[processor.IdToPiece(i) for i in range(size)],
        scores=[float(processor.GetScore(i)) for i in range(size)],
        types=spec["types"],
        add_prefix_space=spec["add_dummy_prefix"],
        remove_extra_whitespaces=spec["remove_extra_whitespaces"],
        byte_fallback=spec["byte_fallback"],
        precompiled_charsmap=spec["precompiled_charsmap"],
        source=str(path),
    )
    roles = {
        "bos_token": processor.bos_id(),
        "eos_token": processor.eos_id(),
        "unk_token": processor.unk_id(),
        "pad_token": processor.pad_id(),
    }
    settings: dict = {role: vocab.pieces[i] for role, i in roles.items() if 0 <= i < size}
    settings.update(add_bos_token=True, add_eos_token=False)
    return vocab, settings


def tokenizer_from_sentencepiece(path: str | Path) -> tuple[tokenizers.Tokenizer, dict]:
    """A LLaMA-1/2 `tokenizer.model` -> (backend, settings keyed like tokenizer_config.json).

    Settings: bos "<s>", eos "</s>", unk "<unk>" (the model's own ids), add_bos_token True,
    add_eos_token False, as LlamaTokenizer has them.
    """
    path = Path(path)
    if not path.is_file():
        raise LlamascopeError(f"{path}: file not found")
    vocab, settings = read_sentencepiece(path)
    return spm_tokenizer(vocab), settings
