"""Shared fixtures of the eval tests: a tokenizer trained in milliseconds, random tiny models, a
model whose preferences are known, and one tiny trained checkpoint for end-to-end runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from launch.data.tokenizer import Tokenizer, train_tokenizer
from launch.models.llama import ModelConfig, Transformer

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "eval"
REPO = Path(__file__).resolve().parents[3]

_CORPUS = [
    "ROMEO.\nBut soft, what light through yonder window breaks?\nIt is the east, and Juliet is the sun.\n",
    "HAMLET.\nTo be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n",
    "Question: what is the capital of France?\nAnswer: Paris is the capital of France.\n",
    "Q: who wrote the play?\nA: William Shakespeare wrote it, yes or no.\n",
] * 20


@pytest.fixture(autouse=True)
def _one_thread():
    """These models are tiny: with the CI's few shared cores, intra-op threads only add
    synchronisation (measured 100x slower generation with 2 threads on a loaded 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory) -> Tokenizer:
    path = tmp_path_factory.mktemp("tok") / "tok.model"
    return Tokenizer(train_tokenizer(_CORPUS, path, vocab_size=400))


def random_model(vocab: int, max_seq_len: int = 32, seed: int = 0, kv_heads: int | None = 2) -> Transformer:
    """A random tiny model; a large init std spreads the logits so greedy choices are not near-ties."""
    cfg = ModelConfig(
        dim=32,
        n_layers=2,
        n_heads=4,
        n_kv_heads=kv_heads,
        vocab_size=vocab,
        max_seq_len=max_seq_len,
        init_std=0.3,
    )
    torch.manual_seed(seed)
    model = Transformer(cfg)
    model.init_weights()
    return model.eval()


class PreferenceModel(torch.nn.Module):
    """Ignores its input: every position predicts the same distribution, with `bonus` added to the
    logits of `favoured` token ids. The Transformer call signature, nothing else."""

    def __init__(self, vocab: int, favoured: list[int] = (), bonus: float = 8.0):
        super().__init__()
        bias = torch.zeros(vocab)
        bias[list(favoured)] = bonus
        self.register_buffer("bias", bias)

    def forward(self, tokens: torch.Tensor, caches=None, start_pos: int = 0) -> torch.Tensor:
        return self.bias.expand(*tokens.shape, -1).clone()


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A run dir trained for a few steps with configs/tiny.yaml on a small slice of the plays."""
    from launch.data.corpus import shakespeare_files
    from launch.train.__main__ import main as train_main

    root = tmp_path_factory.mktemp("evalrun")
    corpus = root / "corpus.txt"
    corpus.write_text("".join(p.read_text(encoding="utf-8")[:40000] for p in shakespeare_files("train")[:3]))
    run = root / "run"
    train_main(
        [
            f"config={REPO / 'configs' / 'tiny.yaml'}",
            f"run.dir={run}",
            f"data.train={corpus}",
            "data.val=null",
            "train.steps=6",
            "train.ckpt_every=6",
            "train.log_every=6",
            # the trainer's hook into the suite (launch.evaluation.suite.run_tasks)
            "eval.every=6",
            f"eval.tasks=[shakespeare,piqa:{FIXTURES / 'piqa.jsonl'}]",
            "eval.limit=2",
        ]
    )
    return run
