"""Shared measurement helpers for the benchmark scripts (run them from the repo root)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """The machine a result was measured on. `cpu` alone can be as vague as "AMD EPYC", so the x86 family
    and model and the widest vector ISA are kept too (two boxes of one name differed 1.8x in bandwidth)."""
    cpu = platform.processor() or platform.machine()
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if not sep:
                if fields:
                    break  # the first processor's block is enough
                continue
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    cpu = fields.get("model name", cpu)
    if "cpu family" in fields:
        flags = set(fields.get("flags", "").split())
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
        cpu += f" (family {fields['cpu family']} model {fields.get('model', '?')}, {isa})"
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _training_step(config: str, overrides: list[str], device: str):
    """Build the configured model and its optimizers; returns (one optimizer step on random tokens, info)."""
    from launch.build import active_params, build_model
    from launch.config import load_config, validate
    from launch.optim import build_optimizers
    from launch.validation import cross_entropy

    cfg = load_config([f"config={config}", *overrides])
    validate(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    model.init_weights()
    opts = build_optimizers(model, cfg)
    B, T = cfg.data.batch_size, cfg.data.seq_len
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=cfg.train.dtype == "bf16")

    def step() -> float:
        tokens = torch.randint(0, cfg.model.vocab_size, (B, T + 1), device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with autocast:
            loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    info = {
        "config": config,
        "overrides": overrides,
        "params": model.num_params(),
        "active_params": active_params(model),
        "batch": B,
        "seq_len": T,
    }
    return step, info


def _peak_mem(device: str) -> float:
    """Peak memory so far in bytes: CUDA allocator peak, or this process's peak RSS on CPU."""
    return torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_training(config: str, overrides: list[str], steps: int, warmup: int, device: str = "cpu") -> dict:
    """Optimizer steps of the configured model on random tokens: tokens/s (median step time after
    warmup) and peak memory (CUDA allocator peak, or this process's peak RSS on CPU)."""
    step, info = _training_step(config, overrides, device)
    for _ in range(warmup):
        step()
    times = sorted(step() for _ in range(steps))
    step_s = times[len(times) // 2]
    tokens = info["batch"] * info["seq_len"]
    return {**info, "step_s": step_s, "tokens_per_s": tokens / step_s, "peak_mem_mb": _peak_mem(device) / 2**20}


def measure_training_paired(
    config: str, overrides: list[str], base_overrides: list[str], steps: int, warmup: int, device: str = "cpu"
) -> dict:
    """The model of `overrides` against the one of `base_overrides` in ONE process, steps alternating
    (A, B, A, B, ...): both see the same machine state, so their ratio is not at the mercy of other jobs
    drifting between two separate runs (separate runs of one model moved by 10% on a shared 2-core box).
    `relative_paired` is the median over pairs of base step time / step time. Peak memory is read after
    the measured model's warmup, before the base model is built, so it is that model's own."""
    step, info = _training_step(config, overrides, device)
    for _ in range(warmup):
        step()
    peak = _peak_mem(device)
    base_step, _ = _training_step(config, base_overrides, device)
    for _ in range(warmup):
        base_step()
    pairs = []  # (step time, base step time); which runs first alternates
    for i in range(steps):
        if i % 2 == 0:
            t = step()
            b = base_step()
        else:
            b = base_step()
            t = step()
        pairs.append((t, b))
    ts = sorted(t for t, _ in pairs)
    tb = sorted(b for _, b in pairs)
    ratios = sorted(b / t for t, b in pairs)
    tokens = info["batch"] * info["seq_len"]
    return {
        **info,
        "step_s": ts[len(ts) // 2],
        "tokens_per_s": tokens / ts[len(ts) // 2],
        "base_tokens_per_s_paired": tokens / tb[len(tb) // 2],
        "relative_paired": ratios[len(ratios) // 2],
        "relative_paired_range": [ratios[0], ratios[-1]],
        "peak_mem_mb": peak / 2**20,
    }


def alternating_ms(runs: dict[str, Callable[[], float]], reps: int, warmup: int = 2) -> list[dict]:
    """Times several methods rep by rep in turn (A, B, A, B, ...), so drift on a shared machine hits all
    alike. Each callable runs one rep and returns its own time in ms (so it can leave set-up out).
    Returns one row per method, in order: median `ms`, `min_ms`, and `speedup` over the first method."""
    for run in [*runs.values()] * warmup:
        run()
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(reps):
        for name, run in runs.items():
            times[name].append(run())
    rows = []
    for name, ts in times.items():
        ts.sort()
        rows.append({"method": name, "ms": ts[len(ts) // 2], "min_ms": ts[0]})
    for r in rows:
        r["speedup"] = rows[0]["ms"] / r["ms"]
    return rows


def measure_in_subprocess(
    config: str, overrides: list[str], steps: int, warmup: int, device: str, paired_with: list[str] | None = None
) -> dict:
    """Each measurement in a fresh process so peak memory is its own. With `paired_with` (the base
    model's overrides), `measure_training_paired` in that process."""
    call = (
        f"measure_training({config!r}, {overrides!r}, {steps}, {warmup}, {device!r})"
        if paired_with is None
        else f"measure_training_paired({config!r}, {overrides!r}, {paired_with!r}, {steps}, {warmup}, {device!r})"
    )
    code = (
        "import json,sys; sys.path.insert(0, 'benchmarks'); "
        f"from common import measure_training, measure_training_paired; print(json.dumps({call}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def native_ops_or_exit(script: str):
    """The C++ kernels (`torch.ops.memlayers_cpu`), or exit with a message: for benchmarks that compare
    them and have nothing to measure without them."""
    from memlayers.lookup_cpu import native_ops

    ops = native_ops()
    if ops is None:
        raise SystemExit(f"{script}: the C++ extension did not build (memlayers.lookup_cpu.native_ops() is None)")
    return ops


def results_dir(value: str) -> Path:
    """argparse type of --out: a folder (NAME.json and NAME.md are written inside it). Checked when the
    arguments are parsed, so a file path fails at once instead of after minutes of measuring."""
    path = Path(value)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{value} is a file; --out takes a folder (the results are written as <name>.json and <name>.md in it)"
        )
    return path


def write_results(name: str, payload: dict, markdown: str, out_dir: Path = RESULTS) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown)
    print(markdown)


def fmt_ms(ms: float) -> str:
    """A measured time for a Markdown table: 0.1 ms resolution from 1 ms up, 2 significant digits below,
    so a sub-0.05 ms time on a fast CPU does not print as 0.0. Results keep the unrounded value."""
    return f"{ms:.1f}" if ms >= 1 else f"{ms:.2g}"


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for title, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt.format(**r) for _, fmt in columns) + " |\n" for r in rows)
