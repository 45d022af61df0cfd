"""shared_deepcopy keeps external references (pools) and caller-marked objects; copies the rest."""

from __future__ import annotations

import scalenet_test_toys as toys
import torch
from torch import nn

from scalenet import external_refs, shared_deepcopy


class Holder(nn.Module):
    def __init__(self, pool: nn.Module, config: dict):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self._pool = [pool]  # a private, unregistered reference inside a list
        self.config = config
        self.mask = torch.ones(3)  # plain tensor attribute: treated as a reference too


def test_external_refs_and_marked_objects_stay_shared():
    pool = toys.Pool(4, 4)
    config = {"eps": 1e-6}
    block = Holder(pool, config)
    assert {id(r) for r in external_refs(block)} == {id(pool), id(block.mask)}

    twin = shared_deepcopy(block, shared_objects=[config])
    assert twin._pool[0] is pool and twin.config is config and twin.mask is block.mask
    assert twin.proj is not block.proj and twin.proj.weight.data_ptr() != block.proj.weight.data_ptr()
    torch.testing.assert_close(twin.proj.weight, block.proj.weight)

    tied = shared_deepcopy(block, share_params=True)
    assert tied.proj is not block.proj and tied.proj.weight is block.proj.weight

    plain = shared_deepcopy(block, share_external=False)
    assert plain._pool[0] is not pool and plain.config is not config
