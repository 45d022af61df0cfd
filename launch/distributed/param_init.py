"""Layout-independent initialisation: every rank draws exactly its own block of each tensor, and the
blocks of all ranks together equal the tensor a single process draws, bit for bit, whatever the
parallel layout (data/FSDP, tensor, memory parallel) and world size.

Scheme. A tensor of full shape (R, ...) is cut into row blocks of `block_rows(shape)` rows (a
function of the shape only, about 64K elements per block). Block b is drawn, in full width, from
its own CPU `torch.Generator` seeded with

    blake2b(f"{seed}:{name}:{b}")  (63 bits)

where `name` is the parameter's canonical name in the model (its first name in `named_parameters()`;
wrappers that rename parameters are never applied before init). A rank skips blocks outside its
rows and keeps only its columns of the rest, so the peak extra memory is one block; the cost is
drawing the full width of each block the rank touches (a column shard draws every row block).
Values come from the CPU generator in the parameter's dtype and are copied to its device, so a
tensor's initial values do not depend on the device either.

Where a rank's block is: a DTensor's (FSDP2, tensor parallel) offset comes from its placements;
a plain parameter holding a block of a larger tensor (memory-value column shards) is described by
`regions` {name: (full shape, offset)}; any other tensor is whole.
"""

from __future__ import annotations

import hashlib
import math

import torch
from torch import nn

BLOCK_ELEMENTS = 1 << 16

Spec = tuple  # ("normal", mean, std) | ("uniform", low, high) | ("constant", value)
Region = tuple[tuple[int, ...], tuple[int, ...]]  # (full shape, offset of the local block)


def block_rows(shape: tuple[int, ...]) -> int:
    row = math.prod(shape[1:]) if len(shape) > 1 else 1
    return max(1, BLOCK_ELEMENTS // max(row, 1))


def block_seed(seed: int, name: str, block: int) -> int:
    digest = hashlib.blake2b(f"{seed}:{name}:{block}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _local_and_region(
    p: torch.Tensor, region: Region | None
) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(local tensor to write, full shape, offset of the local block)."""
    if hasattr(p, "to_local"):  # DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        _, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        return p.to_local(), tuple(p.shape), tuple(offset)
    if region is not None:
        return p, tuple(region[0]), tuple(region[1])
    return p, tuple(p.shape), (0,) * p.dim()


def _draw(spec: Spec, shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype)
    kind = spec[0]
    if kind == "normal":
        return out.normal_(spec[1], spec[2], generator=gen)
    if kind == "uniform":
        return out.uniform_(spec[1], spec[2], generator=gen)
    raise ValueError(f"unknown init distribution {spec!r}")


@torch.no_grad()
def init_tensor_(p: torch.Tensor, name: str, spec: Spec, seed: int, region: Region | None = None) -> None:
    """Fill `p` (its local block) with its block of the full tensor `name` drawn under `seed`."""
    local, full, offset = _local_and_region(p, region)
    if local.numel() == 0:
        return
    if spec[0] == "constant":
        local.fill_(spec[1])
        return
    if len(full) == 0:  # a scalar: one block of one element
        local.copy_(_draw(spec, (), local.dtype, torch.Generator().manual_seed(block_seed(seed, name, 0))))
        return
    rows = block_rows(full)
    lo, hi = offset[0], offset[0] + local.shape[0]
    cols = tuple(slice(o, o + n) for o, n in zip(offset[1:], local.shape[1:]))
    for b in range(lo // rows, (hi - 1) // rows + 1):
        start, stop = b * rows, min((b + 1) * rows, full[0])
        gen = torch.Generator().manual_seed(block_seed(seed, name, b))
        block = _draw(spec, (stop - start, *full[1:]), local.dtype, gen)
        keep = block[(slice(max(lo, start) - start, min(hi, stop) - start), *cols)]
        local[max(lo, start) - lo : min(hi, stop) - lo].copy_(keep)


def init_parameters(
    model: nn.Module, specs: dict[str, Spec], seed: int, regions: dict[str, Region] | None = None
) -> None:
    """Initialise every parameter of `model` (each tied tensor once) from `specs` by canonical name."""
    regions = regions or {}
    for name, p in model.named_parameters():
        if name not in specs:
            raise KeyError(f"no initialisation declared for parameter {name}")
        init_tensor_(p, name, specs[name], seed, regions.get(name))


def module_specs(model: nn.Module, leaf_rule) -> dict[str, Spec]:
    """Specs for every parameter under canonical names: a module with `init_spec()` declares its
    subtree (memory layers, value pools); every parameter nobody declared goes to
    `leaf_rule(name, module, param_name) -> Spec` — also inside a declaring module's subtree, where
    ScaleNet's adapters land when a grown model's memory layers get them."""
    specs: dict[str, Spec] = {}
    owned: list[str] = []
    for mname, module in model.named_modules():
        prefix = f"{mname}." if mname else ""
        outer = any(prefix.startswith(o) for o in owned)  # inside a subtree declared above
        if module is not model and not outer and hasattr(module, "init_spec"):
            for k, v in module.init_spec().items():
                specs.setdefault(prefix + k, v)
            owned.append(prefix)
        for pname, _ in module.named_parameters(recurse=False):
            if prefix + pname not in specs:
                specs[prefix + pname] = leaf_rule(mname, module, pname)
    # Tied tensors are initialised under their first name: map every alias's spec to it as well.
    return specs
