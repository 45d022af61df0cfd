"""ScaleNet growth: a deeper stack whose positions reuse the base blocks' parameters plus own adapters.

For base blocks f_0..f_{L-1} with parameters θ_0..θ_{L-1} and a mapping g: [0, L') → [0, L), position
l' of the grown stack computes

    f_{g(l')}(x; θ_{g(l')}, Δ_{l'}),   Δ_{l'} = {s · B A for every targeted nn.Linear}

where θ_{g(l')} are the very ``nn.Parameter`` objects of the source block (so the parameter count
grows only by Σ_{l'} Σ_{targeted linears} r·(in + out), and an optimizer step on the shared weights
moves every position that uses them) and Δ_{l'} is owned by position l' alone. B = 0 at init, so the
grown stack starts out computing f_{g(0)} ∘ ... in mapping order (not the base function: stacking is
not function-preserving; see the ``llama_pro`` strategy for that).

How positions are built: each position is a *tied view* of its source, a new module tree of the
block's own class whose parameters are the source's objects, with targeted linears swapped for
:class:`~scalenet.adapter.AdaptedLinear`. Buffers (running statistics, e.g. a memory layer's query
batchnorm) are each position's own copies: a position normalises with the statistics of its own
inputs in training, so the estimates it uses in eval must be its own too (shared, they would be a
mixture of every position's; and `to_empty` could not keep them tied anyway). The view is the block
itself (same forward, same ``*args/**kwargs``, e.g. ``block(x, rope, cache=...)``), so the model's
loop is unchanged, per-position Python state (a layer index, a KV cache passed by the caller) is
never shared, and ``torch.compile`` sees ordinary modules. Objects the block references without registering (a memory
layer's value pool) stay the same objects in every view.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from fnmatch import fnmatchcase
from typing import Any

import torch
from torch import nn

from scalenet.adapter import AdaptedLinear
from scalenet.copying import shared_deepcopy
from scalenet.mapping import MappingArg, resolve_mapping

Targets = str | Sequence[str] | None

_TORCH_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.batchnorm._NormBase)


def as_block_list(layers: Any, arg: str = "layers") -> list[nn.Module]:
    """Validate the base stack: an nn.ModuleList (or any sequence) of nn.Module blocks."""
    if isinstance(layers, nn.Module) and not isinstance(layers, nn.ModuleList | nn.Sequential):
        raise TypeError(f"{arg} must be an nn.ModuleList of blocks, got a single {type(layers).__name__}")
    try:
        blocks = list(layers)
    except TypeError:
        raise TypeError(f"{arg} must be an nn.ModuleList of blocks, got {type(layers).__name__}") from None
    if not blocks:
        raise ValueError(f"{arg} is empty: growth needs at least one block")
    for i, b in enumerate(blocks):
        if not isinstance(b, nn.Module):
            raise TypeError(f"{arg}[{i}] is a {type(b).__name__}, expected an nn.Module block")
    return blocks


def check_adapter_rank(adapter_rank: Any) -> int:
    if isinstance(adapter_rank, bool) or not isinstance(adapter_rank, int):
        raise TypeError(f"adapter_rank must be an int (0 = no adapters), got {adapter_rank!r}")
    if adapter_rank < 0:
        raise ValueError(
            f"adapter_rank must be >= 0 (0 = no adapters, pure weight sharing), got {adapter_rank}"
        )
    return adapter_rank


def normalize_targets(targets: Targets) -> list[str] | None:
    if targets is None:
        return None
    if isinstance(targets, str):
        targets = [targets]
    if not isinstance(targets, Sequence) or not all(isinstance(t, str) for t in targets):
        raise TypeError(f"targets must be None, a name pattern or a list of name patterns, got {targets!r}")
    if not targets:
        raise ValueError("targets is empty: pass None to adapt every nn.Linear, or name patterns")
    return list(targets)


def name_matches(name: str, pattern: str) -> bool:
    """A dotted submodule name matches a pattern when the pattern (a glob) matches the whole name or a
    dot-aligned suffix: ``"wq"`` and ``"attention.wq"`` and ``"attention.*"`` all match ``attention.wq``."""
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


def targeted_linears(block: nn.Module, targets: list[str] | None) -> list[tuple[str, nn.Linear]]:
    """(name, module) of every nn.Linear of ``block`` selected by ``targets`` (all when None)."""
    out = []
    for name, mod in block.named_modules(remove_duplicate=False):
        if type(mod) is nn.Linear and (targets is None or any(name_matches(name, t) for t in targets)):
            out.append((name, mod))
    return out


def is_norm(module: nn.Module) -> bool:
    """torch's norm layers, or any class whose name ends in 'Norm' (RMSNorm, LayerNorm, ...)."""
    return isinstance(module, _TORCH_NORMS) or type(module).__name__.lower().endswith("norm")


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def untie_norm_params(block: nn.Module) -> None:
    """Give every norm module of ``block`` its own parameter copies (initialised from the current ones)."""
    fresh: dict[int, nn.Parameter] = {}
    for mod in block.modules():
        if not is_norm(mod):
            continue
        for pname, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in fresh:
                fresh[id(p)] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            setattr(mod, pname, fresh[id(p)])


def check_not_grown(blocks: Iterable[nn.Module], arg: str = "layers") -> None:
    for i, b in enumerate(blocks):
        if any(isinstance(m, AdaptedLinear) for m in b.modules()):
            raise ValueError(
                f"{arg}[{i}] already holds scalenet adapters: merge() the grown stack first, then grow the result"
            )


def tied_view(
    block: nn.Module,
    adapter_rank: int,
    targets: list[str] | None,
    *,
    adapter_alpha: float | None = None,
    untie_norms: bool = False,
    shared_objects: Iterable[Any] = (),
) -> tuple[nn.Module, set[str]]:
    """One grown position: a view of ``block`` sharing its parameters, with adapters on targeted linears.

    Returns the view and the set of target patterns that matched something (for "matches nothing" errors).
    """
    view = shared_deepcopy(block, shared_objects, share_params=True, share_buffers=False)
    if untie_norms:
        untie_norm_params(view)
    matched: set[str] = set()
    if adapter_rank > 0:
        adapted: dict[int, AdaptedLinear] = {}  # a linear registered twice gets one adapter
        for name, lin in targeted_linears(view, targets):
            if targets is not None:
                matched.update(t for t in targets if name_matches(name, t))
            if id(lin) not in adapted:
                adapted[id(lin)] = AdaptedLinear(lin, adapter_rank, adapter_alpha)
            set_submodule(view, name, adapted[id(lin)])
    elif targets is not None:
        matched.update(t for t in targets for name, _ in targeted_linears(view, [t]))
    return view, matched


def grow(
    layers: nn.ModuleList,
    depth: int | None = None,
    mapping: MappingArg = "stack",
    adapter_rank: int = 8,
    targets: Targets = None,
    *,
    adapter_alpha: float | None = None,
    untie_norms: bool = False,
    shared_objects: Iterable[Any] = (),
) -> nn.ModuleList:
    """Grow ``layers`` (L blocks) to ``depth`` positions (default 2L) by weight sharing plus adapters.

    Args:
        layers: the base blocks; any ``nn.Module`` mapping x → x, extra forward args pass through. Not
            modified: the grown stack is new modules around the same parameters.
        depth: number of positions L'. Default 2L (or len(mapping) for an explicit list).
        mapping: ``"stack"`` (0..L-1, 0..L-1), ``"interleave"`` (0,0,1,1,...), or a list of source
            indices; position i computes with the parameters of ``layers[mapping[i]]``.
        adapter_rank: r of the per-position adapter on each targeted ``nn.Linear`` (exactly
            ``nn.Linear``; subclasses such as tensor-parallel linears are left alone). 0 = no adapters.
        targets: None (every nn.Linear) or glob patterns matched against the linear's dotted name in
            the block, whole or as a dot-aligned suffix (``"wq"``, ``"attention.*"``, ``"feed_forward.w2"``).
        adapter_alpha: adapter scale s = alpha / r; None means s = 1.
        untie_norms: give every position its own copy of each norm module's parameters (initialised from
            the source), instead of sharing them.
        shared_objects: extra objects every view must keep as-is (unregistered module/tensor attributes,
            e.g. a memory pool, are kept automatically).

    Returns:
        ``nn.ModuleList`` of L' blocks of the base classes; with zero adapters it computes
        ``layers[mapping[0]]``, ``layers[mapping[1]]``, ... in order.
    """
    blocks = as_block_list(layers)
    check_not_grown(blocks)
    src = resolve_mapping(mapping, len(blocks), depth)
    rank = check_adapter_rank(adapter_rank)
    pats = normalize_targets(targets)
    if adapter_alpha is not None and not isinstance(adapter_alpha, int | float):
        raise TypeError(f"adapter_alpha must be a number or None, got {adapter_alpha!r}")
    shared = list(shared_objects)

    new: list[nn.Module] = []
    matched: set[str] = set()
    for s in src:
        view, hit = tied_view(
            blocks[s], rank, pats, adapter_alpha=adapter_alpha, untie_norms=untie_norms, shared_objects=shared
        )
        matched |= hit
        new.append(view)
    if pats is not None and (missing := [t for t in pats if t not in matched]):
        names = sorted({n for b in blocks for n, m in b.named_modules() if type(m) is nn.Linear})
        raise ValueError(f"targets {missing} match no nn.Linear in the blocks; linear names are: {names}")
    return nn.ModuleList(new)


def adapters(layers: nn.Module) -> list[tuple[str, AdaptedLinear]]:
    """(name, module) of every adapted linear in a grown stack."""
    return [(n, m) for n, m in layers.named_modules() if isinstance(m, AdaptedLinear)]


def adapter_parameters(layers: nn.Module) -> list[torch.nn.Parameter]:
    """The adapters' own parameters (lora_A, lora_B), e.g. for a separate optimizer group."""
    return [p for _, m in adapters(layers) for p in (m.lora_A, m.lora_B)]


def reset_adapters(layers: nn.Module) -> None:
    """Re-initialise every adapter (A small random, B = 0), e.g. after ``to_empty`` and the model's own
    weight init, so the grown stack again computes its blocks in mapping order."""
    for _, m in adapters(layers):
        m.reset_adapter()
