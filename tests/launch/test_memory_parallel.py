"""Memory parallelism (values sharded by embedding dim), tensor parallelism (DTensor), their
composition on one mesh, the layout-independent meta-device init and reshardable checkpoints, on CPU
under gloo: N ranks must reproduce the 1-rank run."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from launch.config import load_config
from launch.distributed.parallelize import check_layout
from launch.runtime.errors import ConfigError
from launch.train.metrics import read_metrics

from ..conftest import REPO, run_module  # noqa: TID252

TINY_MEMORY = str(REPO / "configs" / "memory" / "tiny_memory.yaml")
STEPS = ["train.steps=4", "train.log_every=1", "train.val_every=2", "train.ckpt_every=2"]
WORKER = "tests.launch.memory_parallel_worker"


def train(run_dir: Path, *overrides: str, nproc: int = 1):
    return run_module(
        "launch.train", f"config={TINY_MEMORY}", f"run.dir={run_dir}", *STEPS, *overrides, nproc=nproc
    )


def records(run_dir: Path) -> list[dict]:
    return [r for r in read_metrics(run_dir) if "loss" in r or "val_loss" in r]


def assert_same_run(a: Path, b: Path, tol: float = 1e-4) -> None:
    ra, rb = records(a), records(b)
    assert [r["step"] for r in ra] == [r["step"] for r in rb] and len(ra) == 6
    for x, y in zip(ra, rb):
        for key in ("loss", "val_loss", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=tol, abs=tol), (key, x, y)


def resume_copy(src: Path, dst: Path) -> Path:
    """`src`'s run directory as it was right after its step-2 checkpoint."""
    shutil.copytree(src, dst)
    shutil.rmtree(dst / "checkpoints" / "step_4")
    return dst


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_rank")
    train(run_dir)
    return run_dir


@pytest.fixture(scope="module")
def two_memory_ranks(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("p2")
    train(run_dir, "parallel.memory=2", nproc=2)
    return run_dir


# -- the sharded read itself ------------------------------------------------------------------


def test_sharded_read_equals_full_lookup_two_ranks():
    # forward, weight grads, value grads assembled from shards, 1/P storage, grad norm; bad setups
    run_module(WORKER, "lookup", "2", nproc=2)
    run_module(WORKER, "errors", "2", nproc=2)


@pytest.mark.slow
@pytest.mark.parametrize("P", [2, 4])
def test_sharded_read_equals_full_lookup_four_ranks(P):
    # P=2 on 4 ranks: two memory groups replicate each column slice; their grads are averaged
    run_module(WORKER, "lookup", str(P), nproc=4)


def test_meta_build_inits_each_shard_as_a_slice_of_the_one_process_init():
    # P=2 (values column-sharded) under FSDP2: bit-for-bit slices of the 1-process init
    run_module(WORKER, "init", "2", "1", "fsdp", nproc=2)


@pytest.mark.slow
def test_meta_build_init_with_tensor_and_memory_parallel_on_four_ranks():
    # mesh (1, P=2, T=2): TP DTensors under FSDP2 (strided shards) and value shards, all exact slices
    run_module(WORKER, "init", "2", "2", "fsdp", nproc=4)


@pytest.mark.parametrize(
    "overrides, world, match",
    [
        (["parallel.memory=3"], 4, "parallel.memory=3 must divide the world size 4"),
        (
            ["parallel.memory=2", "memory.v_dim=63"],
            2,
            "parallel.memory=2 must divide the memory value width 63",
        ),
        (
            ["parallel.tensor=2", "model.n_kv_heads=1"],
            2,
            "parallel.tensor=2 must divide model.n_heads=4 and model.n_kv_heads=1",
        ),
        (
            ["parallel.tensor=2", "model.ffn_dim=99"],
            2,
            "parallel.tensor=2 must divide the FFN hidden size 99",
        ),
        (
            ["parallel.memory=2", "parallel.tensor=2"],
            2,
            r"parallel.memory=2 × parallel.tensor=2 must divide the world size 2",
        ),
        (["parallel.data=zero"], 2, "parallel.data='zero': expected ddp or fsdp"),
        (["parallel.tensor=2", "grow.strategy=stack"], 2, "parallel.tensor=2 with grow.strategy=stack"),
        (["train.activation_checkpoint=some"], 1, "train.activation_checkpoint='some'"),
        (
            ["parallel.memory=2", "memory.value_optimizer=rowwise_adam"],
            2,
            "rowwise_adam with parallel.memory > 1",
        ),
    ],
)
def test_impossible_layouts_fail_clearly(overrides, world, match):
    cfg = load_config([f"config={TINY_MEMORY}", *overrides])
    with pytest.raises(ConfigError, match=match):
        check_layout(cfg, world)


def test_impossible_layout_fails_in_one_line_before_joining_a_group(tmp_path):
    proc = run_module(
        "launch.train", f"config={TINY_MEMORY}", f"run.dir={tmp_path}", "parallel.memory=3", check=False
    )
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert "parallel.memory=3 must divide the world size 1" in proc.stderr
    assert not (tmp_path / "checkpoints").exists()


# -- training through launch.train ------------------------------------------------------------


def test_memory_parallel_training_matches_one_rank_and_reshards(one_rank, two_memory_ranks, tmp_path):
    two = two_memory_ranks
    assert_same_run(one_rank, two)
    # The checkpoint holds the full logical table: a 1-process run resumes it and continues identically.
    p1 = resume_copy(two, tmp_path / "p1")
    proc = train(p1)
    assert "resuming from" in proc.stdout
    assert_same_run(one_rank, p1)


def test_query_batchnorm_trains_on_two_ranks_like_one_and_resumes_on_one(tmp_path):
    """Batch statistics over the global batch (synced across the data-parallel ranks), the running
    estimates the same on every rank (validation uses them), and checkpointed with the model."""
    qbn = "memory.query_batchnorm=true"
    one, two = tmp_path / "one", tmp_path / "two"
    train(one, qbn)
    train(two, qbn, "parallel.memory=2", nproc=2)
    assert_same_run(one, two)
    resumed = resume_copy(two, tmp_path / "resumed")
    assert "resuming from" in train(resumed, qbn).stdout
    assert_same_run(one, resumed)
    plain = tmp_path / "plain"
    train(plain)  # the option changes the model: the runs above would match without it otherwise
    assert records(plain)[-1]["val_loss"] != pytest.approx(records(one)[-1]["val_loss"], rel=1e-4)


@pytest.mark.slow
def test_checkpoint_from_two_memory_ranks_resumes_on_four_with_fsdp(one_rank, two_memory_ranks, tmp_path):
    p4 = resume_copy(two_memory_ranks, tmp_path / "p4")
    train(p4, "parallel.memory=4", "parallel.data=fsdp", nproc=4)
    assert_same_run(one_rank, p4)


@pytest.mark.slow
def test_row_sparse_values_with_fsdp_match_one_rank(tmp_path):
    sparse = ["memory.value_optimizer=row_sparse_adam"]
    train(tmp_path / "one", *sparse)
    train(tmp_path / "two", *sparse, "parallel.memory=2", "parallel.data=fsdp", nproc=2)
    assert_same_run(tmp_path / "one", tmp_path / "two")


def test_tensor_parallel_matches_one_rank_and_resumes_unsplit(one_rank, tmp_path):
    tp = tmp_path / "tp"
    proc = train(tp, "parallel.tensor=2", "train.activation_checkpoint=full", nproc=2)
    assert "world 2" in proc.stdout
    assert_same_run(one_rank, tp)
    t1 = resume_copy(tp, tmp_path / "t1")
    train(t1)
    assert_same_run(one_rank, t1)


@pytest.mark.slow
def test_tensor_parallel_with_fsdp_on_four_ranks_matches_one_rank(one_rank, tmp_path):
    # (dp=2) x (tp=2): FSDP2 on the "dp" mesh dim over DTensor-split weights; clipping norm included
    train(tmp_path / "tp_fsdp", "parallel.tensor=2", "parallel.data=fsdp", nproc=4)
    assert_same_run(one_rank, tmp_path / "tp_fsdp")


def test_tensor_and_memory_parallel_on_four_ranks_match_one_rank(one_rank, tmp_path):
    # mesh (replica=1, memory=2, tp=2): values column-sharded over "memory", heads/FFN split over "tp",
    # gradients of everything else averaged by hand over "dp" (DDP cannot hold DTensors)
    train(
        tmp_path / "tp_mp",
        "parallel.tensor=2",
        "parallel.memory=2",
        "train.activation_checkpoint=selective",
        nproc=4,
    )
    assert_same_run(one_rank, tmp_path / "tp_mp")
