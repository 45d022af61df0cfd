"""Layer mapping g(l'): which source block each position of the grown stack reuses."""

from __future__ import annotations

from collections.abc import Sequence

MAPPING_NAMES = ("stack", "interleave")

MappingArg = str | Sequence[int]


def resolve_mapping(mapping: MappingArg, n_layers: int, depth: int | None = None) -> list[int]:
    """Turn a mapping name or an explicit list into source indices, one per position.

    - ``"stack"``: g(l') = l' mod L, i.e. 0..L-1, 0..L-1, ... (the ScaleNet paper's default);
      ``depth`` need not be a multiple of L: the last repetition is cut short.
    - ``"interleave"``: each block repeated in place, g(l') = floor(l' · L / L'), i.e. 0,0,1,1,...
      for L' = 2L; ``depth`` must be a multiple of L so every block is repeated equally.
    - an explicit list of source indices (any order, repeats allowed; every index in [0, L)).

    ``depth`` defaults to 2L for names and to ``len(mapping)`` for lists (where it must agree).
    """
    if n_layers < 1:
        raise ValueError(f"layers is empty: growth needs at least one block (got {n_layers})")
    if depth is not None and (isinstance(depth, bool) or not isinstance(depth, int) or depth < 1):
        raise ValueError(f"depth must be a positive int or None (default 2L), got {depth!r}")
    if isinstance(mapping, str):
        target = 2 * n_layers if depth is None else depth
        if mapping == "stack":
            return [i % n_layers for i in range(target)]
        if mapping == "interleave":
            if target % n_layers:
                raise ValueError(
                    f"mapping='interleave' needs depth to be a multiple of the base depth L={n_layers} "
                    f"(got depth={target}); pass an explicit list for uneven repeats"
                )
            rep = target // n_layers
            return [i // rep for i in range(target)]
        raise ValueError(
            f"unknown mapping {mapping!r}: expected one of {MAPPING_NAMES} or a list of source indices"
        )
    if not isinstance(mapping, Sequence):
        raise TypeError(
            f"mapping must be one of {MAPPING_NAMES} or a list of ints, got {type(mapping).__name__}"
        )
    out = list(mapping)
    if not out:
        raise ValueError("mapping is empty: give at least one source index")
    for pos, src in enumerate(out):
        if isinstance(src, bool) or not isinstance(src, int):
            raise TypeError(
                f"mapping[{pos}]={src!r} ({type(src).__name__}): explicit mappings hold int source indices"
            )
        if not 0 <= src < n_layers:
            raise ValueError(
                f"mapping[{pos}]={src} is out of range: source indices must be in [0, {n_layers})"
            )
    if depth is not None and depth != len(out):
        raise ValueError(
            f"depth={depth} disagrees with the explicit mapping of length {len(out)}; "
            "pass depth=None or a mapping of that length"
        )
    return out
