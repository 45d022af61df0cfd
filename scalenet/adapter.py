"""Low-rank parallel adapter on a (shared) linear layer.

    y = W x + b + s · B (A x),     A ∈ R^{r×in},  B ∈ R^{out×r},  s = alpha / r (1 if alpha is None)

W and b are the *same* ``nn.Parameter`` objects as the source block's linear (tied across every
position that reuses the block); A and B belong to this position only. B starts at zero, so a fresh
adapter leaves the layer's function unchanged, and A starts small and random (Kaiming-uniform,
bound 1/sqrt(in)) so that B receives a non-zero gradient from the first step.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class AdaptedLinear(nn.Linear):
    """An ``nn.Linear`` (same ``weight``/``bias`` names, so state-dict keys of the base survive) plus a
    rank-r branch ``lora_A``/``lora_B``. Subclassing keeps ``isinstance(m, nn.Linear)`` checks working
    (weight-decay groups, init code)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        if rank < 1:
            raise ValueError(f"AdaptedLinear needs rank >= 1, got {rank}")
        # Skip nn.Linear.__init__: it would allocate a fresh weight; we reuse the base's parameters.
        nn.Module.__init__(self)
        self.in_features = base.in_features
        self.out_features = base.out_features
        self.weight = base.weight
        self.bias = base.bias
        self.rank = rank
        self.alpha = alpha
        self.scale = 1.0 if alpha is None else alpha / rank
        factory = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **factory))
        self.lora_B = nn.Parameter(torch.empty(self.out_features, rank, **factory))
        self.reset_adapter()

    def reset_adapter(self) -> None:
        """A ~ U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform with a=sqrt(5)), B = 0. Safe after ``to_empty``."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            nn.init.zeros_(self.lora_B)

    def reset_parameters(self) -> None:
        """nn.Linear's init of W, b (shared: this re-initialises the tied source too) plus the adapter.

        Lets meta-device flows (build, grow, ``to_empty``, init) initialise a grown model by walking its
        modules; never call it after loading trained weights."""
        super().reset_parameters()
        if "lora_A" in self._parameters:
            self.reset_adapter()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(
            F.linear(x, self.lora_A), self.lora_B
        )

    def delta_weight(self) -> torch.Tensor:
        """s · B A, the dense update the adapter adds to W."""
        return self.scale * (self.lora_B @ self.lora_A)

    def merged(self) -> nn.Linear:
        """A plain, independent ``nn.Linear`` with W' = W + s·B A (new tensors, nothing shared)."""
        with torch.no_grad():
            lin = nn.Linear(
                self.in_features,
                self.out_features,
                bias=self.bias is not None,
                device=self.weight.device,
                dtype=self.weight.dtype,
            )
            lin.weight.copy_(self.weight + self.delta_weight().to(self.weight.dtype))
            lin.weight.requires_grad_(self.weight.requires_grad)
            if self.bias is not None:
                lin.bias.copy_(self.bias)
                lin.bias.requires_grad_(self.bias.requires_grad)
        return lin

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.rank}, scale={self.scale:g}"
