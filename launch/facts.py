"""Write a seeded synthetic fact corpus: `python -m launch.facts out=DIR n_entities=300 seed=0 [repeats=8]`.

What it writes and why is `launch.data.facts`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from launch.config import load_config
from launch.data.facts import (
    ATTRIBUTES,
    BITS_PER_PARAM,
    FactsArgs,
    fact_bits,
    mixture_tokenizer,
    params_to_hold,
    write_corpus,
)
from launch.runtime.errors import run_cli


def main(argv: list[str]) -> int:
    args = load_config(argv, FactsArgs)
    paths = write_corpus(args)
    if args.tokenizer_vocab > 0:
        tok = mixture_tokenizer(
            [*args.tokenizer_with, str(paths["train"])],
            Path(args.out) / "tokenizer.model",
            args.tokenizer_vocab,
        )
        print(
            f"wrote {tok}: {args.tokenizer_vocab} pieces trained on {' + '.join(args.tokenizer_with)} + train.txt"
        )
    size = paths["train"].stat().st_size
    print(
        f"wrote {args.n_entities} entities × {len(ATTRIBUTES)} attributes to {args.out}: train.txt ({size / 1e3:.0f} kB), qa.jsonl, qa_seen.jsonl"
    )
    print(
        f"facts hold {fact_bits(args.n_entities) / 1e3:.1f} kbit ({fact_bits(1):.1f} bits per entity): at {BITS_PER_PARAM:g} bits/param "
        f"a model needs >= {params_to_hold(args.n_entities) / 1e6:.3f}M parameters to store them ({params_to_hold(args.n_entities, 1.0) / 1e6:.3f}M at 1 bit/param); "
        f"majority-answer recall EM {json.loads(paths['meta'].read_text())['majority_em']:.3f}"
    )
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)
