"""Checkpoints behind fsspec URLs (`train.checkpoint_dir`, launch.checkpoint.storage): the commit marker
written last, the manifest, pruning, fallback past a damaged or uncommitted newest checkpoint, the safe
metadata reader and the readers (eval, load) work there as on a local disk. fsspec's in-memory
filesystem (per process) covers one process; its local filesystem through file:// URLs covers
resume across processes, a crash mid-save and 2 gloo ranks."""

from __future__ import annotations

import importlib.util
import json
import pickle
import uuid
from pathlib import Path

import pytest
import torch

from launch import grow as grow_cli
from launch.checkpoint import storage
from launch.checkpoint.checkpointer import Checkpointer
from launch.checkpoint.load import load_checkpoint
from launch.checkpoint.paths import list_checkpoints, resolve_checkpoint
from launch.checkpoint.read import checkpoint_problem, read_model_state
from launch.checkpoint.safe_metadata import read_metadata_file
from launch.checkpoint.storage import FsspecPath, as_path
from launch.eval import __main__ as eval_cli
from launch.runtime.errors import UserError, run_cli
from launch.train import __main__ as train_cli
from launch.train.metrics import read_metrics

from ..conftest import TINY, run_module  # noqa: TID252
from ._reliability import cli_error
from .test_checkpointer import WORKER, Tiny, _Exploit, damage_checkpoint, resign, save, trained


@pytest.fixture
def mem():
    """A fresh root on fsspec's in-memory filesystem (shared by everything in this process)."""
    url = f"memory://ckpt_tests/{uuid.uuid4().hex}"
    yield url
    as_path(url).rmtree()


def snapshot(root: FsspecPath) -> dict[str, bytes]:
    return {rel: (root / rel).read_bytes() for rel in storage.files(root)}


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# -- the storage layer, one process, memory:// ----------------------------------------------------


def test_commit_marker_manifest_pruning_and_round_trip(tmp_path, mem):
    ck = Checkpointer(tmp_path, keep_last=2, root=mem)
    model, opts = trained()
    for step in (1, 2, 3):
        save(ck, step, model, opts, tmp_path)
    root = as_path(mem)
    assert isinstance(root, FsspecPath) and ck.root == root
    assert [s for s, _ in ck.candidates()] == [2, 3]
    assert [p.name for p in root.iterdir()] == ["step_2", "step_3"]  # pruned; no temporaries left
    assert not (tmp_path / "checkpoints").exists()  # nothing written locally
    step = root / "step_3"
    assert json.loads((step / "COMMITTED").read_text()) == {"step": 3}
    listed = json.loads((step / "manifest.json").read_text())["files"]
    assert set(listed) == set(storage.files(step)) - {"manifest.json", "COMMITTED"}
    assert "state/.metadata" in listed and "state/__0_0.distcp" in listed

    path = ck.latest_intact()
    assert path == step and checkpoint_problem(path) is None
    fresh = Tiny(seed=5)
    fresh_opts = [torch.optim.AdamW(fresh.parameters(), lr=0.1)]
    assert ck.load(path, fresh, fresh_opts)["tokens"] == 30
    assert same_weights(model, fresh) and fresh.head.weight is fresh.emb.weight
    a, b = opts[0].state_dict()["state"], fresh_opts[0].state_dict()["state"]
    assert all(torch.equal(a[i][k], b[i][k]) for i in a for k in a[i])
    reader = Tiny(seed=9)
    read_model_state(path, reader)  # the one-process reader (eval, grow, to-hf) through the URL
    assert same_weights(model, reader)
    assert resolve_checkpoint(mem) == step and resolve_checkpoint(str(step)) == step


def test_a_step_without_its_marker_is_no_checkpoint_and_is_cleared(tmp_path, mem, capsys):
    ck = Checkpointer(tmp_path, keep_last=3, root=mem)
    model, opts = trained()
    first = save(ck, 1, model, opts, tmp_path)
    cut = save(ck, 2, model, opts, tmp_path)
    (cut / "COMMITTED").unlink()  # a save killed after its last file but before its marker
    capsys.readouterr()
    assert [s for s, _ in ck.candidates()] == [1]
    assert ck.latest_intact() == first and capsys.readouterr().err == ""  # never a checkpoint: no warning
    assert "not committed (no COMMITTED marker" in checkpoint_problem(cut)
    with pytest.raises(UserError, match="not committed"):
        read_model_state(cut, Tiny())
    assert ck.clear_debris() == [cut] and not cut.exists()
    assert snapshot(first) and ck.latest_intact() == first

    # a save killed halfway (a torn shard, no manifest): the next save's pruning removes it
    half = as_path(mem) / "step_7"
    (half / "state").mkdir()
    (half / "state" / "__0_0.distcp").write_bytes(b"half a shard")
    assert [s for s, _ in ck.candidates()] == [1]
    save(ck, 3, model, opts, tmp_path)
    assert not half.exists() and [s for s, _ in ck.candidates()] == [1, 3]


@pytest.mark.parametrize("damage", ["truncate_shard", "flip_byte", "delete_metadata", "truncate_state"])
def test_damaged_newest_falls_back_with_one_line(tmp_path, mem, damage, capsys):
    ck = Checkpointer(tmp_path, keep_last=3, root=mem)
    model, opts = trained()
    older = save(ck, 1, model, opts, tmp_path)
    newest = save(ck, 2, model, opts, tmp_path)
    before = snapshot(older)
    target = damage_checkpoint(newest, damage)
    capsys.readouterr()
    assert ck.latest_intact() == older
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and target.name in err[0] and "step_1" in err[0]
    assert err[0].count("memory://") >= 2  # the files are named by their URLs
    assert snapshot(older) == before
    (older / "rng.pt").write_bytes(b"rot")
    with pytest.raises(UserError, match=r"no intact checkpoint in memory://.*rng\.pt"):
        ck.latest_intact()


def test_crafted_metadata_behind_a_url_is_refused_without_running_code(tmp_path, mem):
    ck = Checkpointer(tmp_path, root=mem)
    model, opts = trained()
    path = save(ck, 1, model, opts, tmp_path)
    marker = tmp_path / "pwned"
    (path / "state" / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(UserError, match="not a plain checkpoint metadata file"):
        read_metadata_file(path / "state" / ".metadata")
    resign(path)  # the manifest matches: only the content check can tell
    with pytest.raises(UserError, match="no intact checkpoint .*not a plain checkpoint metadata file"):
        ck.latest_intact()
    with pytest.raises(UserError, match="not a plain checkpoint metadata file"):
        ck.load(path, *trained())
    assert not marker.exists()


# -- through the commands, in process, memory:// --------------------------------------------------


def test_train_resume_prune_and_readers_on_memory(capsys, tmp_path, mem):
    run = tmp_path / "run"
    argv = [f"config={TINY}", f"run.dir={run}", f"train.checkpoint_dir={mem}", "train.ckpt_every=2",
            "train.keep_last=1", "train.val_every=0", "train.final_val_sequences=0", "train.progress=false"]  # fmt: skip
    for steps in (2, 4):  # the second run resumes the first, through the URL
        capsys.readouterr()
        with pytest.raises(SystemExit) as exc:
            run_cli(train_cli.main, [*argv, f"train.steps={steps}"])
        assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"resuming from {as_path(mem) / 'step_2'} at step 2" in out
    assert not (run / "checkpoints").exists() and (run / "metrics.jsonl").is_file()
    # Readers find the checkpoints from the run directory (its config.yaml names the URL) or the URL.
    assert [s for s, _ in list_checkpoints(run)] == [4]  # step_2 pruned (keep_last=1)
    assert [p.name for p in as_path(mem).iterdir()] == ["step_4"]
    loaded = load_checkpoint(run)
    assert loaded.step == 4 and loaded.path == as_path(mem) / "step_4"
    assert same_weights(loaded.model, load_checkpoint(mem).model)
    assert loaded.tokenizer.path.read_bytes() == (run / "tokenizer.model").read_bytes()
    capsys.readouterr()
    argv_eval = [f"checkpoint={mem}", "tasks=[shakespeare]", "eval.limit=2", "eval.sample_tokens=0",
                 "progress=false", f"out={tmp_path / 'eval'}"]  # fmt: skip
    with pytest.raises(SystemExit) as exc:
        run_cli(eval_cli.main, argv_eval)
    assert exc.value.code == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert str(as_path(mem) / "step_4") in json.dumps(results)
    # grow and to-hf read the URL too; their outputs stay local
    with pytest.raises(SystemExit) as exc:
        run_cli(grow_cli.main, [f"checkpoint={mem}", f"out={tmp_path / 'grown'}", "grow.strategy=stack_copy"])
    assert exc.value.code == 0 and load_checkpoint(tmp_path / "grown").config.model.n_layers == 4
    grown_from = json.loads((tmp_path / "grown" / "trainer_state.json").read_text())["grown_from"]
    assert grown_from == {"checkpoint": str(as_path(mem) / "step_4"), "step": 4, "tokens": 4 * 8 * 32}
    if importlib.util.find_spec("transformers") is not None:
        from launch.convert.export import export_checkpoint

        export_checkpoint(mem, tmp_path / "hf")
        assert (tmp_path / "hf" / "config.json").is_file()
    # Re-run without train.checkpoint_dir: RUN/checkpoints is empty, the run's checkpoints are elsewhere
    cli_error(
        capsys,
        train_cli.main,
        [*argv[:2], *argv[3:], "train.steps=6"],
        "keeps this run's checkpoints in memory://",
    )
    assert [r["step"] for r in read_metrics(run) if "loss" in r][-1] == 4  # metrics untouched


def test_url_settings_are_one_line(capsys, tmp_path):
    base = [f"config={TINY}", "train.steps=1"]
    cli_error(capsys, train_cli.main, [*base, "run.dir=s3://bucket/run"], "run.dir=s3://bucket/run",
              "train.checkpoint_dir=s3://bucket/run")  # fmt: skip
    cli_error(
        capsys, train_cli.main, [*base, f"run.dir={tmp_path}", "train.checkpoint_dir=nosuch://b/x"], "nosuch"
    )
    if importlib.util.find_spec("s3fs") is None:
        cli_error(capsys, train_cli.main, [*base, f"run.dir={tmp_path}", "train.checkpoint_dir=s3://b/x"],
                  "train.checkpoint_dir=s3://b/x", "memscale[s3]")  # fmt: skip
        with pytest.raises(UserError, match=r"cannot open s3://b/x: .*memscale\[s3\]"):
            load_checkpoint("s3://b/x")
    assert not any(tmp_path.iterdir())  # refused before anything was written


# -- across processes: file:// URLs ---------------------------------------------------------------


def train(run_dir: Path, *overrides: str, **kw):
    return run_module("launch.train", f"config={TINY}", f"run.dir={run_dir}", *overrides, **kw)


def test_file_url_crash_mid_save_resumes_bitwise_and_prunes(tmp_path):
    args = ["train.steps=8", "train.ckpt_every=4", "train.keep_last=1", "train.log_every=1",
            "train.val_every=0", "train.final_val_sequences=0"]  # fmt: skip
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(straight, *args, f"train.checkpoint_dir=file://{tmp_path}/straight_ck")
    url = f"train.checkpoint_dir=file://{tmp_path}/crashed_ck"
    proc = train(crashed, *args, url, env={"LAUNCH_FAULT": "crash_in_save:8"}, check=False)
    assert proc.returncode != 0
    dead = tmp_path / "crashed_ck" / "step_8"  # written in place (no rename on a store), never committed
    assert (dead / "state" / ".metadata").is_file() and not (dead / "COMMITTED").exists()
    assert [s for s, _ in list_checkpoints(crashed)] == [4] and load_checkpoint(crashed).step == 4
    out = train(crashed, *args, url).stdout
    assert f"resuming from file://{tmp_path}/crashed_ck/step_4 at step 4" in out
    assert sorted(p.name for p in (tmp_path / "crashed_ck").iterdir()) == ["step_8"]  # step_4 pruned
    assert (dead / "COMMITTED").is_file()

    def losses(run: Path) -> dict[int, float]:
        return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}

    assert losses(crashed) == losses(straight) and len(losses(straight)) == 8  # bit for bit
    assert same_weights(load_checkpoint(crashed).model, load_checkpoint(straight).model)


def test_two_gloo_ranks_save_to_a_file_url_one_process_reshards(tmp_path):
    url = f"file://{tmp_path}/store"
    run_module(WORKER, "save", url, "2", "fsdp", "async", nproc=2)  # async save through fsspec's writer
    step = tmp_path / "store" / "step_2"
    assert sorted(p.name for p in (step / "state").glob("__*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert (step / "COMMITTED").is_file() and sorted(p.name for p in step.parent.iterdir()) == ["step_2"]
    run_module(WORKER, "load", url, "1", "fsdp", nproc=1)
