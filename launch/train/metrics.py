"""What a run reports, rank 0 only: metrics.jsonl (one JSON object per record), plain progress
lines, and optionally TensorBoard and Weights & Biases.

- metrics.jsonl keeps the trainer's flat keys (`loss`, `lr`, `val_loss`, `eval/TASK/METRIC`,
  `mem_slots_read_frac`, ...); with the optimizers attached, each record also carries
  `lr/GROUP` for every optimizer group (`decay`, `no_decay`, `memory_values`).
- TensorBoard and W&B get namespaced tags (`tb_tag`): train/loss, train/lr/GROUP, val/loss,
  val/final_loss (metrics.jsonl's final_val_loss), eval/TASK/METRIC, memory/slots_read_frac.
- Progress lines (`ProgressReporter`): when train.progress=false or stdout is not a terminal (a
  SLURM log), each training record prints one line: step, loss, lr, tokens/s, ETA.
- A torn last line (disk full, a kill mid-write) is moved to metrics.jsonl.torn on resume, with a
  message, instead of making every later resume fail to parse the file.
- Costs (`RunCosts`), on every training record: `wall_s`, the wall-clock seconds of training summed
  over the run's jobs (carried in checkpoints, so time lost after the last checkpoint of a killed
  job is not counted), and `peak_mem_mb`, rank 0's peak memory of this job (CUDA: torch's peak
  allocation on the device; CPU: the process's peak resident set size).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import secrets
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from launch.runtime.errors import UserError

_NAMESPACES = ("train/", "val/", "eval/", "memory/")


def tb_tag(key: str) -> str:
    """The namespaced tag of a flat metrics.jsonl key."""
    if key.startswith(_NAMESPACES):
        return key
    if key.startswith("final_val_"):  # the end-of-training validation: val/final_loss beside val/loss
        return "val/final_" + key[len("final_val_") :]
    if key.startswith("val_"):
        return "val/" + key[4:]
    if key.startswith("mem_"):
        return "memory/" + key[4:]
    return "train/" + key  # loss, lr/GROUP, grad_norm, tokens, tokens_per_s, epoch


def _scalars(record: dict) -> dict[str, float]:
    """Namespaced scalars of a record; the bare `lr` only when no per-group LRs came with it."""
    per_group = any(k.startswith("lr/") for k in record)
    out = {}
    for k, v in record.items():
        if k == "step" or isinstance(v, bool) or not isinstance(v, int | float):
            continue
        if k == "lr":
            if per_group:
                continue
            k = "lr/decay"  # set_lr's return value: the main group's LR
        out[tb_tag(k)] = v
    return out


def split_torn(text: str) -> tuple[list[dict], list[str]]:
    """(records, unparsable lines) of a metrics.jsonl text."""
    records, torn = [], []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            torn.append(line)
    return records, torn


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class ProgressReporter:
    """One plain line per record, for logs read as files (no carriage returns, no bars)."""

    def __init__(self, total_steps: int | None = None, stream: TextIO | None = None):
        self.total = total_steps
        self.stream = stream
        self.start(0)

    def start(self, step: int) -> None:
        """The run (re)starts at `step`: the ETA counts from here."""
        self.start_step, self.start_time = step, time.perf_counter()

    def eta(self, step: int) -> str | None:
        done = step - self.start_step
        if not self.total or done <= 0:
            return None
        per_step = (time.perf_counter() - self.start_time) / done
        return _duration(per_step * max(self.total - step, 0))

    def line(self, record: dict) -> str | None:
        step = record.get("step")
        where = f"step {step}/{self.total}" if self.total else f"step {step}"
        if "loss" in record:
            parts = [where, f"loss {record['loss']:.4f}"]
            if "lr" in record:
                parts.append(f"lr {record['lr']:.2e}")
            if "tokens_per_s" in record:
                parts.append(f"{record['tokens_per_s']:,.0f} tok/s")
            eta = self.eta(step)
            if eta is not None:
                parts.append(f"ETA {eta}")
            return " | ".join(parts)
        if "val_loss" in record:
            ppl = math.exp(min(record["val_loss"], 50))
            extra = (
                f" over {record['val_sequences']} validation sequences" if "val_sequences" in record else ""
            )
            return f"{where} | val_loss {record['val_loss']:.4f} | val_ppl {ppl:.2f}{extra}"
        evals = {k: v for k, v in record.items() if k.startswith("eval/") and not k.endswith("/n")}
        if evals:
            return f"{where} | " + " ".join(f"{k[5:]}={v:.4g}" for k, v in evals.items())
        return None

    def report(self, record: dict) -> None:
        text = self.line(record)
        if text is not None:
            print(text, file=self.stream or sys.stdout, flush=True)


class Throughput:
    """Training tokens per second over a logging window. Time spent in `paused()` (validation,
    evaluation, checkpointing) is left out, so the rate after a validation describes training, not
    training plus validation."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.start, self.tokens, self.excluded = time.perf_counter(), 0, 0.0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    @contextlib.contextmanager
    def paused(self):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.excluded += time.perf_counter() - t0

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start - self.excluded, 1e-9)


def peak_memory_mb(device: Any = None) -> float:
    """This process's peak memory so far, in MiB: torch's peak allocation on a CUDA `device`, else the
    peak resident set size (ru_maxrss: KiB on Linux, bytes on macOS)."""
    if getattr(device, "type", None) == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 1024


class RunCosts:
    """`wall_s` and `peak_mem_mb` of a training record. `wall_s` counts from this job's start of
    training plus `wall_before` (what the resumed checkpoint recorded): the run's training time
    over all its jobs, up to now."""

    def __init__(self, device: Any = None, wall_before: float = 0.0):
        self.device, self.wall_before = device, wall_before
        self.start = time.perf_counter()

    def wall_s(self) -> float:
        return self.wall_before + time.perf_counter() - self.start

    def record(self) -> dict[str, float]:
        return {"wall_s": self.wall_s(), "peak_mem_mb": peak_memory_mb(self.device)}


def wants_plain_progress(progress: bool, stream: TextIO | None = None) -> bool:
    """Plain lines instead of a tqdm bar: progress turned off, or stdout is not a terminal."""
    stream = stream or sys.stdout
    return not progress or not (hasattr(stream, "isatty") and stream.isatty())


class MetricsLogger:
    """Rank 0's sink for every record the trainer logs.

    `cfg` (the run's Config) turns on what the run asks for: progress lines (train.progress /
    not a terminal, with train.steps for the ETA), TensorBoard (train.tensorboard), W&B
    (train.wandb). `optimizers` adds each group's LR to every training record."""

    def __init__(
        self,
        run_dir: str | Path,
        enabled: bool = True,
        tensorboard: bool = False,
        *,
        cfg: Any = None,
        optimizers: list | None = None,
        stream: TextIO | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "metrics.jsonl"
        self.enabled = enabled
        self.optimizers = optimizers or []
        self._file = None
        self._tb = None
        self._wandb = None
        train = getattr(cfg, "train", None)
        tensorboard = tensorboard or bool(getattr(train, "tensorboard", False))
        self.plain_progress = train is not None and wants_plain_progress(train.progress, stream)
        self.reporter = ProgressReporter(train.steps, stream) if self.plain_progress and enabled else None
        if not enabled:
            return
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise UserError(
                    "train.tensorboard=true needs the tensorboard package: pip install 'memscale[tensorboard]'"
                ) from None
            self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
        if getattr(train, "wandb", None):
            self._wandb = _start_wandb(train.wandb, self.run_dir, cfg)

    @property
    def wants_bar(self) -> bool:
        """Whether the trainer should draw its tqdm bar (a terminal, and progress on)."""
        return self.enabled and not self.plain_progress

    def repair(self) -> None:
        """Move unparsable lines (a torn tail) to metrics.jsonl.torn, saying so."""
        if not self.enabled or not self.path.is_file():
            return
        text = self.path.read_text(errors="replace")
        records, torn = split_torn(text)
        if not torn and (not text or text.endswith("\n")):
            return
        self._rewrite(records)
        if torn:
            with open(self.path.with_suffix(".jsonl.torn"), "a") as f:
                f.write("".join(line + "\n" for line in torn))
            print(
                f"{self.path}: moved {len(torn)} unparsable line(s) (a write cut short) to {self.path.name}.torn; "
                f"kept {len(records)} records",
                file=sys.stderr,
                flush=True,
            )

    def has_record(self, step: int, key: str) -> bool:
        """Whether metrics.jsonl holds a record of `step` with `key` (rank 0; False elsewhere)."""
        if not self.enabled or not self.path.is_file():
            return False
        records, _ = split_torn(self.path.read_text(errors="replace"))
        return any(r.get("step") == step and key in r for r in records)

    def _rewrite(self, records: list[dict]) -> None:
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
        os.replace(tmp, self.path)

    def set_aside(self) -> Path | None:
        """A run starting from step 0 over an existing, non-empty metrics.jsonl (its checkpoints were
        deleted, or none was ever written): move the old records to metrics.jsonl.N, never overwrite them."""
        if not self.enabled or not self.path.is_file() or self.path.stat().st_size == 0:
            return None
        n = 1
        while (old := self.path.with_name(f"{self.path.name}.{n}")).exists():
            n += 1
        os.replace(self.path, old)
        return old

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (after a resume they describe a future that was rolled back)
        and repair a torn tail. The trainer calls this when it (re)starts at `step`."""
        if self.reporter is not None:
            self.reporter.start(step)
        if not self.enabled or not self.path.is_file():
            return
        self.repair()
        records, _ = split_torn(self.path.read_text())
        keep = [r for r in records if r.get("step", 0) <= step]
        if len(keep) != len(records):
            self._rewrite(keep)

    def _with_group_lrs(self, record: dict) -> dict:
        if "lr" not in record or not self.optimizers:
            return record
        lrs = {}
        for opt in self.optimizers:
            for i, group in enumerate(opt.param_groups):
                lrs[f"lr/{group.get('name', f'group{i}')}"] = group["lr"]
        return {**record, **lrs}

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = self._with_group_lrs(record)
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.repair()  # never append to a torn line
            self._file = open(self.path, "a")  # noqa: SIM115 (held open across log calls; closed in close())
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self.reporter is not None:
            self.reporter.report(record)
        scalars = _scalars(record)
        if self._tb is not None:
            for tag, v in scalars.items():
                self._tb.add_scalar(tag, v, record["step"])
        if self._wandb is not None and scalars:
            self._wandb.log(scalars, step=record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None


def _start_wandb(project: str, run_dir: Path, cfg: Any):
    """A W&B run in `project` whose id is kept in RUN/wandb_id, so a resumed run continues it."""
    try:
        import wandb
    except ImportError:
        raise UserError(
            f"train.wandb={project} needs the wandb package: pip install 'memscale[wandb]'"
        ) from None
    from omegaconf import OmegaConf

    id_file = run_dir / "wandb_id"
    run_dir.mkdir(parents=True, exist_ok=True)
    if id_file.is_file():
        run_id = id_file.read_text().strip()
    else:
        run_id = secrets.token_hex(4)  # W&B ids: short, [a-z0-9]
        id_file.write_text(run_id + "\n")
    name = getattr(getattr(cfg, "run", None), "name", None) or run_dir.resolve().name
    config = OmegaConf.to_container(OmegaConf.structured(cfg)) if cfg is not None else None
    return wandb.init(project=project, name=name, id=run_id, resume="allow", dir=str(run_dir), config=config)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Every parsable record of RUN/metrics.jsonl (a torn line is skipped)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return split_torn(path.read_text(errors="replace"))[0]
