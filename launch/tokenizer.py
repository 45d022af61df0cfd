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
    data: DataConfig = field(
        default_factory=DataConfig
    )  # the text to train on (data.train, data.format, data.text_field)
    overwrite: bool = False  # replace an existing `out` file


def main(argv: list[str]) -> int:
    """python -m launch.tokenizer data.train=PATH|shakespeare out=tokenizer.model [vocab_size=8192] [overwrite=true]"""
    from launch.config import load_config
    from launch.data.sources import load_documents
    from launch.runtime.outputs import check_output_file

    args = load_config(argv, TokenizerArgs)
    check_output_file(args.out, overwrite=args.overwrite)
    docs = load_documents(args.data.train, "train", args.data.format, args.data.text_field)
    path = train_tokenizer(docs, args.out, args.vocab_size)
    tok = Tokenizer(path)
    print(f"wrote {path} ({tok.vocab_size} pieces)")
    return 0


if __name__ == "__main__":
    from launch.runtime.errors import run_cli

    run_cli(main)
