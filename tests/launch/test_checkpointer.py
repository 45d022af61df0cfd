"""launch.checkpoint: sharded DCP checkpoints that reshard on load, checksum manifests with fallback
to the newest intact checkpoint, no code ever unpickled, non-finite state never committed, failed
writes named with the previous checkpoint kept."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from launch.checkpoint import manifest
from launch.checkpoint.checkpointer import Checkpointer
from launch.checkpoint.legacy import read_plain_tensors
from launch.checkpoint.read import read_model_state
from launch.checkpoint.safe_metadata import read_metadata_file
from launch.config import config_from_file
from launch.models.build import build_model
from launch.runtime.errors import TrainingError, UserError

from ..conftest import run_module  # noqa: TID252

WORKER = "tests.launch.checkpoint_worker"


class Tiny(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.emb = nn.Embedding(5, 4)
        self.lin = nn.Linear(4, 4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=g)
        self.head.weight = self.emb.weight

    def forward(self):
        return self.head(self.lin(self.emb(torch.arange(3)))).square().mean()


def trained(seed: int = 0) -> tuple[Tiny, list[torch.optim.Optimizer]]:
    model = Tiny(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model().backward()
    opt.step()
    opt.zero_grad()
    return model, [opt]


def save(ck: Checkpointer, step: int, model: nn.Module, opts, tmp_path: Path) -> Path:
    tok = tmp_path / "tok.model"
    tok.write_bytes(b"tokenizer")
    return ck.save(step, model, opts, {"tokens": step * 10, "data": {"pos": step}}, "model: {}\n", tok)


def resign(ckpt: Path) -> None:
    """Rewrite the manifest for tampered files, as an attacker could: the content checks must still hold."""
    manifest.write_manifest(ckpt, manifest.digest_files(ckpt, manifest.all_files(ckpt)))


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# -- layouts (real multi-process gloo) ---------------------------------------------------------


@pytest.mark.parametrize(
    "save_nproc, save_p, save_data, load_nproc, load_p, load_data, extra",
    [
        (2, 2, "fsdp", 1, 1, "fsdp", ""),  # P=2 -> P=1 (one process, full tensors)
        (1, 1, "fsdp", 4, 4, "fsdp", ""),  # P=1 -> P=4
        (4, 2, "fsdp", 2, 2, "ddp", "async"),  # replicas dedup'd, async save; FSDP -> DDP
    ],
)
def test_sharded_save_reshards_on_load(
    tmp_path, save_nproc, save_p, save_data, load_nproc, load_p, load_data, extra
):
    run_dir = str(tmp_path / "run")
    run_module(WORKER, "save", run_dir, str(save_p), save_data, extra, nproc=save_nproc)
    step = tmp_path / "run" / "checkpoints" / "step_2"
    shards = sorted(p.name for p in (step / "state").glob("__*.distcp"))
    assert shards == [f"__{r}_0.distcp" for r in range(save_nproc)]  # each rank wrote its own file
    files = json.loads((step / "manifest.json").read_text())["files"]
    assert set(files) == {
        str(p.relative_to(step))
        for p in step.rglob("*")
        if p.is_file() and p.name not in ("manifest.json", "COMMITTED")  # the marker is written after it
    }
    assert json.loads((step / "COMMITTED").read_text()) == {"step": 2}
    run_module(WORKER, "load", run_dir, str(load_p), load_data, nproc=load_nproc)


# -- one process: round trip, ties, pruning -----------------------------------------------------


def test_round_trip_ties_keep_last_and_one_process_reader(tmp_path):
    ck = Checkpointer(tmp_path, keep_last=2)
    model, opts = trained()
    for step in (1, 2, 3):
        save(ck, step, model, opts, tmp_path)
    assert [s for s, _ in ck.candidates()] == [2, 3]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))
    path = ck.latest_intact()
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["aliases"] == {"head.weight": "emb.weight"}
    assert (path / "tokenizer.model").read_bytes() == b"tokenizer" and (path / "config.yaml").is_file()

    fresh, fresh_opts = Tiny(seed=5), [torch.optim.AdamW(Tiny(seed=5).parameters(), lr=0.1)]
    fresh_opts = [torch.optim.AdamW(fresh.parameters(), lr=0.1)]
    got = ck.load(path, fresh, fresh_opts)
    assert got["tokens"] == 30 and got["data"] == {"pos": 3}
    assert fresh.head.weight is fresh.emb.weight
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    a_state, b_state = opts[0].state_dict()["state"], fresh_opts[0].state_dict()["state"]
    for i in a_state:
        for k in a_state[i]:
            assert torch.equal(a_state[i][k], b_state[i][k])

    reader = Tiny(seed=9)
    read_model_state(path, reader)
    assert torch.equal(reader.lin.weight, model.lin.weight) and reader.head.weight is reader.emb.weight


# -- damage, fallback, never from step 0 --------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncate_shard", "flip_byte", "delete_metadata", "truncate_state"])
def test_damaged_latest_falls_back_to_intact_with_one_line(tmp_path, damage, capsys):
    ck = Checkpointer(tmp_path, keep_last=3)
    model, opts = trained()
    save(ck, 1, model, opts, tmp_path)
    newest = save(ck, 2, model, opts, tmp_path)
    older = snapshot(tmp_path / "checkpoints" / "step_1")
    target = damage_checkpoint(newest, damage)
    assert ck.latest_intact() == tmp_path / "checkpoints" / "step_1"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "warning" in err[0] and target.name in err[0] and "step_1" in err[0]
    assert snapshot(tmp_path / "checkpoints" / "step_1") == older

    # nothing intact: one line naming the damaged file, never a silent restart from step 0
    (tmp_path / "checkpoints" / "step_1" / "rng.pt").write_bytes(b"rot")
    with pytest.raises(UserError, match=r"no intact checkpoint .*rng\.pt"):
        ck.latest_intact()


def test_reader_refuses_damaged_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path)
    model, opts = trained()
    path = save(ck, 1, model, opts, tmp_path)
    shard = path / "state" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(UserError, match="__0_0.distcp"):
        read_model_state(path, Tiny())


# -- nothing unpickles code ----------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_crafted_metadata_is_refused_without_running_code(tmp_path):
    ck = Checkpointer(tmp_path)
    model, opts = trained()
    path = save(ck, 1, model, opts, tmp_path)
    marker = tmp_path / "pwned"
    (path / "state" / ".metadata").write_bytes(pickle.dumps(_Exploit(marker)))
    with pytest.raises(UserError, match="not a plain checkpoint metadata file"):
        read_metadata_file(path / "state" / ".metadata")
    resign(path)  # also through the trainer's and the readers' paths
    # Its manifest matches, but its content is unusable: never chosen to resume from.
    with pytest.raises(UserError, match="no intact checkpoint .*not a plain checkpoint metadata file"):
        ck.latest_intact()
    with pytest.raises(UserError, match="not a plain checkpoint metadata file"):
        ck.load(path, *trained())
    with pytest.raises(UserError, match="not a plain checkpoint metadata file"):
        read_model_state(path, Tiny())
    assert not marker.exists()


def test_crafted_pickle_in_pt_file_is_not_a_plain_tensor_file(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "optimizer.pt"
    torch.save({"x": _Exploit(marker)}, bad)
    with pytest.raises(UserError, match=r"optimizer\.pt is not a plain tensor file"):
        read_plain_tensors(bad)
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UserError, match=r"optimizer\.pt is damaged or truncated"):
        read_plain_tensors(bad)
    assert not marker.exists()


def test_tampered_alias_spec_is_one_line(tmp_path):
    ck = Checkpointer(tmp_path)
    model, opts = trained()
    path = save(ck, 1, model, opts, tmp_path)
    state = json.loads((path / "trainer_state.json").read_text())
    state["aliases"] = {"emb.weight": "nonexistent"}
    (path / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=r"trainer_state.json: \d+ bytes, expected"):
        read_model_state(path, Tiny())
    resign(path)
    with pytest.raises(UserError, match="alias 'emb.weight' -> 'nonexistent'"):
        read_model_state(path, Tiny())


# -- non-finite state and failed writes are never committed ------------------------------------


def test_non_finite_weights_are_not_committed_and_the_finite_one_is_named(tmp_path):
    ck = Checkpointer(tmp_path)
    model, opts = trained()
    good = save(ck, 1, model, opts, tmp_path)
    with torch.no_grad():
        model.lin.weight[0, 0] = float("nan")
    with pytest.raises(TrainingError, match=rf"non-finite values in lin.weight at step 2.*{good}"):
        save(ck, 2, model, opts, tmp_path)
    assert [s for s, _ in ck.candidates()] == [1]
    assert not list((tmp_path / "checkpoints").glob(".tmp*"))


def test_failed_write_names_the_path_and_keeps_the_previous_checkpoint(tmp_path):
    ck = Checkpointer(tmp_path)  # ignores SIGXFSZ, so `ulimit -f` gives EFBIG instead of a kill
    model, opts = trained()
    save(ck, 1, model, opts, tmp_path)
    before = snapshot(tmp_path / "checkpoints")
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (600, hard))
    try:
        with pytest.raises(
            UserError, match=r"cannot write checkpoint .*step_2.*previous checkpoints are kept"
        ):
            save(ck, 2, model, opts, tmp_path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert snapshot(tmp_path / "checkpoints") == before


# -- when to save: the checkpointer decides (train.ckpt_every), the loop asks -------------------


@pytest.mark.parametrize(
    ("every", "step", "last", "preempted", "due"),
    [
        (10, 10, False, False, True),  # a multiple of ckpt_every
        (10, 20, False, False, True),
        (10, 15, False, False, False),
        (10, 15, True, False, True),  # the last step, whatever the schedule
        (10, 15, False, True, True),  # SIGTERM: save before exiting
        (0, 10, False, False, False),  # ckpt_every=0: only at the end
        (0, 10, True, False, True),
        (0, 7, False, True, True),
        (1, 1, False, False, True),
    ],
)
def test_due_saves_on_schedule_at_the_end_and_when_preempted(tmp_path, every, step, last, preempted, due):
    ck = Checkpointer(tmp_path, 2, every=every)
    assert ck.due(step, last=last, preempted=preempted) is due
    assert not (tmp_path / "checkpoints").exists()  # asking writes nothing


def test_due_defaults_to_no_schedule_and_not_preempted(tmp_path):
    ck = Checkpointer(tmp_path)
    assert ck.every == 0 and ck.due(5, last=False) is False and ck.due(5, last=True) is True
    with pytest.raises(TypeError):  # the contract: async_save and every by keyword only
        Checkpointer(tmp_path, 2, True)


# -- the single-file format of earlier versions: converted on read -----------------------------


def write_legacy(path: Path, model: nn.Module, opts) -> None:
    from launch.checkpoint.legacy import save_model_file

    path.mkdir(parents=True)
    save_model_file(model, path / "model.safetensors")
    names = {id(p): n for n, p in model.named_parameters()}
    states = []
    for opt in opts:
        sd = opt.state_dict()
        order = [p for g in opt.param_groups for p in g["params"]]
        states.append(
            {
                "state": {names[id(order[i])]: s for i, s in sd["state"].items()},
                "param_groups": sd["param_groups"],
            }
        )
    torch.save(states, path / "optimizer.pt")
    (path / "trainer_state.json").write_text(json.dumps({"step": 4, "tokens": 40, "data": {}}))


def test_legacy_checkpoint_loads_and_damage_is_one_line(tmp_path):
    model, opts = trained()
    legacy_dir = tmp_path / "checkpoints" / "step_4"
    write_legacy(legacy_dir, model, opts)
    ck = Checkpointer(tmp_path)
    assert ck.latest_intact() == legacy_dir  # no manifest in that format: accepted as is
    fresh = Tiny(seed=3)
    fresh_opts = [torch.optim.AdamW(fresh.parameters(), lr=0.1)]
    assert ck.load(legacy_dir, fresh, fresh_opts)["step"] == 4
    assert torch.equal(fresh.lin.weight, model.lin.weight) and fresh.head.weight is fresh.emb.weight
    assert torch.equal(
        fresh_opts[0].state[fresh.lin.weight]["exp_avg"], opts[0].state[model.lin.weight]["exp_avg"]
    )
    reader = Tiny(seed=4)
    read_model_state(legacy_dir, reader)
    assert torch.equal(reader.lin.bias, model.lin.bias)

    weights = legacy_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(UserError, match=r"model\.safetensors is damaged or truncated"):
        read_model_state(legacy_dir, Tiny())
    marker = tmp_path / "pwned"
    torch.save([{"state": {"lin.weight": {"exp_avg": _Exploit(marker)}}}], legacy_dir / "optimizer.pt")
    write_legacy(tmp_path / "again", model, opts)
    shutil.copy(tmp_path / "again" / "model.safetensors", weights)
    with pytest.raises(UserError, match=r"optimizer\.pt is not a plain tensor file"):
        other = Tiny()
        ck.load(legacy_dir, other, [torch.optim.AdamW(other.parameters())])
    assert not marker.exists()


# -- through launch.train ------------------------------------------------------------------------


def test_train_falls_back_past_a_damaged_checkpoint_and_refuses_non_finite(tmp_path):
    from ..conftest import TINY  # noqa: TID252

    base = [
        f"config={TINY}",
        f"run.dir={tmp_path}",
        "train.ckpt_every=2",
        "train.keep_last=3",
        "train.val_every=0",
    ]
    run_module("launch.train", *base, "train.steps=4")
    shard = tmp_path / "checkpoints" / "step_4" / "state" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-10])
    step2 = snapshot(tmp_path / "checkpoints" / "step_2")
    proc = run_module("launch.train", *base, "train.steps=6")
    warnings_ = [line for line in proc.stderr.splitlines() if line.startswith("warning")]
    assert len(warnings_) == 1 and "__0_0.distcp" in warnings_[0] and "step_2" in warnings_[0]
    assert f"resuming from {tmp_path / 'checkpoints' / 'step_2'} at step 2" in proc.stdout
    assert [s for s, _ in Checkpointer(tmp_path).candidates()] == [2, 4, 6]
    assert snapshot(tmp_path / "checkpoints" / "step_2") == step2

    # weights blown up by the learning rate: nothing non-finite is committed, the finite one is named
    blow = tmp_path / "blow"
    proc = run_module(
        "launch.train", f"config={TINY}", f"run.dir={blow}", "train.ckpt_every=1", "train.steps=6", "train.val_every=0",
        "optim.lr=1e30", "optim.warmup_steps=0", "optim.grad_clip=0", check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1, (
        proc.stderr
    )
    assert "non-finite" in proc.stderr or "is nan" in proc.stderr or "is inf" in proc.stderr
    kept = Checkpointer(blow).candidates()
    assert f"Newest finite checkpoint: {kept[-1][1] if kept else 'none'}" in proc.stderr
    for _, path in kept:  # every committed checkpoint is finite
        model = build_model(config_from_file(path / "config.yaml"))
        read_model_state(path, model)
        assert all(torch.isfinite(t).all() for t in model.state_dict().values())


def test_readers_check_the_manifest_before_trusting_the_config(tiny_checkpoint, tmp_path):
    from launch.checkpoint.load import load_checkpoint

    src = Checkpointer(tiny_checkpoint).latest_intact()
    ckpt = tmp_path / "step_20"
    shutil.copytree(src, ckpt)
    cfg = ckpt / "config.yaml"
    cfg.write_text(cfg.read_text() + "grow:\n  spec: {strategy: [not, a, spec]}\n")
    with pytest.raises(UserError, match=r"config\.yaml: \d+ bytes, expected"):
        load_checkpoint(ckpt)


def damage_checkpoint(ckpt, damage: str):
    """One kind of damage to checkpoint `ckpt` (a local Path or a storage path): a truncated or
    bit-flipped shard, no DCP metadata, or a torn trainer_state.json. Returns the damaged file."""
    target = {
        "truncate_shard": ckpt / "state" / "__0_0.distcp",
        "flip_byte": ckpt / "state" / "__0_0.distcp",
        "delete_metadata": ckpt / "state" / ".metadata",
        "truncate_state": ckpt / "trainer_state.json",
    }[damage]
    if damage == "flip_byte":
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x40
        target.write_bytes(bytes(data))
    elif damage == "delete_metadata":
        target.unlink()
    else:
        target.write_bytes(target.read_bytes()[:7])
    return target
