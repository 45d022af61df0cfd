"""ProductKeyMemory vs the brute-force reference, plus sharing, init and module plumbing."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from memlayers import MemoryPool, ProductKeyMemory
from memlayers.reference import reference_memory_forward, reference_select

F64 = torch.float64


def _layer(n_keys=8, v_dim=12, dim=16, heads=2, k_dim=8, knn=4, dtype=F64, seed=0, **kw):
    torch.manual_seed(seed)
    pool = MemoryPool(n_keys, v_dim, dtype=dtype)
    return ProductKeyMemory(dim, pool, heads=heads, k_dim=k_dim, knn=knn, dtype=dtype, **kw)


class TinyModel(nn.Module):
    """The intended ownership: the model registers the pool once; layers only reference it."""

    def __init__(self, n_layers=3, dim=16, n_keys=8, v_dim=12, **kw):
        super().__init__()
        self.memory_pool = MemoryPool(n_keys, v_dim)
        self.layers = nn.ModuleList(
            ProductKeyMemory(dim, self.memory_pool, heads=2, k_dim=8, knn=4, **kw) for _ in range(n_layers)
        )

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x

    def init_weights(self):
        self.memory_pool.reset_parameters()
        for layer in self.layers:
            layer.reset_parameters()


def _grads(mem: ProductKeyMemory, x: torch.Tensor) -> dict[str, torch.Tensor]:
    named = dict(mem.named_parameters())
    named["pool.values"] = mem.pool.values
    named["x"] = x
    return {k: v.grad.clone() for k, v in named.items()}


def _zero(mem: ProductKeyMemory, x: torch.Tensor) -> None:
    for p in [*mem.parameters(), mem.pool.values, x]:
        p.grad = None


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("n_keys", [8, 16])
def test_forward_backward_match_reference(gated, qk_norm, n_keys):
    mem = _layer(n_keys=n_keys, gated=gated, qk_norm=qk_norm, seed=n_keys)
    x = torch.randn(2, 3, 16, dtype=F64, requires_grad=True)
    grad_y = torch.randn(2, 3, 16, dtype=F64)

    y = mem(x)
    y.backward(grad_y)
    got = _grads(mem, x)
    _zero(mem, x)
    y_ref = reference_memory_forward(mem, x)
    y_ref.backward(grad_y)
    ref = _grads(mem, x)

    torch.testing.assert_close(y, y_ref)
    expected = {"query.weight", "query.bias", "keys", "out.weight", "out.bias", "pool.values", "x"}
    if gated:
        expected |= {"gate.weight", "gate.bias"}
    assert set(got) == expected
    for name in expected:
        assert got[name].abs().sum() > 0, f"no gradient reached {name}"
        torch.testing.assert_close(got[name], ref[name], msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("knn", [1, 3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_product_key_topk_equals_bruteforce_topk(knn, seed):
    # The theorem: top-K over the K x K half candidates == top-K over the full N x N sum matrix.
    mem = _layer(n_keys=8, knn=knn, seed=seed, qk_norm=bool(seed % 2))
    x = torch.randn(40, 16, dtype=F64)
    slots, weights = mem.select(x)
    ref_slots, ref_weights = reference_select(mem, x)
    assert slots.shape == (40, mem.heads * knn) and slots.dtype == torch.int64
    torch.testing.assert_close(slots, ref_slots)  # both sorted by descending score per head
    torch.testing.assert_close(weights, ref_weights)
    per_head = weights.view(40, mem.heads, knn).sum(-1)
    torch.testing.assert_close(per_head, torch.ones_like(per_head))


@pytest.mark.parametrize("shape", [(16,), (5, 16), (2, 3, 4, 16)])
def test_any_leading_dims(shape):
    mem = _layer()
    x = torch.randn(*shape, dtype=F64)
    y = mem(x)
    assert y.shape == x.shape
    torch.testing.assert_close(y.reshape(-1, 16), mem(x.reshape(-1, 16)))


def test_parameter_shapes_and_init():
    mem = _layer(n_keys=32, v_dim=64, dim=24, heads=3, k_dim=10, knn=5, dtype=torch.float32)
    assert mem.query.weight.shape == (3 * 10, 24)
    assert mem.keys.shape == (3, 2, 32, 5)
    assert mem.gate.weight.shape == (64, 24) and mem.out.weight.shape == (24, 64)
    assert mem.pool.values.shape == (32 * 32, 64)
    bound = 1 / math.sqrt(10)
    assert mem.keys.abs().max() <= bound and mem.keys.abs().max() > 0.9 * bound
    assert abs(mem.pool.values.std().item() - 64**-0.5) < 0.01
    assert abs(mem.query.weight.std().item() - 24**-0.5) < 0.05
    for lin in (mem.query, mem.gate, mem.out):
        assert torch.count_nonzero(lin.bias) == 0
    assert _layer(gated=False).gate is None


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"k_dim": 7}, "k_dim must be a positive even"),
        ({"knn": 9}, "knn=9 exceeds pool.n_keys=8"),
        ({"knn": 0}, "knn must be >= 1"),
        ({"heads": 0}, "heads must be >= 1"),
        ({"dim": 0}, "dim must be a positive"),
    ],
)
def test_bad_config_raises(kwargs, match):
    with pytest.raises(ValueError, match=match):
        _layer(**kwargs)


def test_bad_pool_and_input_raise():
    with pytest.raises(TypeError, match="pool must be a MemoryPool"):
        ProductKeyMemory(16, nn.Linear(2, 2))
    with pytest.raises(ValueError, match="n_keys must be a positive"):
        MemoryPool(0, 8)
    with pytest.raises(ValueError, match="v_dim must be a positive"):
        MemoryPool(4, -1)
    with pytest.raises(ValueError, match="last dim must be dim=16"):
        _layer()(torch.randn(3, 15, dtype=F64))


def test_shared_pool_gradients_sum():
    torch.manual_seed(0)
    pool = MemoryPool(8, 12, dtype=F64)
    a = ProductKeyMemory(16, pool, heads=2, k_dim=8, knn=4, dtype=F64)
    b = ProductKeyMemory(16, pool, heads=2, k_dim=8, knn=4, dtype=F64)
    assert a.pool is b.pool and a.pool.values is b.pool.values
    x = torch.randn(6, 16, dtype=F64)
    singles = []
    for layer in (a, b):
        pool.values.grad = None
        layer(x).square().sum().backward()
        singles.append(pool.values.grad.clone())
    pool.values.grad = None
    (a(x).square().sum() + b(x).square().sum()).backward()
    assert singles[0].abs().sum() > 0 and singles[1].abs().sum() > 0
    torch.testing.assert_close(pool.values.grad, singles[0] + singles[1])


def test_params_counted_once_and_single_state_dict_key():
    model = TinyModel(n_layers=3)
    per_layer = sum(p.numel() for p in model.layers[0].parameters())
    values = model.memory_pool.values.numel()
    assert sum(p.numel() for p in model.parameters()) == values + 3 * per_layer
    value_keys = [k for k in model.state_dict() if k.endswith("values")]
    assert value_keys == ["memory_pool.values"]
    assert "usage_counts" not in str(list(model.state_dict()))
    # A layer alone does not own the values unless asked to.
    assert all(p is not model.memory_pool.values for p in model.layers[0].parameters())


def test_state_dict_round_trip():
    torch.manual_seed(0)
    src = TinyModel()
    torch.manual_seed(1)
    dst = TinyModel()
    x = torch.randn(4, 16)
    assert not torch.allclose(src(x), dst(x))
    dst.load_state_dict(src.state_dict())
    torch.testing.assert_close(dst(x), src(x))
    assert all(layer.pool is dst.memory_pool for layer in dst.layers)


def test_standalone_layer_can_own_its_pool():
    torch.manual_seed(0)
    mem = ProductKeyMemory(16, MemoryPool(8, 12), heads=2, k_dim=8, knn=4, own_pool=True)
    assert "pool.values" in mem.state_dict()
    assert any(p is mem.pool.values for p in mem.parameters())
    before = mem.pool.values.detach().clone()
    mem.reset_parameters()
    assert not torch.equal(before, mem.pool.values)


def test_two_models_in_one_process_are_independent():
    torch.manual_seed(0)
    m1, m2 = TinyModel(), TinyModel()
    assert m1.memory_pool is not m2.memory_pool
    assert all(layer.pool is m1.memory_pool for layer in m1.layers)
    assert all(layer.pool is m2.memory_pool for layer in m2.layers)
    m2_before = copy.deepcopy(m2.state_dict())
    opt = torch.optim.SGD(m1.parameters(), lr=0.1)
    m1(torch.randn(4, 16)).square().sum().backward()
    opt.step()
    for k, v in m2.state_dict().items():
        assert torch.equal(v, m2_before[k]), k
    assert all(p.grad is None for p in m2.parameters())
    # A deep copy gets its own pool and its layers follow it.
    m3 = copy.deepcopy(m1)
    assert m3.memory_pool is not m1.memory_pool
    assert all(layer.pool is m3.memory_pool for layer in m3.layers)


def test_meta_device_build_then_init():
    with torch.device("meta"):
        model = TinyModel()
    assert model.memory_pool.values.is_meta and model.layers[0].keys.is_meta
    model.to_empty(device="cpu")
    model.init_weights()
    for layer in model.layers:
        assert layer.pool.values is model.memory_pool.values and layer.pool.values.device.type == "cpu"
        assert torch.count_nonzero(layer.out.bias) == 0
        assert layer.keys.abs().max() <= 1 / math.sqrt(8)
    assert abs(model.memory_pool.values.std().item() - 12**-0.5) < 0.03
    y = model(torch.randn(3, 16))
    assert torch.isfinite(y).all()


def test_dtype_moves_reach_the_shared_values():
    model = TinyModel().double()
    assert all(layer.pool.values.dtype == F64 for layer in model.layers)
    assert model(torch.randn(2, 16, dtype=F64)).dtype == F64


def test_forward_reads_through_pool_read_once():
    mem = _layer(heads=3, knn=2)
    calls = []
    original = mem.pool.read

    def spy(indices, weights):
        calls.append((indices.shape, weights.shape, weights.dtype))
        return original(indices, weights)

    mem.pool.read = spy  # the seam the sharded pool replaces
    mem(torch.randn(2, 5, 16, dtype=F64))
    assert calls == [((10, 6), (10, 6), F64)]


def test_bf16_autocast_scores_in_fp32():
    mem = _layer(dtype=torch.float32)
    x = torch.randn(7, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, weights = mem.select(x)
        y = mem(x)
    assert weights.dtype == torch.float32
    assert y.dtype == torch.bfloat16 and y.shape == x.shape and torch.isfinite(y.float()).all()
    mem_bf16 = _layer(dtype=torch.bfloat16)
    slots, weights = mem_bf16.select(x.bfloat16())
    assert weights.dtype == torch.float32
    assert mem_bf16(x.bfloat16()).dtype == torch.bfloat16


def test_sparse_value_gradients():
    torch.manual_seed(0)
    pool = MemoryPool(8, 12, sparse_grad=True, dtype=F64)
    mem = ProductKeyMemory(16, pool, heads=2, k_dim=8, knn=4, dtype=F64)
    x = torch.randn(5, 16, dtype=F64)
    mem(x).sum().backward()
    assert pool.values.grad.is_sparse
    sparse = pool.values.grad.to_dense()
    pool.values.grad = None
    pool.sparse_grad = False
    mem(x).sum().backward()
    torch.testing.assert_close(sparse, pool.values.grad)


def test_dynamo_traces_full_graph():
    # The trainer may torch.compile blocks; the pool reference and usage counting must not graph-break.
    mem = _layer(dtype=torch.float32)
    mem.pool.track_usage = True
    x = torch.randn(3, 5, 16)
    compiled = torch.compile(mem, backend="eager", fullgraph=True)
    torch.testing.assert_close(compiled(x), mem(x))
    assert mem.pool.usage_stats()["mem_reads"] == 2 * 15 * 2 * 4


@pytest.mark.parametrize("n, k", [(64, 8), (37, 37), (50, 1), (128, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.requires_native
def test_product_topk_kernel_equals_two_torch_topks(n, k, dtype, monkeypatch):
    """The C++ product-key search returns torch.topk's ids in torch.topk's (descending) order: each
    half's top-k, then the k best sums of the two lists without forming the k*k candidates."""
    from memlayers import key_search

    scores = torch.randn(5, 3, 2, n, dtype=dtype, generator=torch.Generator().manual_seed(n + k))
    top_i, best_pos = key_search.product_topk_op(scores, k)
    monkeypatch.setattr(key_search, "native_ops", lambda: None)  # the op's torch fallback
    ref_i, ref_pos = key_search.product_topk_op(scores, k)
    assert torch.equal(top_i, ref_i) and torch.equal(best_pos, ref_pos)
    # and against brute force over the full n x n sums
    top_s = scores.gather(-1, top_i)
    best = top_s[..., 0, :].gather(-1, best_pos // k) + top_s[..., 1, :].gather(-1, best_pos % k)
    full = (scores[..., 0, :, None] + scores[..., 1, None, :]).flatten(-2)
    torch.testing.assert_close(best, full.topk(k, dim=-1).values, rtol=0, atol=0)


@pytest.mark.requires_native
def test_product_topk_ties_go_to_the_lower_index():
    from memlayers import key_search

    scores = torch.zeros(1, 2, 6)
    scores[0, 0, 4] = scores[0, 0, 1] = 1.0
    top_i, best_pos = key_search.product_topk_op(scores, 3)
    assert top_i[0, 0].tolist() == [1, 4, 0] and top_i[0, 1].tolist() == [0, 1, 2]
    assert best_pos[0].tolist() == [0, 1, 2]  # sums 1, 1, 1 (first list's best with each of the second's)


@pytest.mark.parametrize("kind", ["random", "ties", "neg_inf", "nan"])
@pytest.mark.parametrize("n, k", [(1024, 32), (128, 8), (23, 5), (64, 16)])
@pytest.mark.requires_native
def test_product_topk_half_lists_equal_a_stable_sort(kind, n, k):
    """Each half's top-k ids equal a stable descending sort's first k (ties to the lower index, NaN
    first), on rows that take the kernel's pre-threshold (n >= 4k) and rows that do not: many ties
    (rounded scores), rows half -inf (a chunk maximum of -inf), and NaN scores (the fallback path)."""
    from memlayers import key_search

    scores = torch.randn(257, 2, n, generator=torch.Generator().manual_seed(n + k))
    if kind == "ties":
        scores = (scores * 2).round()
    elif kind == "neg_inf":
        scores[::3, :, : n // 2] = float("-inf")
    elif kind == "nan":
        scores[::7, 0, 3] = float("nan")
    top_i, _ = key_search.product_topk_op(scores, k)
    ref = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    if kind == "nan":
        assert bool((top_i[::7, 0, 0] == 3).all())  # NaN ranks first, as in torch.topk
        clean = torch.ones(257, dtype=torch.bool)
        clean[::7] = False
        top_i, ref = top_i[clean], ref[clean]
    assert torch.equal(top_i, ref)


@pytest.mark.requires_native
def test_memory_layer_with_the_cpp_search_equals_the_torch_search(monkeypatch):
    """Forward (bit for bit) and every parameter gradient (to float rounding: the scores' gradient is
    accumulated in another order) of a memory layer are the same with either search."""
    from memlayers import key_search

    def run():
        torch.manual_seed(0)
        pool = MemoryPool(n_keys=12, v_dim=20, lookup_impl="cpu")
        layer = ProductKeyMemory(dim=16, pool=pool, heads=2, k_dim=8, knn=5)
        x = torch.randn(7, 16, generator=torch.Generator().manual_seed(1))
        y = layer(x)
        y.square().sum().backward()
        return y.detach(), {
            n: p.grad.to_dense() if p.grad.is_sparse else p.grad for n, p in layer.named_parameters()
        }

    y_cpp, g_cpp = run()
    monkeypatch.setattr(key_search, "native_ops", lambda: None)
    y_ref, g_ref = run()
    assert torch.equal(y_cpp, y_ref)
    for name in g_ref:
        torch.testing.assert_close(g_cpp[name], g_ref[name], rtol=1e-6, atol=1e-7, msg=name)
