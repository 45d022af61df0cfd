"""Layout-independent initialisation (launch/param_init.py): any block of a tensor, drawn alone, equals
the same slice of the whole tensor drawn in one process, bit for bit."""

from __future__ import annotations

import pytest
import torch

from launch.distributed.param_init import block_rows, init_tensor_

SPECS = [("normal", 0.0, 0.02), ("uniform", -0.5, 0.5), ("constant", 1.0)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(300, 513), (70000,), (3, 2, 40, 8), (1, 1)])
def test_every_block_equals_its_slice_of_the_whole(shape, spec):
    full = torch.empty(shape)
    init_tensor_(full, "layers.0.w", spec, seed=7)
    rows = shape[0]
    # Row shards (FSDP2), uneven ones included, and column shards (memory values, rowwise TP).
    for lo, hi in [(0, rows), (0, (rows + 2) // 3), ((rows + 2) // 3, rows), (rows - 1, rows)]:
        cols = [(0, shape[1]), (shape[1] // 2, shape[1])] if len(shape) > 1 else [None]
        for c in cols:
            local_shape = (hi - lo, *((c[1] - c[0],) if c else ()), *shape[2:])
            local = torch.empty(local_shape)
            offset = (lo, *((c[0],) if c else ()), *(0 for _ in shape[2:]))
            init_tensor_(local, "layers.0.w", spec, seed=7, region=(shape, offset))
            expected = full[lo:hi] if c is None else full[lo:hi, c[0] : c[1]]
            assert torch.equal(local, expected), (shape, lo, hi, c)


def test_streams_depend_on_seed_and_name_and_match_the_distribution():
    a, b, c = torch.empty(512, 256), torch.empty(512, 256), torch.empty(512, 256)
    init_tensor_(a, "x", ("normal", 0.0, 0.02), seed=1)
    init_tensor_(b, "y", ("normal", 0.0, 0.02), seed=1)
    init_tensor_(c, "x", ("normal", 0.0, 0.02), seed=2)
    assert not torch.equal(a, b) and not torch.equal(a, c)
    assert abs(a.std().item() - 0.02) < 5e-4 and abs(a.mean().item()) < 5e-4
    # Blocks are distinct streams, not one stream restarted.
    r = block_rows(a.shape)
    assert not torch.equal(a[:r], a[r : 2 * r])


def test_model_init_is_reproducible_and_keeps_ties():
    from launch.models.llama import ModelConfig, Transformer

    m = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=100))
    m.init_weights(seed=3)
    first = {k: v.clone() for k, v in m.state_dict().items()}
    m.init_weights(seed=3)
    assert all(torch.equal(first[k], v) for k, v in m.state_dict().items())
    assert m.output.weight is m.tok_embeddings.weight
    assert torch.equal(m.layers[0].attention_norm.weight, torch.ones(32))
    wo = m.layers[0].attention.wo.weight
    assert wo.std().item() == pytest.approx(
        0.02 / 2, rel=0.1
    )  # residual output projections scaled by 1/sqrt(2L)
