"""The training loop: build → resume → loop (step, log, validate?, evaluate?, save?) → final validation.

Re-running a command resumes from the run directory's latest complete checkpoint. SIGTERM
(SLURM pre-emption) checkpoints and exits 0, SIGUSR1 (SLURM's time-limit warning) checkpoints and
exits 75 ("requeue me", `launch.runtime.preemption`); a rank without step progress for
train.watchdog_s ends the job with stacks (`launch.train.watchdog`). A non-finite loss stops the run
with an error naming the step; the last good checkpoint is never touched.

The model is built on the meta device, laid out by `launch.distributed.parallelize` (tensor, memory,
data parallel), then each rank allocates and initialises only its own shards. When to validate,
evaluate and save is each component's own decision (`due`); the loop only asks.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import NoReturn

import torch

from launch.checkpoint import paths as ckpt
from launch.checkpoint.checkpointer import Checkpointer
from launch.checkpoint.read import checkpoint_steps, init_from_line, read_trainer_state
from launch.checkpoint.state import StateAdapter, canonical_name
from launch.config import Config, to_yaml
from launch.data.run_tokenizer import prepare_tokenizer
from launch.data.stream import BatchStream, build_datasets
from launch.distributed.grad_norm import grad_norm_and_clip
from launch.distributed.parallelize import build_layout, materialize, parallelize
from launch.distributed.process_group import (
    DistInfo,
    all_reduce_max_each,
    all_reduce_sum,
    any_rank,
    launcher_gone,
)
from launch.eval.suite import TaskEvaluator
from launch.models.build import active_params, build_model
from launch.runtime import faults, preemption
from launch.runtime.errors import TrainingError, UserError
from launch.runtime.preemption import Preemption
from launch.runtime.run_dir import check_resume_steps, write_run_file
from launch.train.hooks import StepHooks
from launch.train.metrics import MetricsLogger, RunCosts, Throughput
from launch.train.optim import (
    build_optimizers,
    keep_value_optimizer,
    lr_multiplier,
    reset_base_lrs,
    schedule_change,
    set_lr,
)
from launch.train.validation import Validator, cross_entropy, perplexity
from launch.train.watchdog import Watchdog


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.dir)
        self.layout = build_layout(cfg, info)  # impossible layouts fail here, before any allocation
        train = cfg.train
        self.checkpointer = Checkpointer(
            self.run_dir,
            train.keep_last,
            async_save=train.async_checkpoint,
            every=train.ckpt_every,
            root=train.checkpoint_dir,
        )
        self.checkpointer.clear_debris()  # this job holds the run lock: uncommitted saves are dead ones
        # An unusable newest checkpoint (damaged, tampered, another model's): warn and take the one before.
        with torch.device("meta"):
            shapes = {canonical_name(k): tuple(v.shape) for k, v in build_model(cfg).state_dict().items()}
        self.expected_shapes = shapes
        self.resume_from = self.checkpointer.latest_intact(expected=shapes)
        if self.resume_from is None:
            ckpt.check_not_moved(self.run_dir, self.checkpointer.root)
        else:
            # The optimizer state's layout follows memory.value_optimizer: a run keeps the one it began with.
            cfg, kept = keep_value_optimizer(cfg, self.resume_from)
            self.cfg = cfg
            if kept and info.is_main:
                print(kept, flush=True)
        init_from = cfg.train.init_from if cfg.train.init_from and self.resume_from is None else None
        self.init_from = ckpt.resolve_checkpoint(init_from) if init_from is not None else None
        self.tok = prepare_tokenizer(cfg, info, self.resume_from or self.init_from)

        # Token shards, memory-mapped (tokenized once into data.cache_dir unless data.train is a shard directory).
        train_data, val_data, self.unigram_ppl = build_datasets(cfg, self.tok, info)
        self.train_sequences = len(train_data)
        # Tensor-parallel peers read the same data: stream and validation split over data-parallel ranks only.
        data = self.layout.data_info(info)
        self.stream = BatchStream(
            train_data, cfg.data.batch_size, data.rank, data.world, cfg.train.grad_accum, cfg.run.seed
        )

        with torch.device("meta"):
            model = build_model(cfg)
        # Counted before any sharding, so they describe the logical model on every rank.
        counts = model.num_params(), model.num_params(exclude_embeddings=True), active_params(model)
        self.param_counts = counts
        self.parallel = materialize(parallelize(model, self.layout, cfg), info.device, cfg.run.seed)
        # The model's parameters, optimizers and checkpoints; forwards go through self.parallel.wrapper.
        self.model = self.parallel.model
        self.parallel.memory.track_usage(True)  # slot-usage health signal, logged with every training record
        self.optimizers = build_optimizers(self.model, cfg)
        self.params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]

        bf16 = cfg.train.dtype == "bf16"
        self.autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
        self.validator = Validator(val_data, cfg, data, self.autocast, self.parallel.memory.untracked)
        self.evaluator = TaskEvaluator(self.tok, cfg.eval, info)
        self.hooks = StepHooks(faults.step_hooks())  # empty unless LAUNCH_FAULT is set

        self.step, self.tokens_seen = 0, 0
        self.costs = RunCosts(info.device)  # wall_s and peak_mem_mb of the training records
        self.launcher_lost = False  # set with each stop agreement (_preempted)
        if self.resume_from is not None:
            self._resume_newest_usable()
        elif self.init_from is not None:
            self.checkpointer.load_weights(self.init_from, self.model, self._state_adapter())
            source = read_trainer_state(self.init_from)
            if not cfg.train.reset_data:
                self.stream.load_state_dict(source["data"])
            if info.is_main:
                print(init_from_line(self.init_from, source, cfg.train.reset_data), flush=True)
        # Last: nothing (TensorBoard directory, W&B run) is opened for a run that failed to load.
        self.metrics = MetricsLogger(self.run_dir, enabled=info.is_main, cfg=cfg, optimizers=self.optimizers)

    # -- checkpoints (launch.checkpoint: sharded DCP, resharded on load to any P, T or world size) --

    def _state_adapter(self) -> StateAdapter:
        return StateAdapter(self.parallel.local_shards())

    def _resume_newest_usable(self) -> None:
        """Load the newest usable checkpoint. One that passed every check before loading but still fails
        to load (an index that parses yet does not describe its shards) is skipped like a damaged one;
        a full load overwrites every tensor a failed one touched. Collective: loads fail on every rank."""
        skipped: dict[Path, str] = {}
        while True:
            try:
                self._resume(self.resume_from)
                return
            except UserError as e:
                skipped[self.resume_from] = str(e)
            self.resume_from = self.checkpointer.latest_intact(expected=self.expected_shapes, skipped=skipped)
            if self.resume_from is None:  # every step_N directory vanished meanwhile
                raise UserError(
                    f"no usable checkpoint left in {self.checkpointer.root}: {'; '.join(skipped.values())}"
                )

    def _resume(self, path: Path) -> None:
        trainer_state = self.checkpointer.load(path, self.model, self.optimizers, self._state_adapter())
        reset_base_lrs(self.optimizers, self.cfg)
        self.step, self.tokens_seen = int(trainer_state["step"]), int(trainer_state["tokens"])
        self.costs.wall_before = float(trainer_state.get("wall_s", 0.0))  # older checkpoints: none recorded
        self.stream.load_state_dict(trainer_state["data"])
        if self.info.is_main:
            change = schedule_change(checkpoint_steps(path), self.step, self.cfg)
            print(f"resuming from {path} at step {self.step}" + (f"; {change}" if change else ""), flush=True)

    def save(self) -> Path:
        layout = self.layout
        extra = {
            "tokens": self.tokens_seen,
            "data": self.stream.state_dict(),
            "world_size": self.info.world,
            "parallel": {"memory": layout.memory, "tensor": layout.tensor, "data": layout.data},
            "time": time.time(),
            "wall_s": self.costs.wall_s(),  # training time so far, continued by a resume
        }
        config, adapter = to_yaml(self.cfg), self._state_adapter()
        return self.checkpointer.save(
            self.step, self.model, self.optimizers, extra, config, self.tok.path, adapter
        )

    # -- the loop ------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over grad_accum micro-batches; (loss, gradient norm before clipping)."""
        micro = self.stream.next()
        loss_sum = torch.zeros((), device=self.info.device)
        for i, batch in enumerate(micro):
            inputs, targets = batch.inputs.to(self.info.device), batch.targets.to(self.info.device)
            with self.parallel.no_sync(i == len(micro) - 1), self.autocast:
                loss = cross_entropy(self.parallel.wrapper(inputs), targets) / len(micro)
            loss.backward()
            loss_sum += loss.detach()
        self.parallel.sync_grads()
        loss_value = float(self.hooks.after_loss(all_reduce_sum(loss_sum) / self.info.world, self.step + 1))
        if not math.isfinite(loss_value):
            self._stop_nonfinite("loss", loss_value)
        memory = self.parallel.memory
        gnorm = grad_norm_and_clip(self.params, self.cfg.optim.grad_clip, memory, self.cfg.memory.clip_values)
        if not math.isfinite(gnorm):  # the update would make the weights non-finite
            self._stop_nonfinite("gradient norm", gnorm)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss_value, gnorm

    def fit(self) -> dict:
        cfg = self.cfg
        check_resume_steps(cfg.train.steps, self.step, self.resume_from)
        if self._already_finished():
            # Nothing to train and the final validation is on record: re-running it would only append
            # a duplicate record to metrics.jsonl on every re-run. Nothing in the run dir is touched.
            if self.info.is_main:
                print(
                    f"already finished at step {self.step} (train.steps={cfg.train.steps}); its final validation "
                    f"is in {self.metrics.path}: nothing to do (raise train.steps to train further)",
                    flush=True,
                )
            self.metrics.close()
            return {"step": self.step, "val_loss": None, "unigram_ppl": self.unigram_ppl}
        self._start_run_files()
        preempt, bar = Preemption(cfg.train.checkpoint_signals), self._progress_bar()
        watchdog = self._watchdog()
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        throughput = Throughput()  # the logged tokens_per_s: training time only
        self.costs.start = time.perf_counter()  # wall_s counts training, not building and loading
        try:
            stop = 0
            while self.step < cfg.train.steps:
                if watchdog is not None:
                    watchdog.beat(self.step)  # a step, its validation, evaluation and checkpoint: one unit
                self.hooks.before_step(self.step + 1)
                lr = set_lr(self.optimizers, lr_multiplier(self.step + 1, cfg))
                loss, gnorm = self.train_step()
                self.step += 1
                self.tokens_seen += tokens_per_step
                throughput.add(tokens_per_step)
                last = self.step == cfg.train.steps
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")

                if self.step % cfg.train.log_every == 0 or last:
                    self.metrics.log(
                        {"step": self.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens": self.tokens_seen,
                         "tokens_per_s": throughput.rate(), "epoch": self.stream.epoch,
                         **self.parallel.memory.usage_stats(reset=True), **self.costs.record()}
                    )  # fmt: skip
                    throughput.reset()
                with throughput.paused():
                    if self.validator.due(self.step, last=last):
                        self._validate(bar)
                    if self.evaluator.due(self.step) and (scores := self.evaluator.run(self.model)):
                        self.metrics.log({"step": self.step, **scores})
                    stop = self._preempted(preempt)
                    if self.checkpointer.due(self.step, last=last, preempted=stop):
                        self.save()
                if stop:
                    break
            self.checkpointer.wait()  # an asynchronous save in flight is committed before exiting
            if watchdog is not None:
                watchdog.stop()  # the final validation may take longer than a step: not timed
            if stop:
                return self._stopped_by_signal(stop)
            return self._final_validation()
        finally:
            if watchdog is not None:
                watchdog.stop()
            preempt.restore()
            if bar is not None:
                bar.close()
            self.metrics.close()

    # -- the loop's parts ---------------------------------------------------------------------

    def _validate(self, bar) -> None:
        val_loss, _ = self.validator.loss(self.parallel.wrapper)
        self.metrics.log({"step": self.step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
        if bar is not None:
            bar.write(f"step {self.step}: val_loss {val_loss:.4f} val_ppl {perplexity(val_loss):.2f}")

    def _final_validation(self) -> dict:
        """At the end of training (not after a pre-emption): validation over the whole split, or its
        first train.final_val_sequences sequences; the printed line says which."""
        summary = {"step": self.step, "val_loss": None, "unigram_ppl": self.unigram_ppl}
        result = self.validator.final(self.parallel.wrapper) if self.step >= self.cfg.train.steps else None
        if result is None:
            return summary
        val_loss, n = result
        summary.update(val_loss=val_loss, val_sequences=n)
        ppl = perplexity(val_loss)
        record = {"final_val_loss": val_loss, "final_val_ppl": ppl, "final_val_sequences": n}
        self.metrics.log({"step": self.step, **record})
        if self.info.is_main:
            print(
                f"done: step {self.step} val ppl over {self.validator.describe(n)}, {n} sequences: {ppl:.2f} "
                f"(unigram baseline {self.unigram_ppl:.2f})",
                flush=True,
            )
        return summary

    def _already_finished(self) -> bool:
        """A resumed run already at train.steps whose final validation is logged (or switched off).
        A run killed during its final validation is not finished: the re-run validates once."""
        if self.resume_from is None or self.step < self.cfg.train.steps:
            return False
        wanted = self.validator.val is not None and bool(self.validator.final_sequences)
        done = not wanted or self.metrics.has_record(self.step, "final_val_loss")
        # Only rank 0 reads metrics.jsonl, and every rank must take the same branch (validation is collective).
        return any_rank(done, self.info.device) if self.info.enabled else done

    def _preempted(self, preempt: Preemption) -> int:
        """Whether any rank got a checkpoint signal (0: none; else `preemption.encode`d, the same on
        every rank): all of them save and stop at the same step, even when only one rank was signalled.
        Agreed at the same time: whether any rank's torchrun agent died (`launcher_gone`; its SIGTERM
        may not have been handled yet, so the death alone is a stop too)."""
        code, lost = preempt.code(), int(launcher_gone())
        if self.info.enabled:
            code, lost = all_reduce_max_each([code, lost], self.info.device)
        self.launcher_lost = bool(lost)
        return code or (preemption.encode(signal.SIGTERM) if lost else 0)

    def _stopped_by_signal(self, code: int) -> dict:
        """After the checkpoint of a stop agreed on `code`: the line, the requeue, the exit status.
        A stop because a launcher died exits REQUEUE_EXIT too (the run is not finished: the agents
        left restart their workers under --max-restarts), but never runs `scontrol requeue`: the
        job goes on elsewhere, and a SIGTERM from `scancel` must not bring a job back."""
        sig = preemption.decode(code)
        requeue = preemption.requests_requeue(sig)
        exit_code = preemption.REQUEUE_EXIT if requeue or self.launcher_lost else 0
        if self.info.is_main:
            status = f"exit {exit_code} (requeue me)" if exit_code else "exiting"
            why = " (a torchrun agent died)" if self.launcher_lost else ""
            print(f"{sig.name}{why}: checkpointed step {self.step}; {status}", flush=True)
            if requeue and self.cfg.train.requeue:
                preemption.requeue_slurm_job()  # the checkpoint is committed: SLURM may end the job now
        return {"step": self.step, "val_loss": None, "unigram_ppl": self.unigram_ppl, "exit": exit_code}

    def _watchdog(self) -> Watchdog | None:
        s = self.cfg.train.watchdog_s
        return Watchdog(s, self.run_dir, self.info.rank, self.info.world) if s > 0 else None

    def _stop_nonfinite(self, what: str, value: float) -> NoReturn:
        raise TrainingError(
            f"{what} is {value} at step {self.step + 1}; stopping without saving. "
            f"Newest finite checkpoint: {self.checkpointer.newest_intact() or 'none'}"
        )

    def _start_run_files(self) -> None:
        """Rank 0: the resolved config, metrics cut back to the resumed step, and the banner."""
        cfg, info = self.cfg, self.info
        if not info.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        write_run_file(self.run_dir, "config.yaml", to_yaml(cfg))
        if self.resume_from is None and (old := self.metrics.set_aside()) is not None:
            print(
                f"warning: starting {self.run_dir} from step 0 (no checkpoint to resume) over an existing "
                f"metrics.jsonl: its records were moved to {old}",
                file=sys.stderr,
                flush=True,
            )
        self.metrics.truncate_after(self.step)
        total, non_embedding, active = self.param_counts
        print(
            f"model: {total / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding, "
            f"{active / 1e6:.2f}M active per token) | train {self.train_sequences} seqs × {cfg.data.seq_len} | "
            f"world {info.world} | device {info.device}"
            + (f" | unigram val ppl {self.unigram_ppl:.1f}" if self.unigram_ppl else "")
            + _restart_note(),
            flush=True,
        )

    def _progress_bar(self):
        if not self.metrics.wants_bar:  # MetricsLogger prints plain progress lines instead
            return None
        from tqdm import tqdm

        return tqdm(total=self.cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True)


def _restart_note() -> str:
    """' | torchrun restart N of M' in a worker that torchrun restarted (--max-restarts), else ''."""
    count = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    most = os.environ.get("TORCHELASTIC_MAX_RESTARTS")
    return f" | torchrun restart {count} of {most}" if count not in ("", "0") and most else ""
