"""Deep copies of blocks that keep chosen objects shared.

A memory layer holds its value pool as a plain attribute (the model registers the pool, not the
block). ``copy.deepcopy`` would clone that pool, so each copy would silently read its own table.
The helpers here deep-copy through a memo pre-filled with the objects that must stay shared.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)

# torch's own per-module bookkeeping (_parameters, _modules, hook dicts, training, ...): never references.
_TORCH_KEYS = frozenset(vars(nn.Module()))


def _walk_refs(value: Any, depth: int = 0) -> Iterator[nn.Module | torch.Tensor]:
    """Modules and tensors reachable from a plain attribute value (through lists/tuples/dicts)."""
    if isinstance(value, nn.Module | torch.Tensor):
        yield value
    elif depth < 3 and isinstance(value, list | tuple | set | frozenset):
        for v in value:
            yield from _walk_refs(v, depth + 1)
    elif depth < 3 and isinstance(value, dict):
        for v in value.values():
            yield from _walk_refs(v, depth + 1)


def external_refs(module: nn.Module) -> list[nn.Module | torch.Tensor]:
    """Modules and tensors a block refers to without registering them (e.g. a memory layer's pool).

    These belong to someone else (the model), so copies of the block must point at the same objects.
    """
    refs: dict[int, nn.Module | torch.Tensor] = {}
    registered = {id(m) for m in module.modules()}
    registered.update(id(t) for _, t in module.named_parameters(remove_duplicate=False))
    registered.update(id(t) for _, t in module.named_buffers(remove_duplicate=False))
    for sub in module.modules():
        for key, value in vars(sub).items():
            if key in _TORCH_KEYS:
                continue
            for ref in _walk_refs(value):
                if id(ref) not in registered:
                    refs[id(ref)] = ref
    return list(refs.values())


def shared_deepcopy(
    module: M,
    shared_objects: Iterable[Any] = (),
    *,
    share_params: bool = False,
    share_buffers: bool | None = None,
    share_external: bool = True,
) -> M:
    """``copy.deepcopy(module)`` where some objects are kept, not copied.

    Args:
        shared_objects: objects the copy must reference as-is (e.g. a ``MemoryPool`` or a config).
        share_params: keep every parameter (the same ``nn.Parameter`` objects) and, unless
            ``share_buffers`` says otherwise, every buffer: the copy is a new module tree computing with
            the same tensors, i.e. a tied view of ``module``.
        share_buffers: keep every buffer too (default: as ``share_params``); False gives the copy its
            own buffers (copies of the current values) around shared parameters.
        share_external: also keep everything :func:`external_refs` finds (unregistered module/tensor
            attributes such as a memory layer's pool). On by default because such attributes are
            references to objects owned elsewhere.
    """
    memo: dict[int, Any] = {}
    keep: list[Any] = list(shared_objects)
    if share_external:
        keep += external_refs(module)
    if share_params:
        keep += [p for _, p in module.named_parameters(remove_duplicate=False)]
    if share_params if share_buffers is None else share_buffers:
        keep += [b for _, b in module.named_buffers(remove_duplicate=False)]
    for obj in keep:
        memo[id(obj)] = obj
    return copy.deepcopy(module, memo)
