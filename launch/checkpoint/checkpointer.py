"""Sharded, resumable, self-checking checkpoints of a training run (torch.distributed.checkpoint).

    run.dir/checkpoints/step_N/
        state/               DCP directory: model tensors under `model/<name>`, optimizer tensors
                             under `optim<i>/<param name>/<stat>`; every rank writes only its own
                             shards (FSDP2 shards, memory-value column shards as Shard(1) DTensors)
          .metadata          read through launch.checkpoint.safe_metadata's allowlisted unpickler
          __<rank>_<i>.distcp
        trainer_state.json   step, tokens, data position, world size and layout, tensor aliases
        rng.pt               rank 0's RNG state (a plain tensor)
        config.yaml          the resolved config: every other command needs only this directory
        tokenizer.model
        manifest.json        size and sha256 of every other file
        COMMITTED            the commit marker, written last

`train.checkpoint_dir` puts the step_N directories elsewhere: another local path, or an fsspec URL
(s3://, gs://, file://; launch.checkpoint.storage). A checkpoint is assembled in a hidden temporary
directory and renamed into place only when complete (and only when every saved tensor is finite);
behind a URL (object stores cannot rename) it is written in place and committed by its marker
(launch.checkpoint.atomic). `train.keep_last` prunes older ones afterwards.
Loading verifies the manifest, reshards to the loading run's layout (any world size, P, T, data
parallel kind) and never unpickles code. A damaged newest checkpoint is skipped with a one-line
warning for the newest intact one; with none intact the run stops with one line naming the damage,
never restarting from step 0 over an existing run.

Directories written by older versions (model.safetensors + optimizer.pt) are read too (converted on
read, launch.checkpoint.legacy); they carry no manifest.

This module holds the writers and the Checkpointer; the pieces they use live beside it by job: the
flat state (state), reading (read), the old format (legacy), atomic directories (atomic), finding
checkpoints (paths), checksums (manifest).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from launch.checkpoint import collectives as coll
from launch.checkpoint import legacy, manifest, storage
from launch.checkpoint.atomic import is_write_error, mark, publish, remove, staging_dir, write_failure
from launch.checkpoint.paths import configured_dir, debris, latest_intact, step_dirs
from launch.checkpoint.read import (
    FORMAT,
    STATE_DIR,
    TRAINER_STATE,
    is_dcp_checkpoint,
    read_dcp_state,
    read_trainer_state,
)
from launch.checkpoint.state import StateAdapter, alias_map, canonical_name, flat_state, nonfinite_entry
from launch.checkpoint.storage import CheckpointPath
from launch.runtime.errors import (
    AgreedError,
    TrainingError,
    UserError,
    causes,
    ignore_file_size_signal,
    peer_gone,
)
from launch.runtime.faults import fault


class Checkpointer:
    """Save, find and load a run's checkpoints. `save` and `load` are collective (every rank calls
    them); `latest_intact` too when a process group is up (ranks split the checksum work)."""

    def __init__(
        self,
        run_dir: str | Path,
        keep_last: int = 1,
        *,
        async_save: bool = False,
        every: int = 0,
        root: str | None = None,
    ):
        self.run_dir = Path(run_dir)
        self.root = configured_dir(run_dir, root)  # train.checkpoint_dir (None: RUN/checkpoints)
        self.keep_last = max(1, keep_last)
        self.async_save = async_save
        self.every = every  # train.ckpt_every: steps between periodic saves (0: none)
        self._pending: tuple[Any, CheckpointPath, CheckpointPath, int] | None = None
        self._async_group = None
        self.last_save_blocking_s = 0.0  # seconds the last save() held the training loop
        ignore_file_size_signal()

    def due(self, step: int, *, last: bool, preempted: bool = False) -> bool:
        """Whether the loop should save after `step`: every `every` steps, at the last step, and when the
        job is being preempted (SIGTERM), so the trainer asks instead of knowing the schedule."""
        return bool((self.every and step % self.every == 0) or last or preempted)

    # -- finding ---------------------------------------------------------------------------------

    def candidates(self) -> list[tuple[int, CheckpointPath]]:
        """Every committed step_N directory (intact or not), oldest first."""
        return step_dirs(None, root=self.root)

    def latest_intact(
        self, warn: bool = True, expected: dict | None = None, skipped: dict | None = None
    ) -> CheckpointPath | None:
        """The newest checkpoint whose files match its manifest and whose content is usable (fits the
        `expected` model shapes when given); launch.checkpoint.paths.latest_intact."""
        return latest_intact(None, warn, expected, skipped, root=self.root)

    def clear_debris(self) -> list[CheckpointPath]:
        """Remove what killed writers left in the checkpoint root (launch.checkpoint.paths.debris): for
        the holder of the run lock only, before anything is read. Collective: no rank lists the
        root while rank 0 is still removing."""
        removed = []
        if coll.rank() == 0:
            removed = debris(self.root)
            for p in removed:
                remove(p)
        return coll.from_rank0(removed)

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
    ) -> CheckpointPath:
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
        if coll.rank() == 0:
            try:
                self._write_small_files(tmp, trainer_state, config_yaml, tokenizer_path)
            except (OSError, RuntimeError) as e:  # torch.save reports a short write as RuntimeError
                ok = str(write_failure(final, e))
        self._raise_if_failed(coll.from_rank0(ok), tmp)
        import torch.distributed.checkpoint as dcp

        writer = storage.dcp_writer(tmp / STATE_DIR)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if self.async_save:
                    if coll.is_distributed() and self._async_group is None:
                        self._async_group = dist.new_group(backend="gloo")
                    fut = dcp.async_save(
                        flat,
                        storage_writer=writer,
                        process_group=self._async_group,
                        no_dist=not coll.is_distributed(),
                    )
                    self._pending = (fut, tmp, final, step)
                    self.last_save_blocking_s = time.perf_counter() - t0
                    return final
                dcp.save(flat, storage_writer=writer, no_dist=not coll.is_distributed())
        except BaseException as e:  # noqa: BLE001 (DCP's CheckpointException is a BaseException)
            self._fail_write(e, final, tmp)
        if fault("crash_in_save", step):
            os.kill(os.getpid(), 9)  # simulates a node dying halfway through the write
        self._commit(tmp, final, step)
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
        except BaseException as e:  # noqa: BLE001 (DCP's CheckpointException is a BaseException)
            self._fail_write(e, final, tmp)
        if fault("crash_in_save", step):
            os.kill(os.getpid(), 9)
        self._commit(tmp, final, step)

    close = wait

    def _make_tmp(self, step: int) -> CheckpointPath:
        err = None
        # Behind a URL this is step_N itself, uncommitted until published.
        tmp = staging_dir(self.root, f"step_{step}")
        if coll.rank() == 0:
            try:
                self.root.mkdir(parents=True, exist_ok=True)
                if tmp.exists():
                    remove(tmp)
                tmp.mkdir()
            except OSError as e:
                err = str(write_failure(self.root / f"step_{step}", e))
        tmp, err = coll.from_rank0((tmp, err))
        if err:
            raise UserError(err)
        return tmp

    def _write_small_files(
        self, tmp: CheckpointPath, trainer_state: dict, config_yaml: str, tokenizer_path: Path | None
    ) -> None:
        with (tmp / "rng.pt").open("wb") as f:
            torch.save({"torch": torch.get_rng_state()}, f)
        (tmp / "config.yaml").write_text(config_yaml)
        if tokenizer_path is not None:
            storage.put_file(tokenizer_path, tmp / "tokenizer.model")
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))

    def _fail_write(self, e: BaseException, final: CheckpointPath, tmp: CheckpointPath) -> None:
        """A DCP write that raised: a write error (a full disk, EFBIG, whichever rank) becomes one line
        naming the path and errno; anything else keeps its traceback. The temp directory goes either way.
        A lost peer is raised at once, with no collective to agree on the failure: the ranks still in
        DCP's collectives would wait for this one there, and this one for them in the new collective
        (measured: a rank SIGKILLed during a save hung its three peers until the collective timeout)."""
        if any(isinstance(c, KeyboardInterrupt) for c in causes(e)):  # Ctrl-C inside DCP's writer
            if coll.rank() == 0:
                _remove_quietly(tmp)
            raise KeyboardInterrupt from e
        if not is_write_error(e) or peer_gone(e):
            if coll.rank() == 0:
                _remove_quietly(tmp)
            raise e
        self._raise_if_failed(str(write_failure(final, e)), tmp)

    def _raise_if_failed(self, err: str | None, tmp: CheckpointPath) -> None:
        errs = [e for e in coll.all_ranks(err) if e]
        if errs:
            if coll.rank() == 0:
                _remove_quietly(tmp)
            raise AgreedError(errs[0])

    def _commit(self, tmp: CheckpointPath, final: CheckpointPath, step: int) -> None:
        """Checksums (each rank its own shard files), manifest, marker last, rename (local), prune. Collective."""
        rank = coll.rank()
        shards = (tmp / STATE_DIR).iterdir()
        mine = sorted(f"{STATE_DIR}/{p.name}" for p in shards if p.name.startswith(f"__{rank}_"))
        err = None
        try:
            digests = manifest.digest_files(tmp, mine)
        except OSError as e:
            digests, err = {}, str(write_failure(final, e))
        gathered = coll.all_ranks((digests, err))
        self._raise_if_failed(next((e for _, e in gathered if e), None), tmp)
        if rank == 0:
            try:
                files = {k: v for d, _ in gathered for k, v in d.items()}
                rest = [f for f in manifest.all_files(tmp) if f not in files]
                files.update(manifest.digest_files(tmp, rest))
                manifest.write_manifest(tmp, files)
                publish(tmp, final, {"step": step})
            except OSError as e:
                err = str(write_failure(final, e))
        self._raise_if_failed(coll.from_rank0(err), tmp)
        if rank == 0:
            self._prune(keep=final)
        if coll.is_distributed():
            dist.barrier()

    def _prune(self, keep: CheckpointPath) -> None:
        intact = [p for _, p in self.candidates()]
        for p in intact[: -self.keep_last]:
            if p != keep:
                _remove_quietly(p)
        for stale in debris(self.root):  # leftovers of crashed writes
            _remove_quietly(stale)

    def newest_intact(self) -> CheckpointPath | None:
        """The newest intact (hence finite) checkpoint or None, without warnings (for error messages)."""
        try:
            return self.latest_intact(warn=False)
        except UserError:
            return None

    # -- loading ---------------------------------------------------------------------------------

    def load(
        self,
        path: CheckpointPath,
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
            read_dcp_state(path, flat, trainer_state, growing)
        else:
            legacy.fill_from_full(flat, legacy.full_state(path, len(optimizers)))
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
            saved = legacy.read_plain_tensors(rng)
            if isinstance(saved, dict) and isinstance(saved.get("torch"), torch.Tensor):
                torch.set_rng_state(saved["torch"])
        return trainer_state

    def load_weights(
        self, path: CheckpointPath, model: nn.Module, adapter: StateAdapter | None = None
    ) -> dict[str, Any]:
        """Only the model's weights (`train.init_from`), resharded to this run's layout. Collective."""
        return self.load(path, model, [], adapter)


def _remove_quietly(path: CheckpointPath) -> None:
    """Remove a temporary or pruned checkpoint directory; a failure leaves it for the next pruning."""
    with contextlib.suppress(OSError):
        remove(path)


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
    launch.convert from-hf). The output rules are launch.runtime.outputs' (never inside a source; overwrite=true
    replaces only an earlier output of the same command); the content is written into a temp dir,
    then the manifest and the commit marker, and renamed into place. A local directory only."""
    import torch.distributed.checkpoint as dcp

    from launch.runtime.outputs import output_dir

    out = Path(out)
    aliases = {canonical_name(k): canonical_name(v) for k, v in alias_map(model).items()}
    state = {
        f"model/{canonical_name(k)}": v.detach()
        for k, v in model.state_dict().items()
        if canonical_name(k) not in aliases
    }
    with output_dir(out, command=command, overwrite=overwrite, sources=sources) as tmp:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp / STATE_DIR), no_dist=True)
            (tmp / "config.yaml").write_text(config_yaml)
            shutil.copyfile(tokenizer_path, tmp / "tokenizer.model")
            for name, text in (extra_files or {}).items():
                (tmp / name).write_text(text)
            (tmp / TRAINER_STATE).write_text(
                json.dumps({**trainer_state, "format": FORMAT, "aliases": aliases}, indent=2)
            )
            manifest.write_manifest(tmp, manifest.digest_files(tmp, manifest.all_files(tmp)))
            mark(tmp, {"step": int(trainer_state.get("step", 0))})  # output_dir renames it into place
        except BaseException as e:  # noqa: BLE001 (DCP's CheckpointException is a BaseException)
            if not is_write_error(e):
                raise
            raise write_failure(out, e) from None  # output_dir removes the temp directory
    return out
