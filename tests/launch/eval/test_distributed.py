"""`run_tasks` under torch.distributed (2 gloo ranks on CPU): every rank gets the single-process
results, with a plain model and with an FSDP2-sharded one whose forward runs collectives (the
case where ranks that stop generating at different times would deadlock)."""

import json
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from launch.config import EvalConfig
from launch.data.tokenizer import Tokenizer
from launch.distributed.process_group import DistInfo
from launch.eval.suite import run_tasks

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures" / "eval"
TASKS = [
    f"piqa:{FIXTURES / 'piqa.jsonl'}",
    f"nq_open:{FIXTURES / 'nq_open.jsonl'}",
    f"text:{FIXTURES / 'text.jsonl'}",
]
CFG = dict(limit=3, max_new_tokens=5, batch_size=2)


def _model(vocab: int):
    from launch.models.llama import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(
        ModelConfig(dim=32, n_layers=2, n_heads=4, vocab_size=vocab, max_seq_len=64, init_std=0.3)
    )
    model.init_weights()
    return model


def _worker(rank: int, world: int, store: str, tok_path: str, out_dir: str, fsdp: bool) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        tok = Tokenizer(tok_path)
        model = _model(tok.vocab_size).train()
        if fsdp:
            from torch.distributed.fsdp import fully_shard

            for layer in model.layers:
                fully_shard(layer)
            fully_shard(model)
        results = run_tasks(model, tok, TASKS, EvalConfig(**CFG), DistInfo(rank=rank, world=world))
        assert model.training
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.skipif(sys.platform == "win32", reason="gloo file store")
@pytest.mark.parametrize("fsdp", [False, True], ids=["plain", "fsdp2"])
def test_run_tasks_two_ranks(tokenizer, tmp_path, fsdp):
    torch.set_num_threads(1)
    expected = run_tasks(_model(tokenizer.vocab_size), tokenizer, TASKS, EvalConfig(**CFG), DistInfo())
    ctx = mp.get_context("spawn")
    procs = [
        ctx.Process(
            target=_worker, args=(r, 2, str(tmp_path / "store"), str(tokenizer.path), str(tmp_path), fsdp)
        )
        for r in range(2)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    alive = [p for p in procs if p.is_alive()]
    for p in alive:
        p.kill()
    assert not alive, "ranks did not finish (deadlock?)"
    assert [p.exitcode for p in procs] == [0, 0]
    for r in range(2):
        got = json.loads((tmp_path / f"rank{r}.json").read_text())
        assert got.keys() == expected.keys()
        for task, metrics in expected.items():
            for key, value in metrics.items():
                assert got[task][key] == pytest.approx(value, rel=1e-4, abs=1e-6), (task, key)
    assert os.path.exists(tmp_path / "rank1.json")
