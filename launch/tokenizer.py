"""Train a tokenizer: `python -m launch.tokenizer data.train=PATH|shakespeare out=tokenizer.model [vocab_size=8192]`.

The tokenizer itself (sentencepiece BPE, byte fallback) is `launch.data.tokenizer`; tokenizing a
corpus into shards with it is `python -m launch.tokenize`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from launch.config import DataConfig
from launch.data.tokenizer import Tokenizer, train_tokenizer


@dataclass
class TokenizerArgs:
    out: str = "tokenizer.model"  # where to write the sentencepiece model
    vocab_size: int = 8192  # pieces in the vocabulary
    # the text to train on (data.train, data.format, data.text_field, data.doc_separator, data.encoding_errors);
    # data.tokenizer_sample: lines used at most (a random sample; 0: all)
    data: DataConfig = field(default_factory=DataConfig)
    overwrite: bool = False  # replace an existing `out` file


def main(argv: list[str]) -> int:
    """python -m launch.tokenizer data.train=PATH|shakespeare out=tokenizer.model [vocab_size=8192] [overwrite=true]"""
    from launch.config import load_config
    from launch.data.stream import training_documents
    from launch.runtime.outputs import check_output_file

    args = load_config(argv, TokenizerArgs)
    check_output_file(args.out, overwrite=args.overwrite)
    # Streamed (data.mix sources too, as the trainer does); sentencepiece keeps a bounded sample of lines.
    path = train_tokenizer(
        training_documents(args.data), args.out, args.vocab_size, args.data.tokenizer_sample, quiet=False
    )
    tok = Tokenizer(path)
    print(f"wrote {path} ({tok.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    from launch.runtime.errors import run_cli

    run_cli(main)
