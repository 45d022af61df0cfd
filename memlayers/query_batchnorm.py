"""Batch normalisation of memory queries (the query batchnorm of Lample et al. 2019, "Large Memory
Layers with Product Keys").

Why: when the queries of all tokens share a large common component, every token scores the same
sub-keys highest and only a few slots are ever read (slot collapse; the `mem_slots_read_frac`
signal). Normalising each query feature over the tokens of the batch (zero mean, unit variance,
then a learned scale and shift) removes that shared component, so the top-K of different tokens
differ. Lample et al. report that it raises key usage and lowers perplexity. RMS `qk_norm` does not
do this: it rescales each query on its own and keeps a shared direction.

Semantics are torch's ``BatchNorm1d`` (biased batch variance to normalise, unbiased variance into
the running estimate, a fixed momentum), with three differences:

- ``process_group``: when set (the data-parallel group), the mean and variance are over the tokens
  of every rank in the group, with differentiable collectives (SyncBatchNorm semantics), so N ranks
  compute exactly what one process computes on the whole batch and the running estimates agree on
  every rank. None: this process's tokens only.
- Statistics are computed in the dtype of the queries it is given (the layer passes fp32 at least).
- A forward replayed by activation checkpointing during backward does not update the running
  estimates a second time (torch's BatchNorm does).

Eval mode normalises with the running estimates, so validation, generation and exports do not
depend on the batch. No ``num_batches_tracked`` buffer: the momentum is fixed.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn


class QueryBatchNorm(nn.Module):
    """Batch norm over tokens of (T, F) query features, optionally synchronised across ranks."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"QueryBatchNorm: momentum must be in (0, 1], got {momentum!r}")
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(num_features, **factory))
        self.bias = nn.Parameter(torch.empty(num_features, **factory))
        self.register_buffer("running_mean", torch.empty(num_features, **factory))
        self.register_buffer("running_var", torch.empty(num_features, **factory))
        self.process_group: dist.ProcessGroup | None = None
        self.reset_parameters()

    @torch.no_grad()
    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_var.fill_(1.0)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)
        nn.init.zeros_(self.bias)
        self.reset_running_stats()

    def init_spec(self) -> dict[str, tuple]:
        return {"weight": ("constant", 1.0), "bias": ("constant", 0.0)}

    def forward(self, q: Tensor) -> Tensor:
        if q.dim() != 2 or q.shape[1] != self.num_features:
            raise ValueError(
                f"QueryBatchNorm: expected (tokens, {self.num_features}) queries, got {tuple(q.shape)}"
            )
        if self.training:
            mean, var, count = self._batch_stats(q)
            if _first_forward():
                self._track(mean, var, count)
        else:
            mean, var = self.running_mean.to(q.dtype), self.running_var.to(q.dtype)
        return (q - mean) * torch.rsqrt(var + self.eps) * self.weight.to(q.dtype) + self.bias.to(q.dtype)

    def _batch_stats(self, q: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(mean, biased variance, token count) over this batch, across the group when it has one."""
        group = self.process_group
        if group is None or dist.get_world_size(group) == 1:
            var, mean = torch.var_mean(q, dim=0, unbiased=False)
            return mean, var, torch.tensor(float(q.shape[0]), dtype=q.dtype, device=q.device)
        from torch.distributed.nn.functional import all_reduce  # differentiable: backward all-reduces grads

        count = torch.full((1,), float(q.shape[0]), dtype=q.dtype, device=q.device)
        total = all_reduce(torch.cat([q.sum(0), count]), group=group)
        count = total[-1]
        mean = total[:-1] / count
        # Two passes (sum, then sum of squared deviations) rather than E[q²] − E[q]²: a collapsed
        # query has a mean far larger than its spread, exactly where the one-pass form cancels.
        var = all_reduce((q - mean).pow(2).sum(0), group=group) / count
        return mean, var, count

    @torch.no_grad()
    def _track(self, mean: Tensor, var: Tensor, count: Tensor) -> None:
        # A batch of one token has no unbiased variance: it leaves the estimates alone (torch's
        # BatchNorm raises). Tensor arithmetic rather than an `if`: no host sync, no graph break.
        rate = (count >= 2).to(self.running_mean.dtype) * self.momentum
        unbiased = var * (count / (count - 1).clamp_min(1))
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), rate)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), rate)

    def extra_repr(self) -> str:
        synced = self.process_group is not None
        return f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, synced={synced}"


def _first_forward() -> bool:
    """False while autograd replays a checkpointed forward inside backward."""
    if torch.compiler.is_compiling():
        return True
    return torch._C._current_graph_task_id() == -1


def set_query_norm_group(model: nn.Module, group: dist.ProcessGroup | None) -> int:
    """Synchronise the statistics of every QueryBatchNorm under `model` over `group` (the
    data-parallel group: ranks that hold different tokens). Returns how many were set."""
    n = 0
    for m in model.modules():
        if isinstance(m, QueryBatchNorm):
            m.process_group = group
            n += 1
    return n
