"""The training loss and validation: cross-entropy, validation loss over a fixed set of sequences,
the unigram baseline a language model has to beat, and the `Validator` that decides when the
trainer validates."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist

from launch.config import Config
from launch.data.stream import PackedSequences
from launch.distributed.process_group import DistInfo
from launch.train.loss import cross_entropy_rows


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss of (B, T, V) logits against (B, T) targets, in fp32 (launch/cross_entropy.py:
    F.cross_entropy's result with one vocabulary-sized temporary instead of three)."""
    return cross_entropy_rows(logits.flatten(0, 1), targets.flatten(), reduction=reduction)


@torch.no_grad()
def evaluate_loss(
    model,
    val: PackedSequences,
    n_sequences: int,
    batch: int,
    info: DistInfo,
    autocast,
    untracked=contextlib.nullcontext,
) -> tuple[float, int]:
    """Mean next-token loss over the first `n_sequences` validation sequences (all of them when
    `n_sequences` >= the split), split over the data-parallel ranks of `info`; returns (loss,
    sequences evaluated).

    Every rank runs the same number of forwards (sharded FSDP parameters and sharded memory reads
    are collective): a rank whose share is shorter repeats its first batch and discards it."""
    n = min(n_sequences, len(val))
    mine = np.arange(n)[info.rank :: info.world]
    batches = [mine[i : i + batch] for i in range(0, len(mine), batch)]
    count = torch.tensor([len(batches)], dtype=torch.int64, device=info.device)
    if dist.is_initialized():
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    model.eval()
    with untracked():
        for i in range(int(count)):
            real = i < len(batches)
            seqs = val.get(batches[i] if real else np.arange(1)).to(info.device)
            with autocast:
                logits = model(seqs[:, :-1])
            if real:
                loss = cross_entropy(logits, seqs[:, 1:], reduction="sum")
                total += torch.stack(
                    [
                        loss.double(),
                        torch.tensor(float(seqs[:, 1:].numel()), dtype=torch.float64, device=info.device),
                    ]
                )
    model.train()
    if dist.is_initialized():
        dist.all_reduce(total)  # tensor-parallel peers add the same sums to both terms: the mean holds
    return float(total[0] / total[1]), n


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 50.0))


class Validator:
    """The trainer's validation: owns the split and its policy. `due` says whether to validate after
    a step (every train.val_every steps and at the last one); `final` is the end-of-training pass over
    train.final_val_sequences (-1: the whole split; 0: none). Losses are collective: every rank runs
    the same forwards, so every rank must call them."""

    def __init__(self, val: PackedSequences | None, cfg: Config, info: DistInfo, autocast, untracked):
        self.val, self.info, self.autocast, self.untracked = val, info, autocast, untracked
        self.every, self.sequences = cfg.train.val_every, cfg.data.val_sequences
        self.final_sequences = cfg.train.final_val_sequences
        # Validation batches per rank: the training micro-batch size (at least one sequence).
        self.batch = max(1, cfg.data.batch_size // (info.world * cfg.train.grad_accum))

    def due(self, step: int, *, last: bool) -> bool:
        return self.val is not None and bool(self.every) and (step % self.every == 0 or last)

    def loss(self, model, n: int | None = None) -> tuple[float, int]:
        """Validation loss over the first `n` sequences (default data.val_sequences); (loss, sequences)."""
        n = self.sequences if n is None else n
        return evaluate_loss(model, self.val, n, self.batch, self.info, self.autocast, self.untracked)

    def final(self, model) -> tuple[float, int] | None:
        """The end-of-training validation, or None when there is no split or it is switched off."""
        if self.val is None or not self.final_sequences:
            return None
        return self.loss(model, len(self.val) if self.final_sequences < 0 else self.final_sequences)

    def describe(self, n: int) -> str:
        """Which part of the split `n` sequences are, for the final line."""
        return "the whole split" if n == len(self.val) else f"the first {n} of {len(self.val)}"
