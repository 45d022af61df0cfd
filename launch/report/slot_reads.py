"""Slot reads per memory layer, measured on a run's newest checkpoint.

Checkpoints hold no usage counts: the trainer's counters (memlayers' `MemoryPool.usage_counts`) are
a non-persistent buffer reset at every logging step, and they count per pool, i.e. all layers
sharing a table together. So the histogram is measured: the newest checkpoint's model reads the
first N sequences of the run's validation split (its training split when it has none), and a hook
on each memory layer counts the slots that layer selects (`ProductKeyMemory.select`, the same
top-k the forward reads). The tokens come from the run's own token cache, opened read-only: a
run whose cache is gone gets a note instead of a histogram, never a re-tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from launch.runtime.errors import UserError


@dataclass
class SlotReads:
    checkpoint: Path
    step: int
    sequences: int
    split: str
    layers: dict[str, np.ndarray]  # memory layer's module name -> reads per slot (N*N int64)


def _tokens(run_dir: Path, cfg, tokenizer):
    """The run's validation (else training) tokens from its token cache, never tokenizing anything."""
    from launch.data.stream import tokenize_source

    d = cfg.data
    source, split = (d.val, "val") if d.val else (d.train, "train")
    cache = Path(d.cache_dir) if d.cache_dir else run_dir / "data_cache"
    tokens = tokenize_source(
        source, split, tokenizer, cache, d.format, d.text_field, d.encoding_errors,
        workers=1, progress=False, create=False, doc_separator=d.doc_separator,
    )  # fmt: skip
    return tokens, split


def measure_slot_reads(run_dir: str | Path, sequences: int = 32, batch_size: int = 8) -> SlotReads | None:
    """Reads per slot of every memory layer of the newest checkpoint of `run_dir` over the first
    `sequences` sequences; None for a model without memory layers. UserError (one line) when the
    checkpoint or the run's token cache cannot be read."""
    import torch

    from launch.checkpoint.load import load_checkpoint
    from launch.data.stream import PackedSequences
    from memlayers import ProductKeyMemory

    run_dir = Path(run_dir)
    loaded = load_checkpoint(run_dir)
    model = loaded.model
    layers = {n: m for n, m in model.named_modules() if isinstance(m, ProductKeyMemory)}
    if not layers:
        return None
    try:
        tokens, split = _tokens(run_dir, loaded.config, loaded.tokenizer)
    except (UserError, OSError, ValueError) as e:
        raise UserError(f"the {run_dir} token cache cannot be read ({e})") from None
    data = PackedSequences(tokens, loaded.config.data.seq_len)
    n = min(sequences, len(data))
    counts = {name: torch.zeros(m.n_keys**2, dtype=torch.int64) for name, m in layers.items()}

    def counter(name: str):
        def hook(module, args, _output):
            x = args[0]
            slots, _ = module.select(x.reshape(-1, module.dim))
            counts[name] += torch.bincount(slots.reshape(-1).cpu(), minlength=counts[name].numel())

        return hook

    handles = [m.register_forward_hook(counter(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            for start in range(0, n, batch_size):
                batch = data.get(np.arange(start, min(start + batch_size, n)))
                model(batch[:, :-1].to(torch.long))
    finally:
        for h in handles:
            h.remove()
    return SlotReads(loaded.path, loaded.step, n, split, {k: v.numpy() for k, v in counts.items()})
