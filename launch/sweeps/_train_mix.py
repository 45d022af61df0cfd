"""TEMPORARY: `launch.train` with `data.mix` wired in, until launch/train.py builds its training
data with `launch.data.train_sequences` itself (then the runner stops using this; delete it).

The sweep runner starts this module instead of launch.train only for runs that set data.mix while
launch/train.py does not mention train_sequences. It swaps the trainer's first PackedSequences
(the training data) for the mixture while the Trainer is built, so resume checks and the
BatchStream see the mixed index space from the start.
"""

from __future__ import annotations

import os
from pathlib import Path

import launch.train as train
from launch.data import train_sequences
from launch.errors import run_cli


class MixTrainer(train.Trainer):
    def __init__(self, cfg, info):
        original = train.PackedSequences
        calls = []

        def packed(tokens, seq_len):
            calls.append(1)
            if len(calls) == 1:  # Trainer packs the training tokens first, validation second
                return train_sequences(cfg.data, tokens, self.tok, Path(cfg.run.dir) / "data_cache")
            return original(tokens, seq_len)

        train.PackedSequences = packed
        try:
            super().__init__(cfg, info)
        finally:
            train.PackedSequences = original


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    train.Trainer = MixTrainer
    run_cli(train.main)
