"""The training loss and validation: cross-entropy, validation loss over a fixed set of sequences,
and the unigram baseline a language model has to beat."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
import torch.distributed as dist

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
