"""What the machine offers that changes a default: bf16 matrix units."""

from __future__ import annotations

from pathlib import Path

CPU_FLAGS = Path("/proc/cpuinfo")


def cpu_flags(cpuinfo: Path = CPU_FLAGS) -> set[str]:
    """The feature flags of the first CPU in /proc/cpuinfo (empty where there is none: not Linux)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return set(value.split())
    return set()


def bf16_matmul_unit(cpuinfo: Path = CPU_FLAGS) -> str | None:
    """A name for the unit that makes bf16 matrix products faster than fp32 here, or None: a CUDA
    device with bf16, or a CPU with AMX-BF16 tiles (Intel Sapphire Rapids and later). AVX512-BF16
    alone is not counted: it converts and dots in vector registers, where the quickstart's small
    models measure no faster than fp32."""
    import torch

    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return f"CUDA bf16 ({torch.cuda.get_device_name()})"
    if "amx_bf16" in cpu_flags(cpuinfo):
        return "CPU with AMX-BF16 matrix units"
    return None


# bf16 autocast pays where the matrix products are large enough for the matrix units: measured on a
# 2-core Xeon with AMX-BF16, width 512 (configs/quickstart_dense.yaml) trains 1.8x faster than fp32,
# width 64 (configs/quickstart/) 0.9x (docs/performance.md).
BF16_MIN_DIM = 512


def auto_dtype(dim: int, cpuinfo: Path = CPU_FLAGS) -> tuple[str, str]:
    """(train.dtype, why) for a model `dim` wide: bf16 where a bf16 matrix unit exists and the model
    is wide enough to use it, else fp32."""
    unit = bf16_matmul_unit(cpuinfo)
    if unit is None:
        return "fp32", "no bf16 matrix unit found"
    if dim < BF16_MIN_DIM:
        return "fp32", f"{unit}, but at width {dim} < {BF16_MIN_DIM} bf16 measured no faster"
    return "bf16", unit
