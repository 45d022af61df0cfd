"""The benchmark harness: the machine a result was measured on, one result record and its writer, the
shared argument parser, and the measurement helpers (training steps, alternating timings). Every
benchmark imports it as `benchmarks.harness`; the launch modules the benchmarks train with are imported
here (`_training_step`)."""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
REPO = RESULTS.parents[1]


def machine() -> dict:
    """The machine a result was measured on. `cpu` alone can be as vague as "AMD EPYC", so the x86 family
    and model and the vector ISA are kept too (two boxes of one name differed 1.8x in bandwidth). `cpu`
    keeps its old form (model name, family, model, widest ISA) for the readers of earlier records."""
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
    model = fields.get("model name", cpu)
    flags = set(fields.get("flags", "").split())
    isa = [
        name
        for flag, name in (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("amx_tile", "AMX"))
        if flag in flags
    ]
    if "AVX-512" in isa:
        isa.remove("AVX2")  # AVX-512 implies it; the widest one names the machine
    info = {"cpu": model, "cpu_model": model, "cores": os.cpu_count(), "isa": isa}
    if "cpu family" in fields:
        info["cpu"] += (
            f" (family {fields['cpu family']} model {fields.get('model', '?')}, {isa[0] if isa else 'no AVX2'})"
        )
        info["cpu_family"], info["cpu_model_number"] = int(fields["cpu family"]), int(fields.get("model", -1))
    info |= {"torch_threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _amd_core(family: int, model: int) -> str | None:
    """AMD's core generation from the x86 family and model (what tells two "AMD EPYC" boxes apart)."""
    if family == 23:
        return "zen2" if model >= 0x30 else "zen1"
    if family == 25:
        return "zen4" if 0x10 <= model <= 0x1F or 0x60 <= model <= 0xAF else "zen3"
    if family == 26:
        return "zen5"
    return None


def machine_slug(m: dict) -> str:
    """A short folder name for the machine of a record: vendor line, core generation where the record
    knows it, vector ISA (and AMX), GPU: `xeon_avx512_amx`, `epyc_zen3_avx2`. Reads both this harness's
    records and older ones, whose only trace of the machine is a string such as
    "AMD EPYC (family 25 model 1, AVX2)" (or "AMD EPYC" alone: slug `epyc`, generation unknown)."""
    text = m.get("cpu") or m.get("cpu_model") or "unknown"
    low = text.lower()
    line = next((w for w in ("epyc", "xeon", "ryzen", "threadripper", "core", "neoverse") if w in low), None)
    parts = [line or re.sub(r"[^a-z0-9]+", "_", low.split("(")[0]).strip("_")[:24] or "unknown"]
    family, model = m.get("cpu_family"), m.get("cpu_model_number")
    found = re.search(r"family (\d+) model (\d+)", text)
    if family is None and found:
        family, model = int(found[1]), int(found[2])
    if family is not None and ("amd" in low or line in ("epyc", "ryzen", "threadripper")):
        parts.append(_amd_core(family, model) or f"f{family}m{model}")
    isa = m.get("isa")
    if isa is None:  # older records: the ISA is inside the `cpu` string, when at all
        isa = [name for name in ("AVX-512", "AVX2") if f", {name})" in text][:1]
    parts += [name.lower().replace("-", "") for name in isa]
    gpu = m.get("gpu") or m.get("cuda_device")
    if gpu:
        parts.append(
            re.sub(r"[^a-z0-9]+", "", gpu.lower().replace("nvidia", "").split()[0] if gpu.split() else gpu)
        )
    return "_".join(p for p in parts if p)


def default_out() -> Path:
    """Where a benchmark run on this machine files its results: benchmarks/results/<machine slug>/."""
    return RESULTS / machine_slug(machine())


def git_sha() -> str | None:
    """The commit the measured code is at (None outside a git checkout); `-dirty` when files differ from it."""
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, check=True)  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return None
    return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def parser(doc: str | None) -> argparse.ArgumentParser:
    """The argument parser every benchmark starts from: its docstring as help, `--quick` (tiny sizes, a
    smoke run whose numbers mean nothing) and `--out` (a folder; `--out-dir` is the older spelling)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run, meaningless numbers")
    ap.add_argument("--out", "--out-dir", dest="out", type=results_dir, default=None,
                    help="folder for NAME.json and NAME.md (default benchmarks/results/<this machine>/)")  # fmt: skip
    return ap


def record(
    name: str, args: argparse.Namespace | dict, rows: list, machine_info: dict | None = None, **extra
) -> dict:
    """The one result record of every benchmark: {name, date, git_sha, machine, args, rows}, plus the
    fields a script wrote before this record existed (kept under their names, so their readers work)."""
    args = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    return {
        "name": name,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_sha": git_sha(),
        "machine": machine_info or machine(),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in args.items()},
        "rows": rows,
        **extra,
    }


def write_record(rec: dict, markdown: str, out_dir: Path | None = None) -> Path:
    """Writes `rec` as <out>/<name>.json and `markdown` as <out>/<name>.md (default out: this machine's
    results folder) and prints the Markdown. Returns the JSON's path."""
    out_dir = Path(out_dir) if out_dir is not None else RESULTS / machine_slug(rec["machine"])
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{rec['name']}.json"
    path.write_text(json.dumps(rec, indent=2) + "\n")
    (out_dir / f"{rec['name']}.md").write_text(markdown)
    print(markdown)
    return path


def _training_step(config: str, overrides: list[str], device: str):
    """Build the configured model and its optimizers; returns (one optimizer step on random tokens, info).
    The step is the trainer's (launch.train.trainer.Trainer.train_step with one micro-batch): forward,
    backward, the global-norm clip at optim.grad_clip (the value tables' gradients included unless
    memory.clip_values=false), then every optimizer's step."""
    from launch.config import load_config, validate
    from launch.distributed.grad_norm import grad_norm_and_clip
    from launch.models.build import active_params, build_model
    from launch.train.optim import build_optimizers
    from launch.train.validation import cross_entropy
    from memlayers.shard_layout import MemoryShardLayout

    cfg = load_config([f"config={config}", *overrides])
    validate(cfg)
    torch.manual_seed(0)
    model = build_model(cfg).to(device)
    model.init_weights()
    opts = build_optimizers(model, cfg)
    layout = MemoryShardLayout(model)
    params = [p for o in opts for g in o.param_groups for p in g["params"]]
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
        grad_norm_and_clip(params, cfg.optim.grad_clip, layout, cfg.memory.clip_values)
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
    return (
        torch.cuda.max_memory_allocated()
        if device == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )


def measure_training(config: str, overrides: list[str], steps: int, warmup: int, device: str = "cpu") -> dict:
    """Optimizer steps of the configured model on random tokens: tokens/s (median step time after
    warmup) and peak memory (CUDA allocator peak, or this process's peak RSS on CPU)."""
    step, info = _training_step(config, overrides, device)
    for _ in range(warmup):
        step()
    times = sorted(step() for _ in range(steps))
    step_s = times[len(times) // 2]
    tokens = info["batch"] * info["seq_len"]
    return {
        **info,
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "peak_mem_mb": _peak_mem(device) / 2**20,
    }


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
    config: str,
    overrides: list[str],
    steps: int,
    warmup: int,
    device: str,
    paired_with: list[str] | None = None,
) -> dict:
    """Each measurement in a fresh process so peak memory is its own. With `paired_with` (the base
    model's overrides), `measure_training_paired` in that process."""
    call = (
        f"measure_training({config!r}, {overrides!r}, {steps}, {warmup}, {device!r})"
        if paired_with is None
        else f"measure_training_paired({config!r}, {overrides!r}, {paired_with!r}, {steps}, {warmup}, {device!r})"
    )
    code = f"import json; from benchmarks.harness import measure_training, measure_training_paired; print(json.dumps({call}))"
    # From the repo root, so `benchmarks` (and the configs' relative paths) resolve as in this process.
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    return json.loads(out.stdout.strip().splitlines()[-1])


def native_ops_or_exit(script: str):
    """The C++ kernels (`torch.ops.memlayers_cpu`), or exit with a message: for benchmarks that compare
    them and have nothing to measure without them."""
    from memlayers.native import native_ops

    ops = native_ops()
    if ops is None:
        raise SystemExit(
            f"{script}: the C++ extension did not build (memlayers.lookup_cpu.native_ops() is None)"
        )
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


def fmt_ms(ms: float) -> str:
    """A measured time for a Markdown table: 0.1 ms resolution from 1 ms up, 2 significant digits below,
    so a sub-0.05 ms time on a fast CPU does not print as 0.0. Results keep the unrounded value."""
    return f"{ms:.1f}" if ms >= 1 else f"{ms:.2g}"


def md_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    head = "| " + " | ".join(title for title, _ in columns) + " |\n|" + "---|" * len(columns) + "\n"
    return head + "".join("| " + " | ".join(fmt.format(**r) for _, fmt in columns) + " |\n" for r in rows)
