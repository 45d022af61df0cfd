"""launch/cross_entropy.py against F.cross_entropy: forward and gradient, every reduction and dtype."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from launch.train.loss import cross_entropy_rows


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("n, vocab", [(37, 50), (300, 1000), (1, 7)])
def test_equals_f_cross_entropy_forward_and_backward(n, vocab, dtype, reduction):
    gen = torch.Generator().manual_seed(n + vocab)
    logits = (torch.randn(n, vocab, generator=gen) * 3).to(dtype).requires_grad_()
    targets = torch.randint(0, vocab, (n,), generator=gen)
    targets[::5] = -100  # ignored rows
    ref_logits = logits.detach().clone().requires_grad_()
    out = cross_entropy_rows(logits, targets, reduction=reduction)
    ref = F.cross_entropy(ref_logits.float(), targets, ignore_index=-100, reduction=reduction)
    tol = dict(rtol=1e-5, atol=1e-6)  # both in fp32, whatever the logits dtype
    if n == 1 and reduction == "mean":  # the one row is ignored: F gives NaN, and so must we
        assert out.isnan() and ref.isnan()
        return
    torch.testing.assert_close(out, ref.to(out.dtype), **tol)
    g = torch.rand(out.shape, generator=gen) + 0.5
    (out * g).sum().backward()
    (ref * g).sum().backward()
    assert logits.grad.dtype == dtype
    gtol = dict(rtol=1e-5, atol=1e-7) if dtype != torch.bfloat16 else dict(rtol=2e-2, atol=1e-4)
    torch.testing.assert_close(logits.grad.float(), ref_logits.grad.float(), **gtol)


def test_no_grad_forward_and_bad_input():
    logits = torch.randn(4, 6)
    with torch.no_grad():
        loss = cross_entropy_rows(logits, torch.tensor([0, 1, 2, 5]), reduction="sum")
    torch.testing.assert_close(loss, F.cross_entropy(logits, torch.tensor([0, 1, 2, 5]), reduction="sum"))
    with pytest.raises(ValueError, match="reduction"):
        cross_entropy_rows(logits, torch.zeros(4, dtype=torch.long), reduction="avg")
    with pytest.raises(ValueError, match=r"\(N, V\) logits"):
        cross_entropy_rows(logits[None], torch.zeros(4, dtype=torch.long))


def test_a_second_backward_through_the_graph_raises_instead_of_a_wrong_gradient():
    """The backward consumes its saved log-probabilities in place: retain_graph must not reuse them."""
    logits = torch.randn(5, 9, requires_grad=True)
    loss = cross_entropy_rows(logits, torch.tensor([1, 2, 3, 4, 0]))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
