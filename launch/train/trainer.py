"""Pretrain or continue training: `python -m launch.train config=FILE [key=value ...]`, or the same
under `torchrun --nproc_per_node=N -m launch.train ...`.

Re-running a command resumes from the run directory's latest complete checkpoint. SIGTERM
(SLURM pre-emption) checkpoints and exits 0. A non-finite loss stops the run with an error
naming the step; the last good checkpoint is never touched.

The model is built on the meta device, laid out by `launch.parallelize` (tensor, memory, data
parallel), then each rank allocates and initialises only its own shards.
"""

from __future__ import annotations

import math
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import torch

from launch.checkpoint import paths as ckpt
from launch.checkpoint.checkpointer import Checkpointer
from launch.checkpoint.read import read_trainer_state
from launch.checkpoint.state import StateAdapter
from launch.config import Config, to_yaml
from launch.data.stream import BatchStream, build_datasets, shard_tokenizer, training_documents
from launch.data.tokenizer import Tokenizer, train_tokenizer
from launch.distributed import parallelize as par
from launch.distributed.grad_norm import grad_norm_and_clip
from launch.distributed.process_group import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
)
from launch.models.build import active_params, build_model
from launch.runtime import faults
from launch.runtime.errors import TrainingError, UserError
from launch.runtime.run_dir import check_resume_steps, install_tokenizer, write_run_file
from launch.train.metrics import MetricsLogger
from launch.train.optim import build_optimizers, lr_multiplier, reset_base_lrs, set_lr
from launch.train.validation import cross_entropy, evaluate_loss, perplexity


class _Preemption:
    """Remembers a SIGTERM so the loop can checkpoint at the next step boundary."""

    def __init__(self):
        self.requested = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        signal.signal(signal.SIGTERM, self._previous)


def prepare_tokenizer(cfg: Config, info: DistInfo, resume_from: Path | None) -> Tokenizer:
    """The run's tokenizer, kept at RUN/tokenizer.model: taken from the checkpoint resumed (or
    initialised) from, else data.tokenizer, else the run dir's own, else trained now. Loading it
    from the run dir means no later step reads a checkpoint that pruning may have deleted."""
    run_tok = Path(cfg.run.dir) / "tokenizer.model"
    if resume_from is not None and (resume_from / "tokenizer.model").is_file():
        path = resume_from / "tokenizer.model"
    elif cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        if not path.is_file():
            raise UserError(f"data.tokenizer={cfg.data.tokenizer}: file not found")
    elif shard_tokenizer(cfg.data.train) is not None:  # data.train is a launch.tokenize directory
        path = shard_tokenizer(cfg.data.train)
    else:
        if info.is_main and not run_tok.is_file():
            train_tokenizer(training_documents(cfg.data), run_tok, cfg.model.vocab_size)  # data.train + data.mix
        barrier()
        path = run_tok
    tok = Tokenizer(path)
    if tok.vocab_size != cfg.model.vocab_size:
        raise UserError(
            f"tokenizer {path} has {tok.vocab_size} pieces but model.vocab_size={cfg.model.vocab_size}"
        )
    if info.is_main:
        install_tokenizer(path, cfg.run.dir)
    barrier()
    return Tokenizer(Path(cfg.run.dir) / "tokenizer.model")


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.dir)
        self.layout = par.build_layout(cfg, info)  # impossible layouts fail here, before any allocation
        self.checkpointer = Checkpointer(self.run_dir, cfg.train.keep_last, async_save=cfg.train.async_checkpoint)
        self.resume_from = self.checkpointer.latest_intact()  # a damaged newest one: warn, take the one before
        init_from = Path(cfg.train.init_from) if cfg.train.init_from and self.resume_from is None else None
        self.init_from = ckpt.resolve_checkpoint(init_from) if init_from is not None else None
        self.tok = prepare_tokenizer(cfg, info, self.resume_from or self.init_from)
        # Token shards, memory-mapped (tokenized once into data.cache_dir unless data.train is a shard directory).
        self.train_data, self.val_data, self.unigram_ppl = build_datasets(cfg, self.tok, info)
        # Tensor-parallel peers read the same data: the stream splits over data-parallel ranks only.
        self.data_info = self.layout.data_info(info)
        self.stream = BatchStream(
            self.train_data, cfg.data.batch_size, self.data_info.rank, self.data_info.world, cfg.train.grad_accum, cfg.run.seed
        )
        with torch.device("meta"):
            model = build_model(cfg)
        # Counted before any sharding, so they describe the logical model on every rank.
        self.param_counts = (model.num_params(), model.num_params(exclude_embeddings=True), active_params(model))
        self.par = par.materialize(par.parallelize(model, self.layout, cfg), info.device, cfg.run.seed)
        self.model, self.memory = self.par.model, self.par.memory
        self.memory.track_usage(True)  # slot-usage health signal, logged with every training record
        self.optimizers = build_optimizers(self.model, cfg)
        self.params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        self.step, self.tokens_seen = 0, 0
        if self.resume_from is not None:
            self._resume(self.resume_from)
        elif self.init_from is not None:
            self._load_weights(self.init_from)
            if not cfg.train.reset_data:
                self.stream.load_state_dict(read_trainer_state(self.init_from)["data"])
        self.autocast = torch.autocast(info.device.type, dtype=torch.bfloat16) if cfg.train.dtype == "bf16" else nullcontext()
        self.metrics = MetricsLogger(self.run_dir, enabled=info.is_main, cfg=cfg, optimizers=self.optimizers)

    # -- checkpoints (launch.checkpointer: sharded DCP, resharded on load to any P, T or world size) --

    def _state_adapter(self) -> StateAdapter:
        return StateAdapter(self.par.local_shards())

    def _load_weights(self, path: Path) -> None:
        self.checkpointer.load_weights(path, self.model, self._state_adapter())

    def _resume(self, path: Path) -> None:
        trainer_state = self.checkpointer.load(path, self.model, self.optimizers, self._state_adapter())
        reset_base_lrs(self.optimizers, self.cfg)
        self.step, self.tokens_seen = int(trainer_state["step"]), int(trainer_state["tokens"])
        self.stream.load_state_dict(trainer_state["data"])
        if self.info.is_main:
            print(f"resuming from {path} at step {self.step}", flush=True)

    def save(self) -> Path:
        extra = {
            "tokens": self.tokens_seen,
            "data": self.stream.state_dict(),
            "world_size": self.info.world,
            "parallel": {"memory": self.layout.memory, "tensor": self.layout.tensor, "data": self.layout.data},
            "time": time.time(),
        }
        return self.checkpointer.save(
            self.step, self.model, self.optimizers, extra, to_yaml(self.cfg), self.tok.path, self._state_adapter()
        )

    # -- the loop ------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float]:
        micro = self.stream.next()
        loss_sum = torch.zeros((), device=self.info.device)
        for i, batch in enumerate(micro):
            inputs, targets = batch.inputs.to(self.info.device), batch.targets.to(self.info.device)
            with self.par.no_sync(i == len(micro) - 1), self.autocast:
                loss = cross_entropy(self.par.module(inputs), targets) / len(micro)
            loss.backward()
            loss_sum += loss.detach()
        self.par.sync_grads()
        loss_value = float(faults.after_loss(all_reduce_sum(loss_sum) / self.info.world, self.step + 1))
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"loss is {loss_value} at step {self.step + 1}; stopping without saving. "
                f"Newest finite checkpoint: {self.checkpointer.newest_intact() or 'none'}"
            )
        gnorm = grad_norm_and_clip(self.params, self.cfg.optim.grad_clip, self.memory, self.cfg.memory.clip_values)
        if not math.isfinite(gnorm):  # the update would make the weights non-finite
            raise TrainingError(
                f"gradient norm is {gnorm} at step {self.step + 1}; stopping without saving. "
                f"Newest finite checkpoint: {self.checkpointer.newest_intact() or 'none'}"
            )
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss_value, gnorm

    def validate(self, n: int | None = None) -> tuple[float, int]:
        """Validation loss over the first `n` sequences (default data.val_sequences)."""
        cfg, w = self.cfg, self.data_info.world
        n = cfg.data.val_sequences if n is None else n
        per_rank_batch = max(1, cfg.data.batch_size // (w * cfg.train.grad_accum))
        return evaluate_loss(self.par.module, self.val_data, n, per_rank_batch, self.data_info, self.autocast, self.memory.untracked)

    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        check_resume_steps(cfg.train.steps, self.step, self.resume_from)
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            write_run_file(self.run_dir, "config.yaml", to_yaml(cfg))
            self.metrics.truncate_after(self.step)
            total, non_embedding, active = self.param_counts
            print(
                f"model: {total / 1e6:.2f}M parameters ({non_embedding / 1e6:.2f}M non-embedding, "
                f"{active / 1e6:.2f}M active per token) | train {len(self.train_data)} seqs × {cfg.data.seq_len} | world {info.world} | "
                f"device {info.device}" + (f" | unigram val ppl {self.unigram_ppl:.1f}" if self.unigram_ppl else ""),
                flush=True,
            )
        preempt = _Preemption()
        bar = None
        if self.metrics.wants_bar:  # else MetricsLogger prints plain progress lines
            from tqdm import tqdm

            bar = tqdm(total=cfg.train.steps, initial=self.step, desc="train", dynamic_ncols=True)
        tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
        window_start, window_tokens = time.perf_counter(), 0
        try:
            while self.step < cfg.train.steps:
                faults.before_step(self.step + 1)
                lr = set_lr(self.optimizers, lr_multiplier(self.step + 1, cfg))
                loss, gnorm = self.train_step()
                self.step += 1
                self.tokens_seen += tokens_per_step
                window_tokens += tokens_per_step
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{loss:.3f}", lr=f"{lr:.2e}")
                if self.step % cfg.train.log_every == 0 or self.step == cfg.train.steps:
                    elapsed = time.perf_counter() - window_start
                    self.metrics.log(
                        {"step": self.step, "loss": loss, "lr": lr, "grad_norm": gnorm, "tokens": self.tokens_seen,
                         "tokens_per_s": window_tokens / max(elapsed, 1e-9), "epoch": self.stream.epoch,
                         **self.memory.usage_stats(reset=True)}  # fmt: skip
                    )
                    window_start, window_tokens = time.perf_counter(), 0
                if self.val_data is not None and cfg.train.val_every and (self.step % cfg.train.val_every == 0 or self.step == cfg.train.steps):
                    val_loss, _ = self.validate()
                    self.metrics.log({"step": self.step, "val_loss": val_loss, "val_ppl": perplexity(val_loss)})
                    if bar is not None:
                        bar.write(f"step {self.step}: val_loss {val_loss:.4f} val_ppl {perplexity(val_loss):.2f}")
                if cfg.eval.every and cfg.eval.tasks and self.step % cfg.eval.every == 0:
                    self._run_eval_tasks()
                stop = any_rank(preempt.requested, info.device) if info.enabled else preempt.requested
                if (cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0) or self.step == cfg.train.steps or stop:
                    self.save()
                if stop:
                    if info.is_main:
                        print(f"SIGTERM: checkpointed step {self.step}; exiting", flush=True)
                    break
            self.checkpointer.wait()  # an asynchronous save in flight is committed before exiting
            return self._final_validation()
        finally:
            preempt.restore()
            if bar is not None:
                bar.close()
            self.metrics.close()

    def _final_validation(self) -> dict:
        """At the end of training: validation over the whole split, or its first
        train.final_val_sequences sequences; the printed line says which."""
        summary = {"step": self.step, "val_loss": None, "unigram_ppl": self.unigram_ppl}
        wanted = self.cfg.train.final_val_sequences
        if self.val_data is not None and self.step >= self.cfg.train.steps and wanted:
            val_loss, n = self.validate(len(self.val_data) if wanted < 0 else wanted)
            which = "the whole split" if n == len(self.val_data) else f"the first {n} of {len(self.val_data)}"
            summary.update(val_loss=val_loss, val_sequences=n)
            self.metrics.log({"step": self.step, "final_val_loss": val_loss, "final_val_ppl": perplexity(val_loss), "final_val_sequences": n})
            if self.info.is_main:
                ppl, base = perplexity(val_loss), self.unigram_ppl
                print(f"done: step {self.step} val ppl over {which}, {n} sequences: {ppl:.2f} (unigram baseline {base:.2f})", flush=True)
        return summary

    def _run_eval_tasks(self) -> None:
        from launch.eval.suite import run_tasks  # the QA suite (launch.eval)

        results = run_tasks(self.model, self.tok, list(self.cfg.eval.tasks), self.cfg.eval, self.info)
        if results:
            flat = {f"eval/{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items() if isinstance(v, int | float)}
            self.metrics.log({"step": self.step, **flat})
