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
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def measure_training(config: str, overrides: list[str], steps: int, warmup: int, device: str = "cpu") -> dict:
    """Optimizer steps of the configured model on random tokens: tokens/s (median step time after
    warmup) and peak memory (CUDA allocator peak, or this process's peak RSS on CPU)."""
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
    times = []
    for i in range(warmup + steps):
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
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    times.sort()
    step_s = times[len(times) // 2]
    peak = torch.cuda.max_memory_allocated() if device == "cuda" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {
        "config": config,
        "overrides": overrides,
        "params": model.num_params(),
        "active_params": active_params(model),
        "batch": B,
        "seq_len": T,
        "step_s": step_s,
        "tokens_per_s": B * T / step_s,
        "peak_mem_mb": peak / 2**20,
    }


def measure_in_subprocess(config: str, overrides: list[str], steps: int, warmup: int, device: str) -> dict:
    """Each measurement in a fresh process so peak memory is its own."""
    code = (
        "import json,sys; sys.path.insert(0, 'benchmarks'); from common import measure_training; "
        f"print(json.dumps(measure_training({config!r}, {overrides!r}, {steps}, {warmup}, {device!r})))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


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


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for title, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt.format(**r) for _, fmt in columns) + " |\n" for r in rows)
