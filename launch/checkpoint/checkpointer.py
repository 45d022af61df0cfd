"""Sharded, resumable, self-checking checkpoints of a training run (torch.distributed.checkpoint).

    run.dir/checkpoints/step_N/
        state/               DCP directory: model tensors under `model/<name>`, optimizer tensors
                             under `optim<i>/<param name>/<stat>`; every rank writes only its own
                             shards (FSDP2 shards, memory-value column shards as Shard(1) DTensors)
          .metadata          read through launch.dcp_reader's allowlisted unpickler
          __<rank>_<i>.distcp
        trainer_state.json   step, tokens, data position, world size and layout, tensor aliases
        rng.pt               rank 0's RNG state (a plain tensor)
        config.yaml          the resolved config: every other command needs only this directory
        tokenizer.model
        manifest.json        size and sha256 of every other file; written last

A checkpoint is assembled in a hidden temporary directory and renamed into place only when complete
(and only when every saved tensor is finite); `train.keep_last` prunes older ones afterwards.
Loading verifies the manifest, reshards to the loading run's layout (any world size, P, T, data
parallel kind) and never unpickles code. A damaged newest checkpoint is skipped with a one-line
warning for the newest intact one; with none intact the run stops with one line naming the damage,
never restarting from step 0 over an existing run.

Directories written by older versions (model.safetensors + optimizer.pt) are read too (converted on
read); they carry no manifest.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launch.checkpoint import format as legacy
from launch.checkpoint import manifest
from launch.checkpoint.safe_metadata import (
    METADATA_FILE,
    SafeFileSystemReader,
    SafeLoadPlanner,
    read_metadata_file,
    tensor_entries,
)
from launch.runtime.errors import TrainingError, UserError
from launch.runtime.faults import fault

STATE_DIR = "state"
TRAINER_STATE = "trainer_state.json"
FORMAT = 2  # trainer_state.json "format": 2 = DCP state/ directory (1 / absent = model.safetensors)

# {parameter name: (process group, dim, full shape)}: parameters stored as plain local slices that
# checkpoints must see as sharded (memory-value column shards; hand-split tensor-parallel weights).
LocalShards = dict[str, tuple[Any, int, tuple[int, ...]]]


# ---------------------------------------------------------------------------------------------
# Collectives that degrade to no-ops in one process


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _all_ranks(obj: Any) -> list[Any]:
    if not _dist():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def _from_rank0(obj: Any) -> Any:
    if not _dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


# ---------------------------------------------------------------------------------------------
# Flat state: one dict of tensors (DTensors where sharded) that DCP saves and loads in place


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


class StateAdapter:
    """How the checkpointer gets and puts a parallelized model's and optimizers' state dicts, with
    every sharded tensor a DTensor (FSDP2 shards and DTensor TP weights already are). This default
    uses torch's `get/set_model_state_dict` and wraps the plain local slices named in `local_shards`
    as DTensors of their logical shape; launch.parallelize provides one built from its mesh."""

    def __init__(self, local_shards: LocalShards | None = None):
        self.specs = dict(local_shards or {})
        self._meshes: dict[int, Any] = {}

    def model_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return {k: self._wrap(k, v, None) for k, v in get_model_state_dict(model).items()}

    def load_model_state(self, model: nn.Module, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(model, {k: self._unwrap(k, v) for k, v in state.items()})

    def optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer) -> dict:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        osd = get_optimizer_state_dict(model, opt)
        shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
        # New dicts: the per-parameter dicts torch returns are the optimizer's live `opt.state[p]`.
        osd["state"] = {
            name: {stat: self._wrap(name, v, shapes.get(name)) if isinstance(v, torch.Tensor) else v for stat, v in stats.items()}
            for name, stats in osd["state"].items()
        }
        return osd

    def load_optimizer_state(self, model: nn.Module, opt: torch.optim.Optimizer, osd: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        state = {name: {stat: self._unwrap(name, v) for stat, v in stats.items()} for name, stats in osd["state"].items()}
        set_optimizer_state_dict(model, opt, {**osd, "state": state})

    def _wrap(self, name: str, t: torch.Tensor, param_shape: tuple[int, ...] | None) -> torch.Tensor:
        spec = self.specs.get(_canonical(name))
        if spec is None or hasattr(t, "to_local") or t.dim() == 0:
            return t
        if param_shape is not None and tuple(t.shape) != tuple(param_shape):
            return t  # a statistic of a sharded parameter that does not have its shape
        from torch.distributed.device_mesh import DeviceMesh
        from torch.distributed.tensor import DTensor, Shard

        group, dim, full = spec
        if id(group) not in self._meshes:
            self._meshes[id(group)] = DeviceMesh.from_group(group, t.device.type)
        full = tuple(full)
        stride = torch.empty(full, device="meta").stride()
        return DTensor.from_local(t, self._meshes[id(group)], [Shard(dim)], run_check=False, shape=full, stride=stride)

    def _unwrap(self, name: str, t: Any) -> Any:
        return _local(t) if _canonical(name) in self.specs and isinstance(t, torch.Tensor) else t


def _canonical(name: str) -> str:
    return legacy._unwrap_name(name)


def flat_state(
    model: nn.Module, optimizers: list[torch.optim.Optimizer], adapter: StateAdapter
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, torch.Tensor], list[dict]]:
    """(flat tensors keyed model/<name> and optim<i>/<name>/<stat>, aliases, model state, optimizer
    state dicts). Each tied tensor is kept once (under its first name; the others are aliases).

    The tensors share storage with the live model and optimizers, so DCP loads into them in place."""
    model_state = adapter.model_state(model)
    aliases = {_canonical(k): _canonical(v) for k, v in legacy.alias_map(model).items()}
    flat = {f"model/{k}": v for k, v in model_state.items() if k not in aliases}
    optim_states = []
    for i, opt in enumerate(optimizers):
        osd = adapter.optimizer_state(model, opt)
        optim_states.append(osd)
        for name, stats in osd["state"].items():
            for stat, v in stats.items():
                if isinstance(v, torch.Tensor):
                    flat[f"optim{i}/{name}/{stat}"] = v
    return flat, aliases, model_state, optim_states


def nonfinite_entry(flat: dict[str, torch.Tensor]) -> str | None:
    """The first saved tensor (on any rank) holding inf/NaN, or None. Collective."""
    bad = None
    for key, t in flat.items():
        local = _local(t)
        # In chunks: isfinite over a whole 2 GiB table allocates ~1.75x its size in temporaries.
        if local.is_floating_point() and not all(bool(torch.isfinite(c).all()) for c in local.reshape(-1).split(1 << 22)):
            bad = key
            break
    found = [b for b in _all_ranks(bad) if b]
    return found[0] if found else None


# ---------------------------------------------------------------------------------------------
# Atomic directories


def fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())


def commit_directory(tmp: Path, final: Path) -> None:
    """Rename a complete `tmp` to `final`, replacing an existing `final` only once `tmp` is in place."""
    fsync_tree(tmp)
    if final.exists():
        old = final.parent / f".old_{final.name}_{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    try:
        fd = os.open(final.parent, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:
        pass


def write_failure(final: Path, e: BaseException) -> UserError:
    lines = str(e).strip().splitlines()
    reason = getattr(e, "strerror", None) or (lines[0] if lines else type(e).__name__)
    where = getattr(e, "filename", None) or final
    return UserError(f"cannot write checkpoint {final} ({where}: {reason}); the previous checkpoints are kept")


# ---------------------------------------------------------------------------------------------
# Integrity


def checkpoint_problem(ckpt: Path, part: tuple[int, int] = (0, 1)) -> str | None:
    """What is wrong with a checkpoint directory (first damaged file), or None when it is intact."""
    if not (ckpt / TRAINER_STATE).is_file():
        return f"{ckpt / TRAINER_STATE}: missing"
    files = manifest.read_manifest(ckpt)
    if files is None:
        return None if (ckpt / legacy.MODEL_FILE).is_file() else f"{ckpt / manifest.MANIFEST_FILE}: missing"
    return manifest.verify(ckpt, files, part)


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / TRAINER_STATE
    try:
        state = json.loads(path.read_text())
        if not isinstance(state, dict):
            raise ValueError("not a JSON object")
        return state
    except (OSError, ValueError) as e:
        raise UserError(f"unreadable checkpoint state {path}: {e}") from None


def _checked_aliases(ckpt: Path, aliases: Any, known: set[str]) -> dict[str, str]:
    """The alias map of a checkpoint, refusing a tampered one in one line."""
    if not isinstance(aliases, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()):
        raise UserError(f"{ckpt / TRAINER_STATE}: 'aliases' must map tensor names to tensor names")
    for alias, canon in aliases.items():
        if canon not in known or alias in known:
            raise UserError(
                f"{ckpt / TRAINER_STATE}: alias {alias!r} -> {canon!r} does not match the stored tensors (tampered or damaged)"
            )
    return aliases


def is_dcp_checkpoint(ckpt: Path) -> bool:
    return (ckpt / STATE_DIR).is_dir()


# ---------------------------------------------------------------------------------------------
# One-process readers (eval, grow, convert, init_from)


def read_model_state(ckpt: Path, model: nn.Module) -> None:
    """Load the weights of checkpoint `ckpt` into an unsharded `model` on this process alone,
    whatever world size and layout saved it (DCP assembles the full tensors)."""
    problem = checkpoint_problem(ckpt)
    if problem:
        raise UserError(f"checkpoint {ckpt} is damaged: {problem}")
    if not is_dcp_checkpoint(ckpt):
        state, _ = legacy.load_model_file(ckpt / legacy.MODEL_FILE)
        legacy.check_model_state(model, state, str(ckpt / legacy.MODEL_FILE))
        model.load_state_dict(state)
        return
    meta = read_metadata_file(ckpt / STATE_DIR / METADATA_FILE)
    stored = {k[len("model/"):]: v for k, v in tensor_entries(meta).items() if k.startswith("model/")}
    aliases = _checked_aliases(ckpt, read_trainer_state(ckpt).get("aliases", {}), set(stored))
    own = {legacy._unwrap_name(k): v for k, v in model.state_dict().items()}
    _check_shapes(ckpt, {k: v.shape for k, v in own.items() if k not in aliases}, {k: s for k, (s, _) in stored.items()})
    targets = {f"model/{k}": v for k, v in own.items() if k not in aliases}
    _dcp_load(targets, ckpt, no_dist=True)


def _check_shapes(ckpt: Path, expected: dict[str, Any], stored: dict[str, tuple[int, ...]]) -> None:
    legacy.check_shapes(str(ckpt / STATE_DIR), {k: tuple(v) for k, v in expected.items()}, stored)


def _dcp_load(targets: dict[str, torch.Tensor], ckpt: Path, no_dist: bool = False) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.load(
                targets,
                storage_reader=SafeFileSystemReader(ckpt / STATE_DIR),
                planner=SafeLoadPlanner(allow_partial_load=False),
                no_dist=no_dist,
            )
    except UserError:
        raise
    except (CheckpointException, RuntimeError, OSError, EOFError, ValueError, KeyError, AssertionError) as e:
        first = str(e).strip().splitlines()
        raise UserError(f"checkpoint {ckpt / STATE_DIR} could not be read ({first[-1] if first else type(e).__name__})") from None


def write_model_checkpoint(
    out: Path,
    model: nn.Module,
    trainer_state: dict[str, Any],
    config_yaml: str,
    tokenizer_path: Path,
    extra_files: dict[str, str] | None = None,
    *,
    command: str,
    overwrite: bool = False,
    sources: tuple = (),
) -> Path:
    """A weights-only checkpoint directory in the training format, from one process (launch.grow,
    launch.convert from-hf). The output rules are launch.outputs' (never inside a source; overwrite=true
    replaces only an earlier output of the same command); the content is written into a temp dir,
    manifest last, and renamed into place."""
    import torch.distributed.checkpoint as dcp

    from launch.runtime.outputs import output_dir

    out = Path(out)
    aliases = {_canonical(k): _canonical(v) for k, v in legacy.alias_map(model).items()}
    state = {f"model/{_canonical(k)}": v.detach() for k, v in model.state_dict().items() if _canonical(k) not in aliases}
    with output_dir(out, command=command, overwrite=overwrite, sources=sources) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / STATE_DIR), no_dist=True)
            (tmp / "config.yaml").write_text(config_yaml)
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "format": FORMAT, "aliases": aliases}, indent=2))
            manifest.write_manifest(tmp, manifest.digest_files(tmp, manifest.all_files(tmp)))
            fsync_tree(tmp)
        except (OSError, RuntimeError) as e:  # torch.save/DCP report a short write as RuntimeError
            raise write_failure(out, e) from None
    return out


# ---------------------------------------------------------------------------------------------
# The checkpointer the trainer uses


class Checkpointer:
    """Save, find and load a run's checkpoints. `save` and `load` are collective (every rank calls
    them); `latest_intact` too when a process group is up (ranks split the checksum work)."""

    def __init__(self, run_dir: str | Path, keep_last: int = 1, *, async_save: bool = False, every: int = 0):
        self.run_dir = Path(run_dir)
        self.root = legacy.checkpoint_dir(run_dir)
        self.keep_last = max(1, keep_last)
        self.async_save = async_save
        self.every = every  # train.ckpt_every; 0: only at the last step and on pre-emption
        self._pending: tuple[Any, Path, Path, int] | None = None
        self._async_group = None
        self.last_save_blocking_s = 0.0  # seconds the last save() held the training loop
        if threading.current_thread() is threading.main_thread() and hasattr(signal, "SIGXFSZ"):
            # `ulimit -f`: a write past the limit fails with EFBIG (named, kept going) instead of
            # killing the process with SIGXFSZ.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def due(self, step: int, *, last: bool, preempted: bool = False) -> bool:
        """Whether the trainer saves after `step`: every `every` steps, at the last step, and when
        pre-empted (so the run resumes where it stopped)."""
        return bool(self.every and step % self.every == 0) or last or preempted

    # -- finding ---------------------------------------------------------------------------------

    def candidates(self) -> list[tuple[int, Path]]:
        """Every step_N directory (complete or not), oldest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = legacy.STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest_intact(self, warn: bool = True) -> Path | None:
        """The newest checkpoint whose files match its manifest. A damaged newer one is skipped with a
        one-line warning; if checkpoints exist but none is intact, a UserError naming the damage."""
        found = self.candidates()
        world = dist.get_world_size() if _dist() else 1
        damaged: list[str] = []
        for _step, path in reversed(found):
            problems = [p for p in _all_ranks(checkpoint_problem(path, (_rank(), world))) if p]
            if not problems:
                if damaged and warn and _rank() == 0:
                    print(f"warning: skipping damaged checkpoint(s): {'; '.join(damaged)}; resuming from {path}", file=sys.stderr, flush=True)
                return path
            damaged.append(problems[0])
        if damaged:
            raise UserError(
                f"no intact checkpoint in {self.root}: {'; '.join(damaged[:3])}. Delete the damaged checkpoint "
                "directories to start this run over, or restore them"
            )
        return None

    # -- saving ----------------------------------------------------------------------------------

    def save(
        self,
        step: int,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        extra_state: dict[str, Any],
        config_yaml: str,
        tokenizer_path: Path | None,
        adapter: StateAdapter | None = None,
    ) -> Path:
        """Write checkpoint step_N (collective). With async_save the tensors are staged in memory and
        written in the background; the directory is committed at the next save/wait."""
        t0 = time.perf_counter()
        self.wait()
        flat, aliases, _, _ = flat_state(model, optimizers, adapter or StateAdapter())
        bad = nonfinite_entry(flat)
        final = self.root / f"step_{step}"
        if bad:
            good = self.newest_intact()
            raise TrainingError(
                f"non-finite values in {bad.split('/', 1)[-1]} at step {step}: not checkpointed. "
                f"Newest finite checkpoint: {good or 'none'}"
            )
        tmp = self._make_tmp(step)
        trainer_state = {**extra_state, "step": step, "format": FORMAT, "aliases": aliases}
        ok = None
        if _rank() == 0:
            try:
                self._write_small_files(tmp, trainer_state, config_yaml, tokenizer_path)
            except (OSError, RuntimeError) as e:  # torch.save reports a short write as RuntimeError
                ok = str(write_failure(final, e))
        self._raise_if_failed(_from_rank0(ok), tmp)
        import torch.distributed.checkpoint as dcp

        writer = dcp.FileSystemWriter(tmp / STATE_DIR, sync_files=True)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self.async_save:
                    if _dist() and self._async_group is None:
                        self._async_group = dist.new_group(backend="gloo")
                    fut = dcp.async_save(flat, storage_writer=writer, process_group=self._async_group, no_dist=not _dist())
                    self._pending = (fut, tmp, final, step)
                    self.last_save_blocking_s = time.perf_counter() - t0
                    return final
                dcp.save(flat, storage_writer=writer, no_dist=not _dist())
        except Exception as e:  # noqa: BLE001 (DCP wraps OSErrors from any rank in CheckpointException)
            self._raise_if_failed(str(write_failure(final, _root_cause(e))), tmp)
        if fault("crash_in_save", step):
            os.kill(os.getpid(), 9)  # simulates a node dying halfway through the write
        self._commit(tmp, final)
        self.last_save_blocking_s = time.perf_counter() - t0
        return final

    def wait(self) -> None:
        """Finish a pending asynchronous save (collective)."""
        if self._pending is None:
            return
        fut, tmp, final, step = self._pending
        self._pending = None
        try:
            fut.result()
        except Exception as e:  # noqa: BLE001
            self._raise_if_failed(str(write_failure(final, _root_cause(e))), tmp)
        if fault("crash_in_save", step):
            os.kill(os.getpid(), 9)
        self._commit(tmp, final)

    close = wait

    def _make_tmp(self, step: int) -> Path:
        err = None
        tmp = self.root / f".tmp_step_{step}_{os.getpid()}"
        if _rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    shutil.rmtree(tmp)
                tmp.mkdir()
            except OSError as e:
                err = str(write_failure(self.root / f"step_{step}", e))
        tmp, err = _from_rank0((tmp, err))
        if err:
            raise UserError(err)
        return tmp

    def _write_small_files(self, tmp: Path, trainer_state: dict, config_yaml: str, tokenizer_path: Path | None) -> None:
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng.pt")
        (tmp / "config.yaml").write_text(config_yaml)
        if tokenizer_path is not None:
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))

    def _raise_if_failed(self, err: str | None, tmp: Path) -> None:
        errs = [e for e in _all_ranks(err) if e]
        if errs:
            if _rank() == 0:
                shutil.rmtree(tmp, ignore_errors=True)
            raise UserError(errs[0])

    def _commit(self, tmp: Path, final: Path) -> None:
        """Checksums (each rank its own shard files), manifest last, rename, prune. Collective."""
        rank = _rank()
        mine = sorted(str(p.relative_to(tmp)) for p in (tmp / STATE_DIR).glob(f"__{rank}_*"))
        err = None
        try:
            digests = manifest.digest_files(tmp, mine)
        except OSError as e:
            digests, err = {}, str(write_failure(final, e))
        gathered = _all_ranks((digests, err))
        self._raise_if_failed(next((e for _, e in gathered if e), None), tmp)
        if rank == 0:
            try:
                files = {k: v for d, _ in gathered for k, v in d.items()}
                rest = [f for f in manifest.all_files(tmp) if f not in files]
                files.update(manifest.digest_files(tmp, rest))
                manifest.write_manifest(tmp, files)
                commit_directory(tmp, final)
            except OSError as e:
                err = str(write_failure(final, e))
        self._raise_if_failed(_from_rank0(err), tmp)
        if rank == 0:
            self._prune(keep=final)
        if _dist():
            dist.barrier()

    def _prune(self, keep: Path) -> None:
        intact = [p for _, p in self.candidates()]
        for p in intact[: -self.keep_last]:
            if p != keep:
                shutil.rmtree(p, ignore_errors=True)
        for stale in self.root.glob(".tmp_step_*"):  # leftovers of crashed writes
            shutil.rmtree(stale, ignore_errors=True)

    def newest_intact(self) -> Path | None:
        """The newest intact (hence finite) checkpoint or None, without warnings (for error messages)."""
        try:
            return self.latest_intact(warn=False)
        except UserError:
            return None

    # -- loading ---------------------------------------------------------------------------------

    def load(
        self,
        path: Path,
        model: nn.Module,
        optimizers: list[torch.optim.Optimizer],
        adapter: StateAdapter | None = None,
    ) -> dict[str, Any]:
        """Restore model and optimizer state into the (already parallelized) live objects, resharding
        to this run's layout; returns the trainer state (step, tokens, data, ...). Collective."""
        adapter = adapter or StateAdapter()
        trainer_state = read_trainer_state(path)
        flat, aliases, model_state, optim_states = flat_state(model, optimizers, adapter)
        if is_dcp_checkpoint(path):
            # Optimizer state that grows with the step count (RowSparseAdam's lr_history) takes its saved length.
            growing = {
                f"optim{i}/{name}/{stat}"
                for i, (opt, osd) in enumerate(zip(optimizers, optim_states))
                for name, stats in osd["state"].items()
                for stat in stats
                if stat in getattr(opt, "growing_state", ())
            }
            self._read_dcp(path, flat, trainer_state, growing)
        else:
            _fill_from_full(flat, _legacy_full_state(path, len(optimizers)))
        # DCP wrote into the live tensors; hand them back so FSDP/optimizers see the loaded values.
        for k in model_state:
            model_state[k] = flat.get(f"model/{k}", model_state[k])
        for alias, canon in aliases.items():
            if canon in model_state:
                model_state[alias] = model_state[canon]
        adapter.load_model_state(model, model_state)
        for i, (opt, osd) in enumerate(zip(optimizers, optim_states)):
            for name, stats in osd["state"].items():
                for stat in stats:
                    stats[stat] = flat.get(f"optim{i}/{name}/{stat}", stats[stat])
            adapter.load_optimizer_state(model, opt, osd)
        rng = path / "rng.pt"
        if optimizers and rng.is_file():
            saved = read_plain_tensors(rng)
            if isinstance(saved, dict) and isinstance(saved.get("torch"), torch.Tensor):
                torch.set_rng_state(saved["torch"])
        return trainer_state

    def load_weights(self, path: Path, model: nn.Module, adapter: StateAdapter | None = None) -> dict[str, Any]:
        """Only the model's weights (`train.init_from`), resharded to this run's layout. Collective."""
        return self.load(path, model, [], adapter)

    @staticmethod
    def _read_dcp(path: Path, flat: dict[str, torch.Tensor], trainer_state: dict, growing: set[str] = frozenset()) -> None:
        meta = read_metadata_file(path / STATE_DIR / METADATA_FILE)
        entries = tensor_entries(meta)
        stored_model = {k[len("model/"):]: s for k, (s, _) in entries.items() if k.startswith("model/")}
        _checked_aliases(path, trainer_state.get("aliases", {}), set(stored_model))
        expected = {k[len("model/"):]: tuple(v.shape) for k, v in flat.items() if k.startswith("model/")}
        _check_shapes(path, expected, stored_model)
        missing = sorted(k for k in flat if k not in entries)
        if missing:
            raise UserError(f"{path / STATE_DIR} has no optimizer state {missing[0]!r}: saved with another optimizer config")
        for key in flat:
            if key in growing and len(entries[key][0]) == flat[key].dim() == 1:
                flat[key] = torch.empty(tuple(entries[key][0]), dtype=flat[key].dtype)
            if tuple(flat[key].shape) != tuple(entries[key][0]):
                raise UserError(f"{path / STATE_DIR}: {key!r} has shape {entries[key][0]}, expected {tuple(flat[key].shape)}")
        _dcp_load(flat, path)


def _legacy_full_state(path: Path, n_optimizers: int) -> dict[str, torch.Tensor]:
    """A single-file (format 1) checkpoint as flat full tensors under the DCP keys (convert on read)."""
    state, _ = legacy.load_model_file(path / legacy.MODEL_FILE)
    flat = {f"model/{k}": v for k, v in state.items()}
    if not n_optimizers:
        return flat
    opt_path = path / "optimizer.pt"
    opt_states = read_plain_tensors(opt_path)
    if not isinstance(opt_states, list) or len(opt_states) != n_optimizers:
        raise UserError(f"{opt_path}: expected a list of {n_optimizers} optimizer states (saved with another optimizer config?)")
    for i, osd in enumerate(opt_states):
        for name, stats in (osd.get("state", {}) if isinstance(osd, dict) else {}).items():
            for stat, v in stats.items():
                if isinstance(v, torch.Tensor):
                    flat[f"optim{i}/{name}/{stat}"] = v
    return flat


@torch.no_grad()
def _fill_from_full(flat: dict[str, torch.Tensor], full: dict[str, torch.Tensor]) -> None:
    """Copy this rank's piece of each full tensor into the live (possibly sharded) tensor."""
    for key, target in flat.items():
        if key not in full:
            raise UserError(f"checkpoint has no tensor {key!r} (saved with another model or optimizer config)")
        src = full[key]
        if tuple(src.shape) != tuple(target.shape):
            raise UserError(f"checkpoint tensor {key!r} has shape {tuple(src.shape)}, the configured run expects {tuple(target.shape)}")
        if hasattr(target, "device_mesh"):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            shape, offset = compute_local_shape_and_global_offset(target.shape, target.device_mesh, target.placements)
            src = src[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
        _local(target).copy_(src)


def read_plain_tensors(path: Path) -> Any:
    """torch.load with weights_only=True; a crafted or damaged file is one line naming it."""
    import pickle

    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UserError(f"{path} is missing: not a complete checkpoint") from None
    except pickle.UnpicklingError as e:
        raise UserError(f"{path} is not a plain tensor file ({str(e).splitlines()[0]})") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise UserError(f"{path} is damaged or truncated ({str(e).splitlines()[0]})") from None


def _root_cause(e: BaseException) -> BaseException:
    """The first OSError inside DCP's CheckpointException (which collects every rank's failure)."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict):
        for f in failures.values():
            inner = getattr(f, "exception", f)  # _WrappedException or the exception itself
            if isinstance(inner, BaseException):
                return _root_cause(inner)
    seen = e
    while seen is not None:
        if isinstance(seen, OSError):
            return seen
        seen = seen.__cause__ or seen.__context__
    return e
