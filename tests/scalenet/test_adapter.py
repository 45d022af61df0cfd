"""AdaptedLinear against dense math: y = x Wᵀ + b + s·(x Aᵀ) Bᵀ, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scalenet import AdaptedLinear


@pytest.mark.parametrize("alpha", [None, 4.0])
def test_forward_backward_match_dense_reference(alpha):
    torch.manual_seed(0)
    base = nn.Linear(5, 7, dtype=torch.float64)
    ad = AdaptedLinear(base, rank=3, alpha=alpha)
    assert ad.weight is base.weight and ad.bias is base.bias
    assert torch.count_nonzero(ad.lora_B) == 0
    with torch.no_grad():
        ad.lora_B.normal_()
    x = torch.randn(2, 4, 5, dtype=torch.float64, requires_grad=True)
    s = 1.0 if alpha is None else alpha / 3

    # Naive reference: explicit per-element loops over the dense merged matrix.
    W = base.weight.detach().clone().requires_grad_()
    A = ad.lora_A.detach().clone().requires_grad_()
    B = ad.lora_B.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    ref = (
        torch.stack(
            [
                sum(xr[..., i] * (W[o, i] + s * sum(B[o, r] * A[r, i] for r in range(3))) for i in range(5))
                for o in range(7)
            ],
            dim=-1,
        )
        + base.bias.detach()
    )
    y = ad(x)
    torch.testing.assert_close(y, ref)

    g = torch.randn_like(y)
    y.backward(g)
    ref.backward(g)
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(base.weight.grad, W.grad)
    torch.testing.assert_close(ad.lora_A.grad, A.grad)
    torch.testing.assert_close(ad.lora_B.grad, B.grad)

    merged = ad.merged()
    assert type(merged) is nn.Linear
    assert merged.weight.data_ptr() != base.weight.data_ptr()
    torch.testing.assert_close(merged(x), y)


def test_init_is_small_random_a_zero_b():
    torch.manual_seed(0)
    ad = AdaptedLinear(nn.Linear(64, 8), rank=4)
    bound = 64**-0.5
    assert ad.lora_A.abs().max() <= bound and ad.lora_A.std() > bound / 4
    assert torch.count_nonzero(ad.lora_B) == 0


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="rank >= 1"):
        AdaptedLinear(nn.Linear(3, 3), rank=0)
