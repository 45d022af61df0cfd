"""End-to-end trainer behaviour: outputs, resume, failures, distributed equivalence."""

import json
import math
import signal
from pathlib import Path

import pytest

from launch.checkpoint.load import load_checkpoint
from launch.checkpoint.paths import list_checkpoints
from launch.checkpoint.safe_metadata import read_metadata_file
from launch.train.metrics import read_metrics

from ..conftest import TINY, run_module  # noqa: TID252


def train(run_dir, *overrides, **kw):
    return run_module("launch.train", f"config={TINY}", f"run.dir={run_dir}", *overrides, **kw)


def losses(run_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_run_directory_layout_and_metrics(tiny_checkpoint):
    run = tiny_checkpoint
    assert (run / "config.yaml").is_file() and (run / "tokenizer.model").is_file()
    recs = read_metrics(run)
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [5, 10, 15, 20]
    for r in train_recs:
        assert {"step", "loss", "lr", "tokens", "tokens_per_s"} <= set(r)
        assert r["tokens"] == r["step"] * 8 * 32
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [10, 20]
    assert all(math.isclose(r["val_ppl"], math.exp(r["val_loss"]), rel_tol=1e-9) for r in val)
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]  # it learns
    steps = [s for s, _ in list_checkpoints(run)]
    assert steps == [10, 20]
    ckpt = run / "checkpoints" / "step_20"
    for f in [
        "state/.metadata",
        "manifest.json",
        "COMMITTED",
        "trainer_state.json",
        "rng.pt",
        "config.yaml",
        "tokenizer.model",
    ]:
        assert (ckpt / f).is_file(), f
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["data"]["consumed"] == 20 * 8


def test_tied_embedding_is_stored_once(tiny_checkpoint):
    step = tiny_checkpoint / "checkpoints/step_20"
    keys = set(read_metadata_file(step / "state/.metadata").state_dict_metadata)
    assert "model/tok_embeddings.weight" in keys and "model/output.weight" not in keys
    assert json.loads((step / "trainer_state.json").read_text())["aliases"] == {
        "output.weight": "tok_embeddings.weight"
    }
    loaded = load_checkpoint(tiny_checkpoint)
    assert loaded.model.output.weight is loaded.model.tok_embeddings.weight
    assert loaded.step == 20


def test_bitwise_resume_after_kill_9(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    args = ["train.steps=12", "train.ckpt_every=6", "train.log_every=1", "train.val_every=0"]
    train(straight, *args)
    proc = train(crashed, *args, env={"LAUNCH_FAULT": "kill:9"}, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert [s for s, _ in list_checkpoints(crashed)] == [6]
    assert max(losses(crashed)) == 8  # steps 7 and 8 were logged, then rolled back on resume
    out = train(crashed, *args)
    assert "resuming from" in out.stdout
    assert losses(crashed) == losses(straight)  # every logged loss identical, bit for bit


def test_crash_mid_checkpoint_write_keeps_previous_checkpoint(tmp_path):
    args = ["train.steps=8", "train.ckpt_every=4", "train.val_every=0", "train.log_every=1"]
    proc = train(tmp_path, *args, env={"LAUNCH_FAULT": "crash_in_save:8"}, check=False)
    assert proc.returncode != 0
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4]
    assert list((tmp_path / "checkpoints").glob(".tmp_step_8_*"))  # the half-written one
    assert load_checkpoint(tmp_path).step == 4  # previous one loads
    train(tmp_path, *args)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 8]
    assert not list((tmp_path / "checkpoints").glob(".tmp_step_*"))


def test_sigterm_checkpoints_and_exits_zero(tmp_path):
    args = ["train.steps=20", "train.ckpt_every=100", "train.val_every=0"]
    proc = train(tmp_path, *args, env={"LAUNCH_FAULT": "sigterm:7"})
    assert proc.returncode == 0 and "SIGTERM" in proc.stdout
    assert [s for s, _ in list_checkpoints(tmp_path)] == [7]
    train(tmp_path, *args)
    assert [s for s, _ in list_checkpoints(tmp_path)][-1] == 20


def test_nan_loss_stops_naming_the_step_and_keeps_checkpoint(tmp_path):
    args = ["train.steps=10", "train.ckpt_every=3", "train.val_every=0"]
    proc = train(tmp_path, *args, env={"LAUNCH_FAULT": "nan:5"}, check=False)
    assert proc.returncode == 2
    assert "at step 5" in proc.stderr and "step_3" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3]


def test_user_errors_are_one_line_and_overwrite_nothing(tmp_path, tiny_checkpoint):
    proc = train(tmp_path, "model.dimm=3", check=False)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "model.dimm" in proc.stderr
    proc = train(tmp_path, "data.train=/does/not/exist.txt", check=False)
    assert proc.returncode == 2 and "matches no files" in proc.stderr
    # resuming a run whose checkpoint does not fit the config: named tensor, checkpoint untouched
    before = (tiny_checkpoint / "checkpoints/step_20/manifest.json").stat().st_mtime_ns
    proc = run_module(
        "launch.train", f"config={TINY}", f"run.dir={tiny_checkpoint}", "model.dim=128", check=False
    )
    assert proc.returncode == 2 and "different model config" in proc.stderr and "Traceback" not in proc.stderr
    assert (tiny_checkpoint / "checkpoints/step_20/manifest.json").stat().st_mtime_ns == before


def test_grad_accum_matches_single_batch(tmp_path):
    args = ["train.steps=4", "train.log_every=1", "train.val_every=0"]
    train(tmp_path / "a", *args)
    train(tmp_path / "b", *args, "train.grad_accum=4")
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert la.keys() == lb.keys()
    for s in la:
        assert la[s] == pytest.approx(lb[s], rel=1e-5, abs=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_match_one_rank(tmp_path, mode):
    args = [
        "train.steps=6",
        "train.log_every=1",
        "train.val_every=3",
        "train.ckpt_every=3",
        f"parallel.data={mode}",
    ]
    train(tmp_path / "one", *args)
    train(tmp_path / "two", *args, nproc=2)
    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a["step"] == b["step"]
        for key in ("loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-4), (mode, a, b)
    # the checkpoint written by 2 ranks resumes on 1 rank
    train(tmp_path / "two", "train.steps=8", "train.log_every=1", "train.val_every=0")
    assert max(losses(tmp_path / "two")) == 8
    assert Path(tmp_path / "two" / "checkpoints" / "step_8").is_dir()


def test_bf16_autocast_and_compile_track_fp32_eager(tmp_path):
    args = ["train.steps=3", "train.log_every=1", "train.val_every=0"]
    train(tmp_path / "eager", *args)
    train(tmp_path / "bf16", *args, "train.dtype=bf16")
    train(tmp_path / "compiled", *args, "train.compile=true")
    eager, bf16, compiled = (losses(tmp_path / n) for n in ("eager", "bf16", "compiled"))
    for s in eager:
        assert compiled[s] == pytest.approx(eager[s], rel=1e-4)
        assert bf16[s] == pytest.approx(eager[s], rel=2e-2)  # bf16 matmuls: close, not equal


def test_tokenizer_cli(tmp_path):
    from launch.data.tokenizer import Tokenizer

    run_module("launch.tokenizer", f"out={tmp_path / 'tok.model'}", "vocab_size=600")
    tok = Tokenizer(tmp_path / "tok.model")
    assert tok.vocab_size == 600
    text = "KING LEAR.\n  Nothing will come of nothing: speak again.\n"
    assert tok.decode(tok.encode(text)) == text
    proc = run_module(
        "launch.tokenizer", f"out={tmp_path / 'x.model'}", "data.train=/nope/x.txt", check=False
    )
    assert proc.returncode == 2 and "matches no files" in proc.stderr


def test_tokenizer_is_trained_on_the_whole_mixture(tmp_path):
    """Without data.tokenizer the run trains its tokenizer on data.train AND the data.mix sources:
    text only the mixed-in corpus has costs fewer pieces than under a tokenizer of data.train alone."""
    from launch.data.tokenizer import Tokenizer

    facts = tmp_path / "facts.txt"
    facts.write_text(
        "".join(f"Zorblaxian Quendrith was born in Vexmoor in {1900 + i % 90}.\n" for i in range(20000))
    )
    pieces = {}
    for name, extra in (("plays", []), ("mixture", [f"data.mix=[{{path: {facts}, ratio: 0.3}}]"])):
        run_dir = tmp_path / name
        train(run_dir, "train.steps=1", "train.ckpt_every=0", "train.val_every=0", *extra)
        pieces[name] = len(
            Tokenizer(run_dir / "tokenizer.model").encode("Zorblaxian Quendrith was born in Vexmoor.")
        )
    assert pieces["mixture"] < 0.7 * pieces["plays"], pieces


def test_tokens_per_s_counts_training_time_only(tmp_path, monkeypatch):
    """A logging window that contains a validation and a checkpoint reports the rate of its training
    steps alone. A fake clock makes it exact on any machine: each step takes 1 s, each validation
    100 s, each save 50 s, nothing else takes time."""
    from types import SimpleNamespace

    import launch.train.metrics
    from launch.config import load_config, validate
    from launch.distributed.process_group import DistInfo
    from launch.train.trainer import Trainer
    from launch.train.validation import Validator

    clock = [0.0]
    monkeypatch.setattr(launch.train.metrics, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def taking(seconds, method):
        def timed(self, *args, **kwargs):
            out = method(self, *args, **kwargs)
            clock[0] += seconds
            return out

        return timed

    monkeypatch.setattr(Trainer, "train_step", taking(1.0, Trainer.train_step))
    monkeypatch.setattr(Validator, "loss", taking(100.0, Validator.loss))
    monkeypatch.setattr(Trainer, "save", taking(50.0, Trainer.save))
    overrides = ["train.steps=6", "train.log_every=3", "train.val_every=2", "train.ckpt_every=2"]
    cfg = load_config([f"config={TINY}", f"run.dir={tmp_path}", "train.final_val_sequences=0", *overrides])
    validate(cfg)
    Trainer(cfg, DistInfo()).fit()

    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs if "val_loss" in r] == [2, 4, 6]  # inside both windows (1-3, 4-6)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len
    rates = [r["tokens_per_s"] for r in recs if "loss" in r]
    assert rates == [3 * tokens_per_step / 3.0] * 2  # 3 steps of 1 s, not 3 s + a validation + a save
