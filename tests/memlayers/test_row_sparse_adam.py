"""RowSparseAdam against a loop implementation of the documented lazy-Adam math."""

from __future__ import annotations

import io
import math

import pytest
import torch

from memlayers import row_sparse_adam as rsa_module
from memlayers.lookup_cpu import lookup_cpu, native_available
from memlayers.row_sparse_adam import RowSparseAdam

PATHS = [
    pytest.param(
        "cpp", marks=pytest.mark.skipif(not native_available(), reason="C++ extension did not build")
    ),
    "torch",
]


@pytest.fixture
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(rsa_module, "native_ops", lambda: None)
    return request.param


class LoopLazyAdam:
    """fp64 reference: per touched row, AdamW with the global step count; others untouched."""

    def __init__(self, param, lr, betas, eps, weight_decay):
        self.p = param.double().clone()
        self.m = torch.zeros_like(self.p)
        self.v = torch.zeros_like(self.p)
        self.lr, self.betas, self.eps, self.wd, self.t = lr, betas, eps, weight_decay, 0

    def step(self, dense_grad: torch.Tensor, touched: set[int]):
        self.t += 1
        b1, b2 = self.betas
        for r in sorted(touched):
            g = dense_grad[r].double()
            self.p[r] *= 1 - self.lr * self.wd
            self.m[r] = b1 * self.m[r] + (1 - b1) * g
            self.v[r] = b2 * self.v[r] + (1 - b2) * g * g
            denom = self.v[r].sqrt() / math.sqrt(1 - b2**self.t) + self.eps
            self.p[r] -= self.lr / (1 - b1**self.t) * self.m[r] / denom


def sparse_rows_grad(n_rows, dim, rows, seed):
    """A row-sparse gradient with possibly repeated (uncoalesced) rows, plus its dense sum."""
    gen = torch.Generator().manual_seed(seed)
    idx = torch.tensor(rows)
    vals = torch.randn(len(rows), dim, generator=gen)
    grad = torch.sparse_coo_tensor(idx[None], vals, (n_rows, dim), check_invariants=True)
    return grad, grad.to_dense()


TOUCHED_PER_STEP = [[0, 3, 3, 7], [1, 3], [9, 0, 5, 2, 2], [7]]  # repeats, overlaps, first touch late


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_loop_reference_over_steps(path, weight_decay):
    n_rows, dim = 12, 37
    param = torch.nn.Parameter(torch.randn(n_rows, dim, generator=torch.Generator().manual_seed(0)))
    kw = dict(lr=1e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    opt = RowSparseAdam([param], **kw)
    ref = LoopLazyAdam(param.detach(), **kw)
    for step, rows in enumerate(TOUCHED_PER_STEP):
        grad, dense = sparse_rows_grad(n_rows, dim, rows, seed=step + 1)
        param.grad = grad
        before_untouched = param.detach().clone()
        opt.step()
        ref.step(dense, set(rows))
        untouched = [r for r in range(n_rows) if r not in rows]
        assert torch.equal(param.detach()[untouched], before_untouched[untouched])
    state = opt.state[param]
    assert state["step"].item() == len(TOUCHED_PER_STEP)
    torch.testing.assert_close(param.detach().double(), ref.p, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg"].double(), ref.m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(state["exp_avg_sq"].double(), ref.v, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_all_rows_touched_equals_torch_adamw(path):
    gen = torch.Generator().manual_seed(1)
    p1 = torch.nn.Parameter(torch.randn(6, 9, generator=gen))
    p2 = torch.nn.Parameter(p1.detach().clone())
    kw = dict(lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.05)
    ours, ref = RowSparseAdam([p1], **kw), torch.optim.AdamW([p2], **kw)
    for _ in range(3):
        g = torch.randn(6, 9, generator=gen)
        p1.grad = g.to_sparse(sparse_dim=1)
        p2.grad = g.clone()
        ours.step()
        ref.step()
    torch.testing.assert_close(p1.detach(), p2.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_dense_grad_treats_zero_rows_as_untouched(path):
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(8, 5, generator=gen)
    p_sparse, p_dense = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_s, opt_d = RowSparseAdam([p_sparse], lr=0.1), RowSparseAdam([p_dense], lr=0.1)
    for step, rows in enumerate([[1, 4], [4, 6]]):
        grad, dense = sparse_rows_grad(8, 5, rows, seed=10 + step)
        p_sparse.grad, p_dense.grad = grad, dense
        opt_s.step()
        opt_d.step()
    torch.testing.assert_close(p_dense.detach(), p_sparse.detach())
    assert torch.equal(p_dense.detach()[[0, 2, 3, 5, 7]], init[[0, 2, 3, 5, 7]])


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_accumulated_lookup_grads_step_like_their_sum(path):
    """Two micro-batches through lookup_cpu leave an uncoalesced .grad; the step must see the sum."""
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(40, 16, generator=gen)
    batches = [
        (torch.randint(0, 40, (6, 5), generator=gen), torch.randn(6, 5, generator=gen)) for _ in range(2)
    ]
    p_acc = torch.nn.Parameter(init.clone())
    for idx, w in batches:
        lookup_cpu(p_acc, idx, w, sparse_grad=True).sum().backward()
    assert p_acc.grad.is_sparse
    p_sum = torch.nn.Parameter(init.clone())
    p_sum.grad = p_acc.grad.detach().coalesce()  # the reference: the same sum, coalesced by torch
    opt_acc, opt_sum = RowSparseAdam([p_acc], lr=0.05), RowSparseAdam([p_sum], lr=0.05)
    opt_acc.step()
    opt_sum.step()
    torch.testing.assert_close(p_acc.detach(), p_sum.detach())
    assert not torch.equal(p_acc.detach(), init)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_state_dict_round_trip(path):
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(10, 7, generator=gen)
    grads = [
        sparse_rows_grad(10, 7, rows, seed=20 + i)[0] for i, rows in enumerate([[0, 2], [2, 5], [9], [0, 5]])
    ]
    p_a = torch.nn.Parameter(init.clone())
    opt_a = RowSparseAdam([p_a], lr=0.02, weight_decay=0.01)
    for g in grads[:2]:
        p_a.grad = g
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"param": p_a.detach(), "opt": opt_a.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    p_b = torch.nn.Parameter(ckpt["param"].clone())
    opt_b = RowSparseAdam([p_b], lr=0.5)  # hyper-parameters come back from the checkpoint
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.param_groups[0]["lr"] == 0.02
    for g in grads[2:]:
        p_a.grad, p_b.grad = g, g.clone()
        opt_a.step()
        opt_b.step()
    assert torch.equal(p_a.detach(), p_b.detach())
    assert torch.equal(opt_a.state[p_a]["exp_avg_sq"], opt_b.state[p_b]["exp_avg_sq"])
    assert opt_b.state[p_b]["step"].item() == 4


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_weight_decay_is_decoupled_and_touched_rows_only(path):
    init = torch.ones(4, 3)
    p = torch.nn.Parameter(init.clone())
    opt = RowSparseAdam([p], lr=0.1, weight_decay=0.5)
    # A zero gradient on a touched row isolates the decay: m = v = 0, so p *= 1 - lr*wd.
    p.grad = torch.sparse_coo_tensor(torch.tensor([[2]]), torch.zeros(1, 3), (4, 3), check_invariants=True)
    opt.step()
    expected = init.clone()
    expected[2] *= 1 - 0.1 * 0.5
    torch.testing.assert_close(p.detach(), expected)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_bf16_param_tracks_fp32(path):
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(16, 32, generator=gen)
    p32, p16 = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.bfloat16())
    o32, o16 = RowSparseAdam([p32], lr=1e-2), RowSparseAdam([p16], lr=1e-2)
    for step in range(3):
        grad, _ = sparse_rows_grad(16, 32, [1, 5, 5, 11], seed=30 + step)
        p32.grad, p16.grad = grad, grad.bfloat16()
        o32.step()
        o16.step()
    assert o16.state[p16]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(p16.detach().float(), p32.detach(), rtol=2e-2, atol=2e-2)


def test_bad_arguments_raise():
    p = torch.nn.Parameter(torch.zeros(3, 2))
    with pytest.raises(ValueError, match="lr"):
        RowSparseAdam([p], lr=-1.0)
    with pytest.raises(ValueError, match="betas"):
        RowSparseAdam([p], betas=(1.0, 0.9))
    opt = RowSparseAdam([p])
    p.grad = torch.zeros(3, 2).to_sparse()  # sparse in both dims: not row-sparse
    with pytest.raises(ValueError, match="sparse_dim"):
        opt.step()
