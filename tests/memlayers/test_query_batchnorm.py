"""Query batchnorm (memlayers.query_norm): against torch's BatchNorm1d and the written-out reference,
inside the memory layer forward and backward, under activation checkpointing and torch.compile, and
synchronised across 2 and 4 gloo ranks."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from memlayers import MemoryPool, ProductKeyMemory, QueryBatchNorm
from memlayers.reference import reference_memory_forward

from ..conftest import run_module  # noqa: TID252

F64 = torch.float64


def _layer(seed=0, **kw) -> ProductKeyMemory:
    torch.manual_seed(seed)
    pool = MemoryPool(8, 12, dtype=F64)
    mem = ProductKeyMemory(16, pool, heads=2, k_dim=8, knn=4, query_batchnorm=True, dtype=F64, **kw)
    with torch.no_grad():
        mem.query_norm.weight.uniform_(0.5, 1.5)
        mem.query_norm.bias.normal_(0.0, 0.3)
        mem.query.bias.normal_(0.0, 3.0)  # a shared offset: the collapse batchnorm removes
    return mem


def test_matches_torch_batchnorm1d_train_and_eval():
    g = torch.Generator().manual_seed(0)
    ours, theirs = QueryBatchNorm(6, dtype=F64), nn.BatchNorm1d(6, dtype=F64)
    with torch.no_grad():
        w, b = torch.rand(6, generator=g, dtype=F64) + 0.5, torch.randn(6, generator=g, dtype=F64)
        for m in (ours, theirs):
            m.weight.copy_(w)
            m.bias.copy_(b)
    for _ in range(3):
        q = (torch.randn(11, 6, generator=g, dtype=F64) * 4 + 7).requires_grad_(True)
        q2 = q.detach().clone().requires_grad_(True)
        gy = torch.randn(11, 6, generator=g, dtype=F64)
        y, y2 = ours(q), theirs(q2)
        torch.testing.assert_close(y, y2)
        (y * gy).sum().backward()
        (y2 * gy).sum().backward()
        torch.testing.assert_close(q.grad, q2.grad)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
        torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)
        torch.testing.assert_close(ours.running_mean, theirs.running_mean)
        torch.testing.assert_close(ours.running_var, theirs.running_var)
    ours.eval(), theirs.eval()
    q = torch.randn(4, 6, generator=g, dtype=F64)
    torch.testing.assert_close(ours(q), theirs(q))


def test_one_token_batch_leaves_running_estimates_alone():
    bn = QueryBatchNorm(3)
    bn(torch.randn(1, 3))
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    with pytest.raises(ValueError, match=r"expected \(tokens, 3\) queries"):
        bn(torch.randn(2, 4))


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_memory_layer_forward_backward_match_reference(qk_norm, training):
    mem = _layer(qk_norm=qk_norm)
    if not training:
        with torch.no_grad():
            mem.query_norm.running_mean.normal_(0.0, 2.0)
            mem.query_norm.running_var.uniform_(0.5, 3.0)
    mem.train(training)
    x = torch.randn(2, 7, 16, dtype=F64, requires_grad=True)
    gy = torch.randn(2, 7, 16, dtype=F64)
    y = mem(x)
    y.backward(gy)
    named = {**dict(mem.named_parameters()), "pool.values": mem.pool.values, "x": x}
    got = {k: v.grad.clone() for k, v in named.items()}
    for v in named.values():
        v.grad = None
    y_ref = reference_memory_forward(mem, x)
    y_ref.backward(gy)
    torch.testing.assert_close(y, y_ref)
    assert {"query_norm.weight", "query_norm.bias"} <= set(got)
    for name, grad in got.items():
        assert grad.abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(grad, named[name].grad, msg=lambda m, n=name: f"{n}: {m}")


def test_batchnorm_spreads_the_reads_of_collapsed_queries():
    """The point of the feature: queries sharing a large common offset all pick the same slots;
    normalising over the batch makes tokens pick different ones."""
    x = torch.randn(256, 16, dtype=F64, generator=torch.Generator().manual_seed(3))
    plain = ProductKeyMemory(16, MemoryPool(16, 12, dtype=F64), heads=1, k_dim=8, knn=4, dtype=F64)
    normed = ProductKeyMemory(
        16, MemoryPool(16, 12, dtype=F64), heads=1, k_dim=8, knn=4, query_batchnorm=True, dtype=F64
    )
    normed.load_state_dict(
        {**plain.state_dict(), **{f"query_norm.{k}": v for k, v in normed.query_norm.state_dict().items()}}
    )
    with torch.no_grad():
        for m in (plain, normed):
            m.query.bias.fill_(5.0)
    distinct = {name: m.select(x)[0].unique().numel() for name, m in (("plain", plain), ("normed", normed))}
    assert distinct["normed"] > 3 * distinct["plain"], distinct


def test_activation_checkpointing_updates_running_estimates_once():
    a, b = _layer(), _layer()
    x = torch.randn(9, 16, dtype=F64)
    a(x).sum().backward()
    checkpoint(b, x, use_reentrant=False).sum().backward()
    torch.testing.assert_close(b.query_norm.running_mean, a.query_norm.running_mean, rtol=0, atol=0)
    torch.testing.assert_close(b.query_norm.running_var, a.query_norm.running_var, rtol=0, atol=0)
    torch.testing.assert_close(b.query.weight.grad, a.query.weight.grad)


def test_state_dict_init_spec_and_meta_reset():
    mem = _layer()
    sd = mem.state_dict()
    assert {
        "query_norm.weight",
        "query_norm.bias",
        "query_norm.running_mean",
        "query_norm.running_var",
    } <= set(sd)
    assert mem.init_spec()["query_norm.weight"] == ("constant", 1.0)
    with torch.device("meta"):
        meta = ProductKeyMemory(16, MemoryPool(8, 12), heads=2, k_dim=8, knn=4, query_batchnorm=True)
    meta.to_empty(device="cpu")
    meta.reset_parameters()
    assert torch.equal(meta.query_norm.running_var, torch.ones(16)) and torch.equal(
        meta.query_norm.bias, torch.zeros(16)
    )
    assert "query_batchnorm=True" in repr(meta)


def test_compiles_without_graph_break_and_matches_eager():
    eager, layer = _layer(), _layer()
    x = torch.randn(3, 5, 16, dtype=F64, generator=torch.Generator().manual_seed(1))
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0
    layer = _layer()
    torch._dynamo.reset()
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    y_c, y_e = compiled(x), eager(x)
    torch.testing.assert_close(y_c, y_e)
    y_c.square().sum().backward()
    y_e.square().sum().backward()
    torch.testing.assert_close(layer.query.weight.grad, eager.query.weight.grad)
    torch.testing.assert_close(layer.query_norm.running_var, eager.query_norm.running_var)


@pytest.mark.parametrize("world", [2, 4])
def test_synchronised_across_ranks_equals_one_process(world):
    run_module("tests.memlayers.query_batchnorm_worker", nproc=world)
