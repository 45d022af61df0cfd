"""Growth strategies behind one registry, and the JSON spec that rebuilds a grown structure.

Each strategy is one function registered with :func:`register_strategy`. It receives the base blocks
and keyword options and returns ``(new_layers, options, mapping)``: ``options`` are the exact keyword
arguments that rebuild the same structure (JSON-serialisable), ``mapping`` the source index of every
position (for the spec's readers). :func:`grow_by_strategy` wraps that into a spec; :func:`rebuild`
replays a spec on freshly built base blocks, after which a checkpoint of the grown model loads (ties
restored by :func:`scalenet.load_unique_state_dict`).

Copy strategies reuse each base block object at its first position and deep-copy it (fresh tensors,
external references such as a memory pool kept) at every further one.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from scalenet.copying import shared_deepcopy
from scalenet.grow import (
    as_block_list,
    check_adapter_rank,
    check_not_grown,
    grow,
    name_matches,
    normalize_targets,
)
from scalenet.mapping import MappingArg, resolve_mapping

SPEC_FORMAT = "scalenet-growth-spec/1"
LLAMA_PRO_ZERO_INIT = ("attention.wo", "feed_forward.w2", "feed_forward.out")

StrategyResult = tuple[nn.ModuleList, dict[str, Any], list[int]]
StrategyFn = Callable[..., StrategyResult]
STRATEGIES: dict[str, StrategyFn] = {}


def register_strategy(name: str) -> Callable[[StrategyFn], StrategyFn]:
    """Decorator: make ``fn(blocks, *, depth, mapping, adapter_rank, targets, shared_objects, **opts)``
    available as ``grow_by_strategy(..., strategy=name)``."""

    def deco(fn: StrategyFn) -> StrategyFn:
        if name in STRATEGIES:
            raise ValueError(f"growth strategy {name!r} is already registered")
        STRATEGIES[name] = fn
        return fn

    return deco


def _materialize(blocks: list[nn.Module], src: list[int], shared_objects: Sequence[Any]) -> list[nn.Module]:
    """First use of each source block: the block itself; later uses: independent deep copies."""
    used: set[int] = set()
    out = []
    for s in src:
        out.append(blocks[s] if s not in used else shared_deepcopy(blocks[s], shared_objects))
        used.add(s)
    return out


def _no_adapters(strategy: str, targets: Any) -> None:
    if targets is not None:
        raise ValueError(
            f"targets selects adapter layers, which only strategy='scalenet' has (got strategy={strategy!r})"
        )


def _fixed_mapping(strategy: str, mapping: MappingArg | None, name: str) -> str:
    # "stack" is grow_by_strategy's default (and a config's), so it means "not chosen" here.
    if mapping not in (None, "stack", name):
        raise ValueError(
            f"strategy={strategy!r} always uses mapping={name!r} (got {mapping!r}); "
            "use strategy='scalenet' for other mappings"
        )
    return name


def _derived_mapping(strategy: str, mapping: MappingArg | None, source: str) -> None:
    if mapping not in (None, "stack"):
        raise ValueError(
            f"strategy={strategy!r} derives its mapping from {source}; leave mapping at its default (got {mapping!r})"
        )


@register_strategy("scalenet")
def _scalenet(
    blocks: list[nn.Module],
    *,
    depth: int | None,
    mapping: MappingArg | None,
    adapter_rank: int,
    targets: Any,
    shared_objects: Sequence[Any],
    adapter_alpha: float | None = None,
    untie_norms: bool = False,
) -> StrategyResult:
    """Shared blocks + per-position low-rank adapters (:func:`scalenet.grow`)."""
    src = resolve_mapping("stack" if mapping is None else mapping, len(blocks), depth)
    rank = check_adapter_rank(adapter_rank)
    pats = normalize_targets(targets)
    new = grow(
        nn.ModuleList(blocks),
        mapping=src,
        adapter_rank=rank,
        targets=pats,
        adapter_alpha=adapter_alpha,
        untie_norms=untie_norms,
        shared_objects=shared_objects,
    )
    options = {
        "mapping": src,
        "adapter_rank": rank,
        "targets": pats,
        "adapter_alpha": adapter_alpha,
        "untie_norms": bool(untie_norms),
    }
    return new, options, src


def _copy_strategy(name: str, mapping_name: str) -> StrategyFn:
    def strategy(
        blocks: list[nn.Module],
        *,
        depth: int | None,
        mapping: MappingArg | None,
        adapter_rank: int,
        targets: Any,
        shared_objects: Sequence[Any],
    ) -> StrategyResult:
        _no_adapters(name, targets)
        src = resolve_mapping(_fixed_mapping(name, mapping, mapping_name), len(blocks), depth)
        return nn.ModuleList(_materialize(blocks, src, shared_objects)), {"depth": len(src)}, src

    strategy.__doc__ = f"Untied deep copies in {mapping_name!r} order (no sharing, no adapters)."
    return strategy


register_strategy("stack_copy")(_copy_strategy("stack_copy", "stack"))
register_strategy("interleave_copy")(_copy_strategy("interleave_copy", "interleave"))


def _zero_named(block: nn.Module, names: Iterable[str]) -> set[str]:
    """Zero every parameter of the submodules (or the parameters) matching ``names``; return the names hit."""
    hit: set[str] = set()
    with torch.no_grad():
        for pname, p in block.named_parameters():
            mod_name = pname.rpartition(".")[0]
            for n in names:
                if name_matches(pname, n) or (mod_name and name_matches(mod_name, n)):
                    p.zero_()
                    hit.add(n)
    return hit


@register_strategy("llama_pro")
def _llama_pro(
    blocks: list[nn.Module],
    *,
    depth: int | None,
    mapping: MappingArg | None,
    adapter_rank: int,
    targets: Any,
    shared_objects: Sequence[Any],
    every: int | None = None,
    zero_init: Sequence[str] | None = None,
    freeze_original: bool = False,
) -> StrategyResult:
    """LLaMA Pro block expansion: after every k-th block insert a copy of it whose output projections
    (``zero_init``) are zero. A pre-norm residual block h + f(norm(h)) with a zero output projection is
    the identity, so the grown model computes exactly the base function at init.

    Options: ``every`` = k (default L / (L' - L), which must be an integer), ``zero_init`` names (dotted
    submodule or parameter names, globs, dot-aligned suffixes; default ``attention.wo``,
    ``feed_forward.w2``, ``feed_forward.out``, of which each block must have at least one), and
    ``freeze_original`` (original blocks get ``requires_grad=False``: only the inserted copies train).
    """
    _no_adapters("llama_pro", targets)
    _derived_mapping("llama_pro", mapping, "depth/every")
    L = len(blocks)
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 1):
        raise ValueError(
            f"llama_pro every={every!r}: expected a positive int (insert after every k-th block)"
        )
    if depth is None:
        depth = L + (L // every if every else L)
    if depth <= L:
        raise ValueError(f"llama_pro needs depth > L={L} (it inserts depth - L blocks), got depth={depth}")
    n_new = depth - L
    if every is None:
        if L % n_new:
            raise ValueError(
                f"llama_pro: L={L} blocks do not split evenly for {n_new} insertions (depth={depth}); "
                f"pass every=k with {n_new}·k <= {L}"
            )
        every = L // n_new
    if n_new * every > L:
        raise ValueError(
            f"llama_pro: {n_new} insertions after every {every} blocks need {n_new * every} > L={L} blocks"
        )

    explicit = zero_init is not None
    names = list(LLAMA_PRO_ZERO_INIT if zero_init is None else zero_init)
    if isinstance(zero_init, str) or not all(isinstance(n, str) for n in names):
        raise TypeError(f"llama_pro zero_init must be a list of names, got {zero_init!r}")

    src: list[int] = []
    inserted: list[int] = []
    for i in range(L):
        src.append(i)
        if (i + 1) % every == 0 and len(inserted) < n_new:
            inserted.append(len(src))
            src.append(i)
    new = _materialize(blocks, src, shared_objects)
    hit_any: set[str] = set()
    for pos in inserted:
        hit = _zero_named(new[pos], names)
        if not hit:
            params = sorted({n.rpartition(".")[0] for n, _ in new[pos].named_parameters()})
            raise ValueError(
                f"llama_pro zero_init {names} matches nothing in block {src[pos]} (inserted at position {pos}); "
                f"its parameterised submodules are {params}"
            )
        hit_any |= hit
    if explicit and (missing := [n for n in names if n not in hit_any]):
        raise ValueError(f"llama_pro zero_init names {missing} were not found in any copied block")
    if freeze_original:
        for pos, b in enumerate(new):
            if pos not in inserted:
                b.requires_grad_(False)
    # None (not the default list) keeps the lenient default semantics when the spec is replayed.
    options = {
        "depth": depth,
        "every": every,
        "zero_init": names if explicit else None,
        "freeze_original": bool(freeze_original),
    }
    return nn.ModuleList(new), options, src


@register_strategy("solar_dus")
def _solar_dus(
    blocks: list[nn.Module],
    *,
    depth: int | None,
    mapping: MappingArg | None,
    adapter_rank: int,
    targets: Any,
    shared_objects: Sequence[Any],
    m: int | None = None,
) -> StrategyResult:
    """SOLAR depth up-scaling: two copies of the stack, dropping m blocks at the seam. The first copy
    keeps blocks 0..L-m-1, the second m..L-1, so depth = 2L - 2m. ``m`` is given or derived from
    ``depth``; with neither, m = L // 4 (the paper's 8 of 32)."""
    _no_adapters("solar_dus", targets)
    _derived_mapping("solar_dus", mapping, "m/depth")
    L = len(blocks)
    if m is not None and (isinstance(m, bool) or not isinstance(m, int)):
        raise TypeError(f"solar_dus m must be an int, got {m!r}")
    if m is None:
        if depth is None:
            m = L // 4
        else:
            if depth > 2 * L or (2 * L - depth) % 2:
                raise ValueError(f"solar_dus depth = 2L - 2m: with L={L}, depth={depth} is not reachable")
            m = (2 * L - depth) // 2
    if not 0 <= m < L:
        raise ValueError(f"solar_dus m={m} must be in [0, L={L})")
    if depth is not None and depth != 2 * L - 2 * m:
        raise ValueError(f"solar_dus: depth={depth} disagrees with m={m} (depth = 2L - 2m = {2 * L - 2 * m})")
    src = list(range(L - m)) + list(range(m, L))
    return nn.ModuleList(_materialize(blocks, src, shared_objects)), {"m": m}, src


def grow_by_strategy(
    layers: nn.ModuleList,
    strategy: str = "scalenet",
    depth: int | None = None,
    mapping: MappingArg | None = "stack",
    adapter_rank: int = 8,
    targets: Any = None,
    *,
    shared_objects: Iterable[Any] = (),
    **opts: Any,
) -> tuple[nn.ModuleList, dict[str, Any]]:
    """Grow ``layers`` with a registered strategy; return the new stack and its JSON-serialisable spec.

    ``mapping`` is chosen freely for ``scalenet`` only; the other strategies fix their order and accept
    the default (``"stack"``) or None for it, rejecting anything else. ``adapter_rank``/``targets``
    apply to ``scalenet`` only (``adapter_rank`` is ignored by the others, ``targets`` rejected). ``opts`` are strategy options (see each strategy's docstring).
    ``shared_objects`` (not recorded in the spec) are objects copies must keep as-is.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown growth strategy {strategy!r}; valid strategies: {sorted(STRATEGIES)}")
    fn = STRATEGIES[strategy]
    accepted = [
        p.name
        for p in inspect.signature(fn).parameters.values()
        if p.kind is p.KEYWORD_ONLY
        and p.name not in ("depth", "mapping", "adapter_rank", "targets", "shared_objects")
    ]
    if unknown := sorted(set(opts) - set(accepted)):
        raise TypeError(f"strategy {strategy!r} got unknown options {unknown}; it accepts {accepted}")
    blocks = as_block_list(layers)
    check_not_grown(blocks)
    new, options, src = fn(
        blocks,
        depth=depth,
        mapping=mapping,
        adapter_rank=adapter_rank,
        targets=targets,
        shared_objects=list(shared_objects),
        **opts,
    )
    spec = {
        "format": SPEC_FORMAT,
        "strategy": strategy,
        "base_depth": len(blocks),
        "depth": len(new),
        "mapping": list(src),
        "options": options,
    }
    json.dumps(spec)  # fail here, not at checkpoint time, if a strategy records a non-JSON value
    return new, spec


def rebuild(
    layers: nn.ModuleList, spec: dict[str, Any], *, shared_objects: Iterable[Any] = ()
) -> nn.ModuleList:
    """Re-apply a growth ``spec`` to freshly built base ``layers`` (same L); then load the grown
    checkpoint with :func:`scalenet.load_unique_state_dict` to restore weights and ties."""
    if not isinstance(spec, dict) or spec.get("format") != SPEC_FORMAT:
        raise ValueError(f"not a scalenet growth spec (expected format {SPEC_FORMAT!r}): {spec!r:.200}")
    blocks = as_block_list(layers)
    if len(blocks) != spec["base_depth"]:
        raise ValueError(
            f"spec was grown from {spec['base_depth']} base blocks but layers has {len(blocks)}; "
            "build the base model with the checkpoint's original depth"
        )
    new, again = grow_by_strategy(blocks, spec["strategy"], shared_objects=shared_objects, **spec["options"])
    if again["mapping"] != spec["mapping"]:
        raise ValueError(f"rebuilt mapping {again['mapping']} differs from the spec's {spec['mapping']}")
    return new
