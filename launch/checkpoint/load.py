"""Load a checkpoint directory alone (its config and tokenizer travel with it) for evaluation,
generation, growth or export, from a local path or an fsspec URL (launch.checkpoint.storage)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from launch.checkpoint.paths import resolve_checkpoint
from launch.checkpoint.read import TRAINER_STATE, checkpoint_problem, read_model_state, read_trainer_state
from launch.checkpoint.storage import CheckpointPath, as_path, local_copy
from launch.config import Config, config_from_file
from launch.data.tokenizer import Tokenizer
from launch.models.build import build_model
from launch.models.llama import Transformer
from launch.runtime.errors import UserError


@dataclass
class LoadedCheckpoint:
    model: Transformer
    tokenizer: Tokenizer
    config: Config
    path: CheckpointPath
    step: int


def load_config_of(path: CheckpointPath) -> Config:
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{path} has no config.yaml: not a checkpoint directory written by launch.train")
    return config_from_file(local_copy(cfg_file))


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedCheckpoint:
    """Model (eval mode), tokenizer and config of a checkpoint dir (or a run dir: its latest).

    A training run may prune the checkpoint while it is being read (evaluating a live run): whatever
    the read then fails on (a shard, the tokenizer), the failure is reported as the pruning it is,
    and for a run directory the newest checkpoint is taken again."""
    given_run_dir = not (as_path(path) / TRAINER_STATE).is_file()
    for _attempt in range(_PRUNE_RETRIES):
        ckpt = resolve_checkpoint(path)
        try:
            return _load(ckpt, device, dtype)
        except (UserError, OSError):
            if ckpt.is_dir():
                raise
            if not given_run_dir:
                raise UserError(
                    f"checkpoint {ckpt} was pruned (deleted) while it was being read, probably by the run "
                    "training into it: pass the run directory to read its newest checkpoint"
                ) from None
    raise UserError(
        f"the newest checkpoint of {path} was pruned while being read {_PRUNE_RETRIES} times in a row: "
        "the run is saving faster than it can be read; read a checkpoint it keeps (train.keep_last) or wait"
    )


_PRUNE_RETRIES = 3


def _load(path: CheckpointPath, device: str | torch.device, dtype: torch.dtype | None) -> LoadedCheckpoint:
    problem = checkpoint_problem(path)  # before its config is trusted to build a model
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}")
    cfg = load_config_of(path)
    model = build_model(cfg)
    read_model_state(path, model)  # any saving world size/layout: DCP assembles full tensors here
    model.to(device=device, dtype=dtype).eval()
    # sentencepiece reads a local file: a checkpoint behind a URL gives a process-lifetime copy
    tokenizer = Tokenizer(local_copy(path / "tokenizer.model"))
    step = int(read_trainer_state(path).get("step", 0))
    return LoadedCheckpoint(model, tokenizer, cfg, path, step)
