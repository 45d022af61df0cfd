"""The C++ CPU kernels (`torch.ops.memlayers_cpu`): built on first use, shared by every caller.

One extension from the sources in memlayers/csrc/ (one .cpp per op family, the row maths in
row_math.h), compiled with `torch.utils.cpp_extension` for the machine's vector ISA and cached in
TORCH_EXTENSIONS_DIR (later processes load the cached .so). Without a compiler, or with
MEMLAYERS_NO_CPP_EXT=1, `native_ops()` is None and every caller takes its pure-torch path; a failed
build says so once, as a warning.

Only this module builds or loads the extension, so the lookup, the key search and the optimizers
never import each other to reach the ops.
"""

from __future__ import annotations

import os
import platform
import threading
import warnings
from pathlib import Path

import torch

__all__ = ["DISABLE_ENV", "native_available", "native_ops"]

_CSRC_DIR = Path(__file__).parent / "csrc"
# One op family per file; row_math.h reaches the build through their #includes (ninja tracks it).
_SOURCES = [
    _CSRC_DIR / name
    for name in (
        "bag_forward.cpp",
        "bag_backward.cpp",
        "lazy_adam.cpp",
        "lazy_rowwise_adam.cpp",
        "product_topk.cpp",
        "selected_scores_backward.cpp",
        "unique_rows.cpp",
    )
]
DISABLE_ENV = "MEMLAYERS_NO_CPP_EXT"

_lock = threading.Lock()
_native: dict[str, object] = {}


def _isa_flags() -> tuple[str, list[str]]:
    """Vector ISA to compile for. Part of the extension name, so a cache directory shared
    between machines never hands an AVX2 build to a CPU without AVX2."""
    if platform.machine() not in ("x86_64", "AMD64"):
        return "generic", []
    try:
        flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split()
    except (OSError, IndexError):
        return "generic", []
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if {"avx512f", "avx512bw", "avx512vl", "avx2", "fma", "f16c"} <= set(flags):
        # 512-bit vectors for the row kernels' sqrt/div-heavy Adam replays (measured ~20% faster than
        # AVX2 on a Zen 4 EPYC); gcc keeps 256-bit vectors unless told otherwise.
        return "avx512", ["-mavx512f", "-mavx512bw", "-mavx512vl", *avx2, "-mprefer-vector-width=512"]
    if {"avx2", "fma", "f16c"} <= set(flags):
        return "avx2", avx2
    return "generic", []


def native_ops():
    """The compiled `torch.ops.memlayers_cpu` namespace, or None when unavailable.

    Builds the extension on first call (once per machine; later processes load the cached
    .so). Failure to build is reported once as a warning, then the torch path is used.
    """
    with _lock:
        if "ops" in _native:
            return _native["ops"]
        ops = None
        if os.environ.get(DISABLE_ENV, "0") in ("", "0"):
            isa, isa_flags = _isa_flags()
            try:
                from torch.utils.cpp_extension import load

                load(
                    name=f"memlayers_cpu_{isa}",
                    sources=[str(s) for s in _SOURCES],
                    extra_cflags=["-O3", "-fopenmp", "-fopenmp-simd", "-fno-math-errno", *isa_flags],
                    extra_ldflags=["-fopenmp"],
                    is_python_module=False,
                    verbose=False,
                )
                ops = torch.ops.memlayers_cpu
            except Exception as err:  # any build/load failure: compiler missing, headers, linker
                warnings.warn(
                    f"memlayers: could not build the C++ CPU kernels ({type(err).__name__}: {err}); "
                    f"using the slower pure-torch path. Set {DISABLE_ENV}=1 to silence this.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        _native["ops"] = ops
        return ops


def native_available() -> bool:
    return native_ops() is not None
