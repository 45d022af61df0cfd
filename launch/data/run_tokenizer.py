"""Which tokenizer a training run uses, and where it lives: RUN/tokenizer.model.

The trainer asks once, at start-up, before any data is tokenized. Every rank calls it (it is
collective when a process group is up: rank 0 trains or installs, the others wait).
"""

from __future__ import annotations

from pathlib import Path

from launch.checkpoint.storage import CheckpointPath, local_copy
from launch.config import Config
from launch.data.stream import shard_tokenizer, training_documents
from launch.data.tokenizer import Tokenizer, train_tokenizer
from launch.distributed.process_group import DistInfo, barrier
from launch.runtime.errors import UserError
from launch.runtime.run_dir import install_tokenizer


def prepare_tokenizer(cfg: Config, info: DistInfo, resume_from: CheckpointPath | None) -> Tokenizer:
    """The run's tokenizer, kept at RUN/tokenizer.model: taken from the checkpoint resumed (or
    initialised) from, else data.tokenizer, else the run dir's own, else trained now. Loading it
    from the run dir means no later step reads a checkpoint that pruning may have deleted."""
    run_tok = Path(cfg.run.dir) / "tokenizer.model"
    if resume_from is not None and (resume_from / "tokenizer.model").is_file():
        path = local_copy(resume_from / "tokenizer.model")  # itself, or a download from a URL
    elif cfg.data.tokenizer:
        path = Path(cfg.data.tokenizer)
        if not path.is_file():
            raise UserError(f"data.tokenizer={cfg.data.tokenizer}: file not found")
    elif shard_tokenizer(cfg.data.train) is not None:  # data.train is a launch.tokenize directory
        path = shard_tokenizer(cfg.data.train)
    else:
        if info.is_main and not run_tok.is_file():
            # Trained on data.train + data.mix, so the pieces are learnt from what the model reads.
            train_tokenizer(
                training_documents(cfg.data),
                run_tok,
                cfg.model.vocab_size,
                cfg.data.tokenizer_sample,
                quiet=False,
            )
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
