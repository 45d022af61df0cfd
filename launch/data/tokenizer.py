"""SentencePiece BPE tokenizer: training, loading, and `python -m launch.tokenizer`.

Trained with byte fallback and identity normalisation so every string round-trips exactly
(needed for bits-per-byte and for exporting an equivalent Hugging Face tokenizer); newline is a
user-defined piece because the plays' line structure is part of the text.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

from launch.runtime.errors import UserError

UNK, BOS, EOS, PAD = 0, 1, 2, 3


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if not path.is_file():
            raise UserError(f"tokenizer model not found: {path}")
        self.path = path
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(path))
        except (RuntimeError, OSError) as e:  # a truncated, garbage or non-sentencepiece file
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"{path} is not a sentencepiece tokenizer model ({reason})") from None
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self.sp.encode(text)
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    # The start-of-sequence convention, one for the whole repo (training data, eval, generation, the
    # lm-eval adapter, the HF export): Llama's. Every document is BOS + pieces + EOS when packed for
    # training; every prompt we score or continue is BOS + pieces. EOS ends a generation.
    def encode_document(self, text: str) -> list[int]:
        return self.encode(text, bos=True, eos=True)

    def encode_prompt(self, text: str) -> list[int]:
        return self.encode(text, bos=True)

    def encode_segment(self, text: str, first: bool = True, last: bool = True) -> list[int]:
        """A piece of a document (`launch.data.sources` segments): BOS if it starts one, EOS if it ends
        one. A piece that continues a document was cut after a line break or before a space; encoding
        it behind a newline and dropping the newline's pieces gives the ids it has in place (without
        this, sentencepiece's dummy-prefix space would be added at every cut). The newline is a
        user-defined piece, so nothing merges across it; the pieces equal the whole document's except
        where a cut had to fall inside a run of 1 MiB without a line break or space."""
        if first:
            ids = self.sp.encode(text)
        else:
            ids = self.sp.encode("\n" + text)[len(self._newline) :]
        return ([self.bos_id] if first else []) + ids + ([self.eos_id] if last else [])

    @property
    def _newline(self) -> list[int]:
        if not hasattr(self, "_newline_ids"):
            self._newline_ids = self.sp.encode("\n")
        return self._newline_ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


DEFAULT_SAMPLE = 2_000_000  # sentences (lines) a tokenizer is trained on at most


def train_tokenizer(
    texts: Iterable[str],
    out: str | os.PathLike,
    vocab_size: int = 8192,
    sample: int = DEFAULT_SAMPLE,
    quiet: bool = True,
) -> Path:
    """Train a BPE model on `texts` (documents, or pieces of them cut at line breaks) and write it
    atomically to `out`. Lines are streamed to sentencepiece, which keeps a uniform reservoir sample
    of `sample` of them (`input_sentence_size` + `shuffle_input_sentence`), so memory is bounded by
    the sample, not the corpus (0: no limit). Unless `quiet`, prints how many lines it used."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if sample < 0 or 0 < sample <= 100:  # sentencepiece's own floor for input_sentence_size
        raise UserError(f"data.tokenizer_sample={sample} must be 0 (every line) or above 100")
    seen = [0]

    def lines():
        for doc in texts:
            for line in doc.split("\n"):
                if line.strip():
                    seen[0] += 1
                    yield line

    proto = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=lines(),
            model_writer=proto,
            vocab_size=vocab_size,
            model_type="bpe",
            byte_fallback=True,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=True,
            character_coverage=1.0,
            user_defined_symbols=["\n"],
            unk_id=UNK,
            bos_id=BOS,
            eos_id=EOS,
            pad_id=PAD,
            num_threads=os.cpu_count() or 1,
            max_sentence_length=1 << 16,
            input_sentence_size=sample,
            shuffle_input_sentence=True,
            minloglevel=2,
        )
    except RuntimeError as e:
        raise UserError(f"sentencepiece could not train a {vocab_size}-piece vocabulary: {e}") from None
    if not quiet:
        used = min(seen[0], sample) if sample else seen[0]
        how = f"a random sample of {used:,} of {seen[0]:,}" if used < seen[0] else f"all {used:,}"
        print(f"tokenizer: trained on {how} lines (data.tokenizer_sample={sample})", flush=True)
    tmp = out.with_suffix(out.suffix + f".tmp{os.getpid()}")
    tmp.write_bytes(proto.getvalue())
    os.replace(tmp, out)
    return out
