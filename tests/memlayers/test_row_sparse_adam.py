"""RowSparseAdam against torch.optim.AdamW (foreach=False) on the same gradients: equal to float tolerance."""

from __future__ import annotations

import io

import pytest
import torch

import memlayers.optim
from memlayers.lookup import lookup
from memlayers.optim import RowSparseAdam, flush_on_state_dict, replay_horizon
from memlayers.optim import row_sparse_adam as rsa_module

PATHS = [
    pytest.param("cpp", marks=pytest.mark.requires_native),
    "torch",
]
# (0.9, 0.95): every skipped step replayed (horizon ~300 > the gaps here);
# (0.5, 0.9): horizon ~30, so the long gaps below go through the closed-form tail.
BETAS = [(0.9, 0.95), (0.5, 0.9)]


@pytest.fixture
def path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(rsa_module, "native_ops", lambda: None)
    return request.param


def lr_at(step: int) -> float:
    """A schedule that changes every step: warmup then cosine-like decay."""
    return 1e-2 * min(1.0, step / 5) * (0.5 + 0.5 * torch.cos(torch.tensor(step / 15.0)).item())


def touched_rows(step: int, n_rows: int, gen: torch.Generator) -> list[int]:
    """Random subsets; rows 0-2 are touched only at steps 1 and 70 (gaps longer than any horizon);
    row 3 never; repeats within a step."""
    rows = torch.randint(4, n_rows, (6,), generator=gen).tolist()
    if step in (1, 70):
        rows += [0, 1, 2, 1]
    return rows


def sparse_grad(n_rows: int, dim: int, rows: list[int], gen: torch.Generator) -> torch.Tensor:
    idx = torch.tensor(rows)
    return torch.sparse_coo_tensor(idx[None], torch.randn(len(rows), dim, generator=gen), (n_rows, dim))


def step_each(*triples):
    """Give each (optimizer, param, grad) its gradient and step it."""
    for opt, p, g in triples:
        p.grad = g
        opt.step()


def assert_matches_adamw(ours, p, ref, p_ref, rtol=2e-6, atol=1e-7):
    ours.flush()
    st, st_ref = ours.state[p], ref.state[p_ref]
    torch.testing.assert_close(p.detach(), p_ref.detach(), rtol=rtol, atol=atol)
    torch.testing.assert_close(st["exp_avg"], st_ref["exp_avg"], rtol=rtol, atol=atol)
    torch.testing.assert_close(st["exp_avg_sq"], st_ref["exp_avg_sq"], rtol=rtol, atol=atol * 1e-2)
    assert st["step"].item() == st_ref["step"].item()


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("betas", BETAS)
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_equals_dense_adamw_with_random_rows_and_schedule(path, betas, weight_decay):
    n_rows, dim, steps = 24, 37, 80
    gen = torch.Generator().manual_seed(0)
    init = torch.randn(n_rows, dim, generator=gen)
    p, p_ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    kw = dict(lr=1e-2, betas=betas, eps=1e-8, weight_decay=weight_decay)
    ours, ref = RowSparseAdam([p], **kw), torch.optim.AdamW([p_ref], foreach=False, **kw)
    for step in range(1, steps + 1):
        for opt in (ours, ref):
            opt.param_groups[0]["lr"] = lr_at(step)
        rows = touched_rows(step, n_rows, gen)
        grad = sparse_grad(n_rows, dim, rows, gen)
        # What the forward would read: caught-up rows equal dense AdamW's rows right now.
        ours.catch_up_rows(p, torch.tensor(rows))
        torch.testing.assert_close(p.detach()[rows], p_ref.detach()[rows], rtol=2e-6, atol=1e-7)
        p.grad, p_ref.grad = grad, grad.to_dense()
        ours.step()
        ref.step()
        if step == 40:
            assert_matches_adamw(ours, p, ref, p_ref)
    assert replay_horizon(*betas) < 70 or betas == (0.9, 0.95)
    assert_matches_adamw(ours, p, ref, p_ref)
    assert not torch.equal(p.detach()[3], init[3]) or weight_decay == 0.0  # decay reached a never-read row


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_training_through_lookup_equals_dense_adamw(path):
    """Reads catch rows up before the gather, so losses and grads follow dense AdamW's trajectory."""
    n_rows, dim = 64, 16
    gen = torch.Generator().manual_seed(1)
    init = torch.randn(n_rows, dim, generator=gen)
    v, v_ref = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    kw = dict(lr=3e-2, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.05)
    ours, ref = RowSparseAdam([v], **kw), torch.optim.AdamW([v_ref], foreach=False, **kw)
    impl = "cpu" if path == "cpp" else "torch"
    for _step in range(1, 31):
        # Skewed reads: a few rows every step, most rarely.
        idx = (torch.rand(8, 4, generator=gen) ** 3 * n_rows).long()
        w = torch.rand(8, 4, generator=gen)
        target = torch.randn(8, dim, generator=gen)
        loss = (lookup(v, idx, w, sparse=True, impl=impl) - target).pow(2).sum()
        loss_ref = (lookup(v_ref, idx, w, impl="torch") - target).pow(2).sum()
        torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-5)
        loss.backward()
        loss_ref.backward()
        ours.step()
        ref.step()
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
    assert_matches_adamw(ours, v, ref, v_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_state_dict_round_trip_mid_run_continues_identically(path):
    n_rows, dim = 20, 9
    gen = torch.Generator().manual_seed(4)
    init = torch.randn(n_rows, dim, generator=gen)
    grads = [sparse_grad(n_rows, dim, touched_rows(s, n_rows, gen), gen) for s in range(1, 13)]
    p_a = torch.nn.Parameter(init.clone())
    opt_a = RowSparseAdam([p_a], lr=0.02, betas=(0.9, 0.95), weight_decay=0.01)
    for s, g in enumerate(grads[:6], 1):
        opt_a.param_groups[0]["lr"] = lr_at(s)
        p_a.grad = g
        opt_a.step()
    buf = io.BytesIO()
    torch.save({"param": p_a.detach(), "opt": opt_a.state_dict()}, buf)  # lazy rows: no flush
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    p_b = torch.nn.Parameter(ckpt["param"].clone())
    opt_b = RowSparseAdam([p_b], lr=0.5)  # hyper-parameters come back from the checkpoint
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.param_groups[0]["betas"] == (0.9, 0.95)
    assert opt_b.state[p_b]["lr_history"].dtype == torch.float64
    for s, g in enumerate(grads[6:], 7):
        for opt in (opt_a, opt_b):
            opt.param_groups[0]["lr"] = lr_at(s)
        step_each((opt_a, p_a, g), (opt_b, p_b, g.clone()))
    opt_a.flush()
    opt_b.flush()
    assert torch.equal(p_a.detach(), p_b.detach())
    for key in ("exp_avg", "exp_avg_sq", "row_step", "lr_history"):
        assert torch.equal(opt_a.state[p_a][key], opt_b.state[p_b][key])
    assert opt_b.state[p_b]["step"].item() == 12


def test_module_state_dict_flushes_first():
    pool = torch.nn.Module()
    pool.values = torch.nn.Parameter(torch.randn(10, 4))
    opt = RowSparseAdam([pool.values], lr=0.1, betas=(0.9, 0.95))
    flush_on_state_dict(pool, opt)
    ref_p = torch.nn.Parameter(pool.values.detach().clone())
    ref = torch.optim.AdamW([ref_p], lr=0.1, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    for rows in ([1, 2], [5], [7, 8]):
        g = sparse_grad(10, 4, rows, torch.Generator().manual_seed(rows[0]))
        pool.values.grad, ref_p.grad = g, g.to_dense()
        opt.step()
        ref.step()
    assert not torch.allclose(pool.values.detach()[1], ref_p.detach()[1])  # lazy in memory
    state = pool.state_dict()
    torch.testing.assert_close(state["values"], ref_p.detach(), rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_dense_grad_zero_rows_equal_sparse(path):
    gen = torch.Generator().manual_seed(2)
    init = torch.randn(8, 5, generator=gen)
    p_sparse, p_dense = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt_s, opt_d = RowSparseAdam([p_sparse], lr=0.1), RowSparseAdam([p_dense], lr=0.1)
    for rows in ([1, 4], [4, 6]):
        grad = sparse_grad(8, 5, rows, gen)
        step_each((opt_s, p_sparse, grad), (opt_d, p_dense, grad.to_dense()))
    opt_s.flush()
    opt_d.flush()
    assert torch.equal(p_dense.detach(), p_sparse.detach())


@pytest.mark.parametrize("path", PATHS, indirect=True)
def test_bf16_param_tracks_fp32(path):
    gen = torch.Generator().manual_seed(5)
    init = torch.randn(16, 32, generator=gen)
    p32, p16 = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.bfloat16())
    o32, o16 = RowSparseAdam([p32], lr=1e-2), RowSparseAdam([p16], lr=1e-2)
    for step in range(3):
        grad = sparse_grad(16, 32, [1, 5, 5, 11 + step], gen)
        p32.grad, p16.grad = grad, grad.bfloat16()
        o32.step()
        o16.step()
    o32.flush()
    o16.flush()
    assert o16.state[p16]["exp_avg"].dtype == torch.bfloat16
    torch.testing.assert_close(p16.detach().float(), p32.detach(), rtol=2e-2, atol=2e-2)


def test_replay_horizon():
    assert replay_horizon(0.9, 0.81) == -1  # beta1**2 >= beta2: no geometric bound, replay all
    h = replay_horizon(0.9, 0.95)
    assert 200 < h < 400
    assert replay_horizon(0.5, 0.9) < 50


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


def _lookup_run(opt_cls, fused: bool, impl: str, steps: int = 12, dtype=torch.float32, **kw):
    """Train a table through the lookup; returns (values, optimizer, losses)."""
    gen = torch.Generator().manual_seed(7)
    v = torch.nn.Parameter(torch.randn(50, 13, generator=gen).to(dtype))
    opt = opt_cls([v], lr=2e-2, betas=(0.9, 0.95), weight_decay=0.01, fused=fused, **kw)
    losses = []
    for step in range(1, steps + 1):
        opt.param_groups[0]["lr"] = lr_at(step)
        idx = (torch.rand(6, 5, generator=gen) ** 2 * 50).long()
        w = torch.rand(6, 5, generator=gen, requires_grad=True)
        target = torch.randn(6, 13, generator=gen)
        loss = (lookup(v, idx, w, sparse=True, impl=impl).float() - target).pow(2).sum()
        loss.backward()
        assert (v.grad is None) == fused and w.grad is not None
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    opt.flush()
    return v, opt, losses


@pytest.mark.requires_native
@pytest.mark.parametrize(
    "dtype,rounding",
    [(torch.float32, "nearest"), (torch.bfloat16, "nearest"), (torch.bfloat16, "stochastic")],
)
def test_fused_backward_update_is_bit_identical_to_unfused(dtype, rounding):
    impl = "cpu"
    v_f, opt_f, loss_f = _lookup_run(RowSparseAdam, True, impl, dtype=dtype, rounding=rounding)
    v_u, opt_u, loss_u = _lookup_run(RowSparseAdam, False, impl, dtype=dtype, rounding=rounding)
    assert loss_f == loss_u
    assert torch.equal(v_f.detach(), v_u.detach())
    for key in ("step", "exp_avg", "exp_avg_sq", "row_step", "lr_history"):
        assert torch.equal(opt_f.state[v_f][key], opt_u.state[v_u][key])
    # Same checkpoint format: the fused run's state loads into an unfused optimizer.
    RowSparseAdam([torch.nn.Parameter(v_f.detach().clone())]).load_state_dict(opt_f.state_dict())


@pytest.fixture
def cpu_lookup_torch_path(monkeypatch):
    """Run lookup_cpu's pure-torch fallback (covers the fused hook without the C++ kernels)."""
    from memlayers import lookup_cpu as lc  # its autograd function asks for the ops

    monkeypatch.setattr(lc, "native_ops", lambda: None)
    monkeypatch.setattr(rsa_module, "native_ops", lambda: None)


def test_fused_update_on_torch_fallback(cpu_lookup_torch_path):
    v_f, opt_f, loss_f = _lookup_run(RowSparseAdam, True, "cpu")
    v_u, opt_u, loss_u = _lookup_run(RowSparseAdam, False, "cpu")
    assert loss_f == loss_u and torch.equal(v_f.detach(), v_u.detach())


class DenseRowwiseAdam:
    """Reference: partial row-wise Adam applied to EVERY row every step (zero grads included)."""

    def __init__(self, p, lr, betas, eps, weight_decay):
        self.p, self.lr, self.betas, self.eps, self.wd, self.t = (
            p.detach().clone(),
            lr,
            betas,
            eps,
            weight_decay,
            0,
        )
        self.m = torch.zeros_like(self.p)
        self.v = torch.zeros(p.shape[0], 1)

    def step(self, g, lr):
        self.t += 1
        b1, b2 = self.betas
        self.p *= 1 - lr * self.wd
        self.m = self.m + (1 - b1) * (g - self.m)
        self.v = self.v * b2 + (1 - b2) * (g * g).mean(1, keepdim=True)
        denom = self.v.sqrt() / (1 - b2**self.t) ** 0.5 + self.eps
        self.p = self.p - lr / (1 - b1**self.t) * self.m / denom


@pytest.fixture(params=[pytest.param("cpp", marks=pytest.mark.requires_native), "torch"])
def row_kernel(request, monkeypatch):
    """Run the optimizer's row kernel in C++ (when it builds) or as vectorised torch ops."""
    if request.param == "torch":
        monkeypatch.setattr(rsa_module, "native_ops", lambda: None)
    return request.param


@pytest.mark.parametrize("betas", BETAS)
def test_rowwise_adam_equals_dense_rowwise_reference(betas, row_kernel):
    from memlayers.optim import RowwiseAdam

    n_rows, dim = 24, 11
    gen = torch.Generator().manual_seed(3)
    init = torch.randn(n_rows, dim, generator=gen)
    p = torch.nn.Parameter(init.clone())
    kw = dict(lr=1e-2, betas=betas, eps=1e-8, weight_decay=0.1)
    ours, ref = RowwiseAdam([p], **kw), DenseRowwiseAdam(p, **kw)
    for step in range(1, 81):
        ours.param_groups[0]["lr"] = lr_at(step)
        grad = sparse_grad(n_rows, dim, touched_rows(step, n_rows, gen), gen)
        p.grad = grad
        ours.step()
        ref.step(grad.to_dense(), lr_at(step))
    ours.flush()
    torch.testing.assert_close(p.detach(), ref.p, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(ours.state[p]["exp_avg"], ref.m, rtol=2e-6, atol=1e-7)
    torch.testing.assert_close(ours.state[p]["exp_avg_sq"], ref.v.squeeze(1), rtol=2e-6, atol=1e-9)
    assert ours.state[p]["exp_avg_sq"].shape == (n_rows,)


def test_rowwise_adam_fused_and_state_round_trip():
    from memlayers.optim import RowwiseAdam

    v_f, opt_f, loss_f = _lookup_run(RowwiseAdam, True, "cpu", dtype=torch.bfloat16)
    v_u, opt_u, loss_u = _lookup_run(RowwiseAdam, False, "cpu", dtype=torch.bfloat16)
    assert loss_f == loss_u and torch.equal(v_f.detach(), v_u.detach())
    opt_b = RowwiseAdam([torch.nn.Parameter(v_f.detach().clone())])
    opt_b.load_state_dict(opt_f.state_dict())
    assert next(iter(opt_b.state.values()))["exp_avg_sq"].dtype == torch.float32


@pytest.mark.requires_native
def test_fused_refuses_two_reads_in_one_step():
    v = torch.nn.Parameter(torch.randn(10, 4))
    opt = RowSparseAdam([v], fused=True)
    idx, w = torch.tensor([[1, 2]]), torch.ones(1, 2)
    lookup(v, idx, w, sparse=True, impl="cpu").sum().backward()
    with pytest.raises(RuntimeError, match="two backward passes"):
        lookup(v, idx, w, sparse=True, impl="cpu").sum().backward()
    opt.step()
    lookup(v, idx, w, sparse=True, impl="cpu").sum().backward()  # next step: fine


@pytest.mark.requires_native
@pytest.mark.parametrize("dtype,seed", [(torch.float32, -1), (torch.bfloat16, -1), (torch.bfloat16, 1234)])
def test_fused_kernel_on_stale_rows_equals_catch_up_then_unfused_step(dtype, seed):
    """The fused backward+update brings rows that were NOT caught up at their read (gaps of several
    steps, some past the replay horizon) up to date itself: state and grad_weights equal catching the
    rows up first, then the unfused sparse backward and step. Width 150 = two full column blocks and a
    tail; repeated slots within and across bags."""
    from memlayers.native import native_ops
    from memlayers.optim.adam_replay import step_table

    ops = native_ops()
    gen = torch.Generator().manual_seed(5)
    n_rows, dim, target = 40, 150, 30
    betas, eps = (0.9, 0.95), 1e-8
    hist = step_table(torch.rand(target + 1, dtype=torch.float64, generator=gen) * 1e-2, *betas, 0.01)
    horizon = 5  # short, so that long gaps also run through the closed-form tail
    state = [torch.randn(n_rows, dim, generator=gen).to(dtype) for _ in range(3)]
    state[2] = state[2].abs()
    row_step = torch.randint(0, target, (n_rows,), generator=gen)
    idx = torch.randint(0, n_rows, (7, 9), generator=gen)
    idx[0, :3] = idx[1, 0]  # repeats
    w = torch.rand(7, 9, generator=gen)
    grad_out = torch.randn(7, dim, generator=gen)

    fused = [t.clone() for t in state] + [row_step.clone()]
    gw_fused = ops.bag_backward_adam_(
        *fused, idx, w, grad_out, True, hist, target, *betas, eps, horizon, seed
    )

    ref = [t.clone() for t in state] + [row_step.clone()]
    rows = torch.unique(idx)
    empty = ref[0].new_empty(0, dim)
    ops.lazy_adam_rows_(*ref, rows, empty, hist, target - 1, *betas, eps, horizon, seed)  # catch up
    rows_u, grad_rows, gw_ref = ops.bag_backward(ref[0], idx, w, grad_out, True, True, False)
    ops.lazy_adam_rows_(*ref, rows_u, grad_rows, hist, target, *betas, eps, horizon, seed)
    assert torch.equal(gw_fused, gw_ref)
    for a, b in zip(fused, ref):
        assert torch.equal(a, b)
    untouched = torch.ones(n_rows, dtype=torch.bool)
    untouched[rows] = False
    assert torch.equal(fused[3][untouched], row_step[untouched])  # rows not read are left alone
    assert bool((fused[3][rows] == target).all())


@pytest.mark.requires_native
def test_bf16_gradient_rows_round_like_torch():
    """The kernels' vectorised fp32 -> bf16 store rounds to nearest even exactly as torch's cast: the
    bf16 table's gradient rows equal the same fp32 sums cast with `.bfloat16()`."""
    from memlayers.native import native_ops

    ops = native_ops()
    gen = torch.Generator().manual_seed(2)
    values = torch.randn(64, 70, generator=gen).bfloat16()
    idx = torch.randint(0, 64, (33, 6), generator=gen)
    w = torch.rand(33, 6, generator=gen)
    grad_out = torch.randn(33, 70, generator=gen) * 1e3
    _, g16, gw16 = ops.bag_backward(values, idx, w, grad_out, True, True, True)
    _, g32, gw32 = ops.bag_backward(values.float(), idx, w, grad_out, True, True, True)
    assert g16.dtype == torch.bfloat16
    assert torch.equal(g16.view(torch.int16), g32.bfloat16().view(torch.int16))
    assert torch.equal(gw16, gw32)


# ---------------------------------------------------------------- stochastic bf16 rounding


def test_stochastic_bf16_rounds_to_a_neighbour_without_bias():
    from memlayers.optim.stochastic_rounding import stochastic_bf16

    one_ulp = 2.0**-7  # bf16 spacing in [1, 2)
    x = torch.full((4000, 8), 1.0 + 0.3 * one_ulp)
    rows = torch.arange(4000)
    out = stochastic_bf16(x, rows, step=5, which=0, seed=9).float()
    assert set(out.unique().tolist()) == {1.0, 1.0 + one_ulp}  # only the two neighbours
    assert abs((out == 1.0 + one_ulp).float().mean().item() - 0.3) < 0.02  # up with probability 0.3
    exact = torch.tensor([[0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), 3.0e38, 1e-40]])
    assert torch.equal(stochastic_bf16(exact, rows[:1], 1, 0, 0).float(), exact.bfloat16().float())
    assert stochastic_bf16(torch.tensor([[float("nan")]]), rows[:1], 1, 0, 0).isnan().all()
    # Deterministic in (value, row, step, tensor, seed); another step dithers differently.
    again = stochastic_bf16(x, rows, 5, 0, 9).float()
    assert torch.equal(out, again) and not torch.equal(out, stochastic_bf16(x, rows, 6, 0, 9).float())


@pytest.mark.requires_native
@pytest.mark.parametrize("kernel", ["lazy_adam_rows_", "lazy_rowwise_adam_rows_"])
@pytest.mark.parametrize("with_grad", [False, True])
def test_cpp_stochastic_rounding_is_the_torch_function(kernel, with_grad):
    """The C++ kernels' bf16 stochastic store equals `stochastic_bf16` (same hash, same dither) of
    the fp32 result the same kernel computes on an fp32 copy of the state; so does the torch fallback's."""
    from memlayers.native import native_ops
    from memlayers.optim.adam_replay import adam_rows_torch, step_table
    from memlayers.optim.stochastic_rounding import stochastic_bf16

    ops = native_ops()
    rowwise = kernel == "lazy_rowwise_adam_rows_"
    gen = torch.Generator().manual_seed(11)
    n_rows, dim, target, seed = 30, 150, 20, 77
    betas, eps, horizon = (0.9, 0.95), 1e-8, 6
    hist = step_table(torch.rand(target + 1, dtype=torch.float64, generator=gen) * 1e-2, *betas, 0.01)
    p, m = (torch.randn(n_rows, dim, generator=gen).bfloat16() for _ in range(2))
    v = torch.rand(n_rows, generator=gen) if rowwise else torch.rand(n_rows, dim, generator=gen).bfloat16()
    rows = torch.arange(0, n_rows, 2)
    upto = target - 1 if with_grad else target
    # rowwise stores a replayed row before its gradient step: give its gradient rows no gap
    row_step = (
        torch.full((n_rows,), upto)
        if (rowwise and with_grad)
        else torch.randint(0, upto + 1, (n_rows,), generator=gen)
    )
    grads = torch.randn(rows.numel(), dim, generator=gen).bfloat16() if with_grad else p.new_empty(0, dim)

    def run(dtype, rounding_seed, torch_path=False):
        st = [
            p.to(dtype).clone(),
            m.to(dtype).clone(),
            v.clone() if rowwise else v.to(dtype).clone(),
            row_step.clone(),
        ]
        g = grads.to(dtype)
        if torch_path:
            adam_rows_torch(st[0], st[1], st[2].view(-1, 1) if rowwise else st[2], st[3], rows, g if with_grad else None,
                        hist, target, *betas, eps, horizon, rowwise=rowwise, rounding_seed=rounding_seed)  # fmt: skip
        else:
            getattr(ops, kernel)(*st, rows, g, hist, target, *betas, eps, horizon, rounding_seed)
        return st

    # (the torch ops round their fp32 arithmetic a little differently from C++: each path against itself)
    for torch_path in (False, True):
        exact, sr = run(torch.float32, -1, torch_path), run(torch.bfloat16, seed, torch_path)
        for which in (0, 1) if rowwise else (0, 1, 2):
            expect = exact[which].bfloat16()
            expect[rows] = stochastic_bf16(exact[which][rows], rows, target, which, seed)
            keep = row_step[rows] == target  # rows already current are left alone
            expect[rows[keep]] = (p, m, v)[which][rows[keep]]
            assert torch.equal(sr[which], expect)
    nearest = run(torch.bfloat16, -1)
    assert not torch.equal(nearest[0], run(torch.bfloat16, seed)[0])


@pytest.mark.parametrize("opt_cls", ["RowSparseAdam", "RowwiseAdam"])
def test_stochastic_rounding_keeps_updates_below_half_a_bf16_step(opt_cls, row_kernel):
    """A bf16 table whose every update is ~0.1 of a bf16 step: round-to-nearest drops each one (the
    table never moves), stochastic rounding keeps them in expectation (it tracks the fp32 run)."""
    cls = getattr(memlayers.optim, opt_cls)
    runs = {}
    for name, dtype, rounding in (("fp32", torch.float32, "nearest"), ("nearest", torch.bfloat16, "nearest"),
                                  ("stochastic", torch.bfloat16, "stochastic")):  # fmt: skip
        # distinct values in [1.25, 1.5) (bf16 spacing 2**-7 there), so elements dither independently
        p = torch.nn.Parameter(
            (1.25 + torch.randint(0, 32, (128, 32), generator=torch.Generator().manual_seed(0)) * 2.0**-7).to(
                dtype
            )
        )
        start = p.detach().float().clone()
        # Adam's step is ~lr when the gradient is steady: lr = 0.1 * bf16 spacing (2**-7).
        opt = cls([p], lr=0.1 * 2.0**-7, betas=(0.9, 0.99), rounding=rounding, rounding_seed=3)
        for _ in range(200):
            p.grad = torch.ones(128, 32, dtype=dtype)
            opt.step()
        opt.flush()
        runs[name] = start - p.detach().float()
    assert runs["fp32"].mean() > 0.1  # ~200 steps of 0.1 ulp = ~0.15
    assert torch.equal(runs["nearest"], torch.zeros_like(runs["nearest"]))  # every update lost
    assert runs["stochastic"].mean().item() == pytest.approx(runs["fp32"].mean().item(), rel=0.02)


def test_rounding_argument_is_checked():
    with pytest.raises(ValueError, match="rounding"):
        RowSparseAdam([torch.nn.Parameter(torch.zeros(3, 2))], rounding="up")


@pytest.mark.requires_native
@pytest.mark.parametrize("with_grad", [False, True])
def test_one_pass_replay_rounds_like_the_block_replay(with_grad):
    """Rows a few steps behind are caught up in one vectorised pass (up to 8 replayed steps), longer gaps
    through the column-block loop. fp32 stores are exact, so catching a row up 12 steps at once (block
    path), in two calls of 6 or in twelve of 1 (one-pass path) must give the same bits; the last call
    optionally takes the gradient step too. Width 150: full vectors and a remainder."""
    from memlayers.native import native_ops
    from memlayers.optim.adam_replay import step_table

    ops = native_ops()
    gen = torch.Generator().manual_seed(21)
    n_rows, dim, target = 12, 150, 14
    betas, eps, horizon = (0.9, 0.95), 1e-8, 300
    hist = step_table(torch.rand(target + 1, dtype=torch.float64, generator=gen) * 1e-2, *betas, 0.01)
    p, m = (torch.randn(n_rows, dim, generator=gen) for _ in range(2))
    v = torch.rand(n_rows, dim, generator=gen)
    rows = torch.arange(n_rows)
    grads = torch.randn(n_rows, dim, generator=gen)
    none = p.new_empty(0, dim)
    end = target - 1 if with_grad else target  # replayed through `end`, then the gradient step

    def run(chunks):
        st = [p.clone(), m.clone(), v.clone(), torch.full((n_rows,), end - 12)]
        for i, upto in enumerate(chunks):
            last = i == len(chunks) - 1
            if last and with_grad:
                ops.lazy_adam_rows_(*st, rows, grads, hist, upto + 1, *betas, eps, horizon)
            else:
                ops.lazy_adam_rows_(*st, rows, none, hist, upto, *betas, eps, horizon)
        return st

    at_once = run([end])
    assert bool((at_once[3] == target).all())
    for chunks in ([end - 6, end], list(range(end - 11, end + 1))):
        for a, b in zip(at_once, run(chunks)):
            assert torch.equal(a, b)


@pytest.mark.requires_native
def test_unique_rows_equals_torch_unique():
    """The catch-up's bitmap unique (memlayers_cpu::unique_rows) gives torch.unique's sorted ids: word
    boundaries, the first and last row, heavy repeats, many threads' bitmaps, empty input; ids out of
    range raise instead of writing outside the bitmap."""
    from memlayers.native import native_ops

    ops = native_ops()
    gen = torch.Generator().manual_seed(3)
    for n_rows, shape in [(1, (3, 2)), (130, (7, 9)), (1000, (4096, 8)), (1 << 20, (512, 128))]:
        idx = torch.randint(0, n_rows, shape, generator=gen)
        idx.view(-1)[: min(4, idx.numel())] = torch.tensor(
            [0, n_rows - 1, min(63, n_rows - 1), min(64, n_rows - 1)]
        )[: min(4, idx.numel())]
        assert torch.equal(ops.unique_rows(idx, n_rows), torch.unique(idx))
    assert ops.unique_rows(torch.empty(0, 5, dtype=torch.int64), 10).numel() == 0
    for bad in (-1, 10):
        with pytest.raises(RuntimeError, match="out of range for a table of 10 rows"):
            ops.unique_rows(torch.tensor([[1, bad, 2]]), 10)


# ---------------------------------------------------------------- deferred fused update (clipping on)


def _pkm_model(n_layers: int, sparse: bool, seed: int = 0) -> torch.nn.Module:
    """`n_layers` product-key memory layers on one shared pool (36 x 12 values), residual stack."""
    from memlayers import MemoryPool, ProductKeyMemory

    torch.manual_seed(seed)
    model = torch.nn.Module()
    model.pool = MemoryPool(n_keys=6, v_dim=12, sparse_grad=sparse, lookup_impl="cpu")
    model.layers = torch.nn.ModuleList(
        ProductKeyMemory(dim=10, pool=model.pool, heads=2, k_dim=8, knn=3) for _ in range(n_layers)
    )
    return model


def _forward_loss(model, x, target):
    y = x
    for layer in model.layers:
        y = y + layer(y)
    return (y - target).pow(2).mean()


def _clip_like_trainer(others, layout, max_norm: float) -> float:
    """launch.distributed.grad_norm.grad_norm_and_clip's arithmetic: float64 norm of every gradient
    (the values' through the layout, deferred ones included), scaled when above max_norm."""
    sq = layout.grad_sq_norm() + sum(p.grad.double().pow(2).sum() for p in others if p.grad is not None)
    total = float(sq.sqrt())
    if total > max_norm:
        scale = max_norm / (total + 1e-6)
        for p in others:
            p.grad.mul_(scale)
        layout.clip_(scale)
    return total


def _train(mode: str, n_layers: int, micro: int, max_norm: float, steps: int = 8, keep_rows: float = 4.0):
    """mode: deferred | unfused (RowSparseAdam for the values, AdamW for the rest, the trainer's clip)
    or dense (torch.optim.AdamW over everything, torch.nn.utils.clip_grad_norm_). keep_rows: the
    deferred update's `rows_at_reads_per_row` (-1: always sum the reads again at the step; 0: always
    keep the summed rows)."""
    from memlayers.shard_layout import MemoryShardLayout

    model = _pkm_model(n_layers, sparse=mode != "dense")
    values = model.pool.values
    others = [p for p in model.parameters() if p is not values]
    betas, lr_v, lr_o = (0.9, 0.95), 2e-2, 1e-2
    if mode == "dense":
        opts = [
            torch.optim.AdamW(
                [{"params": others, "lr": lr_o, "weight_decay": 0.1}, {"params": [values], "lr": lr_v, "weight_decay": 0.01}],
                betas=betas, foreach=False,
            )
        ]  # fmt: skip
    else:
        value_opt = RowSparseAdam(
            [values],
            lr=lr_v,
            betas=betas,
            weight_decay=0.01,
            fused=mode == "deferred",
            deferred=mode == "deferred",
        )
        value_opt.rows_at_reads_per_row = keep_rows
        opts = [torch.optim.AdamW(others, lr=lr_o, betas=betas, weight_decay=0.1, foreach=False), value_opt]
    layout = MemoryShardLayout(model)
    gen = torch.Generator().manual_seed(11)
    losses, norms = [], []
    for step in range(1, steps + 1):
        for opt in opts:
            for g in opt.param_groups:
                g["lr"] = (lr_v if g["params"][0] is values else lr_o) * lr_at(step) / 1e-2
        loss_sum = 0.0
        for _ in range(micro):
            x, target = torch.randn(3, 5, 10, generator=gen), torch.randn(3, 5, 10, generator=gen)
            loss = _forward_loss(model, x, target) / micro
            loss.backward()
            loss_sum += loss.item()
        if mode == "deferred":  # the fused path was taken: no value gradient tensor, one held back
            assert values.grad is None and opts[1].has_deferred_grad(values)
            kinds = {
                len(part) for part in opts[1]._deferred[id(values)].parts
            }  # 3: a lookup's inputs, 2: rows
            assert kinds == {3} if keep_rows < 0 else 2 in kinds
        if mode == "dense":
            norms.append(float(torch.nn.utils.clip_grad_norm_(list(model.parameters()), max_norm)))
        else:
            norms.append(_clip_like_trainer(others, layout, max_norm))
        for opt in opts:
            opt.step()
            opt.zero_grad(set_to_none=True)
        losses.append(loss_sum)
    if mode != "dense":
        opts[1].flush()
    return model, losses, norms, opts


@pytest.mark.requires_native
@pytest.mark.parametrize(
    "n_layers,micro,max_norm",
    [
        (1, 1, 0.05),  # clip coefficient < 1 at every step
        (1, 1, 1e6),  # coefficient 1: nothing scaled
        (2, 1, 0.05),  # two memory layers on one pool: two reads per step
        (1, 2, 0.05),  # gradient accumulation: two backwards per step
    ],
)
def test_deferred_fused_update_with_clipping_equals_unfused_and_dense_adamw(n_layers, micro, max_norm):
    """The deferred fused update (the backward keeps the lookup's inputs, the clip measures the value
    gradient's norm from them, the step applies the clipped update) against the unfused row-sparse
    step on the clipped `.grad` and against dense torch AdamW + clip_grad_norm_ over all parameters,
    through the product-key layer's forward and backward."""
    (m_u, loss_u, norm_u, _), (m_r, loss_r, norm_r, _) = (
        _train(m, n_layers, micro, max_norm) for m in ("unfused", "dense")
    )
    for keep_rows in (-1.0, 0.0):  # the step sums the kept reads again / steps the rows kept by the backward
        m_d, loss_d, norm_d, _ = _train("deferred", n_layers, micro, max_norm, keep_rows=keep_rows)
        _check_deferred(
            n_layers, micro, max_norm, m_d, loss_d, norm_d, m_u, loss_u, norm_u, m_r, loss_r, norm_r
        )


def _check_deferred(n_layers, micro, max_norm, m_d, loss_d, norm_d, m_u, loss_u, norm_u, m_r, loss_r, norm_r):
    if max_norm < 1:
        assert min(norm_d) > 2 * max_norm  # clipping acted at every step
    else:
        assert max(norm_d) < max_norm
    # deferred vs unfused: the same sums; the row norms' float64 summation order is all that differs
    one_read = n_layers == 1 and micro == 1
    torch.testing.assert_close(loss_d, loss_u, rtol=0 if one_read and max_norm > 1 else 1e-6, atol=1e-7)
    torch.testing.assert_close(norm_d, norm_u, rtol=1e-6 if not one_read else 1e-12, atol=0)
    for (name, a), b in zip(m_d.named_parameters(), m_u.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    if one_read and max_norm > 1:
        assert torch.equal(m_d.pool.values, m_u.pool.values)  # bit for bit
    # against dense AdamW (float32 norms in clip_grad_norm_, dense vs row-ordered sums): float tolerance
    torch.testing.assert_close(loss_d, loss_r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(norm_d, norm_r, rtol=1e-5, atol=0)
    for (name, a), b in zip(m_d.named_parameters(), m_r.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.requires_native
@pytest.mark.parametrize("dtype,seed", [(torch.float32, -1), (torch.bfloat16, -1), (torch.bfloat16, 99)])
def test_scaled_fused_kernel_equals_unfused_clip_then_step(dtype, seed):
    """bag_backward_adam_ with grad_scale = the unfused gradient rows, `.mul_(scale)` in the table's dtype,
    then the row step: bit for bit, with or without the sort handed over from bag_grad_sq_norm.
    bag_grad_sq_norm = the unfused rows' float64 squared norm for any thread count, and its weight
    gradient bag_backward's. Width 150 (two column blocks and a tail), repeated slots."""
    from memlayers.native import native_ops
    from memlayers.optim.adam_replay import step_table

    ops = native_ops()
    gen = torch.Generator().manual_seed(6)
    n_rows, dim, target = 40, 150, 12
    betas, eps, horizon = (0.9, 0.95), 1e-8, replay_horizon(0.9, 0.95)
    hist = step_table(torch.rand(target + 1, dtype=torch.float64, generator=gen) * 1e-2, *betas, 0.01)
    state = [torch.randn(n_rows, dim, generator=gen).to(dtype) for _ in range(3)]
    state[2] = state[2].abs()
    row_step = torch.full((n_rows,), target - 1, dtype=torch.int64)
    idx = torch.randint(0, n_rows, (7, 9), generator=gen)
    idx[0, :3] = idx[1, 0]
    w = torch.rand(7, 9, generator=gen)
    grad_out = torch.randn(7, dim, generator=gen)

    rows, grad_rows, gw_ref = ops.bag_backward(state[0], idx, w, grad_out, True, True, False)
    sq_ref = grad_rows.double().pow(2).sum()
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            sq, gw, sorted_rows, perm, no_rows, _ = ops.bag_grad_sq_norm(state[0], idx, w, grad_out, True)
            assert sq.dtype == torch.float64 and torch.equal(gw, gw_ref) and no_rows.numel() == 0
            torch.testing.assert_close(sq, sq_ref, rtol=1e-13, atol=0)
            if n == 1:
                sq_one = sq
            else:
                assert torch.equal(sq, sq_one)
    finally:
        torch.set_num_threads(threads)
    assert ops.bag_grad_sq_norm(state[0], idx, w, grad_out)[1].numel() == 0  # no weight gradient asked for
    # rows read often enough (here 63 reads of 30-odd rows: ~2 each) are written: bag_backward's rows
    reads_per_row = idx.numel() / rows.numel()
    sq_w, _, _, _, rows_w, grad_rows_w = ops.bag_grad_sq_norm(
        state[0], idx, w, grad_out, False, reads_per_row
    )
    assert torch.equal(rows_w, rows) and torch.equal(grad_rows_w, grad_rows) and torch.equal(sq_w, sq)
    assert ops.bag_grad_sq_norm(state[0], idx, w, grad_out, False, reads_per_row * 1.01)[4].numel() == 0
    order = (sorted_rows, perm)
    for scale, handed in ((1.0, None), (0.3137, None), (0.3137, order), (0.0, order)):
        fused = [t.clone() for t in state] + [row_step.clone()]
        ops.bag_backward_adam_(
            *fused,
            idx,
            w,
            grad_out,
            False,
            hist,
            target,
            *betas,
            eps,
            horizon,
            seed,
            scale,
            *(handed or (None, None)),
        )
        ref = [t.clone() for t in state] + [row_step.clone()]
        ops.lazy_adam_rows_(
            *ref, rows, grad_rows.clone().mul_(scale), hist, target, *betas, eps, horizon, seed
        )
        for a, b in zip(fused, ref):
            assert torch.equal(a, b), scale
    with pytest.raises(RuntimeError, match="grad_scale"):
        ops.bag_backward_adam_(
            *fused, idx, w, grad_out, False, hist, target + 1, *betas, eps, horizon, seed, -1.0
        )
    unstable = perm.clone()
    first_repeat = int((sorted_rows[1:] == sorted_rows[:-1]).nonzero()[0])
    unstable[[first_repeat, first_repeat + 1]] = unstable[[first_repeat + 1, first_repeat]]
    for bad in ((sorted_rows, unstable), (sorted_rows.flip(0), perm), (sorted_rows[:-1], perm[:-1])):
        with pytest.raises(RuntimeError, match="sorted_rows"):
            ops.bag_backward_adam_(
                *fused, idx, w, grad_out, False, hist, target, *betas, eps, horizon, seed, 1.0, *bad
            )


def test_deferred_update_on_torch_fallback(cpu_lookup_torch_path):
    """Without the C++ kernels the backward hands over coalesced rows; deferred, they wait for the step:
    two reads per step, clip scale < 1, equal to the unfused step on the clipped `.grad`."""
    a, loss_a, norm_a, _ = _train("deferred", 2, 1, 0.05, steps=5, keep_rows=0.0)  # rows: all it gets
    b, loss_b, norm_b, _ = _train("unfused", 2, 1, 0.05, steps=5)
    assert loss_a == loss_b and norm_a == norm_b
    assert torch.equal(a.pool.values, b.pool.values)


@pytest.mark.requires_native
def test_deferred_gradient_is_dropped_by_zero_grad_and_scaled_twice_like_grad():
    v = torch.nn.Parameter(torch.randn(10, 4))
    v_ref = torch.nn.Parameter(v.detach().clone())
    opt = RowSparseAdam([v], fused=True, deferred=True)
    ref = RowSparseAdam([v_ref])
    idx, w = torch.tensor([[1, 2], [2, 7]]), torch.tensor([[0.5, 0.25], [1.0, 2.0]])
    lookup(v, idx, w, sparse=True, impl="cpu").pow(2).sum().backward()
    assert v.grad is None and opt.has_deferred_grad(v)
    opt.zero_grad()
    assert not opt.has_deferred_grad(v)
    opt.step()  # nothing to do: no step counted
    assert not opt.state.get(v)
    for p in (v, v_ref):
        lookup(p, idx, w, sparse=True, impl="cpu").pow(2).sum().backward()
    torch.testing.assert_close(
        opt.deferred_grad_sq_norm(v), v_ref.grad.coalesce().values().double().pow(2).sum()
    )
    for scale in (0.5, 0.3):  # two coefficients: rounded twice, as two .grad.mul_ would
        opt.scale_deferred_grad(v, scale)
        v_ref.grad.mul_(scale)
    # the norm of the scaled gradient: float64 arithmetic on the measured one (no float32 rounding)
    scaled_sq = v_ref.grad.coalesce().values().double().pow(2).sum()
    torch.testing.assert_close(opt.deferred_grad_sq_norm(v), scaled_sq, rtol=1e-6, atol=0)
    opt.step()
    ref.step()
    assert torch.equal(v.detach(), v_ref.detach())
    with pytest.raises(ValueError, match="needs fused=True"):
        RowSparseAdam([v], deferred=True)
