"""Load a checkpoint directory alone (its config and tokenizer travel with it) for evaluation,
generation, growth or export."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from launch.checkpoint.paths import resolve_checkpoint
from launch.checkpoint.read import checkpoint_problem, read_model_state, read_trainer_state
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
    path: Path
    step: int


def load_config_of(path: Path) -> Config:
    cfg_file = path / "config.yaml"
    if not cfg_file.is_file():
        raise UserError(f"{path} has no config.yaml: not a checkpoint directory written by launch.train")
    return config_from_file(cfg_file)


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> LoadedCheckpoint:
    """Model (eval mode), tokenizer and config of a checkpoint dir (or a run dir: its latest)."""
    path = resolve_checkpoint(path)
    problem = checkpoint_problem(path)  # before its config is trusted to build a model
    if problem:
        raise UserError(f"checkpoint {path} is damaged: {problem}")
    cfg = load_config_of(path)
    model = build_model(cfg)
    read_model_state(path, model)  # any saving world size/layout: DCP assembles full tensors here
    model.to(device=device, dtype=dtype).eval()
    tok_path = path / "tokenizer.model"
    tokenizer = Tokenizer(tok_path)
    step = int(read_trainer_state(path).get("step", 0))
    return LoadedCheckpoint(model, tokenizer, cfg, path, step)
