"""Pretrain or continue training: `python -m launch.train config=FILE [key=value ...]`, or the same
under `torchrun --nproc_per_node=N -m launch.train ...`.

Re-running a command resumes from the run directory's latest complete checkpoint. SIGTERM
(SLURM pre-emption) checkpoints and exits 0. A non-finite loss stops the run with an error
naming the step; the last good checkpoint is never touched.
"""

from __future__ import annotations

import math
import os
import signal
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from launch import checkpoint as ckpt
from launch.build import active_params, build_model
from launch.config import Config, load_config, to_yaml, validate
from launch.data import (
    BatchStream,
    PackedSequences,
    load_documents,
    tokenize_source,
    train_sequences,
    validation_batches,
)
from launch.distributed import (
    DistInfo,
    all_reduce_sum,
    any_rank,
    barrier,
    destroy,
    gradient_sync,
    init_distributed,
    wrap_data_parallel,
)
from launch.errors import ConfigError, TrainingError, UserError, run_cli
from launch.faults import fault
from launch.metrics import MetricsLogger
from launch.optim import build_optimizers, lr_multiplier, memory_value_params, set_lr
from launch.parallel import (
    apply_memory_parallel,
    apply_tensor_parallel,
    build_layout,
    check_parallel_config,
    globalize_model_state,
    globalize_optimizer_state,
    localize_model_state,
    localize_optimizer_state,
    sharded_grad_sq_norm,
    sync_replicated_values,
    sync_sharded_grads,
)
from launch.tokenizer import Tokenizer, train_tokenizer


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
    """The run's tokenizer: from the checkpoint, data.tokenizer, the run dir, or trained now."""
    run_tok = Path(cfg.run.dir) / "tokenizer.model"
    if resume_from is not None and (resume_from / "tokenizer.model").is_file():
        path = resume_from / "tokenizer.model"
    elif cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        if not path.is_file():
            raise UserError(f"data.tokenizer={cfg.data.tokenizer}: file not found")
    else:
        if info.is_main and not run_tok.is_file():
            docs = load_documents(cfg.data.train, "train", cfg.data.format, cfg.data.text_field)
            train_tokenizer(docs, run_tok, cfg.model.vocab_size)
        barrier()
        path = run_tok
    tok = Tokenizer(path)
    if tok.vocab_size != cfg.model.vocab_size:
        raise UserError(
            f"tokenizer {path} has {tok.vocab_size} pieces but model.vocab_size={cfg.model.vocab_size}"
        )
    return tok


def token_streams(cfg: Config, tok: Tokenizer, info: DistInfo) -> tuple[np.ndarray, np.ndarray | None]:
    cache = Path(cfg.run.dir) / "data_cache"
    d = cfg.data
    if info.is_main:  # rank 0 tokenises and caches; the others read the cache
        tokenize_source(d.train, "train", tok, cache, d.format, d.text_field)
        if d.val:
            tokenize_source(d.val, "val", tok, cache, d.format, d.text_field)
    barrier()
    train = tokenize_source(d.train, "train", tok, cache, d.format, d.text_field)
    val = tokenize_source(d.val, "val", tok, cache, d.format, d.text_field) if d.val else None
    return train, val


def unigram_perplexity(train: np.ndarray, val: np.ndarray, vocab: int) -> float:
    """Perplexity of `val` under add-one-smoothed unigram counts of `train`: the bar a language
    model must clear to have learned anything beyond token frequencies."""
    counts = np.bincount(train, minlength=vocab).astype(np.float64) + 1.0
    logp = np.log(counts / counts.sum())
    return float(np.exp(-logp[val].mean()))


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


@torch.no_grad()
def evaluate_loss(model, val: PackedSequences, cfg: Config, info: DistInfo, autocast) -> float:
    model.eval()
    pools = [m for m in model.modules() if hasattr(m, "track_usage")]
    tracking = [p.track_usage for p in pools]
    for p in pools:  # memory-usage statistics describe training reads only
        p.track_usage = False
    total = torch.zeros(2, dtype=torch.float64, device=info.device)
    per_rank_batch = max(1, cfg.data.batch_size // (info.world * cfg.train.grad_accum))
    for seqs in validation_batches(val, cfg.data.val_sequences, per_rank_batch, info.rank, info.world):
        seqs = seqs.to(info.device)
        with autocast:
            logits = model(seqs[:, :-1])
        loss = F.cross_entropy(logits.float().flatten(0, 1), seqs[:, 1:].flatten(), reduction="sum")
        total += torch.stack([loss.double(), torch.tensor(seqs[:, 1:].numel(), dtype=torch.float64, device=info.device)])
    all_reduce_sum(total)
    for p, flag in zip(pools, tracking):
        p.track_usage = flag
    model.train()
    return float(total[0] / total[1])


def grad_norm_and_clip(
    params: list[torch.nn.Parameter],
    max_norm: float,
    sharded: list[torch.nn.Parameter] = (),
    sharded_sq_norm: torch.Tensor | None = None,
) -> float:
    """Global L2 norm over every gradient (dense and row-sparse), clipped to `max_norm`.

    `sharded` parameters (memory-value column shards, tensor-parallel weights) are left out of the
    local norm: their squared norm comes in as `sharded_sq_norm`, already summed over their groups so
    each logical element counts once; they are clipped with the rest."""
    skip = {id(p) for p in sharded}
    params = [p for p in params if id(p) not in skip]
    dense = [p.grad for p in params if p.grad is not None and not p.grad.is_sparse]
    sparse = [p.grad for p in params if p.grad is not None and p.grad.is_sparse]
    norm_sq = torch.zeros(())
    # FSDP2 grads are DTensors (their norm reduces across shards); plain tensors (replicated values,
    # unsharded params) are normed separately: the two kinds cannot share one foreach call.
    for kind in ([g for g in dense if hasattr(g, "full_tensor")], [g for g in dense if not hasattr(g, "full_tensor")]):
        if kind:
            norm = torch.nn.utils.get_total_norm(kind, norm_type=2.0)
            if hasattr(norm, "full_tensor"):
                norm = norm.full_tensor()
            norm_sq = norm_sq + norm.float().cpu() ** 2
    for g in sparse:
        norm_sq = norm_sq + g.coalesce().values().float().pow(2).sum()
    if sharded_sq_norm is not None:
        norm_sq = norm_sq + sharded_sq_norm.to(norm_sq.device, norm_sq.dtype)
    total = float(norm_sq.sqrt())
    if max_norm > 0 and total > max_norm:
        scale = max_norm / (total + 1e-6)
        dense = dense + [p.grad for p in sharded if p.grad is not None and not p.grad.is_sparse]
        sparse = sparse + [p.grad for p in sharded if p.grad is not None and p.grad.is_sparse]
        for g in dense:
            g.mul_(scale)
        for g in sparse:
            g.mul_(scale)
    return total


class Trainer:
    def __init__(self, cfg: Config, info: DistInfo):
        self.cfg, self.info = cfg, info
        self.run_dir = Path(cfg.run.dir)
        self.resume_from = ckpt.latest_checkpoint(self.run_dir)
        init_from = Path(cfg.train.init_from) if cfg.train.init_from and self.resume_from is None else None
        if init_from is not None:
            init_from = ckpt.resolve_checkpoint(init_from)
        self.init_from = init_from
        self.tok = prepare_tokenizer(cfg, info, self.resume_from or init_from)
        train_tokens, val_tokens = token_streams(cfg, self.tok, info)
        self.unigram_ppl = unigram_perplexity(train_tokens, val_tokens, self.tok.vocab_size) if val_tokens is not None else None
        self.train_data = train_sequences(cfg.data, train_tokens, self.tok, Path(cfg.run.dir) / "data_cache")
        self.val_data = PackedSequences(val_tokens, cfg.data.seq_len) if val_tokens is not None else None
        self.layout = build_layout(cfg.parallel, info)
        # Tensor-parallel peers read the same data: the stream splits over data-parallel ranks only.
        self.data_info = self.layout.data_info(info)
        self.stream = BatchStream(
            self.train_data, cfg.data.batch_size, self.data_info.rank, self.data_info.world, cfg.train.grad_accum, cfg.run.seed
        )

        torch.manual_seed(cfg.run.seed)
        self.model = build_model(cfg).to(info.device)
        # Counted before any sharding, so they describe the logical model on every rank.
        self.param_counts = (
            self.model.num_params(),
            self.model.num_params(exclude_embeddings=True),
            active_params(self.model),
        )
        self.model.init_weights()
        for pool in getattr(self.model, "memory_pools", []):
            pool.track_usage = True  # slot-usage health signal, logged with every training record
        self.step, self.tokens_seen = 0, 0
        if self.resume_from is None and init_from is not None:
            self._load_weights(init_from)
            if not cfg.train.reset_data:
                self._load_data_position(init_from)
        self._check_model_parallel()
        apply_tensor_parallel(self.model, self.layout)
        apply_memory_parallel(self.model, self.layout)
        self.raw_model = self.model
        self.model = self._parallelize(self.model)
        # After wrapping: FSDP2 swaps in new (DTensor) parameter objects.
        self.sharded_params = [p for n, p in self.raw_model.named_parameters() if n in self.layout.shards]
        self.optimizers = build_optimizers(self.raw_model, cfg)
        self.params = [p for opt in self.optimizers for g in opt.param_groups for p in g["params"]]
        self.value_params = memory_value_params(self.raw_model)
        if self.resume_from is not None:
            self._resume(self.resume_from)
        dtype = cfg.train.dtype
        self.autocast = (
            torch.autocast(info.device.type, dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
        )
        self.forward = torch.compile(self.model) if cfg.train.compile else self.model
        self.metrics = MetricsLogger(self.run_dir, enabled=info.is_main, cfg=cfg, optimizers=self.optimizers)

    # -- setup helpers ------------------------------------------------------------------------

    def _check_model_parallel(self) -> None:
        """Fail before any collective for layouts the model or the run cannot use."""
        cfg = self.cfg
        pools = getattr(self.model, "memory_pools", [])
        check_parallel_config(cfg.parallel, self.info.world, [p.v_dim for p in pools], (cfg.model.n_heads, cfg.model.kv_heads))
        if cfg.parallel.memory > 1 and self.info.world > 1:
            if cfg.eval.every and cfg.eval.tasks:
                raise ConfigError(
                    "eval.tasks during training is not supported with parallel.memory > 1 (ranks would run "
                    "different numbers of memory reads); set eval.every=0 and run launch.eval on the checkpoint"
                )
            if self.val_data is not None and cfg.train.val_every:
                # Sharded reads are collective: every rank must run as many validation batches.
                n, w = min(cfg.data.val_sequences, len(self.val_data)), self.data_info.world
                per_rank_batch = max(1, cfg.data.batch_size // (w * cfg.train.grad_accum))
                counts = {math.ceil(len(range(r, n, w)) / per_rank_batch) for r in range(w)}
                if len(counts) > 1:
                    raise ConfigError(
                        f"data.val_sequences={cfg.data.val_sequences} splits into unequal numbers of validation "
                        f"batches over {w} ranks; with parallel.memory > 1 use a multiple of {w * per_rank_batch}"
                    )

    def _parallelize(self, model):
        units = []
        if self.cfg.parallel.data == "fsdp":
            if self.cfg.grow.strategy:
                # Positions that share a block must be sharded together (one call per group).
                from scalenet import fsdp_units

                units = [u if len(u) > 1 else u[0] for u in fsdp_units(model.layers)]
            else:
                units = list(model.layers)
        from launch.optim import memory_value_params

        return wrap_data_parallel(
            model,
            self.cfg.parallel.data,
            self.info,
            units,
            ignored=memory_value_params(model),  # values: memory-parallel shards or synced by hand
            dp_mesh=self.layout.dp_mesh,
        )

    def _load_weights(self, path: Path) -> None:
        state, _ = ckpt.load_model_file(path / ckpt.MODEL_FILE)
        ckpt.check_model_state(self.model, state, str(path / ckpt.MODEL_FILE))
        self.model.load_state_dict(state)

    def _load_data_position(self, path: Path) -> None:
        state = ckpt.read_trainer_state(path)
        self.stream.load_state_dict(state["data"])

    def _resume(self, path: Path) -> None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        state, _ = ckpt.load_model_file(path / ckpt.MODEL_FILE)
        # Checkpoints hold full logical tensors: slice out this rank's shards (any P, T or world size).
        state = localize_model_state(state, self.layout)
        ckpt.check_model_state(self.raw_model, state, str(path / ckpt.MODEL_FILE))
        set_model_state_dict(self.raw_model, state, options=StateDictOptions(full_state_dict=True))
        opt_states = ckpt.read_optimizer_state(path)
        for i, opt in enumerate(self.optimizers):
            opt_state = localize_optimizer_state(opt_states[i], self.layout)
            set_optimizer_state_dict(self.raw_model, opt, opt_state, options=StateDictOptions(full_state_dict=True))
            for g in opt.param_groups:  # base LRs come from this run's config, not the checkpoint
                g["base_lr"] = self.cfg.memory.value_lr if g.get("name") == "memory_values" else self.cfg.optim.lr
        trainer_state = ckpt.read_trainer_state(path)
        self.step = int(trainer_state["step"])
        self.tokens_seen = int(trainer_state["tokens"])
        self.stream.load_state_dict(trainer_state["data"])
        rng = ckpt.read_rng_state(path)
        if rng is not None:
            torch.set_rng_state(rng["torch"])
        if self.info.is_main:
            print(f"resuming from {path} at step {self.step}", flush=True)

    # -- checkpointing -------------------------------------------------------------------------

    def save(self) -> Path | None:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_state = get_model_state_dict(self.raw_model, options=opts)
        optim_states = [get_optimizer_state_dict(self.raw_model, o, options=opts) for o in self.optimizers]
        if self.layout.shards:  # collective: every rank contributes its shards of the full tensors
            globalize_model_state(self.raw_model, model_state, self.layout)
            for o, s in zip(self.optimizers, optim_states):
                globalize_optimizer_state(self.raw_model, o, s, self.layout)
        path = None
        if self.info.is_main:
            payload = ckpt.CheckpointPayload(
                model_state=model_state,
                optimizer_state=optim_states,
                trainer_state={
                    "step": self.step,
                    "tokens": self.tokens_seen,
                    "data": self.stream.state_dict(),
                    "world_size": self.info.world,
                    "parallel": {"memory": self.layout.memory, "tensor": self.layout.tensor},
                    "time": time.time(),
                },
                config_yaml=to_yaml(self.cfg),
                tokenizer_path=self.tok.path,
            )
            path = ckpt.write_checkpoint(self.run_dir, self.step, payload, self.raw_model, self.cfg.train.keep_last)
        barrier()
        return path

    # -- the loop ------------------------------------------------------------------------------

    def train_step(self) -> tuple[float, float]:
        micro = self.stream.next()
        loss_sum = torch.zeros((), device=self.info.device)
        for i, batch in enumerate(micro):
            inputs, targets = batch.inputs.to(self.info.device), batch.targets.to(self.info.device)
            with gradient_sync(self.model, i == len(micro) - 1), self.autocast:
                loss = cross_entropy(self.forward(inputs), targets) / len(micro)
            loss.backward()
            loss_sum += loss.detach()
        sync_sharded_grads(self.raw_model, self.layout)
        sync_replicated_values(self.value_params, self.layout)
        loss_sum = all_reduce_sum(loss_sum) / self.info.world
        if fault("nan", self.step + 1):
            loss_sum = loss_sum * float("nan")
        loss_value = float(loss_sum)
        if not math.isfinite(loss_value):
            raise TrainingError(
                f"loss is {loss_value} at step {self.step + 1}; stopping without saving. "
                f"Last good checkpoint: {ckpt.latest_checkpoint(self.run_dir) or 'none'}"
            )
        sharded_sq = sharded_grad_sq_norm(self.raw_model, self.layout) if self.sharded_params else None
        gnorm = grad_norm_and_clip(self.params, self.cfg.optim.grad_clip, self.sharded_params, sharded_sq)
        for opt in self.optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss_value, gnorm

    def fit(self) -> dict:
        cfg, info = self.cfg, self.info
        if info.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "config.yaml").write_text(to_yaml(cfg))
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
        last_val = None
        try:
            while self.step < cfg.train.steps:
                if fault("kill", self.step + 1):
                    os.kill(os.getpid(), signal.SIGKILL)
                if fault("sigterm", self.step + 1):
                    os.kill(os.getpid(), signal.SIGTERM)
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
                        {
                            "step": self.step,
                            "loss": loss,
                            "lr": lr,
                            "grad_norm": gnorm,
                            "tokens": self.tokens_seen,
                            "tokens_per_s": window_tokens / max(elapsed, 1e-9),
                            "epoch": self.stream.epoch,
                            **self._memory_stats(),
                        }
                    )
                    window_start, window_tokens = time.perf_counter(), 0
                if self.val_data is not None and cfg.train.val_every and (
                    self.step % cfg.train.val_every == 0 or self.step == cfg.train.steps
                ):
                    val_loss = evaluate_loss(self.forward, self.val_data, cfg, self.data_info, self.autocast)
                    last_val = val_loss
                    self.metrics.log({"step": self.step, "val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50))})
                    if bar is not None:
                        bar.write(f"step {self.step}: val_loss {val_loss:.4f} val_ppl {math.exp(min(val_loss, 50)):.2f}")
                if cfg.eval.every and cfg.eval.tasks and self.step % cfg.eval.every == 0:
                    self._run_eval_tasks()
                stop = any_rank(preempt.requested, info.device) if info.enabled else preempt.requested
                if (cfg.train.ckpt_every and self.step % cfg.train.ckpt_every == 0) or self.step == cfg.train.steps or stop:
                    self.save()
                if stop:
                    if info.is_main:
                        print(f"SIGTERM: checkpointed step {self.step}; exiting", flush=True)
                    break
        finally:
            preempt.restore()
            if bar is not None:
                bar.close()
            self.metrics.close()
        summary = {"step": self.step, "val_loss": last_val, "unigram_ppl": self.unigram_ppl}
        if info.is_main and last_val is not None:
            print(
                f"done: step {self.step} val_ppl {math.exp(min(last_val, 50)):.2f} "
                f"(unigram baseline {self.unigram_ppl:.2f})",
                flush=True,
            )
        return summary

    def _memory_stats(self) -> dict:
        stats = {}
        for i, pool in enumerate(getattr(self.raw_model, "memory_pools", [])):
            if hasattr(pool, "usage_stats"):
                for k, v in pool.usage_stats(reset=True).items():
                    stats[k if i == 0 else f"{k}_{i}"] = v
        return stats

    def _run_eval_tasks(self) -> None:
        from launch.evaluation.suite import run_tasks  # the QA suite (launch.eval)

        results = run_tasks(self.raw_model, self.tok, list(self.cfg.eval.tasks), self.cfg.eval, self.info)
        if results:
            flat = {f"eval/{task}/{k}": v for task, metrics in results.items() for k, v in metrics.items() if isinstance(v, int | float)}
            self.metrics.log({"step": self.step, **flat})


def main(argv: list[str]) -> int:
    cfg = load_config(argv, require_config=True)  # no config=: usage, exit 2 (launch.cli_help)
    validate(cfg)
    if cfg.eval.tasks:  # a bad task spec or missing task file fails now, not at the first eval
        from launch.evaluation.tasks import parse_task_specs

        parse_task_specs(list(cfg.eval.tasks))
    info = init_distributed(cfg.train.device, cfg.parallel.backend)
    try:
        Trainer(cfg, info).fit()
    finally:
        destroy()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main)

