"""SentencePiece BPE model -> an equivalent Hugging Face tokenizer (tokenizer.json).

The sentencepiece model file is a protobuf; we read the few fields we need with a small wire-format
decoder instead of depending on `protobuf`. The HF tokenizer is built from scratch with `tokenizers`:

- vocabulary = the sp pieces with their ids; merges = every split of a piece into two pieces, ranked
  by the merged piece's id (sp BPE merges the adjacent pair whose concatenation scores highest,
  i.e. has the lowest id, leftmost first; HF BPE does the same with merge ranks);
- normalizer = Prepend("▁") + Replace(" ", "▁"), run on the whole text *before* user-defined symbols
  are split off (they are added tokens with normalized=True), which is what sp does: one dummy
  prefix at the start of the text, not after every newline (a Metaspace pre-tokenizer gets this
  wrong for text starting with a space, and after added tokens);
- byte fallback for characters outside the vocabulary;
- a post-processor that puts BOS in front (the repo's convention, `Tokenizer.encode_prompt`), so
  `tok(text)["input_ids"]` is what we score and continue, and lm-eval's `hf` model on the export
  conditions on what ours does; `add_special_tokens=False` gives the bare pieces (`Tokenizer.encode`).

tokenizer_config.json names `PreTrainedTokenizerFast`, which transformers 4.x and 5.x both load
from tokenizer.json as written (5.x's own default, `TokenizersBackend`, does not exist in 4.x; and
`LlamaTokenizerFast` under 5.x rebuilds the pipeline from the vocabulary, giving other ids).

Known difference: special-token strings typed into the text (e.g. a literal "</s>") become the
special id in HF, while sp encodes them as plain characters.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from launch.runtime.errors import UserError

SPACE = "\u2581"  # sentencepiece's whitespace marker "▁"

# ModelProto.SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
BPE_MODEL = 2  # TrainerSpec.ModelType
_SPECIAL_ID_FIELDS = {40: "unk_token", 41: "bos_token", 42: "eos_token", 43: "pad_token"}  # TrainerSpec


@dataclass
class SpModel:
    """The parts of a sentencepiece ModelProto that decide how text is encoded."""

    pieces: list[tuple[str, float, int]]  # (piece, score, type) in id order
    model_type: int = 1  # proto default: UNIGRAM
    byte_fallback: bool = False
    treat_whitespace_as_suffix: bool = False
    normalizer_name: str = "nmt_nfkc"
    precompiled_charsmap: bytes = b""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True
    escape_whitespaces: bool = True
    # TrainerSpec ids of the special pieces (proto defaults; -1: none)
    special_ids: dict[str, int] = field(
        default_factory=lambda: {"unk_token": 0, "bos_token": 1, "eos_token": 2, "pad_token": -1}
    )

    def ids_of_type(self, kind: int) -> list[int]:
        return [i for i, (_, _, t) in enumerate(self.pieces) if t == kind]


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return value, i


def _fields(buf: bytes):
    """Yield (field number, value) of one protobuf message; bytes for length-delimited fields."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = buf[i : i + 8], i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        elif wire == 5:
            value, i = struct.unpack("<f", buf[i : i + 4])[0], i + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value


def read_sp_model(path: str | Path) -> SpModel:
    path = Path(path)
    try:
        buf = path.read_bytes()
        model = SpModel(pieces=[])
        for number, value in _fields(buf):
            if number == 1:  # repeated SentencePiece
                piece, score, kind = "", 0.0, NORMAL
                for n, v in _fields(value):
                    if n == 1:
                        piece = v.decode("utf-8")
                    elif n == 2:
                        score = v
                    elif n == 3:
                        kind = v
                model.pieces.append((piece, score, kind))
            elif number == 2:  # TrainerSpec
                for n, v in _fields(value):
                    if n == 3:
                        model.model_type = v
                    elif n == 35:
                        model.byte_fallback = bool(v)
                    elif n == 24:
                        model.treat_whitespace_as_suffix = bool(v)
                    elif n in _SPECIAL_ID_FIELDS:
                        model.special_ids[_SPECIAL_ID_FIELDS[n]] = (
                            v if v < 1 << 63 else v - (1 << 64)
                        )  # int32 -1
            elif number == 3:  # NormalizerSpec
                for n, v in _fields(value):
                    if n == 1:
                        model.normalizer_name = v.decode("utf-8")
                    elif n == 2:
                        model.precompiled_charsmap = v
                    elif n == 3:
                        model.add_dummy_prefix = bool(v)
                    elif n == 4:
                        model.remove_extra_whitespaces = bool(v)
                    elif n == 5:
                        model.escape_whitespaces = bool(v)
    except (OSError, ValueError, IndexError, UnicodeDecodeError, struct.error) as e:
        raise UserError(f"cannot read sentencepiece model {path}: {e}") from None
    if not model.pieces:
        raise UserError(f"{path} is not a sentencepiece model (no pieces found)")
    return model


def check_supported(sp: SpModel, path: str | Path) -> None:
    """Fail naming the sentencepiece setting the exported tokenizer could not reproduce exactly."""
    problems = {
        "trainer_spec.model_type (only BPE is supported)": sp.model_type != BPE_MODEL,
        "normalizer_spec.name (only 'identity' is supported)": sp.normalizer_name != "identity"
        or bool(sp.precompiled_charsmap),
        "normalizer_spec.remove_extra_whitespaces=true": sp.remove_extra_whitespaces,
        "normalizer_spec.escape_whitespaces=false": not sp.escape_whitespaces,
        "trainer_spec.treat_whitespace_as_suffix=true": sp.treat_whitespace_as_suffix,
    }
    bad = [name for name, failed in problems.items() if failed]
    if bad:
        raise UserError(
            f"{path}: cannot export this sentencepiece model to an exactly equivalent Hugging Face tokenizer: "
            f"unsupported {', '.join(bad)}"
        )


def bpe_vocab_and_merges(sp: SpModel) -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = {piece: i for i, (piece, _, _) in enumerate(sp.pieces)}
    mergeable = {piece: i for i, (piece, _, kind) in enumerate(sp.pieces) if kind == NORMAL}
    ranked = []
    for piece, pid in mergeable.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in mergeable and right in mergeable:
                ranked.append((pid, mergeable[left], mergeable[right], left, right))
    ranked.sort()
    return vocab, [(left, right) for *_, left, right in ranked]


def build_tokenizer(sp_path: str | Path):
    """A `transformers` fast tokenizer producing the same ids as the sentencepiece model."""
    from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast

    sp = read_sp_model(sp_path)
    check_supported(sp, sp_path)
    vocab, merges = bpe_vocab_and_merges(sp)
    unk = next((sp.pieces[i][0] for i in sp.ids_of_type(UNKNOWN)), None)
    tok = Tokenizer(
        BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True, byte_fallback=sp.byte_fallback)
    )
    steps = [normalizers.Replace(" ", SPACE)]
    if sp.add_dummy_prefix:
        steps.insert(0, normalizers.Prepend(SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if sp.add_dummy_prefix:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)
    # Control pieces never come out of sp's encoder; unk does via fuse_unk. Both are special tokens.
    specials = [sp.pieces[i][0] for i in sp.ids_of_type(CONTROL) + sp.ids_of_type(UNKNOWN)]
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in specials])
    # sp cuts user-defined symbols out of the text before BPE. A one-character symbol that no other
    # piece contains needs nothing special: BPE can never merge it, so it stays one token (and, being
    # an ordinary vocab entry, decodes without the spaces HF puts around added tokens). Longer ones
    # become added tokens matched on the normalized text, as sp matches them.
    texts = [p for p, _, _ in sp.pieces]
    user = [sp.pieces[i][0] for i in sp.ids_of_type(USER_DEFINED)]
    atomic = [p for p in user if len(p) == 1 and sum(p in t for t in texts) == 1]
    tok.add_tokens([AddedToken(p, special=False, normalized=True) for p in user if p not in atomic])
    names = {key: sp.pieces[i][0] for key, i in sp.special_ids.items() if 0 <= i < len(sp.pieces)}
    if "bos_token" in names:
        bos = names["bos_token"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A",
            pair=f"{bos} $A {bos} $B:1",
            special_tokens=[(bos, sp.special_ids["bos_token"])],
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, clean_up_tokenization_spaces=False, split_special_tokens=True, **names
    )


# tokenizer_config.json keys that make the export load the same under transformers 4.x and 5.x.
PORTABLE_TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "add_bos_token": True,
    "add_eos_token": False,
}


def save_tokenizer(sp_path: str | Path, out_dir: str | Path, model_max_length: int | None = None) -> None:
    """Write tokenizer.json + tokenizer_config.json to out_dir, plus the sp model itself (so
    `from-hf` can bring the directory back)."""
    hf_tok = build_tokenizer(sp_path)
    if model_max_length is not None:
        hf_tok.model_max_length = model_max_length
    hf_tok.save_pretrained(str(out_dir))
    config_path = Path(out_dir) / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("backend", None)  # a 5.x-only field
    config.update(PORTABLE_TOKENIZER_CONFIG)
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    shutil.copyfile(sp_path, Path(out_dir) / "tokenizer.model")
